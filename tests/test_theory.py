"""Theory engine (spec repetition-theory.md §1–§7, §12): every quantity by two independent routes on
the hand-designed matrices of §12, the analytic answers of its table, every proven inequality,
Monte Carlo within 4 standard errors, sparse = dense, bad input."""

from __future__ import annotations

import ctypes
import itertools
import json
import math

import numpy as np
import pytest
import scipy.sparse as sp

from repdiag import theory
from repdiag._atomic import dumps_json
from repdiag.errors import MatrixFormatError

INF = float("inf")


def _one_blas_thread() -> None:
    """numpy/scipy OpenBLAS default to all cores; on a shared 2-core box that is ~8x slower."""
    for line in open("/proc/self/maps"):
        path = line.split()[-1]
        if "openblas" not in path or not path.endswith(".so") and ".so" not in path:
            continue
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn(1)


_one_blas_thread()


# ----------------------------------------------------------------------------- helpers


def close(x, y, rtol=1e-9, atol_extra=0.0):
    if x == INF or y == INF:
        return x == y
    return abs(x - y) <= rtol * max(1.0, abs(x), abs(y)) + atol_extra


def assert_close(x, y, rtol=1e-9, extra=0.0, what=""):
    assert close(float(x), float(y), rtol, extra), f"{what}: {x!r} != {y!r}"


def absorbing(B, b=None):
    B = np.asarray(B, dtype=float)
    n = B.shape[0]
    if b is None:
        b = 1.0 - B.sum(axis=1)
    A = np.zeros((n + 1, n + 1))
    A[:n, :n] = B
    A[:n, n] = b
    A[n, n] = 1.0
    return A


def leaky_cycle(L, p):
    B = np.zeros((L, L))
    for i in range(L):
        B[i, (i + 1) % L] = p
    return absorbing(B)


def self_loop_trap(exit_p=0.2):
    # 0 -> 1 (1-exit_p) or <eos> (exit_p); 1 -> 2 -> 3; 3 -> 3 forever
    B = np.zeros((4, 4))
    B[0, 1] = 1 - exit_p
    B[1, 2] = B[2, 3] = B[3, 3] = 1.0
    return absorbing(B)


def chain_leaky_self_loop(s=0.9):
    B = np.zeros((4, 4))
    B[0, 1] = B[1, 2] = B[2, 3] = 1.0
    B[3, 3] = s
    return absorbing(B)


def near_uniform(n=6, eps=0.05, seed=0):
    rng = np.random.default_rng(seed)
    B = np.full((n, n), (1 - eps) / n) * (1 + 0.01 * rng.uniform(-1, 1, (n, n)))
    B *= (1 - eps) / B.sum(axis=1, keepdims=True)
    return absorbing(B)


def hub_dense(n=10, eos=0.01):
    B = np.zeros((n, n))
    for i in range(1, n):
        B[i, 0] = 0.6
        B[i, 1:] = (0.4 - eos) / (n - 1)
    B[0, 1] = 0.6
    B[0, 2:] = (0.4 - eos) / (n - 2)
    return absorbing(B)


def hub_sparse(n=10):
    B = np.zeros((n, n))
    for i in range(1, n):
        B[i, 0] = 0.85
        B[i, i % (n - 1) + 1] = 0.1  # a second, small successor
    B[0, 1] = 0.95
    return absorbing(B)


def sparse_random(n=40, d=3, seed=1, eos_max=0.3):
    rng = np.random.default_rng(seed)
    B = np.zeros((n, n))
    b = np.zeros(n)
    for i in range(n):
        cols = rng.choice(n, d, replace=False)
        w = rng.random(d + 1)
        w[-1] *= eos_max
        w /= w.sum()
        B[i, cols] = w[:d]
        b[i] = w[d]
    return absorbing(B, b)


def greedy_several_cycles():
    """Cycles of lengths 1..4, trees feeding them, and chains to <eos> (n = 16)."""
    n = 16
    f = {0: 0, 1: 2, 2: 1, 3: 4, 4: 5, 5: 3, 6: 7, 7: 8, 8: 9, 9: 6,  # cycles [0], [1,2], [3,4,5], [6,7,8,9]
         10: 0, 11: 10, 12: 3, 13: 16, 14: 13, 15: 9}
    A = np.zeros((n + 1, n + 1))
    rng = np.random.default_rng(3)
    for i in range(n):
        w = rng.random(n + 1) * 0.3
        w[f[i]] = 3.0
        A[i] = w / w.sum()
    A[n] = 0
    A[n, n] = 1
    return A, f


CASES = {
    "leaky2": leaky_cycle(2, 0.7),
    "pure2": leaky_cycle(2, 1.0),
    "trap": self_loop_trap(),
    "chain_loop": chain_leaky_self_loop(),
    "leaky3": leaky_cycle(3, 0.8),
    "near_uniform": near_uniform(),
    "hub_dense": hub_dense(),
    "hub_sparse": hub_sparse(),
    "sparse_random": sparse_random(),
    "greedy_graph": greedy_several_cycles()[0],
}

_CACHE: dict = {}


def Q(name, route="dense"):
    key = (name, route)
    if key not in _CACHE:
        _CACHE[key] = theory.compute_quantities(CASES[name], route=route)
    return _CACHE[key]["quantities"]


def parts(A):
    n = A.shape[0] - 1
    return A[:n, :n], A[:n, n], n


# ----------------------------------------------------------------------------- independent routes


def enum_closed_walks(B, k):
    """Brute force over every closed walk of length k: (tr B^k, tr Q^k, tr S^k, Σ_i ((B^k)_ii)²)."""
    n = B.shape[0]
    succ = [np.flatnonzero(B[i] > 0).tolist() for i in range(n)]
    trB = trQ = 0.0
    trS = 0
    diag = np.zeros(n)

    def walk(start, cur, depth, w):
        nonlocal trB, trQ, trS
        if depth == k:
            if cur == start:
                trB += w
                trQ += w * w
                trS += 1
                diag[start] += w
            return
        for j in succ[cur]:
            walk(start, j, depth + 1, w * B[cur, j])

    for i in range(n):
        walk(i, i, 0, 1.0)
    return trB, trQ, trS, float(np.sum(diag**2))


