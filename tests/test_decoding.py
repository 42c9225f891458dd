"""Decoding policies as matrix transforms (spec §8, §12 policy list) against Hugging Face's own processors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from repdiag.decoding import HF_DEFAULTS, PARAMS, Policy, parse_policy, rebalance_matrix, row_collision_full
from repdiag.errors import PolicyError

N_TOK = 6  # tokens 0..5, <eos> = 6 (last)
EOS = N_TOK

# the spec §12 policy list (+ the other truncations); top_k=0 switches off HF's default top-k 50
SPEC_POLICIES = {
    "sampling": "do_sample=true,top_k=0",
    "temperature_0.5": "do_sample=true,top_k=0,temperature=0.5",
    "temperature_2": "do_sample=true,top_k=0,temperature=2.0",
    "top_k_2": "do_sample=true,top_k=2",
    "top_p_0.8": "do_sample=true,top_k=0,top_p=0.8",
    "typical_0.5": "do_sample=true,top_k=0,typical_p=0.5",
    "greedy": "do_sample=false",
    "consistent_top_k_2": "do_sample=true,top_k=2,consistent=true",
    "eos_boost_1": "do_sample=true,top_k=0,eos_boost=1.0",
    "repetition_penalty_1.3": "do_sample=true,top_k=0,repetition_penalty=1.3",
    "composite": "repetition_penalty=1.3,temperature=0.7,top_k=3,top_p=0.9,do_sample=true",
    "min_p_0.2": "do_sample=true,top_k=0,min_p=0.2",
    "epsilon_0.05": "do_sample=true,top_k=0,epsilon_cutoff=0.05",
    "eta_0.05": "do_sample=true,top_k=0,eta_cutoff=0.05",
    "default_sampling_top_k_50": "do_sample=true,temperature=0.9",
    "greedy_penalty": "do_sample=false,repetition_penalty=1.3",
    "beam_sample_mtk2": "num_beams=2,do_sample=true,top_k=1,top_p=0.05",
}


def _logit_matrix(seed: int = 0, n_tok: int = N_TOK, spread: float = 1.5, offset: float = 0.3):
    """Logits Z (rows 0..n_tok-1) with mixed signs, their matrix A = softmax(Z) and the row shifts."""
    rng = np.random.default_rng(seed)
    n = n_tok + 1
    Z = rng.normal(size=(n, n)) * spread + offset
    lse = np.log(np.exp(Z).sum(axis=1))
    A = np.exp(Z - lse[:, None])
    A[n - 1] = 0.0
    A[n - 1, n - 1] = 1.0
    with np.errstate(divide="ignore"):
        Z[n - 1] = np.log(A[n - 1])
    lse[n - 1] = 0.0
    return Z, A, lse


def _hf_row(policy: Policy, z: np.ndarray, state: int, eos: int) -> np.ndarray:
    """HF's processor chain on one row of logits, as probabilities (one-hot argmax without sampling)."""
    procs = policy.logits_processors(eos_token_id=eos)
    scores = procs(torch.tensor([[state]]), torch.tensor(z, dtype=torch.float64)[None].clone())
    if not policy.do_sample:
        out = np.zeros(z.size)
        out[int(torch.argmax(scores[0]))] = 1.0
        return out
    return torch.softmax(scores[0], dim=-1).numpy()


