"""Repetition metrics on token sequences (pure: numpy only, no torch).

Every metric of ``repetition-theory.md`` §9 with its exact definition; where the authors' released
code differs from the paper, both values, named as §9.7 names them. All functions take sequences of
hashable tokens (ints or strings); a ``str`` is split into whitespace words (spec §9.6, unit
``"word"``).

Keys of :func:`compute_metrics` (spec §9.7):

==============================  =====================================================  ===========
key                             metric                                                 level
==============================  =====================================================  ===========
``rep_w{w}`` (``rep_w16``)      FU21 rep-w: share of tokens seen in the previous w     mean of seqs
``rep_r``                       FU21 rep-r: share of tokens inside a repeated bigram   mean of seqs
``seq_rep_pooled_1_4``          FU21 seq-rep as coded (orders 1–4 pooled)              mean of seqs
``seq_rep_1`` … ``seq_rep_4``   WEL20a seq-rep-n; ``seq_rep_{n}_excluded`` = #(L < n)  mean of seqs
``uniq_seq``                    WEL20a distinct tokens over all continuations          corpus
``rep_l{ℓ}``, ``wrep_l{ℓ}``,    WEL20a teacher-forced (from ``gold`` and ``pred``)     pooled
``uniq``, ``acc``
``simctg_rep_{2,3,4}``,         SUY22 rep-n in percent, diversity; ``*_code_quirk``    corpus
``simctg_diversity``            with the released code's L − n n-gram count
``rep_sen``                     sentence repetition, repdiag's rule                    mean of seqs
``rep_sen_ditto_code``          the DITTO code's rule                                  mean of seqs
``TP``, ``IP``, ``WR``          XU22, lists over the repetition index n = 1..N         mean of sents
``loop_onset``                  first t with an E_k(t) (§3.1); mean over looping seqs  mean / null
``loop_fraction``               share of sequences with an E_k(t)                      share
``length``                      tokens generated                                       mean
``nonterminated``               share not ending in ``<eos>`` (null when unknown)      share
==============================  =====================================================  ===========

Loop detection (one implementation, shared with :mod:`repdiag.hook`): :func:`find_loop`. A span
``x[s:s+ℓ]`` is *periodic with period p* when ``x[i+p] = x[i]`` for ``s ≤ i < s+ℓ−p``. It counts as
a loop when ``min_period ≤ p ≤ max_period`` and ``ℓ ≥ max(min_repeats·p + 1, min_length)``: the
closed walk of p transitions is traversed ``min_repeats`` times. With the defaults
(``min_period=1, max_period=None, min_repeats=2, min_length=1``) this is exactly Su's event
``E_p(s)`` of §3.1 (``x_{s+p+j} = x_{s+j}`` for ``j = 0..p``, a span of ``2p + 1`` tokens), so
``find_loop(seq).start`` is the first ``t`` with an ``E_k(t)`` = :func:`loop_onset`.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Hashable, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "Loop",
    "find_loop",
    "loop_onset",
    "loop_params",
    "rep_w",
    "rep_r",
    "seq_rep_pooled",
    "seq_rep_n",
    "uniq_seq",
    "teacher_forced",
    "simctg_rep",
    "rep_sen",
    "rep_sen_ditto_code",
    "xu22",
    "per_sequence_metrics",
    "compute_metrics",
    "standard_errors",
    "score_file",
    "DEFAULT_WINDOWS",
    "DEFAULT_REP_L",
]

Token = Hashable
DEFAULT_WINDOWS: tuple[int, ...] = (16,)
DEFAULT_REP_L: tuple[int, ...] = (16, 32, 128, 512)
_FIND_LOOP_CELLS = 1 << 21  # periods x positions compared at once by find_loop
SENTENCE_END = (".", "!", "?")


# --------------------------------------------------------------------------------------------------
# loops (spec §3.1)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Loop:
    """A periodic span found by :func:`find_loop`.

    ``start``: index of its first token (the loop onset); ``period``: p; ``length``: tokens in the
    maximal periodic span from ``start``; ``repeats``: ``length / period``; ``tokens``: the repeated
    unit ``seq[start:start+period]``; ``detected_at``: the index of the token at which the sequence
    *first* satisfied the loop rule (any period; this is when a monitor in ``stop`` mode stops).
    """

    start: int
    period: int
    length: int
    repeats: float
    tokens: tuple
    detected_at: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokens"] = [t if isinstance(t, (int, str)) else str(t) for t in self.tokens]
        return d


def loop_params(
    min_period: int = 1, max_period: int | None = None, min_repeats: int = 2, min_length: int = 1
) -> dict[str, Any]:
    """Validate the loop-rule parameters (``ValueError`` naming the parameter) and return them."""
    for name, value in (("min_period", min_period), ("min_repeats", min_repeats), ("min_length", min_length)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if max_period is not None:
        if isinstance(max_period, bool) or not isinstance(max_period, (int, np.integer)):
            raise ValueError(f"max_period must be an integer or None, got {max_period!r}")
        if max_period < 1:
            raise ValueError(f"max_period must be >= 1, got {max_period}")
        if max_period < min_period:
            raise ValueError(f"max_period ({max_period}) must be >= min_period ({min_period})")
    return {
        "min_period": int(min_period),
        "max_period": None if max_period is None else int(max_period),
        "min_repeats": int(min_repeats),
        "min_length": int(min_length),
    }


def _codes(seq: Sequence[Token]) -> np.ndarray:
    """Map tokens to int64 codes (equal tokens ↔ equal codes)."""
    if isinstance(seq, np.ndarray) and seq.dtype.kind in "iu":
        return seq.astype(np.int64, copy=False)
    table: dict[Token, int] = {}
    return np.fromiter((table.setdefault(t, len(table)) for t in seq), dtype=np.int64, count=len(seq))


def _need(p: int, min_repeats: int, min_length: int) -> int:
    return max(min_repeats * p + 1, min_length)


def find_loop(
    seq: Sequence[Token],
    *,
    min_period: int = 1,
    max_period: int | None = None,
    min_repeats: int = 2,
    min_length: int = 1,
) -> Loop | None:
    """The earliest-starting loop of ``seq`` (ties: the smallest period), or ``None``.

    The rule is in the module docstring; the defaults give Su's ``E_k(t)`` (§3.1) for every k.
    Cost: O(L · P) comparisons, vectorised over periods and positions (P = periods tried).
    """
    params = loop_params(min_period, max_period, min_repeats, min_length)
    x = _codes(seq)
    L = len(x)
    r, lmin = params["min_repeats"], params["min_length"]
    p_hi = (L - 1) // r if params["max_period"] is None else min(params["max_period"], (L - 1) // r)
    periods = np.arange(params["min_period"], p_hi + 1, dtype=np.int64)
    needs = np.maximum(r * periods + 1, lmin)
    periods, needs = periods[needs <= L], needs[needs <= L]
    best: tuple[int, int] | None = None  # (start, period)
    first_detect: int | None = None
    pos = np.arange(L, dtype=np.int64)
    chunk = max(1, _FIND_LOOP_CELLS // max(L, 1))
    for lo in range(0, len(periods), chunk):  # all periods at once, in chunks bounding memory
        ps, ns = periods[lo: lo + chunk], needs[lo: lo + chunk]
        c = ns - ps  # consecutive lag-p matches needed (>= 1)
        partner = pos[None, :] + ps[:, None]
        inside = partner < L
        m = np.zeros(partner.shape, dtype=bool)
        m[inside] = np.broadcast_to(x, partner.shape)[inside] == x[partner[inside]]
        cs = np.zeros((len(ps), L + 1), dtype=np.int32)
        np.cumsum(m, axis=1, out=cs[:, 1:])
        ends = pos[None, :] + c[:, None]
        ok = ends <= (L - ps)[:, None]
        rows = np.arange(len(ps))[:, None]
        full = ok & ((cs[rows, np.minimum(ends, L)] - cs[:, :L]) == c[:, None])
        has = full.any(axis=1)
        if not has.any():
            continue
        first = np.where(has, full.argmax(axis=1), L)
        k = int(np.argmin(first))  # earliest start; ties: the smallest period (ascending order)
        if best is None or int(first[k]) < best[0]:
            best = (int(first[k]), int(ps[k]))
        det = int(np.min(np.where(has, first + ns - 1, np.iinfo(np.int64).max)))
        first_detect = det if first_detect is None else min(first_detect, det)
    if best is None:
        return None
    a, p = best
    m = x[a + p:] == x[a: L - p]
    brk = np.flatnonzero(~m)
    run = int(brk[0]) if brk.size else len(m)
    length = run + p
    return Loop(
        start=a,
        period=p,
        length=length,
        repeats=length / p,
        tokens=tuple(_plain(t) for t in seq[a: a + p]),
        detected_at=int(first_detect),
    )


def _plain(t: Any) -> Any:
    if isinstance(t, np.integer):
        return int(t)
    return t


def loop_onset(seq: Sequence[Token], **loop_options: Any) -> int | None:
    """The first ``t`` with an ``E_k(t)`` (spec §3.1), or ``None`` if the sequence has no loop."""
    loop = find_loop(seq, **loop_options)
    return None if loop is None else loop.start


# --------------------------------------------------------------------------------------------------
# per-sequence metrics
# --------------------------------------------------------------------------------------------------


def rep_w(seq: Sequence[Token], w: int = 16) -> float:
    """FU21 rep-w: ``(1/L) Σ_t 1[s_t ∈ {s_{t−w},…,s_{t−1}}]`` (``get_rep``); 0 for an empty sequence."""
    if w < 1:
        raise ValueError(f"window must be >= 1, got {w}")
    L = len(seq)
    if L == 0:
        return 0.0
    last: dict[Token, int] = {}
    hits = 0
    for i, t in enumerate(seq):
        j = last.get(t)
        if j is not None and i - j <= w:
            hits += 1
        last[t] = i
    return hits / L


def rep_r(seq: Sequence[Token]) -> float:
    """FU21 rep-r (``get_repc``): share of positions inside a bigram that occurs more than once."""
    L = len(seq)
    if L < 2:
        return 0.0
    bigrams = list(zip(seq[:-1], seq[1:]))
    count = Counter(bigrams)
    label = [False] * L
    for i, bg in enumerate(bigrams):
        if count[bg] > 1:
            label[i] = label[i + 1] = True
    return sum(label) / L


def _ngrams(seq: Sequence[Token], n: int) -> list[tuple]:
    """The ``L − n + 1`` n-grams of ``seq`` as tuples, in order."""
    seq = list(seq)
    return list(zip(*(seq[k:] for k in range(n))))


def seq_rep_pooled(seq: Sequence[Token], max_n: int = 4) -> float:
    """FU21 seq-rep as coded (``get_seq_rep_n``): ``1 − |∪ unique n-grams| / Σ #n-grams``, n = 1..4.

    Orders with ``L < n`` are skipped; 0 for an empty sequence.
    """
    grams: list[tuple] = []
    for n in range(1, max_n + 1):
        if len(seq) < n:
            continue
        grams.extend(_ngrams(seq, n))
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def seq_rep_n(seq: Sequence[Token], n: int) -> float | None:
    """WEL20a seq-rep-n: ``1 − |unique n-grams| / |n-grams|``; ``None`` when ``L < n`` (A12)."""
    grams = _ngrams(seq, n)
    if not grams:
        return None
    return 1.0 - len(set(grams)) / len(grams)


def _is_sentence_end(tok: Token, ends: Iterable[Token]) -> bool:
    if isinstance(tok, str):
        s = tok.strip()
        return any(s.endswith(e) for e in ends if isinstance(e, str) and e)
    return tok in ends


def rep_sen(seq: Sequence[Token], sentence_end: Iterable[Token] = SENTENCE_END) -> float:
    """repdiag's sentence repetition: split *after* a token ending in ``.``, ``!`` or ``?`` (for int
    tokens: a token in ``sentence_end``), keep a non-empty trailing segment; the value is
    ``(#sentences − #distinct) / #sentences`` (0 with no sentence)."""
    ends = tuple(sentence_end)
    sentences: list[tuple] = []
    cur: list[Token] = []
    for t in seq:
        cur.append(t)
        if _is_sentence_end(t, ends):
            sentences.append(tuple(cur))
            cur = []
    if cur:
        sentences.append(tuple(cur))
    if not sentences:
        return 0.0
    return (len(sentences) - len(set(sentences))) / len(sentences)


def rep_sen_ditto_code(seq: Sequence[Token], dot: Token = ".") -> float:
    """DITTO's ``sentence_repetition_count``: segments start after each token equal to ``"."``;
    the text before the first ``"."`` is ignored and the last segment drops the final token."""
    idx = [i for i, t in enumerate(seq) if t == dot]
    seqs: list[tuple] = []
    for i in range(len(idx)):
        start = idx[i] + 1
        end = idx[i + 1] if i != len(idx) - 1 else -1
        seqs.append(tuple(seq[start:end]))
    if not seqs:
        return 0.0
    return (len(seqs) - len(set(seqs))) / len(seqs)


# --------------------------------------------------------------------------------------------------
# corpus metrics
# --------------------------------------------------------------------------------------------------


def uniq_seq(sequences: Sequence[Sequence[Token]]) -> int:
    """WEL20a uniq-seq: the number of distinct tokens over all continuations."""
    seen: set = set()
    for s in sequences:
        seen.update(s)
    return len(seen)


def simctg_rep(sequences: Sequence[Sequence[Token]], *, code_quirk: bool = False) -> dict[str, float]:
    """SUY22 rep-2/3/4 (percent) and diversity, pooled over the corpus:
    ``rep-n = 100 (1 − Σ_texts |unique n-grams| / Σ_texts |n-grams|)``.

    ``code_quirk=True`` counts ``L − n`` n-grams per text as ``simctg/evaluation.py`` does (its
    ``while end_idx < len`` drops the last n-gram). The released code rounds to 2 decimals; this
    does not. A corpus with no n-gram of order n gets rep-n = 0.
    """
    out: dict[str, float] = {}
    suffix = "_code_quirk" if code_quirk else ""
    div = 1.0
    for n in (2, 3, 4):
        uniq = total = 0
        for s in sequences:
            grams = _ngrams(s, n)
            if code_quirk and grams:
                grams = grams[:-1]
            uniq += len(set(grams))
            total += len(grams)
        rep = 100.0 * (1.0 - uniq / total) if total else 0.0
        out[f"simctg_rep_{n}{suffix}"] = rep
        div *= 1.0 - rep / 100.0
    out[f"simctg_diversity{suffix}"] = div
    return out


def teacher_forced(
    gold: Sequence[Sequence[Token]], pred: Sequence[Sequence[Token]], windows: Iterable[int] = DEFAULT_REP_L
) -> dict[str, float]:
    """WEL20a teacher-forced metrics, pooled over all positions of all sequences.

    ``pred[t]`` is the argmax prediction for position t given the gold prefix; the window of
    position t is the previous ℓ gold tokens ``gold[t−ℓ:t]`` (``repeat_at_1``).
    ``rep_l{ℓ} = Σ 1[ŷ_t ∈ window] / N``; ``wrep_l{ℓ} = Σ 1[ŷ_t ≠ x_t]·1[ŷ_t ∈ window] / N`` (all
    positions in N, not only the wrong ones); ``uniq`` = #distinct ŷ; ``acc`` = mean 1[ŷ_t = x_t].
    """
    windows = tuple(int(w) for w in windows)
    n_pos = 0
    rep = {w: 0 for w in windows}
    wrep = {w: 0 for w in windows}
    correct = 0
    uniq: set = set()
    for k, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"gold and pred of sequence {k} differ in length ({len(g)} vs {len(p)})")
        for t, (x, y) in enumerate(zip(g, p)):
            n_pos += 1
            uniq.add(y)
            ok = x == y
            correct += ok
            for w in windows:
                if y in g[max(0, t - w): t]:
                    rep[w] += 1
                    if not ok:
                        wrep[w] += 1
    out: dict[str, float] = {}
    for w in windows:
        out[f"rep_l{w}"] = rep[w] / n_pos if n_pos else 0.0
        out[f"wrep_l{w}"] = wrep[w] / n_pos if n_pos else 0.0
    out["uniq"] = len(uniq)
    out["acc"] = correct / n_pos if n_pos else 0.0
    return out


