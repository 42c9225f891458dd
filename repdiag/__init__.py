"""repdiag: why and how likely a Hugging Face text-generation model is to repeat itself.

The public API is imported lazily so that ``import repdiag`` (and the CLI's ``--help``) never pays
for torch or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": "repdiag.models",
    "LoadedModel": "repdiag.models",
    "TransitionMatrix": "repdiag.transition",
    "compute_quantities": "repdiag.theory",
    "parse_policy": "repdiag.decoding",
    "Policy": "repdiag.decoding",
    "compute_metrics": "repdiag.metrics",
    "RepetitionMonitor": "repdiag.hook",
    "watch": "repdiag.hook",
    "RepdiagError": "repdiag.errors",
    "load_matrix": "repdiag.transition",
    "build_trace": "repdiag.transition",
    "build_probe": "repdiag.transition",
    "get_mitigation": "repdiag.mitigations",
    "AnalyzeOptions": "repdiag.pipeline",
    "run_analysis": "repdiag.pipeline",
    "Report": "repdiag.report",
    "load_report": "repdiag.report",
    "compare": "repdiag.report",
    "attribute_loop": "repdiag.attribution",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'repdiag' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
