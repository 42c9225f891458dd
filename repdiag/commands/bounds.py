"""``repdiag bounds MATRIX`` and ``repdiag graph MATRIX``: the theory engine on a matrix file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import OutputFormat, existing_file, print_json, stdout


def bounds(
    matrix: Annotated[Path, typer.Argument(help="A .npz transition matrix, or a dense .npy with <eos> last.")],
    eos_index: Annotated[Optional[int], typer.Option("--eos-index", help="State index of <eos> (default: last).")] = None,
    policy: Annotated[Optional[list[str]], typer.Option(
        "--policy", help="A mitigation name or generate() arguments, e.g. temperature=0.7,top_k=50,do_sample=true. "
                         "Repeat for several.", rich_help_panel="Decoding")] = None,
    horizon: Annotated[int, typer.Option("--horizon", "-T", help="Horizon T of the occupation quantities.")] = 20,
    fmt: Annotated[OutputFormat, typer.Option("--format", help="table or json (the keys of spec §12).")] = OutputFormat.table,
) -> None:
    """Every repetition bound of the spec on MATRIX, raw or under decoding policies."""
    from ..bounds import bounds_document
    from ..transition import load_matrix

    tm = load_matrix(existing_file(matrix, "matrix file"), eos_index=eos_index)
    doc = bounds_document(tm, policies=policy or [], horizon=horizon)
    if fmt is OutputFormat.json:
        print_json(doc)
        return
    from ..bounds import render_bounds_table

    stdout.print(render_bounds_table(doc))


def graph(
    matrix: Annotated[Path, typer.Argument(help="A .npz transition matrix, or a dense .npy with <eos> last.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="GraphML file to write.")],
    eos_index: Annotated[Optional[int], typer.Option("--eos-index", help="State index of <eos> (default: last).")] = None,
) -> None:
    """Write the greedy functional graph (cycles, basins, fates) of MATRIX as GraphML."""
    from ..graph import to_graphml
    from ..transition import load_matrix

    tm = load_matrix(existing_file(matrix, "matrix file"), eos_index=eos_index)
    A, perm = tm.spec_layout(dense=None)
    labels = [tm.state_label(int(s)) for s in perm]
    to_graphml(A, A.shape[0] - 1, output, token_labels=labels)
    stdout.print(f"wrote {output}")


def register(app: typer.Typer) -> None:
    app.command(name="bounds")(bounds)
    app.command(name="graph")(graph)
