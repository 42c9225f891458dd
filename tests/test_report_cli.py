"""`repdiag report` and `repdiag compare` through the real entry point: exit codes 0 / 1 / 2, files untouched."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from repdiag.cli import main
from repdiag.report import load_report

EXAMPLE = Path(__file__).parent / "fixtures" / "report_example.json"


@pytest.fixture(autouse=True)
def _no_github_env(monkeypatch):
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    monkeypatch.delenv("REPDIAG_FAIL_ON", raising=False)


@pytest.fixture()
def pair(tmp_path):
    """(baseline, current) files; current has greedy rep_w16 +0.05 and top_p_0.9 rep_r +0.01."""
    base = tmp_path / "baseline.json"
    base.write_bytes(EXAMPLE.read_bytes())
    d = json.loads(EXAMPLE.read_text())
    d["measured"]["greedy"]["rep_w16"] = 0.462
    d["measured"]["top_p_0.9"]["rep_r"] = 0.224
    cur = tmp_path / "current.json"
    cur.write_text(json.dumps(d, indent=1))
    return base, cur


def _snapshot(*paths: Path):
    return [(p.read_bytes(), p.stat().st_mtime_ns) for p in paths]


def test_regression_exits_1_and_files_untouched(pair, capsys):
    base, cur = pair
    before = _snapshot(base, cur)
    rc = main(["compare", str(base), str(cur), "--fail-on", "rep_w16:+0.02", "--format", "json"])
    out = capsys.readouterr()
    assert rc == 1
    result = json.loads(out.out)
    assert result["n_regressions"] == 1
    [fail] = [c for c in result["checks"] if c["status"] == "fail"]
    assert (fail["policy"], fail["key"], fail["baseline"], fail["current"], fail["tolerance"]) == (
        "greedy", "rep_w16", 0.412, 0.462, 0.02)
    assert _snapshot(base, cur) == before


def test_within_tolerance_exits_0(pair, capsys):
    base, cur = pair
    assert main(["compare", str(base), str(cur), "--fail-on", "rep_w16:+0.06", "--fail-on", "rep_r:+10%"]) == 0
    out = capsys.readouterr().out
    assert "no regression" in out


def test_relative_regression_and_markdown(pair, capsys):
    base, cur = pair
    rc = main(["compare", str(base), str(cur), "--fail-on", "top_p_0.9.rep_r:+2%", "--format", "md"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "❌ 1 regression" in out and "`top_p_0.9`" in out


@pytest.mark.parametrize(
    "case",
    ["schema_major", "corrupted", "missing_metric", "missing_file", "bad_tolerance", "other_model"],
)
def test_bad_input_exits_2_with_one_line(pair, case, capsys):
    base, cur = pair
    args = ["compare", str(base), str(cur), "--fail-on", "rep_w16:+0.02"]
    if case == "schema_major":
        d = json.loads(cur.read_text())
        d["schema_version"] = "2.0"
        cur.write_text(json.dumps(d))
    elif case == "corrupted":
        cur.write_text(cur.read_text()[:-40])
    elif case == "missing_metric":
        args[-1] = "rep_w99:+0.02"
    elif case == "missing_file":
        args[2] = str(cur.with_name("nope.json"))
    elif case == "bad_tolerance":
        args[-1] = "rep_w16:+2x"
    elif case == "other_model":
        d = json.loads(cur.read_text())
        d["model"]["id"] = "someone/else"
        cur.write_text(json.dumps(d))
        args.append("--same-model")
    files = [p for p in (base, cur) if p.exists()]
    before = _snapshot(*files)
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines[0].startswith("error:"), err
    assert "Traceback" not in err
    assert _snapshot(*files) == before


def test_junit_and_github_outputs(pair, tmp_path, monkeypatch, capsys):
    base, cur = pair
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    junit = tmp_path / "junit.xml"
    rc = main(["compare", str(base), str(cur), "--fail-on", "rep_w16:+0.02", "--junit", str(junit)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "::error title=repdiag regression (greedy)::rep_w16 rose 0.412 → 0.462" in err
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("failures") == "1" and len(suite.findall("testcase")) == 6
    assert "❌ 1 regression" in summary.read_text()


def test_report_command_formats(tmp_path, monkeypatch, capsys):
    summary = tmp_path / "summary.md"
    summary.write_text("before\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    before = _snapshot(EXAMPLE)
    assert main(["report", str(EXAMPLE), "-o", str(tmp_path / "r.md")]) == 0
    md = (tmp_path / "r.md").read_text()
    assert md.startswith("## repdiag report: `default`")
    assert summary.read_text() == "before\n" + md + "\n"
    assert main(["report", str(EXAMPLE), "-o", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
    assert main(["report", str(EXAMPLE), "--format", "junit", "-o", str(tmp_path / "r.junit")]) == 0
    ET.parse(tmp_path / "r.junit")
    capsys.readouterr()
    assert main(["report", str(EXAMPLE), "--format", "md"]) == 0
    assert capsys.readouterr().out == md
    assert _snapshot(EXAMPLE) == before
    assert load_report(EXAMPLE).to_json() == EXAMPLE.read_text()


def test_report_command_bad_file_exits_2(tmp_path, capsys):
    bad = tmp_path / "r.json"
    bad.write_text("{not json")
    assert main(["report", str(bad)]) == 2
    assert "not valid JSON" in " ".join(capsys.readouterr().err.split())
    assert not os.path.exists(tmp_path / "out.md")