# ------------------------------------------------------------------ an independent per-row reference
def _ref_row(policy: Policy, z: list[float], state: int, eos: int) -> list[float]:
    """Spec §8 written out per row with Python lists (sorted order, explicit loops)."""
    e = policy.effective()
    z = list(z)
    n = len(z)
    if e["eos_boost"] and math.isfinite(z[eos]):
        z[eos] += e["eos_boost"]
    th = e["repetition_penalty"]
    if th != 1.0 and math.isfinite(z[state]):
        z[state] = z[state] * th if z[state] < 0 else z[state] / th
    if not e["do_sample"]:
        best = max(range(n), key=lambda j: (z[j], -j))
        return [1.0 if j == best else 0.0 for j in range(n)]

    def probs(v):
        m = max(x for x in v if x > -math.inf)
        ex = [math.exp(x - m) if x > -math.inf else 0.0 for x in v]
        s = sum(ex)
        return [x / s for x in ex]

    mtk = 2 if e["num_beams"] > 1 else 1
    keep_eos = e["consistent"]

    def cut(v, removed):
        return [-math.inf if (r and not (keep_eos and j == eos)) else x for j, (x, r) in enumerate(zip(v, removed))]

    if e["temperature"] != 1.0:
        z = [x / e["temperature"] for x in z]
    if e["top_k"]:
        k = min(max(e["top_k"], mtk), n)
        kth = sorted(z, reverse=True)[k - 1]
        z = cut(z, [x < kth for x in z])
    if e["top_p"] < 1.0:
        p = probs(z)
        order = sorted(range(n), key=lambda j: (-p[j], j))
        before, rem = 0.0, [False] * n
        for rank, j in enumerate(order):
            rem[j] = before >= e["top_p"] and rank >= mtk
            before += p[j]
        z = cut(z, rem)
    if e["min_p"] is not None:
        p = probs(z)
        top = sorted(range(n), key=lambda j: (-p[j], j))[:mtk]
        z = cut(z, [p[j] < e["min_p"] * max(p) and j not in top for j in range(n)])
    if e["typical_p"] < 1.0:
        p = probs(z)
        H = -sum(q * math.log(q) for q in p if q > 0)
        sc = [abs(-math.log(q) - H) if q > 0 else math.inf for q in p]
        order = sorted(range(n), key=lambda j: (sc[j], j))
        before, kept_scores = 0.0, []
        for j in order:
            if before < e["typical_p"]:
                kept_scores.append(sc[j])
            before += p[j]
        thr = max(kept_scores)
        rem = [sc[j] > thr and order.index(j) >= mtk for j in range(n)]
        z = cut(z, rem)
    for key in ("epsilon_cutoff", "eta_cutoff"):
        if e[key]:
            p = probs(z)
            eps = e[key]
            if key == "eta_cutoff":
                eps = float(np.float32(eps))
                H = -sum(q * math.log(q) for q in p if q > 0)
                eps = min(eps, math.sqrt(eps) * math.exp(-H))
            kth = sorted(z, reverse=True)[min(mtk, n) - 1]
            z = cut(z, [p[j] < eps and z[j] < kth for j in range(n)])
    return probs(z)


@pytest.fixture(scope="module")
def logit_case():
    return _logit_matrix(0)


@pytest.mark.parametrize("name", list(SPEC_POLICIES))
def test_policy_equals_hf_chain_and_row_loop(name, logit_case):
    Z, A, shift = logit_case
    pol = parse_policy(SPEC_POLICIES[name])
    out = pol.apply(A, EOS, row_logit_shift=shift)
    assert np.allclose(out.sum(axis=1), 1.0, atol=1e-12)
    assert np.array_equal(out[EOS], A[EOS])  # <eos> row untouched
    for i in range(N_TOK):
        hf = _hf_row(pol, Z[i], i, EOS)
        assert np.max(np.abs(out[i] - hf)) <= 1e-9, (name, i, out[i], hf)
        ref = np.array(_ref_row(pol, list(Z[i]), i, EOS))
        assert np.max(np.abs(out[i] - ref)) <= 1e-12, (name, i)
    # sparse route: same numbers
    out_sp = pol.apply(sp.csr_matrix(A), EOS, row_logit_shift=shift)
    assert sp.issparse(out_sp)
    assert np.max(np.abs(out_sp.toarray() - out)) <= 1e-12


def test_repetition_penalty_needs_logits_sign(logit_case):
    Z, A, shift = logit_case
    pol = parse_policy("do_sample=true,top_k=0,repetition_penalty=1.3")
    with_shift = pol.apply(A, EOS, row_logit_shift=shift)
    with_logits = pol.apply(A, EOS, logits=Z)
    assert np.max(np.abs(with_shift - with_logits)) <= 1e-12
    for kw in ({"logits": Z}, {"logits": sp.csr_matrix(Z)}, {"row_logit_shift": shift}):
        sparse = pol.apply(sp.csr_matrix(A), EOS, **kw)
        assert np.max(np.abs(sparse.toarray() - with_shift)) <= 1e-12
    no_shift = pol.apply(A, EOS)  # logits = log-probabilities: all negative, multiplied
    for i in range(N_TOK):
        z = np.log(A[i]).copy()
        z[i] *= 1.3
        p = np.exp(z - z.max())
        assert np.allclose(no_shift[i], p / p.sum(), atol=1e-12)
        assert no_shift[i, i] < A[i, i]  # the self-loop shrinks


