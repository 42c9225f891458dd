"""The Report type, report.json (schema, determinism), Markdown (golden file), JUnit and compare()."""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from repdiag._atomic import dumps_json
from repdiag.errors import BadInputError, UsageError
from repdiag.report import (
    SCHEMA_VERSION,
    Attribution,
    AttributionEntry,
    LoopCycle,
    LoopMap,
    ModelInfo,
    Report,
    compare,
    compare_to_junit,
    higher_is_better,
    load_report,
    parse_fail_on,
    render_compare_markdown,
    render_html,
    render_markdown,
    report_to_junit,
    save_report,
    timings_path_for,
    validate_report_dict,
)
from repdiag.report.markdown import STEP_SUMMARY_LIMIT, append_step_summary, trim_markdown

FIXTURES = Path(__file__).parent / "fixtures"
EXAMPLE = FIXTURES / "report_example.json"
GOLDEN_MD = FIXTURES / "report_example.md"


@pytest.fixture()
def example() -> Report:
    return load_report(EXAMPLE)


def _with(report: Report, section: str, policy: str, key: str, value) -> Report:
    table = {p: dict(row) for p, row in report.section(section).items()}
    table[policy][key] = value
    return report.replace(**{section: table})


# ---- report.json -------------------------------------------------------------------------------


def test_fixture_validates_against_the_schema():
    validate_report_dict(json.loads(EXAMPLE.read_text()))


def test_round_trip_is_byte_identical(example, tmp_path):
    assert example.to_json() == EXAMPLE.read_text()
    out = save_report(example, tmp_path / "report.json", timings={"measure": 1.25})
    assert out.read_bytes() == EXAMPLE.read_bytes()
    # timings in the sidecar, never in the body
    assert json.loads((tmp_path / "timings.json").read_text()) == {"seconds": {"measure": 1.25}}
    assert "seconds" not in out.read_text() and "timestamp" not in out.read_text()


def test_same_report_built_twice_gives_the_same_bytes(example):
    again = Report.from_dict(json.loads(example.to_json()))
    assert again.to_json() == example.to_json()
    assert render_markdown(again) == render_markdown(example)
    assert render_html(again) == render_html(example)
    assert report_to_junit(again) == report_to_junit(example)


def test_minimal_report_validates_and_infinities_are_strings():
    r = Report(
        model=ModelInfo(id="tiny", kind="causal"),
        bounds={"greedy": {"su_R": math.inf, "rho_Q": 1.0}},
        measured={"greedy": {"rep_w16": 0.5, "loop_onset": None}},
        spectrum={"greedy": [[1.0, 0.0], [-1.0, 0.0]]},
        loop_map=LoopMap(cycles=[LoopCycle(tokens=[3, 4], text=" a b", basin_size=7)], loop_fraction=1.0),
        attribution=Attribution(mode="final", query="x", completeness_residual=None, delta_m=None,
                                top=[AttributionEntry(pair=1, contribution=0.5)]),
    )
    d = json.loads(r.to_json())
    validate_report_dict(d)
    assert d["schema_version"] == SCHEMA_VERSION
    assert d["bounds"]["greedy"]["su_R"] == "inf"
    assert Report.from_dict(d).bounds["greedy"]["su_R"] == math.inf
    # every section the lead fills is present even when empty
    assert {"tool", "model", "environment", "settings", "prompts", "matrix", "prediction", "quality"} <= set(d)


def test_unknown_section_fields_are_kept(example):
    d = json.loads(example.to_json())
    d["matrix"]["new_field"] = 3
    assert Report.from_dict(d).to_dict()["matrix"]["new_field"] == 3


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda d: d.update(schema_version="2.0"), "schema version"),
        (lambda d: d.pop("schema_version"), "schema_version"),
        (lambda d: d["measured"]["greedy"].update(rep_w16="high"), "measured.greedy.rep_w16"),
        (lambda d: d.update(surprise={}), "unknown top-level"),
        (lambda d: d.update(spectrum={"greedy": [[1.0]]}), "spectrum.greedy"),
    ],
)
def test_bad_reports_are_bad_input(mutate, fragment, tmp_path):
    d = json.loads(EXAMPLE.read_text())
    mutate(d)
    p = tmp_path / "r.json"
    p.write_text(json.dumps(d))
    with pytest.raises(BadInputError, match=fragment):
        load_report(p)


