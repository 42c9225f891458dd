"""Running generation for each decoding policy and collecting the repetition metrics (issue 6).

For every policy, ``generate()`` runs over the measurement prompts in batches, seeded, with exactly
the policy's ``generate_kwargs()`` on top of a neutral generation config (the model's own decoding
defaults, e.g. a checkpoint's ``no_repeat_ngram_size``, are *not* silently added: "greedy" means
greedy). The outputs are scored with :mod:`repdiag.metrics` (one implementation of every metric) on
model tokens and on whitespace words, with standard errors, and priced in quality: the mean
log-probability of the output under the unmitigated model (teacher-forced), and chrF / BLEU
(sacrebleu) when the prompts carry references. Loop onsets come from the generation hook
(:class:`repdiag.hook.RepetitionMonitor`), the same code path a user's ``generate()`` call gets.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from . import metrics as metrics_mod
from .models import forward_accepts

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .decoding import Policy
    from .models import LoadedModel

__all__ = ["PolicyMeasurement", "generation_config_for", "generate_for_policy", "generate_batch", "measure_policies",
           "sentence_end_ids", "mean_logprobs"]

#: generation-config fields that describe the model's tokens, not its decoding policy; kept from the
#: model's own config so that a policy runs on the right special tokens.
TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id",
                "forced_bos_token_id", "forced_eos_token_id")
#: metrics copied into the report per policy (keys of repetition-theory.md §9.7).
REPORT_METRICS = ("rep_w16", "rep_r", "seq_rep_pooled_1_4", "seq_rep_1", "seq_rep_4", "simctg_rep_2",
                  "simctg_rep_3", "simctg_rep_4", "simctg_diversity", "rep_sen", "uniq_seq", "loop_onset",
                  "loop_fraction", "length", "nonterminated")


@dataclass(frozen=True)
class PolicyMeasurement:
    """What one policy produced on the measurement prompts, and its scores."""

    policy: str
    sequences: tuple[tuple[int, ...], ...]
    texts: tuple[str, ...]
    terminated: tuple[bool, ...]
    metrics: dict[str, Any]
    word_metrics: dict[str, Any]
    stderr: dict[str, float | None]
    quality: dict[str, float | None]
    loop_events: tuple[dict | None, ...]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def report_metrics(self) -> dict[str, Any]:
        """The token-level metrics of :data:`REPORT_METRICS` plus word-level rep-w / seq-rep-4."""
        out = {k: self.metrics.get(k) for k in REPORT_METRICS}
        out["word_rep_w16"] = self.word_metrics.get("rep_w16")
        out["word_seq_rep_4"] = self.word_metrics.get("seq_rep_4")
        return out


def generation_config_for(lm: "LoadedModel", policy: "Policy", max_new_tokens: int):
    """A neutral ``GenerationConfig`` (the model's special tokens, ``max_new_tokens``, the policy's knobs).

    Returns ``(config, call_kwargs)``: the policy's kwargs that are not config fields
    (``custom_generate``, ``logits_processor``) go to the ``generate()`` call itself.
    """
    from transformers import GenerationConfig

    base = getattr(lm.model, "generation_config", None)
    tokens = {k: getattr(base, k, None) for k in TOKEN_FIELDS if base is not None}
    tokens = {k: v for k, v in tokens.items() if v is not None}
    tokens.setdefault("eos_token_id", lm.eos_token_id)
    tokens.setdefault("pad_token_id", lm.pad_token_id)
    if lm.decoder_start_token_id is not None:
        tokens.setdefault("decoder_start_token_id", lm.decoder_start_token_id)
    kwargs = dict(policy.generate_kwargs(eos_token_id=lm.eos_token_id))
    call_kwargs = {k: kwargs.pop(k) for k in ("custom_generate", "logits_processor") if k in kwargs}
    config = GenerationConfig(**tokens, max_new_tokens=max_new_tokens, **kwargs)
    return config, call_kwargs


def sentence_end_ids(tokenizer: Any) -> tuple[tuple[int, ...], int | None]:
    """Token ids whose piece is a sentence end (``.``, ``!``, ``?``), and the lowest id of a ``.`` piece.

    ``rep_sen`` on model tokens splits after the former; ``rep_sen_ditto_code`` on the latter.
    """
    ends, dots = [], []
    for piece, idx in tokenizer.get_vocab().items():
        text = tokenizer.convert_tokens_to_string([piece]).strip()
        if text in (".", "!", "?"):
            ends.append(int(idx))
            if text == ".":
                dots.append(int(idx))
    return tuple(sorted(ends)), (min(dots) if dots else None)


def _split_generated(lm: "LoadedModel", out: "Any", prompt_width: int) -> tuple[list[tuple[int, ...]], list[bool]]:
    """Generated ids per row without the prompt/start token, cut at ``<eos>``; and whether it came."""
    rows = out[:, prompt_width:] if lm.kind == "causal" else out[:, 1:]
    sequences, terminated = [], []
    for row in rows.tolist():
        if lm.eos_token_id in row:
            cut = row.index(lm.eos_token_id)
            sequences.append(tuple(row[:cut]))
            terminated.append(True)
        else:
            sequences.append(tuple(row))
            terminated.append(False)
    return sequences, terminated


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-call notes (e.g. flags a policy sets that greedy ignores) during runs."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def generate_for_policy(
    lm: "LoadedModel",
    policy: "Policy",
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 16,
    max_source_tokens: int | None = None,
    monitor_factory: Callable[[], Any] | None = None,
    on_batch: Callable[[int], None] | None = None,
    executor: Any = None,
) -> tuple[list[tuple[int, ...]], list[bool], list[dict | None]]:
    """Generate for ``prompts`` under ``policy``; returns (sequences, terminated, loop events).

    Batches are seeded with ``seed + batch index`` (``torch.manual_seed``) so a run is repeatable.
    With ``monitor_factory`` a fresh monitor (``logits_processor`` and ``stopping_criteria``) watches
    each batch and its per-sequence loop events are returned. ``executor`` (a
    :class:`repdiag.executors.Executor`, e.g. Ray): the batches run there by :func:`generate_batch`
    (same batches, same seeds) and are merged by batch index, so the outputs are the same.
    """
    n_batches = -(-len(prompts) // batch_size)
    kw = dict(max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, max_source_tokens=max_source_tokens,
              monitor_factory=monitor_factory)
    if executor is not None:
        parts = executor.generate_batches(lm, policy, list(prompts), list(range(n_batches)), kw, progress=on_batch)
    else:
        parts = {}
        for b in range(n_batches):
            parts[b] = generate_batch(lm, policy, prompts, b, **kw)
            if on_batch is not None:
                on_batch(len(parts[b][0]))
    sequences: list[tuple[int, ...]] = []
    terminated: list[bool] = []
    events: list[dict | None] = []
    for b in range(n_batches):
        seqs, term, ev = parts[b]
        sequences += seqs
        terminated += term
        events += ev
    return sequences, terminated, events


def generate_batch(lm: "LoadedModel", policy: "Policy", prompts: Sequence[str], b: int, *, max_new_tokens: int,
                   seed: int, batch_size: int = 16, max_source_tokens: int | None = None,
                   monitor_factory: Callable[[], Any] | None = None,
                   ) -> tuple[list[tuple[int, ...]], list[bool], list[dict | None]]:
    """Batch ``b`` (prompts ``b*batch_size ...``) of :func:`generate_for_policy`, seeded ``seed + b``."""
    import torch

    with _quiet_transformers():
        config, call_kwargs = generation_config_for(lm, policy, max_new_tokens)
    start = b * batch_size
    batch = list(prompts[start:start + batch_size])
    enc = lm.tokenizer(batch, return_tensors="pt", padding=True, truncation=True,
                       max_length=max_source_tokens or lm.max_source_tokens)
    enc = {k: v.to(lm.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    extra: dict[str, Any] = dict(call_kwargs)
    monitor = monitor_factory() if monitor_factory is not None else None
    if monitor is not None:  # appended after the policy's processors: it sees the final distribution
        extra["logits_processor"] = [*extra.get("logits_processor", []), monitor]
        extra["stopping_criteria"] = [monitor]
    torch.manual_seed(seed + b)
    with torch.inference_mode(), _quiet_transformers():
        out = lm.model.generate(**enc, generation_config=config, **extra)
    seqs, term = _split_generated(lm, out.cpu(), enc["input_ids"].shape[1])
    if monitor is not None:
        events = [loop.to_dict() if loop is not None else None for loop in monitor.report(out).loops]
    else:
        events = [None] * len(seqs)
    return seqs, term, events


def mean_logprobs(
    lm: "LoadedModel",
    prompts: Sequence[str],
    sequences: Sequence[Sequence[int]],
    terminated: Sequence[bool],
    *,
    batch_size: int = 16,
    max_source_tokens: int | None = None,
) -> np.ndarray:
    """Mean teacher-forced log-probability per output token under the (unmitigated) model.

    The output's ``<eos>`` counts when it was emitted. An empty output scores NaN.
    """
    import torch

    values = np.full(len(sequences), np.nan)
    for start in range(0, len(prompts), batch_size):
        idx = list(range(start, min(start + batch_size, len(prompts))))
        targets = [list(sequences[i]) + ([lm.eos_token_id] if terminated[i] else []) for i in idx]
        if not any(targets):
            continue
        width = max(1, max(len(t) for t in targets))
        labels = torch.full((len(idx), width), -100, dtype=torch.long)
        for r, t in enumerate(targets):
            if t:
                labels[r, :len(t)] = torch.as_tensor(t)
        enc = lm.tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                           max_length=max_source_tokens or lm.max_source_tokens)
        with torch.inference_mode():
            if lm.kind == "seq2seq":
                decoder_in = torch.full_like(labels, lm.pad_token_id)
                decoder_in[:, 0] = lm.decoder_start_token_id
                decoder_in[:, 1:] = labels[:, :-1].clamp(min=0)
                logits = lm.model(input_ids=enc["input_ids"].to(lm.device),
                                  attention_mask=enc["attention_mask"].to(lm.device),
                                  decoder_input_ids=decoder_in.to(lm.device)).logits
                step_logits = logits
            else:
                ids = torch.cat([enc["input_ids"], labels.clamp(min=0)], dim=1)
                mask = torch.cat([enc["attention_mask"], (labels >= 0).long()], dim=1)
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                # only the positions that predict an output token: the prompt's other logits are
                # (batch, prompt length, vocab) floats that nobody reads
                keep = {"logits_to_keep": width + 1} if forward_accepts(lm.model, "logits_to_keep") else {}
                logits = lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device),
                                  position_ids=positions.to(lm.device), **keep).logits
                step_logits = logits[:, -(width + 1):-1]
            picked = _token_logprobs(step_logits, labels.clamp(min=0).to(step_logits.device)).cpu()
        valid = labels >= 0
        for r, i in enumerate(idx):
            if valid[r].any():
                values[i] = float(picked[r][valid[r]].mean())
    return values


def _token_logprobs(step_logits: "torch.Tensor", tokens: "torch.Tensor") -> "torch.Tensor":
    """``log softmax(step_logits)[tokens]`` in float64, one sequence at a time.

    Equal to ``log_softmax(step_logits.double()).gather(tokens)`` without the (batch, steps, vocab)
    float64 copy, which on a 262k vocabulary is 800 MB.
    """
    import torch

    rows = []
    for seq_logits, seq_tokens in zip(step_logits, tokens):
        seq_logits = seq_logits.double()
        picked = seq_logits.gather(-1, seq_tokens.unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(seq_logits, dim=-1))
    return torch.stack(rows)


def _quality(lm: "LoadedModel", prompts: Sequence[str], references: Sequence[str | None], sequences, terminated,
             texts: Sequence[str], batch_size: int) -> dict[str, float | None]:
    import sacrebleu

    logp = mean_logprobs(lm, prompts, sequences, terminated, batch_size=batch_size)
    finite = logp[~np.isnan(logp)]
    quality: dict[str, float | None] = {"mean_logprob": float(finite.mean()) if finite.size else None,
                                        "chrf": None, "bleu": None}
    pairs = [(t, r) for t, r in zip(texts, references) if r is not None]
    if pairs:
        hyps, refs = [p[0] for p in pairs], [p[1] for p in pairs]
        quality["chrf"] = float(sacrebleu.corpus_chrf(hyps, [refs]).score)
        quality["bleu"] = float(sacrebleu.corpus_bleu(hyps, [refs]).score)
    return quality


def measure_policies(
    lm: "LoadedModel",
    policies: Sequence["Policy"],
    prompts: Sequence[str],
    references: Sequence[str | None] | None = None,
    *,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 16,
    monitor_factory: Callable[[], Any] | None = None,
    on_batch: Callable[[int], None] | None = None,
    executor: Any = None,
) -> list[PolicyMeasurement]:
    """Generate under each policy over ``prompts`` and score the outputs (metrics, stderr, quality).

    ``executor``: where ``generate()`` runs (see :func:`generate_for_policy`); scoring stays here."""
    references = list(references) if references is not None else [None] * len(prompts)
    ends, dot = sentence_end_ids(lm.tokenizer)
    results = []
    for policy in policies:
        t0 = time.perf_counter()
        sequences, terminated, events = generate_for_policy(
            lm, policy, prompts, max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size,
            monitor_factory=monitor_factory, on_batch=on_batch, executor=executor)
        texts = tuple(lm.tokenizer.decode(list(s), skip_special_tokens=True) for s in sequences)
        token_metrics = metrics_mod.compute_metrics(sequences, unit="token", terminated=terminated,
                                                    sentence_end=ends, dot=dot,
                                                    per_sequence=True)
        word_metrics = metrics_mod.compute_metrics(list(texts), unit="word", terminated=terminated)
        stderr = token_metrics.pop("stderr")
        token_metrics.pop("per_sequence")
        quality = _quality(lm, prompts, references, sequences, terminated, texts, batch_size)
        results.append(PolicyMeasurement(
            policy=policy.name, sequences=tuple(sequences), texts=texts, terminated=tuple(terminated),
            metrics=token_metrics, word_metrics=word_metrics, stderr=stderr, quality=quality,
            loop_events=tuple(events), seconds=time.perf_counter() - t0))
    return results
