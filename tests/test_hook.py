"""repdiag.hook: RepetitionMonitor inside generate() (issue 8)."""

from __future__ import annotations

import inspect
import math
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from repdiag import metrics as M
from repdiag._atomic import dumps_json
from repdiag.errors import MatrixFormatError
from repdiag.hook import RepetitionMonitor, watch
from tiny_models import WORDS, build_config, build_tiny

ROOT = Path(__file__).resolve().parents[1]
TOK = {w: i for i, w in enumerate(WORDS)}
PROMPTS = ["a b c d", "e f g h i j", "k"]


def _inputs(arch, tok):
    tok.padding_side = "left" if arch == "gpt2" else "right"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _generated(out, prompt_len, eos=1):
    """Generated tokens per row of a generate() output, cut at <eos> (the metrics' input)."""
    rows = []
    for row in out[:, prompt_len:].tolist():
        rows.append(row[: row.index(eos)] if eos in row else row)
    return rows


@pytest.fixture(scope="module", params=["t5", "bart", "gpt2"])
def tiny(request):
    model, tok = build_tiny(request.param)
    return request.param, model, tok


DECODING = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=0, temperature=1.0),
    "beam": dict(num_beams=3, do_sample=False),
}


@pytest.mark.parametrize("how", list(DECODING))
def test_record_mode_leaves_tokens_unchanged_and_matches_metrics(tiny, how):
    arch, model, tok = tiny
    enc = _inputs(arch, tok)
    kw = dict(max_new_tokens=24, **DECODING[how])
    torch.manual_seed(7)
    ref = model.generate(**enc, **kw)
    mon = RepetitionMonitor()
    torch.manual_seed(7)
    out = model.generate(**enc, logits_processor=[mon], stopping_criteria=[mon], **kw)
    assert torch.equal(ref, out)
    rep = mon.report(out)
    prompt_len = 1 if arch != "gpt2" else enc["input_ids"].shape[1]
    assert mon.prompt_length == prompt_len
    gen = _generated(out, prompt_len)
    assert len(rep.sequences) == out.shape[0]
    assert rep.beam_search == (how == "beam")
    for s, g in zip(rep.sequences, gen):
        assert list(s.tokens) == g
        loop = M.find_loop(g)
        assert s.loop_onset == M.loop_onset(g)
        assert s.loop_period == (None if loop is None else loop.period)
        assert s.loop_tokens == (None if loop is None else tuple(loop.tokens))
        assert s.detected_at == (None if loop is None else loop.detected_at)
        if how != "beam":
            assert len(s.entropy) == len(g) + (1 if s.terminated else 0)
            assert all(0.0 <= p <= 1.0 for p in s.top1_prob)
            assert all(h >= -1e-5 for h in s.entropy)
    summary = M.compute_metrics(gen, terminated=[s.terminated for s in rep.sequences])
    for key, value in summary.items():
        assert rep.summary[key] == (pytest.approx(value) if value is not None else None), key
    dumps_json(rep.to_dict())  # serialisable


def test_entropy_and_top1_are_those_of_the_policy_distribution():
    model, tok = build_tiny("gpt2")
    enc = _inputs("gpt2", tok)
    mon = RepetitionMonitor()
    out = model.generate(**enc, max_new_tokens=6, do_sample=False, logits_processor=[mon], stopping_criteria=[mon],
                         output_scores=True, return_dict_in_generate=True)
    rep = mon.report(out)
    for step, scores in enumerate(out.scores):
        p = torch.softmax(scores.double(), -1)
        h = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
        for i, s in enumerate(rep.sequences):
            if step < len(s.entropy):
                assert s.entropy[step] == pytest.approx(float(h[i]), abs=1e-4)
                assert s.top1_prob[step] == pytest.approx(float(p[i].max()), abs=1e-5)


def test_call_signature_and_no_copy():
    mon = RepetitionMonitor()
    assert list(inspect.signature(mon.__call__).parameters) == ["input_ids", "scores"]
    ids = torch.tensor([[0, 5, 5]])
    scores = torch.randn(1, 32)
    assert mon(ids, scores) is scores  # returned unchanged, not copied
    stop = mon(torch.tensor([[0, 5, 5, 5]]), None)
    assert stop.dtype == torch.bool and stop.shape == (1,) and not stop.any()
    assert mon.supports_continuous_batching is False


