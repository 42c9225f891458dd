"""repdiag.metrics: hand-computed values for every definition of spec §9, the paper-vs-code
differences, a second implementation of each metric (transcriptions of the authors' released code
and brute force), and property tests."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repdiag import metrics as M

# --------------------------------------------------------------------------------------------------
# second implementations (written from the released code / the spec, independent of repdiag.metrics)
# --------------------------------------------------------------------------------------------------


def ref_get_rep(sent, l=16):  # FU21 src/eval_metrics.py get_rep, divided by len in get_score
    cnt = 0
    for i, w in enumerate(sent):
        if w in sent[max(i - l, 0):i]:
            cnt += 1
    return cnt / len(sent)


def ref_get_repc(lst):  # FU21 get_repc
    if len(lst) < 2:
        return 0
    lst = [str(x) for x in lst]
    counter = {}
    for j in range(len(lst) - 1):
        gm = " ".join(lst[j:j + 2])
        counter[gm] = counter.get(gm, 0) + 1
    label = [0] * len(lst)
    for i in range(1, len(lst)):
        if counter["%s %s" % (lst[i - 1], lst[i])] > 1:
            label[i - 1] = label[i] = 1
    return sum(label) / len(label)


def ref_get_seq_rep_n(sent, N=4):  # FU21 get_seq_rep_n
    ngrams = []
    for n in range(1, N + 1):
        if len(sent) < n:
            continue
        for i in range(len(sent) - n + 1):
            ngrams.append(tuple(sent[i:i + n]))
    return 1.0 - len(set(ngrams)) / len(ngrams)


def ref_wel_ngram(token_list, n):  # WEL20a custom/metrics.py ngram_metrics (nltk.ngrams)
    ngs = [tuple(token_list[i:i + n]) for i in range(len(token_list) - n + 1)]
    return 1.0 - len(Counter(ngs)) / len(ngs)


def ref_simctg(text_list, quirk):  # SUY22 simctg/evaluation.py, without the final rounding
    res = {n: [0, 0] for n in (2, 3, 4)}
    for text in text_list:
        toks = text.strip().split()
        for n in (2, 3, 4):
            start, end = 0, n
            seen, total = set(), 0
            limit = len(toks) if quirk else len(toks) + 1
            while end < limit:
                seen.add(" ".join(toks[start:end]))
                total += 1
                start += 1
                end += 1
            res[n][0] += len(seen)
            res[n][1] += total
    reps = [100 * (1 - res[n][0] / res[n][1]) if res[n][1] else 0.0 for n in (2, 3, 4)]
    div = (1 - reps[0] / 100) * (1 - reps[1] / 100) * (1 - reps[2] / 100)
    return reps, div


def ref_ditto(sentence):  # DITTO report_metrics.sentence_repetition_count
    indices = [i for i, x in enumerate(sentence) if x == "."]
    all_sentences = []
    for i in range(len(indices)):
        start = indices[i] + 1
        end = indices[i + 1] if i != len(indices) - 1 else -1
        all_sentences.append(" ".join(sentence[start:end]))
    if len(all_sentences) == 0:
        return 0
    return (len(all_sentences) - len(set(all_sentences))) / len(all_sentences)


def ref_repeat_at_1(pred, gold, l):  # WEL20a TrainingMetrics.repeat_at_1, as a T x T mask in numpy
    T = len(gold)
    g = np.asarray(gold)
    prev = np.tile(g, (T, 1)).astype(np.int64)
    i, j = np.indices((T, T))
    prev[(j >= i) | (j <= i - l - 1)] = -1
    hit = (np.asarray(pred)[:, None] == prev).any(1)
    wrong = np.asarray(pred) != g
    return int(hit.sum()), int((hit & wrong).sum())


def ref_e_k_onset(x):  # spec §3.1: first t with some k >= 1 and x[t+k+j] == x[t+j] for j = 0..k
    L = len(x)
    for t in range(L):
        for k in range(1, L):
            if t + 2 * k >= L:
                break
            if all(x[t + k + j] == x[t + j] for j in range(k + 1)):
                return t, k
    return None


def ref_loop(x, min_period, max_period, min_repeats, min_length):  # brute force over spans
    L = len(x)
    for s in range(L):
        for p in range(min_period, (max_period or L) + 1):
            need = max(min_repeats * p + 1, min_length)
            if s + need > L:
                continue
            if all(x[i + p] == x[i] for i in range(s, s + need - p)):
                return s, p
    return None


def ref_detect(x, min_period, max_period, min_repeats, min_length):  # first prefix ending in a loop
    for end in range(len(x)):
        for p in range(min_period, (max_period or len(x)) + 1):
            need = max(min_repeats * p + 1, min_length)
            s = end + 1 - need
            if s >= 0 and all(x[i + p] == x[i] for i in range(s, end + 1 - p)):
                return end
    return None


small_seq = st.lists(st.integers(0, 3), min_size=0, max_size=30)

# --------------------------------------------------------------------------------------------------
# hand-computed values
# --------------------------------------------------------------------------------------------------


def test_rep_w_hand():
    s = "a b a c a".split()
    assert M.rep_w(s, 16) == pytest.approx(2 / 5)
    assert M.rep_w(s, 1) == 0.0
    assert M.rep_w(s, 2) == pytest.approx(2 / 5)
    assert M.rep_w([], 16) == 0.0


def test_rep_r_hand():
    assert M.rep_r("a b a b c".split()) == pytest.approx(4 / 5)
    assert M.rep_r("a b c".split()) == 0.0
    assert M.rep_r(["a"]) == 0.0


def test_seq_rep_pooled_vs_per_n_hand():  # A8: FU21 pools orders 1-4, WEL20a reports per n
    s = "a a b".split()
    assert M.seq_rep_pooled(s) == pytest.approx(1 - 5 / 6)
    assert M.seq_rep_pooled(["a"]) == 0.0
    assert M.seq_rep_pooled([]) == 0.0
    t = "a b a b".split()
    assert M.seq_rep_n(t, 1) == pytest.approx(0.5)
    assert M.seq_rep_n(t, 2) == pytest.approx(1 / 3)
    assert M.seq_rep_n(t, 4) == 0.0
    assert M.seq_rep_n(t, 5) is None


def test_seq_rep_exclusion_a12():
    m = M.compute_metrics(["a b a b", "c"], unit="word")
    assert m["seq_rep_2"] == pytest.approx(1 / 3)
    assert m["seq_rep_2_excluded"] == 1
    assert m["seq_rep_1"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["seq_rep_1_excluded"] == 0
    assert m["seq_rep_4_excluded"] == 1
    assert m["uniq_seq"] == 3
    # every other per-sequence metric keeps the short sequence as 0
    assert m["rep_w16"] == pytest.approx((0.5 + 0) / 2)
    empty = M.compute_metrics([[]])
    assert empty["seq_rep_1"] == 0.0 and empty["seq_rep_1_excluded"] == 1 and empty["length"] == 0.0


def test_simctg_standard_and_code_quirk_hand():
    seqs = ["a b a b".split(), "a b".split()]
    std = M.simctg_rep(seqs)
    assert std["simctg_rep_2"] == pytest.approx(25.0)
    assert std["simctg_rep_3"] == 0.0 and std["simctg_rep_4"] == 0.0
    assert std["simctg_diversity"] == pytest.approx(0.75)
    q = M.simctg_rep(seqs, code_quirk=True)  # L - n n-grams: ab, ba | (none) ; aba ; (none)
    assert q["simctg_rep_2_code_quirk"] == 0.0
    assert q["simctg_rep_3_code_quirk"] == 0.0
    assert q["simctg_rep_4_code_quirk"] == 0.0
    assert q["simctg_diversity_code_quirk"] == 1.0
    q2 = M.simctg_rep(["a b a b a".split()], code_quirk=True)  # ab ba ab (ba dropped)
    assert q2["simctg_rep_2_code_quirk"] == pytest.approx(100 / 3)


def test_rep_sen_both_rules_hand():
    toks = "x . a b . a b . c d".split()
    assert M.rep_sen_ditto_code(toks) == pytest.approx(1 / 3)  # [a b] [a b] [c] (d dropped, x ignored)
    assert M.rep_sen(toks) == pytest.approx(1 / 4)  # [x .] [a b .] [a b .] [c d]
    assert M.rep_sen("hi there. hi there. ok".split()) == pytest.approx(1 / 3)
    assert M.rep_sen("one! one? one!".split()) == pytest.approx(1 / 3)
    assert M.rep_sen([]) == 0.0 and M.rep_sen_ditto_code("a b".split()) == 0.0
    assert M.rep_sen([5, 9, 5, 9, 7], sentence_end=(9,)) == pytest.approx(1 / 3)


def test_teacher_forced_hand():
    out = M.teacher_forced([list("abac")], [list("baad")], windows=(1, 16))
    assert out["rep_l16"] == pytest.approx(0.5)
    assert out["wrep_l16"] == pytest.approx(0.25)
    assert out["rep_l1"] == pytest.approx(0.25)
    assert out["wrep_l1"] == pytest.approx(0.25)
    assert out["uniq"] == 3
    assert out["acc"] == pytest.approx(0.25)
    with pytest.raises(ValueError):
        M.teacher_forced([[1, 2]], [[1]])


def test_xu22_hand():
    probs = [[[0.5, 0.2], [0.6, 0.1], [0.7, 0.3]]]
    arg = [[[1, 0], [1, 0], [0, 1]]]
    out = M.xu22(probs, arg)
    assert out["TP"] == pytest.approx([0.35, 0.5])
    assert out["IP"] == pytest.approx([0.5, 1.0])
    assert out["WR"] == pytest.approx([0.5, 0.5])
    # a second sentence with one repetition only counts for n = 1
    out2 = M.xu22(probs + [[[0.5], [0.1]]], arg + [[[1], [1]]])
    assert out2["TP"] == pytest.approx([(0.35 + 0.1) / 2, 0.5])
    assert out2["IP"] == pytest.approx([0.25, 1.0])
    assert "WR" not in M.xu22(probs)


def test_loops_hand():
    loop = M.find_loop("i j k i j k i".split())  # SU21's [i, j, k] 3-repeat
    assert (loop.start, loop.period, loop.length, loop.tokens, loop.detected_at) == (0, 3, 7, ("i", "j", "k"), 6)
    assert M.find_loop("a b c d".split()) is None
    assert M.find_loop("a b a b".split()) is None  # E_2 needs 2k+1 = 5 tokens
    assert M.loop_onset("a b a b a".split()) == 0
    l2 = M.find_loop("x y a a a b".split())
    assert (l2.start, l2.period, l2.detected_at) == (2, 1, 4)
    # the earliest start wins even when a later, shorter loop completes first
    x = [9, 1, 2, 3, 1, 5, 5, 5, 2, 3, 1, 2]  # no early loop: check against brute force
    assert M.loop_onset(x) == (ref_e_k_onset(x) or (None,))[0]
    strict = M.find_loop("a a a b a b a b a".split(), min_repeats=3)
    assert (strict.start, strict.period) == (2, 2)
    assert M.find_loop("a a a".split(), min_length=4) is None
    assert M.find_loop("a b a b a".split(), max_period=1) is None


@pytest.mark.parametrize("bad", [dict(min_period=0), dict(max_period=0), dict(min_repeats=0),
                                 dict(min_length=0), dict(min_period=3, max_period=2), dict(min_period=1.5)])
def test_loop_params_validation(bad):
    with pytest.raises(ValueError) as exc:
        M.find_loop([1, 1, 1], **bad)
    assert next(iter(bad)) in str(exc.value) or "max_period" in str(exc.value)


def test_compute_metrics_keys_and_terminated():
    m = M.compute_metrics([[1, 2, 1, 2, 1], [3, 4]], terminated=[False, True], per_sequence=True)
    for key in ("rep_w16", "rep_r", "seq_rep_pooled_1_4", "seq_rep_1", "seq_rep_4", "seq_rep_4_excluded",
                "uniq_seq", "simctg_rep_2", "simctg_diversity", "simctg_rep_4_code_quirk",
                "simctg_diversity_code_quirk", "rep_sen", "rep_sen_ditto_code", "loop_onset", "length",
                "nonterminated"):
        assert key in m
    assert m["nonterminated"] == 0.5
    assert m["loop_onset"] == 0.0 and m["loop_fraction"] == 0.5
    assert m["length"] == 3.5
    per = m["per_sequence"]
    assert per["rep_w16"].shape == (2,)
    assert np.isnan(per["loop_onset"][1])
    se = m["stderr"]["rep_w16"]
    assert se == pytest.approx(np.std(per["rep_w16"], ddof=1) / math.sqrt(2))
    assert M.compute_metrics([[1]], terminated=None)["nonterminated"] is None
    assert "rep_w32" in M.compute_metrics([[1, 2]], windows=(16, 32))
    with pytest.raises(ValueError):
        M.compute_metrics(["a b"], unit="token")
    with pytest.raises(ValueError):
        M.compute_metrics([[1]], unit="char")


# --------------------------------------------------------------------------------------------------
# second implementations agree (hypothesis)
# --------------------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(small_seq)
def test_against_fu21_code(x):
    if x:
        assert M.rep_w(x, 16) == pytest.approx(ref_get_rep(x, 16))
        assert M.rep_w(x, 3) == pytest.approx(ref_get_rep(x, 3))
        assert M.seq_rep_pooled(x) == pytest.approx(ref_get_seq_rep_n(x))
    assert M.rep_r(x) == pytest.approx(ref_get_repc(x))


@settings(max_examples=80, deadline=None)
@given(small_seq)
def test_against_wel20a_code(x):
    for n in range(1, 5):
        v = M.seq_rep_n(x, n)
        if len(x) < n:
            assert v is None
        else:
            assert v == pytest.approx(ref_wel_ngram(x, n))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(st.sampled_from("abc"), min_size=0, max_size=12), min_size=1, max_size=4))
def test_against_simctg_code(texts):
    seqs = [list(t) for t in texts]
    joined = [" ".join(t) for t in texts]
    for quirk in (False, True):
        got = M.simctg_rep(seqs, code_quirk=quirk)
        reps, div = ref_simctg(joined, quirk)
        sfx = "_code_quirk" if quirk else ""
        for n, r in zip((2, 3, 4), reps):
            assert got[f"simctg_rep_{n}{sfx}"] == pytest.approx(r)
        assert got[f"simctg_diversity{sfx}"] == pytest.approx(div)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", ".", "c"]), max_size=25))
def test_against_ditto_code(x):
    assert M.rep_sen_ditto_code(x) == pytest.approx(ref_ditto(x))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=20), st.sampled_from([1, 2, 16]))
def test_against_wel20a_repeat_at_1(pairs, ell):
    gold = [g for g, _ in pairs]
    pred = [p for _, p in pairs]
    got = M.teacher_forced([gold], [pred], windows=(ell,))
    hits, wrong = ref_repeat_at_1(pred, gold, ell)
    assert got[f"rep_l{ell}"] == pytest.approx(hits / len(gold))
    assert got[f"wrep_l{ell}"] == pytest.approx(wrong / len(gold))


@settings(max_examples=100, deadline=None)
@given(small_seq)
def test_loop_onset_is_e_k(x):
    ref = ref_e_k_onset(x)
    loop = M.find_loop(x)
    if ref is None:
        assert loop is None
    else:
        assert (loop.start, loop.period) == ref


@settings(max_examples=80, deadline=None)
@given(small_seq, st.integers(1, 3), st.sampled_from([None, 2, 4]), st.integers(2, 3), st.integers(1, 8))
def test_find_loop_general_brute_force(x, pmin, pmax, reps, lmin):
    if pmax is not None and pmax < pmin:
        pmax = pmin
    loop = M.find_loop(x, min_period=pmin, max_period=pmax, min_repeats=reps, min_length=lmin)
    ref = ref_loop(x, pmin, pmax, reps, lmin)
    det = ref_detect(x, pmin, pmax, reps, lmin)
    if ref is None:
        assert loop is None and det is None
    else:
        assert (loop.start, loop.period) == ref
        assert loop.detected_at == det
        assert all(x[i + loop.period] == x[i] for i in range(loop.start, loop.start + loop.length - loop.period))
        end = loop.start + loop.length
        assert end == len(x) or x[end] != x[end - loop.period]  # maximal


# --------------------------------------------------------------------------------------------------
# properties
# --------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 10_000), min_size=0, max_size=40, unique=True))
def test_no_repeated_ngram_scores_zero(x):
    m = M.compute_metrics([x])
    for key in ("rep_w16", "rep_r", "seq_rep_pooled_1_4", "seq_rep_1", "seq_rep_2", "seq_rep_3", "seq_rep_4",
                "simctg_rep_2", "simctg_rep_3", "simctg_rep_4", "rep_sen", "rep_sen_ditto_code"):
        assert m[key] == 0.0, key
    assert m["loop_onset"] is None and m["loop_fraction"] == 0.0
    assert m["simctg_diversity"] == 1.0


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 50), st.integers(5, 60))
def test_constant_sequence_scores_max(tok, L):
    x = [tok] * L
    m = M.compute_metrics([x])
    assert m["rep_w16"] == pytest.approx((L - 1) / L)  # the first token cannot repeat
    assert m["rep_r"] == 1.0
    for n in range(1, 5):
        assert m[f"seq_rep_{n}"] == pytest.approx(1 - 1 / (L - n + 1))
    assert m["seq_rep_pooled_1_4"] == pytest.approx(1 - 4 / (4 * L - 6))
    assert m["simctg_rep_2"] == pytest.approx(100 * (1 - 1 / (L - 1)))
    assert m["loop_onset"] == 0.0
    assert M.find_loop(x).period == 1 and M.find_loop(x).length == L


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.sampled_from(list("abcdefgh")), min_size=0, max_size=20), min_size=1, max_size=4))
def test_word_level_equals_token_level(words):
    """On a one-token-per-word text, metrics on whitespace words equal metrics on the model's tokens."""
    from tiny_models import WORDS

    vocab = {w: i for i, w in enumerate(WORDS)}
    texts = [" ".join(w) for w in words]
    ids = [[vocab[t] for t in w] for w in words]
    a = M.compute_metrics(texts, unit="word")
    b = M.compute_metrics(ids, unit="token")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == pytest.approx(b[key]) if a[key] is not None else b[key] is None, key


def test_word_level_with_real_tokenizer():
    from tiny_models import build_tokenizer

    tok = build_tokenizer("t5")
    texts = ["a b a b a c", "d e f g"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert [len(i) for i in ids] == [6, 4]
    a = M.compute_metrics(texts, unit="word")
    b = M.compute_metrics(ids)
    assert {k: a[k] for k in a} == pytest.approx({k: b[k] for k in b})