def test_kgram_state_penalises_every_token_of_the_state():
    # states: (0,), (1,), (0,1), (1,0), eos ; columns stand for their last token
    st_tokens = np.array([[-1, 0], [-1, 1], [0, 1], [1, 0], [-1, 9]])
    rng = np.random.default_rng(3)
    A = rng.random((5, 5))
    A[4] = [0, 0, 0, 0, 1]
    A /= A.sum(axis=1, keepdims=True)
    pol = parse_policy("do_sample=true,top_k=0,repetition_penalty=2.0")
    out = pol.apply(A, 4, state_tokens=st_tokens)
    z = np.log(A[2]).copy()
    z[[0, 1, 2, 3]] *= 2.0  # state (0,1) has history {0,1}: every column whose last token is 0 or 1
    p = np.exp(z - z.max())
    assert np.allclose(out[2], p / p.sum(), atol=1e-12)


def test_ties_greedy_topk_topp_typical():
    n = 7
    p = np.array([0.2, 0.3, 0.3, 0.1, 0.05, 0.05, 0.0])  # <eos> (index 6) has probability 0 in these rows
    with np.errstate(divide="ignore"):
        z = np.log(p)
    A = np.tile(p, (n, 1))
    A[n - 1] = 0.0
    A[n - 1, n - 1] = 1.0
    cases = [
        "do_sample=false",  # tie 0.3/0.3 → lowest index 1
        "do_sample=true,top_k=2",  # tie at the cut: both 0.3 kept (HF keeps ties)
        "do_sample=true,top_k=3",  # 0.3, 0.3, 0.2
        "do_sample=true,top_k=5",  # tie 0.05/0.05 at the cut: both kept (6 tokens)
        "do_sample=true,top_k=0,top_p=0.7",  # the tie is inside the nucleus
        "do_sample=true,top_k=0,typical_p=0.5",
        "do_sample=true,top_k=0,typical_p=0.95",
        "do_sample=true,top_k=0,min_p=0.5",
    ]
    for spec in cases:
        pol = parse_policy(spec)
        out = pol.apply(A, n - 1)
        for i in range(n - 1):
            hf = _hf_row(pol, z, i, n - 1)
            assert np.max(np.abs(out[i] - hf)) <= 1e-9, (spec, out[i], hf)
    g = parse_policy("do_sample=false").apply(A, n - 1)
    assert g[0, 1] == 1.0
    k2 = parse_policy("do_sample=true,top_k=2").apply(A, n - 1)
    assert np.allclose(k2[0, :3], [0.0, 0.5, 0.5])
    k5 = parse_policy("do_sample=true,top_k=5").apply(A, n - 1)
    assert np.count_nonzero(k5[0]) == 6


def test_top_p_exact_boundary_tie_follows_the_spec():
    """Spec §1/A11: equal probabilities keep the lower id first. HF's stable ascending sort keeps the
    higher id when the nucleus boundary falls exactly inside a tie (documented difference)."""
    A = np.array([[0.3, 0.3, 0.4, 0.0], [0.3, 0.3, 0.4, 0.0], [0.3, 0.3, 0.4, 0.0], [0.0, 0.0, 0.0, 1.0]])
    out = parse_policy("do_sample=true,top_k=0,top_p=0.5").apply(A, 3)
    assert np.allclose(out[0], [3 / 7, 0.0, 4 / 7, 0.0])
    with np.errstate(divide="ignore"):
        hf = _hf_row(parse_policy("do_sample=true,top_k=0,top_p=0.5"), np.log(A[0]), 0, 3)
    assert np.allclose(hf, [0.0, 3 / 7, 4 / 7, 0.0])


