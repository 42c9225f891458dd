"""``RepetitionMonitor``: watch repetition inside ``model.generate()`` (issue 8).

One object is both a ``LogitsProcessor`` and a ``StoppingCriteria``; pass it as
``logits_processor=[mon], stopping_criteria=[mon]`` or use ``with repdiag.watch(model) as mon``.

How it fits transformers 5 (``spec/ecosystem.md`` §2.1–§2.3):

* ``LogitsProcessorList`` passes extra kwargs to a processor whose ``__call__`` has more than two
  parameters, and ``StoppingCriteriaList`` calls ``criteria(input_ids, scores)`` (no kwargs in
  ``generate``). So ``__call__(input_ids, scores)`` has exactly two parameters and dispatches on
  ``scores``: a tensor → the processor half (before the next token is chosen); ``None`` or a tuple →
  the stopping half (after the token was appended).
* The processor half returns ``scores`` itself (no copy) in ``record`` and ``stop`` modes. It records
  the entropy and top-1 probability of the *policy* distribution (the scores after the built-in
  processors; log-softmax plus processors in beam search) with a few tensor ops and no host sync.
* Nothing is keyed by row across steps: loop detection looks at the tail of ``input_ids`` at each
  call, so beam reordering, batching, left padding and encoder-decoder versus decoder-only all work.
  Loop onset, period, looping tokens, detection step and the matrix predictions are computed after
  generation from the finished sequences with :mod:`repdiag.metrics` (one implementation); the
  prefix of a sequence fixes all of them, so the numbers are those a per-step tracker would give.

The loop rule (``repdiag.metrics.find_loop``): a span with period ``p`` (``min_period ≤ p ≤
max_period``) whose closed walk is traversed ``min_repeats`` times, ``max(min_repeats·p+1,
min_length)`` tokens. The defaults (1, None, 2, 1) are Su's ``E_k(t)`` for every k, so the onset is
``repdiag.metrics.loop_onset``. ``stop`` mode ends a sequence at the step whose token first
completes such a span (``Loop.detected_at``); a tighter rule for long texts is, for example,
``min_repeats=3, min_length=12``.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from transformers.generation.logits_process import LogitsProcessor
from transformers.generation.stopping_criteria import StoppingCriteria

from . import metrics as _metrics

__all__ = ["RepetitionMonitor", "MonitorReport", "SequenceReport", "watch", "MODES"]

MODES = ("record", "stop", "intervene")


# --------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SequenceReport:
    """What the monitor saw for one returned sequence (generated tokens only, ``<eos>`` excluded)."""

    index: int
    tokens: tuple[int, ...]
    length: int
    terminated: bool | None
    stopped_by_monitor: bool
    loop_onset: int | None
    loop_period: int | None
    loop_tokens: tuple[int, ...] | None
    loop_repeats: float | None
    loop_length: int | None
    detected_at: int | None
    entropy: tuple[float, ...]
    top1_prob: tuple[float, ...]
    prediction_at_onset: dict[str, Any] | None
    prediction_at_end: dict[str, Any] | None
    metrics: dict[str, float | None]

    @property
    def looping(self) -> bool:
        return self.loop_onset is not None

    @property
    def loop(self) -> "_metrics.Loop | None":
        """The loop as a :class:`repdiag.metrics.Loop` (``None`` without one)."""
        if self.loop_onset is None:
            return None
        return _metrics.Loop(start=self.loop_onset, period=self.loop_period, length=self.loop_length,
                             repeats=self.loop_repeats, tokens=self.loop_tokens, detected_at=self.detected_at)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "tokens": list(self.tokens),
            "length": self.length,
            "terminated": self.terminated,
            "stopped_by_monitor": self.stopped_by_monitor,
            "loop_onset": self.loop_onset,
            "loop_period": self.loop_period,
            "loop_tokens": None if self.loop_tokens is None else list(self.loop_tokens),
            "loop_repeats": self.loop_repeats,
            "loop_length": self.loop_length,
            "detected_at": self.detected_at,
            "entropy": list(self.entropy),
            "top1_prob": list(self.top1_prob),
            "prediction_at_onset": self.prediction_at_onset,
            "prediction_at_end": self.prediction_at_end,
            "metrics": dict(self.metrics),
        }


@dataclass(frozen=True)
class MonitorReport:
    """Per-sequence results and a summary (``repdiag.metrics.compute_metrics`` keys, spec §9.7)."""

    mode: str
    loop_options: dict[str, Any]
    beam_search: bool
    source: str  # "output" (the sequences generate() returned) or "input_ids" (the last seen)
    n_steps: int
    sequences: tuple[SequenceReport, ...]
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def loops(self) -> tuple["_metrics.Loop | None", ...]:
        """Per sequence, its loop (``repdiag.metrics.Loop``) or ``None``."""
        return tuple(s.loop for s in self.sequences)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "loop_options": dict(self.loop_options),
            "beam_search": self.beam_search,
            "source": self.source,
            "n_steps": self.n_steps,
            "summary": dict(self.summary),
            "sequences": [s.to_dict() for s in self.sequences],
        }


# --------------------------------------------------------------------------------------------------
# the monitor
# --------------------------------------------------------------------------------------------------


class _Run:
    """Raw observations of one generate() call (tensors kept on the model's device, no host sync)."""

    def __init__(self, prompt_len: int, rows: int) -> None:
        self.prompt_len = prompt_len
        self.rows = rows
        self.last_proc_len = prompt_len - 1
        self.stats: list[torch.Tensor] = []  # per step: (rows_kept, 2) [entropy, top1]
        self.stat_stride = 1
        self.last_ids: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.beam = False
        self.looping: torch.Tensor | None = None  # intervene mode, sticky per row (greedy/sampling)
        self.eos: tuple[int, ...] = ()
        self.num_beams: int | None = None


def _as_id_set(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, torch.Tensor):
        return tuple(int(v) for v in value.flatten().tolist())
    if isinstance(value, (list, tuple, set)):
        return tuple(int(v) for v in value)
    return (int(value),)


class RepetitionMonitor(LogitsProcessor, StoppingCriteria):
    """Watch repetition inside ``generate()``: a ``LogitsProcessor`` and a ``StoppingCriteria`` at once.

    Parameters (all optional):

    * ``mode``: ``"record"`` (default: scores returned unchanged, never stops), ``"stop"`` (ends a
      sequence at the step its token completes a loop; in beam search the looping hypothesis is
      finalised and the others go on), ``"intervene"`` (applies ``intervention`` only to the rows
      whose prefix is looping, from the first looping step on; scores of the other rows are
      untouched; one host sync per step to skip the work while nothing loops).
    * ``min_period``, ``max_period``, ``min_repeats``, ``min_length``: the loop rule of
      :func:`repdiag.metrics.find_loop`; defaults = Su's ``E_k(t)``. ``max_period=None`` tries every
      period that fits (the per-step cost of ``stop``/``intervene`` grows with the length; give a
      bound such as 32 for long generations).
    * ``eos_token_id``: int or list, to cut sequences at ``<eos>`` and report termination (default:
      the tokenizer's, else read from the ``generation_config`` of the running ``generate()`` call).
    * ``matrix``: a ``TransitionMatrix``; ``tokenizer``: checked against
      ``matrix.meta["tokenizer_fingerprint"]`` at construction (``MatrixFormatError`` on mismatch).
    * ``state_predictions``: per-state arrays ``{name: array (N,)}`` over the matrix states (for
      example ``{"r": su_R_per_state}`` from ``repdiag.theory``), or ``{token_id: {name: value}}``;
      without it the greedy fate of each state is computed from ``matrix``.
    * ``intervention``: for ``intervene`` mode, a ``LogitsProcessor`` (or any
      ``f(input_ids, scores) -> scores``) or a policy string for ``repdiag.decoding.parse_policy``.
    * ``track_stats``: record per-step entropy and top-1 probability (default True).
    * ``num_beams``: the beam count (default: read from the running call's ``generation_config``).
      With beams the per-step statistics follow the best running beam of each input only (rows of
      a beam search are hypotheses, reordered every step) and are reported in the summary.

    After generation, ``report(out)`` (``out`` = what ``generate()`` returned; ``watch`` passes it)
    gives per sequence the generated tokens (prompt / decoder start removed, cut at ``<eos>``),
    termination, loop onset / period / tokens / detection step, entropy and top-1 traces (greedy and
    sampling) and the matrix predictions, plus a summary of ``repdiag.metrics.compute_metrics``.
    Without ``out`` the last ``input_ids`` seen are used, which is exact for greedy and sampling
    when the monitor is also a stopping criterion; for beam search pass ``out``.
    """

    supports_continuous_batching = False

    def __init__(
        self,
        *,
        mode: str = "record",
        min_period: int = 1,
        max_period: int | None = None,
        min_repeats: int = 2,
        min_length: int = 1,
        eos_token_id: int | Sequence[int] | None = None,
        matrix: Any = None,
        tokenizer: Any = None,
        state_predictions: Mapping[Any, Any] | None = None,
        intervention: Any = None,
        track_stats: bool = True,
        num_beams: int | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.loop_options = _metrics.loop_params(min_period, max_period, min_repeats, min_length)
        if eos_token_id is None and tokenizer is not None:
            eos_token_id = getattr(tokenizer, "eos_token_id", None)
        self.eos_token_id = _as_id_set(eos_token_id)
        self.matrix = matrix
        self.tokenizer = tokenizer
        self.state_predictions = state_predictions
        self.track_stats = bool(track_stats)
        if num_beams is not None and (isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1):
            raise ValueError(f"num_beams must be a positive integer or None, got {num_beams!r}")
        self.num_beams = num_beams
        if mode == "intervene" and intervention is None:
            raise ValueError("intervention is required with mode='intervene' (a LogitsProcessor or a policy name)")
        if isinstance(intervention, str):
            from .decoding import parse_policy

            intervention = parse_policy(intervention)  # PolicyError now, not mid-generation
        elif intervention is not None and not callable(intervention):
            raise ValueError("intervention must be a LogitsProcessor, a callable (input_ids, scores) or a policy name")
        self.intervention = intervention
        self._intervention_fn: Any = None
        if matrix is not None:
            self._check_matrix(matrix, tokenizer)
        self._run: _Run | None = None
        self._idx_cache: dict[tuple, tuple] = {}
        self._zeros: dict[tuple, torch.Tensor] = {}
        self._state_lookup: dict[tuple, int] | None = None
        self._state_arrays: dict[str, np.ndarray] | None = None

    # ----------------------------------------------------------------------------- validation
    @staticmethod
    def _check_matrix(matrix: Any, tokenizer: Any) -> None:
        from .errors import MatrixFormatError

        st = getattr(matrix, "state_tokens", None)
        if st is None or np.asarray(st).ndim != 2:
            raise MatrixFormatError("matrix= needs a TransitionMatrix (with state_tokens of shape (N, k))")
        if tokenizer is None:
            return
        expected = (getattr(matrix, "meta", None) or {}).get("tokenizer_fingerprint")
        if expected is None:
            return
        from .models import tokenizer_fingerprint

        got = tokenizer_fingerprint(tokenizer)
        if got != expected:
            raise MatrixFormatError(
                f"the transition matrix was built for tokenizer {expected} but the tokenizer given has {got}: "
                "build the matrix with this model (repdiag matrix) or pass the matching tokenizer"
            )

    def _check_vocab(self, vocab: int) -> None:
        from .errors import MatrixFormatError

        st = np.asarray(self.matrix.state_tokens)
        if st.size and int(st.max()) >= vocab:
            raise MatrixFormatError(
                f"the transition matrix names token id {int(st.max())} but the model has {vocab} tokens: "
                "it was built for another tokenizer; rebuild it for this model"
            )

    # ----------------------------------------------------------------------------- lifecycle
    def reset(self) -> None:
        """Forget the last generate() call (``watch`` calls this before each call)."""
        self._run = None

    def _start(self, input_ids: torch.Tensor, prompt_len: int) -> _Run:
        run = _Run(prompt_len, input_ids.shape[0])
        gc = _find_generation_config()
        run.eos = self.eos_token_id
        run.num_beams = self.num_beams
        if gc is not None:
            if not run.eos:
                run.eos = _as_id_set(getattr(gc, "_eos_token_tensor", None)) or _as_id_set(gc.eos_token_id)
            if run.num_beams is None:
                run.num_beams = int(getattr(gc, "num_beams", 1) or 1)
        if run.num_beams and run.num_beams > 1 and run.rows % run.num_beams == 0:
            run.stat_stride = run.num_beams  # stats of the best running beam of each input
            run.beam = True
        self._run = run
        return run

    def _set_output(self, output: Any) -> None:
        seqs = getattr(output, "sequences", output)
        if self._run is not None and isinstance(seqs, torch.Tensor):
            self._run.output = seqs

    # ----------------------------------------------------------------------------- the call
    def __call__(self, input_ids: torch.LongTensor, scores: Any) -> Any:  # exactly two parameters
        if isinstance(scores, torch.Tensor):
            return self._process(input_ids, scores)
        return self._stop(input_ids)

    def _process(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        run = self._run
        rows, cur = input_ids.shape
        if run is None or rows != run.rows or cur != run.last_proc_len + 1:
            run = self._start(input_ids, cur)
            if self.matrix is not None:
                self._check_vocab(scores.shape[-1])
        run.last_proc_len = cur
        run.last_ids = input_ids
        if self.track_stats:
            s = scores if run.stat_stride == 1 else scores[:: run.stat_stride]
            m = s.amax(-1, keepdim=True)
            z = torch.sub(s, m).clamp_(min=-1e4)
            e = z.exp()
            Z = e.sum(-1)
            ez = torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1)
            run.stats.append(torch.stack((Z.log() - ez / Z, Z.reciprocal()), 1))
        if self.mode == "intervene":
            looping = self._tail_looping(input_ids, run.prompt_len)
            if not run.beam:
                run.looping = looping if run.looping is None or run.looping.shape != looping.shape else (
                    run.looping | looping)
                looping = run.looping
            if not bool(looping.any()):
                return scores
            fn = self._get_intervention()
            changed = fn(input_ids, scores.clone())
            return torch.where(looping[:, None], changed, scores)
        return scores

    def _stop(self, input_ids: torch.Tensor) -> torch.Tensor:
        run = self._run
        rows, cur = input_ids.shape
        if run is None:  # used only as a stopping criterion
            run = self._start(input_ids, cur - 1)
            run.last_proc_len = cur - 1
        if rows != run.rows:
            # beam search: the processor sees batch*num_beams rows, the criterion 2*num_beams
            # candidates per input (rows are hypotheses, not inputs)
            run.beam = True
        else:
            run.last_ids = input_ids
        if self.mode != "stop":
            key = (rows, input_ids.device)
            z = self._zeros.get(key)
            if z is None:
                z = self._zeros[key] = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
            return z
        done = self._tail_looping(input_ids, run.prompt_len)
        if run.eos:
            last = input_ids[:, -1]
            for e in run.eos:
                done = done & (last != e)
        return done

    # ----------------------------------------------------------------------------- detection
    def _tail_looping(self, input_ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
        """Per row: does the generated prefix end with a span satisfying the loop rule?

        For each period p the last ``need(p) − p`` lag-p comparisons of the tail must all hold; a
        period whose span does not fit in the generated part yet is masked out. Index tensors are
        built once per period cap (doubling when ``max_period`` is None) and reused.
        """
        gen = input_ids.shape[1] - prompt_len
        o = self.loop_options
        r, lmin, pmin = o["min_repeats"], o["min_length"], o["min_period"]
        rows = input_ids.shape[0]
        if _metrics._need(pmin, r, lmin) > gen:
            return torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
        if o["max_period"] is not None:
            cap = o["max_period"]
        else:
            cap = max(pmin, 8)
            while cap < (gen - 1) // r:
                cap *= 2
        key = (cap, input_ids.device)
        cached = self._idx_cache.get(key)
        if cached is None:
            periods = list(range(pmin, cap + 1))
            needs = [_metrics._need(p, r, lmin) for p in periods]
            W = max(needs)
            C = max(n - p for n, p in zip(needs, periods))
            a = torch.zeros(len(periods), C, dtype=torch.long)
            b = torch.zeros(len(periods), C, dtype=torch.long)
            ignore = torch.ones(len(periods), C, dtype=torch.bool)
            for i, (p, n) in enumerate(zip(periods, needs)):
                c = n - p
                j = torch.arange(c)
                a[i, :c] = W - 1 - j
                b[i, :c] = W - 1 - j - p
                ignore[i, :c] = False
            dev = input_ids.device
            cached = (a.to(dev), b.to(dev), ignore.to(dev), W, torch.tensor(needs, device=dev))
            if len(self._idx_cache) > 8:
                self._idx_cache.clear()
            self._idx_cache[key] = cached
        a, b, ignore, W, needs_t = cached
        if input_ids.shape[1] >= W:
            tail = input_ids[:, -W:]
        else:
            tail = torch.nn.functional.pad(input_ids, (W - input_ids.shape[1], 0), value=-1)
        ok = ((tail[:, a] == tail[:, b]) | ignore).all(-1)
        return (ok & (needs_t <= gen)).any(-1)

    def _get_intervention(self) -> Any:
        if self._intervention_fn is None:
            iv = self.intervention
            if hasattr(iv, "logits_processors"):  # a repdiag Policy
                eos = self._run.eos[0] if self._run is not None and self._run.eos else None
                iv = iv.logits_processors(eos)
            self._intervention_fn = iv
        return self._intervention_fn

    # ----------------------------------------------------------------------------- report
    @property
    def prompt_length(self) -> int | None:
        return None if self._run is None else self._run.prompt_len

    def report(self, sequences: Any = None) -> MonitorReport:
        """Results of the last generate() call.

        ``sequences``: what ``generate()`` returned (a tensor or an output with ``.sequences``);
        needed for beam search (the returned hypotheses are not rows the monitor saw). ``watch``
        passes it; otherwise the last ``input_ids`` seen are used (the final ids when the monitor is
        also a stopping criterion).
        """
        run = self._run
        if run is None:
            raise RuntimeError("the monitor has not seen a generate() call yet")
        seqs = getattr(sequences, "sequences", sequences)
        source = "output"
        if seqs is None:
            seqs = run.output
        if seqs is None:
            seqs, source = run.last_ids, "input_ids"
            if run.beam and run.num_beams and seqs.shape[0] % run.num_beams == 0:
                seqs = seqs[:: run.num_beams]  # the best running beam of each input (pass the output!)
        ids = seqs.detach().cpu().numpy() if isinstance(seqs, torch.Tensor) else np.asarray(seqs)
        gen = ids[:, run.prompt_len:]
        stats = torch.stack(run.stats).cpu().numpy() if run.stats else np.zeros((0, 0, 2))
        per_row_stats = (not run.beam) and stats.shape[1:2] == (ids.shape[0],)
        eos = set(run.eos)
        tokens_list: list[list[int]] = []
        terminated: list[bool | None] = []
        stopped: list[bool] = []
        loops: list[Any] = []
        for row in gen.tolist():
            term: bool | None = None
            if eos:
                cut = next((i for i, t in enumerate(row) if t in eos), None)
                term = cut is not None
                if cut is not None:
                    row = row[:cut]
            loop = _metrics.find_loop(row, **self.loop_options)
            was_stopped = False
            if self.mode == "stop" and loop is not None and not term:
                # the monitor ended this sequence at the token that completed the loop; what follows
                # is padding (or tokens generated while other rows ran on, without an <eos> criterion)
                was_stopped = True
                row = row[: loop.detected_at + 1]
                loop = _metrics.find_loop(row, **self.loop_options)
            tokens_list.append(row)
            terminated.append(term)
            stopped.append(was_stopped)
            loops.append(loop)
        per = _metrics.per_sequence_metrics(tokens_list, loop_options=self.loop_options)
        out: list[SequenceReport] = []
        for i, row in enumerate(tokens_list):
            loop = loops[i]
            ent: tuple[float, ...] = ()
            top: tuple[float, ...] = ()
            if per_row_stats:
                n = min(len(row) + (1 if terminated[i] else 0), stats.shape[0])
                ent = tuple(float(v) for v in stats[:n, i, 0])
                top = tuple(float(v) for v in stats[:n, i, 1])
            pred_on = self._prediction(row, loop.start) if (loop is not None and self.matrix is not None) else None
            pred_end = self._prediction(row, len(row) - 1) if (self._has_predictions() and row) else None
            out.append(SequenceReport(
                index=i,
                tokens=tuple(int(t) for t in row),
                length=len(row),
                terminated=terminated[i],
                stopped_by_monitor=stopped[i],
                loop_onset=None if loop is None else loop.start,
                loop_period=None if loop is None else loop.period,
                loop_tokens=None if loop is None else tuple(int(t) for t in loop.tokens),
                loop_repeats=None if loop is None else loop.repeats,
                loop_length=None if loop is None else loop.length,
                detected_at=None if loop is None else loop.detected_at,
                entropy=ent,
                top1_prob=top,
                prediction_at_onset=pred_on,
                prediction_at_end=pred_end,
                metrics={k: (None if np.isnan(v[i]) else float(v[i])) for k, v in per.items()},
            ))
        term_known = all(t is not None for t in terminated)
        summary = _metrics.compute_metrics(tokens_list, terminated=terminated if term_known else None,
                                           loop_options=self.loop_options)
        summary["stopped_by_monitor"] = float(np.mean(stopped)) if stopped else 0.0
        if stats.size:
            summary["mean_entropy"] = float(stats[..., 0].mean())
            summary["mean_top1_prob"] = float(stats[..., 1].mean())
        return MonitorReport(
            mode=self.mode,
            loop_options=dict(self.loop_options),
            beam_search=run.beam,
            source=source,
            n_steps=len(run.stats),
            sequences=tuple(out),
            summary=summary,
        )

    def to_dict(self) -> dict[str, Any]:
        """The report of the last generate() call as plain JSON-ready data."""
        return self.report().to_dict()

    # ----------------------------------------------------------------------------- matrix predictions
    def _has_predictions(self) -> bool:
        return self.matrix is not None or (self.state_predictions is not None)

    def _prediction(self, row: Sequence[int], pos: int) -> dict[str, Any] | None:
        """Predictions for the state the chain is in after token ``pos`` (the last k tokens)."""
        sp = self.state_predictions
        if sp is not None and sp and all(isinstance(k, (int, np.integer)) for k in sp):
            val = sp.get(int(row[pos]))
            return None if val is None else {"token": int(row[pos]), **dict(val)}
        if self.matrix is None:
            return None
        lookup, arrays = self._states()
        st = np.asarray(self.matrix.state_tokens)
        k = st.shape[1]
        ctx = [int(t) for t in row[max(0, pos - k + 1): pos + 1]]
        padded = [-1] * (k - len(ctx)) + ctx
        idx: int | None = None
        if hasattr(self.matrix, "lookup_states"):  # TransitionMatrix's own back-off (one implementation)
            try:
                found = int(self.matrix.lookup_states(np.asarray([padded], dtype=np.int64))[0])
            except Exception:  # noqa: BLE001 - a token outside the matrix: no prediction
                found = -1
            idx = found if found >= 0 else None
        else:
            key = tuple(padded)
            idx = lookup.get(key)
            j = 0
            while idx is None and j < k - 1:  # back off to shorter contexts (left-padded with -1)
                j += 1
                key = tuple([-1] * j + list(key[j:]))
                idx = lookup.get(key)
        if idx is None:
            return {"state": None, "context": ctx}
        out: dict[str, Any] = {"state": int(idx), "context": [int(t) for t in st[idx] if t >= 0]}
        for name, arr in arrays.items():
            v = arr[idx]
            out[name] = v.item() if hasattr(v, "item") else v
        return out

    def _states(self) -> tuple[dict[tuple, int], dict[str, np.ndarray]]:
        if self._state_lookup is None:
            st = np.asarray(self.matrix.state_tokens)
            self._state_lookup = {} if hasattr(self.matrix, "lookup_states") else {
                tuple(int(t) for t in r): i for i, r in enumerate(st)}
            arrays: dict[str, np.ndarray] = {}
            if self.state_predictions is not None:
                for name, arr in self.state_predictions.items():
                    arrays[str(name)] = np.asarray(arr)
            else:
                arrays.update(_greedy_fate(self.matrix))
            self._state_arrays = arrays
        return self._state_lookup, self._state_arrays or {}


def _find_generation_config() -> Any:
    """The ``generation_config`` of the ``generate()`` call this monitor runs in (eos ids, beams).

    Read once per call from the decoding loop's frame (``_sample`` / ``_beam_search`` take it as a
    parameter); ``None`` when the monitor is called outside ``generate()``.
    """
    import sys

    try:
        from transformers import GenerationConfig
    except ImportError:  # pragma: no cover
        return None
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None:
            return None
        gc = frame.f_locals.get("generation_config") if "generation_config" in frame.f_code.co_varnames else None
        if isinstance(gc, GenerationConfig):
            return gc
        frame = frame.f_back
    return None


def _greedy_fate(matrix: Any) -> dict[str, np.ndarray]:
    """Greedy successor walk on the matrix: ``greedy_fate`` ("eos" or "loop") and the loop's period."""
    A = matrix.matrix
    eos = int(matrix.eos_index)
    if hasattr(A, "indptr"):  # CSR: argmax over the stored entries, ties to the lowest column
        N = A.shape[0]
        counts = np.diff(A.indptr)
        rows = np.repeat(np.arange(N), counts)
        data = np.asarray(A.data, dtype=np.float64)
        rowmax = np.full(N, -np.inf)
        np.maximum.at(rowmax, rows, data)
        cand = np.where(data == rowmax[rows], A.indices.astype(np.int64), np.iinfo(np.int64).max)
        succ = np.full(N, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(succ, rows, cand)
        succ[counts == 0] = eos  # nothing stored: no greedy successor known
    else:
        succ = np.asarray(A).argmax(axis=1).astype(np.int64)
        N = succ.shape[0]
    succ[eos] = eos
    land = succ.copy()
    for _ in range(max(1, int(np.ceil(np.log2(max(N, 2)))) + 1)):  # pointer doubling: land on a cycle
        land = land[land]
    cyc = np.zeros(N, dtype=np.int64)
    for c in np.unique(land).tolist():  # landing nodes lie on the cycles (few for a functional graph)
        n, x = 1, int(succ[c])
        while x != c and n <= N:
            x, n = int(succ[x]), n + 1
        cyc[c] = n
    period = cyc[land]
    fate = np.where(land == eos, "eos", "loop").astype(object)
    period = np.where(land == eos, 0, period)
    return {"greedy_fate": fate, "greedy_loop_period": period}


# --------------------------------------------------------------------------------------------------
# watch()
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def watch(model: Any, monitor: RepetitionMonitor | None = None, **options: Any) -> Iterator[RepetitionMonitor]:
    """Add a :class:`RepetitionMonitor` to every ``model.generate()`` call inside the block.

    ``with repdiag.watch(model, mode="stop") as mon: model.generate(...)``; then ``mon.report()``.
    The model's ``generate`` is restored on exit. ``eos_token_id`` defaults to the model's.
    """
    if monitor is None:
        if options.get("eos_token_id") is None and options.get("tokenizer") is None:
            gc = getattr(model, "generation_config", None)
            options["eos_token_id"] = getattr(gc, "eos_token_id", None)
        monitor = RepetitionMonitor(**options)
    elif options:
        raise ValueError("give either monitor= or monitor options, not both")
    from transformers.generation.logits_process import LogitsProcessorList
    from transformers.generation.stopping_criteria import StoppingCriteriaList

    had_own = "generate" in vars(model)
    original = model.generate

    @functools.wraps(original)
    def generate(*args: Any, **kwargs: Any) -> Any:
        lp = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
        sc = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
        if monitor not in lp:
            lp.append(monitor)
        if monitor not in sc:
            sc.append(monitor)
        monitor.reset()
        gc = kwargs.get("generation_config") or getattr(model, "generation_config", None)
        num_beams = kwargs.get("num_beams") or getattr(gc, "num_beams", None) or 1
        saved = monitor.num_beams
        monitor.num_beams = int(num_beams)
        try:
            out = original(*args, logits_processor=lp, stopping_criteria=sc, **kwargs)
        finally:
            monitor.num_beams = saved
        monitor._set_output(out)
        return out

    model.generate = generate
    try:
        yield monitor
    finally:
        if had_own:
            model.generate = original
        else:
            with contextlib.suppress(AttributeError):
                del model.generate
