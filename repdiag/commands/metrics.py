"""``repdiag metrics FILE``: score generations a user already has (spec §9.7), no model needed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import OutputFormat, existing_file, print_json, stdout


def _fmt(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        shown = ", ".join(f"{v:.3f}" for v in value[:8])
        return f"[{shown}{', …' if len(value) > 8 else ''}] (n = 1..{len(value)})"
    return str(value)


def metrics(
    file: Annotated[Path, typer.Argument(help="JSONL ('tokens' or 'text' per line) or plain text, one generation a line.")],
    fmt: Annotated[OutputFormat, typer.Option("--format", help="table or json.")] = OutputFormat.table,
    unit: Annotated[
        Optional[str], typer.Option("--unit", help="token or word (default: token for 'tokens', word for text).")
    ] = None,
    model: Annotated[
        Optional[str], typer.Option("--model", help="A model whose tokenizer splits 'text' into model tokens.")
    ] = None,
) -> None:
    """Repetition metrics of generations you already have (rep-w, rep-r, seq-rep, SimCTG rep-n, ...)."""
    from ..errors import UsageError
    from ..metrics import score_file

    if unit is not None and unit not in ("token", "word"):
        raise UsageError(f"unknown --unit {unit!r}: choose token or word")
    existing_file(file, "generations file")
    tokenizer = None
    if model is not None:
        from ..models import load_model

        tokenizer = load_model(model).tokenizer
    result = score_file(file, unit=unit, tokenizer=tokenizer)
    if fmt is OutputFormat.json:
        print_json(result)
        return
    from rich.table import Table

    table = Table(title=f"repetition metrics — {result['n_sequences']} sequences, unit: {result['unit']}")
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    for key in sorted(result["metrics"]):
        table.add_row(key, _fmt(result["metrics"][key]))
    stdout.print(table)


def register(app: typer.Typer) -> None:
    app.command(name="metrics")(metrics)