def transitive_closure_sccs(B):
    n = B.shape[0]
    R = (B > 0).astype(bool)
    for k in range(n):
        R = R | (R[:, [k]] & R[[k], :])
    out = set()
    for i in range(n):
        if R[i, i]:
            comp = tuple(j for j in range(n) if R[i, j] and R[j, i])
            out.add(comp)
    return sorted(list(c) for c in out)


def R_whole(B):
    Qm = B * B
    rho = max(abs(np.linalg.eigvals(Qm)))
    if rho >= 1 - 1e-12:
        return INF, None
    X = np.linalg.solve(np.eye(len(B)) - Qm, Qm)
    lam = np.linalg.eigvals(Qm)
    return float(np.trace(X)), float(np.real(np.sum(lam / (1 - lam))))


def R_series(B, K=4000):
    Qm = B * B
    P = np.eye(len(B))
    r = np.zeros(len(B))
    for _ in range(K):
        P = Qm @ P
        r += np.diag(P)
        if np.abs(P).max() < 1e-300:
            break
    return r


def fu_routes(B):
    n = len(B)
    zn = (B > 0).sum() / n
    lam = np.linalg.eigvals(B)
    eig = float(np.real(np.sum(lam**2 / (zn - lam**2))))
    B2 = B @ B / zn
    P = np.eye(n)
    ser = 0.0
    for k in range(1, 3000):
        P = B2 @ P  # (B²/ζn)^k
        ser += np.trace(P)
    return eig, ser


def fu_corr_routes(B):
    n = len(B)
    zn = (B > 0).sum() / n
    lam, V = np.linalg.eig(B)
    eig = None
    if np.linalg.cond(V) < 1e6:  # the eigen route needs a diagonalisable B
        Vi = np.linalg.inv(V)
        c = V * Vi.T  # c_ij = V_ij (V^{-1})_ji
        X = np.outer(lam, lam) / zn
        eig = float(np.real(np.einsum("ij,il,jl->", c, c, X / (1 - X))))
    P = np.eye(n)
    Bs = B / math.sqrt(zn)
    ser = 0.0
    for k in range(1, 3000):
        P = Bs @ P  # B^k / ζn^{k/2}
        d = np.diag(P)
        ser += float(d @ d)
    return eig, ser


def r2_series(B, K=3000):
    n = len(B)
    zn = (B > 0).sum() / n
    P = np.eye(n)
    Bs = B / math.sqrt(zn)
    s = 0.0
    for k in range(1, K):
        P = Bs @ P
        s += np.trace(P) ** 2
    return s


def termination_iter(A, iters=20000):
    B, b, n = parts(A)
    a = np.zeros(n)
    for _ in range(iters):
        a = b + B @ a
    return a


# ----------------------------------------------------------------------------- layout


SPEC_KEYS = {
    "zeta", "zeta_n", "row_collision_B", "rho_B", "rho_B2", "rho_Q", "frobenius_interval_rho_Q",
    "collatz_wielandt_rho_Q", "cyclic_sccs", "states_on_cycles", "su_R", "su_R_per_state", "su_R_avg",
    "su_dominant_term", "su_upper_bound_cyclic", "su_upper_bound_n", "lower_bounds_K",
    "su_lower_bound_trace_cs", "su_lower_bound_diag_cs", "su_estimate_r2", "su_estimate_r3", "fu_arp",
    "fu_arp_corrected", "traces_k", "fu_bounds", "inflow_1", "outflow_1", "top_inflow_tokens", "greedy",
    "greedy_matrix", "p_eos", "p_nonterminate", "expected_steps_to_eos", "mc", "occupation",
}
NESTED = {
    "traces_k": {"k", "tr_B", "tr_Q", "tr_S", "sum_diag_Bk_sq"},
    "fu_bounds": {"zeta_n", "rho_B2", "condition_zeta_n_gt_rho_B2", "nuclear_norm_B2", "rank_B2", "sigma_min",
                  "outflow_2", "inflow_2", "cor12_D", "cor11_numerator", "thm1_bound", "cor11_bound", "cor12_bound"},
    "greedy": {"next", "cycles", "cycle_lengths", "basin_sizes", "fate", "steps_to_fate", "loop_fraction",
               "terminate_fraction", "indegree", "indegree_eos", "max_indegree_token"},
    "greedy_matrix": {"zeta_n", "su_R", "fu_arp"},
    "mc": {"K", "trajectories_per_state", "su_R_trunc_exact", "su_R_trunc_mc", "su_R_trunc_se",
           "fu_arp_trunc_exact", "fu_arp_trunc_mc", "fu_arp_trunc_se"},
    "occupation": {"pi0", "T", "nu", "lsr", "lsr_trunc_K", "lsr_trunc", "greedy_cycle_occupancy"},
}


@pytest.mark.parametrize("name", ["leaky2", "trap", "sparse_random"])
def test_layout_exact_keys_and_json(name):
    out = theory.compute_quantities(CASES[name], mc_trajectories=4)
    n = CASES[name].shape[0] - 1
    assert out["n"] == n and out["eos_index"] == n and out["route"] == "dense"
    q = out["quantities"]
    assert set(q) == SPEC_KEYS
    for k, keys in NESTED.items():
        assert set(q[k]) == keys, k
    for key in ("row_collision_B", "su_R_per_state", "inflow_1", "outflow_1", "p_eos", "p_nonterminate",
                "expected_steps_to_eos"):
        assert len(q[key]) == n
    for key in ("next", "fate", "steps_to_fate", "indegree"):
        assert len(q["greedy"][key]) == n
    assert q["lower_bounds_K"] == 60 and q["mc"]["K"] == 10 and q["occupation"]["T"] == 20
    assert q["occupation"]["lsr_trunc_K"] == 10
    text = dumps_json(out)
    assert "NaN" not in text and "Infinity" not in text
    back = json.loads(text)
    assert set(back["quantities"]) == SPEC_KEYS


