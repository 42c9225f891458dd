"""JUnit XML (xunit2) for CI systems that show test results: one ``<testcase>`` per compared metric.

``<testcase classname="repdiag.<model>.<policy>" name="<metric>">``, a ``<failure message=...>`` for a
regression; properties (model, seed, versions) only on ``<testsuite>``, as xunit2 requires. Written
with the standard library's ``xml.etree``; deterministic (no timestamp, ``time="0"``).
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from typing import Any, Mapping

from .compare import CompareResult
from .model import Report, format_number

__all__ = ["compare_to_junit", "report_to_junit"]


def _segment(text: Any) -> str:
    """A classname segment: dots and spaces would split the hierarchy, so they become ``_``."""
    s = re.sub(r"[.\s/\\]+", "_", str(text if text is not None else "unknown")).strip("_")
    return s or "unknown"


def _properties(suite: ET.Element, props: Mapping[str, Any]) -> None:
    clean = {k: v for k, v in props.items() if v is not None}
    if not clean:
        return
    el = ET.SubElement(suite, "properties")
    for k in sorted(clean):
        ET.SubElement(el, "property", name=str(k), value=str(clean[k]))


def _report_props(report: Report, prefix: str = "") -> dict[str, Any]:
    env = report.environment
    return {
        f"{prefix}model": report.model.id,
        f"{prefix}revision": report.model.revision,
        f"{prefix}tokenizer_fingerprint": report.model.tokenizer_fingerprint,
        f"{prefix}seed": report.settings.seed,
        f"{prefix}repdiag": report.tool.version,
        f"{prefix}schema_version": report.schema_version,
        f"{prefix}torch": env.torch,
        f"{prefix}transformers": env.transformers,
    }


def _tostring(root: ET.Element) -> str:
    ET.indent(root, space="  ")
    body = ET.tostring(root, encoding="unicode")
    return '<?xml version="1.0" encoding="utf-8"?>\n' + body + "\n"


def compare_to_junit(
    result: CompareResult,
    *,
    suite_name: str = "repdiag.compare",
    properties: Mapping[str, Any] | None = None,
) -> str:
    """JUnit XML of a compare: a passing or failing test case per gated (or listed) metric."""
    model = _segment(result.current_model)
    failures = len(result.regressions)
    root = ET.Element("testsuites", name="repdiag", tests=str(len(result.checks)), failures=str(failures), errors="0", time="0")
    suite = ET.SubElement(
        root, "testsuite", name=suite_name, tests=str(len(result.checks)), failures=str(failures),
        errors="0", skipped="0", time="0",
    )
    props = {"baseline_model": result.baseline_model, "current_model": result.current_model}
    props.update({f"gate_{i}": g for i, g in enumerate(result.gates)})
    props.update(properties or {})
    _properties(suite, props)
    for c in result.checks:
        name = c.key if c.section == "measured" else f"{c.section}.{c.key}"
        case = ET.SubElement(suite, "testcase", classname=f"repdiag.{model}.{_segment(c.policy)}", name=name, time="0")
        if c.status == "fail":
            fail = ET.SubElement(case, "failure", message=c.message, type="regression")
            fail.text = (
                f"baseline {format_number(c.baseline)}, current {format_number(c.current)}, "
                f"tolerance {format_number(c.tolerance)} ({c.tolerance_text})"
            )
        else:
            ET.SubElement(case, "system-out").text = c.message
    if result.warnings:
        ET.SubElement(suite, "system-err").text = "\n".join(result.warnings)
    return _tostring(root)


def report_to_junit(report: Report, *, suite_name: str = "repdiag.report") -> str:
    """JUnit XML of one report: a (passing) test case per measured metric and policy, value in the output.

    Useful to show the numbers in a CI's test view; the gate itself is ``repdiag compare``.
    """
    model = _segment(report.model.id)
    cases: list[tuple[str, str, str]] = []
    for policy in report.policies():
        for key, value in report.measured.get(policy, {}).items():
            text = f"{key} = {format_number(value)}"
            se = report.se("measured", policy, key)
            if se is not None:
                text += f" ± {format_number(se, 2)}"
            if key in report.predicted.get(policy, {}):
                text += f" (predicted {format_number(report.predicted[policy][key])})"
            cases.append((policy, key, text))
    root = ET.Element("testsuites", name="repdiag", tests=str(len(cases)), failures="0", errors="0", time="0")
    suite = ET.SubElement(root, "testsuite", name=suite_name, tests=str(len(cases)), failures="0", errors="0", skipped="0", time="0")
    _properties(suite, _report_props(report))
    for policy, key, text in cases:
        case = ET.SubElement(suite, "testcase", classname=f"repdiag.{model}.{_segment(policy)}", name=key, time="0")
        ET.SubElement(case, "system-out").text = text
    return _tostring(root)