def test_min_tokens_to_keep_edge_cases():
    # with beams HF keeps at least 2 tokens in every warper (len(eos ids) + 1)
    Z, A, shift = _logit_matrix(5, spread=4.0)
    for spec in ("num_beams=2,do_sample=true,top_k=1", "num_beams=2,do_sample=true,top_k=0,top_p=0.01",
                 "num_beams=2,do_sample=true,top_k=0,typical_p=0.01", "num_beams=2,do_sample=true,top_k=0,min_p=1.0",
                 "num_beams=2,do_sample=true,top_k=0,epsilon_cutoff=0.99", "num_beams=2,do_sample=true,top_k=0,eta_cutoff=0.99"):
        pol = parse_policy(spec)
        out = pol.apply(A, EOS)
        for i in range(N_TOK):
            assert np.count_nonzero(out[i]) >= 2, spec
            hf = _hf_row(pol, np.log(A[i]), i, EOS)
            assert np.max(np.abs(out[i] - hf)) <= 1e-9, spec
    # top-k larger than the row keeps everything; an all-but-one-zero row stays one-hot
    A2 = A.copy()
    A2[0] = 0.0
    A2[0, 3] = 1.0
    out = parse_policy("do_sample=true,top_k=100,top_p=0.5").apply(A2, EOS)
    assert out[0, 3] == 1.0
    assert np.allclose(out[1:], parse_policy("do_sample=true,top_p=0.5").apply(A2, EOS)[1:], atol=1e-15)


def _random_csr(n, per_row, seed, eos_last=True):
    rng = np.random.default_rng(seed)
    rows, cols, vals = [], [], []
    for i in range(n):
        if i == n - 1 and eos_last:
            rows.append(i), cols.append(i), vals.append(1.0)
            continue
        k = int(rng.integers(1, per_row + 1))
        c = rng.choice(n, size=k, replace=False)
        v = rng.random(k) ** 3 + 1e-3
        v /= v.sum()
        rows += [i] * k
        cols += list(c)
        vals += list(v)
    return sp.csr_matrix((vals, (rows, cols)), shape=(n, n))


def test_sparse_equals_dense_and_keeps_type():
    A = _random_csr(60, 9, 1)
    for spec in SPEC_POLICIES.values():
        pol = parse_policy(spec)
        s = pol.apply(A, 59)
        d = pol.apply(A.toarray(), 59)
        assert isinstance(s, sp.csr_matrix)
        assert np.max(np.abs(s.toarray() - d)) <= 1e-12, spec
        assert np.allclose(np.asarray(s.sum(axis=1)).ravel(), 1.0, atol=1e-12)


def test_sparse_blocks_of_uneven_rows(monkeypatch):
    import repdiag.decoding as dec

    A = _random_csr(80, 30, 4)
    full = {spec: parse_policy(spec).apply(A, 79).toarray() for spec in SPEC_POLICIES.values()}
    monkeypatch.setattr(dec, "_BLOCK_BUDGET", 40)  # many small padded blocks
    for spec, want in full.items():
        assert np.max(np.abs(parse_policy(spec).apply(A, 79).toarray() - want)) <= 1e-15, spec


def test_eos_not_last_and_consistent_top_k_keeps_eos(logit_case):
    Z, A, shift = logit_case
    # move <eos> to index 0
    perm = np.r_[EOS, np.arange(N_TOK)]
    Ap = A[np.ix_(perm, perm)]
    pol = parse_policy("do_sample=true,top_k=2")
    out = pol.apply(Ap, 0)
    assert np.allclose(out[np.ix_(np.argsort(perm), np.argsort(perm))], pol.apply(A, EOS), atol=1e-15)
    cons = parse_policy("do_sample=true,top_k=2,consistent=true").apply(A, EOS)
    plain = pol.apply(A, EOS)
    assert np.all(cons[:N_TOK, EOS] > 0)  # every row keeps its exit (WEL20b)
    assert np.any(plain[:N_TOK, EOS] == 0)  # while plain top-2 drops it somewhere
    for i in range(N_TOK):
        kept = np.count_nonzero(cons[i])
        assert kept == (2 if plain[i, EOS] > 0 else 3)


def test_temperature_sweep_collision_non_increasing(logit_case):
    Z, A, shift = logit_case
    cols = [row_collision_full(parse_policy(f"do_sample=true,top_k=0,temperature={T}").apply(A, EOS))[:N_TOK]
            for T in (0.25, 0.5, 1.0, 2.0, 4.0)]
    for lo, hi in zip(cols, cols[1:]):
        assert np.all(hi <= lo + 1e-12)
    # T=1 is the identity on the rows
    assert np.allclose(parse_policy("do_sample=true,top_k=0,temperature=1.0").apply(A, EOS), A, atol=1e-15)


