"""``--dump DIR``: the recorded run, the query and the per-example contributions in the exchange format.

Layout (docs/attribution-format.md §3)::

    DIR/index.json          what is where, the mode, the measurement, the agreement rule
    DIR/train.jsonl         the training pairs in index order ({"index", "source", "target"})
    DIR/query.json          prompt, prompt ids, fixed generated ids y*, loop, positions, measurement names
    DIR/scores.json         {"mode", "measurement", "contributions": [...], "rules": {...}, "b", "delta_m", ...}
    DIR/scores.safetensors  float64 arrays "<rule>/<measurement>" (one value per training example)
    DIR/run/                a copy of the training record folder
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .._atomic import write_json, write_text
from .runfile import save_tensors

__all__ = ["write_dump"]


def write_dump(result, out_dir: str | Path, *, record=None, pairs=None) -> Path:
    """Write ``result`` (a :class:`KernelAttribution`) and its run into ``out_dir``; returns the folder."""
    import json

    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if pairs is not None:
        write_text(out / "train.jsonl", "".join(
            json.dumps({"index": i, "source": s, "target": t}, ensure_ascii=False, sort_keys=True) + "\n"
            for i, (s, t) in enumerate(pairs)))
    write_json(out / "query.json", result.query)
    rules = result.diagnostics.get("contributions") or {result.mode: result.all_contributions}
    arrays = {}
    for rule, per in rules.items():
        for name, vec in per.items():
            arrays[f"{rule}/{name}"] = torch.tensor([float(x) for x in vec], dtype=torch.float64)
    save_tensors(out / "scores.safetensors", arrays)
    scores = {
        "mode": result.mode,
        "kernel": result.kernel,
        "measurement": result.measurement,
        "b": result.b,
        "m_final": result.m_final,
        "delta_m": result.delta_m,
        "completeness_residual": result.residual,
        "completeness": result.completeness,
        "contributions": [float(x) for x in result.contributions],
        "rules": {rule: {name: [float(x) for x in vec] for name, vec in per.items()} for rule, per in rules.items()},
        "rule_totals": result.rules,
        "warnings": list(result.warnings),
    }
    write_json(out / "scores.json", scores)
    run_dir = None
    if record is not None:
        run_dir = out / "run"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        shutil.copytree(record.path, run_dir)
    write_json(out / "index.json", {
        "format": "repdiag-attribution-dump",
        "version": 1,
        "train": "train.jsonl" if pairs is not None else None,
        "query": "query.json",
        "scores": "scores.json",
        "arrays": "scores.safetensors",
        "run": "run" if run_dir is not None else None,
        "agreement": "C' agrees with C when |C'_i - C_i| <= 1e-6 * (|C_i| + max_j |C_j|) for every i",
    })
    return out


def contributions_agree(ref, other, rtol: float = 1e-6) -> bool:
    """The exchange format's agreement rule (spec §6): ``|C'_i − C_i| ≤ rtol (|C_i| + max_j |C_j|)``."""
    import numpy as np

    a = np.asarray(ref, dtype=float)
    b = np.asarray(other, dtype=float)
    if a.shape != b.shape:
        return False
    scale = float(np.max(np.abs(a))) if a.size else 0.0
    return bool(np.all(np.abs(b - a) <= rtol * (np.abs(a) + scale)))
