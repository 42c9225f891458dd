"""The on-disk training record (format ``repdiag-training-record`` v1; see docs/attribution-format.md).

A record folder holds::

    record.json                  index: model, optimizer, loss-weight model, files, warnings
    steps.jsonl                  one JSON object per optimizer step (example ids, weights, lr, clip)
    examples.safetensors         the token ids of every training example the run used
    theta0.safetensors           θ_0 (optional; needed by the replay modes)
    checkpoints/step-XXXXXXXX.safetensors   θ after that many optimizer steps (optional)

Arrays are safetensors (tensor name = parameter name), never pickles. This module reads and writes
that format and validates it against a model; errors are :class:`repdiag.errors.RecordError`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .._atomic import atomic_path, write_json, write_text
from ..errors import RecordError
from .data import Example

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["FORMAT", "VERSION", "Record", "StepRecord", "WEIGHT_MODELS", "step_weights", "params_sha256",
           "save_tensors", "load_tensors", "write_examples", "read_examples"]

FORMAT = "repdiag-training-record"
VERSION = 1

#: loss-weight models: how the trainer's batch loss weights each example's summed token NLL ℓ_i.
WEIGHT_MODELS = {
    "token_mean_microbatch_sum": "w_i = 1 / N_tok(micro-batch of i); micro-batch token means summed over the "
                                 "accumulation steps (HF Trainer + T5/BART-style models, transformers 5.x)",
    "token_mean_batch": "w_i = 1 / N_tok(all micro-batches of the step) (HF Trainer with num_items_in_batch, "
                        "e.g. causal LMs; also plain token-mean CE without accumulation)",
    "token_mean_microbatch_mean": "w_i = 1 / (A * N_tok(micro-batch of i)), A = micro-batches in the step "
                                  "(classic loss / gradient_accumulation_steps)",
    "example_mean": "w_i = 1 / (B * N_tok(i)), B = examples in the step (mean over examples of token means)",
    "sum": "w_i = 1 (summed token NLL)",
}


def step_weights(model: str, ntok: Sequence[Sequence[int]]) -> list[list[float]]:
    """Per-example weights of one step from the label-token counts of its micro-batches."""
    if model not in WEIGHT_MODELS:
        raise RecordError(f"unknown loss-weight model {model!r}; choose from {', '.join(WEIGHT_MODELS)}")
    total = sum(sum(mb) for mb in ntok)
    nmb = len(ntok)
    nex = sum(len(mb) for mb in ntok)
    out = []
    for mb in ntok:
        s = sum(mb)
        if model == "token_mean_microbatch_sum":
            out.append([1.0 / s if s else 0.0] * len(mb))
        elif model == "token_mean_batch":
            out.append([1.0 / total if total else 0.0] * len(mb))
        elif model == "token_mean_microbatch_mean":
            out.append([1.0 / (nmb * s) if s else 0.0] * len(mb))
        elif model == "example_mean":
            out.append([1.0 / (nex * k) if k else 0.0 for k in mb])
        else:
            out.append([1.0] * len(mb))
    return out


def params_sha256(named: dict) -> str:
    """sha256 over ``name``, shape and float32 little-endian bytes of every tensor, in sorted name order."""
    import numpy as np
    import torch

    h = hashlib.sha256()
    for name in sorted(named):
        t = named[name].detach().to(torch.float32).cpu().contiguous()
        h.update(name.encode())
        h.update(json.dumps(list(t.shape)).encode())
        h.update(np.ascontiguousarray(t.numpy()).astype("<f4").tobytes())
    return h.hexdigest()


def save_tensors(path: Path, tensors: dict, dtype=None, metadata: dict | None = None) -> None:
    import torch
    from safetensors.torch import save_file

    out = {}
    for k, v in tensors.items():
        t = v.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[k] = t.contiguous().clone()
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(out, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    del torch


def load_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    if not path.is_file():
        raise RecordError(f"record file {str(path)!r} is missing: the record folder is incomplete")
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse error is a bad record
        raise RecordError(f"cannot read {str(path)!r} ({type(exc).__name__}): not a safetensors file") from exc


def write_examples(path: Path, examples: dict[int, Example], n: int) -> None:
    """``input_ids``/``labels`` flat int16 (int32 if an id exceeds 32767) with ``*_offsets`` int64 ``[n+1]``.

    Example i is ``input_ids[input_offsets[i]:input_offsets[i+1]]``; ids never used in training are empty.
    """
    import torch

    ii, io, ll, lo = [], [0], [], [0]
    for i in range(n):
        e = examples.get(i)
        a = list(e.input_ids) if e else []
        b = list(e.labels) if e else []
        ii += a
        ll += b
        io.append(len(ii))
        lo.append(len(ll))
    small = all(-32768 <= t <= 32767 for t in ii + ll)  # int16 halves the file for vocabularies < 32768
    tdt = torch.int16 if small else torch.int32
    save_tensors(path, {
        "input_ids": torch.tensor(ii, dtype=tdt),
        "input_offsets": torch.tensor(io, dtype=torch.int64),
        "labels": torch.tensor(ll, dtype=tdt),
        "label_offsets": torch.tensor(lo, dtype=torch.int64),
    })


def read_examples(path: Path) -> list[Example | None]:
    t = load_tensors(path)
    try:
        ii, io, ll, lo = (t[k].tolist() for k in ("input_ids", "input_offsets", "labels", "label_offsets"))
    except KeyError as exc:
        raise RecordError(f"{str(path)!r} lacks the array {exc.args[0]!r}: not a repdiag examples file") from exc
    out: list[Example | None] = []
    for k in range(len(io) - 1):
        a, b = ii[io[k]:io[k + 1]], ll[lo[k]:lo[k + 1]]
        out.append(Example(tuple(a), tuple(b)) if a or b else None)
    return out


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step: micro-batches of example ids, their label-token counts and weights, lr, clip."""

    step: int
    micro: tuple[tuple[int, ...], ...]
    ntok: tuple[tuple[int, ...], ...]
    weights: tuple[tuple[float, ...], ...]
    lr: tuple[float, ...]          # one per optimizer parameter group
    clip: float = 1.0

    @property
    def ids(self) -> list[int]:
        return [i for mb in self.micro for i in mb]

    @property
    def flat_weights(self) -> list[float]:
        return [w for mb in self.weights for w in mb]

    def to_json(self) -> dict:
        return {"step": self.step, "micro": [list(m) for m in self.micro], "ntok": [list(m) for m in self.ntok],
                "w": [list(m) for m in self.weights], "lr": list(self.lr), "clip": self.clip}