# --------------------------------------------------------------------------------------------------
# a hand-made bigram model: GPT-2 whose blocks are switched off, so the next token is succ[last]
# --------------------------------------------------------------------------------------------------

LOOP = {TOK["a"]: TOK["b"], TOK["b"]: TOK["a"]}  # a b a b ... (period 2)
CHAIN = {TOK[c]: TOK[n] for c, n in zip("cdefghijklm", "defghijklmn")}  # c d ... n </s>
CHAIN[TOK["n"]] = 1


def bigram_gpt2(succ):
    import transformers as tr

    cfg = build_config("gpt2")
    cfg.tie_word_embeddings = False
    torch.manual_seed(0)
    model = tr.GPT2LMHeadModel(cfg).eval()
    V = d = 32
    sigma = math.sqrt((1 / d) * (1 - 1 / d) + model.transformer.ln_f.eps)
    W = torch.zeros(V, d)
    for x in range(V):
        W[succ.get(x, 1), x] = 1.5
    with torch.no_grad():
        for blk in model.transformer.h:
            for lin in (blk.attn.c_proj, blk.mlp.c_proj):
                lin.weight.zero_()
                lin.bias.zero_()
        model.transformer.wpe.weight.zero_()
        model.transformer.wte.weight.copy_(torch.eye(V, d))
        model.transformer.ln_f.weight.fill_(1.0)
        model.transformer.ln_f.bias.fill_((1 / d) / sigma)
        model.lm_head.weight.copy_(W)
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    return model


