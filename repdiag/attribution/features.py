"""Parameters as one flat vector, and per-example gradients ``∇ℓ_i`` (loop and batched backends).

* :class:`ParamSpace`: the tracked parameters of a model (tied weights counted once, as
  ``named_parameters()`` yields them), with flat get/set and gradient flattening.
* :func:`per_example_grads`: a ``[B, P]`` matrix of per-example gradients. Backends:

  - ``loop``: one backward pass per example (robust for any HF model; the default);
  - ``vmap``: ``torch.func.vmap(grad(ℓ))`` over a ``functional_call`` (batched). Before it is trusted it
    checks itself against ``loop`` on two examples (≤ 1e-10 relative in float64, 1e-4 in float32) and
    falls back to ``loop`` on any error or mismatch, with a warning;
  - ``auto``: ``vmap`` with that self-check, else ``loop``.
"""

from __future__ import annotations

import re
import warnings
from typing import TYPE_CHECKING, Sequence

from .data import Example, collate, example_losses

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["ParamSpace", "GradientComputer", "per_example_grads", "BACKENDS"]

BACKENDS = ("auto", "loop", "vmap")


class ParamSpace:
    """The tracked parameters of ``model`` as a flat vector (order of ``named_parameters()``)."""

    def __init__(self, model, names: Sequence[str] | None = None, layers: str | None = None) -> None:
        named = dict(model.named_parameters())
        if names is None:
            names = list(named)
            if layers not in (None, "", "all"):
                rx = re.compile(layers)
                names = [n for n in names if rx.search(n)]
        self.model = model
        self.names = list(names)
        self.params = [named[n] for n in self.names]
        self.shapes = [tuple(p.shape) for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.size = int(sum(self.numels))
        offs, o = [], 0
        for k in self.numels:
            offs.append(o)
            o += k
        self.offsets = offs

    @property
    def dtype(self):
        return self.params[0].dtype

    def get(self) -> "torch.Tensor":
        import torch

        with torch.no_grad():
            return torch.cat([p.detach().reshape(-1) for p in self.params]).clone()

    def set(self, flat: "torch.Tensor") -> None:
        import torch

        with torch.no_grad():
            for p, o, k in zip(self.params, self.offsets, self.numels):
                p.copy_(flat[o:o + k].view_as(p))

    def flat_from(self, tensors: dict) -> "torch.Tensor":
        import torch

        return torch.cat([tensors[n].reshape(-1).to(self.dtype) for n in self.names])

    def split(self, flat: "torch.Tensor") -> dict:
        return {n: flat[o:o + k].view(s) for n, o, k, s in zip(self.names, self.offsets, self.numels, self.shapes)}

    def flatten_grads(self, grads) -> "torch.Tensor":
        import torch

        return torch.cat([
            (torch.zeros(k, dtype=p.dtype, device=p.device) if g is None else g.reshape(-1))
            for g, p, k in zip(grads, self.params, self.numels)
        ])

    def grad_of(self, scalar: "torch.Tensor", retain_graph: bool = False) -> "torch.Tensor":
        import torch

        grads = torch.autograd.grad(scalar, self.params, retain_graph=retain_graph, allow_unused=True)
        return self.flatten_grads(grads)


class GradientComputer:
    """Per-example gradients of ``ℓ_i`` with a chosen backend; remembers self-check results and warnings."""

    def __init__(self, space: ParamSpace, kind: str, pad_token_id: int, backend: str = "loop",
                 chunk: int = 16) -> None:
        if backend not in BACKENDS:
            from ..errors import UsageError

            raise UsageError(f"unknown gradient backend {backend!r}; choose from {', '.join(BACKENDS)}")
        self.space = space
        self.kind = kind
        self.pad = int(pad_token_id)
        self.requested = backend
        self.backend = "loop" if backend == "loop" else None  # decided at first use
        self.chunk = int(chunk)
        self.warnings: list[str] = []
        self.timing: dict = {}

    # -- loop -------------------------------------------------------------------------------------
    def _loop(self, examples: Sequence[Example]) -> "torch.Tensor":
        import torch

        dev = self.space.params[0].device
        rows = []
        for e in examples:
            loss = example_losses(self.space.model, collate([e], self.pad, dev), self.kind)[0]
            rows.append(self.space.grad_of(loss))
        return torch.stack(rows)

    # -- vmap -------------------------------------------------------------------------------------
    def _vmap(self, examples: Sequence[Example]) -> "torch.Tensor":
        import torch
        from torch.func import functional_call, grad, vmap

        model = self.space.model
        dev = self.space.params[0].device
        params = {n: p.detach() for n, p in zip(self.space.names, self.space.params)}
        batch = collate(examples, self.pad, dev)
        kind = self.kind
        dtype = self.space.dtype
        # HF's 2-D mask code branches on data (``mask.all()``), which vmap cannot batch; a ready 4-D additive mask
        # is passed through untouched. seq2seq: [1, 1, 1, L] over the encoder keys (self- and cross-attention);
        # causal: the 2-D mask (eager attention — the kernels' work models use it — batches under vmap).
        neg = torch.finfo(dtype).min

        def loss_one(p, ids, mask, labels):
            if kind == "seq2seq":
                am = (1.0 - mask[None, None, None, :].to(dtype)) * neg
            else:
                am = mask[None]
            b = {"input_ids": ids[None], "attention_mask": am, "labels": labels[None]}

            def fwd(**kw):
                return functional_call(model, p, (), kw, tie_weights=True, strict=False)

            return example_losses(model, b, kind, forward=fwd)[0]

        g = vmap(grad(loss_one), in_dims=(None, 0, 0, 0))(
            params, batch["input_ids"], batch["attention_mask"], batch["labels"]
        )
        return torch.cat([g[n].detach().reshape(len(examples), -1) for n in self.space.names], dim=1)

    def _self_check(self, examples: Sequence[Example]) -> bool:
        import torch

        order = self._groups(examples)[0]
        probe = [examples[order[0]], examples[order[-1]]] if len(order) > 1 else [examples[order[0]]]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                a = self._vmap(probe)
            b = self._loop(probe)
        except Exception as exc:  # noqa: BLE001 - any failure means: use the loop backend
            self.warnings.append(
                f"batched (vmap) gradients failed ({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); "
                "fell back to the loop backend"
            )
            return False
        tol = 1e-10 if self.space.dtype == torch.float64 else 1e-4
        err = float((a - b).abs().max() / (b.abs().max() + 1e-300))
        if not err <= tol:
            self.warnings.append(
                f"batched (vmap) gradients disagree with the loop backend (relative {err:.2e} > {tol:g}); "
                "fell back to the loop backend"
            )
            return False
        return True

    def __call__(self, examples: Sequence[Example]) -> "torch.Tensor":
        import torch

        examples = list(examples)
        if not examples:
            return torch.zeros((0, self.space.size), dtype=self.space.dtype)
        if self.resolve(examples) == "loop":
            return self._loop(examples)
        out = torch.zeros((len(examples), self.space.size), dtype=self.space.dtype,
                          device=self.space.params[0].device)
        for idx in self._groups(examples):
            for k in range(0, len(idx), self.chunk):
                part = idx[k:k + self.chunk]
                exs = [examples[i] for i in part]
                try:
                    if self.backend != "vmap":
                        raise RuntimeError("disabled after an earlier failure")
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        rows = self._vmap(exs)
                except Exception as exc:  # noqa: BLE001
                    if self.backend == "vmap":
                        self.warnings.append(f"batched (vmap) gradients failed ({type(exc).__name__}); fell back "
                                             "to the loop backend")
                    self.backend = "loop"
                    rows = self._loop(exs)
                out[part] = rows
        return out

    def resolve(self, examples: Sequence[Example]) -> str:
        """The backend, decided on ``examples`` at the first call: the vmap self-check, then (``auto``) the race."""
        if self.backend is None:
            self.backend = "vmap" if self._self_check(examples) else "loop"
            if self.backend == "vmap" and self.requested == "auto" and len(examples) >= 8:
                self._race(examples)
        return self.backend

    def _race(self, examples: Sequence[Example]) -> None:
        """``auto``: keep vmap only if it beats the loop per example on a chunk of this data (large models with
        ragged lengths can be slower batched: padding, and B copies of every weight gradient)."""
        import time

        order = self._groups(examples)[0]
        mid = len(order) // 2
        part = [examples[i] for i in order[max(0, mid - self.chunk // 2): mid + self.chunk // 2]]
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._vmap(part)
        t_vmap = (time.perf_counter() - t) / len(part)
        t = time.perf_counter()
        self._loop(part[:4])
        t_loop = (time.perf_counter() - t) / len(part[:4])
        self.timing = {"vmap_s_per_example": t_vmap, "loop_s_per_example": t_loop}
        if t_vmap >= t_loop:
            self.backend = "loop"

    def _groups(self, examples: Sequence[Example]) -> list[list[int]]:
        """One group, sorted by length so that the chunks carry little padding."""
        return [sorted(range(len(examples)), key=lambda i: (len(examples[i].input_ids), len(examples[i].labels)))]


def per_example_grads(model, examples: Sequence[Example], kind: str, pad_token_id: int, *,
                      backend: str = "loop", space: ParamSpace | None = None) -> "torch.Tensor":
    """``[B, P]`` per-example gradients of the summed token NLL at the model's current parameters."""
    space = space or ParamSpace(model)
    return GradientComputer(space, kind, pad_token_id, backend)(examples)
