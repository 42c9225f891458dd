"""examples/ci/repdiag-ci.sh with a stub `analyze` (the real end-to-end run on the bundled model is slow):
the script's plumbing, outputs and exit status."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "ci" / "repdiag-ci.sh"
EXAMPLE = ROOT / "tests" / "fixtures" / "report_example.json"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _stub(tmp_path: Path, report: Path) -> Path:
    stub = tmp_path / "repdiag-stub"
    stub.write_text(
        "#!/usr/bin/env bash\n"
        'if [ "$1" = analyze ]; then\n'
        '  shift; out=repdiag-report\n'
        '  while [ $# -gt 0 ]; do if [ "$1" = --out ]; then out=$2; shift; fi; shift; done\n'
        f'  mkdir -p "$out" && cp "{report}" "$out/report.json"; exit 0\n'
        "fi\n"
        f'exec "{sys.executable}" -m repdiag.cli "$@"\n'
    )
    stub.chmod(0o755)
    return stub


def _run(tmp_path: Path, current: Path, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("GITHUB_STEP_SUMMARY", "GITHUB_ACTIONS")}
    full.update(REPDIAG=str(_stub(tmp_path, current)), OUT=str(tmp_path / "out"), **env)
    return subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=full, capture_output=True, text=True, timeout=120)


def test_ci_script_regression_exits_1(tmp_path):
    d = json.loads(EXAMPLE.read_text())
    d["measured"]["greedy"]["rep_w16"] = 0.5  # planted: +0.088 > 0.03
    current = tmp_path / "current.json"
    current.write_text(json.dumps(d))
    baseline = tmp_path / "ci" / "baseline.json"
    baseline.parent.mkdir()
    baseline.write_bytes(EXAMPLE.read_bytes())
    summary = tmp_path / "summary.md"
    proc = _run(tmp_path, current, BASELINE=str(baseline), GITHUB_STEP_SUMMARY=str(summary))
    assert proc.returncode == 1, proc.stderr
    out = tmp_path / "out"
    for name in ("report.json", "report.md", "report.html", "compare.md", "compare.json", "junit.xml"):
        assert (out / name).is_file(), name
    assert json.loads((out / "compare.json").read_text())["n_regressions"] == 1
    text = summary.read_text()
    assert text.count("## repdiag report") == 1 and text.count("## repdiag compare: ❌ 1 regression") == 1
    assert baseline.read_bytes() == EXAMPLE.read_bytes()


def test_ci_script_without_baseline_writes_reports_and_exits_0(tmp_path):
    proc = _run(tmp_path, EXAMPLE, BASELINE=str(tmp_path / "missing.json"))
    assert proc.returncode == 0, proc.stderr
    assert "no baseline" in proc.stderr
    assert (tmp_path / "out" / "report.html").is_file()


@pytest.mark.slow
def test_ci_script_end_to_end_on_the_bundled_model(tmp_path):
    """The real script and the real `repdiag analyze` on the bundled model: a baseline under repetition
    penalty 1.5, then a planted regression (plain greedy in its place) must exit 1, and the same setting
    again must exit 0."""
    wrapper = tmp_path / "repdiag"
    wrapper.write_text(f'#!/usr/bin/env bash\nexec "{sys.executable}" -m repdiag.cli "$@"\n')
    wrapper.chmod(0o755)
    baseline = tmp_path / "ci" / "baseline.json"
    fast = ["--n-prompts", "8", "--max-new-tokens", "24", "--n-trajectories", "16", "--max-probe-rows", "128",
            "--no-attribution", "--quiet"]
    env = {k: v for k, v in os.environ.items() if k not in ("GITHUB_STEP_SUMMARY", "GITHUB_ACTIONS")}
    env.update(REPDIAG=str(wrapper), BASELINE=str(baseline), FAIL_ON="rep_w16:+0.03")

    def run(out: str, mitigation: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(SCRIPT), "--mitigations", mitigation, *fast], cwd=tmp_path,
                              env={**env, "OUT": str(tmp_path / out), **extra}, capture_output=True, text=True,
                              timeout=600)

    first = run("base", "repetition_penalty_1.5", UPDATE_BASELINE="1")
    assert first.returncode == 0, first.stderr
    assert baseline.is_file()
    same = run("same", "repetition_penalty_1.5")
    assert same.returncode == 0, same.stderr
    worse = run("worse", "greedy", POLICY_MAP="repetition_penalty_1.5=greedy")
    assert worse.returncode == 1, worse.stderr
    checks = json.loads((tmp_path / "worse" / "compare.json").read_text())
    assert checks["n_regressions"] >= 1
    assert (tmp_path / "worse" / "report.html").stat().st_size > 1000