_row = st.lists(st.floats(min_value=-6, max_value=6, allow_nan=False), min_size=2, max_size=12)


def _row_matrix(logits):
    z = np.array(logits)
    p = np.exp(z - z.max())
    p /= p.sum()
    n = p.size + 1
    A = np.zeros((n, n))
    A[0, :-1] = p
    A[1:, -1] = 1.0
    return A, n - 1


@settings(max_examples=30, deadline=None)
@given(_row, st.floats(min_value=0.1, max_value=5.0), st.floats(min_value=0.1, max_value=5.0))
def test_property_temperature_monotone(logits, t1, t2):
    A, eos = _row_matrix(logits)
    lo, hi = sorted((t1, t2))
    c_lo = row_collision_full(parse_policy(f"do_sample=true,top_k=0,temperature={lo}").apply(A, eos))[0]
    c_hi = row_collision_full(parse_policy(f"do_sample=true,top_k=0,temperature={hi}").apply(A, eos))[0]
    assert c_hi <= c_lo + 1e-12


@settings(max_examples=30, deadline=None)
@given(_row, st.integers(1, 12), st.floats(0.05, 1.0), st.floats(0.0, 1.0), st.floats(0.0, 0.3))
def test_property_truncations_never_lower_collision(logits, k, p, min_p, eps):
    A, eos = _row_matrix(logits)
    base = row_collision_full(A)[0]
    for spec in (f"do_sample=true,top_k={k}", f"do_sample=true,top_k=0,top_p={p}",
                 f"do_sample=true,top_k=0,min_p={min_p}", f"do_sample=true,top_k=0,epsilon_cutoff={eps}",
                 f"do_sample=true,top_k=0,eta_cutoff={max(eps, 1e-4)}"):
        out = parse_policy(spec).apply(A, eos)
        assert row_collision_full(out)[0] >= base - 1e-12, spec


def test_hf_defaults_match_installed_transformers():
    from transformers import GenerationConfig

    gd = GenerationConfig._get_default_generation_params()
    for key, value in HF_DEFAULTS.items():
        assert gd.get(key) == value, key


def test_do_sample_true_alone_means_hf_top_k_50():
    pol = parse_policy("do_sample=true")
    assert pol.family == "truncation"
    assert pol.generate_kwargs() == {"do_sample": True}
    A = np.full((61, 61), 1.0 / 61)
    A[60] = 0.0
    A[60, 60] = 1.0
    A[:60] = np.linspace(1, 2, 61) / np.linspace(1, 2, 61).sum()
    assert np.count_nonzero(pol.apply(A, 60)[0]) == 50


def test_parse_and_labels():
    g = parse_policy("do_sample=false")
    assert g.family == "greedy" and g.row_local and g.exactness == "exact row transform"
    assert parse_policy("temperature=0.7,top_k=50,do_sample=true").name == "do_sample=true,temperature=0.7,top_k=50"
    assert parse_policy(" greedy ").name == "greedy"
    rp = parse_policy("repetition_penalty=1.2")
    assert rp.family == "penalty" and not rp.row_local and rp.exactness == "Markov approximation"
    ng = parse_policy("no_repeat_ngram_size=3")
    assert ng.ngram_cap == 3 and ng.family == "ngram-ban"
    A = _logit_matrix(2)[1]
    assert np.array_equal(ng.apply(A, EOS), parse_policy("do_sample=false").apply(A, EOS))
    assert parse_policy("num_beams=4").exactness == "measure only"
    assert parse_policy("penalty_alpha=0.6,top_k=4").family == "contrastive"
    assert parse_policy("repetition_penalty=1.3,temperature=0.7,top_k=3,do_sample=true").family == "composite"
    assert parse_policy("do_sample=true,top_k=0").family == "sampling"
    spec = parse_policy("top_p=0.9,do_sample=true,top_k=0")
    assert parse_policy(spec.spec_string()) == spec


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("temperature=-0.5,do_sample=true", "temperature"),
        ("top_p=1.5,do_sample=true", "top_p"),
        ("top_k=-1", "top_k"),
        ("top_k=2.5", "top_k"),
        ("do_sample=maybe", "do_sample"),
        ("temprature=0.7", "allowed"),
        ("no_such_mitigation", "valid names"),
        ("temperature", "valid names"),
        ("", "empty"),
        ("temperature=0.7,temperature=0.8", "twice"),
        ("epsilon_cutoff=1.0", "epsilon_cutoff"),
        ("repetition_penalty=0", "repetition_penalty"),
    ],
)
def test_bad_input_one_line(spec, fragment):
    with pytest.raises(PolicyError) as err:
        parse_policy(spec)
    msg = str(err.value)
    assert "\n" not in msg and fragment in msg


