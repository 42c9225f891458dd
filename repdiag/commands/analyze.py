"""``repdiag analyze [MODEL]``: the whole job, end to end, with a report folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import STATE, stderr, stdout


def analyze(
    model: Annotated[Optional[str], typer.Argument(
        help="Hub id, local folder, .gguf file, or 'default' (the model bundled with repdiag).")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder (report.json, timings.json, report.md).",
                                      rich_help_panel="Output")] = Path("repdiag-report"),
    prompts: Annotated[Optional[Path], typer.Option(
        "--prompts", help="Prompts file: one prompt a line, or JSONL with 'prompt' (and optional 'reference').")] = None,
    trace_prompts: Annotated[Optional[Path], typer.Option(
        "--trace-prompts", help="Prompts for the transition matrix (overrides the seeded split).")] = None,
    n_prompts: Annotated[int, typer.Option("--n-prompts", help="Use the first N prompts (half trace, half measurement).")] = 48,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens generated per prompt.",
                                                rich_help_panel="Decoding")] = 48,
    mitigations: Annotated[Optional[str], typer.Option(
        "--mitigations", help="Comma-separated mitigation names, 'default' or 'all' (see `repdiag list mitigations`).",
        rich_help_panel="Decoding")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the split, the sampling and the simulation.")] = 0,
    order: Annotated[int, typer.Option("--order", help="k of the k-gram chain (k = 2 with back-off by default).",
                                       rich_help_panel="Matrix")] = 2,
    top_k: Annotated[int, typer.Option("--top-k", help="Entries stored per matrix row.",
                                       rich_help_panel="Matrix")] = 64,
    max_probe_rows: Annotated[int, typer.Option("--max-probe-rows", help="Most unvisited rows probed: those the simulation reaches, "
                                                "most often first (0: none).",
                                                rich_help_panel="Matrix")] = 4096,
    bound_states: Annotated[int, typer.Option("--bound-states", help="Most token states in the bounds' matrix "
                                              "(the most visited).", rich_help_panel="Matrix")] = 512,
    n_trajectories: Annotated[int, typer.Option("--n-trajectories", help="Simulated trajectories per policy.",
                                                rich_help_panel="Matrix")] = 256,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Prompts per generate() batch.")] = 16,
    no_attribution: Annotated[bool, typer.Option("--no-attribution", help="Skip the kernel attribution.")] = False,
    baseline: Annotated[Optional[Path], typer.Option("--baseline", help="Compare with this earlier report.json.",
                                                     rich_help_panel="CI")] = None,
    fail_on: Annotated[Optional[list[str]], typer.Option("--fail-on", help="METRIC:TOL gates for --baseline.",
                                                         rich_help_panel="CI")] = None,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Hub revision.", rich_help_panel="Model")] = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N, mps or auto.",
                                        rich_help_panel="Model")] = "cpu",
    dtype: Annotated[str, typer.Option("--dtype", help="float32, float64, float16, bfloat16 or auto.",
                                       rich_help_panel="Model")] = "float32",
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run code shipped with a hub model.",
                                                    rich_help_panel="Model")] = False,
    executor: Annotated[str, typer.Option("--executor", help="Where the trace jobs, the measurement's "
                                          "generate() batches and the reached-row probe run: local or ray (same "
                                          "report; needs repdiag\\[ray]).", rich_help_panel="Scale")] = "local",
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="Ray cluster to join; default: start "
                                                       "a local Ray.", rich_help_panel="Scale")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="Ray actors (default: the cluster's CPUs).",
                                                   rich_help_panel="Scale")] = None,
    shard_dir: Annotated[Optional[Path], typer.Option(
        "--shard-dir", help="Write the finished trace jobs, generate() batches and reached-row probe shards here "
        "(one subfolder per job); a rerun with the same folder loads them instead of recomputing (same report). "
        "Refused (exit 2) when the folder holds another analysis' shards.", rich_help_panel="Scale")] = None,
) -> None:
    """Analyse MODEL: transition matrix, repetition bounds, measured mitigations, prediction, report."""
    from ..pipeline import AnalyzeOptions, RichStages, run_analysis, write_outputs, render_summary

    options = AnalyzeOptions(
        model=model, revision=revision, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
        prompts=prompts, trace_prompts=trace_prompts, n_prompts=n_prompts, max_new_tokens=max_new_tokens,
        seed=seed, mitigations=mitigations, order=order, top_k=top_k, max_probe_rows=max_probe_rows,
        bound_states=bound_states, n_trajectories=n_trajectories, batch_size=batch_size, attribute=not no_attribution, out=out,
        executor=executor, ray_address=ray_address, workers=workers, shard_dir=shard_dir)
    with RichStages(stderr, disable=STATE.quiet) as stages:
        result = run_analysis(options, stages)
    paths = write_outputs(result, out)
    stdout.print(render_summary(result))
    stderr.print(f"report written to {paths['report']}")
    if baseline is not None:
        from ..report import compare, render_compare_table

        outcome = compare(baseline, paths["report"], fail_on=list(fail_on or []))
        stdout.print(render_compare_table(outcome))
        if outcome.exit_code:
            raise typer.Exit(outcome.exit_code)


def register(app: typer.Typer) -> None:
    app.command(name="analyze")(analyze)