@pytest.fixture(scope="module")
def bigram():
    from tiny_models import build_tokenizer

    tok = build_tokenizer("gpt2")
    tok.padding_side = "left"
    enc = tok(["a", "c"], return_tensors="pt", padding=True)
    return bigram_gpt2({**LOOP, **CHAIN}), {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def test_stop_mode_ends_looping_rows_while_others_continue(bigram):
    model, enc = bigram
    ref = model.generate(**enc, max_new_tokens=20, do_sample=False)
    P = enc["input_ids"].shape[1]
    assert ref[0, P:].tolist() == [TOK["b"], TOK["a"]] * 10  # loops to the end without the monitor
    assert ref[1, P:].tolist()[:12] == [TOK[c] for c in "defghijklmn"] + [1]
    mon = RepetitionMonitor(mode="stop")
    out = model.generate(**enc, max_new_tokens=20, do_sample=False, logits_processor=[mon], stopping_criteria=[mon])
    assert out.shape[1] == P + 12  # the terminating row ran on to its <eos>
    assert out[1].tolist() == ref[1, : P + 12].tolist()
    assert out[0, P:P + 5].tolist() == ref[0, P:P + 5].tolist()  # b a b a b: E_2 completed at step 4
    assert out[0, P + 5:].tolist() == [0] * 7  # then padding
    rep = mon.report(out)
    s0, s1 = rep.sequences
    assert s0.stopped_by_monitor and s0.length == 5 and s0.loop_onset == 0 and s0.loop_period == 2
    assert s0.loop_tokens == (TOK["b"], TOK["a"]) and s0.detected_at == 4 and s0.terminated is False
    assert not s1.stopped_by_monitor and s1.terminated and s1.length == 11 and s1.loop_onset is None
    assert rep.summary["nonterminated"] == 0.5 and rep.summary["stopped_by_monitor"] == 0.5


def test_stop_mode_with_a_stricter_rule_and_beams(bigram):
    model, enc = bigram
    P = enc["input_ids"].shape[1]
    mon = RepetitionMonitor(mode="stop", min_repeats=3, min_length=9)
    out = model.generate(**enc, max_new_tokens=20, do_sample=False, logits_processor=[mon], stopping_criteria=[mon])
    assert out[0, P:].tolist()[:9] == [TOK["b"], TOK["a"]] * 4 + [TOK["b"]]
    assert mon.report(out).sequences[0].length == 9
    mon = RepetitionMonitor(mode="stop")
    out = model.generate(**enc, max_new_tokens=20, num_beams=2, do_sample=False, logits_processor=[mon],
                         stopping_criteria=[mon])
    rep = mon.report(out)
    assert rep.beam_search
    assert rep.sequences[0].length <= 5 and rep.sequences[0].loop_period in (1, 2)
    assert rep.sequences[1].terminated


def test_intervene_mode_changes_only_looping_rows(bigram):
    from transformers import NoRepeatNGramLogitsProcessor

    model, enc = bigram
    P = enc["input_ids"].shape[1]
    ref = model.generate(**enc, max_new_tokens=12, do_sample=False)
    mon = RepetitionMonitor(mode="intervene", intervention=NoRepeatNGramLogitsProcessor(2))
    out = model.generate(**enc, max_new_tokens=12, do_sample=False, logits_processor=[mon], stopping_criteria=[mon])
    assert out[1].tolist() == ref[1].tolist()  # never looped: untouched
    assert out[0, P:P + 5].tolist() == ref[0, P:P + 5].tolist()  # before the loop was seen
    assert out[0, P + 5] != ref[0, P + 5]  # "b a" was banned once the row looped


def test_watch_adds_and_restores(bigram):
    model, enc = bigram
    before = model.generate
    with watch(model, mode="stop") as mon:
        assert model.generate is not before
        out = model.generate(**enc, max_new_tokens=20, do_sample=False)
        rep = mon.report()
        assert rep.source == "output" and rep.sequences[0].stopped_by_monitor
        out2 = model.generate(**enc, max_new_tokens=3, do_sample=False)  # a second call resets
        assert mon.report().sequences[1].length == 3
    assert "generate" not in vars(model) and model.generate.__func__ is before.__func__
    assert out.shape[0] == out2.shape[0] == 2


def test_matrix_predictions_and_fingerprint(bigram):
    from repdiag.models import tokenizer_fingerprint
    from repdiag.transition import TransitionMatrix
    from tiny_models import build_tokenizer

    model, enc = bigram
    tok = build_tokenizer("gpt2")
    succ = {**LOOP, **CHAIN}
    V = 32
    A = np.zeros((V, V))
    for x in range(V):
        A[x, succ.get(x, 1)] = 0.9
        A[x, (x + 5) % V] += 0.1
    A[1] = 0
    A[1, 1] = 1.0
    tm = TransitionMatrix(matrix=A, residual=np.zeros(V), eos_index=1, state_tokens=np.arange(V)[:, None],
                          meta={"tokenizer_fingerprint": tokenizer_fingerprint(tok), "vocab_size": V})
    r = np.linspace(0.0, 3.1, V)
    for preds in (None, {"r": r}):
        mon = RepetitionMonitor(matrix=tm, tokenizer=tok, state_predictions=preds)
        out = model.generate(**enc, max_new_tokens=10, do_sample=False, logits_processor=[mon],
                             stopping_criteria=[mon])
        s0, s1 = mon.report(out).sequences
        onset = s0.prediction_at_onset
        assert onset["state"] == TOK["b"] and onset["context"] == [TOK["b"]]
        if preds is None:
            assert onset["greedy_fate"] == "loop" and onset["greedy_loop_period"] == 2
            assert s1.prediction_at_end["greedy_fate"] == "eos"
        else:
            assert onset["r"] == pytest.approx(r[TOK["b"]])
    by_token = RepetitionMonitor(state_predictions={TOK["b"]: {"r": 2.5}, TOK["a"]: {"r": 1.5}})
    out = model.generate(**enc, max_new_tokens=4, do_sample=False, logits_processor=[by_token],
                         stopping_criteria=[by_token])
    assert by_token.report(out).sequences[0].prediction_at_end == {"token": TOK["a"], "r": 1.5}
    # a matrix from another tokenizer: a clear error before generation
    other = TransitionMatrix(matrix=A, residual=np.zeros(V), eos_index=1, state_tokens=np.arange(V)[:, None],
                             meta={"tokenizer_fingerprint": "0123456789abcdef"})
    with pytest.raises(MatrixFormatError, match="tokenizer"):
        RepetitionMonitor(matrix=other, tokenizer=tok)
    big = TransitionMatrix(matrix=np.eye(3), residual=np.zeros(3), eos_index=2,
                           state_tokens=np.array([[5], [900], [1]]), meta={})
    mon = RepetitionMonitor(matrix=big)
    with pytest.raises(MatrixFormatError, match="900"):
        model.generate(**enc, max_new_tokens=3, logits_processor=[mon], stopping_criteria=[mon])


@pytest.mark.parametrize("bad, name", [
    (dict(min_period=0), "min_period"), (dict(max_period=0), "max_period"), (dict(max_period=-3), "max_period"),
    (dict(min_repeats=0), "min_repeats"), (dict(min_length=0), "min_length"), (dict(mode="loud"), "mode"),
    (dict(num_beams=0), "num_beams"), (dict(mode="intervene"), "intervention"),
    (dict(min_period=4, max_period=2), "max_period"),
])
def test_bad_parameters_raise_value_error(bad, name):
    with pytest.raises(ValueError, match=name):
        RepetitionMonitor(**bad)


def test_processor_only_and_report_before_use(bigram):
    model, enc = bigram
    mon = RepetitionMonitor()
    with pytest.raises(RuntimeError):
        mon.report()
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, logits_processor=[mon])
    rep = mon.report(out)
    assert rep.sequences[0].loop_period == 2 and rep.sequences[0].length == 8
    assert rep.sequences[0].loop == M.find_loop(list(rep.sequences[0].tokens))


