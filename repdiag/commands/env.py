"""``repdiag env``: versions, threads, device, offline state and where the default model lives."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Annotated

import typer

from ._common import OutputFormat, print_json, stdout

PACKAGES = ("repdiag", "torch", "transformers", "tokenizers", "safetensors", "numpy", "scipy", "networkx",
            "typer", "rich", "sacrebleu", "gguf", "accelerate")


def environment_info() -> dict:
    """What to paste into a bug report: versions, threads, devices, offline flags, default model."""
    import torch

    from ..models import DEFAULT_MODEL_DIR

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    default_files = sorted(p.name for p in DEFAULT_MODEL_DIR.glob("*")) if DEFAULT_MODEL_DIR.is_dir() else []
    size = sum(p.stat().st_size for p in DEFAULT_MODEL_DIR.glob("*")) if default_files else 0
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "mps_available": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "offline": {v: os.environ.get(v) for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME")},
        "default_model": {"path": str(DEFAULT_MODEL_DIR), "present": bool(default_files),
                          "files": default_files, "size_bytes": size},
    }


def env(
    fmt: Annotated[OutputFormat, typer.Option("--format", help="table or json.")] = OutputFormat.table,
) -> None:
    """Print versions, threads, device, offline state and where the default model lives."""
    info = environment_info()
    if fmt is OutputFormat.json:
        print_json(info)
        return
    from rich.table import Table

    table = Table(title="repdiag environment", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    table.add_row("python", info["python"])
    table.add_row("platform", info["platform"])
    for name, version in info["versions"].items():
        table.add_row(name, version or "[dim]not installed[/]")
    table.add_row("torch threads", str(info["torch_threads"]))
    table.add_row("cpu count", str(info["cpu_count"]))
    table.add_row("cuda", ", ".join(info["cuda_devices"]) if info["cuda_available"] else "not available")
    table.add_row("mps", "available" if info["mps_available"] else "not available")
    for var, value in info["offline"].items():
        table.add_row(var, value or "[dim]unset[/]")
    dm = info["default_model"]
    table.add_row("default model", f"{dm['path']} ({'present' if dm['present'] else 'MISSING'}, "
                                   f"{dm['size_bytes'] / 1e6:.1f} MB)")
    stdout.print(table)


def register(app: typer.Typer) -> None:
    app.command(name="env")(env)