def xu22(probs: Sequence[Any], is_argmax: Sequence[Any] | None = None) -> dict[str, list[float]]:
    """XU22 TP / IP / WR per repetition index n = 1..N, averaged over sentences.

    ``probs[k]`` is an ``(N+1) × L_s`` matrix for sentence k: ``probs[k][n][l] = p(x_{n,l} | x_{<n,l})``
    (teacher-forced on the sentence repeated N+1 times); ``is_argmax[k][n][l]`` says whether
    ``x_{n,l}`` was the model's argmax. ``TP(n) = mean_l p``, ``IP(n) = mean_l 1[p_{n,l} > p_{0,l}]``,
    ``WR(n) = mean_l 1[p_{n,l} > p_{0,l} and is_argmax]``. Sentences with fewer repetitions
    contribute to the indices they have.
    """
    sums: dict[str, list[float]] = {"TP": [], "IP": [], "WR": []}
    counts: list[int] = []
    for k, pm in enumerate(probs):
        P = np.asarray(pm, dtype=np.float64)
        if P.ndim != 2 or P.shape[0] < 2 or P.shape[1] < 1:
            raise ValueError(f"probs of sentence {k} must be an (N+1) x L_s matrix with N >= 1")
        A = None
        if is_argmax is not None:
            A = np.asarray(is_argmax[k], dtype=bool)
            if A.shape != P.shape:
                raise ValueError(f"is_argmax of sentence {k} has shape {A.shape}, probs has {P.shape}")
        up = P[1:] > P[0][None, :]
        tp = P[1:].mean(axis=1)
        ip = up.mean(axis=1)
        wr = (up & A[1:]).mean(axis=1) if A is not None else None
        for n in range(P.shape[0] - 1):
            if n >= len(counts):
                counts.append(0)
                for key in sums:
                    sums[key].append(0.0)
            counts[n] += 1
            sums["TP"][n] += float(tp[n])
            sums["IP"][n] += float(ip[n])
            if wr is not None:
                sums["WR"][n] += float(wr[n])
    out = {key: [v / c for v, c in zip(vals, counts)] for key, vals in sums.items()}
    if is_argmax is None:
        del out["WR"]
    return out