def test_quickstart_example_runs(capsys):
    runpy.run_path(str(ROOT / "examples" / "hook_quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "sequence 0:" in out and "sequence 1:" in out


@pytest.mark.parametrize("opts", [dict(), dict(max_period=3), dict(min_repeats=3, min_length=7), dict(min_period=2)])
def test_step_detection_equals_find_loop_detected_at(opts):
    """The stop rule (tail of input_ids, all rows at once) fires first exactly at Loop.detected_at."""
    g = torch.Generator().manual_seed(3)
    seqs = torch.randint(0, 3, (64, 30), generator=g)
    seqs[:5] = torch.arange(30) % 7  # some without short loops
    mon = RepetitionMonitor(mode="stop", **opts)
    prompt = torch.full((64, 2), 9)
    first = torch.full((64,), -1)
    for t in range(30):
        ids = torch.cat([prompt, seqs[:, : t + 1]], 1)
        hit = mon._tail_looping(ids, prompt_len=2)
        first = torch.where((first < 0) & hit, torch.tensor(t), first)
    for i in range(64):
        loop = M.find_loop(seqs[i].tolist(), **opts)
        assert int(first[i]) == (-1 if loop is None else loop.detected_at)


def test_intervene_with_a_policy_name(bigram):
    from repdiag.errors import PolicyError

    model, enc = bigram
    P = enc["input_ids"].shape[1]
    ref = model.generate(**enc, max_new_tokens=12, do_sample=False)
    mon = RepetitionMonitor(mode="intervene", intervention="no_repeat_ngram_size=2")
    out = model.generate(**enc, max_new_tokens=12, do_sample=False, logits_processor=[mon], stopping_criteria=[mon])
    assert out[1].tolist() == ref[1].tolist()
    assert out[0, P + 5] != ref[0, P + 5]
    with pytest.raises(PolicyError):
        RepetitionMonitor(mode="intervene", intervention="no_such_mitigation")
    with pytest.raises(ValueError, match="intervention"):
        RepetitionMonitor(mode="intervene", intervention=42)


def test_kgram_state_lookup_with_back_off():
    import types

    a, b, c = TOK["a"], TOK["b"], TOK["c"]
    st = np.array([[-1, a], [-1, b], [a, b], [-1, c], [-1, 1]])
    A = np.zeros((5, 5))
    A[0, 2] = A[2, 0] = A[1, 3] = A[3, 4] = A[4, 4] = 1.0  # a -> (a,b) -> a ... ; b -> c -> eos
    plain = types.SimpleNamespace(matrix=A, eos_index=4, state_tokens=st, meta={})
    mon = RepetitionMonitor(matrix=plain)
    assert mon._prediction([c, a, b], 2)["state"] == 2  # the 2-gram (a, b)
    p = mon._prediction([c, b], 1)  # (c, b) is no state: back off to (b)
    assert p["state"] == 1 and p["context"] == [b] and p["greedy_fate"] == "eos"
    assert mon._prediction([a], 0)["greedy_fate"] == "loop" and mon._prediction([a], 0)["greedy_loop_period"] == 2
    assert mon._prediction([TOK["z"]], 0)["state"] is None
