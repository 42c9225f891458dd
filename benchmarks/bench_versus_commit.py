"""`repdiag analyze` of this checkout against an earlier commit, back to back on the same machine.

Checks the commit out into a temporary git worktree and runs the same ``repdiag analyze`` command
with each version's code (the worktree's package first on ``PYTHONPATH``, run from outside the
repository so that the editable install does not shadow it), alternating ``--repeats`` times so that
both see the same machine load. Prints the wall time, the simulate and probe stages, the rows probed,
whether the two versions predicted the same numbers (``predicted`` of ``report.json``) and, per
policy, the share of simulated steps that read an unprobed row (which can make them differ).

    .venv/bin/python benchmarks/bench_versus_commit.py 743a117                  # the bundled model
    .venv/bin/python benchmarks/bench_versus_commit.py 743a117 --repeats 1 \\
        --model /tmp/g270 --extra "--n-prompts 12 --max-new-tokens 64"        # bench_large_vocab's model

(``/tmp/g270``: build it once with ``benchmarks/bench_large_vocab.py --model-dir /tmp/g270``.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_analyze(code_root: Path, model: str, extra: list[str], out: Path) -> dict:
    """One ``repdiag analyze`` with the package of ``code_root``; its wall time, timings and report."""
    cmd = [sys.executable, "-c", "from repdiag.cli import _entry; _entry()", "-q", "analyze", model,
           "--out", str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(code_root), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=out.parent, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"analyze with {code_root} failed with exit {proc.returncode}:\n{proc.stderr[-3000:]}")
    timings = json.loads((out / "timings.json").read_text())["seconds"]
    report = json.loads((out / "report.json").read_text())
    return {"wall": wall, "timings": timings, "report": report}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rev", help="the earlier commit to compare with")
    ap.add_argument("--model", default="default")
    ap.add_argument("--extra", default="", help="more analyze options, e.g. '--n-prompts 12'")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    extra = args.extra.split()
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "-q", "--detach", str(tree), args.rev], check=True)
        try:
            runs: dict[str, list[dict]] = {args.rev: [], "this checkout": []}
            for k in range(args.repeats):
                for label, root in ((args.rev, tree), ("this checkout", REPO)):
                    out = Path(tmp) / f"out-{k}-{'old' if root == tree else 'new'}"
                    runs[label].append(run_analyze(root, args.model, extra, out))
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=True)
    for label, results in runs.items():
        for r in results:
            reached = r["report"]["matrix"].get("reached_rows", {})
            print(f"{label:>14}: {r['wall']:6.1f} s wall, simulate {r['timings'].get('simulate', 0):6.1f} s "
                  f"(probe {r['timings'].get('probe_reached_rows', 0):5.1f} s), {reached.get('probed')} rows probed")
    old, new = runs[args.rev][0]["report"]["predicted"], runs["this checkout"][0]["report"]["predicted"]
    differ = sorted(p for p in set(old) | set(new) if old.get(p) != new.get(p))
    print("same predictions:", "yes" if not differ else f"no, for {', '.join(differ)}")
    for label, results in runs.items():  # a simulated step that read an unprobed row can make them differ
        share = results[0]["report"]["matrix"].get("reached_rows", {}).get("missing_step_share")
        print(f"{label:>14}: share of simulated steps on an unprobed row: {json.dumps(share)}")


if __name__ == "__main__":
    main()