# --------------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------------


def _as_units(sequences: Sequence[Any], unit: str) -> list[Sequence[Token]]:
    if unit not in ("token", "word"):
        raise ValueError(f"unit must be 'token' or 'word', got {unit!r}")
    out: list[Sequence[Token]] = []
    for s in sequences:
        if isinstance(s, str):
            if unit != "word":
                raise ValueError("a text was given with unit='token': tokenize it first or use unit='word'")
            out.append(s.split())
        elif isinstance(s, np.ndarray):
            out.append([_plain(t) for t in s.tolist()])
        else:
            out.append(list(s))
    return out


def per_sequence_metrics(
    sequences: Sequence[Any],
    *,
    unit: str = "token",
    windows: Iterable[int] = DEFAULT_WINDOWS,
    sentence_end: Iterable[Token] = SENTENCE_END,
    dot: Token = ".",
    loop_options: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Per-sequence values of the sequence-level metrics, as float64 arrays of length N.

    Keys: ``rep_w{w}``, ``rep_r``, ``seq_rep_pooled_1_4``, ``seq_rep_1..4`` (NaN where ``L < n``),
    ``rep_sen``, ``rep_sen_ditto_code``, ``loop_onset`` (NaN without a loop), ``loop_period`` (NaN),
    ``looping`` (0/1), ``length``. Standard errors: :func:`standard_errors`.
    """
    seqs = _as_units(sequences, unit)
    windows = tuple(int(w) for w in windows)
    opts = dict(loop_options or {})
    N = len(seqs)
    out: dict[str, np.ndarray] = {f"rep_w{w}": np.zeros(N) for w in windows}
    for key in ("rep_r", "seq_rep_pooled_1_4", "seq_rep_1", "seq_rep_2", "seq_rep_3", "seq_rep_4",
                "rep_sen", "rep_sen_ditto_code", "loop_onset", "loop_period", "looping", "length"):
        out[key] = np.zeros(N)
    for i, s in enumerate(seqs):
        for w in windows:
            out[f"rep_w{w}"][i] = rep_w(s, w)
        out["rep_r"][i] = rep_r(s)
        out["seq_rep_pooled_1_4"][i] = seq_rep_pooled(s)
        for n in range(1, 5):
            v = seq_rep_n(s, n)
            out[f"seq_rep_{n}"][i] = np.nan if v is None else v
        out["rep_sen"][i] = rep_sen(s, sentence_end)
        out["rep_sen_ditto_code"][i] = rep_sen_ditto_code(s, dot)
        loop = find_loop(s, **opts)
        out["loop_onset"][i] = np.nan if loop is None else loop.start
        out["loop_period"][i] = np.nan if loop is None else loop.period
        out["looping"][i] = 0.0 if loop is None else 1.0
        out["length"][i] = len(s)
    return out


def _nanmean(a: np.ndarray) -> float | None:
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else None


def standard_errors(per_sequence: Mapping[str, np.ndarray]) -> dict[str, float | None]:
    """``se = std(ddof=1) / sqrt(n)`` over the sequences that have a value (NaN left out)."""
    out: dict[str, float | None] = {}
    for key, arr in per_sequence.items():
        a = np.asarray(arr, dtype=np.float64)
        a = a[~np.isnan(a)]
        out[key] = float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else None
    return out


def compute_metrics(
    sequences: Sequence[Any],
    *,
    unit: str = "token",
    windows: Iterable[int] = DEFAULT_WINDOWS,
    window: int | None = None,
    terminated: Sequence[bool] | None = None,
    gold: Sequence[Sequence[Token]] | None = None,
    pred: Sequence[Sequence[Token]] | None = None,
    rep_l_windows: Iterable[int] = DEFAULT_REP_L,
    probs: Sequence[Any] | None = None,
    is_argmax: Sequence[Any] | None = None,
    sentence_end: Iterable[Token] = SENTENCE_END,
    dot: Token = ".",
    loop_options: Mapping[str, Any] | None = None,
    per_sequence: bool = False,
) -> dict[str, Any]:
    """All metrics of spec §9 on ``sequences`` (token lists, or texts split into words), keys of §9.7.

    ``terminated[i]`` says whether sequence i ended in ``<eos>`` (without it ``nonterminated`` is
    ``None``); ``gold``/``pred`` add the teacher-forced WEL20a keys, ``probs``/``is_argmax`` add
    XU22's ``TP``/``IP``/``WR``. For int tokens, ``sentence_end`` and ``dot`` should name the token
    ids of ``.``/``!``/``?`` and ``.``. With ``per_sequence=True`` the result also holds
    ``"per_sequence"`` (arrays of :func:`per_sequence_metrics`) and ``"stderr"``.
    """
    if window is not None:
        windows = (window,)
    seqs = _as_units(sequences, unit)
    per = per_sequence_metrics(seqs, unit=unit, windows=windows, sentence_end=sentence_end, dot=dot,
                               loop_options=loop_options)
    N = len(seqs)
    m: dict[str, Any] = {}
    for w in windows:
        m[f"rep_w{int(w)}"] = float(per[f"rep_w{int(w)}"].mean()) if N else 0.0
    for key in ("rep_r", "seq_rep_pooled_1_4", "rep_sen", "rep_sen_ditto_code", "length"):
        m[key] = float(per[key].mean()) if N else 0.0
    for n in range(1, 5):
        v = _nanmean(per[f"seq_rep_{n}"])
        m[f"seq_rep_{n}"] = 0.0 if v is None else v
        m[f"seq_rep_{n}_excluded"] = int(np.isnan(per[f"seq_rep_{n}"]).sum())
    m["uniq_seq"] = uniq_seq(seqs)
    m.update(simctg_rep(seqs))
    m.update(simctg_rep(seqs, code_quirk=True))
    m["loop_onset"] = _nanmean(per["loop_onset"])
    m["loop_fraction"] = float(per["looping"].mean()) if N else 0.0
    if terminated is not None:
        term = list(terminated)
        if len(term) != N:
            raise ValueError(f"terminated has {len(term)} entries for {N} sequences")
        m["nonterminated"] = float(np.mean([not bool(t) for t in term])) if N else 0.0
    else:
        m["nonterminated"] = None
    if gold is not None or pred is not None:
        if gold is None or pred is None:
            raise ValueError("the teacher-forced metrics need both gold and pred")
        m.update(teacher_forced(gold, pred, rep_l_windows))
    if probs is not None:
        m.update(xu22(probs, is_argmax))
    if per_sequence:
        m["per_sequence"] = per
        m["stderr"] = standard_errors(per)
    return m


# --------------------------------------------------------------------------------------------------
# `repdiag metrics FILE`
# --------------------------------------------------------------------------------------------------


def _bad(message: str) -> Exception:
    from .errors import BadInputError

    return BadInputError(message)


def _read_lines(path: Path) -> list[str]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise _bad(f"file {str(path)!r} does not exist: check the path") from None
    except IsADirectoryError:
        raise _bad(f"{str(path)!r} is a folder, not a file") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise _bad(f"{path}: line {line} is not UTF-8 text") from None
    return text.splitlines()


def _tokenize(tokenizer: Any, text: str) -> list[Any]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(tokenizer.convert_ids_to_tokens(ids))


def score_file(path: str | Path, *, unit: str | None = None, tokenizer: Any = None) -> dict[str, Any]:
    """Score the generations in ``path`` (the input of ``repdiag metrics``, spec §9.7).

    JSONL (a ``.jsonl``/``.json``/``.ndjson`` name, or a first non-empty line starting with ``{``): one object a line with ``tokens`` (a list
    of strings or ints) or ``text`` (whitespace words, or model tokens with ``tokenizer``); optional
    ``gold`` and ``pred`` (teacher-forced WEL20a), ``probs`` and ``is_argmax`` (XU22) and
    ``terminated`` (bool). Otherwise plain text, one generation a line. Returns
    ``{"unit", "n_sequences", "metrics"}``; bad input raises ``BadInputError`` naming the line.
    """
    path = Path(path)
    if unit not in (None, "token", "word"):
        raise _bad(f"unknown unit {unit!r}: choose token or word")
    lines = _read_lines(path)
    numbered = [(i + 1, ln) for i, ln in enumerate(lines) if ln.strip()]
    if not numbered:
        raise _bad(f"{path} holds no generation: give one JSON object or one text a line")
    is_jsonl = numbered[0][1].lstrip().startswith("{") or path.suffix.lower() in (".jsonl", ".json", ".ndjson")
    seqs: list[list[Any]] = []
    gold: list[list[Any]] = []
    pred: list[list[Any]] = []
    probs: list[Any] = []
    is_argmax: list[Any] = []
    terminated: list[bool] = []
    has_tokens = has_text = False
    if unit == "token" and tokenizer is None and not is_jsonl:
        raise _bad("unit 'token' on plain text needs --model (a tokenizer); use --unit word")
    for lineno, ln in numbered:
        if not is_jsonl:
            seqs.append(_tokenize(tokenizer, ln) if tokenizer is not None and unit != "word" else ln.split())
            has_text = True
            continue
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as exc:
            raise _bad(f"{path}: line {lineno} is not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise _bad(f"{path}: line {lineno} must be a JSON object with a 'tokens' or 'text' field")
        if "tokens" in obj:
            toks = obj["tokens"]
            if not isinstance(toks, list) or not all(
                isinstance(t, str) or (isinstance(t, int) and not isinstance(t, bool)) for t in toks
            ):
                raise _bad(f"{path}: line {lineno}: 'tokens' must be a list of strings or integers")
            if unit == "word":
                toks = " ".join(str(t) for t in toks).split()
            seqs.append(toks)
            has_tokens = True
        elif "text" in obj:
            text = obj["text"]
            if not isinstance(text, str):
                raise _bad(f"{path}: line {lineno}: 'text' must be a string")
            if unit == "token" and tokenizer is None:
                raise _bad(f"{path}: line {lineno}: 'text' with unit 'token' needs --model (a tokenizer)")
            seqs.append(_tokenize(tokenizer, text) if tokenizer is not None and unit != "word" else text.split())
            has_text = True
        else:
            raise _bad(f"{path}: line {lineno} has neither a 'tokens' nor a 'text' field")
        for key, store in (("gold", gold), ("pred", pred)):
            if key in obj:
                v = obj[key]
                if not isinstance(v, list):
                    raise _bad(f"{path}: line {lineno}: '{key}' must be a list")
                store.append(v)
        if ("gold" in obj) != ("pred" in obj):
            raise _bad(f"{path}: line {lineno}: 'gold' and 'pred' must be given together")
        if "gold" in obj and len(obj["gold"]) != len(obj["pred"]):
            raise _bad(f"{path}: line {lineno}: 'gold' and 'pred' differ in length")
        if "probs" in obj:
            try:
                P = np.asarray(obj["probs"], dtype=np.float64)
            except (TypeError, ValueError):
                raise _bad(f"{path}: line {lineno}: 'probs' must be a matrix of numbers") from None
            if P.ndim != 2 or P.shape[0] < 2:
                raise _bad(f"{path}: line {lineno}: 'probs' must be an (N+1) x L matrix with N >= 1")
            probs.append(P)
            if "is_argmax" in obj:
                A = np.asarray(obj["is_argmax"])
                if A.shape != P.shape:
                    raise _bad(f"{path}: line {lineno}: 'is_argmax' must have the shape of 'probs'")
                is_argmax.append(A.astype(bool))
            elif is_argmax:
                raise _bad(f"{path}: line {lineno}: 'is_argmax' is missing (other lines have it)")
        if "terminated" in obj:
            if not isinstance(obj["terminated"], bool):
                raise _bad(f"{path}: line {lineno}: 'terminated' must be true or false")
            terminated.append(obj["terminated"])
    if gold and len(gold) != len(seqs):
        raise _bad(f"{path}: 'gold'/'pred' are given on {len(gold)} of {len(seqs)} lines: give them on all or none")
    if terminated and len(terminated) != len(seqs):
        raise _bad(f"{path}: 'terminated' is given on {len(terminated)} of {len(seqs)} lines: all or none")
    if is_argmax and len(is_argmax) != len(probs):
        raise _bad(f"{path}: 'is_argmax' is given on {len(is_argmax)} of {len(probs)} lines with 'probs'")
    if unit is None:
        unit = "token" if (has_tokens or tokenizer is not None) and not (has_text and tokenizer is None) else "word"
    metrics = compute_metrics(
        seqs,
        unit="token",  # already split
        terminated=terminated or None,
        gold=gold or None,
        pred=pred or None,
        probs=probs or None,
        is_argmax=is_argmax or None,
    )
    return {"unit": unit, "n_sequences": len(seqs), "metrics": metrics}