def test_inf_is_string_in_json_and_never_nan():
    out = theory.compute_quantities(CASES["pure2"], mc_trajectories=4)
    q = out["quantities"]
    assert q["su_R"] == INF and q["fu_arp"] == INF and q["rho_Q"] == pytest.approx(1.0)
    back = json.loads(dumps_json(out))["quantities"]
    assert back["su_R"] == "inf" and back["fu_arp"] == "inf" and back["su_upper_bound_n"] == "inf"
    assert back["expected_steps_to_eos"] == ["inf", "inf"]
    assert back["fu_arp_corrected"] == "inf" and back["su_estimate_r2"] == "inf"

    def walk(x):
        if isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, float):
            assert not math.isnan(x)

    for name in CASES:
        walk(Q(name))


# ----------------------------------------------------------------------------- analytic answers (§12 table)


@pytest.mark.parametrize("p", [0.3, 0.7, 0.95])
def test_leaky_2_cycle_analytic(p):
    q = theory.compute_quantities(leaky_cycle(2, p), mc_trajectories=4)["quantities"]
    assert_close(q["su_R"], 2 * p**4 / (1 - p**4), what="R")
    for r in q["su_R_per_state"]:
        assert_close(r, p**4 / (1 - p**4))
    assert_close(q["fu_arp"], 2 * p**2 / (1 - p**2))
    assert q["zeta_n"] == 1.0
    for t in q["expected_steps_to_eos"]:
        assert_close(t, 1 / (1 - p))
    assert q["p_eos"] == pytest.approx([1.0, 1.0], abs=1e-12)
    assert q["cyclic_sccs"] == [[0, 1]] and q["states_on_cycles"] == 2


def test_pure_2_cycle_limit():
    q = Q("pure2")
    assert q["su_R"] == INF and q["fu_arp"] == INF and q["su_R_per_state"] == [INF, INF]
    assert q["rho_Q"] == pytest.approx(1.0) and q["zeta_n"] == 1.0
    assert q["greedy"]["cycles"] == [[0, 1]]
    assert q["p_eos"] == [0.0, 0.0] and q["expected_steps_to_eos"] == [INF, INF]
    # deterministic Monte Carlo: every trajectory repeats at every length k ≥ 1 with even... exactly
    mc = q["mc"]
    assert mc["su_R_trunc_se"] == 0.0 and mc["su_R_trunc_mc"] == mc["su_R_trunc_exact"]
    assert mc["su_R_trunc_exact"] == 10.0  # tr(Q^k) = 2 for even k, 0 for odd: 5 · 2
    assert mc["fu_arp_trunc_mc"] == mc["fu_arp_trunc_exact"] == 20.0


def test_self_loop_trap():
    q = Q("trap")
    assert q["su_R"] == INF
    assert q["p_eos"] == pytest.approx([0.2, 0.0, 0.0, 0.0], abs=1e-12)
    assert q["su_R_per_state"] == [0.0, 0.0, 0.0, INF]
    assert q["greedy"]["cycles"] == [[3]] and q["greedy"]["basin_sizes"] == [4]
    assert q["greedy"]["loop_fraction"] == 1.0
    assert q["expected_steps_to_eos"] == [INF] * 4
    assert q["cyclic_sccs"] == [[3]]


def test_chain_into_leaky_self_loop():
    s = 0.9
    q = Q("chain_loop")
    r_loop = s**2 / (1 - s**2)
    assert_close(q["su_R"], r_loop)
    assert q["su_R_per_state"][:3] == [0.0, 0.0, 0.0]
    assert_close(q["su_R_per_state"][3], r_loop)
    assert_close(q["fu_arp"], s**2 / (q["zeta_n"] - s**2))
    tau3 = 1 / (1 - s)
    for i, t in enumerate(q["expected_steps_to_eos"]):
        assert_close(t, tau3 + (3 - i))
    assert q["fu_bounds"]["cor12_D"] < 0 and q["fu_bounds"]["cor12_bound"] == INF


@pytest.mark.parametrize("p", [0.5, 0.8])
def test_leaky_3_cycle(p):
    q = theory.compute_quantities(leaky_cycle(3, p), mc_trajectories=4)["quantities"]
    lam = np.linalg.eigvals(leaky_cycle(3, p)[:3, :3])
    assert np.abs(lam.imag).max() > 0.1  # complex eigenvalues of B
    assert_close(q["su_R"], 3 * p**6 / (1 - p**6))
    assert_close(q["fu_arp"], 3 * p**6 / (1 - p**6))
    for t in q["expected_steps_to_eos"]:
        assert_close(t, 1 / (1 - p))


def test_near_uniform_all_finite_and_cor12_applicable():
    q = Q("near_uniform")
    A = CASES["near_uniform"]
    B, b, n = parts(A)
    for key in ("su_R", "fu_arp", "fu_arp_corrected", "su_estimate_r2"):
        assert math.isfinite(q[key])
    fb = q["fu_bounds"]
    assert fb["cor12_D"] > 0 and math.isfinite(fb["cor12_bound"])
    assert math.isfinite(fb["thm1_bound"]) and math.isfinite(fb["cor11_bound"])
    # SU21: s_i >= (1 - b_i)^2 / n, close to equality for near-uniform rows
    s = np.asarray(q["row_collision_B"])
    assert np.all(s >= (1 - b) ** 2 / n - 1e-15)
    assert np.all(s <= (1 - b) ** 2 / n * 1.001)


def test_high_inflow_hub_dense():
    q = Q("hub_dense")
    fb = q["fu_bounds"]
    assert_close(q["zeta_n"], 9.9)
    assert_close(q["inflow_1"][0], 5.4)
    assert q["top_inflow_tokens"][0] == 0
    assert fb["cor12_D"] > 0
    in2, out2 = np.asarray(fb["inflow_2"]), np.asarray(fb["outflow_2"])
    terms = 0.5 * (q["zeta_n"] - out2) + 0.5 * (q["zeta_n"] - in2)
    assert int(np.argmin(terms)) == int(np.argmax(in2))
    assert_close(fb["cor12_D"], terms.min())
    g = q["greedy"]
    assert g["cycles"] == [[0, 1]] and g["basin_sizes"] == [10] and g["max_indegree_token"] == 0


