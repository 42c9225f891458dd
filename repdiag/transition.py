"""The token-transition matrix of a model, its builders (probe, trace, k-gram states) and its file format.

Spec: ``shared/spec/repetition-theory.md`` §1–§2 (notation, builders, truncated storage) and §7.1
(the chain-simulation predictor steps the k-gram chain built here).

States
------
A state is the last ``k`` tokens (``k = order``). The first ``vocab_size`` states are always the
1-gram states, **state id = token id** (so for ``order=1`` the matrix is the plain token matrix and
``eos_index == eos_token_id``). Higher-order states (the k-gram contexts actually visited by a trace)
follow; ``state_tokens`` holds each state's tokens left-padded with ``-1``. The chain moves from a
state with tokens ``(…, b)`` on token ``c`` to the longest existing state whose tokens are a suffix of
``(…, b, c)`` (back-off to shorter contexts; the 1-gram state ``c`` always exists). ``<eos>`` is the
single absorbing state ``eos_index`` (no longer context ends in ``<eos>``).

Storage
-------
Sparse CSR (float64 data, the top-``K`` entries per row, the ``<eos>`` column always stored
explicitly) plus each row's residual mass ``r_i = 1 − Σ stored``, modelled as spread uniformly over the
row's unstored non-``<eos>`` tokens (spec §2.3, ambiguity A3); dense ``(N, N)`` when the state set is
small and rows are complete. For ``order=1`` "unstored tokens" are exactly the unstored non-``<eos>``
columns of the spec; for ``order ≥ 2`` each unstored token is mapped to its back-off successor state.

Stepping the chain (for ``repdiag.simulate``)
---------------------------------------------
:meth:`TransitionMatrix.next_distribution` takes a ``(B, w)`` int array of the last ``w`` tokens of
``B`` trajectories (``-1`` = no token, left padding) and returns the dense ``(B, vocab_size)`` float64
next-token distribution in **token-id space** (``<eos>`` at its own token id, the residual spread
uniformly), ready to be turned into scores for Hugging Face logits processors;
:meth:`next_logprobs` is its log (``-inf`` where 0). :meth:`row_for_context` gives one context's
stored entries.

File format (``.npz``, ``allow_pickle=False``): ``format_version``, ``data``, ``indices``, ``indptr``,
``shape``, ``residual``, ``eos_index``, ``state_tokens``, ``meta_json``; optional ``row_source``
(int8: 0 missing, 1 trace, 2 probe, 3 absorbing ``<eos>``), ``visits`` (int64), ``row_logit_shift``
(float64, NaN where unknown). A dense ``.npy`` in the spec layout (``<eos>`` last) is accepted by
:func:`load_matrix`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

import numpy as np
import scipy.sparse as sp

from .errors import MatrixFormatError, UsageError
from .models import forward_accepts

if TYPE_CHECKING:  # pragma: no cover
    from .models import LoadedModel

__all__ = [
    "FORMAT_VERSION",
    "BUILTIN_PROMPTS",
    "ROW_MISSING",
    "ROW_TRACE",
    "ROW_PROBE",
    "ROW_ABSORBING",
    "TransitionMatrix",
    "ContextRow",
    "build_matrix",
    "build_probe",
    "build_trace",
    "fill_rows",
    "ProbePrompts",
    "first_step_logits",
    "load_matrix",
    "prompts_fingerprint",
    "read_prompts",
]

FORMAT_VERSION = 1
#: sums of a row (stored + residual) may deviate from 1 by this much in a file before it is refused.
ROW_SUM_TOL = 1e-6
#: row provenance codes (``TransitionMatrix.row_source``).
ROW_MISSING, ROW_TRACE, ROW_PROBE, ROW_ABSORBING = 0, 1, 2, 3
TRACE_LOGITS_BYTES = 2**28  # the trace's teacher-forced pass runs in sub-batches of at most this many logit bytes
_SOURCE_NAMES = {ROW_MISSING: "missing", ROW_TRACE: "trace", ROW_PROBE: "probe", ROW_ABSORBING: "absorbing"}
#: state sets up to this size with complete rows are stored dense.
DENSE_MAX_STATES = 2048
#: vocabularies up to this size keep complete rows when no ``top_k`` is given.
FULL_ROWS_MAX_VOCAB = 1024
DEFAULT_TOP_K = 64
#: the trace accumulates complete float64 rows (exact) up to this vocabulary size, else top-4K rows.
TRACE_DENSE_MAX_VOCAB = 1024

#: encoder inputs / decoder-only contexts used when the caller gives no prompts (generic, short).
BUILTIN_PROMPTS: tuple[str, ...] = (
    "Once upon a time there was a little girl.",
    "The weather today is",
    "summarize: The committee met on Monday to discuss the budget for next year.",
    "translate English to German: The house is wonderful.",
    "He opened the door and saw",
    "The results of the study show that",
    "She said that she would come back tomorrow.",
    "In the beginning,",
)


class ContextRow(NamedTuple):
    """One context's next-token row in token-id space (see :meth:`TransitionMatrix.row_for_context`)."""

    state: int  # the (backed-off) state the context maps to
    tokens: np.ndarray  # (K,) int64 token ids of the stored entries
    probs: np.ndarray  # (K,) float64 their probabilities
    residual: float  # mass spread uniformly over the other non-eos tokens


# --------------------------------------------------------------------------------------------------
# The matrix
# --------------------------------------------------------------------------------------------------