def test_corrupted_and_missing_files_are_bad_input(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(EXAMPLE.read_text()[:500])
    with pytest.raises(BadInputError, match="not valid JSON"):
        load_report(bad)
    with pytest.raises(BadInputError, match="does not exist"):
        load_report(tmp_path / "nope.json")


def test_schema_rejects_a_timestamp_and_bad_numbers(example):
    import jsonschema

    d = json.loads(example.to_json())
    d["environment"]["timestamp"] = "2026-01-01"
    with pytest.raises(jsonschema.ValidationError):
        validate_report_dict(d)
    d = json.loads(example.to_json())
    d["bounds"]["greedy"]["su_R"] = "infinite"
    with pytest.raises(jsonschema.ValidationError):
        validate_report_dict(d)


def test_timings_sidecar_name():
    assert timings_path_for("out/report.json").name == "timings.json"
    assert timings_path_for("out/baseline.json").name == "baseline.timings.json"


def test_directions():
    assert higher_is_better("rep_w16") is False and higher_is_better("rep_w32") is False
    assert higher_is_better("seq_rep_4") is False and higher_is_better("simctg_rep_2_code_quirk") is False
    assert higher_is_better("su_R") is False and higher_is_better("greedy.su_R_avg") is False
    assert higher_is_better("simctg_diversity") is True and higher_is_better("uniq_seq") is True
    assert higher_is_better("mean_p_eos") is True and higher_is_better("chrf") is True
    assert higher_is_better("length") is None


# ---- Markdown ----------------------------------------------------------------------------------


def test_markdown_golden(example):
    text = render_markdown(example)
    if os.environ.get("REPDIAG_UPDATE_GOLDEN") == "1":  # pragma: no cover - regenerate on purpose
        GOLDEN_MD.write_text(text, encoding="utf-8")
    assert text == GOLDEN_MD.read_text(encoding="utf-8")


def test_step_summary_is_appended_and_trimmed(tmp_path):
    target = tmp_path / "summary.md"
    target.write_text("earlier step\n")
    assert append_step_summary("# hello\n", env={"GITHUB_STEP_SUMMARY": str(target)}) == target
    assert target.read_text() == "earlier step\n# hello\n\n"
    assert append_step_summary("x", env={}) is None
    big = "| row |\n" * 300_000
    trimmed = trim_markdown(big)
    assert len(trimmed.encode()) <= STEP_SUMMARY_LIMIT < 1024 * 1024
    assert "truncated" in trimmed


# ---- compare -----------------------------------------------------------------------------------


def test_compare_same_report_passes(example):
    res = compare(example, example, fail_on=["rep_w16:+0.02", "su_R:+10%", "simctg_diversity:0.01"])
    assert res.ok and res.exit_code == 0
    assert len(res.checks) == 18  # 3 gates x 6 policies


def test_compare_regression_absolute(example):
    worse = _with(example, "measured", "top_p_0.9", "rep_w16", 0.198 + 0.05)
    res = compare(example, worse, fail_on=["rep_w16:+0.02"])
    assert res.exit_code == 1
    [fail] = res.regressions
    assert (fail.policy, fail.key, fail.baseline, fail.current, fail.tolerance) == ("top_p_0.9", "rep_w16", 0.198, 0.248, 0.02)
    assert "rose" in fail.message and "tol 0.02" in fail.message


def test_compare_within_tolerance_and_improvement(example):
    slightly = _with(example, "measured", "greedy", "rep_w16", 0.412 + 0.019)
    assert compare(example, slightly, fail_on=["rep_w16:+0.02"]).ok
    better = _with(example, "measured", "greedy", "rep_w16", 0.1)
    assert compare(example, better, fail_on=["rep_w16:+0.02"]).ok


def test_compare_relative_and_direction(example):
    worse = _with(example, "bounds", "contrastive", "su_R", 27.31 * 1.11)
    assert compare(example, worse, fail_on=["su_R:+10%"]).exit_code == 1
    assert compare(example, worse, fail_on=["su_R:+12%"]).exit_code == 0
    # higher is better: a drop in diversity fails, a rise never does
    drop = _with(example, "measured", "greedy", "simctg_diversity", 0.2)
    assert compare(example, drop, fail_on=["simctg_diversity:+0.05"]).exit_code == 1
    rise = _with(example, "measured", "greedy", "simctg_diversity", 0.9)
    assert compare(example, rise, fail_on=["simctg_diversity:0.01"]).exit_code == 0
    # finite -> inf is a regression for a lower-is-better bound
    inf = _with(example, "bounds", "top_p_0.9", "su_R", math.inf)
    assert compare(example, inf, fail_on=["su_R:+1000%"]).exit_code == 1


def test_compare_policy_key_and_alias(example):
    worse = _with(example, "measured", "greedy", "rep_w16", 0.9)
    # only top-p is gated: the greedy regression is not checked
    assert compare(example, worse, fail_on=["top_p_0.9.rep_w16:+0.02"]).ok
    res = compare(example, worse, fail_on=["greedy.rep_w:+0.02"])
    assert [c.key for c in res.regressions] == ["rep_w16"]
    res = compare(example, worse, fail_on=["predicted.rep_w16:+0.5"])
    assert res.ok and {c.section for c in res.checks} == {"predicted"}


def test_compare_noise_aware(example):
    worse = _with(example, "measured", "greedy", "rep_w16", 0.412 + 0.04)  # se 0.0202 each
    assert compare(example, worse, fail_on=["rep_w16:+0.02"]).exit_code == 1
    assert compare(example, worse, fail_on=["rep_w16:+0.02"], z=2.0).exit_code == 0


def test_compare_bad_input(example):
    with pytest.raises(BadInputError, match="not in the baseline"):
        compare(example, example, fail_on=["no_such_metric:+0.1"])
    with pytest.raises(BadInputError, match="not in the baseline"):
        compare(example, example, fail_on=["nopolicy.rep_w16:+0.1"])
    dropped = example.replace(measured={p: {k: v for k, v in row.items() if k != "rep_r"} for p, row in example.measured.items()})
    with pytest.raises(BadInputError, match="not in the current report"):
        compare(example, dropped, fail_on=["rep_r:+0.1"])
    with pytest.raises(UsageError):
        parse_fail_on(["rep_w16"])
    with pytest.raises(UsageError):
        parse_fail_on(["rep_w16:lots"])
    other = example.replace(model=ModelInfo(id="other", tokenizer_fingerprint="x"))
    assert compare(example, other).warnings
    with pytest.raises(BadInputError, match="different model"):
        compare(example, other, same_model=True)


def test_parse_fail_on_forms():
    g = parse_fail_on(["temperature=0.7.rep_r:-5%", "bounds.greedy.su_R:3", "rep_w16:+.02"])
    assert (g[0].policy, g[0].key, g[0].tolerance.relative, g[0].tolerance.value) == ("temperature=0.7", "rep_r", True, 0.05)
    assert (g[1].section, g[1].policy, g[1].key, g[1].tolerance.value) == ("bounds", "greedy", "su_R", 3.0)
    assert (g[2].policy, g[2].tolerance.value, g[2].tolerance.sign) == (None, 0.02, 1)


def test_compare_without_gates_lists_but_never_fails(example):
    worse = _with(example, "measured", "greedy", "rep_w16", 0.99)
    res = compare(example, worse)
    assert res.ok and res.checks and all(c.status == "info" for c in res.checks)


def test_compare_renderings(example):
    worse = _with(example, "measured", "greedy", "rep_w16", 0.5)
    res = compare(example, worse, fail_on=["rep_w16:+0.02", "su_R:+10%"])
    md = render_compare_markdown(res)
    assert "❌ 1 regression" in md and "| metric | baseline | current | Δ | tolerance | status |" in md
    root = ET.fromstring(compare_to_junit(res))
    suite = root.find("testsuite")
    assert suite is not None and suite.get("tests") == "12" and suite.get("failures") == "1"
    cases = suite.findall("testcase")
    assert len(cases) == 12
    failed = [c for c in cases if c.find("failure") is not None]
    assert [(c.get("classname"), c.get("name")) for c in failed] == [("repdiag.default.greedy", "rep_w16")]
    assert "0.412 → 0.5" in failed[0].find("failure").get("message")
    # properties only on the testsuite (xunit2)
    assert not any(c.find("properties") is not None for c in cases)
    assert json.loads(dumps_json(res.to_dict()))["n_regressions"] == 1


def test_report_junit_parses(example):
    root = ET.fromstring(report_to_junit(example))
    suite = root.find("testsuite")
    n = sum(len(row) for row in example.measured.values())
    assert suite is not None and int(suite.get("tests")) == n and suite.get("failures") == "0"
    names = {p.get("name") for p in suite.find("properties")}
    assert {"model", "seed", "torch", "transformers"} <= names


def test_html_is_self_contained(example):
    html = render_html(example)
    assert "<script" not in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in html
    for plot in ("spectrum", "bounds", "scatter", "loop-map", "attribution"):
        assert f'data-plot="{plot}"' in html
    assert "It ran &lt;fast&gt; &amp; far" in html  # training-pair text escaped
    empty = render_html(Report())
    assert 'data-missing="spectrum"' in empty and 'data-plot="' not in empty


def test_compare_policy_map(example):
    cur = example.replace(measured={("temperature_1.3" if p == "top_p_0.9" else p): dict(row) for p, row in example.measured.items()})
    cur = _with(cur, "measured", "temperature_1.3", "rep_w16", 0.3)
    with pytest.raises(BadInputError, match="not in the current report"):
        compare(example, cur, fail_on=["rep_w16:+0.02"])
    res = compare(example, cur, fail_on=["rep_w16:+0.02"], policy_map={"top_p_0.9": "temperature_1.3"})
    assert [c.policy for c in res.regressions] == ["top_p_0.9→temperature_1.3"]
    with pytest.raises(BadInputError, match="policy-map"):
        compare(example, cur, policy_map={"nope": "greedy"})


def test_importing_reports_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, repdiag.report, repdiag.commands.report; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


def test_environment_current_has_versions():
    from repdiag.report import EnvironmentInfo

    env = EnvironmentInfo.current()
    assert env.python and env.numpy and env.platform
    assert "timestamp" not in env.to_dict()


def test_markdown_says_how_many_rows_the_simulation_made_the_analysis_probe():
    data = json.loads(EXAMPLE.read_text())
    data["matrix"]["reached_rows"] = {"probed": 1390, "fills": 8, "max_probe_rows": 4096,
                                      "missing_step_share": {"greedy": 0.0}}
    text = render_markdown(Report.from_dict(data))
    assert "1390 unvisited rows probed as the simulation reached them (at 8 steps)" in text