def test_high_inflow_hub_sparse():
    q = Q("hub_sparse")
    fb = q["fu_bounds"]
    assert_close(q["zeta_n"], 1.9)
    assert fb["cor12_D"] < 0 and fb["cor12_bound"] == INF
    in2, out2 = np.asarray(fb["inflow_2"]), np.asarray(fb["outflow_2"])
    terms = 0.5 * (q["zeta_n"] - out2) + 0.5 * (q["zeta_n"] - in2)
    assert int(np.argmin(terms)) == int(np.argmax(in2)) == 1  # the hub's successor, not the hub
    assert math.isfinite(fb["thm1_bound"]) and q["fu_arp"] <= fb["thm1_bound"]
    assert q["greedy"]["cycles"] == [[0, 1]] and q["greedy"]["loop_fraction"] == 1.0


def test_greedy_functional_graph_several_cycles():
    A, f = greedy_several_cycles()
    q = Q("greedy_graph")
    g = q["greedy"]
    n = 16
    assert g["next"] == [f[i] for i in range(n)]
    assert g["cycles"] == [[0], [1, 2], [3, 4, 5], [6, 7, 8, 9]]
    assert g["cycle_lengths"] == [1, 2, 3, 4]
    assert g["fate"] == [0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 0, 0, 2, -1, -1, 3]
    assert g["steps_to_fate"] == [0] * 10 + [1, 2, 1, 1, 2, 1]
    assert g["basin_sizes"] == [3, 2, 4, 5]
    assert_close(g["loop_fraction"], 14 / 16)
    assert_close(g["terminate_fraction"], 2 / 16)
    assert g["indegree_eos"] == 1
    assert g["indegree"][0] == 2 and g["indegree"][9] == 2 and g["indegree"][3] == 2
    assert g["max_indegree_token"] == 0
    # the sampling matrix is dense and mixing: all finite; the greedy matrix diverges
    assert math.isfinite(q["su_R"]) and math.isfinite(q["fu_arp"])
    assert q["greedy_matrix"]["su_R"] == INF and q["greedy_matrix"]["fu_arp"] == INF
    # second route: iterate f from every start
    for s in range(n):
        x, steps = s, 0
        seen = []
        while x != n and x not in seen:
            seen.append(x)
            x = f[x]
        if x == n:
            assert g["fate"][s] == -1 and g["steps_to_fate"][s] == len(seen)
        else:
            # cycle membership: f^L(x) = x
            cyc = seen[seen.index(x):]
            assert sorted(cyc) == sorted(g["cycles"][g["fate"][s]])
            assert g["steps_to_fate"][s] == seen.index(x)


def test_greedy_matrix_by_second_route():
    """`greedy_matrix` equals the full computation on the explicit one-hot greedy matrix."""
    for name in ("greedy_graph", "leaky2", "sparse_random"):
        A = CASES[name]
        n = A.shape[0] - 1
        f = np.argmax(A[:n], axis=1)
        G = np.zeros_like(A)
        G[np.arange(n), f] = 1
        G[n, n] = 1
        qg = theory.compute_quantities(G, mc_trajectories=2)["quantities"]
        gm = Q(name)["greedy_matrix"]
        assert_close(gm["zeta_n"], qg["zeta_n"])
        assert gm["su_R"] == qg["su_R"] and gm["fu_arp"] == qg["fu_arp"]
        # greedy cycle occupancy: matrix nu^G against following each trajectory
        occ = Q(name)["occupation"]
        T = occ["T"]
        tot = 0.0
        oncyc = {x for c in Q(name)["greedy"]["cycles"] for x in c}
        for s in range(n):
            x = s
            for _ in range(T):
                if x == n:
                    break
                tot += (x in oncyc) / n / T
                x = f[x]
        assert_close(occ["greedy_cycle_occupancy"], tot)


# ----------------------------------------------------------------------------- two routes on every case


