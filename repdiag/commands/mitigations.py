"""``repdiag list mitigations``: the registry, one line each (name, what it does, source)."""

from __future__ import annotations

from typing import Annotated

import typer

from ._common import OutputFormat, print_json, stdout

list_app = typer.Typer(
    name="list",
    no_args_is_help=True,
    rich_markup_mode="rich",
    help="List what repdiag knows (mitigations).",
)


@list_app.command("mitigations")
def list_mitigations_cmd(
    fmt: Annotated[
        OutputFormat, typer.Option("--format", "-f", help="table (one line each) or json.", rich_help_panel="Output")
    ] = OutputFormat.table,
) -> None:
    """The decoding mitigations: name, what it does, its generate() arguments and its source."""
    from ..mitigations import DEFAULT_ANALYZE_MITIGATIONS, list_mitigations

    policies = list_mitigations()
    if fmt == OutputFormat.json:
        print_json(
            {
                "mitigations": [
                    {
                        "name": p.name,
                        "description": p.description,
                        "source": p.source,
                        "spec": p.spec_string(),
                        "params": dict(p.params),
                        "family": p.family,
                        "exactness": p.exactness,
                        "row_local": p.row_local,
                        "default": p.name in DEFAULT_ANALYZE_MITIGATIONS,
                    }
                    for p in policies
                ],
                "default": list(DEFAULT_ANALYZE_MITIGATIONS),
            }
        )
        return
    width = max(len(p.name) for p in policies)
    for p in policies:
        mark = "*" if p.name in DEFAULT_ANALYZE_MITIGATIONS else " "
        stdout.print(
            f"{mark} {p.name:<{width}}  {p.description} [{p.spec_string()}] ({p.exactness}; {p.source})",
            highlight=False,
            markup=False,
        )


def register(app: typer.Typer) -> None:
    """Mount ``repdiag list ...`` on the root app."""
    app.add_typer(list_app, name="list")
