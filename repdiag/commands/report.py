"""``repdiag report`` (render a report.json) and ``repdiag compare`` (the CI gate against a baseline)."""

from __future__ import annotations

import enum
import os
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ._common import STATE, stderr, stdout

__all__ = ["register", "ReportFormat", "CompareFormat"]


class ReportFormat(str, enum.Enum):
    md = "md"
    html = "html"
    junit = "junit"


class CompareFormat(str, enum.Enum):
    table = "table"
    md = "md"
    json = "json"


_SUFFIX_FORMAT = {".md": "md", ".markdown": "md", ".html": "html", ".htm": "html", ".xml": "junit"}


def _write_or_print(text: str, output: Path | None) -> None:
    from .._atomic import write_text

    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_text(output, text)
        if not STATE.quiet:
            stderr.print(f"wrote {output}", highlight=False)


def report_command(
    report: Annotated[Path, typer.Argument(help="A report.json written by `repdiag analyze`.", show_default=False)],
    format: Annotated[
        Optional[ReportFormat],
        typer.Option("--format", "-f", help="md, html or junit; default: from the -o suffix, else md.", rich_help_panel="Output"),
    ] = None,
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Write here (atomically) instead of stdout.", rich_help_panel="Output")
    ] = None,
) -> None:
    """Render a report.json as Markdown (also appended to $GITHUB_STEP_SUMMARY), self-contained HTML or JUnit XML."""
    from ..report import load_report, render_html, render_markdown, report_to_junit
    from ..report.markdown import append_step_summary

    rep = load_report(report)
    fmt = format.value if format is not None else _SUFFIX_FORMAT.get(output.suffix.lower(), "md") if output else "md"
    if fmt == "md":
        text = render_markdown(rep)
        if append_step_summary(text) is not None and not STATE.quiet:
            stderr.print("appended the summary to $GITHUB_STEP_SUMMARY", highlight=False)
    elif fmt == "html":
        text = render_html(rep)
    else:
        text = report_to_junit(rep)
    _write_or_print(text, output)


def compare_command(
    baseline: Annotated[Path, typer.Argument(help="The baseline report.json (an earlier run).", show_default=False)],
    current: Annotated[Path, typer.Argument(help="The current report.json.", show_default=False)],
    fail_on: Annotated[
        Optional[List[str]],
        typer.Option(
            "--fail-on",
            help="METRIC:TOL, repeatable. METRIC is a metric key (rep_w16, seq_rep_4, ...) or a bound key (su_R, rho_Q, ...) "
            "for every policy, or POLICY.KEY for one; TOL absolute (+0.02) or relative (+10%), in the metric's worse direction.",
            rich_help_panel="CI",
            envvar="REPDIAG_FAIL_ON",
        ),
    ] = None,
    same_model: Annotated[
        bool, typer.Option("--same-model", help="Refuse (exit 2) when the model or tokenizer differs.", rich_help_panel="CI")
    ] = False,
    noise_z: Annotated[
        Optional[float],
        typer.Option(
            "--noise-z", min=0.0, help="Also require |Δ| > z·sqrt(se_b² + se_c²) before failing (uses the stderr section).",
            rich_help_panel="CI",
        ),
    ] = None,
    policy_map: Annotated[
        Optional[List[str]],
        typer.Option(
            "--policy-map", help="BASE=CUR, repeatable: compare the baseline's policy BASE with the current report's CUR.",
            rich_help_panel="CI",
        ),
    ] = None,
    format: Annotated[CompareFormat, typer.Option("--format", "-f", help="table, md or json on stdout.", rich_help_panel="Output")] = CompareFormat.table,
    junit: Annotated[
        Optional[Path], typer.Option("--junit", help="Also write JUnit XML here (one test case per compared metric).", rich_help_panel="Output")
    ] = None,
) -> None:
    """Compare CURRENT with BASELINE: exit 0 no regression, 1 regression beyond tolerance, 2 bad input."""
    from .._atomic import write_text
    from ..report import compare, compare_to_junit, render_compare_markdown
    from ..report.markdown import append_step_summary
    from ._common import print_json

    from ..errors import UsageError

    pmap: dict[str, str] = {}
    for item in policy_map or []:
        old, sep, new = item.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise UsageError(f"--policy-map {item!r}: write BASE=CUR, e.g. --policy-map top_p_0.9=temperature_1.3")
        pmap[old.strip()] = new.strip()
    result = compare(baseline, current, fail_on=list(fail_on or []), same_model=same_model, z=noise_z, policy_map=pmap)
    for w in result.warnings:
        stderr.print(f"[yellow]warning:[/] {w}", highlight=False)
    if format is CompareFormat.json:
        print_json(result.to_dict())
    elif format is CompareFormat.md:
        sys.stdout.write(render_compare_markdown(result))
        sys.stdout.flush()
    else:
        _print_table(result)
    if junit is not None:
        write_text(junit, compare_to_junit(result))
    append_step_summary(render_compare_markdown(result))
    if os.environ.get("GITHUB_ACTIONS") == "true":
        for c in result.regressions:
            # workflow commands: the runner reads them from the step's output streams
            print(f"::error title=repdiag regression ({c.policy})::{c.message}", file=sys.stderr)
    if not result.ok:
        if not STATE.quiet:
            stderr.print(f"[bold red]{len(result.regressions)} regression(s)[/] beyond tolerance", highlight=False)
        raise typer.Exit(1)


def _print_table(result) -> None:  # noqa: ANN001 - CompareResult
    from ..report import render_compare_table

    from rich.console import Console

    # CI logs are not terminals: rich would wrap at 80 columns there, so give the table room
    console = stdout if stdout.is_terminal else Console(file=sys.stdout, width=max(stdout.width, 120), soft_wrap=True)
    console.print(render_compare_table(result))


def register(app: typer.Typer) -> None:
    app.command("report", rich_help_panel="Reports and CI")(report_command)
    app.command("compare", rich_help_panel="Reports and CI")(compare_command)
