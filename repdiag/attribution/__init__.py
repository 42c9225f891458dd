"""Kernel-machine attribution of a model output to training examples (spec kernel-attribution.md).

Public API (imported lazily; ``import repdiag.attribution`` does not import torch):

* recording: :class:`PathRecorder`, :class:`PathRecorderCallback`, :class:`IndexedCollator`;
* the record: :class:`Record` (format ``repdiag-training-record`` v1, docs/attribution-format.md);
* queries: :class:`Query` (``token`` / ``loop`` / ``loop_margin`` / ``sequence``);
* kernels: :func:`path_kernel` (exact / trapezoid / first-order replay), :func:`checkpoint_kernel`
  (TracInCP), :func:`tangent_kernel` (final weights); result :class:`KernelAttribution`;
* entry points: :func:`attribute`, :func:`attribute_loop` (used by ``repdiag analyze``).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "PathRecorder": "recorder",
    "PathRecorderCallback": "recorder",
    "IndexedCollator": "recorder",
    "recorder_callback": "recorder",
    "Record": "runfile",
    "WEIGHT_MODELS": "runfile",
    "Query": "outputs",
    "find_loop": "outputs",
    "Example": "data",
    "TrainPair": "data",
    "encode_pair": "data",
    "read_pairs": "data",
    "collate": "data",
    "example_losses": "data",
    "ParamSpace": "features",
    "GradientComputer": "features",
    "per_example_grads": "features",
    "Projector": "projection",
    "KernelAttribution": "kernel",
    "path_kernel": "kernel",
    "checkpoint_kernel": "kernel",
    "tangent_kernel": "kernel",
    "attribute": "api",
    "attribute_loop": "api",
    "choose_mode": "api",
    "MODES": "api",
    "write_dump": "dump",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'repdiag.attribution' has no attribute {name!r}")
    return getattr(importlib.import_module(f"repdiag.attribution.{mod}"), name)
