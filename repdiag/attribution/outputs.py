"""Query outputs ``m(θ)`` (spec kernel-attribution.md §2.6), teacher-forced on a fixed generated sequence.

A :class:`Query` holds the prompt ids ``x*``, the fixed generated ids ``y*`` (without the decoder start
token or the prompt) and, when ``y*`` loops, the loop ``(start, period)``. It evaluates a small vector of
scalar measurements in one forward pass:

``token:t``      ``log p(y*_t | x*, y*_<t)``
``loop``         ``Σ_{t=s+p}^{s+2p−1} log p(y*_t | …)``: re-traversing the cycle once, given one traversal
``loop_margin``  ``Σ_t log(p_t / (1 − p_t))`` over the same positions
``sequence``     ``Σ_t log p(y*_t | …)`` over all of ``y*``

(This module measures one model output; ``repdiag/measure.py`` measures mitigations — unrelated.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Sequence

from ..errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["Query", "find_loop", "MEASUREMENTS"]

MEASUREMENTS = ("token", "loop", "loop_margin", "sequence")


def find_loop(seq: Sequence[int], *, min_repeats: int = 2) -> tuple[int, int] | None:
    """The loop of ``seq`` as ``(start, period)``, or None.

    Uses :func:`repdiag.metrics.find_loop` (the project's shared cycle detector) when it exists; otherwise
    a fallback: the smallest period ``p`` such that the tail of ``seq`` is periodic with period ``p`` over
    at least ``min_repeats`` full traversals, extended as far left as the periodicity holds.
    """
    try:
        from ..metrics import find_loop as shared  # type: ignore[attr-defined]
    except ImportError:
        shared = None
    seq = [int(t) for t in seq]
    if shared is not None:
        loop = shared(seq, min_repeats=min_repeats)
        if loop is None:
            return None
        return int(loop.start), int(loop.period)
    n = len(seq)
    for p in range(1, n // max(min_repeats, 1) + 1):
        start = n - p
        while start - 1 >= 0 and seq[start - 1] == seq[start - 1 + p]:
            start -= 1
        if (n - start) >= min_repeats * p:
            return start, p
    return None


@dataclass(frozen=True)
class Query:
    """A fixed (prompt, generated) pair and the measurements taken on it.

    ``prompt_ids``: encoder input (seq2seq) or the prompt prefix (causal). ``generated_ids``: ``y*``,
    without the decoder start token (seq2seq) or the prompt (causal). ``loop``: ``(start, period)`` in
    ``y*`` positions; needed for ``loop`` and ``loop_margin``. ``token_position``: the ``t`` of
    ``token:t`` (default ``start + period``, the first token of the second traversal, or the last token).
    """

    kind: str
    prompt_ids: tuple[int, ...]
    generated_ids: tuple[int, ...]
    loop: tuple[int, int] | None = None
    token_position: int | None = None
    decoder_start_token_id: int | None = None
    prompt: str | None = None
    generated_text: str | None = None
    names: tuple[str, ...] = field(default=MEASUREMENTS)

    def __post_init__(self) -> None:
        if self.kind not in ("seq2seq", "causal"):
            raise UsageError(f"query kind must be 'seq2seq' or 'causal', not {self.kind!r}")
        n = len(self.generated_ids)
        if n == 0:
            raise UsageError("the generated sequence of the query is empty: nothing to attribute")
        if self.kind == "causal" and not self.prompt_ids:
            raise UsageError("a causal query needs at least one prompt token")
        if self.loop is not None:
            s, p = self.loop
            if p < 1 or s < 0 or s + 2 * p > n:
                raise UsageError(
                    f"loop (start={s}, period={p}) does not fit two traversals into {n} generated tokens"
                )
        names = tuple(self.names)
        if self.loop is None:
            names = tuple(x for x in names if x not in ("loop", "loop_margin"))
        object.__setattr__(self, "names", names)
        if not names:
            raise UsageError("no measurement left to compute: the loop measurements need a loop")

    @classmethod
    def build(cls, kind, prompt_ids, generated_ids, *, decoder_start_token_id=None, loop="auto",
              token_position=None, prompt=None, generated_text=None, names=MEASUREMENTS) -> "Query":
        """Normalise ``generated_ids`` (strip a leading decoder start token / the echoed prompt) and find the loop."""
        gen = [int(t) for t in generated_ids]
        prompt_ids = [int(t) for t in prompt_ids]
        if kind == "seq2seq" and gen and decoder_start_token_id is not None and gen[0] == decoder_start_token_id:
            gen = gen[1:]
        if kind == "causal" and len(gen) > len(prompt_ids) and gen[: len(prompt_ids)] == prompt_ids:
            gen = gen[len(prompt_ids):]
        if isinstance(loop, str):
            loop = find_loop(gen) if loop == "auto" else None
            if loop is not None and loop[0] + 2 * loop[1] > len(gen):
                loop = None
        return cls(kind, tuple(prompt_ids), tuple(gen), tuple(loop) if loop else None, token_position,
                   decoder_start_token_id, prompt, generated_text, tuple(names))

    # ----------------------------------------------------------------------------------------------
    @property
    def position(self) -> int:
        """The position ``t`` of the ``token`` measurement."""
        if self.token_position is not None:
            return int(self.token_position)
        if self.loop is not None:
            return self.loop[0] + self.loop[1]
        return len(self.generated_ids) - 1

    @property
    def loop_positions(self) -> list[int]:
        if self.loop is None:
            return []
        s, p = self.loop
        return list(range(s + p, s + 2 * p))

    def describe(self) -> dict:
        """JSON-ready description (the report's ``query``)."""
        d = {
            "kind": self.kind,
            "prompt": self.prompt,
            "prompt_ids": list(self.prompt_ids),
            "generated": self.generated_text,
            "generated_ids": list(self.generated_ids),
            "loop": None if self.loop is None else {"start": self.loop[0], "period": self.loop[1]},
            "token_position": self.position,
            "loop_positions": self.loop_positions,
            "measurements": list(self.names),
            "teacher_forced": True,
        }
        return d

    def batch(self, device=None) -> dict:
        import torch

        if self.kind == "seq2seq":
            start = self.decoder_start_token_id if self.decoder_start_token_id is not None else 0
            dec = [start] + list(self.generated_ids[:-1])
            b = {
                "input_ids": torch.tensor([self.prompt_ids], dtype=torch.long),
                "attention_mask": torch.ones((1, len(self.prompt_ids)), dtype=torch.long),
                "decoder_input_ids": torch.tensor([dec], dtype=torch.long),
            }
        else:
            ids = list(self.prompt_ids) + list(self.generated_ids[:-1])
            b = {"input_ids": torch.tensor([ids], dtype=torch.long),
                 "attention_mask": torch.ones((1, len(ids)), dtype=torch.long)}
        if device is not None:
            b = {k: v.to(device) for k, v in b.items()}
        return b

    def token_logprobs(self, model, *, forward=None) -> tuple["torch.Tensor", "torch.Tensor"]:
        """``(log p_t, log(1 − p_t))`` for every position of ``y*`` (float tensors of length ``len(y*)``)."""
        import torch

        dev = next(model.parameters()).device
        fwd = forward if forward is not None else model
        out = fwd(**self.batch(dev), use_cache=False)
        logits = out.logits[0]
        if self.kind == "causal":
            logits = logits[len(self.prompt_ids) - 1:]
        logp = torch.log_softmax(logits, dim=-1)
        y = torch.tensor(self.generated_ids, dtype=torch.long, device=dev)
        lp = logp.gather(-1, y[:, None])[:, 0]
        # log(1 - p_t) = logsumexp over v != y_t, computed without cancellation
        masked = logp.scatter(-1, y[:, None], float("-inf"))
        l1m = torch.logsumexp(masked, dim=-1)
        return lp, l1m

    def values(self, model, *, forward=None) -> "torch.Tensor":
        """The measurements ``names`` as a tensor ``[Q]`` (differentiable in the model's parameters)."""
        import torch

        lp, l1m = self.token_logprobs(model, forward=forward)
        out = []
        for name in self.names:
            if name == "token":
                t = self.position
                if not 0 <= t < len(self.generated_ids):
                    raise UsageError(f"token position {t} is outside the {len(self.generated_ids)} generated tokens")
                out.append(lp[t])
            elif name == "loop":
                out.append(lp[self.loop_positions].sum())
            elif name == "loop_margin":
                pos = self.loop_positions
                out.append((lp[pos] - l1m[pos]).sum())
            elif name == "sequence":
                out.append(lp.sum())
            else:
                raise UsageError(f"unknown measurement {name!r}; choose from {', '.join(MEASUREMENTS)}")
        return torch.stack(out)
