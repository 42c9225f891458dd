"""TransitionMatrix: probe and trace builders against brute force, k-gram bookkeeping, file format."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from repdiag.errors import MatrixFormatError, UsageError
from repdiag.transition import (
    ROW_ABSORBING,
    ROW_PROBE,
    ROW_TRACE,
    TransitionMatrix,
    build_probe,
    build_trace,
    fill_rows,
    load_matrix,
)
from tiny_models import TINYSTORIES, build_tiny, require_tinystories


# ----------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tinystories():
    require_tinystories()
    from repdiag.models import load_model

    return load_model(str(TINYSTORIES))


@pytest.fixture(scope="module")
def tinystories64(tinystories):
    """The real model in float64: brute-force comparisons are then exact up to rounding."""
    import copy

    from repdiag.models import wrap_model

    return wrap_model(copy.deepcopy(tinystories.model).double(), tinystories.tokenizer, model_id="tinystories64")


def _wrap(arch: str, dtype=torch.float32, seed: int = 0):
    from repdiag.models import wrap_model

    model, tok = build_tiny(arch, seed=seed, dtype=dtype)
    return wrap_model(model, tok, model_id=f"tiny-{arch}")


def _naive_probs(lm, prompt: str, token: int) -> np.ndarray:
    """What a user would write: one model(...) call for the context prompt + [token]."""
    enc = lm.tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        if lm.kind == "seq2seq":
            out = lm.model(input_ids=torch.tensor([enc]),
                           decoder_input_ids=torch.tensor([[lm.decoder_start_token_id, token]]))
        else:
            out = lm.model(input_ids=torch.tensor([enc + [token]]))
    return torch.softmax(out.logits[0, -1].double(), -1).numpy()


def _markov_lm():
    """A GPT-2 whose next token depends only on the last token (zeroed block outputs and positions)."""
    import transformers as tr

    from repdiag.models import wrap_model
    from tiny_models import build_tokenizer

    torch.manual_seed(3)
    cfg = tr.GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=128, bos_token_id=3,
                        eos_token_id=1, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = tr.GPT2LMHeadModel(cfg).to(torch.float64).eval()
    with torch.no_grad():
        model.transformer.wpe.weight.zero_()
        block = model.transformer.h[0]
        for lin in (block.attn.c_proj, block.mlp.c_proj):
            lin.weight.zero_()
            lin.bias.zero_()
        model.transformer.wte.weight.normal_(0.0, 1.0)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    return wrap_model(model, build_tokenizer("gpt2"), model_id="markov-gpt2")


# ----------------------------------------------------------------------------------------------
# probe
# ----------------------------------------------------------------------------------------------


def test_probe_full_vocab_matches_naive_loop_tinystories(tinystories, tinystories64):
    prompt = "Once upon a time"
    rows = np.delete(np.arange(512), tinystories.eos_token_id)
    # float64: the probe equals the naive loop (one model(...) call per row) over the full vocabulary
    lm64 = tinystories64
    tm64 = build_probe(lm64, [prompt], batch_size=100)
    enc = lm64.tokenizer(prompt)["input_ids"]
    with torch.no_grad():  # every context in full, no cache: the naive computation, batched for speed
        naive64 = torch.softmax(lm64.model(input_ids=torch.tensor([enc + [i] for i in range(512)])).logits[:, -1], -1)
    naive64 = naive64.numpy()
    assert np.abs(tm64.matrix[rows] - naive64[rows]).max() <= 1e-12
    for i in rows[::16]:  # and the literal naive loop, one model(...) call per row
        assert np.abs(tm64.matrix[i] - _naive_probs(lm64, prompt, int(i))).max() <= 1e-12
    # float32: as close to the float64 truth as the naive float32 loop itself is. This model's logits
    # reach 19.5 and float32 rounding in its five layers (not the LM head: a float64 head changes
    # nothing) moves a probability by up to ~1e-5 whichever way it is computed; the naive loop run
    # batched differs from itself by 2e-6 to 5e-6, so "1e-6 of the naive loop" is no reproducible
    # target here. The random tiny models, with small logits, meet it (test below).
    lm = tinystories
    tm = build_probe(lm, [prompt], batch_size=100)
    assert tm.n_states == lm.vocab_size == 512 and tm.is_dense and tm.order == 1
    assert tm.eos_index == lm.eos_token_id
    sub = rows[::8]
    naive = np.stack([_naive_probs(lm, prompt, i) for i in sub])
    err_probe = np.abs(tm.matrix[sub] - naive64[sub]).max()
    err_naive = np.abs(naive - naive64[sub]).max()
    assert err_probe <= max(1e-6, 2 * err_naive), (err_probe, err_naive)
    assert np.abs(tm.matrix[rows] - naive64[rows]).max() <= 1e-5
    # the logit shift recovers the logits: logit_ij = log p_ij + c_i
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([enc + [i] for i in range(512)])).logits[:, -1]
    rec = np.log(tm.matrix[rows]) + tm.row_logit_shift[rows, None]
    assert np.abs(rec - logits.double().numpy()[rows]).max() < 1e-3
    assert tm.matrix[lm.eos_token_id, lm.eos_token_id] == 1.0  # absorbing eos
    assert np.abs(tm.row_sums() - 1).max() <= 1e-12


@pytest.mark.parametrize("arch", ["t5", "gpt2"])
def test_probe_float32_within_1e6_of_naive_loop(arch):
    lm = _wrap(arch)
    tm = build_probe(lm, ["a b c"], batch_size=5)
    for i in range(lm.vocab_size):
        if i != lm.eos_token_id:
            assert np.abs(tm.matrix[i] - _naive_probs(lm, "a b c", i)).max() <= 1e-6


@pytest.mark.parametrize("arch", ["t5", "bart", "gpt2", "llama"])
def test_probe_float64_equals_naive_loop(arch):
    lm = _wrap(arch, dtype=torch.float64)
    prompts = ["a b c d", "e f"]
    tm = build_probe(lm, prompts, batch_size=7, keep_per_prompt=True)
    eos = lm.eos_token_id
    assert tm.per_prompt is not None and len(tm.per_prompt) == 2
    for i in range(lm.vocab_size):
        if i == eos:
            continue
        naive = [_naive_probs(lm, p, i) for p in prompts]
        for j in range(2):
            np.testing.assert_allclose(tm.per_prompt[j].matrix[i], naive[j], rtol=0, atol=1e-13)
        np.testing.assert_allclose(tm.matrix[i], (naive[0] + naive[1]) / 2, rtol=0, atol=1e-13)
    assert "mean over prompts" in tm.meta["label"] and tm.meta["n_prompts"] == 2


def test_probe_top_k_sparse_keeps_eos_and_residual():
    lm = _wrap("t5")
    tm = build_probe(lm, ["a b"], top_k=4)
    assert not tm.is_dense
    C = tm.csr()
    eos = lm.eos_token_id
    for i in range(tm.n_states):
        cols = C.indices[C.indptr[i]:C.indptr[i + 1]]
        assert eos in cols and len(cols) <= 5
    assert np.abs(tm.row_sums() - 1).max() <= 1e-12
    assert (tm.residual[np.arange(32) != eos] > 0).all()
    D = tm.to_dense()
    assert np.abs(D.sum(axis=1) - 1).max() <= 1e-12
    # the simulator's view equals the dense matrix for order 1
    ctx = np.arange(32)[:, None]
    np.testing.assert_allclose(tm.next_distribution(ctx), D, atol=1e-15)
    A, perm = tm.spec_layout()
    assert perm[-1] == eos and np.abs(A.sum(axis=1) - 1).max() <= 1e-12 and A[-1, -1] == 1.0


def test_probe_given_rows_flags_the_rest_missing():
    lm = _wrap("gpt2")
    tm = build_probe(lm, ["a b"], rows=[4, 5, 9])
    assert set(np.flatnonzero(tm.row_source == ROW_PROBE)) == {4, 5, 9}
    assert tm.missing.sum() == 32 - 4  # 3 probed + the absorbing eos
    assert np.abs(tm.row_sums() - 1).max() <= 1e-12
    tm2 = fill_rows(tm, lm, [7, 9], ["a b"])
    assert tm2.row_source[7] == ROW_PROBE and tm2.missing.sum() == 32 - 5
    np.testing.assert_allclose(tm2.matrix[7], _naive_probs(lm, "a b", 7), atol=1e-6)
    top = build_probe(lm, ["a b"], rows=5)
    assert (top.row_source == ROW_PROBE).sum() == 5


# ----------------------------------------------------------------------------------------------
# trace
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [1, 2])
def test_trace_reproduces_mean_of_seen_distributions(tinystories64, order):
    lm = tinystories64
    prompt = "The dog"
    tm = build_trace(lm, [prompt], order=order, max_new_tokens=24, seed=1, max_probe_rows=0)
    enc = lm.tokenizer(prompt)["input_ids"]
    sums: dict[tuple, np.ndarray] = {}
    counts: dict[tuple, int] = {}
    steps = []
    assert {s["mode"] for s in tm.sequences} == {"greedy", "sample"}
    for seq in tm.sequences:
        for t in range(len(seq["tokens"])):
            ctx = enc + seq["tokens"][:t]
            with torch.no_grad():
                logits = lm.model(input_ids=torch.tensor([ctx])).logits[0, -1]
            p = torch.softmax(logits.double(), -1).numpy()
            steps.append((ctx[-1], p))
            for length in range(1, order + 1):
                key = tuple(ctx[-length:])
                sums[key] = sums.get(key, 0) + p
                counts[key] = counts.get(key, 0) + 1
    assert len(steps) == tm.meta["trace"]["n_steps"]
    for key, total in sums.items():
        row = tm.next_distribution(np.array([[-1] * (order - len(key)) + list(key)]))[0]
        np.testing.assert_allclose(row, total / counts[key], rtol=0, atol=1e-12)
        state = tm.lookup_states(np.array([[-1] * (order - len(key)) + list(key)]))[0]
        assert tm.row_source[state] == ROW_TRACE and tm.visits[state] == counts[key]
    assert tm.visited.sum() == len(sums)
    # Theorem 2's residual variance against the 1-gram rows
    V = lm.vocab_size
    d2 = np.mean([np.sum((p - sums[(b,)] / counts[(b,)]) ** 2) / V for b, p in steps])
    assert tm.meta["delta2_hat"] == pytest.approx(d2, rel=1e-9, abs=1e-15)
    assert np.abs(tm.row_sums() - 1).max() <= 1e-12
    cov = tm.meta["coverage"]
    assert 0 < cov["rows_visited"] <= 1 and 0 < cov["mass_visited"] <= 1
    assert cov["n_missing"] == V - 1 - sum(1 for k in sums if len(k) == 1)  # no probe fallback here


def test_trace_fallback_and_top_k(tinystories):
    tm = build_trace(tinystories, ["Once upon a time", "Lily"], order=2, top_k=8, max_new_tokens=16)
    assert not tm.is_dense and tm.meta["top_k"] == 8
    assert tm.missing.sum() == 0  # every unvisited 1-gram row was probed (512 ≤ max_probe_rows)
    assert (tm.row_source[:512] == ROW_PROBE).sum() == tm.meta["coverage"]["n_probed"] > 0
    assert tm.row_source[tm.eos_index] == ROW_ABSORBING
    assert np.abs(tm.row_sums() - 1).max() <= 1e-12
    C = tm.csr()
    assert all(tm.eos_index in C.indices[C.indptr[i]:C.indptr[i + 1]] for i in range(tm.n_states))
    # the state-space matrix, lumped by last token, equals the simulator's token-space rows
    D = tm.to_dense()
    L = np.zeros((tm.n_states, 512))
    L[np.arange(tm.n_states), tm.state_tokens[:, -1]] = 1
    ctx = tm.state_tokens.copy()
    np.testing.assert_allclose(D @ L, tm.next_distribution(ctx), atol=1e-12)
    assert np.abs(D.sum(axis=1) - 1).max() <= 1e-12


def _brute_force_rows(lm, prompts, sequences, order):
    """Mean of the step distributions per context, recomputed one prefix at a time."""
    sums: dict[tuple, np.ndarray] = {}
    counts: dict[tuple, int] = {}
    lses: dict[tuple, float] = {}
    for seq in sequences:
        enc = lm.tokenizer(prompts[seq["prompt_index"]])["input_ids"]
        for t in range(len(seq["tokens"])):
            with torch.no_grad():
                if lm.kind == "seq2seq":
                    hist = seq["tokens"][:t]
                    dec = [lm.decoder_start_token_id] + hist
                    logits = lm.model(input_ids=torch.tensor([enc]), decoder_input_ids=torch.tensor([dec])).logits[0, -1]
                else:
                    hist = enc + seq["tokens"][:t]
                    logits = lm.model(input_ids=torch.tensor([hist])).logits[0, -1]
            if not hist:
                continue  # the first decoder step of a seq2seq model has no token history
            p = torch.softmax(logits.double(), -1).numpy()
            lse = float(torch.logsumexp(logits.double(), -1))
            for length in range(1, min(order, len(hist)) + 1):
                key = tuple(hist[-length:])
                sums[key] = sums.get(key, 0) + p
                counts[key] = counts.get(key, 0) + 1
                lses[key] = lses.get(key, 0.0) + lse
    return sums, counts, lses


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_trace_order2_brute_force_tiny(arch):
    lm = _wrap(arch, dtype=torch.float64)
    prompts = ["a b c", "d e f g", "h"]
    tm = build_trace(lm, prompts, order=2, max_new_tokens=8, seed=2, batch_size=2, max_probe_rows=0)
    sums, counts, lses = _brute_force_rows(lm, prompts, tm.sequences, 2)
    assert sum(c for k, c in counts.items() if len(k) == 1) == tm.meta["trace"]["n_steps"]
    for key, total in sums.items():
        ctx = np.array([[-1] * (2 - len(key)) + list(key)])
        np.testing.assert_allclose(tm.next_distribution(ctx)[0], total / counts[key], rtol=0, atol=1e-12)
        assert tm.visits[tm.lookup_states(ctx)[0]] == counts[key]
        # logit-scale scores: log of the mean row plus the steps' mean log-normaliser
        expect = np.log(total / counts[key]) + lses[key] / counts[key]
        np.testing.assert_allclose(tm.next_logits(ctx)[0], expect, rtol=0, atol=1e-9)
    assert tm.visited.sum() == len(sums)


def test_trace_sparse_accumulation_for_large_vocabularies(monkeypatch):
    import repdiag.transition as tr

    lm = _markov_lm()  # every step after token b has the same distribution: truncation is harmless
    prompts = ["a b c", "d e"]
    kw = dict(order=2, top_k=4, max_new_tokens=10, seed=4)
    exact = build_trace(lm, prompts, **kw)
    monkeypatch.setattr(tr, "TRACE_DENSE_MAX_VOCAB", 8)  # force the top-4K-per-step path
    approx = build_trace(lm, prompts, **kw)
    assert exact.meta["delta2_hat_exact"] and not approx.meta["delta2_hat_exact"]
    assert approx.meta["trace"]["accumulated_top_k"] == 16
    assert approx.n_states == exact.n_states
    assert np.abs(approx.row_sums() - 1).max() <= 1e-12
    C = approx.csr()
    assert all(approx.eos_index in C.indices[C.indptr[i]:C.indptr[i + 1]] for i in range(approx.n_states))
    vis = approx.visited
    np.testing.assert_allclose(approx.to_dense()[vis], exact.to_dense()[vis], rtol=0, atol=1e-12)
    assert exact.meta["delta2_hat"] < 1e-20 and approx.meta["delta2_hat"] < 1e-20


def test_kgram_order2_lumps_back_to_order1():
    lm = _markov_lm()
    prompts = ["a b c", "d e", "f"]
    kw = dict(max_new_tokens=20, seed=5, modes=("greedy", "sample"))
    a1 = build_trace(lm, prompts, order=1, **kw)
    a2 = build_trace(lm, prompts, order=2, **kw)
    assert [s["tokens"] for s in a1.sequences] == [s["tokens"] for s in a2.sequences]
    assert a2.n_states > a1.n_states == 32
    D1, D2 = a1.to_dense(), a2.to_dense()
    last = a2.state_tokens[:, -1]
    L = np.zeros((a2.n_states, 32))
    L[np.arange(a2.n_states), last] = 1  # lumping: state -> its last token
    np.testing.assert_allclose(D2 @ L, D1[last], rtol=0, atol=1e-12)
    # each bigram state (a, b) maps back to token strings and to the 1-gram row of b
    bigrams = np.flatnonzero(a2.state_tokens[:, 0] >= 0)
    s = int(bigrams[0])
    a, b = a2.state_tokens[s]
    assert a2.state_label(s, lm.tokenizer) == f"{lm.tokenizer.convert_ids_to_tokens(int(a))}|{lm.tokenizer.convert_ids_to_tokens(int(b))}"
    np.testing.assert_allclose(a2.next_distribution([[a, b]]), a1.next_distribution([[b]]), atol=1e-12)


def test_kgram_backoff_lookup_and_eos():
    st = np.array([[-1, 0], [-1, 1], [-1, 2], [0, 2], [2, 2]])  # token 1 is <eos>
    A = np.zeros((5, 5))
    A[0, 3] = 1.0  # 0 -> 2 lands on the bigram state (0, 2)
    A[1, 1] = 1.0  # absorbing eos
    A[2, 4] = 0.5  # 2 -> 2 lands on (2, 2)
    A[2, 1] = 0.5
    A[3, 4] = 1.0
    A[4, 0] = 1.0
    tm = TransitionMatrix(A, np.zeros(5), 1, st, {"vocab_size": 3})
    tm.validate()
    assert tm.lookup_states(np.array([[0, 2], [2, 1], [-1, 2], [2, 2], [1, 0]])).tolist() == [3, 1, 2, 4, 0]
    assert tm.lookup_states(np.array([[0, 0]])).tolist() == [0]  # back-off to the 1-gram state
    assert tm.lookup_states(np.array([[9, -1, 2, 2]]))[0] == 4  # wider contexts keep the last k tokens
    assert tm.successor_states(np.array([0, 2, 2]), np.array([2, 2, 1])).tolist() == [3, 4, 1]
    row = tm.row_for_context([2, 2])
    assert row.state == 4 and row.tokens.tolist() == [0] and row.probs.tolist() == [1.0]
    np.testing.assert_array_equal(tm.next_distribution([[2]]), [[0, 0.5, 0.5]])
    np.testing.assert_array_equal(tm.next_distribution([[0, 2], [1, 0]]), [[0, 0, 1], [0, 0, 1]])
    with pytest.raises(UsageError):
        tm.next_distribution([[0, -1]])


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_trace():
    return build_trace(_wrap("gpt2"), ["a b c", "d"], order=2, top_k=6, max_new_tokens=6)


@pytest.mark.parametrize("which", ["dense", "sparse"])
def test_round_trip_is_exact(tmp_path, small_trace, which):
    tm = small_trace if which == "sparse" else build_probe(_wrap("t5"), ["a b"])
    assert tm.is_dense == (which == "dense")
    path = tm.save(tmp_path / "m.npz")
    assert path.exists() and not (tmp_path / "m.npz.npz").exists()
    back = load_matrix(path)
    assert back.is_dense == tm.is_dense
    if tm.is_dense:
        np.testing.assert_array_equal(back.matrix, tm.matrix)
    else:
        assert (back.matrix != tm.matrix).nnz == 0
        np.testing.assert_array_equal(back.matrix.indices, tm.matrix.indices)
    np.testing.assert_array_equal(back.residual, tm.residual)
    np.testing.assert_array_equal(back.state_tokens, tm.state_tokens)
    np.testing.assert_array_equal(back.row_source, tm.row_source)
    assert back.eos_index == tm.eos_index and back.meta == tm.meta
    with np.load(path, allow_pickle=False) as z:
        assert {"format_version", "data", "indices", "indptr", "shape", "residual", "eos_index",
                "state_tokens", "meta_json"} <= set(z.files)
        assert json.loads(str(z["meta_json"]))["policy"] == "raw"


def test_dense_npy_in_spec_layout(tmp_path):
    A = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.0, 0.0, 1.0]])
    np.save(tmp_path / "a.npy", A)
    tm = load_matrix(tmp_path / "a.npy")
    assert tm.eos_index == 2 and tm.meta["builder"] == "dense-npy"
    B, perm = tm.spec_layout()
    np.testing.assert_array_equal(B, A)
    np.save(tmp_path / "b.npy", A[[2, 0, 1]][:, [2, 0, 1]])
    tm0 = load_matrix(tmp_path / "b.npy", eos_index=0)
    B0, _ = tm0.spec_layout()
    np.testing.assert_array_equal(B0, A)


def _tamper(src, dst, **changes):
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays.update(changes)
    with open(dst, "wb") as fh:
        np.savez(fh, **arrays)
    return dst


@pytest.mark.parametrize("case, expected", [
    ("nan", "row 3 holds NaN"),
    ("negative", "row 3 holds a negative"),
    ("rowsum", "row 3 sums to"),
    ("shape", "field 'shape'"),
    ("indptr", "field 'indptr'"),
    ("pickle_field", "field 'meta_json'"),
    ("newer", "newer than this repdiag"),
    ("missing", "field 'residual' is missing"),
    ("pickle_file", "pickles are not accepted"),
    ("npy_nan", "row 1 holds NaN"),
    ("npy_shape", "field 'shape'"),
])
def test_bad_files_are_refused_with_one_line(tmp_path, case, expected):
    lm = _wrap("gpt2")
    good = build_probe(lm, ["a"], top_k=5).save(tmp_path / "good.npz")
    with np.load(good, allow_pickle=False) as z:
        data, indptr = z["data"].copy(), z["indptr"]
    bad = tmp_path / "bad.npz"
    first3 = int(indptr[3])
    if case == "nan":
        data[first3] = np.nan
        _tamper(good, bad, data=data)
    elif case == "negative":
        data[first3] = -data[first3]
        _tamper(good, bad, data=data)
    elif case == "rowsum":
        data[first3] += 1e-3
        _tamper(good, bad, data=data)
    elif case == "shape":
        _tamper(good, bad, shape=np.array([32, 33]))
    elif case == "indptr":
        _tamper(good, bad, indptr=indptr[:-1])
    elif case == "pickle_field":
        with np.load(good, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["meta_json"] = np.array([{"evil": 1}], dtype=object)
        with open(bad, "wb") as fh:
            np.savez(fh, **arrays)
    elif case == "newer":
        _tamper(good, bad, format_version=np.array(99))
    elif case == "missing":
        with np.load(good, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != "residual"}
        with open(bad, "wb") as fh:
            np.savez(fh, **arrays)
    elif case == "pickle_file":
        bad.write_bytes(pickle.dumps({"matrix": [1.0]}))
    elif case == "npy_nan":
        bad = tmp_path / "bad.npy"
        A = np.eye(3)
        A[1, 0] = np.nan
        np.save(bad, A)
    elif case == "npy_shape":
        bad = tmp_path / "bad.npy"
        np.save(bad, np.ones((2, 3)) / 3)
    with pytest.raises(MatrixFormatError) as err:
        load_matrix(bad)
    msg = str(err.value)
    assert expected in msg and "\n" not in msg


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def test_cli_build_and_show(tmp_path, capsys):
    from repdiag.cli import main
    from tiny_models import save_tiny

    folder = save_tiny("gpt2", tmp_path / "gpt2")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a b c\nd e\n")
    out = tmp_path / "m.npz"
    assert main(["-q", "matrix", "build", str(folder), "--mode", "trace", "--order", "2", "--top-k", "8",
                 "--prompts", str(prompts), "--max-new-tokens", "5", "--seed", "3", "-o", str(out)]) == 0
    tm = load_matrix(out)
    assert tm.order == 2 and tm.meta["builder"] == "trace" and tm.meta["top_k"] == 8
    capsys.readouterr()
    assert main(["matrix", "show", str(out), "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert f"shape {tm.n_states}×{tm.n_states}" in text and "residual mass" in text and "top 3 transitions" in text
    assert main(["matrix", "show", str(out), "--top", "4", "--format", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_states"] == tm.n_states and len(info["top_transitions"]) == 4
    assert all(isinstance(r["from"], str) for r in info["top_transitions"])
    probe_out = tmp_path / "p.npz"
    assert main(["-q", "matrix", "build", str(folder), "--mode", "probe", "-o", str(probe_out)]) == 0
    assert load_matrix(probe_out).meta["n_prompts"] > 1  # the built-in prompt set
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really")
    assert main(["matrix", "show", str(tmp_path / "bad.npz")]) == 2
    assert "error:" in capsys.readouterr().err


def test_trace_probe_budget_and_fill_rows():
    lm = _wrap("gpt2")
    tm = build_trace(lm, ["a b"], order=2, top_k=3, max_new_tokens=4, modes=("greedy",), max_probe_rows=2)
    cov = tm.meta["coverage"]
    assert cov["n_probed"] <= 2 and cov["n_missing"] > 0
    missing = np.flatnonzero(tm.missing)
    assert np.all(tm.residual[missing] == 1.0)
    # a missing row reads as uniform over the non-eos tokens in the simulator's view
    p = tm.next_distribution(np.array([[int(missing[0])]]))[0]
    assert p[lm.eos_token_id] == 0 and np.allclose(np.delete(p, lm.eos_token_id), 1 / 31)
    filled = fill_rows(tm, lm, missing[:3], ["a b"])
    assert (filled.row_source[missing[:3]] == ROW_PROBE).all()
    assert filled.meta["coverage"]["n_missing"] == cov["n_missing"] - 3
    assert np.isfinite(filled.row_logit_shift[missing[:3]]).all()
    assert np.abs(filled.row_sums() - 1).max() <= 1e-12
    filled.validate()


# ----------------------------------------------------------------------------------------------
# probing only the rows the simulation reaches (issue 4, spec §7.1)
# ----------------------------------------------------------------------------------------------


def _reach_setup(names=("greedy", "temperature_1.3", "top_k_10")):
    from repdiag.mitigations import resolve_mitigations

    lm = _wrap("gpt2", dtype=torch.float64)
    trace_prompts = ["a b c", "d e f g"]
    chain = build_trace(lm, trace_prompts, order=2, top_k=8, max_new_tokens=6, seed=1, probe_fallback=False)
    starts = [lm.tokenizer(p)["input_ids"] for p in ["h i", "j k l"]]
    policies = resolve_mitigations(list(names))
    settings = dict(starts=starts, n_trajectories=24, max_new_tokens=12, eos_token_id=lm.eos_token_id,
                    pad_token_id=lm.pad_token_id, seed=5)
    return lm, trace_prompts, chain, policies, settings


def test_simulate_reaching_probes_only_reached_rows_and_matches_a_full_probe():
    from repdiag.simulate import simulate_policy, simulate_reaching

    # greedy-based policies on a 32-token model: sampling would reach every row
    lm, trace_prompts, chain, policies, settings = _reach_setup(("greedy", "repetition_penalty_1.5",
                                                                 "no_repeat_ngram_3"))
    n_missing = int(chain.missing.sum())
    assert n_missing > 5  # a short trace leaves most rows unvisited
    filled_sets: list[np.ndarray] = []

    def fill(current, tokens):
        filled_sets.append(np.asarray(tokens))
        return fill_rows(current, lm, tokens, trace_prompts)

    out = simulate_reaching(chain, policies, fill=fill, max_probe_rows=10_000, **settings)
    assert out.fills == len(filled_sets) >= 1
    assert out.probed == sum(len(t) for t in filled_sets) < n_missing  # not the whole vocabulary
    assert all(share == 0.0 for share in out.missing_steps.values())
    # every filled row was a missing row that a simulation stepped on, and none was filled twice
    reached = np.concatenate(filled_sets)
    assert len(np.unique(reached)) == len(reached) and chain.missing[reached].all()
    assert out.chain.coverage()["n_probed"] == out.probed
    # the same sequences as simulate_policy on a chain with every unvisited row probed (float64: rows
    # agree to rounding), and every probed row was read by some trajectory
    full = fill_rows(chain, lm, np.flatnonzero(chain.missing), trace_prompts)
    read = set()
    for policy in policies:
        result = simulate_policy(full, policy, **settings)
        assert result.sequences == out.results[policy.name].sequences
        for seq, done, start in zip(result.sequences, result.terminated, settings["starts"] * 12):
            history = [start[-1], *seq]  # the last token of each context a step read
            read.update(history if done else history[:-1])  # an unfinished walk never reads its last token
    assert set(reached.tolist()) <= read


def test_simulate_reaching_on_compact_columns_that_grow_with_the_probed_rows(monkeypatch):
    """Large-vocabulary mode (forced here on 32 tokens): the columns start as the trace's entries and
    grow with each probed row's; the draws equal a run on the fully probed chain's wider columns."""
    import repdiag.simulate as sim

    monkeypatch.setattr(sim, "FULL_VOCABULARY_MAX", 8)
    lm, trace_prompts, chain, policies, settings = _reach_setup(("greedy", "temperature_1.3", "top_p_0.9",
                                                                 "repetition_penalty_1.5"))
    extra = (lm.eos_token_id, lm.pad_token_id)
    start_columns = sim.simulation_vocabulary(chain, settings["starts"], extra)
    out = sim.simulate_reaching(chain, policies, fill=lambda c, t: fill_rows(c, lm, t, trace_prompts),
                                max_probe_rows=10_000, extra_ids=extra, **settings)
    assert out.probed > 0 and all(share == 0.0 for share in out.missing_steps.values())
    # the columns it ends with are those of the filled chain
    np.testing.assert_array_equal(out.columns, sim.simulation_vocabulary(out.chain, settings["starts"], extra))
    full = fill_rows(chain, lm, np.flatnonzero(chain.missing), trace_prompts)
    wide = sim.simulation_vocabulary(full, settings["starts"], extra)
    assert len(start_columns) < len(wide)
    for policy in policies:
        assert sim.simulate_policy(full, policy, vocabulary=wide, **settings).sequences == \
            out.results[policy.name].sequences


def test_simulate_reaching_respects_the_budget_and_reports_what_is_left():
    from repdiag.simulate import simulate_policy, simulate_reaching

    lm, trace_prompts, chain, policies, settings = _reach_setup()
    out = simulate_reaching(chain, policies, fill=lambda c, t: fill_rows(c, lm, t, trace_prompts), max_probe_rows=3,
                            **settings)
    assert out.probed <= 3 and out.chain.coverage()["n_probed"] == out.probed
    assert max(out.missing_steps.values()) > 0  # 3 rows cannot cover a temperature-1.3 walk
    none = simulate_reaching(chain, policies, fill=lambda c, t: pytest.fail("no probing with a zero budget"),
                             max_probe_rows=0, **settings)
    assert none.probed == 0 and none.fills == 0 and none.chain is chain
    # without probing, the lockstep run is simulate_policy's run on the chain as it is
    for policy in policies:
        assert none.results[policy.name].sequences == simulate_policy(chain, policy, **settings).sequences
    share = none.missing_steps["greedy"]
    assert 0 < share < 1


def test_trace_teacher_forced_pass_in_sub_batches_equals_one_pass(monkeypatch):
    """A large vocabulary splits the teacher-forced pass into sub-batches; the rows must not change."""
    import repdiag.transition as tr

    lm = _wrap("gpt2", dtype=torch.float64)
    prompts = ["a b c", "d e f g", "h", "i j"]
    kw = dict(order=2, top_k=8, max_new_tokens=6, seed=3, batch_size=4, probe_fallback=False)
    whole = build_trace(lm, prompts, **kw)
    monkeypatch.setattr(tr, "TRACE_LOGITS_BYTES", 4 * 12 * lm.vocab_size)  # about one sequence per pass
    split = build_trace(lm, prompts, **kw)
    assert split.n_states == whole.n_states
    np.testing.assert_allclose(split.to_dense(), whole.to_dense(), rtol=0, atol=1e-13)
    np.testing.assert_array_equal(split.visits, whole.visits)


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_fill_rows_with_prepared_probe_prompts_gives_the_same_rows(arch):
    from repdiag.transition import ProbePrompts

    lm = _wrap(arch)
    tm = build_trace(lm, ["a b"], order=2, top_k=3, max_new_tokens=4, modes=("greedy",), probe_fallback=False)
    missing = np.flatnonzero(tm.missing)
    prepared = ProbePrompts(lm, ["a b", "c"])
    step1 = fill_rows(tm, lm, missing[:3], prepared, batch_size=3)  # the same batches as `here`: same bytes
    step2 = fill_rows(step1, lm, missing[3:9], prepared, batch_size=3)  # the prefixes are reused, unchanged
    here = fill_rows(tm, lm, missing[:9], ["a b", "c"], batch_size=3)
    np.testing.assert_array_equal(step2.to_dense(), here.to_dense())
    np.testing.assert_array_equal(step2.row_logit_shift, here.row_logit_shift)
    with pytest.raises(UsageError, match="another model"):
        fill_rows(tm, _wrap(arch, seed=1), missing[:2], prepared)


def test_fill_rows_on_an_executor_gives_the_same_rows():
    from repdiag.executors import LocalExecutor

    lm = _wrap("gpt2")
    tm = build_trace(lm, ["a b"], order=2, top_k=3, max_new_tokens=4, modes=("greedy",), probe_fallback=False)
    missing = np.flatnonzero(tm.missing)[:9]
    here = fill_rows(tm, lm, missing, ["a b", "c"], batch_size=2)
    with LocalExecutor(n_shards=3) as ex:
        sharded = fill_rows(tm, lm, missing, ["a b", "c"], batch_size=2, executor=ex)
    np.testing.assert_array_equal(sharded.to_dense(), here.to_dense())
    np.testing.assert_array_equal(sharded.row_logit_shift, here.row_logit_shift)
    assert (sharded.row_source[missing] == ROW_PROBE).all()
