"""On-disk cache of (projected) per-example gradient features, keyed by model and checkpoint (spec §3.4).

One entry = a float array ``[n_examples, dim]`` (``.npy``, float16 or float32) plus a JSON sidecar with its key
fields. The key hashes: the checkpoint's parameter hash, the parameter subset, the projector spec, the loss
weight model and the examples file hash — so a cache entry can never be used for another model, checkpoint or
training set. Used by the checkpoint and final modes when a projector is given; the replay modes stream.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import atomic_path, write_json

__all__ = ["FeatureCache", "cache_key"]


def cache_key(**fields: Any) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


class FeatureCache:
    def __init__(self, root: str | Path, dtype: str = "float16") -> None:
        self.root = Path(root)
        self.dtype = dtype

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.npy", self.root / f"{key}.json"

    def load(self, key: str, n: int, dim: int) -> np.ndarray | None:
        arr_p, meta_p = self._paths(key)
        if not (arr_p.is_file() and meta_p.is_file()):
            return None
        arr = np.load(arr_p, mmap_mode="r", allow_pickle=False)
        if arr.shape != (n, dim):
            return None
        return np.asarray(arr, dtype=np.float64)

    def save(self, key: str, features: np.ndarray, meta: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        arr_p, meta_p = self._paths(key)
        with atomic_path(arr_p, suffix=".npy") as tmp:
            np.save(tmp, np.asarray(features, dtype=self.dtype), allow_pickle=False)
        write_json(meta_p, {**meta, "key": key, "shape": list(features.shape), "dtype": self.dtype})