def test_unknown_key_lists_allowed_names():
    with pytest.raises(PolicyError) as err:
        parse_policy("foo=1")
    for key in PARAMS:
        assert key in str(err.value)


def test_bad_matrix_arguments():
    A = _logit_matrix(1)[1]
    with pytest.raises(PolicyError):
        parse_policy("greedy").apply(A, 99)
    with pytest.raises(PolicyError):
        parse_policy("greedy").apply(A, -1)


def test_residual_is_spread_before_the_policy():
    A = np.array([[0.5, 0.2, 0.0, 0.0, 0.1], [0.0, 0.6, 0.0, 0.0, 0.4], [0.3, 0.3, 0.4, 0.0, 0.0],
                  [0.25, 0.25, 0.25, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
    res = np.array([0.2, 0.0, 0.0, 0.0, 0.0])
    dense = A.copy()
    dense[0, 2:4] += 0.1  # unstored non-eos columns 2 and 3 share the residual
    pol = parse_policy("do_sample=true,top_k=0,temperature=0.5")
    for M in (A, sp.csr_matrix(A)):
        out = pol.apply(M, 4, residual=res)
        assert isinstance(out, np.ndarray)
        assert np.max(np.abs(out - pol.apply(dense, 4))) <= 1e-15
    assert hash(pol) == hash(parse_policy(pol.name))


def test_resolve_takes_model_generation_defaults():
    from transformers import GenerationConfig

    pol = parse_policy("do_sample=true,temperature=0.7")
    gc = GenerationConfig(top_p=0.9, top_k=20)
    r = pol.resolve(gc)
    assert r.effective()["top_p"] == 0.9 and r.effective()["top_k"] == 20 and r.effective()["temperature"] == 0.7
    # the call's own kwargs win
    assert parse_policy("do_sample=true,top_k=0").resolve(gc).effective()["top_k"] == 0


# ------------------------------------------------------------------ rebalanced encoding (spec §8.10)
def _seq_prob(M, seq):
    return float(np.prod([M[a, b] for a, b in zip(seq, seq[1:])]))


def _retokenise(seq, a, b, c):
    out, i = [], 0
    while i < len(seq):
        if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
            out.append(c)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def test_rebalanced_encoding_preserves_sequence_probabilities():
    A = np.array(
        [
            [0.05, 0.80, 0.05, 0.10],
            [0.30, 0.20, 0.30, 0.20],
            [0.40, 0.10, 0.20, 0.30],
            [0.00, 0.00, 0.00, 1.00],
        ]
    )
    M, eos, merges, selfs = rebalance_matrix(A, 3, gamma=0.5, max_merges=1)
    assert merges == [(0, 1)] and eos == 4 and M.shape == (5, 5)
    assert np.allclose(M.sum(axis=1), 1.0)
    c = 3  # the new state sits just before <eos>
    remap = {0: 0, 1: 1, 2: 2, 3: 4}
    for length in range(1, 6):
        for body in itertools.product(range(3), repeat=length):
            seq = [2, *body, 3]  # start at token 2 (not part of the merge)
            p = _seq_prob(A, seq)
            new = [c if x == -1 else remap[x] for x in _retokenise(seq, 0, 1, -1)]
            assert abs(_seq_prob(M, new) - p) <= 1e-14
    re = parse_policy("rebalanced_encoding=0.5,do_sample=true,top_k=0")
    assert re.exactness == "prediction only" and not re.measurable
    out = re.apply(A, 3)
    assert np.allclose(out, rebalance_matrix(A, 3, 0.5)[0]) and out.shape == (5, 5)
    assert sp.issparse(re.apply(sp.csr_matrix(A), 3))
    assert re.transform(A, 3)[1] == 4 and parse_policy("greedy").transform(A, 3)[1] == 3
