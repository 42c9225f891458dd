"""Random projections of per-example gradients, generated block-wise from a seed (spec §3.4).

``Projector(dim, kind, seed)`` maps a flat gradient over named parameters to ``dim`` numbers:
``φ(g) = Σ_blocks g_block @ R_block / √dim``, where ``R_block`` (``block × dim``, Gaussian or Rademacher) is
drawn from a generator seeded by ``sha256(f"{seed}:{name}:{block index}")`` — so nothing of size P × dim is ever
stored, the same (seed, parameter name) always gives the same matrix, and a parameter subset projects
consistently. Inner products are preserved in expectation: ``E[φ(a)·φ(b)] = a·b``, with error
≈ ``‖a‖‖b‖ √(2/dim)``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

from ..errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["Projector", "MEMO_BUDGET_BYTES"]

#: generated projection blocks are kept in memory up to this many bytes (regenerated beyond it)
MEMO_BUDGET_BYTES = 256 * 2**20
_MEMO: dict = {}
_MEMO_BYTES = [0]


@dataclass(frozen=True)
class Projector:
    dim: int = 2048
    kind: str = "gaussian"
    seed: int = 0
    block: int = 65536

    def __post_init__(self) -> None:
        if self.kind not in ("gaussian", "rademacher"):
            raise UsageError(f"unknown projection {self.kind!r}; choose gaussian or rademacher")
        if self.dim < 1 or self.block < 1:
            raise UsageError("projection dim and block must be positive")

    def spec(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "seed": self.seed, "block": self.block}

    def _matrix(self, name: str, b: int, rows: int, dtype) -> "torch.Tensor":
        key = (self.kind, self.dim, self.seed, self.block, name, b, rows)
        hit = _MEMO.get(key)
        if hit is None:
            hit = self._generate(name, b, rows)
            size = hit.numel() * hit.element_size()
            if size + _MEMO_BYTES[0] <= MEMO_BUDGET_BYTES:
                _MEMO[key] = hit
                _MEMO_BYTES[0] += size
        return hit.to(dtype)

    def _generate(self, name: str, b: int, rows: int) -> "torch.Tensor":
        import torch

        dtype = torch.float64

        s = int(hashlib.sha256(f"{self.seed}:{name}:{b}".encode()).hexdigest()[:15], 16)
        g = torch.Generator().manual_seed(s)
        if self.kind == "gaussian":
            return torch.randn((rows, self.dim), generator=g, dtype=torch.float64).to(dtype)
        r = torch.randint(0, 2, (rows, self.dim), generator=g, dtype=torch.int8)
        return (r.to(dtype) * 2 - 1)

    def project(self, flat: "torch.Tensor", names: Sequence[str], numels: Sequence[int]) -> "torch.Tensor":
        """Project ``flat`` (``[P]`` or ``[B, P]``, parameters concatenated in ``names`` order) to ``[.., dim]``."""
        import torch

        x = flat if flat.dim() == 2 else flat[None]
        out = torch.zeros((x.shape[0], self.dim), dtype=torch.float64, device=x.device)
        o = 0
        for name, k in zip(names, numels):
            for b, start in enumerate(range(0, k, self.block)):
                rows = min(self.block, k - start)
                R = self._matrix(name, b, rows, torch.float64).to(x.device)
                out += x[:, o + start:o + start + rows].double() @ R
            o += k
        out /= self.dim ** 0.5
        return out if flat.dim() == 2 else out[0]
