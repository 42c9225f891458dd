"""Training examples as token ids: encoding, collation and the per-example loss ``ℓ_i``.

``ℓ_i(θ)`` is the **summed** token negative log-likelihood of example i under teacher forcing
(label positions equal to ``-100`` are ignored), spec kernel-attribution.md §2.1. The recorder and
every attribution mode use this one definition, so the loss weights ``w_i`` recorded during training
are the only bridge between a trainer's batch loss and the per-example losses.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from ..errors import BadInputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "Example",
    "TrainPair",
    "read_pairs",
    "pair_sha",
    "encode_pair",
    "collate",
    "example_losses",
    "label_token_count",
]

IGNORE = -100


@dataclass(frozen=True)
class TrainPair:
    """One training pair as text."""

    source: str
    target: str


@dataclass(frozen=True)
class Example:
    """One training example as the model saw it: encoder (or full) input ids and labels.

    For a seq2seq model ``input_ids`` is the encoder input and ``labels`` the decoder targets (the
    decoder input is ``labels`` shifted right, as HF does). For a causal model ``input_ids`` is the
    whole sequence and ``labels`` has the same length (``-100`` where no loss is taken); HF's shift
    by one applies.
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


def pair_sha(source: str, target: str) -> str:
    """sha256 of ``source + "\\x00" + target`` (UTF-8): the identity of a training pair in a record."""
    return hashlib.sha256((source + "\x00" + target).encode("utf-8")).hexdigest()


def read_pairs(path: str | Path) -> list[TrainPair]:
    """Read training pairs from JSONL (``{"source", "target"}``; ``input``/``output`` also accepted) or TSV."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"training file {str(path)!r} does not exist: check the --train path")
    pairs: list[TrainPair] = []
    if path.suffix.lower() == ".gz":
        import gzip

        with gzip.open(path, "rt", encoding="utf-8") as handle:
            text = handle.read()
        path = path.with_suffix("")  # the format is that of the inner file (.jsonl / .tsv)
    else:
        text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".tsv", ".txt"):
        for k, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) != 2:
                raise BadInputError(f"{path}:{k}: expected 'source<TAB>target'")
            pairs.append(TrainPair(parts[0], parts[1]))
    else:
        for k, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInputError(f"{path}:{k}: not JSON ({exc.msg}); expected one pair per line") from exc
            src = obj.get("source", obj.get("input", obj.get("prompt")))
            tgt = obj.get("target", obj.get("output", obj.get("completion")))
            if not isinstance(src, str) or not isinstance(tgt, str):
                raise BadInputError(f"{path}:{k}: expected {{'source': str, 'target': str}}")
            pairs.append(TrainPair(src, tgt))
    if not pairs:
        raise BadInputError(f"training file {str(path)!r} has no pairs")
    return pairs


def encode_pair(tokenizer, kind: str, source: str, target: str, *, eos_token_id: int | None = None) -> Example:
    """The canonical encoding of a pair (what ``examples/train_default_model.py`` style training uses).

    seq2seq: ``input_ids = tok(source)``, ``labels = tok(text_target=target)`` (special tokens as the
    tokenizer adds them). causal: ``input_ids = tok(source) + tok(target, no specials) + [eos]`` with
    labels ``-100`` over the source part.
    """
    if kind == "seq2seq":
        src = tokenizer(source)["input_ids"]
        tgt = tokenizer(text_target=target)["input_ids"]
        return Example(tuple(int(t) for t in src), tuple(int(t) for t in tgt))
    src = tokenizer(source)["input_ids"]
    tgt = tokenizer(target, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
    ids = list(src) + list(tgt) + ([int(eos)] if eos is not None else [])
    labels = [IGNORE] * len(src) + list(ids[len(src):])
    return Example(tuple(int(t) for t in ids), tuple(int(t) for t in labels))


def label_token_count(example: Example, kind: str) -> int:
    """Number of label tokens that enter the loss (after HF's shift for causal models)."""
    labels = example.labels[1:] if kind == "causal" else example.labels
    return sum(1 for t in labels if t != IGNORE)


def collate(examples: Sequence[Example], pad_token_id: int, device=None) -> dict:
    """Right-pad a list of examples into a batch: ``input_ids``, ``attention_mask``, ``labels``."""
    import torch

    n = len(examples)
    li = max(len(e.input_ids) for e in examples)
    ll = max(len(e.labels) for e in examples)
    ids = torch.full((n, li), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((n, li), dtype=torch.long)
    labels = torch.full((n, ll), IGNORE, dtype=torch.long)
    for k, e in enumerate(examples):
        ids[k, : len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.long)
        mask[k, : len(e.input_ids)] = 1
        labels[k, : len(e.labels)] = torch.tensor(e.labels, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch


def _decoder_inputs(model, labels: "torch.Tensor") -> "torch.Tensor":
    prep = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if prep is not None:
        try:
            return prep(labels=labels)
        except (NotImplementedError, TypeError, ValueError):
            pass
    import torch

    cfg = model.config
    start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.pad_token_id
    shifted = torch.full_like(labels, int(start))
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE, int(cfg.pad_token_id or 0))


def example_losses(model, batch: dict, kind: str, *, forward=None) -> "torch.Tensor":
    """Per-example summed token NLL ``ℓ_i`` for a collated batch (shape ``[batch]``).

    ``forward(**kwargs)`` defaults to ``model(**kwargs)``; the batched backend passes a
    ``functional_call`` wrapper.
    """
    import torch

    fwd = forward if forward is not None else model
    labels = batch["labels"]
    if kind == "seq2seq":
        dec = _decoder_inputs(model, labels)
        out = fwd(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=dec,
                  use_cache=False)
        logits = out.logits
        targets = labels
    else:
        out = fwd(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        logits = out.logits[:, :-1]
        targets = labels[:, 1:]
    logp = torch.log_softmax(logits, dim=-1)
    valid = targets != IGNORE
    picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return -(picked * valid.to(picked.dtype)).sum(-1)


def examples_sha(examples: Iterable[Example]) -> str:
    """sha256 over all examples' token ids, in order (the record's ``examples_sha256``)."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([list(e.input_ids), list(e.labels)]).encode())
    return h.hexdigest()
