"""Hypothesis properties of the theory engine on random sparse stochastic matrices (issue 5):
Theorem 1's bound ≥ ARP whenever it applies; R finite iff ρ(Q) < 1; the Frobenius interval and the
Collatz–Wielandt bracket contain ρ(Q); the rigorous lower bounds never exceed R; sparse = dense."""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repdiag import theory

from test_theory import _one_blas_thread  # noqa: F401  (one OpenBLAS thread)

INF = float("inf")


@st.composite
def sparse_stochastic(draw):
    n = draw(st.integers(1, 7))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    A = np.zeros((n + 1, n + 1))
    for i in range(n):
        d = int(rng.integers(1, n + 1))
        cols = rng.choice(n, d, replace=False)
        w = rng.random(d) ** draw(st.sampled_from([1.0, 3.0]))
        eos = draw(st.sampled_from([0.0, 0.0, 0.05, 0.3]))
        if rng.random() < 0.2:  # a one-hot (greedy-like) row
            w = np.zeros(d)
            w[0] = 1.0
        w = w / w.sum() * (1 - eos)
        A[i, cols] = w
        A[i, n] = eos
    A[n, n] = 1.0
    return A


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(sparse_stochastic())
def test_properties(A):
    out = theory.compute_quantities(A, mc_trajectories=2, lower_bounds_K=20)
    q = out["quantities"]
    n = A.shape[0] - 1
    B = A[:n, :n]
    Qm = B * B
    rho = float(max(abs(np.linalg.eigvals(Qm))))
    # R finite iff rho(Q) < 1 (up to the divergence threshold)
    if rho < 1 - 1e-9:
        assert math.isfinite(q["su_R"])
    if rho > 1 - 1e-13:
        assert q["su_R"] == INF
    # Frobenius interval and Collatz–Wielandt bracket contain rho(Q)
    lo, hi = q["frobenius_interval_rho_Q"]
    assert lo - 1e-12 <= rho <= hi + 1e-12
    cl, ch = q["collatz_wielandt_rho_Q"]
    assert cl - 1e-9 <= rho <= ch + 1e-9
    # Theorem 1's bound >= ARP whenever it applies
    fb = q["fu_bounds"]
    if fb["condition_zeta_n_gt_rho_B2"] and fb["sigma_min"] > 1e-12 and math.isfinite(q["fu_arp"]):
        assert q["fu_arp"] <= fb["thm1_bound"] * (1 + 1e-9) + 1e-12
        assert fb["thm1_bound"] <= fb["cor11_bound"] * (1 + 1e-9) + 1e-12
    if fb["cor12_D"] > 0:
        assert math.isfinite(q["fu_arp"]) and q["fu_arp"] <= fb["cor12_bound"] * (1 + 1e-9) + 1e-12
    # rigorous lower bounds and the cyclic upper bound
    assert q["su_lower_bound_trace_cs"] <= q["su_R"] * (1 + 1e-9) + 1e-12
    assert q["su_lower_bound_diag_cs"] <= q["su_R"] * (1 + 1e-9) + 1e-12
    assert q["su_R"] <= q["su_upper_bound_cyclic"] * (1 + 1e-9) + 1e-12
    # termination probabilities are probabilities; tau finite only where p_eos = 1
    a = np.asarray(q["p_eos"])
    assert np.all((a >= -1e-12) & (a <= 1 + 1e-12))
    tau = np.asarray(q["expected_steps_to_eos"])
    assert np.all(np.isclose(a[np.isfinite(tau)], 1.0))
    # greedy R is inf iff there is a greedy cycle
    assert (q["greedy_matrix"]["su_R"] == INF) == (len(q["greedy"]["cycles"]) > 0)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sparse_stochastic())
def test_sparse_route_matches_dense(A):
    d = theory.compute_quantities(A, mc_trajectories=2, lower_bounds_K=20)["quantities"]
    s_out = theory.compute_quantities(sp.csr_matrix(A), mc_trajectories=2, lower_bounds_K=20, route="sparse")
    s = s_out["quantities"]
    for key in ("su_R", "fu_arp", "fu_arp_corrected", "su_estimate_r2", "rho_Q", "rho_B",
                "su_lower_bound_trace_cs", "su_lower_bound_diag_cs", "zeta_n"):
        x, y = d[key], s[key]
        assert (x == y) or abs(x - y) <= 1e-9 * max(1.0, abs(x), abs(y)), key
    assert d["cyclic_sccs"] == s["cyclic_sccs"]
    assert d["greedy"] == s["greedy"]
    np.testing.assert_allclose(d["p_eos"], s["p_eos"], atol=1e-10)
