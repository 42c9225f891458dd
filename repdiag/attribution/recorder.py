"""Record a training run so that its outputs can be attributed to training examples (spec §4.2).

Two front ends share one core:

* :class:`PathRecorder` — for a plain PyTorch loop::

      rec = PathRecorder("run/record", model, kind="seq2seq", pad_token_id=0, n_examples=len(pairs))
      rec.begin()                                    # saves θ0
      for ids in batches:                            # ids: the example indices of one micro-batch
          batch = collate(...)
          rec.observe_batch(ids, batch)              # before the forward pass
          model(**batch).loss.backward()
          rec.pre_step(optimizer)                    # after backward, before clipping / optimizer.step()
          optimizer.step(); optimizer.zero_grad()
          rec.post_step()                            # checkpoints at the chosen interval
      rec.end()                                      # writes steps, examples, the index

* :class:`PathRecorderCallback` + :class:`IndexedCollator` — for ``transformers.Trainer``: the collator
  pops ``idx`` from each feature (so the model never sees it) and hands the ids and the collated batch
  to the recorder; the callback reads the learning rate and the clip factor before each optimizer step.

On the first steps the recorder **verifies its loss-weight model**: the accumulated gradient ``p.grad``
must equal ``c_s Σ_i w_i ∇ℓ_i`` (ℓ_i = summed token NLL); it tries the known weight models
(:data:`~repdiag.attribution.runfile.WEIGHT_MODELS`) and raises :class:`~repdiag.errors.RecordError` when
none reproduces the trainer's gradient.
"""

from __future__ import annotations

import collections
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import RecordError
from .data import Example, IGNORE, label_token_count, pair_sha
from .features import ParamSpace
from .runfile import (FORMAT, VERSION, WEIGHT_MODELS, RecordWriter, StepRecord, params_sha256, save_tensors,
                      step_weights, write_examples)

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["PathRecorder", "PathRecorderCallback", "IndexedCollator", "recorder_callback"]

_PREFERENCE = ("token_mean_microbatch_sum", "token_mean_batch", "token_mean_microbatch_mean", "example_mean", "sum")


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _has_dropout(model) -> bool:
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) and m.p > 0:
            return True
    cfg = getattr(model, "config", None)
    for key in ("dropout_rate", "dropout", "attention_dropout", "hidden_dropout_prob", "resid_pdrop",
                "attn_pdrop", "embd_pdrop", "activation_dropout"):
        v = getattr(cfg, key, None)
        if isinstance(v, (int, float)) and v > 0:
            return True
    return False


