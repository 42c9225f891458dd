"""The HTML report in a real headless browser (Debian's chromium driven by Playwright).

Skipped, with the reason, only when Playwright or a chromium binary is absent. ``.ci/run`` installs both:
``apt-get install -y chromium`` and ``pip install playwright`` (no browser download: we pass
``executable_path``). The screenshot is saved to ``test-artifacts/report.png``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from repdiag._atomic import write_text
from repdiag.report import load_report, render_html
from repdiag.report.html import PLOTS
from tiny_models import missing_input

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "tests" / "fixtures" / "report_example.json"
ARTIFACTS = ROOT / "test-artifacts"


def _chromium() -> str | None:
    env = os.environ.get("REPDIAG_CHROMIUM")
    if env and Path(env).exists():
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    return sync_playwright


CHROMIUM = _chromium()
SYNC_PLAYWRIGHT = _playwright()



@pytest.fixture(autouse=True)
def _needs_a_browser():
    """Skip without playwright or chromium (fail under CI: .ci/run installs both)."""
    if SYNC_PLAYWRIGHT is None:
        missing_input("playwright is not installed (pip install playwright)")
    if CHROMIUM is None:
        missing_input("no chromium binary on PATH (apt-get install -y chromium)")


def test_html_report_in_headless_chromium(tmp_path):
    report = load_report(EXAMPLE)
    page_path = write_text(tmp_path / "report.html", render_html(report))
    ARTIFACTS.mkdir(exist_ok=True)
    problems: list[str] = []
    requests: list[str] = []
    with SYNC_PLAYWRIGHT() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1240, "height": 900})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            stats = {}
            for name in PLOTS:
                fig = page.query_selector(f'figure.plot[data-plot="{name}"]')
                assert fig is not None, f"plot {name} missing"
                box = fig.bounding_box()
                assert box and box["width"] > 100 and box["height"] > 100, f"plot {name} has no size: {box}"
                svgs = fig.query_selector_all("svg")
                assert svgs, f"plot {name} has no svg"
                for svg in svgs:
                    b = svg.bounding_box()
                    assert b and b["width"] > 50 and b["height"] > 50, f"an svg of {name} is empty: {b}"
                    marks = svg.eval_on_selector_all("circle, rect, line, path", "els => els.filter(e => !e.closest('defs')).length")
                    assert marks >= 1, f"an svg of {name} draws nothing"
                stats[name] = fig
            n_eig = sum(len(v) for v in report.spectrum.values())
            assert len(stats["spectrum"].query_selector_all("circle.eig")) == n_eig
            assert len(stats["spectrum"].query_selector_all("circle.unit-circle")) == len(report.spectrum)
            n_points = sum(
                1 for p in report.policies() for k in ("rep_w16", "rep_r", "seq_rep_4")
                if k in report.measured.get(p, {}) and k in report.predicted.get(p, {})
            )
            assert len(stats["scatter"].query_selector_all("circle.point")) == n_points
            assert "Spearman ρ = 0.943" in stats["scatter"].inner_text() or "Spearman ρ = 0.943" in page.content()
            assert len(stats["bounds"].query_selector_all("rect.bar")) >= len(report.bounds) * 5
            assert len(stats["bounds"].query_selector_all("rect.inf")) == 4  # greedy: su_R, su_R_avg, fu_arp, lsr
            n_nodes = sum(len(c.tokens) for c in report.loop_map.cycles)
            assert len(stats["loop-map"].query_selector_all("circle.node")) == n_nodes
            assert len(stats["loop-map"].query_selector_all("rect.basin")) == len(report.loop_map.cycles)
            assert len(stats["attribution"].query_selector_all("rect.contribution")) == len(report.attribution.entries())
            assert "Tom has a ball." in page.content()
            page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        finally:
            browser.close()
    assert not problems, problems
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000