@dataclass
class Record:
    """A training record folder, read and validated (see the module docstring)."""

    path: Path
    meta: dict
    steps: list[StepRecord] = field(default_factory=list)
    _examples: list | None = None

    # -- reading ----------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "Record":
        path = Path(path)
        index = path / "record.json"
        if not path.is_dir():
            raise RecordError(f"record folder {str(path)!r} does not exist: pass the --record folder written "
                              "by PathRecorder")
        if not index.is_file():
            raise RecordError(f"{str(path)!r} has no record.json: not a repdiag training record")
        try:
            meta = json.loads(index.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RecordError(f"{str(index)!r} is not valid JSON ({exc.msg})") from exc
        if meta.get("format") != FORMAT:
            raise RecordError(f"{str(index)!r} is not a {FORMAT} index (format={meta.get('format')!r})")
        if int(meta.get("version", 0)) > VERSION:
            raise RecordError(f"record format version {meta.get('version')} is newer than this repdiag reads "
                              f"({VERSION}): upgrade repdiag")
        rec = cls(path, meta)
        steps_file = path / meta.get("steps", {}).get("file", "steps.jsonl")
        if not steps_file.is_file():
            raise RecordError(f"{str(steps_file)!r} is missing: the record has no step schedule")
        for k, line in enumerate(steps_file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                o = json.loads(line)
                rec.steps.append(StepRecord(int(o["step"]), tuple(tuple(int(i) for i in m) for m in o["micro"]),
                                            tuple(tuple(int(i) for i in m) for m in o["ntok"]),
                                            tuple(tuple(float(w) for w in m) for m in o["w"]),
                                            tuple(float(x) for x in o["lr"]), float(o.get("clip", 1.0))))
            except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
                raise RecordError(f"{str(steps_file)}:{k}: malformed step ({type(exc).__name__})") from exc
        expected = meta.get("steps", {}).get("count")
        if expected is not None and expected != len(rec.steps):
            raise RecordError(f"{str(steps_file)!r} has {len(rec.steps)} steps but record.json says {expected}: "
                              "the record is truncated")
        for s, st in enumerate(rec.steps):
            if st.step != s:
                raise RecordError(f"{str(steps_file)!r}: step {st.step} found where step {s} was expected")
        return rec

    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def n_examples(self) -> int:
        return int(self.meta["n_examples"])

    @property
    def weight_model(self) -> str:
        return self.meta.get("weight_model", "")

    @property
    def optimizer(self) -> dict:
        return self.meta.get("optimizer") or {}

    @property
    def warnings(self) -> list[str]:
        return list(self.meta.get("warnings", []))

    @property
    def has_theta0(self) -> bool:
        return bool(self.meta.get("theta0"))

    @property
    def theta0_exact(self) -> bool:
        t = self.meta.get("theta0") or {}
        return bool(t) and t.get("dtype") == self.meta.get("model", {}).get("dtype") and not t.get("params")

    @property
    def checkpoints(self) -> list[dict]:
        return list(self.meta.get("checkpoints", []))

    def examples(self) -> list[Example | None]:
        if self._examples is None:
            self._examples = read_examples(self.path / self.meta.get("examples", {}).get("file",
                                                                                       "examples.safetensors"))
            if len(self._examples) != self.n_examples:
                raise RecordError(f"examples file holds {len(self._examples)} examples, record.json says "
                                  f"{self.n_examples}")
        return self._examples

    def theta0(self) -> dict:
        t = self.meta.get("theta0")
        if not t:
            raise RecordError("the record has no θ0 (theta0.safetensors): use --mode checkpoints or final")
        return load_tensors(self.path / t["file"])

    def checkpoint(self, step: int) -> dict:
        for c in self.checkpoints:
            if int(c["step"]) == int(step):
                return load_tensors(self.path / c["file"])
        raise RecordError(f"the record has no checkpoint at step {step}")

    # -- validation -------------------------------------------------------------------------------
    def check_model(self, model) -> None:
        """Raise RecordError when the model's parameter names/shapes differ from the record's."""
        want = {n: tuple(s) for n, s in self.meta["model"]["parameters"]}
        have = {n: tuple(p.shape) for n, p in model.named_parameters()}
        for n, s in want.items():
            if n not in have:
                raise RecordError(f"the record's parameter {n!r} does not exist in this model: the record was made "
                                  "with another architecture")
            if have[n] != s:
                raise RecordError(f"parameter {n!r} has shape {list(have[n])} in the model but {list(s)} in the "
                                  "record: the record was made with another architecture")
        extra = sorted(set(have) - set(want))
        if extra:
            raise RecordError(f"the model has parameter {extra[0]!r} which the record lacks: the record was made "
                              "with another architecture")
        cls_name = type(model).__name__
        if self.meta["model"].get("class") not in (None, cls_name):
            raise RecordError(f"the record is for a {self.meta['model']['class']}, the model is a {cls_name}")

    def check_tensors(self, tensors: dict, what: str, model) -> None:
        named = dict(model.named_parameters())
        for n, t in tensors.items():
            if n not in named:
                raise RecordError(f"{what} holds {n!r}, which this model does not have: wrong architecture")
            if tuple(t.shape) != tuple(named[n].shape):
                raise RecordError(f"{what}: {n!r} has shape {list(t.shape)}, the model {list(named[n].shape)}: "
                                  "wrong architecture")

    def check_final(self, model) -> bool:
        """True when the model's weights are the record's final weights (sha256 of float32 values)."""
        want = (self.meta.get("final") or {}).get("sha256")
        if not want:
            return True
        return params_sha256(dict(model.named_parameters())) == want


class RecordWriter:
    """Writes the record folder (used by :class:`repdiag.attribution.recorder.PathRecorder`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def write_steps(self, steps: Sequence[StepRecord]) -> None:
        write_text(self.path / "steps.jsonl",
                   "".join(json.dumps(s.to_json(), sort_keys=True) + "\n" for s in steps))

    def write_index(self, meta: dict[str, Any]) -> None:
        write_json(self.path / "record.json", meta)