@pytest.mark.parametrize("name", list(CASES))
def test_two_routes_every_quantity(name):
    A = CASES[name]
    B, b, n = parts(A)
    q = Q(name)
    Qm = B * B
    # ζ
    nnz = int((B > 0).sum())
    assert_close(q["zeta"], nnz / n**2); assert_close(q["zeta_n"], nnz / n)
    # ρ by whole-matrix eigvals
    rhoB = max(abs(np.linalg.eigvals(B)))
    rhoQ = max(abs(np.linalg.eigvals(Qm)))
    assert_close(q["rho_B"], rhoB, 1e-7); assert_close(q["rho_Q"], rhoQ, 1e-7)
    # R: whole solve, eigen form, series
    Rw, Re = R_whole(B)
    if Rw == INF:
        assert q["su_R"] == INF
    else:
        assert_close(q["su_R"], Rw); assert_close(q["su_R"], Re)
        r = R_series(B)
        np.testing.assert_allclose(q["su_R_per_state"], r, rtol=1e-9, atol=1e-12)
        assert_close(q["su_R_avg"], Rw / n)
    # Fu
    zn = nnz / n
    if zn > rhoB**2 + 1e-12:
        eig, ser = fu_routes(B)
        assert_close(q["fu_arp"], eig, 1e-8); assert_close(q["fu_arp"], ser, 1e-8)
        e2, s2 = fu_corr_routes(B)
        assert_close(q["fu_arp_corrected"], s2)
        if e2 is not None:
            assert_close(q["fu_arp_corrected"], e2, 1e-7)
        assert_close(q["su_estimate_r2"], r2_series(B), 1e-8)
        assert_close(q["su_estimate_r3"], n * q["fu_arp_corrected"])
    else:
        assert q["fu_arp"] == q["fu_arp_corrected"] == q["su_estimate_r2"] == INF
    # traces by closed-walk enumeration
    tk = q["traces_k"]
    for i, k in enumerate(tk["k"]):
        if k > 4 and n > 10:
            break
        trB, trQ, trS, sq = enum_closed_walks(B, k)
        assert_close(tk["tr_B"][i], trB); assert_close(tk["tr_Q"][i], trQ)
        assert tk["tr_S"][i] == trS; assert_close(tk["sum_diag_Bk_sq"][i], sq)
    # matrix powers for the traces and the lower bounds
    K = q["lower_bounds_K"]
    S = (B > 0).astype(float)
    PB, PS, PQ = np.eye(n), np.eye(n), np.eye(n)
    lbt = lbd = 0.0
    for k in range(1, K + 1):
        PB, PS, PQ = B @ PB, S @ PS, Qm @ PQ
        if k <= len(tk["k"]):
            assert_close(tk["tr_B"][k - 1], np.trace(PB)); assert_close(tk["tr_Q"][k - 1], np.trace(PQ))
        if np.trace(PS) > 0:
            lbt += np.trace(PB) ** 2 / np.trace(PS)
        d, ds = np.diag(PB), np.diag(PS)
        lbd += float(np.sum(d[ds > 0] ** 2 / ds[ds > 0]))
    assert_close(q["su_lower_bound_trace_cs"], lbt); assert_close(q["su_lower_bound_diag_cs"], lbd)
    # SCCs: Tarjan (theory) vs boolean transitive closure
    assert q["cyclic_sccs"] == transitive_closure_sccs(B)
    assert q["states_on_cycles"] == sum(len(c) for c in q["cyclic_sccs"])
    # flows
    np.testing.assert_allclose(q["inflow_1"], B.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(q["outflow_1"], 1 - b, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(q["fu_bounds"]["outflow_2"], (B @ B).sum(axis=1), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(q["fu_bounds"]["inflow_2"], (B @ B).sum(axis=0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(q["row_collision_B"], Qm.sum(axis=1), rtol=1e-12)
    # termination: linear solve vs monotone value iteration
    a_it = termination_iter(A)
    np.testing.assert_allclose(q["p_eos"], a_it, atol=1e-9)
    np.testing.assert_allclose(np.asarray(q["p_eos"]) + np.asarray(q["p_nonterminate"]), 1.0, atol=1e-15)
    tau = np.asarray(q["expected_steps_to_eos"])
    fin = np.isfinite(tau)
    assert np.all(np.isclose(np.asarray(q["p_eos"])[fin], 1.0))
    if fin.any():
        t_it = np.zeros(n)
        for _ in range(20000):
            t_it = 1 + B @ t_it
        np.testing.assert_allclose(tau[fin], t_it[fin], rtol=1e-9)
    # finite-horizon absorption from A^H versus p_eos (monotone limit)
    AH = np.linalg.matrix_power(A, 4000)
    np.testing.assert_allclose(AH[:n, n], q["p_eos"], atol=1e-9)
    # occupation
    occ = q["occupation"]
    nu = np.zeros(n)
    v = np.full(n, 1 / n)
    for _ in range(occ["T"]):
        nu += v
        v = v @ B
    np.testing.assert_allclose(occ["nu"], nu / occ["T"], rtol=1e-12, atol=1e-15)
    r = np.asarray(q["su_R_per_state"])
    if np.all(np.isfinite(r)):
        assert_close(occ["lsr"], float(np.dot(nu / occ["T"], r)))
    rt = np.zeros(n)
    P = np.eye(n)
    for _ in range(occ["lsr_trunc_K"]):
        P = Qm @ P
        rt += np.diag(P)
    assert_close(occ["lsr_trunc"], float(np.dot(nu / occ["T"], rt)))
    # mc exact references by powers
    mc = q["mc"]
    su = sum(np.trace(np.linalg.matrix_power(Qm, k)) for k in range(1, mc["K"] + 1))
    assert_close(mc["su_R_trunc_exact"], su)
    if zn > 0:
        fu = sum(np.trace(np.linalg.matrix_power(B, 2 * k)) / zn**k for k in range(1, mc["K"] + 1))
        assert_close(mc["fu_arp_trunc_exact"], fu)
    # top inflow tokens
    assert q["top_inflow_tokens"] == sorted(range(n), key=lambda j: (-B[:, j].sum(), j))[:5]


# ----------------------------------------------------------------------------- proven inequalities


@pytest.mark.parametrize("name", list(CASES))
def test_proven_inequalities(name):
    q = Q(name)
    A = CASES[name]
    B, b, n = parts(A)
    eps = 1e-12
    lo, hi = q["frobenius_interval_rho_Q"]
    assert lo - eps <= q["rho_Q"] <= hi + eps
    cl, ch = q["collatz_wielandt_rho_Q"]
    assert cl - 1e-9 <= q["rho_Q"] <= ch + 1e-9
    assert q["su_lower_bound_trace_cs"] <= q["su_R"] * (1 + 1e-12) + eps
    assert q["su_lower_bound_diag_cs"] <= q["su_R"] * (1 + 1e-12) + eps
    assert q["su_R"] <= q["su_upper_bound_cyclic"] * (1 + 1e-12) + eps
    assert q["su_upper_bound_cyclic"] <= q["su_upper_bound_n"] * (1 + 1e-12) + eps
    tk = q["traces_k"]
    for trB, trQ, trS in zip(tk["tr_B"], tk["tr_Q"], tk["tr_S"]):
        assert trB**2 <= trS * trQ * (1 + 1e-12) + eps
    fb = q["fu_bounds"]
    if fb["condition_zeta_n_gt_rho_B2"] and fb["sigma_min"] > 0:
        assert q["fu_arp"] <= fb["thm1_bound"] * (1 + 1e-9) + eps
        assert fb["thm1_bound"] <= fb["cor11_bound"] * (1 + 1e-9) + eps
    if fb["cor12_D"] > 0:
        assert fb["cor12_D"] <= fb["sigma_min"] + 1e-9
        assert q["fu_arp"] <= fb["cor12_bound"] * (1 + 1e-9) + eps
        assert q["rho_B2"] <= max(0.5 * (np.asarray(fb["outflow_2"]) + np.asarray(fb["inflow_2"]))) + 1e-9
    # exact SVD quantities by numpy
    B2 = B @ B
    sv = np.linalg.svd(B2, compute_uv=False)
    assert_close(fb["nuclear_norm_B2"], sv.sum(), 1e-9)
    assert fb["rank_B2"] == np.linalg.matrix_rank(B2)
    assert_close(fb["sigma_min"], np.linalg.svd(q["zeta_n"] * np.eye(n) - B2, compute_uv=False).min(), 1e-9)


# ----------------------------------------------------------------------------- Monte Carlo


@pytest.mark.parametrize("name", ["leaky2", "leaky3", "chain_loop", "near_uniform", "hub_sparse", "sparse_random"])
def test_monte_carlo_within_4_se(name):
    mc = Q(name)["mc"]
    assert mc["trajectories_per_state"] >= 2
    assert abs(mc["su_R_trunc_mc"] - mc["su_R_trunc_exact"]) <= 4 * mc["su_R_trunc_se"] + 1e-12
    assert abs(mc["fu_arp_trunc_mc"] - mc["fu_arp_trunc_exact"]) <= 4 * mc["fu_arp_trunc_se"] + 1e-12


def test_monte_carlo_lsr_trunc_and_absorption():
    """LSR_T truncated at K and the finite-horizon absorption, simulated from π0 (§7, §12)."""
    A = CASES["leaky2"]
    B, b, n = parts(A)
    q = Q("leaky2")
    T, K = q["occupation"]["T"], q["occupation"]["lsr_trunc_K"]
    rng = np.random.default_rng(20210126)
    M = 20000
    x = np.zeros((M, T + 2 * K + 1), dtype=int)
    x[:, 0] = rng.integers(0, n, M)
    cum = np.cumsum(A, axis=1)
    for t in range(1, x.shape[1]):
        u = rng.random(M)
        x[:, t] = (u[:, None] > cum[x[:, t - 1]]).sum(axis=1)
    counts = np.zeros(M)
    for t in range(T):
        for k in range(1, K + 1):
            ev = x[:, t] != n
            for j in range(k + 1):
                ev &= x[:, t + k + j] == x[:, t + j]
            counts += ev
    est = counts.mean() / T
    se = counts.std(ddof=1) / math.sqrt(M) / T
    assert abs(est - q["occupation"]["lsr_trunc"]) <= 4 * se
    H = 5
    absorbed = (x[:, H] == n).mean()
    exact = np.linalg.matrix_power(A, H)[:n, n].mean()
    assert abs(absorbed - exact) <= 4 * math.sqrt(exact * (1 - exact) / M)


def test_seeded_determinism():
    a = theory.compute_quantities(CASES["sparse_random"], mc_trajectories=10)
    b = theory.compute_quantities(CASES["sparse_random"], mc_trajectories=10)
    assert dumps_json(a) == dumps_json(b)


# ----------------------------------------------------------------------------- routes, layout, residual


def _cmp(a, b, skip, path=""):
    if path.lstrip(".") in skip:
        return
    if isinstance(a, dict):
        for k in a:
            _cmp(a[k], b[k], skip, f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _cmp(x, y, skip, f"{path}[{i}]" if not isinstance(x, (int, float)) else path)
    elif isinstance(a, bool) or isinstance(a, int) and not isinstance(a, float):
        assert a == b, path
    else:
        assert close(a, b, 1e-6), f"{path}: {a} vs {b}"


def test_sparse_route_agrees_with_dense_n300():
    rng = np.random.default_rng(7)
    n = 300
    A = np.zeros((n + 1, n + 1))
    for i in range(n):
        d = rng.integers(1, 5)
        cols = rng.choice(n, d, replace=False)
        w = rng.random(d + 1)
        w /= w.sum()
        A[i, cols] = w[:d]
        A[i, n] = w[d]
    A[5] = 0
    A[5, 5] = 1.0  # a self-loop trap
    A[n, n] = 1
    d = theory.compute_quantities(A, route="dense", mc_trajectories=8)
    s = theory.compute_quantities(sp.csr_matrix(A), route="sparse", mc_trajectories=8)
    assert s["route"] == "sparse" and d["route"] == "dense"
    skip = set(s["partial"]) | {"mc.su_R_trunc_mc", "mc.su_R_trunc_se", "mc.fu_arp_trunc_mc", "mc.fu_arp_trunc_se"}
    assert set(s["partial"]) <= {"collatz_wielandt_rho_Q"} | {f"fu_bounds.{k}" for k in NESTED["fu_bounds"]}
    _cmp(d["quantities"], s["quantities"], skip)
    # the sparse relaxations are still valid bounds
    fd, fs = d["quantities"]["fu_bounds"], s["quantities"]["fu_bounds"]
    assert fs["nuclear_norm_B2"] >= fd["nuclear_norm_B2"] * (1 - 1e-12)
    assert fs["sigma_min"] <= fd["sigma_min"] + 1e-12
    assert fs["rank_B2"] >= fd["rank_B2"]
    lo, hi = s["quantities"]["collatz_wielandt_rho_Q"]
    assert lo - 1e-12 <= d["quantities"]["rho_Q"] <= hi + 1e-12


def test_residual_uniform_model_dense_equals_sparse_and_explicit():
    A = sparse_random(30, 3, seed=5)
    n = 30
    res = np.zeros(n + 1)
    res[:4] = 0.1
    A2 = A.copy()
    A2[:4] *= 0.9  # keep stored mass, move 10 % to the residual
    explicit = A2.copy()
    for i in range(4):
        zero = np.flatnonzero(explicit[i, :n] == 0)
        explicit[i, zero] = 0.1 / zero.size
    e = theory.compute_quantities(explicit, mc_trajectories=4)
    d = theory.compute_quantities(A2, residual=res, mc_trajectories=4)
    s = theory.compute_quantities(sp.csr_matrix(A2), residual=res, route="sparse", mc_trajectories=4)
    mcskip = {"mc.su_R_trunc_mc", "mc.su_R_trunc_se", "mc.fu_arp_trunc_mc", "mc.fu_arp_trunc_se"}
    _cmp(e["quantities"], d["quantities"], set())
    _cmp(d["quantities"], s["quantities"], set(s["partial"]) | mcskip)
    assert d["quantities"]["zeta_n"] > 6  # residual rows now reach every state
    # the sampler's residual pseudo-entry (uniform over unstored columns) against the exact values
    s2 = theory.compute_quantities(sp.csr_matrix(A2), residual=res, route="sparse", mc_trajectories=400)
    mc = s2["quantities"]["mc"]
    assert abs(mc["su_R_trunc_mc"] - mc["su_R_trunc_exact"]) <= 4 * mc["su_R_trunc_se"]
    assert abs(mc["fu_arp_trunc_mc"] - mc["fu_arp_trunc_exact"]) <= 4 * mc["fu_arp_trunc_se"]


def test_eos_not_last_is_permuted():
    A = CASES["chain_loop"]
    n = A.shape[0] - 1
    # put <eos> first
    order = [n] + list(range(n))
    Ap = A[np.ix_(order, order)]
    out = theory.compute_quantities(Ap, eos_index=0, mc_trajectories=4)
    ref = theory.compute_quantities(A, mc_trajectories=4)
    assert out["eos_index"] == n and out["state_order"] == list(range(1, n + 1))
    _cmp(ref["quantities"], out["quantities"], set())


def test_pi0_and_horizon_are_written():
    A = CASES["leaky2"]
    out = theory.compute_quantities(A, pi0=[1.0, 0.0], T=5, lower_bounds_K=7, mc_K=3, mc_trajectories=4)
    q = out["quantities"]
    assert q["occupation"]["pi0"] == [1.0, 0.0] and q["occupation"]["T"] == 5
    assert q["lower_bounds_K"] == 7 and q["mc"]["K"] == 3 and q["occupation"]["lsr_trunc_K"] == 3
    p = 0.7
    assert_close(q["occupation"]["nu"][0], (1 + p**2 + p**4) / 5)


# ----------------------------------------------------------------------------- policy case, Theorem 2


def test_policy_case_quantities():
    A = CASES["hub_dense"]
    pc = theory.policy_case_quantities(A)
    q = Q("hub_dense")
    assert set(pc) == {"mean_p_eos", "greedy_loop_fraction", "row_collision_full"}
    assert_close(pc["mean_p_eos"], np.mean(q["p_eos"]))
    assert pc["greedy_loop_fraction"] == q["greedy"]["loop_fraction"]
    np.testing.assert_allclose(pc["row_collision_full"], (A[:-1] ** 2).sum(axis=1), rtol=1e-12)


def test_theorem2_rhs():
    out = theory.theorem2_rhs(10.0, 0.001, n=100, column_collision_max=0.5)
    assert_close(out["rhs"]["0.1"], 3 * 10 * 0.001 / (0.01 * 6 * 9))
    assert_close(out["rhs"]["1"], 3 * 10 * 0.001 / (6 * 9))
    assert out["applicable"] and out["informational"]
    na = theory.theorem2_rhs(3.0, 0.001)
    assert na["rhs"]["0.5"] == INF and not na["applicable"]


def test_public_helpers_match_entry():
    A = CASES["near_uniform"]
    q = Q("near_uniform")
    R, r = theory.su_repetition_sum(A)
    assert_close(R, q["su_R"])
    assert_close(theory.fu_arp(A), q["fu_arp"])
    zeta, zn = theory.sparsity(A)
    assert_close(zn, q["zeta_n"])
    assert theory.cyclic_sccs(A) == q["cyclic_sccs"]
    a, tau = theory.termination(A)
    np.testing.assert_allclose(a, q["p_eos"])
    assert theory.collatz_wielandt_bracket(A[:-1, :-1] ** 2) == pytest.approx(q["collatz_wielandt_rho_Q"])
    assert theory.frobenius_interval(A) == q["frobenius_interval_rho_Q"]
    np.testing.assert_allclose(theory.occupation(A), q["occupation"]["nu"])


# ----------------------------------------------------------------------------- bad input


GOOD = leaky_cycle(2, 0.5)


def _bad(mut):
    A = GOOD.copy()
    mut(A)
    return A


@pytest.mark.parametrize(
    "A, eos, needle",
    [
        (_bad(lambda A: A.__setitem__((1, 0), np.nan)), None, "row 1"),
        (_bad(lambda A: A.__setitem__((0, 1), -0.5)), None, "row 0"),
        (np.ones((3, 4)) / 4, None, "square"),
        (_bad(lambda A: A.__setitem__((1, 2), 0.7)), None, "row 1"),
        (_bad(lambda A: (A.__setitem__((2, 2), 0.5), A.__setitem__((2, 0), 0.5))), None, "<eos> row 2"),
        (GOOD, 5, "out of range"),
        (GOOD, -1, "out of range"),
    ],
)
def test_bad_input_one_line(A, eos, needle):
    with pytest.raises(MatrixFormatError) as ei:
        theory.compute_quantities(A, eos_index=eos)
    msg = str(ei.value)
    assert "\n" not in msg and needle in msg


def test_bad_input_sparse_and_residual():
    S = sp.csr_matrix(GOOD)
    S.data[0] = -0.1
    with pytest.raises(MatrixFormatError, match="row 0"):
        theory.validate_transition_matrix(S)
    with pytest.raises(MatrixFormatError, match="residual"):
        theory.validate_transition_matrix(GOOD, residual=np.ones(2))
    A = GOOD.copy()
    A[0, 1] = 0.4  # row 0 sums to 0.9 ...
    theory.validate_transition_matrix(A, residual=np.array([0.1, 0, 0]))  # ... plus 0.1 residual: fine
    with pytest.raises(MatrixFormatError, match="row 0"):
        theory.validate_transition_matrix(A)


# ----------------------------------------------------------------------------- large-SCC sparse path


@pytest.mark.parametrize("with_residual, degree", [(False, 4), (True, 4), (False, 40)])
def test_large_scc_path_against_dense(monkeypatch, with_residual, degree):
    """SCCs above the exact block size use power iteration, exact k<=2 traces, Hutchinson and
    certified tails: exact keys agree with the dense route, estimates within their error bars."""
    A = sparse_random(150, degree, seed=11, eos_max=0.2)
    n = 150
    res = None
    if with_residual:
        res = np.zeros(n + 1)
        res[:3] = 0.05
        A = A.copy()
        A[:3] *= 0.95
    d = theory.compute_quantities(A, residual=res, mc_trajectories=4)
    monkeypatch.setattr(theory, "DENSE_MAX_STATES", 20)
    s_out = theory.compute_quantities(sp.csr_matrix(A), residual=res, route="sparse", mc_trajectories=4,
                                      hutchinson_probes=16)
    dq, sq = d["quantities"], s_out["quantities"]
    assert max(len(c) for c in sq["cyclic_sccs"]) > 20
    assert "su_R" in s_out["partial"] and "su_R" in s_out["notes"]
    for key in ("zeta", "zeta_n", "states_on_cycles", "cyclic_sccs", "greedy", "traces_k", "top_inflow_tokens"):
        assert sq[key] == dq[key] or key == "traces_k", key
    for key in ("tr_B", "tr_Q", "sum_diag_Bk_sq"):
        np.testing.assert_allclose(sq["traces_k"][key], dq["traces_k"][key], rtol=1e-9, atol=1e-12)
    for key in ("rho_Q", "rho_B"):
        assert_close(sq[key], dq[key], 1e-9)
    lo, hi = sq["collatz_wielandt_rho_Q"]
    assert lo - 1e-12 <= dq["rho_Q"] <= hi + 1e-12
    np.testing.assert_allclose(sq["p_eos"], dq["p_eos"], atol=1e-9)
    np.testing.assert_allclose(sq["occupation"]["nu"], dq["occupation"]["nu"], rtol=1e-9)
    # the k <= 2 lower bounds are still lower bounds
    assert sq["su_lower_bound_trace_cs"] <= dq["su_R"] + 1e-12
    assert sq["su_lower_bound_diag_cs"] <= dq["su_R"] + 1e-12
    # Hutchinson estimates: close to the exact values (terms k >= 3 are small here)
    est = s_out["estimates"]
    for key in ("su_R", "fu_arp"):
        e = est[key]
        assert abs(sq[key] - dq[key]) <= 4 * e["se"] + e["tail_bound"] + 1e-12, (key, sq[key], dq[key], e)
    assert sq["fu_arp_corrected"] <= dq["fu_arp_corrected"] * (1 + 1e-9)  # k <= 2 terms only
    # certified relaxations stay on the right side
    fs, fd = sq["fu_bounds"], dq["fu_bounds"]
    assert fs["nuclear_norm_B2"] >= fd["nuclear_norm_B2"] * (1 - 1e-12)
    assert fs["sigma_min"] <= fd["sigma_min"] + 1e-12


def test_sampler_residual_row_frequencies():
    """One simulated step from a truncated row: stored entries, <eos> and the residual spread
    uniformly over the unstored non-eos columns (spec §2.3), each within 4 standard errors."""
    n = 6
    A = np.zeros((n + 1, n + 1))
    A[:, n] = 0.1
    A[:n, 0] = 0.5
    A[:n, 2] = 0.2  # 0.2 left as residual, spread over columns 1, 3, 4, 5
    A[n] = 0
    A[n, n] = 1
    res = np.full(n + 1, 0.2)
    res[n] = 0
    ch = theory._Chain.build(sp.csr_matrix(A), res, dense=False)
    smp = theory._Sampler(ch)
    M = 200_000
    x = smp.step(np.zeros(M, dtype=np.int32), np.random.default_rng(1))
    freq = np.bincount(x, minlength=n + 1) / M
    expect = np.array([0.5, 0.05, 0.2, 0.05, 0.05, 0.05, 0.1])
    se = np.sqrt(expect * (1 - expect) / M)
    assert np.all(np.abs(freq - expect) <= 4 * se), (freq, expect)


def test_corrected_arp_when_zeta_n_below_rho():
    """ρ(B)² < ζn ≤ ρ(B) (many rows go straight to <eos>): the corrected ARP and (r-2) still converge
    and match their series; Fu's closed form matches the eigenvalue route."""
    B = np.zeros((13, 13))
    B[0, 1] = B[1, 2] = B[2, 0] = 0.45
    A = absorbing(B)
    q = theory.compute_quantities(A, mc_trajectories=2)["quantities"]
    zn = 3 / 13
    assert_close(q["zeta_n"], zn)
    assert q["rho_B"] > zn and q["rho_B2"] < zn
    e2, s2 = fu_corr_routes(B)
    assert_close(q["fu_arp_corrected"], s2)
    assert_close(q["su_estimate_r2"], r2_series(B), 1e-8)
    eig, ser = fu_routes(B)
    assert_close(q["fu_arp"], eig, 1e-8)
    p6 = 0.45**6 / zn**3
    assert_close(q["fu_arp_corrected"], 3 * p6 / (1 - p6))
    s = theory.compute_quantities(sp.csr_matrix(A), route="sparse", mc_trajectories=2)["quantities"]
    assert_close(s["fu_arp_corrected"], q["fu_arp_corrected"]) ; assert_close(s["su_estimate_r2"], q["su_estimate_r2"])


def test_ill_conditioned_termination_is_noted_not_warned():
    """A loop left with probability 1e-20 per turn: I − B is singular to float64; say so in the output."""
    import warnings

    e = 1e-10
    A = np.array([[1 - e, e, 0.0], [1 - e, 0.0, e], [0.0, 0.0, 1.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no LinAlgWarning reaches the user
        out = theory.compute_quantities(A, eos_index=2, mc_trajectories=2, lower_bounds_K=1, route="dense")
    assert "nearly singular" in out["notes"]["expected_steps_to_eos"]
    assert min(out["quantities"]["expected_steps_to_eos"]) > 1e15
    well = theory.compute_quantities(np.array([[0.5, 0.5], [0.0, 1.0]]), eos_index=1, mc_trajectories=2, lower_bounds_K=1,
                              route="dense")
    assert "notes" not in well
