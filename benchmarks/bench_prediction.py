"""Predicted against measured repetition across ≥ 12 decoding policies (issue 6, spec §7.1).

Runs ``repdiag analyze`` with 14 policies mixing greedy, sampling, truncation, repetition penalty and
no-repeat-n-gram on ≥ 100 prompts (half trace, half measurement, disjoint) and prints the Spearman
correlation between the chain-simulation prediction and the measurement for rep-w16, rep-r and
seq-rep-4, with the closed forms' figures per family. Models: the bundled default model and the real
TinyStories Llama in ../shared/models/tinystories-260k (skipped when absent).

Also the ceiling of spec §7.1's table: the same policies measured a second time with ``generate()``
on the trace prompts (disjoint from the measurement prompts, same seed), and the Spearman correlation
of the two measurements. No predictor can rank the policies better than the measurement agrees with
itself; when most policies tie near 0 (seq-rep-4 of a model that rarely loops), the ceiling is low too.

    .venv/bin/python benchmarks/bench_prediction.py [--prompts 120] [--max-new-tokens 64] [--model default|tinystories|both]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

POLICIES = ("greedy,temperature_0.7,temperature_1.3,top_k_10,top_k_50,top_p_0.9,top_p_0.95,typical_0.9,min_p_0.1,"
            "repetition_penalty_1.2,repetition_penalty_1.5,no_repeat_ngram_3,t0.7_top_p_0.9,rp1.2_top_p_0.9")
TINYSTORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "tinystories-260k"
SUBJECTS = ("The dog", "A little girl", "Tom", "The cat", "Lily", "A big bear", "The old man", "Sue and Ben",
            "The bird", "A small boy", "Mom", "The fish", "Tim", "The princess")
OPENINGS = ("{s} went to the park", "Once upon a time, {s}", "{s} was very happy", "One day, {s} saw",
            "{s} wanted to play", "{s} found a box", "{s} liked to", "{s} was sad because",
            "After lunch, {s}")


def story_prompts(n: int) -> list[str]:
    return [o.format(s=s) for o, s in itertools.islice(itertools.product(OPENINGS, SUBJECTS), n)]


def second_measurement(model: str, prompts_file: Path | None, report: dict) -> dict:
    """The policies measured again on the report's trace prompts: policy -> metric key -> value."""
    from repdiag.measure import measure_policies
    from repdiag.mitigations import resolve_mitigations
    from repdiag.models import DEFAULT_MODEL_DIR, load_model
    from repdiag.prompts import default_model_prompts, load_prompts

    lm = load_model(model)
    prompt_set = load_prompts(prompts_file) if prompts_file is not None else default_model_prompts(DEFAULT_MODEL_DIR)
    trace = prompt_set.subset(report["prompts"]["trace_indices"])
    runs = measure_policies(lm, resolve_mitigations(report["prediction"]["policies"]), trace.prompts,
                            trace.references, max_new_tokens=report["settings"]["max_new_tokens"],
                            seed=report["settings"]["seed"], batch_size=report["settings"]["batch_size"])
    return {r.policy: r.report_metrics() for r in runs}


def run(model: str, prompts_file: Path | None, n_prompts: int, max_new_tokens: int, out: Path) -> dict:
    import torch

    from repdiag.cli import main

    torch.set_num_threads(1)
    args = ["analyze", model, "--out", str(out), "--mitigations", POLICIES, "--n-prompts", str(n_prompts),
            "--max-new-tokens", str(max_new_tokens), "--no-attribution", "--quiet"]
    if prompts_file is not None:
        args += ["--prompts", str(prompts_file)]
    t0 = time.perf_counter()
    code = main(args)
    if code != 0:
        sys.exit(f"repdiag analyze failed with exit code {code}")
    report = json.loads((out / "report.json").read_text())
    report["_seconds"] = time.perf_counter() - t0
    report["_second"] = second_measurement(model, prompts_file, report)
    return report


def show(name: str, report: dict) -> None:
    pred = report["prediction"]
    print(f"\n== {name}: {len(pred['policies'])} policies, {report['prompts']['n_measure']} measurement prompts, "
          f"{report['prompts']['n_trace']} trace prompts, {report['settings']['max_new_tokens']} new tokens, "
          f"{report['_seconds']:.0f} s")
    from repdiag.pipeline import spearman_block

    ceiling = spearman_block(report["_second"], report["measured"], pred["policies"], list(pred["spearman"]))
    for key, block in pred["spearman"].items():
        print(f"  simulation  {key:10s} Spearman rho = {block['rho']:.3f} (p = {block['p']:.2g}, "
              f"n = {block['n_policies']}), mean |pred - meas| = {pred['calibration_error'][key]:.3f}; "
              f"ceiling (second measurement on the trace prompts) rho = {ceiling[key]['rho']:.3f}")
    for quantity, blocks in pred["closed_form"].items():
        parts = [f"{fam}: {b['rho']:.2f} (n={b['n_policies']})" for fam, b in blocks.items() if b["rho"] is not None]
        print(f"  closed form {quantity:24s} vs rep_w16: " + (", ".join(parts) or "n/a"))
    keys = list(pred["spearman"])
    print(f"  {'policy':26s} " + " ".join(f"{k + ' meas / 2nd / pred':>28s}" for k in keys))
    for policy in pred["policies"]:
        cells = [f"{report['measured'][policy][k]:8.3f} / {report['_second'][policy][k]:6.3f} / "
                 f"{report['predicted'][policy][k]:6.3f}" for k in keys]
        print(f"  {policy:26s} " + " ".join(f"{c:>28s}" for c in cells))


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=120, help="prompts in all, half trace and half measurement "
                        f"(at most {len(OPENINGS) * len(SUBJECTS)} story prompts for TinyStories)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--model", choices=("default", "tinystories", "both"), default="both")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model in ("default", "both"):
            show("bundled default model", run("default", None, args.prompts, args.max_new_tokens, tmp / "default"))
        if args.model in ("tinystories", "both"):
            if not TINYSTORIES.is_dir():
                print(f"skipping TinyStories: {TINYSTORIES} is absent")
            else:
                prompts = tmp / "stories.txt"
                prompts.write_text("\n".join(story_prompts(args.prompts)) + "\n")
                show("TinyStories-260k", run(str(TINYSTORIES), prompts, args.prompts, args.max_new_tokens,
                                             tmp / "tinystories"))


if __name__ == "__main__":
    main_cli()
