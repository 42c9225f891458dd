"""Reports: the ``Report`` type and ``report.json`` (versioned schema), Markdown / HTML / JUnit
renderings, and ``compare`` against a baseline for CI.

This package computes no statistic: ``repdiag analyze`` fills a :class:`Report`, this package writes,
reads, renders and compares it. Importing it does not import torch.
"""

from __future__ import annotations

from .compare import Check, CompareResult, compare, parse_fail_on, render_compare_table
from .html import render_html
from .junit import compare_to_junit, report_to_junit
from .markdown import append_step_summary, render_compare_markdown, render_markdown
from .model import (
    SCHEMA_VERSION,
    Attribution,
    AttributionEntry,
    EnvironmentInfo,
    Example,
    LoopCycle,
    LoopMap,
    MatrixInfo,
    ModelInfo,
    Prediction,
    PromptsInfo,
    Report,
    Settings,
    ToolInfo,
    format_number,
    higher_is_better,
    load_report,
    save_report,
    schema,
    timings_path_for,
    validate_report_dict,
)

__all__ = [
    "SCHEMA_VERSION",
    "Report",
    "ToolInfo",
    "ModelInfo",
    "EnvironmentInfo",
    "Settings",
    "PromptsInfo",
    "MatrixInfo",
    "Prediction",
    "LoopCycle",
    "LoopMap",
    "Attribution",
    "AttributionEntry",
    "Example",
    "load_report",
    "save_report",
    "timings_path_for",
    "schema",
    "validate_report_dict",
    "higher_is_better",
    "format_number",
    "compare",
    "parse_fail_on",
    "Check",
    "CompareResult",
    "render_markdown",
    "render_compare_markdown",
    "append_step_summary",
    "render_html",
    "report_to_junit",
    "compare_to_junit",
    "render_compare_table",
]