class PathRecorder:
    """Records θ0, the per-step schedule (example ids, label-token counts, lr, clip) and checkpoints.

    Parameters
    ----------
    record_dir
        Output folder (created).
    model
        The model being trained (its parameters are read, never changed).
    kind
        ``"seq2seq"`` or ``"causal"`` (default: from ``model.config.is_encoder_decoder``).
    pad_token_id
        Padding id used to strip padding from collated batches.
    n_examples
        Number of training examples (ids are ``0 .. n−1``); default: the largest id seen + 1.
    train_pairs
        Optional ``[(source, target), ...]`` in id order: their sha256 are stored so that
        ``repdiag attribute --train`` can check that it got the same training file.
    checkpoint_every
        Save θ every that many optimizer steps (``None``: none; θ0 and the final model still count).
    checkpoint_dtype
        ``"float32"`` (default), ``"float16"``, ``"bfloat16"`` or ``"float64"``; lower precision makes the
        checkpoint mode approximate θ at ~1e-3 relative, which only perturbs its (already approximate) scores.
    theta0_dtype
        Precision of θ0 (default: the model's; anything lower rules out the exact replay modes).
    checkpoint_params
        Regex of parameter names to keep in checkpoints (default: all).
    weight_model
        ``"auto"`` (verify and choose) or one of :data:`WEIGHT_MODELS` (still verified).
    check_steps
        How many first steps to verify the weight model on (stops early once one model is left).
    """

    def __init__(self, record_dir: str | Path, model=None, *, kind: str | None = None, pad_token_id: int | None = None,
                 n_examples: int | None = None, train_pairs: Sequence[Any] | None = None,
                 checkpoint_every: int | None = None, checkpoint_dtype: str = "float32",
                 theta0_dtype: str | None = None, checkpoint_params: str | None = None,
                 save_theta0: bool = True, weight_model: str = "auto", check_steps: int = 3,
                 check_rtol: float | None = None, trainer: str = "plain loop") -> None:
        if weight_model != "auto" and weight_model not in WEIGHT_MODELS:
            raise RecordError(f"unknown weight model {weight_model!r}; choose auto or {', '.join(WEIGHT_MODELS)}")
        self.writer = RecordWriter(record_dir)
        self.path = self.writer.path
        self.model = model
        self.kind = kind
        self.pad_token_id = pad_token_id
        self.n_examples = n_examples
        self.train_pairs = list(train_pairs) if train_pairs is not None else None
        self.checkpoint_every = checkpoint_every
        self.checkpoint_dtype = checkpoint_dtype
        self.theta0_dtype = theta0_dtype
        self.checkpoint_params = checkpoint_params
        self.save_theta0 = save_theta0
        self.weight_model = weight_model
        self.candidates = list(_PREFERENCE) if weight_model == "auto" else [weight_model]
        self.check_steps = check_steps
        self.check_rtol = check_rtol
        self.trainer = trainer
        self.pending: collections.deque = collections.deque()  # collated micro-batches not yet forwarded
        self.current: list[tuple[list[int], list[int]]] = []  # micro-batches (ids, ntok) of the running step
        self.examples: dict[int, Example] = {}
        self.steps: list[StepRecord] = []
        self.step = 0
        self.checkpoints: list[dict] = []
        self.checks: list[dict] = []
        self.warnings: list[str] = []
        self.optimizer_info: dict | None = None
        self.training_info: dict = {}
        self._hook = None
        self._internal = False
        self._began = False

    # -- set-up -----------------------------------------------------------------------------------
    def begin(self, model=None) -> None:
        """Start recording: save θ0 and install the forward hook that pairs micro-batches with forwards."""
        if model is not None:
            self.model = model
        if self.model is None:
            raise RecordError("PathRecorder needs the model: pass it to PathRecorder(...) or begin(model)")
        model = self.model
        if self.kind is None:
            self.kind = "seq2seq" if getattr(model.config, "is_encoder_decoder", False) else "causal"
        if self.pad_token_id is None:
            pad = getattr(model.config, "pad_token_id", None)
            self.pad_token_id = int(pad if pad is not None else 0)
        self.space = ParamSpace(model)
        self.dtype = _dtype_name(self.space.dtype)
        if _has_dropout(model):
            self.warnings.append("dropout > 0 during training: per-example gradients depend on dropout masks that "
                                 "are not replayed; exact modes are approximate (dropout) and the loss-weight check "
                                 "was skipped")
        if self.save_theta0:
            dt = self.theta0_dtype or self.dtype
            save_tensors(self.path / "theta0.safetensors", dict(model.named_parameters()), dtype=_torch_dtype(dt))
            self.theta0_info = {"file": "theta0.safetensors", "dtype": dt,
                                "sha256": params_sha256(dict(model.named_parameters()))}
        else:
            self.theta0_info = None
        self._hook = model.register_forward_pre_hook(self._on_forward, with_kwargs=True)
        self._began = True
        self._write_index(final=None)

    def _on_forward(self, module, args, kwargs):
        import torch

        if self._internal or not torch.is_grad_enabled():
            return None
        if not self.pending:
            raise RecordError("a training forward pass without a recorded batch: wrap the data collator with "
                              "IndexedCollator (or call observe_batch before each forward)")
        ids, ntok, shape = self.pending.popleft()
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is not None and shape is not None and tuple(x.shape) != shape:
            raise RecordError(f"the recorded micro-batch has input shape {list(shape)} but the model got "
                              f"{list(x.shape)}: the collator and the training loop are out of step")
        self.current.append((ids, ntok))
        return None

    # -- per micro-batch --------------------------------------------------------------------------
    def observe_batch(self, ids: Sequence[int], batch: dict) -> None:
        """Record one collated micro-batch (``input_ids``, ``attention_mask``, ``labels``) and its example ids."""
        import torch

        ids = [int(i) for i in ids]
        x = batch["input_ids"]
        labels = batch.get("labels")
        if labels is None:
            raise RecordError("the collated batch has no 'labels': the recorder needs them to know each example's "
                              "loss tokens")
        mask = batch.get("attention_mask")
        if len(ids) != x.shape[0]:
            raise RecordError(f"{len(ids)} example ids for a batch of {x.shape[0]} rows")
        ntok = []
        for r, i in enumerate(ids):
            row = x[r]
            if mask is not None:
                keep = mask[r].bool()
                row = row[keep]
            lab = labels[r].tolist()
            while lab and lab[-1] == IGNORE:
                lab.pop()
            if self.kind == "causal" and mask is not None:
                lab = [t for t, k in zip(labels[r].tolist(), mask[r].tolist()) if k]
            ex = Example(tuple(int(t) for t in row.tolist()), tuple(int(t) for t in lab))
            old = self.examples.get(i)
            if old is None:
                self.examples[i] = ex
            elif old != ex:
                raise RecordError(f"example {i} was collated with different tokens in two batches: ids are not "
                                  "stable (shuffle the ids with the data, do not renumber)")
            ntok.append(label_token_count(ex, self.kind or "seq2seq"))
        self.pending.append((ids, ntok, tuple(x.shape) if isinstance(x, torch.Tensor) else None))

    # -- per optimizer step -----------------------------------------------------------------------
    def pre_step(self, optimizer=None, *, lr: float | Sequence[float] | None = None, clip_scale: float | None = None,
                 max_grad_norm: float | None = None, grads_are_clipped: bool = False) -> None:
        """Call after the backward pass(es) of a step and before ``optimizer.step()``.

        ``lr``: the learning rate(s) used by this step (default: read from ``optimizer.param_groups``).
        ``clip_scale``: the gradient-clipping factor ``c_s`` if known; else computed from ``p.grad`` and
        ``max_grad_norm`` (call before clipping then). ``grads_are_clipped``: ``p.grad`` already includes ``c_s``.
        """
        import torch

        if not self._began:
            raise RecordError("PathRecorder.pre_step before begin(): call begin() before training")
        if not self.current and self.pending:  # a loop without forward-hook pairing (e.g. a compiled model)
            while self.pending:
                ids, ntok, _ = self.pending.popleft()
                self.current.append((ids, ntok))
        if not self.current:
            raise RecordError("an optimizer step with no recorded micro-batch: call observe_batch for each batch")
        if optimizer is not None and self.optimizer_info is None:
            self.optimizer_info = describe_optimizer(optimizer, self.model)
        if lr is None:
            if optimizer is None:
                raise RecordError("pre_step needs the optimizer or the learning rate")
            lr = [float(g["lr"]) for g in optimizer.param_groups]
        lrs = [float(lr)] if isinstance(lr, (int, float)) else [float(x) for x in lr]
        if clip_scale is None:
            clip_scale = 1.0
            if max_grad_norm is not None and max_grad_norm > 0:
                norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in self.space.params if p.grad is not None))
                clip_scale = float(min(1.0, max_grad_norm / (float(norm) + 1e-6)))
        micro = tuple(tuple(ids) for ids, _ in self.current)
        ntok = tuple(tuple(n) for _, n in self.current)
        if len(self.checks) < self.check_steps and len(self.candidates) > 1 or not self.checks:
            if not any("dropout" in w for w in self.warnings):
                self._check_weights(micro, ntok, clip_scale if grads_are_clipped else 1.0)
        self.steps.append(StepRecord(self.step, micro, ntok, (), tuple(lrs), float(clip_scale)))
        self.current = []

    def _check_weights(self, micro, ntok, scale: float) -> None:
        """Compare ``p.grad`` with ``scale Σ_i w_i ∇ℓ_i`` under every candidate weight model."""
        import torch

        from .features import GradientComputer

        actual = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double()
                            for p in self.space.params])
        if float(actual.abs().max()) == 0.0:
            self.warnings.append(f"step {self.step}: all gradients are zero; loss-weight check skipped")
            return
        cands = {c: step_weights(c, ntok) for c in self.candidates}
        sums = {c: torch.zeros_like(actual) for c in cands}
        gc = GradientComputer(self.space, self.kind, self.pad_token_id, "loop")
        self._internal = True
        try:
            for m, mb in enumerate(micro):
                for k, i in enumerate(mb):
                    g = gc([self.examples[i]])[0].double()
                    for c in cands:
                        sums[c] += cands[c][m][k] * g
        finally:
            self._internal = False
        rtol = self.check_rtol or (1e-6 if self.space.dtype == torch.float64 else 2e-3)
        scale_ref = float(actual.abs().max())
        errors = {c: float((scale * sums[c] - actual).abs().max()) / scale_ref for c in cands}
        ok = [c for c in self.candidates if errors[c] <= rtol]
        self.checks.append({"step": self.step, "max_rel_error": errors, "rtol": rtol, "matching": ok})
        if not ok:
            best = min(errors, key=errors.get)
            raise RecordError(
                f"cannot reconstruct the update of step {self.step} from per-example gradients (best weight model "
                f"{best}: relative error {errors[best]:.1e} > {rtol:g}); attribution would be wrong — set "
                "gradient_accumulation_steps=1, dropout 0, or pass weight_model=…"
            )
        self.candidates = ok

    def post_step(self) -> None:
        """Call after ``optimizer.step()``: counts the step and saves a checkpoint when one is due."""
        self.step += 1
        if self.checkpoint_every and self.step % int(self.checkpoint_every) == 0:
            self.save_checkpoint()

    def save_checkpoint(self) -> None:
        named = dict(self.model.named_parameters())
        if self.checkpoint_params:
            rx = re.compile(self.checkpoint_params)
            named = {n: p for n, p in named.items() if rx.search(n)}
        rel = f"checkpoints/step-{self.step:08d}.safetensors"
        (self.path / "checkpoints").mkdir(exist_ok=True)
        save_tensors(self.path / rel, named, dtype=_torch_dtype(self.checkpoint_dtype))
        self.checkpoints.append({"step": self.step, "file": rel, "dtype": self.checkpoint_dtype,
                                 "params": None if not self.checkpoint_params else sorted(named)})
        self._flush(final=None)

    # -- the end ----------------------------------------------------------------------------------
    def end(self) -> Path:
        """Write the schedule, the examples and the index; returns the record folder."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        final = {"step": self.step, "sha256": params_sha256(dict(self.model.named_parameters()))}
        self._flush(final=final)
        return self.path

    def _flush(self, final) -> None:
        wm = self.candidates[0]
        steps = [StepRecord(s.step, s.micro, s.ntok, tuple(tuple(x) for x in step_weights(wm, s.ntok)), s.lr, s.clip)
                 for s in self.steps]
        self.writer.write_steps(steps)
        n = self.n_examples if self.n_examples is not None else (max(self.examples) + 1 if self.examples else 0)
        write_examples(self.path / "examples.safetensors", self.examples, n)
        self._write_index(final=final, n=n)

    def _write_index(self, final, n: int | None = None) -> None:
        wm = self.candidates[0]
        if n is None:
            n = self.n_examples or 0
        warnings = list(self.warnings)
        if len(self.candidates) > 1 and self.weight_model == "auto":
            warnings.append(f"the loss-weight check could not tell {', '.join(self.candidates)} apart on the steps "
                            f"checked; {wm} was recorded")
        model = self.model
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "kind": self.kind,
            "pad_token_id": self.pad_token_id,
            "model": {
                "class": type(model).__name__,
                "dtype": self.dtype,
                "parameters": [[n_, list(s)] for n_, s in zip(self.space.names, self.space.shapes)],
                "n_parameters": self.space.size,
            },
            "loss": "per-example loss = summed token NLL (labels -100 ignored; causal labels shifted by one); the "
                    "trainer's batch loss = sum_i w_i * loss_i",
            "weight_model": wm,
            "weight_model_doc": WEIGHT_MODELS[wm],
            "weight_check": self.checks,
            "optimizer": self.optimizer_info,
            "n_examples": n,
            "pair_sha256": ([pair_sha(*_pair(p)) for p in self.train_pairs] if self.train_pairs is not None else None),
            "examples": {"file": "examples.safetensors"},
            "steps": {"file": "steps.jsonl", "count": len(self.steps)},
            "theta0": self.theta0_info,
            "checkpoints": self.checkpoints,
            "final": final,
            "training": {"trainer": self.trainer, **self.training_info},
            "warnings": warnings,
        }
        self.writer.write_index(meta)


def _pair(p) -> tuple[str, str]:
    if isinstance(p, dict):
        return p["source"], p["target"]
    if hasattr(p, "source"):
        return p.source, p.target
    return p[0], p[1]


def _torch_dtype(name: str):
    import torch

    try:
        return {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}[name]
    except KeyError as exc:
        raise RecordError(f"unknown dtype {name!r}; use float64, float32, float16 or bfloat16") from exc


def describe_optimizer(optimizer, model) -> dict:
    """Name, hyper-parameters and parameter names of each group (the replay's optimizer model)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for g in inner.param_groups:
        hp = {k: (v if isinstance(v, (int, float, bool, str)) or v is None else list(v) if isinstance(v, tuple)
                  else str(v))
              for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
        groups.append({"params": [names.get(id(p), "?") for p in g["params"]], **hp})
    return {"name": type(inner).__name__, "groups": groups}


class IndexedCollator:
    """Wraps a data collator: pops ``id_key`` from each feature and reports the ids and batch to the recorder.

    Use with ``TrainingArguments(remove_unused_columns=False, dataloader_num_workers=0)`` (or a plain list /
    ``torch.utils.data.Dataset`` of dicts), so that ``idx`` reaches the collator and the recorder lives in
    the training process.
    """

    def __init__(self, collator, recorder: PathRecorder, id_key: str = "idx") -> None:
        self.collator = collator
        self.recorder = recorder
        self.id_key = id_key

    def __call__(self, features):
        try:
            ids = [int(f[self.id_key]) for f in features]
        except (KeyError, TypeError) as exc:
            raise RecordError(f"a training feature has no {self.id_key!r}: add the example index to each feature "
                              "and set remove_unused_columns=False") from exc
        feats = [{k: v for k, v in f.items() if k != self.id_key} for f in features]
        batch = self.collator(feats)
        self.recorder.observe_batch(ids, batch)
        return batch


def _callback_base():
    try:
        from transformers import TrainerCallback
    except ImportError:  # pragma: no cover - transformers is a dependency
        return object
    return TrainerCallback


class PathRecorderCallback(_callback_base()):  # type: ignore[misc]
    """``transformers.TrainerCallback`` driving a :class:`PathRecorder` (pair it with :class:`IndexedCollator`)."""

    def __init__(self, recorder: PathRecorder) -> None:
        self.recorder = recorder
        self._sq: dict[int, Any] = {}
        self._handles: list = []
        self._max_norm = 0.0

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        rec = self.recorder
        if getattr(args, "dataloader_num_workers", 0):
            raise RecordError("the training recorder needs dataloader_num_workers=0 (the collator reports to it)")
        rec.trainer = "transformers.Trainer"
        rec.training_info = {
            "gradient_accumulation_steps": int(args.gradient_accumulation_steps),
            "max_grad_norm": float(args.max_grad_norm or 0.0),
            "per_device_train_batch_size": int(args.per_device_train_batch_size),
            "optim": str(getattr(args, "optim", "")),
            "lr_scheduler_type": str(getattr(args, "lr_scheduler_type", "")),
            "seed": int(args.seed),
            "fp16": bool(getattr(args, "fp16", False)),
            "bf16": bool(getattr(args, "bf16", False)),
        }
        if args.fp16 or args.bf16:
            rec.warnings.append("mixed precision training: exactness is limited to ~1e-3")
        rec.begin(model)
        self._max_norm = float(args.max_grad_norm or 0.0)
        if self._max_norm > 0:  # remember the pre-clip gradient norm, parameter by parameter
            for p in rec.space.params:
                self._handles.append(p.register_post_accumulate_grad_hook(self._remember))
        return control

    def _remember(self, p) -> None:
        if p.grad is not None:
            self._sq[id(p)] = float((p.grad.double() ** 2).sum())

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        clip = 1.0
        if self._max_norm > 0:
            norm = sum(self._sq.values()) ** 0.5
            clip = min(1.0, self._max_norm / (norm + 1e-6))
        self._sq = {}
        self.recorder.pre_step(optimizer, clip_scale=clip, grads_are_clipped=True)
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.recorder.post_step()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        for h in self._handles:
            h.remove()
        self._handles = []
        self.recorder.end()
        return control


def recorder_callback(record_dir, model=None, **kwargs) -> tuple[PathRecorderCallback, PathRecorder]:
    """Convenience: ``(callback, recorder)``; wrap the collator with ``IndexedCollator(collator, recorder)``."""
    rec = PathRecorder(record_dir, model, **kwargs)
    return PathRecorderCallback(rec), rec
