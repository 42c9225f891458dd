"""Decoding policies: one object that is both a transform of a transition matrix and ``generate()`` kwargs.

A :class:`Policy` holds decoding knobs under their ``GenerationConfig`` names (``do_sample``,
``temperature``, ``top_k``, ``top_p``, ``min_p``, ``typical_p``, ``epsilon_cutoff``, ``eta_cutoff``,
``repetition_penalty``, ``encoder_repetition_penalty``, ``no_repeat_ngram_size``, ``num_beams``,
``penalty_alpha``) plus repdiag's own ``eos_boost`` (FU21's β, spec §8.6), ``consistent`` (keep
``<eos>`` through every truncation, spec §8.5) and ``rebalanced_encoding`` (FU21's γ, spec §8.10).

* :meth:`Policy.apply` transforms a row-stochastic matrix (dense or CSR) as spec §8, in Hugging
  Face's processor order: processors on logits (``<eos>`` boost, which is HF's ``sequence_bias`` and
  therefore runs first; repetition penalty as the Markov self-window of §8.8; no-repeat-n-gram is
  *not* a row transform and leaves the matrix unchanged, its effect is the cap
  :attr:`Policy.ngram_cap` of §8.9), then, only when sampling: temperature → top-k → top-p → min-p →
  typical → epsilon → eta. Without sampling the row becomes one-hot at the lowest-index argmax.
  Each step reproduces the arithmetic of the corresponding ``transformers`` class (float64),
  including ``min_tokens_to_keep`` and tie handling (top-k keeps ties, typical keeps ties on the
  score at the cut, top-p orders equal probabilities lower id first, spec §1/A11; HF's stable
  ascending sort keeps the *higher* id when the nucleus boundary falls exactly inside a tie, the one
  place where the two can differ).
* The knobs a user leaves unset take Hugging Face's global defaults, as ``generate()`` does; in
  particular ``do_sample=True`` without ``top_k`` means **top-k 50**. :meth:`Policy.resolve` merges a
  model's own ``generation_config`` the way ``generate()`` does, so the matrix transform and the run
  agree.
* :meth:`Policy.generate_kwargs` gives exactly what ``generate()`` gets (nothing hidden), and
  :meth:`Policy.logits_processors` the ``LogitsProcessorList`` that ``generate()`` would build for
  this policy, from ``transformers``' own classes (used by the chain simulator).

Measure-only policies (beam search, contrastive search, the encoder repetition penalty) have no
row-stochastic form; their :meth:`~Policy.apply` gives the deterministic surrogate (the processors,
then greedy) and :attr:`~Policy.exactness` says "measure only". Rebalanced encoding is "prediction
only": it changes the vocabulary, so :func:`rebalance_matrix` returns a larger matrix.

This module imports numpy/scipy only; torch and transformers are imported inside the methods that
build ``transformers`` objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import scipy.sparse as sp

from .errors import PolicyError

__all__ = [
    "Policy",
    "parse_policy",
    "PARAMS",
    "HF_DEFAULTS",
    "EXACTNESS_LABELS",
    "rebalance_matrix",
    "row_collision_full",
]

#: Hugging Face's global defaults for the knobs repdiag models
#: (``GenerationConfig._get_default_generation_params()``, transformers 5.x; a test checks them).
HF_DEFAULTS: dict[str, Any] = {
    "do_sample": False,
    "num_beams": 1,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "typical_p": 1.0,
    "min_p": None,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "penalty_alpha": None,
}

_REPDIAG_DEFAULTS: dict[str, Any] = {"eos_boost": 0.0, "consistent": False, "rebalanced_encoding": None}

#: accepted parameter -> (type, allowed range in words); the order is the canonical spec-string order.
PARAMS: dict[str, tuple[type, str]] = {
    "do_sample": (bool, "true|false"),
    "num_beams": (int, "integer >= 1"),
    "penalty_alpha": (float, "0 <= x <= 1"),
    "repetition_penalty": (float, "> 0"),
    "encoder_repetition_penalty": (float, "> 0"),
    "no_repeat_ngram_size": (int, "integer >= 0"),
    "eos_boost": (float, "finite real"),
    "temperature": (float, "> 0"),
    "top_k": (int, "integer >= 0 (0 = off)"),
    "top_p": (float, "0 < x <= 1"),
    "min_p": (float, "0 <= x <= 1"),
    "typical_p": (float, "0 < x <= 1"),
    "epsilon_cutoff": (float, "0 <= x < 1"),
    "eta_cutoff": (float, "0 <= x < 1"),
    "consistent": (bool, "true|false (keep <eos> through truncations)"),
    "rebalanced_encoding": (float, "0 < gamma < 1 (prediction only)"),
}

EXACTNESS_LABELS = ("exact row transform", "Markov approximation", "prediction only", "measure only")

_EXACTNESS_RANK = {label: i for i, label in enumerate(EXACTNESS_LABELS)}


def _allowed_line() -> str:
    return "; ".join(f"{k} ({r})" for k, (_, r) in PARAMS.items())


def _check_range(key: str, value: Any) -> None:
    ok = True
    if key == "num_beams":
        ok = value >= 1
    elif key == "penalty_alpha":
        ok = 0.0 <= value <= 1.0
    elif key in ("repetition_penalty", "encoder_repetition_penalty", "temperature"):
        ok = value > 0 and math.isfinite(value)
    elif key in ("no_repeat_ngram_size", "top_k"):
        ok = value >= 0
    elif key == "eos_boost":
        ok = math.isfinite(value)
    elif key in ("top_p", "typical_p"):
        ok = 0.0 < value <= 1.0
    elif key == "min_p":
        ok = 0.0 <= value <= 1.0
    elif key in ("epsilon_cutoff", "eta_cutoff"):
        ok = 0.0 <= value < 1.0
    elif key == "rebalanced_encoding":
        ok = 0.0 < value < 1.0
    if not ok:
        raise PolicyError(f"policy parameter {key}={value!r} is out of range: {key} must be {PARAMS[key][1]}")


def _coerce(key: str, value: Any) -> Any:
    if key not in PARAMS:
        raise PolicyError(f"unknown policy parameter {key!r}; allowed: {_allowed_line()}")
    typ = PARAMS[key][0]
    if value is None and key in ("min_p", "penalty_alpha", "rebalanced_encoding"):
        return None
    try:
        if typ is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                value = low in ("true", "1", "yes")
            elif isinstance(value, (bool, np.bool_)) or value in (0, 1):
                value = bool(value)
            else:
                raise ValueError
        elif typ is int:
            if isinstance(value, str):
                f = float(value.strip())
            else:
                f = float(value)
            if isinstance(value, bool) or not f.is_integer():
                raise ValueError
            value = int(f)
        else:
            if isinstance(value, bool):
                raise ValueError
            value = float(value.strip()) if isinstance(value, str) else float(value)
            if math.isnan(value):
                raise ValueError
    except (TypeError, ValueError):
        raise PolicyError(
            f"policy parameter {key}={value!r} is not a valid {typ.__name__}: {key} must be {PARAMS[key][1]}"
        ) from None
    _check_range(key, value)
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


@dataclass(frozen=True)
class Policy:
    """A decoding policy; see the module docstring. Build one with :func:`parse_policy` or the registry."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    source: str = ""

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted((k, repr(v)) for k, v in self.params.items()))))

    def __post_init__(self) -> None:
        clean = {k: _coerce(k, v) for k, v in dict(self.params).items()}
        object.__setattr__(self, "params", clean)

    # ------------------------------------------------------------------ resolved knobs
    def effective(self) -> dict[str, Any]:
        """Every knob as ``generate()`` would see it on a model without its own generation defaults."""
        eff = dict(HF_DEFAULTS)
        eff.update(_REPDIAG_DEFAULTS)
        eff.update(self.params)
        return eff

    def resolve(self, generation_config: Any = None) -> "Policy":
        """A copy with the model's ``generation_config`` values filled in where this policy sets none.

        ``generate()`` takes, for each knob, the call's kwarg, else the model's ``generation_config``,
        else the global default. Pass ``model.generation_config`` (or a dict) to get the policy that a
        ``generate(**self.generate_kwargs())`` call on that model really runs.
        """
        if generation_config is None:
            return self
        base = generation_config if isinstance(generation_config, Mapping) else generation_config.to_dict()
        params = dict(self.params)
        for key in HF_DEFAULTS:
            if key not in params and base.get(key) is not None:
                value = base[key]
                if value != HF_DEFAULTS[key]:
                    params[key] = value
        return Policy(self.name, params, self.description, self.source)

    @property
    def do_sample(self) -> bool:
        return bool(self.effective()["do_sample"])

    @property
    def is_contrastive(self) -> bool:
        e = self.effective()
        return (
            not e["do_sample"]
            and e["num_beams"] == 1
            and e["penalty_alpha"] is not None
            and e["penalty_alpha"] > 0
            and e["top_k"] is not None
            and e["top_k"] > 1
        )

    @property
    def ngram_cap(self) -> int | None:
        """``N`` of ``no_repeat_ngram_size`` (spec §8.9: ``E_k(t)`` impossible for ``k ≥ N−1``), or None."""
        n = self.effective()["no_repeat_ngram_size"]
        return int(n) if n else None

    def _components(self) -> list[tuple[str, str, bool]]:
        """(family, exactness, row_local) of each active ingredient, in HF order."""
        e = self.effective()
        comps: list[tuple[str, str, bool]] = []
        if e["rebalanced_encoding"] is not None:
            comps.append(("rebalanced-encoding", "prediction only", False))
        if e["eos_boost"]:
            comps.append(("eos-boost", "exact row transform", True))
        if e["encoder_repetition_penalty"] != 1.0:
            comps.append(("penalty", "measure only", False))
        if e["repetition_penalty"] != 1.0:
            comps.append(("penalty", "Markov approximation", False))
        if e["no_repeat_ngram_size"]:
            comps.append(("ngram-ban", "Markov approximation", False))
        if e["num_beams"] > 1:
            comps.append(("beam", "measure only", False))
        elif self.is_contrastive:
            comps.append(("contrastive", "measure only", False))
        elif not e["do_sample"]:
            comps.append(("greedy", "exact row transform", True))
        else:
            if e["temperature"] != 1.0:
                comps.append(("temperature", "exact row transform", True))
            if self._truncations(e):
                comps.append(("truncation", "exact row transform", True))
            if not comps or all(c[0] in ("eos-boost",) for c in comps):
                comps.append(("sampling", "exact row transform", True))
        return comps

    @staticmethod
    def _truncations(e: Mapping[str, Any]) -> list[str]:
        out = []
        if e["top_k"]:
            out.append("top_k")
        if e["top_p"] is not None and e["top_p"] < 1.0:
            out.append("top_p")
        if e["min_p"] is not None:
            out.append("min_p")
        if e["typical_p"] is not None and e["typical_p"] < 1.0:
            out.append("typical_p")
        if e["epsilon_cutoff"] and 0.0 < e["epsilon_cutoff"] < 1.0:
            out.append("epsilon_cutoff")
        if e["eta_cutoff"] and 0.0 < e["eta_cutoff"] < 1.0:
            out.append("eta_cutoff")
        return out

    @property
    def family(self) -> str:
        """greedy | sampling | temperature | truncation | penalty | ngram-ban | eos-boost | beam |
        contrastive | rebalanced-encoding | composite (more than one of these)."""
        fams = []
        for fam, _, _ in self._components():
            if fam not in fams:
                fams.append(fam)
        # greedy decoding under a penalty is still "the penalty"; sampling at T=1 is the base
        core = [f for f in fams if f not in ("greedy", "sampling")] or fams
        return core[0] if len(core) == 1 else "composite"

    @property
    def row_local(self) -> bool:
        """True when the policy acts on each row alone (no history, no model internals)."""
        return all(c[2] for c in self._components())

    @property
    def exactness(self) -> str:
        """The weakest label of the ingredients, one of :data:`EXACTNESS_LABELS`."""
        return max((c[1] for c in self._components()), key=lambda s: _EXACTNESS_RANK[s])

    @property
    def measurable(self) -> bool:
        """False for prediction-only policies (rebalanced encoding needs a retrained model)."""
        return self.effective()["rebalanced_encoding"] is None

    # ------------------------------------------------------------------ generate() side
    def generate_kwargs(self, eos_token_id: int | None = None) -> dict[str, Any]:
        """The kwargs for ``model.generate(**inputs, **kwargs)``: exactly this policy, nothing hidden.

        Only the knobs this policy sets are passed (the rest keep ``generate()``'s own defaults, so
        ``do_sample=True`` alone means HF's top-k 50, as :meth:`apply` assumes). ``eos_boost`` becomes
        ``sequence_bias={(eos,): beta}`` and ``consistent`` becomes a ``logits_processor`` list with
        HF's warpers wrapped to keep ``<eos>`` (and HF's own warpers switched off); both need
        ``eos_token_id``. Contrastive search adds ``custom_generate=repdiag.contrastive.contrastive_generate``
        (transformers 5 moved it to the Hub; repdiag's local implementation needs no remote code).
        """
        if not self.measurable:
            raise PolicyError(
                f"policy {self.name!r} is prediction only (rebalanced encoding needs a model retrained on the "
                "merged vocabulary): it has no generate() kwargs"
            )
        p = dict(self.params)
        kwargs: dict[str, Any] = {}
        beta = p.pop("eos_boost", 0.0)
        consistent = p.pop("consistent", False)
        for key in PARAMS:
            if key in p:
                kwargs[key] = p[key]
        if beta:
            if eos_token_id is None:
                raise PolicyError(
                    f"policy {self.name!r} boosts <eos>: pass the model's eos id, generate_kwargs(eos_token_id=...)"
                )
            kwargs["sequence_bias"] = {(int(eos_token_id),): float(beta)}
        if consistent and self.do_sample:
            if eos_token_id is None:
                raise PolicyError(
                    f"policy {self.name!r} keeps <eos> through truncations: pass generate_kwargs(eos_token_id=...)"
                )
            warpers = self._warpers(int(eos_token_id), num_beams=self.effective()["num_beams"])
            for key, off in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0), ("min_p", None),
                             ("typical_p", 1.0), ("epsilon_cutoff", 0.0), ("eta_cutoff", 0.0)):
                kwargs[key] = off
            kwargs["logits_processor"] = warpers
        if self.is_contrastive:
            from .contrastive import contrastive_generate

            kwargs["custom_generate"] = contrastive_generate
        return kwargs

    def _warpers(self, eos_token_id: int | None, num_beams: int = 1):
        """HF's warper objects for this policy in HF's order (consistent ones wrapped to keep <eos>)."""
        from transformers import (
            EpsilonLogitsWarper,
            EtaLogitsWarper,
            LogitsProcessorList,
            MinPLogitsWarper,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
            TypicalLogitsWarper,
        )

        e = self.effective()
        mtk = 2 if num_beams > 1 else 1  # HF: len(eos ids) + 1 under beams; repdiag models one eos id
        out = LogitsProcessorList()
        if e["temperature"] is not None and e["temperature"] != 1.0:
            out.append(TemperatureLogitsWarper(float(e["temperature"])))
        trunc = []
        if e["top_k"]:
            trunc.append(TopKLogitsWarper(top_k=int(e["top_k"]), min_tokens_to_keep=mtk))
        if e["top_p"] is not None and e["top_p"] < 1.0:
            trunc.append(TopPLogitsWarper(top_p=e["top_p"], min_tokens_to_keep=mtk))
        if e["min_p"] is not None:
            trunc.append(MinPLogitsWarper(min_p=e["min_p"], min_tokens_to_keep=mtk))
        if e["typical_p"] is not None and e["typical_p"] < 1.0:
            trunc.append(TypicalLogitsWarper(mass=e["typical_p"], min_tokens_to_keep=mtk))
        if e["epsilon_cutoff"] and 0.0 < e["epsilon_cutoff"] < 1.0:
            trunc.append(EpsilonLogitsWarper(epsilon=e["epsilon_cutoff"], min_tokens_to_keep=mtk))
        if e["eta_cutoff"] and 0.0 < e["eta_cutoff"] < 1.0:
            trunc.append(EtaLogitsWarper(epsilon=e["eta_cutoff"], min_tokens_to_keep=mtk))
        if e["consistent"]:
            if eos_token_id is None:
                raise PolicyError(f"policy {self.name!r} keeps <eos>: pass eos_token_id")
            trunc = [_keep_eos_class()(w, eos_token_id) for w in trunc]
        out.extend(trunc)
        return out

    def logits_processors(
        self,
        eos_token_id: int | None = None,
        *,
        encoder_input_ids: Any = None,
        prompt_ignore_length: Any = None,
    ):
        """The ``LogitsProcessorList`` that ``generate()`` builds for this policy, from HF's own classes.

        Order as ``GenerationMixin._get_logits_processor``: ``sequence_bias`` (the ``<eos>`` boost) →
        encoder repetition penalty (only with ``encoder_input_ids``) → repetition penalty →
        no-repeat-n-gram → [only if sampling] temperature → top-k → top-p → min-p → typical → epsilon →
        eta. Processors are stateful objects: build a fresh list per simulated batch.
        Contrastive search and beam search select tokens outside this list (their processors are
        the ones here; the selection rule is not).
        """
        from transformers import (
            EncoderRepetitionPenaltyLogitsProcessor,
            LogitsProcessorList,
            NoRepeatNGramLogitsProcessor,
            RepetitionPenaltyLogitsProcessor,
            SequenceBiasLogitsProcessor,
        )

        e = self.effective()
        out = LogitsProcessorList()
        if e["eos_boost"]:
            if eos_token_id is None:
                raise PolicyError(f"policy {self.name!r} boosts <eos>: pass eos_token_id")
            out.append(SequenceBiasLogitsProcessor(sequence_bias={(int(eos_token_id),): float(e["eos_boost"])}))
        if e["encoder_repetition_penalty"] != 1.0 and encoder_input_ids is not None:
            out.append(
                EncoderRepetitionPenaltyLogitsProcessor(
                    penalty=e["encoder_repetition_penalty"], encoder_input_ids=encoder_input_ids
                )
            )
        if e["repetition_penalty"] != 1.0:
            out.append(RepetitionPenaltyLogitsProcessor(e["repetition_penalty"], prompt_ignore_length=prompt_ignore_length))
        if e["no_repeat_ngram_size"]:
            out.append(NoRepeatNGramLogitsProcessor(int(e["no_repeat_ngram_size"])))
        if e["do_sample"]:
            out.extend(self._warpers(eos_token_id, num_beams=e["num_beams"]))
        return out

    # ------------------------------------------------------------------ matrix side
    def apply(
        self,
        A: np.ndarray | sp.spmatrix,
        eos_index: int,
        *,
        logits: np.ndarray | None = None,
        row_logit_shift: np.ndarray | None = None,
        residual: np.ndarray | None = None,
        state_tokens: np.ndarray | None = None,
    ) -> np.ndarray | sp.csr_matrix:
        """The policy matrix ``A^π`` of spec §8 (same type and shape as ``A``; the ``<eos>`` row is kept).

        ``logits`` (dense, same shape) or ``row_logit_shift`` (``c_i`` with ``z_ij = log A_ij + c_i``) give
        the logits that the repetition penalty's sign rule needs; without them ``z = log A``.
        ``state_tokens`` (``(N, k)`` token ids, ``-1`` padded, as :class:`TransitionMatrix`) makes the
        self-window penalise every token of a k-gram state (column ``j`` stands for its last token);
        without it state ``i`` is token ``i``. A positive ``residual`` (unstored mass per row) is spread
        uniformly over the row's unstored non-eos columns first and the result is **dense** (spec A3: a
        top-K store is never a top-K policy); matrices over 4096 states with a residual raise.
        Rebalanced encoding (prediction only) **changes the shape**: the merged states of
        :func:`rebalance_matrix` (at most 50 merges) are inserted before ``<eos>`` when it is last (so it
        stays last), else appended; the logits/shift/state-token arguments are not carried over.
        """
        n = A.shape[0]
        gamma = self.effective()["rebalanced_encoding"]
        if gamma is not None:
            if n > _DENSIFY_LIMIT:
                raise PolicyError(
                    f"rebalanced encoding works on dense matrices up to {_DENSIFY_LIMIT} states, got {n}: "
                    "build a smaller matrix (fewer probe rows)"
                )
            if not 0 <= eos_index < n:
                raise PolicyError(f"eos index {eos_index} is out of range for a {n}-state matrix")
            if residual is not None and np.any(np.asarray(residual) > 0):
                A = _spread_residual(A, np.asarray(residual, dtype=np.float64).reshape(-1), eos_index)
            merged, new_eos, _, _ = rebalance_matrix(A, eos_index, gamma)
            rest = {k: v for k, v in self.params.items() if k != "rebalanced_encoding"}
            out = Policy(self.name, rest).apply(merged, new_eos)
            return sp.csr_matrix(out) if sp.issparse(A) else out
        if residual is not None and np.any(np.asarray(residual) > 0):
            A = _spread_residual(A, np.asarray(residual, dtype=np.float64).reshape(-1), eos_index)
        if A.ndim != 2 or A.shape[1] != n:
            raise PolicyError(f"policy {self.name!r}: the matrix must be square, got shape {A.shape}")
        if not 0 <= eos_index < n:
            raise PolicyError(f"eos index {eos_index} is out of range for a {n}-state matrix")
        shift = None if row_logit_shift is None else np.asarray(row_logit_shift, dtype=np.float64).reshape(-1)
        col_tok = None
        hist = None
        if state_tokens is not None:
            st = np.asarray(state_tokens, dtype=np.int64)
            if st.ndim == 1:
                st = st[:, None]
            col_tok = st[:, -1]
            hist = st
        if sp.issparse(A):
            return self._apply_csr(sp.csr_matrix(A, dtype=np.float64), eos_index, shift, col_tok, hist, logits)
        return self._apply_dense(np.asarray(A, dtype=np.float64), eos_index, shift, col_tok, hist, logits)

    def transform(self, A, eos_index: int, **kwargs: Any) -> tuple[np.ndarray | sp.csr_matrix, int]:
        """``(A^π, eos index in A^π)``: :meth:`apply` plus where ``<eos>`` ended up (it moves only under
        rebalanced encoding, which adds states; when ``<eos>`` was last it stays last)."""
        out = self.apply(A, eos_index, **kwargs)
        n = A.shape[0]
        new_eos = out.shape[0] - 1 if (out.shape[0] != n and eos_index == n - 1) else eos_index
        return out, new_eos

    def _apply_dense(self, A, eos, shift, col_tok, hist, logits) -> np.ndarray:
        n = A.shape[0]
        rows = np.array([i for i in range(n) if i != eos], dtype=np.int64)
        out = A.copy()
        if rows.size == 0:
            return out
        with np.errstate(divide="ignore"):
            if logits is not None:
                Z = np.asarray(logits, dtype=np.float64)[rows].copy()
                Z[A[rows] <= 0] = -np.inf
            else:
                Z = np.log(A[rows])
        if shift is not None and logits is None:
            Z = Z + shift[rows, None]
        cols = np.broadcast_to(np.arange(n, dtype=np.int64), Z.shape)
        out[rows] = self.transform_logits(Z, cols, eos, self_rows=rows, col_tokens=col_tok, history=hist)
        return out

    def _apply_csr(self, A, eos, shift, col_tok, hist, logits) -> sp.csr_matrix:
        A = A.copy()
        A.sort_indices()
        A.eliminate_zeros()
        A.sort_indices()
        n = A.shape[0]
        indptr, indices = A.indptr, A.indices
        data = A.data.copy()
        nnz = np.diff(indptr)
        rows_all = np.argsort(nnz, kind="stable")
        rows_all = rows_all[rows_all != eos].astype(np.int64)
        widths = np.maximum(nnz[rows_all], 1)
        budget = _BLOCK_BUDGET  # rows are grouped by their number of stored entries
        start = 0
        while start < rows_all.size:
            cost = np.arange(1, rows_all.size - start + 1) * widths[start:]
            stop = start + max(int(np.searchsorted(cost, budget, side="right")), 1)
            rows = rows_all[start:stop]
            m = int(widths[stop - 1])
            start = stop
            Z = np.full((rows.size, m), -np.inf)
            cols = np.full((rows.size, m), -1, dtype=np.int64)
            lens = nnz[rows]
            pos = np.arange(m)[None, :]
            mask = pos < lens[:, None]
            flat = (indptr[rows][:, None] + pos)[mask]
            cols[mask] = indices[flat]
            with np.errstate(divide="ignore"):
                vals = np.log(data[flat])
            if logits is not None:
                L = sp.csr_matrix(logits) if sp.issparse(logits) else np.asarray(logits)
                lv = np.asarray(L[np.repeat(rows, lens), indices[flat]], dtype=np.float64).reshape(-1)
                vals = np.where(np.isfinite(vals), lv, -np.inf)
            elif shift is not None:
                vals = vals + np.repeat(shift[rows], lens)
            Z[mask] = vals
            P = self.transform_logits(Z, cols, eos, self_rows=rows, col_tokens=col_tok, history=hist)
            data[flat] = P[mask]
        out = sp.csr_matrix((data, indices.copy(), indptr.copy()), shape=A.shape)
        out.eliminate_zeros()
        return out

    def transform_logits(
        self,
        Z: np.ndarray,
        cols: np.ndarray,
        eos_index: int,
        *,
        self_rows: np.ndarray | None = None,
        col_tokens: np.ndarray | None = None,
        history: np.ndarray | None = None,
    ) -> np.ndarray:
        """Rows of logits ``Z`` (``-inf`` = impossible) → rows of probabilities under this policy.

        ``cols`` holds each entry's column (state) id, ``-1`` for padding; ``self_rows`` the state of
        each row (for the repetition penalty's self-window). Vectorised over rows; every sort is
        inside a row (stable, so equal values keep the lower column first).
        """
        e = self.effective()
        Z = np.array(Z, dtype=np.float64, copy=True)
        eos_mask = cols == eos_index
        valid = cols >= 0
        Z[~valid] = -np.inf
        # 1. sequence_bias on <eos> (FU21's length penalty T_l, spec §8.6)
        if e["eos_boost"]:
            Z = np.where(eos_mask & np.isfinite(Z), Z + float(e["eos_boost"]), Z)
        # 2. repetition penalty, Markov self-window (spec §8.8): HF's sign rule on the logits
        theta = e["repetition_penalty"]
        if theta != 1.0 and self_rows is not None:
            if history is None:
                pen = cols == np.asarray(self_rows)[:, None]
            else:
                ctok = np.where(valid, col_tokens[np.maximum(cols, 0)] if col_tokens is not None else cols, -2)
                h = history[np.asarray(self_rows)]
                pen = np.zeros(Z.shape, dtype=bool)
                for c in range(h.shape[1]):
                    pen |= (ctok == h[:, c : c + 1]) & (h[:, c : c + 1] >= 0)
            pen &= valid
            Z = np.where(pen, np.where(Z < 0, Z * theta, Z / theta), Z)
        # 3. no-repeat-n-gram: not a row transform (spec §8.9, see ngram_cap)
        if not e["do_sample"]:
            # greedy (and the deterministic surrogate of beam / contrastive search)
            P = np.zeros_like(Z)
            finite = np.isfinite(Z).any(axis=1)
            am = np.argmax(np.where(valid, Z, -np.inf), axis=1)
            P[np.nonzero(finite)[0], am[finite]] = 1.0
            return P
        keep_eos = bool(e["consistent"])
        mtk = 2 if e["num_beams"] > 1 else 1
        if e["temperature"] != 1.0:
            Z = Z / float(e["temperature"])
        if e["top_k"]:
            Z = _top_k(Z, int(e["top_k"]), mtk, eos_mask if keep_eos else None)
        if e["top_p"] is not None and e["top_p"] < 1.0:
            Z = _top_p(Z, float(e["top_p"]), mtk, eos_mask if keep_eos else None)
        if e["min_p"] is not None:
            Z = _min_p(Z, float(e["min_p"]), mtk, eos_mask if keep_eos else None)
        if e["typical_p"] is not None and e["typical_p"] < 1.0:
            Z = _typical(Z, float(e["typical_p"]), mtk, eos_mask if keep_eos else None)
        if e["epsilon_cutoff"] and 0.0 < e["epsilon_cutoff"] < 1.0:
            Z = _epsilon(Z, float(e["epsilon_cutoff"]), mtk, eos_mask if keep_eos else None)
        if e["eta_cutoff"] and 0.0 < e["eta_cutoff"] < 1.0:
            # HF keeps epsilon as a float32 tensor: use the same rounded value
            Z = _eta(Z, float(np.float32(e["eta_cutoff"])), mtk, eos_mask if keep_eos else None)
        return _softmax(Z)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "params": dict(self.params),
            "family": self.family,
            "exactness": self.exactness,
            "row_local": self.row_local,
            "ngram_cap": self.ngram_cap,
            "description": self.description,
            "source": self.source,
        }

    def spec_string(self) -> str:
        """The canonical comma-separated form of :attr:`params` (parsable by :func:`parse_policy`)."""
        return ",".join(f"{k}={_fmt(self.params[k])}" for k in PARAMS if k in self.params)