@dataclass
class TransitionMatrix:
    """A row-stochastic matrix over states (tokens or k-gram contexts) with an absorbing ``<eos>``.

    ``matrix`` is ``(N, N)`` float64, dense ``np.ndarray`` or ``scipy.sparse.csr_matrix`` of the stored
    entries; ``residual[i]`` is the mass of row ``i`` that is not stored (0 for complete rows).
    """

    matrix: np.ndarray | sp.csr_matrix
    residual: np.ndarray
    eos_index: int
    state_tokens: np.ndarray
    meta: dict = field(default_factory=dict)
    row_logit_shift: np.ndarray | None = None
    row_source: np.ndarray | None = None  # (N,) int8, ROW_* codes; None = all rows built
    visits: np.ndarray | None = None  # (N,) int64 trace steps per state; None for a probe
    per_prompt: list["TransitionMatrix"] | None = None  # probe with several prompts, keep_per_prompt=True
    sequences: list[dict] | None = None  # trace: {"mode", "prompt_index", "tokens"} per decoded prompt (not saved)
    #: encoder-decoder trace: the mean first-step distribution p(y_1 | [start], x) over the trace prompts and
    #: its mean log-normaliser; the decoder start token is no real history, so the chain starts here
    start_row: np.ndarray | None = None
    start_logit_shift: float | None = None
    _lookup: tuple | None = field(default=None, init=False, repr=False, compare=False)

    # ---- basic facts -------------------------------------------------------------------------
    @property
    def n_states(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def order(self) -> int:
        return int(self.state_tokens.shape[1])

    @property
    def vocab_size(self) -> int:
        """Size of the token-id space (the LM head's output size)."""
        return int(self.meta.get("vocab_size", self.n_states))

    @property
    def eos_token_id(self) -> int:
        return int(self.state_tokens[self.eos_index, -1])

    @property
    def is_dense(self) -> bool:
        return isinstance(self.matrix, np.ndarray)

    @property
    def nnz(self) -> int:
        return int(np.count_nonzero(self.matrix)) if self.is_dense else int(self.matrix.nnz)

    @property
    def visited(self) -> np.ndarray:
        """(N,) bool: rows built from trace steps."""
        if self.row_source is None:
            return np.zeros(self.n_states, dtype=bool)
        return self.row_source == ROW_TRACE

    @property
    def missing(self) -> np.ndarray:
        """(N,) bool: rows neither traced nor probed (stored as uniform placeholders: residual 1)."""
        if self.row_source is None:
            return np.zeros(self.n_states, dtype=bool)
        return self.row_source == ROW_MISSING

    def csr(self) -> sp.csr_matrix:
        """The stored entries as CSR (a copy for dense storage)."""
        if self.is_dense:
            return sp.csr_matrix(self.matrix)
        return self.matrix

    def row_sums(self) -> np.ndarray:
        """Stored mass + residual per row (1 up to rounding)."""
        stored = self.matrix.sum(axis=1) if self.is_dense else np.asarray(self.matrix.sum(axis=1)).ravel()
        return np.asarray(stored, dtype=np.float64).ravel() + self.residual

    def state_label(self, state: int, tokenizer: Any = None) -> str:
        """The state's tokens as text (pieces joined by ``|``), or ids when no tokenizer is given."""
        toks = [int(t) for t in self.state_tokens[state] if t >= 0]
        if tokenizer is None:
            return "|".join(str(t) for t in toks)
        return "|".join(str(tokenizer.convert_ids_to_tokens(t)) for t in toks)

    # ---- k-gram bookkeeping ------------------------------------------------------------------
    def _keys(self) -> tuple[np.ndarray, np.ndarray, int]:
        if self._lookup is None:
            base = self.vocab_size + 1
            keys = _context_keys(self.state_tokens, base)
            order = np.argsort(keys, kind="stable")
            self._lookup = (keys[order], order.astype(np.int64), base)
        return self._lookup

    def lookup_states(self, contexts: np.ndarray) -> np.ndarray:
        """Map ``(B, w)`` token contexts (``-1`` = none, left-padded) to state ids, backing off.

        The longest suffix (≤ ``order`` tokens) that is a state wins; a context whose last token is
        ``<eos>`` maps to ``eos_index``. Raises :class:`UsageError` for an empty context or a token
        outside ``[0, vocab_size)``.
        """
        ctx = np.asarray(contexts, dtype=np.int64)
        if ctx.ndim == 1:
            ctx = ctx[None, :]
        k = self.order
        if ctx.shape[1] < k:
            ctx = np.concatenate([np.full((ctx.shape[0], k - ctx.shape[1]), -1, np.int64), ctx], axis=1)
        ctx = ctx[:, -k:]
        last = ctx[:, -1]
        if ctx.size and (last.min(initial=0) < 0 or ctx.max(initial=-1) >= self.vocab_size):
            raise UsageError(
                "a context for the transition matrix is empty or holds a token outside the vocabulary "
                f"[0, {self.vocab_size}): pass at least one real token per row"
            )
        skeys, sorder, base = self._keys()
        out = np.full(ctx.shape[0], -1, dtype=np.int64)
        # a token after a -1 is a fresh start: drop everything left of the last -1
        valid = np.ones_like(ctx, dtype=bool)
        for j in range(k - 1, -1, -1):
            if j < k - 1:
                valid[:, j] = valid[:, j + 1] & (ctx[:, j] >= 0)
            else:
                valid[:, j] = ctx[:, j] >= 0
        for length in range(k, 0, -1):
            sub = ctx[:, k - length:]
            ok = valid[:, k - length] & (out < 0)
            if not ok.any():
                continue
            keys = _context_keys(sub[ok], base)
            pos = np.searchsorted(skeys, keys)
            pos_c = np.minimum(pos, len(skeys) - 1)
            hit = skeys[pos_c] == keys
            idx = np.flatnonzero(ok)
            out[idx[hit]] = sorder[pos_c[hit]]
        out[last == self.eos_token_id] = self.eos_index
        return out

    def successor_states(self, states: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """The state reached from ``states[m]`` on ``tokens[m]`` (elementwise, with back-off)."""
        states = np.asarray(states, dtype=np.int64)
        tokens = np.asarray(tokens, dtype=np.int64)
        if self.order == 1:
            return tokens.copy()
        ctx = np.concatenate([self.state_tokens[states][:, 1:], tokens[:, None]], axis=1)
        return self.lookup_states(ctx)

    # ---- token-space rows (the simulator's view) ---------------------------------------------
    def _state_token_rows(self, states: np.ndarray, columns: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Dense (B, C) stored probabilities in token space and the (B, C) 'stored' mask.

        ``C`` is the vocabulary, or the sorted token ids ``columns`` (stored entries outside them are left out).
        """
        col_tok = self.state_tokens[:, -1]
        B = len(states)
        if columns is None:
            position = None
            width = self.vocab_size
        else:
            position = np.full(self.vocab_size, -1, dtype=np.int64)
            position[columns] = np.arange(len(columns))
            width = len(columns)
        out = np.zeros((B, width), dtype=np.float64)
        mask = np.zeros((B, width), dtype=bool)
        if self.is_dense:
            rows = self.matrix[states]
            r_idx, c_idx = np.nonzero(rows)  # dense: the non-zero entries count as stored
            values = rows[r_idx, c_idx]
        else:
            sub = self.matrix[states]
            r_idx = np.repeat(np.arange(B), np.diff(sub.indptr))
            c_idx, values = sub.indices, sub.data
        toks = col_tok[c_idx]
        if position is not None:
            toks = position[toks]
            inside = toks >= 0
            r_idx, toks, values = r_idx[inside], toks[inside], values[inside]
        np.add.at(out, (r_idx, toks), values)
        mask[r_idx, toks] = True
        return out, mask

    def support(self, states: np.ndarray | None = None) -> np.ndarray:
        """Sorted token ids of every stored entry, and ``<eos>``: the tokens the chain can emit without its residual.

        ``states``: of these rows' stored entries only (and ``<eos>``).
        """
        C = self.csr()
        indices = C.indices if states is None else C[np.asarray(states, dtype=np.int64)].indices
        return np.union1d(self.state_tokens[:, -1][indices], [self.eos_token_id]).astype(np.int64)

    def next_distribution(self, contexts: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
        """Dense ``(B, vocab_size)`` float64 next-token distributions for ``(B, w)`` contexts.

        Each context is mapped to its state by :meth:`lookup_states` (back-off); the row is read in
        token-id space with ``<eos>`` at its own token id and the residual spread uniformly over the
        unstored non-``<eos>`` tokens. Rows sum to 1. This is what the chain simulator (spec §7.1)
        calls once per step; ``torch.from_numpy(np.log(p))`` gives the scores for HF processors.

        With ``columns`` (sorted token ids, e.g. :meth:`support`) the result is ``(B, len(columns))``
        and holds each row's **stored entries only** (not renormalised; the residual is left out), except
        that a missing row (nothing stored) is uniform over the non-``<eos>`` columns: the simulator's
        view of a large vocabulary, where a dense ``(B, vocab_size)`` array per step would not fit the
        time (see ``simulate.simulate_chain``'s ``vocabulary``).
        """
        return self.state_distribution(self.lookup_states(contexts), columns)

    def state_distribution(self, states: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
        """:meth:`next_distribution` of state ids already looked up."""
        out, mask = self._state_token_rows(states, columns)
        res = self.residual[states]
        if columns is not None:
            empty = ~mask.any(axis=1)
            if empty.any():
                free = np.asarray(columns) != self.eos_token_id
                out[empty] = np.where(free, 1.0 / max(int(free.sum()), 1), 0.0)
            return out
        if np.any(res > 0):
            eos = self.eos_token_id
            mask[:, eos] = True
            free = (~mask).sum(axis=1)
            share = np.where(free > 0, res / np.maximum(free, 1), 0.0)
            out += np.where(mask, 0.0, share[:, None])
            # a row whose every token is stored keeps its residual unplaced: fold it into eos-free renorm
            lost = (free == 0) & (res > 0)
            if lost.any():
                out[lost] /= out[lost].sum(axis=1, keepdims=True)
        return out

    def next_logprobs(self, contexts: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
        """``log`` of :meth:`next_distribution` (``-inf`` where the probability is 0)."""
        p = self.next_distribution(contexts, columns)
        return np.log(p, out=np.full_like(p, -np.inf), where=p > 0)  # -inf where p = 0, no warning

    def state_logits(self, states: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
        """:meth:`next_logits` of state ids already looked up (one lookup per simulated step)."""
        p = self.state_distribution(states, columns)
        out = np.log(p, out=np.full_like(p, -np.inf), where=p > 0)
        if self.row_logit_shift is not None:
            out += np.nan_to_num(self.row_logit_shift[states], nan=0.0)[:, None]
        return out

    def next_logits(self, contexts: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
        """Logit-scale scores ``log p + c_s`` (``c_s`` = :attr:`row_logit_shift`, 0 where unknown).

        Softmax-equivalent to :meth:`next_logprobs`; the shift matters only to processors that look at
        the sign or scale of a logit (repetition penalty's sign rule). ``c_s`` is exact for a
        single-prompt probe row and the mean log-normaliser of the steps (trace) or prompts (probe
        mean) otherwise. ``columns``: as in :meth:`next_distribution`.
        """
        return self.state_logits(self.lookup_states(contexts), columns)

    def start_logits(self) -> np.ndarray | None:
        """Logit-scale scores of the first decoding step of an encoder-decoder model (``None`` if unknown).

        ``log start_row + start_logit_shift``: what the chain simulator uses for step 1, whose only
        history is the decoder start token (not a token of the chain).
        """
        if self.start_row is None:
            return None
        with np.errstate(divide="ignore"):
            return np.log(self.start_row) + (self.start_logit_shift or 0.0)

    def row_for_context(self, tokens: Sequence[int] | np.ndarray) -> ContextRow:
        """One context's state and its stored entries in token space (sorted by token id)."""
        state = int(self.lookup_states(np.asarray(tokens, dtype=np.int64)[None, :])[0])
        col_tok = self.state_tokens[:, -1]
        if self.is_dense:
            row = self.matrix[state]
            cols = np.flatnonzero(row) if self.order > 1 else np.arange(len(row))
            toks, probs = col_tok[cols], row[cols]
        else:
            lo, hi = self.matrix.indptr[state], self.matrix.indptr[state + 1]
            toks, probs = col_tok[self.matrix.indices[lo:hi]], self.matrix.data[lo:hi]
        order = np.argsort(toks, kind="stable")
        return ContextRow(state, toks[order].astype(np.int64), probs[order].astype(np.float64),
                          float(self.residual[state]))

    # ---- dense views -------------------------------------------------------------------------
    def to_dense(self) -> np.ndarray:
        """``(N, N)`` float64 with each row's residual spread uniformly over its unstored non-eos tokens.

        For ``order=1`` these are the unstored non-eos columns (spec §2.3); for ``order ≥ 2`` each
        unstored token is sent to its back-off successor state.
        """
        N = self.n_states
        if N > 50_000:
            raise UsageError(f"to_dense() of a {N}-state matrix would need {N * N * 8 / 2**30:.0f} GiB: use csr()")
        dense = np.array(self.matrix, dtype=np.float64, copy=True) if self.is_dense else self.matrix.toarray()
        rows = np.flatnonzero(self.residual > 0)
        if len(rows) == 0:
            return dense
        eos = self.eos_index
        if self.order == 1:
            stored = np.zeros((len(rows), N), dtype=bool)
            if self.is_dense:
                stored = self.matrix[rows] != 0
            else:
                sub = self.matrix[rows]
                stored[np.repeat(np.arange(len(rows)), np.diff(sub.indptr)), sub.indices] = True
            stored[:, eos] = True
            free = (~stored).sum(axis=1)
            share = np.where(free > 0, self.residual[rows] / np.maximum(free, 1), 0.0)
            dense[rows] += np.where(stored, 0.0, share[:, None])
            return dense
        # order >= 2: token space, then map every token to the successor state
        _, mask = self._state_token_rows(rows)
        mask[:, self.eos_token_id] = True
        free = (~mask).sum(axis=1)
        share = np.where(free > 0, self.residual[rows] / np.maximum(free, 1), 0.0)
        for m, s in enumerate(rows):
            toks = np.flatnonzero(~mask[m])
            if len(toks) == 0:
                continue
            succ = self.successor_states(np.full(len(toks), s), toks)
            np.add.at(dense[s], succ, share[m])
        return dense

    def spec_layout(self, dense: bool | None = None) -> tuple[np.ndarray | sp.csr_matrix, np.ndarray]:
        """``(A, perm)`` with ``<eos>`` moved last: ``A = M[perm][:, perm]``, ``perm[new] = old``.

        ``A`` is :meth:`to_dense` (residual spread) when ``dense`` (default: ``N ≤ 4096``), else the
        stored CSR entries (the residual is then ``self.residual[perm]``).
        """
        N = self.n_states
        perm = np.concatenate([np.delete(np.arange(N), self.eos_index), [self.eos_index]]).astype(np.int64)
        if dense is None:
            dense = N <= 4096
        if dense:
            D = self.to_dense()
            return D[np.ix_(perm, perm)], perm
        C = self.csr()
        return C[perm][:, perm].tocsr(), perm

    # ---- validation and files ----------------------------------------------------------------
    def validate(self, tol: float = ROW_SUM_TOL) -> None:
        """Raise :class:`MatrixFormatError` naming the first bad field or row."""
        _validate_parts(self.matrix, self.residual, self.eos_index, self.state_tokens, tol=tol)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the ``.npz`` file (atomically, no pickle); returns the path."""
        from ._atomic import atomic_path

        C = self.csr()
        C.sort_indices()
        n = self.n_states
        idx_dtype = np.int32 if n < 2**31 - 1 else np.int64
        self.meta["storage"] = "dense" if self.is_dense else "sparse"
        meta = dict(self.meta)
        arrays: dict[str, np.ndarray] = {
            "format_version": np.array(FORMAT_VERSION, dtype=np.int64),
            "data": np.asarray(C.data, dtype=np.float64),
            "indices": np.asarray(C.indices, dtype=idx_dtype),
            "indptr": np.asarray(C.indptr, dtype=np.int64),
            "shape": np.array(C.shape, dtype=np.int64),
            "residual": np.asarray(self.residual, dtype=np.float64),
            "eos_index": np.array(self.eos_index, dtype=np.int64),
            "state_tokens": np.asarray(self.state_tokens, dtype=np.int64),
            "meta_json": np.array(_dumps_meta(meta)),
        }
        if self.row_source is not None:
            arrays["row_source"] = np.asarray(self.row_source, dtype=np.int8)
        if self.visits is not None:
            arrays["visits"] = np.asarray(self.visits, dtype=np.int64)
        if self.row_logit_shift is not None:
            arrays["row_logit_shift"] = np.asarray(self.row_logit_shift, dtype=np.float64)
        target = Path(path)
        with atomic_path(target) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        return target

    def coverage(self) -> dict[str, Any]:
        return dict(self.meta.get("coverage", {}))

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary (``repdiag matrix show --format json``, the report's ``matrix`` section)."""
        res = self.residual
        info: dict[str, Any] = {
            "n_states": self.n_states,
            "order": self.order,
            "vocab_size": self.vocab_size,
            "eos_index": int(self.eos_index),
            "eos_token_id": self.eos_token_id,
            "storage": "dense" if self.is_dense else "sparse",
            "nnz": self.nnz,
            "residual": {"total": float(res.sum()), "mean": float(res.mean()) if len(res) else 0.0,
                         "max": float(res.max()) if len(res) else 0.0},
            "meta": self.meta,
        }
        if self.row_source is not None:
            info["rows"] = {name: int((self.row_source == code).sum()) for code, name in _SOURCE_NAMES.items()}
        return info


# --------------------------------------------------------------------------------------------------
# helpers: keys, meta, validation
# --------------------------------------------------------------------------------------------------


def _context_keys(tokens: np.ndarray, base: int) -> np.ndarray:
    """int64 key of each row of left-padded (-1) token contexts: Σ (t+1)·base^(k-1-j)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    k = tokens.shape[1]
    if k > 1 and math.log2(base) * k > 62:
        raise UsageError(f"order {k} is too high for a vocabulary of {base - 1}: use order ≤ {int(62 // math.log2(base))}")
    key = np.zeros(tokens.shape[0], dtype=np.int64)
    for j in range(k):
        key = key * base + (tokens[:, j] + 1)
    return key


def _dumps_meta(meta: dict) -> str:
    from ._atomic import dumps_json

    return dumps_json(meta, indent=None).strip()


def prompts_fingerprint(prompts: Sequence[str]) -> str:
    """sha256 (16 hex digits) of the prompt list, order included."""
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def _validate_parts(matrix, residual, eos_index, state_tokens, *, tol: float = ROW_SUM_TOL) -> None:
    if isinstance(matrix, np.ndarray):
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise MatrixFormatError(f"field 'shape': the matrix must be square (N, N), got {matrix.shape}")
        n = matrix.shape[0]
        bad_nan = ~np.isfinite(matrix).all(axis=1)
        if bad_nan.any():
            raise MatrixFormatError(f"row {int(np.argmax(bad_nan))} holds NaN or inf: rebuild the matrix")
        bad_neg = (matrix < 0).any(axis=1)
        if bad_neg.any():
            raise MatrixFormatError(f"row {int(np.argmax(bad_neg))} holds a negative entry: probabilities are ≥ 0")
        sums = matrix.sum(axis=1)
        eos_self = matrix[eos_index, eos_index] if 0 <= eos_index < n else None
    else:
        n = matrix.shape[0]
        if matrix.shape[0] != matrix.shape[1]:
            raise MatrixFormatError(f"field 'shape': the matrix must be square (N, N), got {matrix.shape}")
        row_of = np.repeat(np.arange(n), np.diff(matrix.indptr))
        bad = ~np.isfinite(matrix.data)
        if bad.any():
            raise MatrixFormatError(f"row {int(row_of[np.argmax(bad)])} holds NaN or inf: rebuild the matrix")
        bad = matrix.data < 0
        if bad.any():
            raise MatrixFormatError(f"row {int(row_of[np.argmax(bad)])} holds a negative entry: probabilities are ≥ 0")
        sums = np.asarray(matrix.sum(axis=1)).ravel()
        eos_self = matrix[eos_index, eos_index] if 0 <= eos_index < n else None
    residual = np.asarray(residual)
    if residual.shape != (n,):
        raise MatrixFormatError(f"field 'residual': expected shape ({n},), got {residual.shape}")
    bad = ~np.isfinite(residual)
    if bad.any():
        raise MatrixFormatError(f"row {int(np.argmax(bad))} has a NaN or inf residual: rebuild the matrix")
    bad = residual < -tol
    if bad.any():
        raise MatrixFormatError(f"row {int(np.argmax(bad))} has a negative residual mass {residual[np.argmax(bad)]:.3g}")
    if not (0 <= int(eos_index) < n):
        raise MatrixFormatError(f"field 'eos_index': {eos_index} is outside [0, {n})")
    st = np.asarray(state_tokens)
    if st.ndim != 2 or st.shape[0] != n or st.shape[1] < 1:
        raise MatrixFormatError(f"field 'state_tokens': expected shape ({n}, k), got {st.shape}")
    dev = np.abs(sums + residual - 1.0)
    bad = dev > tol
    if bad.any():
        i = int(np.argmax(bad))
        raise MatrixFormatError(
            f"row {i} sums to {sums[i] + residual[i]:.9g} (stored + residual), not 1: rows must be probability distributions"
        )
    if abs(float(eos_self) - 1.0) > tol:
        raise MatrixFormatError(f"row {int(eos_index)} (<eos>) is not absorbing: A(eos, eos) = {float(eos_self):.6g}, expected 1")


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------

_REQUIRED = ("format_version", "data", "indices", "indptr", "shape", "residual", "eos_index", "state_tokens", "meta_json")


def load_matrix(path: str | os.PathLike[str], eos_index: int | None = None) -> TransitionMatrix:
    """Read a repdiag ``.npz`` or a dense ``.npy`` (spec layout: ``<eos>`` last unless ``eos_index``).

    Raises :class:`MatrixFormatError` (one line naming the first bad field or row) for a missing or
    unreadable file, a pickle inside, a newer format version, NaN, negative entries, rows that do not
    sum to 1 (> 1e-6, residual included), or wrong shapes.
    """
    p = Path(path)
    if not p.exists():
        raise MatrixFormatError(f"matrix file {str(p)!r} does not exist: check the path")
    if p.is_dir():
        raise MatrixFormatError(f"matrix file {str(p)!r} is a folder, not a .npz or .npy file")
    with open(p, "rb") as fh:
        magic = fh.read(6)
    if magic.startswith(b"PK"):
        return _load_npz(p)
    if magic.startswith(b"\x93NUMPY"):
        return _load_npy(p, eos_index)
    raise MatrixFormatError(f"{p.name} is neither a repdiag .npz nor a numpy .npy file (pickles are not accepted)")


def _load_npy(p: Path, eos_index: int | None) -> TransitionMatrix:
    try:
        A = np.load(p, allow_pickle=False)
    except ValueError as exc:
        raise MatrixFormatError(f"{p.name} holds a pickled object array, which repdiag refuses to load: save a float array") from exc
    if A.dtype.kind not in "fiu":
        raise MatrixFormatError(f"{p.name}: a dense matrix must be a float array, got dtype {A.dtype}")
    if A.ndim != 2 or A.shape[0] != A.shape[1] or A.shape[0] < 1:
        raise MatrixFormatError(f"field 'shape': a dense matrix must be square (N, N), got {A.shape}")
    A = np.ascontiguousarray(A, dtype=np.float64)
    n = A.shape[0]
    eos = n - 1 if eos_index is None else int(eos_index)
    st = np.arange(n, dtype=np.int64)[:, None]
    residual = np.zeros(n)
    _validate_parts(A, residual, eos, st)
    meta = {"builder": "dense-npy", "source": str(p), "order": 1, "top_k": None, "policy": "raw",
            "vocab_size": n, "model_id": None, "revision": None, "tokenizer_fingerprint": None,
            "repdiag_version": _version()}
    return TransitionMatrix(A, residual, eos, st, meta)


def _load_npz(p: Path) -> TransitionMatrix:
    try:
        z = np.load(p, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise MatrixFormatError(f"{p.name} is not a readable .npz file: {' '.join(str(exc).split())[:120]}") from exc
    with z:
        names = set(z.files)
        for key in _REQUIRED:
            if key not in names:
                raise MatrixFormatError(f"field {key!r} is missing from {p.name}: not a repdiag matrix file")
        arrays: dict[str, np.ndarray] = {}
        for key in z.files:
            try:
                arrays[key] = z[key]
            except ValueError as exc:
                raise MatrixFormatError(f"field {key!r} of {p.name} holds a pickled object, which repdiag refuses to load") from exc
    try:
        version = int(arrays["format_version"])
    except (TypeError, ValueError) as exc:
        raise MatrixFormatError("field 'format_version' is not an integer") from exc
    if version > FORMAT_VERSION:
        raise MatrixFormatError(
            f"{p.name} has format version {version}, newer than this repdiag reads ({FORMAT_VERSION}): upgrade repdiag"
        )
    if version < 1:
        raise MatrixFormatError(f"field 'format_version': {version} is not a valid version")
    for key, kinds in (("data", "fiu"), ("indices", "iu"), ("indptr", "iu"), ("shape", "iu"), ("residual", "fiu"),
                       ("eos_index", "iu"), ("state_tokens", "iu")):
        if arrays[key].dtype.kind not in kinds:
            raise MatrixFormatError(f"field {key!r} has dtype {arrays[key].dtype}, expected a numeric array")
    shape = arrays["shape"]
    if shape.shape != (2,):
        raise MatrixFormatError(f"field 'shape' must hold two numbers, got {shape.tolist()}")
    n, m = (int(x) for x in shape)
    if n != m or n < 1:
        raise MatrixFormatError(f"field 'shape': the matrix must be square (N, N), got ({n}, {m})")
    data, indices, indptr = arrays["data"], arrays["indices"], arrays["indptr"]
    if data.ndim != 1 or indices.shape != data.shape:
        raise MatrixFormatError(f"field 'indices': {indices.shape} entries for {data.shape} values")
    if indptr.shape != (n + 1,):
        raise MatrixFormatError(f"field 'indptr': expected {n + 1} entries for {n} rows, got {indptr.shape[0] if indptr.ndim else 0}")
    if indptr[0] != 0 or indptr[-1] != len(data) or np.any(np.diff(indptr) < 0):
        bad = np.flatnonzero(np.diff(indptr) < 0)
        where = f"row {int(bad[0])}" if len(bad) else "field 'indptr'"
        raise MatrixFormatError(f"{where}: indptr is not a valid CSR row pointer")
    if len(indices) and (indices.min() < 0 or indices.max() >= n):
        row_of = np.repeat(np.arange(n), np.diff(indptr))
        bad = (indices < 0) | (indices >= n)
        raise MatrixFormatError(f"row {int(row_of[np.argmax(bad)])} has a column index outside [0, {n})")
    try:
        meta = json.loads(str(arrays["meta_json"]))
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise MatrixFormatError(f"field 'meta_json' is not a JSON object: {exc}") from exc
    C = sp.csr_matrix((data.astype(np.float64), indices.astype(np.int64 if n >= 2**31 - 1 else np.int32), indptr.astype(np.int64)),
                      shape=(n, n))
    C.has_sorted_indices = False
    C.sort_indices()
    residual = arrays["residual"].astype(np.float64)
    eos = int(arrays["eos_index"])
    st = arrays["state_tokens"].astype(np.int64)
    if st.ndim == 1:
        st = st[:, None]
    _validate_parts(C, residual, eos, st)
    matrix: np.ndarray | sp.csr_matrix = C
    if meta.get("storage") == "dense":
        matrix = C.toarray()
    opt: dict[str, Any] = {}
    for key, dtype in (("row_source", np.int8), ("visits", np.int64), ("row_logit_shift", np.float64)):
        if key in arrays:
            arr = arrays[key]
            if arr.shape != (n,) or arr.dtype.kind not in "fiu":
                raise MatrixFormatError(f"field {key!r}: expected ({n},) numbers, got {arr.shape} {arr.dtype}")
            opt[key] = arr.astype(dtype)
    return TransitionMatrix(matrix, residual, eos, st, meta, **opt)


def _version() -> str:
    from . import __version__

    return __version__


# --------------------------------------------------------------------------------------------------
# assembling a matrix from rows
# --------------------------------------------------------------------------------------------------


def _resolve_top_k(top_k: int | None, vocab_size: int) -> int:
    if top_k is None or top_k <= 0:
        return vocab_size if vocab_size <= FULL_ROWS_MAX_VOCAB else DEFAULT_TOP_K
    return min(int(top_k), vocab_size)


class _RowStore:
    """Collects token-space rows (top-K + eos, float64) for states, then assembles the matrix."""

    def __init__(self, n_states: int, vocab_size: int, eos_token_id: int, top_k: int):
        self.n = n_states
        self.V = vocab_size
        self.eos = eos_token_id
        self.K = top_k
        self.tokens: list[np.ndarray | None] = [None] * n_states
        self.probs: list[np.ndarray | None] = [None] * n_states
        self.residual = np.ones(n_states, dtype=np.float64)
        self.source = np.zeros(n_states, dtype=np.int8)

    def put_dense(self, states: np.ndarray, rows: "np.ndarray", source: int) -> None:
        """Rows ``(B, V)`` float64 probabilities (complete distributions) for ``states``."""
        K = self.K
        V = rows.shape[1]
        if K >= V:
            toks = np.broadcast_to(np.arange(V), rows.shape)
            vals = rows
        else:
            part = np.argpartition(-rows, K - 1, axis=1)[:, :K]
            toks = part
            vals = np.take_along_axis(rows, part, axis=1)
        for m, s in enumerate(np.asarray(states)):
            t = np.asarray(toks[m], dtype=np.int64)
            v = np.asarray(vals[m], dtype=np.float64)
            if K < V and not np.any(t == self.eos):
                t = np.append(t, self.eos)
                v = np.append(v, rows[m, self.eos])
            o = np.argsort(t, kind="stable")
            self.tokens[s], self.probs[s] = t[o], v[o]
            self.residual[s] = max(0.0, 1.0 - float(v.sum()))
            self.source[s] = source

    def put_topk(self, states: np.ndarray, toks: np.ndarray, vals: np.ndarray, eos_vals: np.ndarray,
                 source: int) -> None:
        """Rows given by their top-K tokens ``(B, K)``, probabilities ``(B, K)`` and eos probability ``(B,)``."""
        eos = self.eos
        states = np.asarray(states, dtype=np.int64)
        toks = np.asarray(toks, dtype=np.int64)
        has_eos = (toks == eos).any(axis=1)
        # one extra column holds eos where the top-K lacks it, and a -1 placeholder (sorted first) elsewhere
        ext_t = np.concatenate([toks, np.where(has_eos, -1, eos)[:, None]], axis=1)
        ext_v = np.concatenate([np.asarray(vals, dtype=np.float64),
                                np.where(has_eos, 0.0, np.asarray(eos_vals, dtype=np.float64))[:, None]], axis=1)
        order = np.argsort(ext_t, axis=1, kind="stable")
        ext_t = np.take_along_axis(ext_t, order, axis=1)
        ext_v = np.take_along_axis(ext_v, order, axis=1)
        totals = ext_v.sum(axis=1)
        for m, s in enumerate(states.tolist()):
            start = 1 if has_eos[m] else 0
            self.tokens[s], self.probs[s] = ext_t[m, start:].copy(), ext_v[m, start:].copy()
        self.residual[states] = np.maximum(0.0, 1.0 - totals)
        self.source[states] = source

    def put_sparse(self, state: int, toks: np.ndarray, vals: np.ndarray, source: int) -> None:
        """A row given as (token ids, probabilities), already including the eos column."""
        K = self.K
        toks = np.asarray(toks, dtype=np.int64)
        vals = np.asarray(vals, dtype=np.float64)
        if len(toks) > K:
            keep = np.argpartition(-vals, K - 1)[:K]
            eos_pos = np.flatnonzero(toks == self.eos)
            keep = np.union1d(keep, eos_pos)
            toks, vals = toks[keep], vals[keep]
        if not np.any(toks == self.eos):
            toks = np.append(toks, self.eos)
            vals = np.append(vals, 0.0)
        o = np.argsort(toks, kind="stable")
        self.tokens[state], self.probs[state] = toks[o], vals[o]
        self.residual[state] = max(0.0, 1.0 - float(vals.sum()))
        self.source[state] = source

    def assemble(self, tm_skeleton: TransitionMatrix, dense: bool) -> TransitionMatrix:
        """Map token columns to successor states, make eos absorbing, fill missing rows, build CSR/dense."""
        tm = tm_skeleton
        eos_state = tm.eos_index
        present = [s for s in range(self.n) if self.tokens[s] is not None and s != eos_state]
        missing = np.array([s for s in range(self.n) if self.tokens[s] is None and s != eos_state], dtype=np.int64)
        # missing rows: uniform placeholders (eos stored explicitly as 0, residual 1)
        rows_i = [np.repeat(np.asarray(present, dtype=np.int64), [len(self.tokens[s]) for s in present]), missing]
        toks_i = [np.concatenate([self.tokens[s] for s in present]) if present else np.zeros(0, np.int64),
                  np.full(len(missing), self.eos, dtype=np.int64)]
        vals_i = [np.concatenate([self.probs[s] for s in present]) if present else np.zeros(0),
                  np.zeros(len(missing))]
        self.residual[missing] = 1.0
        r = np.concatenate(rows_i).astype(np.int64)
        t_all = np.concatenate(toks_i).astype(np.int64)
        v = np.concatenate(vals_i).astype(np.float64)
        if tm.order == 1:
            c = t_all
        else:
            c = np.empty_like(t_all)
            step = 1 << 20
            for lo in range(0, len(r), step):
                c[lo:lo + step] = tm.successor_states(r[lo:lo + step], t_all[lo:lo + step])
        r = np.concatenate([r, [eos_state]])
        c = np.concatenate([c, [eos_state]])
        v = np.concatenate([v, [1.0]])
        self.residual[eos_state] = 0.0
        self.source[eos_state] = ROW_ABSORBING
        order = np.lexsort((c, r))
        r, c, v = r[order], c[order], v[order]
        indptr = np.zeros(self.n + 1, dtype=np.int64)
        np.add.at(indptr, r + 1, 1)
        indptr = np.cumsum(indptr)
        C = sp.csr_matrix((v, c.astype(np.int32 if self.n < 2**31 - 1 else np.int64), indptr), shape=(self.n, self.n))
        C.has_sorted_indices = True
        tm.residual = self.residual.copy()
        tm.row_source = self.source.copy()
        if dense:
            tm.matrix = C.toarray()
        else:
            tm.matrix = C
        tm._lookup = None
        return tm


def _one_gram_states(vocab_size: int, order: int) -> np.ndarray:
    st = np.full((vocab_size, order), -1, dtype=np.int64)
    st[:, -1] = np.arange(vocab_size)
    return st


def _base_meta(lm: "LoadedModel", builder: str, order: int, top_k: int, prompts: Sequence[str]) -> dict:
    return {
        "builder": builder,
        "model_id": lm.model_id,
        "revision": lm.revision,
        "model_kind": lm.kind,
        "tokenizer_fingerprint": lm.tokenizer_fingerprint,
        "order": int(order),
        "top_k": int(top_k),
        "vocab_size": int(lm.vocab_size),
        "eos_token_id": int(lm.eos_token_id),
        "prompts_fingerprint": prompts_fingerprint(prompts),
        "n_prompts": len(prompts),
        "policy": "raw",
        "repdiag_version": _version(),
        "dtype": str(lm.dtype).replace("torch.", ""),
    }


# --------------------------------------------------------------------------------------------------
# model plumbing (torch imported lazily)
# --------------------------------------------------------------------------------------------------


def _expand_cache(cache: Any, batch: int) -> Any:
    """A cache whose tensors are batch-expanded *views* of ``cache`` (batch 1); ``cache`` is untouched."""
    import copy

    if hasattr(cache, "self_attention_cache") and hasattr(cache, "cross_attention_cache"):
        new = copy.copy(cache)
        new.self_attention_cache = _expand_cache(cache.self_attention_cache, batch)
        new.cross_attention_cache = _expand_cache(cache.cross_attention_cache, batch)
        new.is_updated = dict(getattr(cache, "is_updated", {}))
        return new
    layers = getattr(cache, "layers", None)
    if layers is None:  # unknown cache type: materialise copies
        new = copy.deepcopy(cache)
        new.batch_repeat_interleave(batch)
        return new
    new = copy.copy(cache)
    new.layers = []
    for layer in layers:
        lay = copy.copy(layer)
        keys = getattr(layer, "keys", None)
        if keys is not None and keys.numel() > 0:
            lay.keys = keys.expand(batch, *keys.shape[1:])
            lay.values = layer.values.expand(batch, *layer.values.shape[1:])
        new.layers.append(lay)
    return new


def _out_cache(out: Any) -> Any:
    """The KV cache of a model output (``cache`` in transformers ≥ 5.2x, ``past_key_values`` before)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _cache_kwarg(model: Any) -> str:
    name = getattr(model, "_repdiag_cache_kwarg", None)
    if name is None:
        name = "cache" if forward_accepts(model, "cache") else "past_key_values"
        try:
            model._repdiag_cache_kwarg = name
        except AttributeError:  # pragma: no cover
            pass
    return name


class _PromptContext:
    """The per-prompt state of the probe: encoder output (seq2seq) and the decoder-prefix cache."""

    def __init__(self, cache: Any, kwargs: dict, prefix_len: int, first_logits: Any = None):
        self.first_logits = first_logits  # (V,) logits of the first step after the prefix
        self.cache = cache
        self.kwargs = kwargs
        self.prefix_len = prefix_len


def _encode(lm: "LoadedModel", prompt: str) -> list[int]:
    ids = lm.tokenizer(prompt, add_special_tokens=True, truncation=True, max_length=lm.max_source_tokens)["input_ids"]
    ids = [int(i) for i in ids]
    if lm.kind == "causal" and not ids:
        bos = lm.tokenizer.bos_token_id
        ids = [int(bos)] if bos is not None else []
    return ids


def _prepare_prompt(lm: "LoadedModel", prompt: str) -> _PromptContext:
    import torch

    model, dev = lm.model, lm.device
    ids = _encode(lm, prompt)
    if lm.kind == "seq2seq":
        if not ids:
            ids = [lm.eos_token_id]
        x = torch.tensor([ids], dtype=torch.long, device=dev)
        mask = torch.ones_like(x)
        enc = model.get_encoder()(input_ids=x, attention_mask=mask)
        start = torch.tensor([[lm.decoder_start_token_id]], dtype=torch.long, device=dev)
        out = model(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=start, use_cache=True)
        return _PromptContext(_out_cache(out), {"encoder_outputs": enc, "attention_mask": mask}, 1,
                              out.logits[0, -1])
    if not ids:
        return _PromptContext(None, {}, 0)
    x = torch.tensor([ids], dtype=torch.long, device=dev)
    keep = {"logits_to_keep": 1} if forward_accepts(model, "logits_to_keep") else {}  # the last position's only
    out = model(input_ids=x, use_cache=True, **keep)
    return _PromptContext(_out_cache(out), {}, len(ids), out.logits[0, -1])


class ProbePrompts:
    """Probe prompts whose prefixes (encoder pass, decoder-prefix KV cache) run once for many probes.

    :func:`fill_rows` takes these in place of prompt strings: ``analyze`` probes the rows its
    simulation reaches at every step that reaches one, and running the prompts' prefixes again
    each time would cost as much as the rows. Tied to the model it was made for, whose weights must
    not change meanwhile.
    """

    def __init__(self, lm: "LoadedModel", prompts: Sequence[str]):
        self.lm = lm
        self.prompts = list(prompts)
        self._contexts: list[_PromptContext] | None = None

    def contexts(self, lm: "LoadedModel") -> list[_PromptContext]:
        if lm is not self.lm:
            raise UsageError("these probe prompts were prepared for another model")
        if self._contexts is None:
            import torch

            with torch.inference_mode():
                self._contexts = [_prepare_prompt(lm, p) for p in self.prompts]
        return self._contexts


def _step_logits(lm: "LoadedModel", ctx: _PromptContext, tokens: "Any") -> "Any":
    """Logits (B, V) of the model after ``prefix + [token]`` for each token of the (B,) tensor."""
    import torch
    from transformers.modeling_outputs import BaseModelOutput

    B = tokens.shape[0]
    inp = tokens.view(B, 1)
    kwargs: dict[str, Any] = {"use_cache": True}
    if ctx.cache is not None:
        kwargs[_cache_kwarg(lm.model)] = _expand_cache(ctx.cache, B)
    if lm.kind == "seq2seq":
        enc = ctx.kwargs["encoder_outputs"]
        hidden = enc.last_hidden_state.expand(B, *enc.last_hidden_state.shape[1:])
        kwargs["encoder_outputs"] = BaseModelOutput(last_hidden_state=hidden)
        kwargs["attention_mask"] = ctx.kwargs["attention_mask"].expand(B, -1)
        out = lm.model(decoder_input_ids=inp, **kwargs)
    else:
        if ctx.prefix_len:
            kwargs["attention_mask"] = torch.ones((B, ctx.prefix_len + 1), dtype=torch.long, device=inp.device)
        out = lm.model(input_ids=inp, **kwargs)
    return out.logits[:, -1, :]


def _probe_dense_rows(lm: "LoadedModel", contexts: list[_PromptContext], tokens: np.ndarray, *,
                      batch_size: int, per_prompt: bool, progress: Callable[[int], None] | None,
                      top_k: int | None = None):
    """Yield ``(token ids, rows, logit shift or None, per-prompt probs or None)`` per batch.

    ``rows`` is the mean probability matrix ``(B, V)`` float64 over the prompts, or — whenever
    ``top_k < V`` and no per-prompt rows are asked for — a tuple ``(top tokens (B, K), top probs
    (B, K), eos probs (B,))`` taken by one ``torch.topk`` per batch, so no ``(B, V)`` array leaves
    torch. With one prompt the top-k runs on the logits and one log-sum-exp per row (in the logits'
    precision, as the model's own softmax), then float64 for the K kept entries only; with several,
    on the float64 mean of their softmaxes.
    """
    import torch

    dev = lm.device
    P = len(contexts)
    V = lm.vocab_size
    eos = lm.eos_token_id
    top_only = not per_prompt and top_k is not None and top_k < V
    with torch.inference_mode():
        for lo in range(0, len(tokens), batch_size):
            chunk = np.asarray(tokens[lo:lo + batch_size], dtype=np.int64)
            t = torch.from_numpy(chunk).to(dev)
            if top_only and P == 1:
                logits = _step_logits(lm, contexts[0], t)
                if logits.dtype not in (torch.float32, torch.float64):
                    logits = logits.float()
                lse = torch.logsumexp(logits, dim=-1).double()  # in the logits' precision, like softmax
                top_v, top_i = torch.topk(logits, top_k, dim=-1, sorted=False)
                p_top = torch.exp(top_v.double() - lse[:, None])
                p_eos = torch.exp(logits[:, eos].double() - lse)
                yield chunk, (top_i.cpu().numpy(), p_top.cpu().numpy(), p_eos.cpu().numpy()), lse.cpu().numpy(), None
                if progress is not None:
                    progress(len(chunk))
                continue
            acc = None
            shift = None
            each = [] if per_prompt else None
            for ctx in contexts:
                logits = _step_logits(lm, ctx, t).to(torch.float64)
                lse = torch.logsumexp(logits, dim=-1, keepdim=True)
                probs = torch.exp(logits - lse)
                shift = lse.squeeze(-1) / P if shift is None else shift + lse.squeeze(-1) / P
                if each is not None:
                    each.append(probs.cpu().numpy())
                if acc is None:
                    acc = probs.clone() if (P > 1 and each is not None) else probs
                else:
                    acc += probs
            if P > 1:
                acc /= P
            shift_np = None if shift is None else shift.cpu().numpy()
            if top_only:
                top_v, top_i = torch.topk(acc, top_k, dim=-1, sorted=False)
                yield chunk, (top_i.cpu().numpy(), top_v.cpu().numpy(), acc[:, eos].cpu().numpy()), shift_np, None
            else:
                yield chunk, acc.cpu().numpy(), shift_np, each
            if progress is not None:
                progress(len(chunk))


def _put_rows(store: "_RowStore", chunk: np.ndarray, rows: Any, source: int) -> None:
    if isinstance(rows, tuple):
        store.put_topk(chunk, rows[0], rows[1], rows[2], source)
    else:
        store.put_dense(chunk, rows, source)


# --------------------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------------------


def _select_rows(lm: "LoadedModel", contexts: list[_PromptContext], rows: Any) -> np.ndarray:
    """The probe's state set: None/'all' → every token; int n → the n most probable first tokens; ids."""
    V = lm.vocab_size
    if rows is None or (isinstance(rows, str) and rows == "all"):
        return np.arange(V, dtype=np.int64)
    if isinstance(rows, (int, np.integer)) and not isinstance(rows, bool):
        import torch

        n = int(rows)
        if n <= 0:
            raise UsageError("the number of probe rows must be ≥ 1")
        mass = torch.zeros(V, dtype=torch.float64)
        with torch.inference_mode():
            for ctx in contexts:
                mass += _first_distribution(lm, ctx).cpu()
        order = np.argsort(-mass.numpy(), kind="stable")[:n]
        return np.sort(order).astype(np.int64)
    ids = np.unique(np.asarray(rows, dtype=np.int64))
    if ids.size and (ids.min() < 0 or ids.max() >= V):
        raise UsageError(f"probe rows must be token ids in [0, {V})")
    return ids


def _first_distribution(lm: "LoadedModel", ctx: _PromptContext):
    """p(first token | prompt) for a prepared prompt (float64 torch vector)."""
    import torch

    if ctx.first_logits is None:
        return torch.full((lm.vocab_size,), 1.0 / lm.vocab_size, dtype=torch.float64)
    return torch.softmax(ctx.first_logits.double(), -1)


def build_probe(
    lm: "LoadedModel",
    prompts: Sequence[str] | None = None,
    *,
    rows: Any = None,
    top_k: int | None = None,
    batch_size: int = 64,
    keep_per_prompt: bool = False,
    storage: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    executor: Any = None,
) -> TransitionMatrix:
    """Order-1 probe: row ``i = p(· | prefix + [i], x)``, averaged over the prompts.

    For an encoder-decoder the prefix is the decoder start token and ``x`` the prompt (the encoder runs
    once per prompt). For a decoder-only model the context is the prompt followed by ``i``
    (prompt-conditioned; ``prompts=[""]`` gives the bare ``[BOS, i]``). Without prompts the
    :data:`BUILTIN_PROMPTS` are used. The prefix's KV cache is computed once per prompt and every batch
    of ``batch_size`` rows is one decoder step. ``rows``: ``None`` (the full vocabulary), an int ``n``
    (the ``n`` most probable first tokens after the prompts) or token ids; other rows are flagged missing.
    ``top_k``: entries kept per row (``None``: complete rows for vocabularies ≤ 1024, else 64); the
    ``<eos>`` column is always kept. ``keep_per_prompt`` also returns one matrix per prompt in
    ``per_prompt`` (the main matrix is their mean, labelled so in ``meta["label"]``).

    ``executor`` (a :class:`repdiag.executors.Executor`, e.g. Ray): the rows are probed in shards of
    whole batches by :func:`probe_shard` and merged by token range; the result is the same bytes as
    without it (every row is computed in the same batch as here).
    """
    prompts = list(BUILTIN_PROMPTS if prompts is None else prompts)
    if not prompts:
        raise UsageError("the probe needs at least one prompt (or none at all for the built-in set)")
    V = lm.vocab_size
    K = _resolve_top_k(top_k, V)
    import torch

    st = _one_gram_states(V, 1)
    store = _RowStore(V, V, lm.eos_token_id, K)
    shift = np.full(V, np.nan)
    stores_pp = [_RowStore(V, V, lm.eos_token_id, K) for _ in prompts] if keep_per_prompt and len(prompts) > 1 else None
    if executor is not None:
        contexts = None
        if isinstance(rows, (int, np.integer)) and not isinstance(rows, bool):
            with torch.inference_mode():
                contexts = [_prepare_prompt(lm, p) for p in prompts]
        ids = _select_rows(lm, contexts or [], rows)
        total = len(ids)
        tick = (lambda n: progress(n, total)) if progress is not None else None
        shards = executor.probe_shards(lm, prompts, ids, top_k=K, batch_size=batch_size,
                                       keep_per_prompt=stores_pp is not None, progress=tick)
        merge_probe_shards(store, shift, stores_pp, shards)
    else:
        with torch.inference_mode():
            contexts = [_prepare_prompt(lm, p) for p in prompts]
        ids = _select_rows(lm, contexts, rows)
        total = len(ids)
        tick = (lambda n: progress(n, total)) if progress is not None else None
        for chunk, probs, lse, each in _probe_dense_rows(lm, contexts, ids, batch_size=batch_size,
                                                        per_prompt=stores_pp is not None, progress=tick, top_k=K):
            _put_rows(store, chunk, probs, ROW_PROBE)
            if shift is not None and lse is not None:
                shift[chunk] = lse
            if stores_pp is not None:
                for sp_, pr in zip(stores_pp, each):
                    sp_.put_dense(chunk, pr, ROW_PROBE)
    dense = _want_dense(storage, V, K, V)
    meta = _base_meta(lm, "probe", 1, K, prompts)
    meta["label"] = "probe rows, mean over prompts" if len(prompts) > 1 else "probe rows, one prompt"
    meta["rows_probed"] = int(len(ids))
    meta["coverage"] = {"rows_built": float(len(ids) / V), "rows_visited": 0.0, "mass_visited": 0.0,
                        "n_visited": 0, "n_probed": int(len(ids)), "n_missing": int(V - len(ids))}
    tm = TransitionMatrix(np.zeros((0, 0)), np.zeros(V), int(lm.eos_token_id), st, meta)
    tm = store.assemble(tm, dense)
    if shift is not None:
        shift[lm.eos_token_id] = np.nan
        tm.row_logit_shift = shift
    if stores_pp is not None:
        tm.per_prompt = []
        for j, (sp_, prompt) in enumerate(zip(stores_pp, prompts)):
            m = dict(meta, label=f"probe rows, prompt {j}", n_prompts=1, prompts_fingerprint=prompts_fingerprint([prompt]))
            tm.per_prompt.append(sp_.assemble(TransitionMatrix(np.zeros((0, 0)), np.zeros(V), int(lm.eos_token_id),
                                                               st.copy(), m), dense))
    return tm


def probe_shards_of(n_rows: int, batch_size: int, n_shards: int) -> list[tuple[int, int]]:
    """Split ``n_rows`` probe rows into at most ``n_shards`` contiguous ``(lo, hi)`` ranges.

    Every boundary is a multiple of ``batch_size``, so each row lands in the same decoder batch as in
    the single-process probe (batch composition can change the floats; this keeps them identical).
    """
    n_batches = -(-int(n_rows) // int(batch_size))
    if n_batches == 0:
        return []
    n_shards = max(1, min(int(n_shards), n_batches))
    per, extra = divmod(n_batches, n_shards)
    out, b = [], 0
    for j in range(n_shards):
        nb = per + (1 if j < extra else 0)
        out.append((b * batch_size, min((b + nb) * batch_size, n_rows)))
        b += nb
    return out


def probe_shard(lm: "LoadedModel", prompts: Sequence[str], ids: np.ndarray, *, top_k: int, batch_size: int = 64,
                keep_per_prompt: bool = False, context_cache: dict | None = None) -> dict[str, Any]:
    """Probe the rows ``ids`` (one shard of :func:`build_probe`) and return them compactly.

    The shard is processed in batches of ``batch_size`` from its first id, exactly as the
    single-process loop does; the returned dict holds per-row top-K tokens/probabilities (what
    ``_RowStore`` keeps), the residuals and the row logit shifts, so no ``(B, V)`` array travels.
    ``context_cache``: a dict kept by the caller (a worker) that reuses the prompts' prepared KV caches
    across shards, as the single-process loop reuses them across batches (they are never modified).
    """
    import torch

    ids = np.asarray(ids, dtype=np.int64)
    V = lm.vocab_size
    store = _RowStore(V, V, lm.eos_token_id, top_k)
    pp = [_RowStore(V, V, lm.eos_token_id, top_k) for _ in prompts] if keep_per_prompt else None
    shift = np.full(len(ids), np.nan)
    pos = 0
    key = tuple(prompts)
    with torch.inference_mode():
        contexts = context_cache.get(key) if context_cache is not None else None
        if contexts is None:
            contexts = [_prepare_prompt(lm, p) for p in prompts]
            if context_cache is not None:
                context_cache.clear()  # one prompt set at a time: bounded memory
                context_cache[key] = contexts
        for chunk, probs, lse, each in _probe_dense_rows(lm, contexts, ids, batch_size=batch_size,
                                                        per_prompt=pp is not None, progress=None, top_k=top_k):
            _put_rows(store, chunk, probs, ROW_PROBE)
            if lse is not None:
                shift[pos:pos + len(chunk)] = lse
            if pp is not None:
                for sp_, pr in zip(pp, each):
                    sp_.put_dense(chunk, pr, ROW_PROBE)
            pos += len(chunk)

    def pack(s: _RowStore) -> dict[str, Any]:
        return {"tokens": [s.tokens[i] for i in ids], "probs": [s.probs[i] for i in ids],
                "residual": s.residual[ids].copy()}

    return {"ids": ids, "shift": shift, "rows": pack(store), "per_prompt": None if pp is None else [pack(s) for s in pp]}


def merge_probe_shards(store: _RowStore, shift: np.ndarray, stores_pp: list[_RowStore] | None,
                       shards: Sequence[dict[str, Any]]) -> None:
    """Put the rows of :func:`probe_shard` results into ``store`` (ordered by first id; a row seen twice,
    e.g. from a retried shard, is written once with the same values)."""
    for sh in sorted(shards, key=lambda r: (int(r["ids"][0]) if len(r["ids"]) else -1)):
        ids = np.asarray(sh["ids"], dtype=np.int64)
        targets = [(store, sh["rows"])]
        if stores_pp is not None:
            targets += list(zip(stores_pp, sh["per_prompt"]))
        for st_, rows in targets:
            for m, s in enumerate(ids.tolist()):
                st_.tokens[s], st_.probs[s] = rows["tokens"][m], rows["probs"][m]
            st_.residual[ids] = rows["residual"]
            st_.source[ids] = ROW_PROBE
        if len(ids):
            shift[ids] = sh["shift"]


def _want_dense(storage: str, n_states: int, K: int, V: int) -> bool:
    if storage == "dense":
        return True
    if storage == "sparse":
        return False
    if storage != "auto":
        raise UsageError(f"storage must be auto, dense or sparse, not {storage!r}")
    return n_states <= DENSE_MAX_STATES and K >= V


def _generate(lm: "LoadedModel", batch_ids: list[list[int]], *, do_sample: bool, max_new_tokens: int):
    """Generate for a batch of tokenized prompts; returns (sequences, prompt_len) with left padding."""
    import torch
    from transformers import GenerationConfig

    dev = lm.device
    pad = lm.pad_token_id
    L = max(len(x) for x in batch_ids)
    if lm.kind == "causal":
        inp = torch.full((len(batch_ids), L), pad, dtype=torch.long)
        mask = torch.zeros((len(batch_ids), L), dtype=torch.long)
        for b, x in enumerate(batch_ids):
            inp[b, L - len(x):] = torch.tensor(x)
            mask[b, L - len(x):] = 1
    else:
        inp = torch.full((len(batch_ids), L), pad, dtype=torch.long)
        mask = torch.zeros((len(batch_ids), L), dtype=torch.long)
        for b, x in enumerate(batch_ids):
            inp[b, :len(x)] = torch.tensor(x)
            mask[b, :len(x)] = 1
    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=do_sample, num_beams=1,
        temperature=1.0, top_k=0 if do_sample else None, top_p=1.0, typical_p=1.0,
        repetition_penalty=1.0, no_repeat_ngram_size=0, eos_token_id=lm.eos_token_id, pad_token_id=pad,
        bos_token_id=getattr(lm.model.generation_config, "bos_token_id", None),
        decoder_start_token_id=lm.decoder_start_token_id,
    )
    out = lm.model.generate(input_ids=inp.to(dev), attention_mask=mask.to(dev), generation_config=cfg)
    return out.cpu(), inp, mask


def _teacher_forced_probs(lm: "LoadedModel", inp, mask, seqs):
    """One forward pass over finished sequences → (gen_tokens, gen_valid, history, step logits).

    Returns ``gen`` (B, T) generated tokens, ``valid`` (B, T) bool (up to and including the first eos),
    ``hist`` (B, T, H) the decoder-side history before each step (-1 = none, H = all positions) and
    ``logits`` (B, T, V) float32 — step ``t``'s distribution over the token generated at ``t``.
    """
    import torch

    dev = lm.device
    eos = lm.eos_token_id
    B = seqs.shape[0]
    if lm.kind == "causal":
        Lp = inp.shape[1]
        gen = seqs[:, Lp:]
    else:
        gen = seqs[:, 1:]
    T = gen.shape[1]
    is_eos = gen == eos
    after = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # eos seen strictly before t
    valid = after == 0
    if lm.kind == "causal":
        full_mask = torch.cat([mask, valid.long()], dim=1)
        full = seqs.clone()
        pos = (full_mask.cumsum(-1) - 1).clamp(min=0)
        out = lm.model(input_ids=full.to(dev), attention_mask=full_mask.to(dev), position_ids=pos.to(dev))
        logits = out.logits[:, Lp - 1:Lp - 1 + T, :]
        hist_tokens = torch.where(full_mask.bool(), full, torch.full_like(full, -1))
        hist = hist_tokens[:, :Lp + T - 1]  # positions before each generated step, up to the last
        prefix_len = Lp
    else:
        out = lm.model(input_ids=inp.to(dev), attention_mask=mask.to(dev), decoder_input_ids=seqs[:, :T].to(dev))
        logits = out.logits
        # the decoder start token is not a real token: it is history "none"
        hist = torch.cat([torch.full((B, 1), -1, dtype=torch.long), torch.where(valid, gen, -1)[:, :T - 1]], dim=1)
        prefix_len = 1
    return gen, valid, hist, prefix_len, logits


def _trace_job_seed(seed: int, job: int) -> int:
    """The sampling seed of trace job ``job``: one stream per job, so a job decodes alike in any process."""
    return int(np.random.SeedSequence([int(seed), int(job)]).generate_state(1)[0])


def trace_job(lm: "LoadedModel", batch: list[list[int]], mode: str, job_seed: int, *, prompt_offset: int,
              max_new_tokens: int, order: int, top_entries: int | None) -> list[dict[str, Any]]:
    """Decode one batch of tokenized prompts in one mode; return its steps (one shard of :func:`build_trace`).

    ``job_seed`` seeds this batch's sampling alone. One block per teacher-forced sub-batch, with
    ``sequences`` (mode, prompt index, generated tokens), for an encoder-decoder ``first`` (the sum of
    the first-step distributions, of their log-normalisers, and their count), and for the steps that
    count towards a state: ``ctx`` (their last ``order`` tokens, ``-1`` = none), ``lse`` (log-normaliser),
    ``sq`` (``||p_t||²`` over the entries kept) and either ``probs`` (full rows, ``top_entries=None``)
    or ``top_v`` / ``top_i`` (the ``top_entries`` largest) and ``eos_p``. Only arrays: a Ray worker's
    result travels as is, and :func:`build_trace` accumulates the blocks in job order.
    """
    import torch

    V = lm.vocab_size
    eos = lm.eos_token_id
    blocks: list[dict[str, Any]] = []
    with torch.inference_mode(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(job_seed)
        seqs, inp, mask = _generate(lm, batch, do_sample=(mode == "sample"), max_new_tokens=max_new_tokens)
        # the teacher-forced pass in sub-batches whose float32 logits stay under TRACE_LOGITS_BYTES
        rows_per_pass = max(1, int(TRACE_LOGITS_BYTES // (4 * seqs.shape[1] * V)))
        for sb in range(0, seqs.shape[0], rows_per_pass):
            part = slice(sb, sb + rows_per_pass)
            gen, valid, hist, _plen, logits = _teacher_forced_probs(lm, inp[part], mask[part], seqs[part])
            Bn, T = gen.shape
            block: dict[str, Any] = {"sequences": [
                {"mode": mode, "prompt_index": prompt_offset + sb + b, "tokens": gen[b][valid[b]].tolist()}
                for b in range(Bn)]}
            blocks.append(block)
            # history before step t: hist[:, : offset + t]; its last `order` tokens form the context
            H = hist.shape[1]
            offset = H - T + 1  # hist index of the token right before step 0 is offset-1
            bi, ti = torch.nonzero(valid, as_tuple=True)
            if len(bi) == 0:
                continue
            idx_last = (offset - 1 + ti)
            ctx = torch.full((len(bi), order), -1, dtype=torch.long)
            for j in range(order):
                pos = idx_last - (order - 1 - j)
                okp = pos >= 0
                ctx[okp, j] = hist[bi[okp], pos[okp]]
            if lm.kind == "seq2seq":
                first = ti == 0
                if bool(first.any()):
                    first_logits = logits[bi[first], 0].to(torch.float64)
                    first_lse = torch.logsumexp(first_logits, dim=-1, keepdim=True)
                    block["first"] = (torch.exp(first_logits - first_lse).sum(dim=0).numpy(),
                                      float(first_lse.sum()), int(first.sum()))
            ctx_np = ctx.numpy()
            # a -1 cuts the context: tokens left of it are not history
            for j in range(order - 2, -1, -1):
                ctx_np[:, j] = np.where(ctx_np[:, j + 1] < 0, -1, ctx_np[:, j])
            keep = (ctx_np[:, -1] >= 0) & (ctx_np[:, -1] != eos)
            step_logits = logits[bi, ti].to(torch.float64)[torch.from_numpy(keep)]
            step_lse = torch.logsumexp(step_logits, dim=-1, keepdim=True)
            probs = torch.exp(step_logits - step_lse)
            ctx_np = ctx_np[keep]
            if len(ctx_np) == 0:
                continue
            block.update(ctx=ctx_np, lse=step_lse.squeeze(-1).numpy())
            if top_entries is None:
                block.update(probs=probs.numpy(), sq=(probs * probs).sum(dim=1).numpy())
            else:
                top_v, top_i = torch.topk(probs, top_entries, dim=1)
                top_v, top_i = top_v.numpy(), top_i.numpy()
                eos_p = probs[:, eos].numpy()
                # δ̂² over the entries kept (each step's top-4K and eos), like the rows it is compared with
                sq = (top_v * top_v).sum(axis=1) + np.where((top_i == eos).any(axis=1), 0.0, eos_p * eos_p)
                block.update(top_v=top_v, top_i=top_i, eos_p=eos_p, sq=sq)
    return blocks


def build_trace(
    lm: "LoadedModel",
    prompts: Sequence[str] | None = None,
    *,
    order: int = 2,
    top_k: int | None = None,
    modes: Sequence[str] = ("greedy", "sample"),
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 64,
    min_count: int = 1,
    probe_fallback: bool = True,
    max_probe_rows: int = 4096,
    max_probe_prompts: int = 8,
    storage: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    executor: Any = None,
) -> TransitionMatrix:
    """Trace matrix with k-gram states: decode, then average the step distributions per state.

    Each prompt is decoded once per mode (``"greedy"`` and/or ``"sample"`` = ancestral sampling at
    temperature 1; each batch of ``batch_size`` prompts and mode is a job with its own seed derived from
    ``seed``, :func:`trace_job`), then ONE teacher-forced forward pass over the finished sequences gives
    every generated step's full next-token distribution ``p_t``. A step whose last ``j`` tokens are
    ``c`` (``j = 1..order``, decoder-side tokens only) counts towards the ``j``-gram state ``c``; the row
    of a state is the mean of its steps' distributions. ``j ≥ 2``-gram states are kept when visited at
    least ``min_count`` times. 1-gram states never visited fall back to prompt-conditioned probe rows
    (all of them when they are at most ``max_probe_rows``, else those that a built row's stored
    entries reach, the most inflow first, up to ``max_probe_rows``; averaged over the first
    ``max_probe_prompts`` prompts) and are flagged in ``row_source``;
    the rest stay missing (uniform placeholder rows: residual 1) until :func:`fill_rows` probes them.

    ``meta`` gets ``coverage`` (``rows_visited``: share of states built from steps; ``tokens_visited``:
    share of 1-gram states; ``mass_visited``: visit-weighted share of next-state probability mass that
    lands on visited states), ``delta2_hat`` (Theorem 2's residual variance, spec §2.3, against the
    1-gram rows: mean over steps and the ``V`` entries of ``(p_t − A_{y_{t−1}})²``) and
    ``delta2_hat_state`` (the same against the order-``k`` state rows, steps with a full context).
    """
    import torch

    prompts = list(BUILTIN_PROMPTS if prompts is None else prompts)
    if not prompts:
        raise UsageError("the trace needs at least one prompt")
    if order < 1:
        raise UsageError("--order must be ≥ 1")
    for m in modes:
        if m not in ("greedy", "sample"):
            raise UsageError(f"unknown trace mode {m!r}: use greedy and/or sample")
    V = lm.vocab_size
    eos = lm.eos_token_id
    K = _resolve_top_k(top_k, V)
    base = V + 1
    _context_keys(np.zeros((1, order), dtype=np.int64), base)  # raises for a too-high order
    exact = V <= TRACE_DENSE_MAX_VOCAB
    K_acc = V if exact else min(V, 4 * K)

    # accumulators per order level: key -> slot; sums (dense rows or sparse triplets); counts
    slots: list[dict[int, int]] = [dict() for _ in range(order)]
    dense_sums: list[list[torch.Tensor]] = [[] for _ in range(order)]  # blocks of (n, V) float64
    sparse_parts: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in range(order)]
    counts: list[list[int]] = [[] for _ in range(order)]
    sumsq_total = 0.0
    sumsq_full = 0.0  # Σ ||p_t||² over steps with a full order-k context
    n_steps = 0
    n_steps_full = 0
    sequences: list[dict] = []
    lse_sums: list[np.ndarray] = [np.zeros(0) for _ in range(order)]  # Σ log-normaliser per slot
    start_sum = torch.zeros(V, dtype=torch.float64)  # encoder-decoder: Σ first-step distributions
    start_lse, start_count = 0.0, 0
    tokenized = [_encode(lm, p) if lm.kind == "causal" else (_encode(lm, p) or [eos]) for p in prompts]
    for n, ids in enumerate(tokenized):
        if not ids:
            raise UsageError(f"prompt {n} is empty and the tokenizer adds no BOS token: give every prompt some text")
    jobs = [(mode, lo) for mode in modes for lo in range(0, len(prompts), batch_size)]
    total = len(jobs)
    top_entries = None if exact else K_acc
    job_kwargs = {"max_new_tokens": int(max_new_tokens), "order": int(order), "top_entries": top_entries}
    tasks = [(tokenized[lo:lo + batch_size], mode, _trace_job_seed(seed, j), lo) for j, (mode, lo) in enumerate(jobs)]

    def accumulate(block: dict[str, Any]) -> None:
        nonlocal sumsq_total, sumsq_full, n_steps, n_steps_full, start_lse, start_count
        sequences.extend(block["sequences"])
        if "first" in block:
            first_sum, first_lse_sum, first_count = block["first"]
            start_sum.add_(torch.from_numpy(np.require(first_sum, requirements="W")))  # Ray's arrays are read-only
            start_lse += first_lse_sum
            start_count += first_count
        if "ctx" not in block:
            return
        ctx_np, step_lse, sq = block["ctx"], block["lse"], block["sq"]
        if exact:
            probs = torch.from_numpy(np.require(block["probs"], requirements="W"))
        else:
            top_v, top_i, eos_p = block["top_v"], block["top_i"], block["eos_p"]
        sumsq_total += float(sq.sum())
        full_ctx = ctx_np[:, 0] >= 0
        sumsq_full += float(sq[full_ctx].sum())
        n_steps += len(ctx_np)
        n_steps_full += int(full_ctx.sum())
        for level in range(1, order + 1):
            sub = ctx_np[:, order - level:]
            ok = sub[:, 0] >= 0
            if not ok.any():
                continue
            keys = _context_keys(sub[ok], base)
            table = slots[level - 1]
            ids = np.empty(len(keys), dtype=np.int64)
            for m, key in enumerate(keys.tolist()):
                slot = table.get(key)
                if slot is None:
                    slot = len(table)
                    table[key] = slot
                    counts[level - 1].append(0)
                ids[m] = slot
            cnt = counts[level - 1]
            for s in ids.tolist():
                cnt[s] += 1
            if len(lse_sums[level - 1]) < len(table):
                lse_sums[level - 1] = np.concatenate(
                    [lse_sums[level - 1], np.zeros(max(len(table), 2 * len(lse_sums[level - 1])) - len(lse_sums[level - 1]))])
            np.add.at(lse_sums[level - 1], ids, step_lse[ok])
            rows_ok = torch.from_numpy(np.flatnonzero(ok))
            if exact:
                need = len(table)
                acc = dense_sums[level - 1][0] if dense_sums[level - 1] else torch.zeros((0, V), dtype=torch.float64)
                if need > acc.shape[0]:
                    grown = torch.zeros((max(need, 2 * acc.shape[0], 256), V), dtype=torch.float64)
                    grown[: acc.shape[0]] = acc
                    acc = grown
                acc.index_add_(0, torch.from_numpy(ids), probs[rows_ok])
                dense_sums[level - 1] = [acc]
            else:
                okn = np.flatnonzero(ok)
                r = np.repeat(ids, K_acc)
                c = top_i[okn].ravel()
                v = top_v[okn].ravel()
                # eos column explicitly (if outside the top entries it is added; duplicates sum: avoid)
                has_eos = (top_i[okn] == eos).any(axis=1)
                r = np.concatenate([r, ids[~has_eos]])
                c = np.concatenate([c, np.full((~has_eos).sum(), eos)])
                v = np.concatenate([v, eos_p[okn][~has_eos]])
                sparse_parts[level - 1].append((r, c, v))

    if executor is not None:  # the jobs on the executor's workers, accumulated here in job order
        tick = (lambda n: progress(n, total)) if progress is not None else None
        for blocks in executor.trace_jobs(lm, tasks, job_kwargs, progress=tick):
            for block in blocks:
                accumulate(block)
    else:
        for batch, mode, job_seed, lo in tasks:
            for block in trace_job(lm, batch, mode, job_seed, prompt_offset=lo, **job_kwargs):
                accumulate(block)
            if progress is not None:
                progress(1, total)

    # ---- states ----------------------------------------------------------------------------
    state_rows = [_one_gram_states(V, order)]
    level_state_ids: list[np.ndarray] = []
    level_keys: list[np.ndarray] = []
    n_states = V
    for level in range(1, order + 1):
        table = slots[level - 1]
        keys = np.fromiter(table.keys(), dtype=np.int64, count=len(table))
        slot_ids = np.fromiter(table.values(), dtype=np.int64, count=len(table))
        cnt = np.asarray(counts[level - 1], dtype=np.int64)
        if level == 1:
            toks = keys - 1
            level_state_ids.append(np.stack([slot_ids, toks], axis=1))
            level_keys.append(keys)
            continue
        sel = cnt[slot_ids] >= min_count
        keys, slot_ids = keys[sel], slot_ids[sel]
        toks = _decode_keys(keys, base, order)
        ids = np.arange(n_states, n_states + len(keys), dtype=np.int64)
        n_states += len(keys)
        state_rows.append(toks)
        level_state_ids.append(np.stack([slot_ids, ids], axis=1))
        level_keys.append(keys)
    st = np.concatenate(state_rows, axis=0)
    meta = _base_meta(lm, "trace", order, K, prompts)
    meta.update({
        "label": "trace rows, pooled over prompts" if len(prompts) > 1 else "trace rows, one prompt",
        "trace": {"modes": list(modes), "max_new_tokens": int(max_new_tokens), "seed": int(seed),
                  "n_steps": int(n_steps), "min_count": int(min_count), "exact_rows": bool(exact),
                  "accumulated_top_k": int(K_acc)},
    })
    tm = TransitionMatrix(np.zeros((0, 0)), np.zeros(n_states), int(eos), st, meta)
    store = _RowStore(n_states, V, eos, K)
    visits = np.zeros(n_states, dtype=np.int64)
    shift = np.full(n_states, np.nan)
    # ---- rows --------------------------------------------------------------------------------
    # Σ_slots ||sum_slot||² / n_slot per level, over every slot (also those below min_count): δ̂²'s
    # variance decomposition Σ_t ||p_t − A_s||² = Σ_t ||p_t||² − Σ_s n_s ||A_s||².
    weighted_norm = [0.0] * order
    sparse_sums: list[sp.csr_matrix | None] = [None] * order
    for level in range(1, order + 1):
        cnt = np.asarray(counts[level - 1], dtype=np.float64)
        if len(cnt) == 0:
            continue
        if exact:
            acc = dense_sums[level - 1][0][: len(cnt)]
            weighted_norm[level - 1] = float(((acc * acc).sum(dim=1).numpy() / cnt).sum())
        else:
            r = np.concatenate([p[0] for p in sparse_parts[level - 1]])
            c = np.concatenate([p[1] for p in sparse_parts[level - 1]])
            v = np.concatenate([p[2] for p in sparse_parts[level - 1]])
            S = sp.csr_matrix((v, (r, c)), shape=(len(cnt), V))
            S.sum_duplicates()
            sparse_sums[level - 1] = S
            sq = np.asarray(S.multiply(S).sum(axis=1)).ravel()
            weighted_norm[level - 1] = float((sq / cnt).sum())
    for level in range(1, order + 1):
        pairs = level_state_ids[level - 1]
        if len(pairs) == 0:
            continue
        cnt = np.asarray(counts[level - 1], dtype=np.float64)
        slot_ids, state_ids = pairs[:, 0], pairs[:, 1]
        visits[state_ids] = cnt[slot_ids].astype(np.int64)
        shift[state_ids] = lse_sums[level - 1][slot_ids] / cnt[slot_ids]
        if exact:
            acc = dense_sums[level - 1][0]
            for lo in range(0, len(slot_ids), 4096):
                sl = slot_ids[lo:lo + 4096]
                means = (acc[torch.from_numpy(sl)] / torch.from_numpy(cnt[sl])[:, None]).numpy()
                store.put_dense(state_ids[lo:lo + 4096], means, ROW_TRACE)
        else:
            S = sparse_sums[level - 1]
            for slot, s in zip(slot_ids.tolist(), state_ids.tolist()):
                lo, hi = S.indptr[slot], S.indptr[slot + 1]
                store.put_sparse(s, S.indices[lo:hi], S.data[lo:hi] / cnt[slot], ROW_TRACE)
    sum_norm_level1 = weighted_norm[0]
    sum_norm_levelk = weighted_norm[order - 1]
    # ---- probe fallback for unvisited 1-gram rows --------------------------------------------
    unvisited = np.flatnonzero(store.source[:V] == ROW_MISSING)
    unvisited = unvisited[unvisited != eos]
    n_probed = 0
    if probe_fallback and len(unvisited) and max_probe_rows > 0:
        cand = _rank_unvisited(store, unvisited, V, max_probe_rows)
        cand = cand[:max_probe_rows]
        if len(cand):
            probed_shift = _probe_into(lm, store, cand, prompts[:max(1, max_probe_prompts)], batch_size=64,
                                       executor=executor)
            shift[cand] = probed_shift
            n_probed = len(cand)
    dense = _want_dense(storage, n_states, K, V)
    tm = store.assemble(tm, dense)
    tm.visits = visits
    tm.sequences = sequences
    shift[tm.eos_index] = np.nan
    tm.row_logit_shift = shift
    if start_count:
        tm.start_row = (start_sum / start_count).numpy()
        tm.start_logit_shift = start_lse / start_count
    # ---- coverage and δ̂² --------------------------------------------------------------------
    visited_mask = tm.row_source == ROW_TRACE
    C = tm.csr()
    row_of = np.repeat(np.arange(n_states), np.diff(C.indptr))
    on_visited = visited_mask[C.indices] | (C.indices == tm.eos_index)
    mass_rows = np.bincount(row_of, weights=C.data * on_visited, minlength=n_states)
    w = visits.astype(np.float64)
    mass_visited = float((w * mass_rows).sum() / w.sum()) if w.sum() > 0 else 0.0
    meta["coverage"] = {
        "rows_visited": float(visited_mask.sum() / n_states),
        "tokens_visited": float(visited_mask[:V].sum() / V),
        "mass_visited": mass_visited,
        "n_visited": int(visited_mask.sum()),
        "n_probed": int(n_probed),
        "n_missing": int((tm.row_source == ROW_MISSING).sum()),
        "n_states": int(n_states),
    }
    d1 = (sumsq_total - sum_norm_level1) / (n_steps * V) if n_steps else float("nan")
    dk = (sumsq_full - sum_norm_levelk) / (n_steps_full * V) if n_steps_full else float("nan")
    meta["delta2_hat"] = max(0.0, d1) if d1 == d1 else None
    meta["delta2_hat_state"] = max(0.0, dk) if dk == dk else None
    meta["delta2_hat_exact"] = bool(exact)
    tm.meta = meta
    return tm


def _decode_keys(keys: np.ndarray, base: int, order: int) -> np.ndarray:
    out = np.full((len(keys), order), -1, dtype=np.int64)
    k = keys.copy()
    for j in range(order - 1, -1, -1):
        out[:, j] = (k % base) - 1
        k //= base
    return out


def _rank_unvisited(store: _RowStore, unvisited: np.ndarray, V: int, budget: int) -> np.ndarray:
    """Unvisited tokens by the inflow they receive from built rows (largest first).

    When they are more than ``budget``, only those a built row's stored entries reach are kept.
    """
    inflow = np.zeros(V)
    for t, p in zip(store.tokens, store.probs):
        if t is not None:
            np.add.at(inflow, t, p)
    if len(unvisited) > budget:
        unvisited = unvisited[inflow[unvisited] > 0]
    order = np.argsort(-inflow[unvisited], kind="stable")
    return unvisited[order]


def _probe_into(lm: "LoadedModel", store: _RowStore, tokens: np.ndarray, prompts: Sequence[str] | ProbePrompts, *,
                batch_size: int = 64, executor: Any = None) -> np.ndarray:
    """Probe ``tokens`` into ``store``; returns their row logit shifts (mean log-normaliser over prompts).

    ``executor``: the rows are probed in shards of whole batches (:func:`probe_shard`) and merged as
    :func:`build_probe` does, so the rows are the same bytes as in this process.
    """
    import torch

    if executor is not None:
        texts = prompts.prompts if isinstance(prompts, ProbePrompts) else list(prompts)
        shift = np.full(lm.vocab_size, np.nan)
        shards = executor.probe_shards(lm, texts, np.asarray(tokens, dtype=np.int64), top_k=store.K,
                                       batch_size=batch_size)
        merge_probe_shards(store, shift, None, shards)
        return shift[np.asarray(tokens, dtype=np.int64)]
    shifts = np.full(len(tokens), np.nan)
    pos = 0
    with torch.inference_mode():
        if isinstance(prompts, ProbePrompts):
            contexts = prompts.contexts(lm)
        else:
            contexts = [_prepare_prompt(lm, p) for p in prompts]
        for chunk, probs, _lse, _each in _probe_dense_rows(lm, contexts, np.asarray(tokens), batch_size=batch_size,
                                                          per_prompt=False, progress=None, top_k=store.K):
            _put_rows(store, chunk, probs, ROW_PROBE)
            if _lse is not None:
                shifts[pos:pos + len(chunk)] = _lse
            pos += len(chunk)
    return shifts


def fill_rows(tm: TransitionMatrix, lm: "LoadedModel", tokens: Sequence[int] | np.ndarray,
              prompts: Sequence[str] | ProbePrompts | None = None, *, batch_size: int = 64,
              executor: Any = None) -> TransitionMatrix:
    """Probe the 1-gram rows ``tokens`` that are still missing and return a new matrix with them.

    For the analysis that probes only the rows the simulation reaches (up to ``--max-probe-rows``,
    ``simulate.simulate_reaching``): call with the missing states a step is about to read, and the
    prompts as :class:`ProbePrompts` (prefixes run once for all calls). Rows already built are left
    alone and the other rows are not rebuilt: the new rows are spliced into the stored entries, so a
    call costs the probe plus a copy of the matrix's arrays. ``prompts`` None: the built-in prompt
    set. ``executor`` (e.g. Ray): the probe runs in shards there, with the same bytes.
    """
    if tm.row_source is None:
        return tm
    toks = np.unique(np.asarray(tokens, dtype=np.int64))
    toks = toks[(toks >= 0) & (toks < tm.vocab_size)]
    toks = toks[tm.row_source[toks] == ROW_MISSING]
    if len(toks) == 0:
        return tm
    store = _RowStore(tm.n_states, tm.vocab_size, tm.eos_token_id, int(tm.meta.get("top_k", DEFAULT_TOP_K)))
    if prompts is None:
        prompts = BUILTIN_PROMPTS
    shifts = _probe_into(lm, store, toks, prompts if isinstance(prompts, ProbePrompts) else list(prompts),
                         batch_size=batch_size, executor=executor)
    new = _with_rows(tm, store, toks)
    shift = np.full(tm.n_states, np.nan) if tm.row_logit_shift is None else tm.row_logit_shift.copy()
    shift[toks] = shifts
    new.row_logit_shift = shift
    cov = dict(new.meta.get("coverage", {}))
    cov["n_probed"] = int(cov.get("n_probed", 0)) + len(toks)
    cov["n_missing"] = int((new.row_source == ROW_MISSING).sum())
    new.meta["coverage"] = cov
    return new


def _with_rows(tm: TransitionMatrix, store: _RowStore, states: np.ndarray) -> TransitionMatrix:
    """A copy of ``tm`` whose rows ``states`` (sorted, unique, not ``<eos>``) are the ones in ``store``.

    The store's token columns are mapped to successor states as :meth:`_RowStore.assemble` does; the
    other rows' entries are copied as they are (no re-sort of the whole matrix), and the state set,
    hence the context lookup, is unchanged.
    """
    rows = [(s, store.tokens[s], store.probs[s]) for s in states.tolist()]
    r = np.concatenate([np.full(len(t), s, dtype=np.int64) for s, t, _ in rows])
    t_all = np.concatenate([t for _, t, _ in rows]).astype(np.int64)
    v = np.concatenate([p for _, _, p in rows]).astype(np.float64)
    c = tm.successor_states(r, t_all)
    o = np.lexsort((c, r))
    r, c, v = r[o], c[o], v[o]
    if tm.is_dense:
        matrix = np.array(tm.matrix, copy=True)
        matrix[states] = 0.0
        matrix[r, c] = v
    else:
        old = tm.matrix
        lengths = np.diff(old.indptr)
        new_lengths = lengths.copy()
        new_lengths[states] = np.bincount(r, minlength=tm.n_states)[states]
        indptr = np.concatenate([[0], np.cumsum(new_lengths)]).astype(old.indptr.dtype)
        indices = np.empty(int(indptr[-1]), dtype=old.indices.dtype)
        data = np.empty(int(indptr[-1]), dtype=np.float64)
        entry_row = np.repeat(np.arange(tm.n_states), lengths)
        kept_rows = np.ones(tm.n_states, dtype=bool)
        kept_rows[states] = False
        src = np.flatnonzero(kept_rows[entry_row])
        src_row = entry_row[src]
        dest = indptr[src_row] + (src - old.indptr[src_row])
        indices[dest], data[dest] = old.indices[src], old.data[src]
        dest = indptr[r] + (np.arange(len(r)) - np.searchsorted(r, r))
        indices[dest], data[dest] = c, v
        matrix = sp.csr_matrix((data, indices, indptr), shape=old.shape)
        matrix.has_sorted_indices = True
    residual = tm.residual.copy()
    residual[states] = store.residual[states]
    source = tm.row_source.copy()
    source[states] = store.source[states]
    new = replace(tm, matrix=matrix, residual=residual, row_source=source, meta=dict(tm.meta),
                              per_prompt=None)
    new._lookup = tm._lookup
    return new


def first_step_logits(lm: "LoadedModel", prompts: Sequence[str], *, batch_size: int = 16,
                      max_source_tokens: int | None = None) -> np.ndarray:
    """Raw logits of an encoder-decoder model's first decoding step, ``(len(prompts), vocab)`` float64.

    Step 1 follows only the decoder start token, so its distribution is a function of the input ``x``
    alone: the chain simulation of a measurement prompt starts from it (spec §7.1, "from the prompts'
    start states"). One encoder pass and one decoder step per prompt; no output is generated.
    """
    import torch

    if lm.kind != "seq2seq":
        raise UsageError("first_step_logits is for encoder-decoder models; a decoder-only prompt is its own context")
    rows = []
    with torch.inference_mode():
        for lo in range(0, len(prompts), batch_size):
            enc = lm.tokenizer(list(prompts[lo:lo + batch_size]), return_tensors="pt", padding=True,
                               truncation=True, max_length=max_source_tokens or lm.max_source_tokens)
            start = torch.full((enc["input_ids"].shape[0], 1), lm.decoder_start_token_id, dtype=torch.long)
            out = lm.model(input_ids=enc["input_ids"].to(lm.device), attention_mask=enc["attention_mask"].to(lm.device),
                           decoder_input_ids=start.to(lm.device))
            rows.append(out.logits[:, 0].double().cpu().numpy())
    return np.concatenate(rows, axis=0)


def build_matrix(lm: "LoadedModel", *, mode: str = "trace", prompts: Sequence[str] | None = None,
                 order: int | None = None, top_k: int | None = None, **kwargs: Any) -> TransitionMatrix:
    """Front door: ``mode="probe"`` (order 1 only) or ``"trace"`` (k-gram, default order 2)."""
    if mode == "probe":
        if order not in (None, 1):
            raise UsageError("the probe builds order-1 rows: use --mode trace for --order ≥ 2")
        return build_probe(lm, prompts, top_k=top_k, **kwargs)
    if mode == "trace":
        return build_trace(lm, prompts, order=2 if order is None else order, top_k=top_k, **kwargs)
    raise UsageError(f"unknown --mode {mode!r}: use probe or trace")


def read_prompts(path: str | os.PathLike[str]) -> list[str]:
    """Prompts from a file: one per line (blank lines skipped), or ``.jsonl`` with a prompt/text field."""
    from .errors import BadInputError

    p = Path(path)
    if not p.exists():
        raise BadInputError(f"prompts file {str(p)!r} does not exist: check the path")
    text = p.read_text(encoding="utf-8")
    out: list[str] = []
    if p.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise BadInputError(f"{p.name} line {n} is not JSON: {exc}") from exc
            val = obj.get("prompt", obj.get("text")) if isinstance(obj, dict) else obj
            if not isinstance(val, str):
                raise BadInputError(f"{p.name} line {n} has no string 'prompt' or 'text' field")
            out.append(val)
    else:
        out = [line.rstrip("\n") for line in text.splitlines() if line.strip()]
    if not out:
        raise BadInputError(f"prompts file {p.name} holds no prompts")
    return out