_DENSIFY_LIMIT = 4096
_BLOCK_BUDGET = 4_000_000  # entries per padded block of CSR rows


def _spread_residual(A, residual: np.ndarray, eos: int) -> np.ndarray:
    """Dense matrix with each row's unstored mass spread uniformly over its unstored non-eos columns
    (the residual-uniform model of spec §2.3/A3, as ``TransitionMatrix.to_dense``)."""
    n = A.shape[0]
    if n > _DENSIFY_LIMIT:
        raise PolicyError(
            f"the {n}-state matrix stores only part of each row (residual > 0) and is too large to densify "
            f"(limit {_DENSIFY_LIMIT}): build it with a larger top_k or apply the policy per prompt"
        )
    D = np.asarray(A.toarray() if sp.issparse(A) else A, dtype=np.float64).copy()
    stored = (sp.csr_matrix(A) != 0).toarray() if sp.issparse(A) else D != 0
    for i in np.nonzero(residual > 0)[0]:
        if i == eos:
            continue
        free = ~stored[i]
        free[eos] = False
        cnt = int(free.sum())
        if cnt:
            D[i, free] += residual[i] / cnt
    return D


# ---------------------------------------------------------------------------- row kernels (float64)
def _softmax(Z: np.ndarray) -> np.ndarray:
    mx = np.max(Z, axis=1, keepdims=True)
    good = np.isfinite(mx)
    mx = np.where(good, mx, 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        E = np.exp(Z - mx)
    E[~np.isfinite(Z)] = 0.0
    s = E.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        P = np.where(s > 0, E / np.where(s > 0, s, 1.0), 0.0)
    return P


def _kth_largest(Z: np.ndarray, k: int) -> np.ndarray:
    k = min(max(k, 1), Z.shape[1])
    return -np.partition(-Z, k - 1, axis=1)[:, k - 1 : k]


def _mask(Z: np.ndarray, remove: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    if keep is not None:
        remove = remove & ~keep
    return np.where(remove, -np.inf, Z)


def _top_k(Z, k, mtk, keep):
    k = max(k, mtk)
    thr = _kth_largest(Z, k)
    return _mask(Z, Z < thr, keep)


def _desc_order(Z: np.ndarray) -> np.ndarray:
    """Stable descending order inside each row: equal values keep the lower column first."""
    return np.argsort(-Z, axis=1, kind="stable")


def _top_p(Z, p, mtk, keep):
    order = _desc_order(Z)
    Zs = np.take_along_axis(Z, order, axis=1)
    asc = _softmax(Zs)[:, ::-1]  # ascending, equal values: higher column first (removed first)
    cum = np.cumsum(asc, axis=1)
    rem_asc = cum <= (1.0 - p)
    rem_asc[:, max(asc.shape[1] - mtk, 0) :] = False
    rem_desc = rem_asc[:, ::-1]
    remove = np.empty_like(rem_desc)
    np.put_along_axis(remove, order, rem_desc, axis=1)
    return _mask(Z, remove, keep)


def _min_p(Z, min_p, mtk, keep):
    P = _softmax(Z)
    remove = P < min_p * P.max(axis=1, keepdims=True)
    k = min(mtk, Z.shape[1])
    top = _desc_order(P)[:, :k]
    np.put_along_axis(remove, top, False, axis=1)
    return _mask(Z, remove, keep)


def _typical(Z, mass, mtk, keep):
    finite = np.isfinite(Z)
    mx = np.max(np.where(finite, Z, -np.inf), axis=1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        lse = mx + np.log(np.sum(np.where(finite, np.exp(Z - mx), 0.0), axis=1, keepdims=True))
        logp = np.where(finite, Z - lse, -np.inf)
        p = np.exp(logp)
        ent = -np.sum(np.where(finite, logp * p, 0.0), axis=1, keepdims=True)
        score = np.abs(-logp - ent)
    order = np.argsort(score, axis=1, kind="stable")
    ss = np.take_along_axis(score, order, axis=1)
    cum = np.cumsum(_softmax(np.take_along_axis(Z, order, axis=1)), axis=1)
    last = np.minimum((cum < mass).sum(axis=1), Z.shape[1] - 1)
    thr = np.take_along_axis(ss, last[:, None], axis=1)
    rem_sorted = ss > thr
    rem_sorted[:, :mtk] = False
    remove = np.empty_like(rem_sorted)
    np.put_along_axis(remove, order, rem_sorted, axis=1)
    return _mask(Z, remove, keep)


def _epsilon(Z, eps, mtk, keep):
    P = _softmax(Z)
    remove = (P < eps) & (Z < _kth_largest(Z, mtk))
    return _mask(Z, remove, keep)


def _eta(Z, eps, mtk, keep):
    P = _softmax(Z)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.sum(np.where(P > 0, P * np.log(np.where(P > 0, P, 1.0)), 0.0), axis=1, keepdims=True)
    eta = np.minimum(eps, math.sqrt(eps) * np.exp(-ent))
    remove = (P < eta) & (Z < _kth_largest(Z, mtk))
    return _mask(Z, remove, keep)


_KEEP_EOS_CLASS = None


def _keep_eos_class():
    """A LogitsProcessor wrapping one HF warper so that it never removes ``<eos>`` (spec §8.5)."""
    global _KEEP_EOS_CLASS
    if _KEEP_EOS_CLASS is None:
        from transformers import LogitsProcessor

        class KeepEosWarper(LogitsProcessor):
            """Run ``warper`` and restore the ``<eos>`` score it removed (WEL20b consistent truncation)."""

            def __init__(self, warper, eos_token_id: int):
                self.warper = warper
                self.eos_token_id = int(eos_token_id)

            def __call__(self, input_ids, scores):
                eos_scores = scores[:, self.eos_token_id].clone()
                out = self.warper(input_ids, scores)
                out = out.clone()
                out[:, self.eos_token_id] = eos_scores
                return out

            def __repr__(self) -> str:
                return f"KeepEosWarper({self.warper!r}, eos_token_id={self.eos_token_id})"

        _KEEP_EOS_CLASS = KeepEosWarper
    return _KEEP_EOS_CLASS


# ---------------------------------------------------------------------------- parsing
def parse_policy(spec: "str | Policy") -> Policy:
    """A registry name (``repdiag list mitigations``) or comma-separated ``generate()`` arguments.

    ``"temperature=0.7,top_k=50,do_sample=true"``; ``do_sample=false`` is greedy; ``"greedy"`` alone
    is the registry entry. Unknown names or values out of range raise :class:`PolicyError` (one line).
    """
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise PolicyError("empty policy: give a mitigation name (repdiag list mitigations) or key=value pairs")
    text = spec.strip()
    if "=" not in text:
        from .mitigations import get_mitigation

        return get_mitigation(text)
    params: dict[str, Any] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise PolicyError(
                f"policy part {part!r} is not key=value; write e.g. temperature=0.7,do_sample=true "
                f"(allowed: {', '.join(PARAMS)})"
            )
        key, value = (s.strip() for s in part.split("=", 1))
        if key in params:
            raise PolicyError(f"policy parameter {key!r} is given twice in {spec!r}")
        params[key] = _coerce(key, value)
    pol = Policy("", params)
    return Policy(pol.spec_string(), pol.params)


# ---------------------------------------------------------------------------- helpers for theory
def row_collision_full(A: np.ndarray | sp.spmatrix, eos_index: int | None = None) -> np.ndarray:
    """``Σ_j A_ij²`` over all columns (spec §12 ``row_collision_full``), per row."""
    if sp.issparse(A):
        return np.asarray(sp.csr_matrix(A).multiply(A).sum(axis=1)).reshape(-1)
    A = np.asarray(A, dtype=np.float64)
    return np.einsum("ij,ij->i", A, A)


def rebalance_matrix(
    A: np.ndarray | sp.spmatrix, eos_index: int, gamma: float = 0.1, *, max_merges: int = 50
) -> tuple[np.ndarray, int, list[tuple[int, int]], list[int]]:
    """Matrix-level rebalanced encoding (FU21 RE, spec §8.10): a prediction, exact for a first-order chain.

    Repeatedly merges the largest off-diagonal entry ``A_ab > gamma`` (ties → lowest ``(a, b)``;
    ``<eos>`` never merged) into a new state ``c`` = "a then b", inserted just before ``<eos>`` when
    ``<eos>`` is last, else appended. Stops when no entry exceeds ``gamma`` or after ``max_merges``
    merges (repdiag's deterministic variant; the paper batches all pairs above γ per round).
    Returns ``(A', eos', merges, unmerged_self_loops)`` where merges are ``(a, b)`` in the indices of
    the matrix at the time of the merge and ``unmerged_self_loops`` the states with ``A_aa > gamma``
    (self-pairs are not covered).
    """
    if not 0.0 < gamma < 1.0:
        raise PolicyError(f"rebalanced encoding gamma={gamma!r} is out of range: 0 < gamma < 1")
    M = np.asarray(A.toarray() if sp.issparse(A) else A, dtype=np.float64).copy()
    eos = int(eos_index)
    merges: list[tuple[int, int]] = []
    for _ in range(int(max_merges)):
        n = M.shape[0]
        cand = M.copy()
        np.fill_diagonal(cand, -1.0)
        cand[eos, :] = -1.0
        cand[:, eos] = -1.0
        flat = int(np.argmax(cand))  # first maximum in row-major order = lowest (a, b)
        a, b = divmod(flat, n)
        q = M[a, b]
        if q <= gamma:
            break
        eos_last = eos == n - 1
        c = n - 1 if eos_last else n  # index of the new state in the new matrix
        # effective original rows r_x over the old columns
        R = M.copy()
        ra = M[a].copy()
        ra[b] = 0.0
        ra = ra / (1.0 - q)
        R[a] = ra
        rc = M[b].copy()
        # new matrix
        N2 = n + 1
        old_to_new = np.arange(n)
        if eos_last:
            old_to_new[eos] = n  # eos moves one to the right
        new = np.zeros((N2, N2))
        for x_old in range(n):
            x_new = old_to_new[x_old]
            row = R[x_old]
            nr = np.zeros(N2)
            nr[old_to_new] = row
            nr[old_to_new[a]] = row[a] * (1.0 - q)
            nr[c] = row[a] * q
            new[x_new] = nr
        nr = np.zeros(N2)
        nr[old_to_new] = rc
        nr[old_to_new[a]] = rc[a] * (1.0 - q)
        nr[c] = rc[a] * q
        new[c] = nr
        new_eos = old_to_new[eos]
        new[new_eos] = 0.0
        new[new_eos, new_eos] = 1.0
        M, eos = new, int(new_eos)
        merges.append((int(a), int(b)))
    diag = np.diag(M).copy()
    diag[eos] = 0.0
    selfs = [int(i) for i in np.nonzero(diag > gamma)[0]]
    return M, eos, merges, selfs
