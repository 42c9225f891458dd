"""One self-contained HTML page for people: inline CSS and hand-written inline SVG, no script, no network.

Plots (each a ``<figure class="plot" data-plot="...">``):

- ``spectrum``: eigenvalues of Q = B∘B per policy against the unit circle (``Report.spectrum``);
- ``bounds``: R (Su's repetition sum) and the other bounds per policy, one bar panel per quantity;
- ``scatter``: predicted against measured repetition per metric, with the Spearman correlation;
- ``loop-map``: the greedy cycles as rings with their basins;
- ``attribution``: proponent / opponent bars with the training pairs' text.

A plot whose data is absent is replaced by a one-line note. Deterministic output (no date).
"""

from __future__ import annotations

import math
from html import escape
from typing import Any, Iterable, Mapping, Sequence

from .markdown import BOUND_KEYS, PRIMARY_METRICS, QUALITY_KEYS, SECONDARY_METRICS, _int_human, _metric_order, closed_form_rows
from .model import Report, format_number, higher_is_better

__all__ = ["render_html", "PLOTS"]

#: the ``data-plot`` names of the figures, in page order
PLOTS = ("spectrum", "bounds", "scatter", "loop-map", "attribution")

#: eigenvalues drawn per policy at most (largest modulus first)
_MAX_EIGENVALUES = 1500

#: Okabe–Ito, colour-blind safe
_PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000", "#999999", "#882255")

_CSS = """
:root { --fg:#1d2430; --muted:#5b6575; --line:#d5dbe3; --bg:#ffffff; --panel:#f6f8fa; --bad:#c0392b; --good:#1e8449; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--fg);
       background: var(--bg); margin: 0 auto; max-width: 1180px; padding: 24px 28px 60px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 34px 0 8px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
.sub { color: var(--muted); margin: 0 0 12px; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 8px 12px; margin: 10px 0; }
table { border-collapse: collapse; margin: 8px 0 14px; font-variant-numeric: tabular-nums; display: block; max-width: 100%; overflow-x: auto; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: right; vertical-align: top; }
th { background: var(--panel); font-weight: 600; } td.l, th.l { text-align: left; }
td.text { text-align: left; max-width: 520px; }
figure.plot { margin: 10px 0 18px; padding: 10px; border: 1px solid var(--line); border-radius: 6px; background: #fff; }
figure.plot figcaption { color: var(--muted); font-size: 12.5px; margin-top: 6px; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
.legend { display: flex; flex-wrap: wrap; gap: 6px 16px; font-size: 12.5px; margin: 4px 0; }
.legend span.sw { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 5px; vertical-align: -1px; }
.empty { color: var(--muted); font-style: italic; }
svg text { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; fill: var(--fg); }
code { background: var(--panel); padding: 0 3px; border-radius: 3px; }
footer { color: var(--muted); font-size: 12px; margin-top: 40px; }
"""


def _e(x: Any) -> str:
    return escape("" if x is None else str(x), quote=True)


def _n(x: float) -> str:
    """SVG coordinate text (2 decimals, no '-0.00')."""
    s = f"{x:.2f}"
    return "0.00" if s == "-0.00" else s


def _short(text: Any, n: int) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= n else s[: n - 1] + "…"


def _svg(width: float, height: float, body: Iterable[str], label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {_n(width)} {_n(height)}" width="{_n(width)}" '
        f'height="{_n(height)}" role="img" aria-label="{_e(label)}">' + "".join(body) + "</svg>"
    )


def _colors(policies: Sequence[str]) -> dict[str, str]:
    return {p: _PALETTE[i % len(_PALETTE)] for i, p in enumerate(policies)}


def _legend(colors: Mapping[str, str]) -> str:
    items = "".join(f'<span><span class="sw" style="background:{c}"></span>{_e(p)}</span>' for p, c in colors.items())
    return f'<div class="legend">{items}</div>'


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _figure(name: str, inner: str, caption: str) -> str:
    return f'<figure class="plot" data-plot="{name}">{inner}<figcaption>{caption}</figcaption></figure>'


# ----------------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------------


def _spectrum_plot(report: Report, colors: Mapping[str, str]) -> str:
    order = [p for p in report.policies() if p in report.spectrum] + [p for p in report.spectrum if p not in report.policies()]
    if not order:
        return '<p class="empty" data-missing="spectrum">No eigenvalues of Q in this report.</p>'
    panels = []
    size, pad = 230.0, 26.0
    shown_all = True
    for p in order:
        eig = [z for z in report.spectrum[p] if _finite(z[0]) and _finite(z[1])]
        if len(eig) > _MAX_EIGENVALUES:  # keep the page light: the largest moduli matter for R
            eig = sorted(eig, key=lambda z: (-math.hypot(z[0], z[1]), z[0], z[1]))[:_MAX_EIGENVALUES]
            shown_all = False
        lim = max([1.15] + [1.05 * math.hypot(z[0], z[1]) for z in eig])
        scale = (size - 2 * pad) / (2 * lim)
        cx = cy = size / 2

        def X(x: float) -> float:
            return cx + x * scale

        def Y(y: float) -> float:
            return cy + 10 - y * scale

        body = [
            f'<text x="{_n(size / 2)}" y="14" text-anchor="middle" font-size="12.5" font-weight="600">{_e(_short(p, 30))}</text>',
            f'<line x1="{_n(X(-lim))}" y1="{_n(Y(0))}" x2="{_n(X(lim))}" y2="{_n(Y(0))}" stroke="#c3cad4" stroke-width="1"/>',
            f'<line x1="{_n(X(0))}" y1="{_n(Y(-lim))}" x2="{_n(X(0))}" y2="{_n(Y(lim))}" stroke="#c3cad4" stroke-width="1"/>',
            f'<circle class="unit-circle" cx="{_n(X(0))}" cy="{_n(Y(0))}" r="{_n(scale)}" fill="none" stroke="#5b6575" '
            'stroke-width="1.2" stroke-dasharray="4 3"><title>unit circle |λ| = 1</title></circle>',
        ]
        rho = report.bounds.get(p, {}).get("rho_Q")
        if _finite(rho) and 0 < rho < lim:
            body.append(
                f'<circle cx="{_n(X(0))}" cy="{_n(Y(0))}" r="{_n(rho * scale)}" fill="none" stroke="{colors.get(p, "#333")}" '
                f'stroke-width="0.8" stroke-opacity="0.6"><title>ρ(Q) = {format_number(rho)}</title></circle>'
            )
        for re_, im in eig:
            body.append(
                f'<circle class="eig" cx="{_n(X(re_))}" cy="{_n(Y(im))}" r="2.6" fill="{colors.get(p, "#333")}" fill-opacity="0.75">'
                f"<title>λ = {format_number(re_)} {'+' if im >= 0 else '−'} {format_number(abs(im))}i</title></circle>"
            )
        label = f"ρ(Q) = {format_number(rho)}" if rho is not None else f"{len(eig)} eigenvalues"
        body.append(f'<text x="{_n(size / 2)}" y="{_n(size + 4)}" text-anchor="middle" font-size="11.5">{_e(label)}</text>')
        panels.append(_svg(size, size + 10, body, f"spectrum of Q for {p}"))
    caption = (
        "Eigenvalues of Q = B∘B (the squared transition probabilities among tokens) per policy, against the unit "
        "circle (dashed). Su's repetition sum R is finite only when every eigenvalue lies strictly inside it; the "
        "thin circle is the spectral radius ρ(Q)."
        + ("" if shown_all else f" Only the {_MAX_EIGENVALUES} eigenvalues of largest modulus are drawn per policy.")
    )
    return _figure("spectrum", f'<div class="grid">{"".join(panels)}</div>', caption)


def _bar_panel(title: str, key: str, rows: Sequence[tuple[str, Any]], colors: Mapping[str, str]) -> str:
    width, label_w, row_h, top = 330.0, 150.0, 20.0, 24.0
    bar_w = width - label_w - 56
    finite = [float(v) for _, v in rows if _finite(v)]
    positive = [v for v in finite if v > 0]
    use_log = bool(positive) and min(finite, default=0) > 0 and max(positive) / min(positive) > 1000
    vmax = max(finite, default=1.0)
    vmin = min(finite, default=0.0)
    lo = min(0.0, vmin)

    def frac(v: float) -> float:
        if use_log:
            a, b = math.log10(min(positive)) - 0.3, math.log10(max(positive))
            return (math.log10(v) - a) / (b - a) if b > a else 1.0
        span = (vmax - lo) or 1.0
        return (v - lo) / span

    hid = "".join(ch if ch.isalnum() else "-" for ch in key)
    hib = higher_is_better(key)
    arrow = " (higher is better)" if hib is True else (" (lower is better)" if hib is False else "")
    body = [
        f'<text x="0" y="14" font-size="12.5" font-weight="600">{_e(title)}</text>'
        f'<text x="{_n(width)}" y="14" font-size="10.5" text-anchor="end" fill="#5b6575">{_e(("log scale" if use_log else "") + arrow)}</text>'
    ]
    for i, (p, v) in enumerate(rows):
        y = top + i * row_h
        body.append(f'<text x="{_n(label_w - 6)}" y="{_n(y + 13)}" font-size="11" text-anchor="end">{_e(_short(p, 24))}</text>')
        c = colors.get(p, "#333")
        if v is None or (isinstance(v, float) and math.isnan(v)):
            body.append(f'<text x="{_n(label_w + 2)}" y="{_n(y + 13)}" font-size="11" fill="#5b6575">n/a</text>')
            continue
        if isinstance(v, (int, float)) and math.isinf(v):
            body.append(
                f'<rect class="bar inf" x="{_n(label_w)}" y="{_n(y + 3)}" width="{_n(bar_w)}" height="{_n(row_h - 6)}" '
                f'fill="url(#hatch-{hid})" stroke="{c}"><title>{_e(p)}: {key} = inf (diverges)</title></rect>'
                f'<text x="{_n(label_w + bar_w + 4)}" y="{_n(y + 13)}" font-size="11" font-weight="600">∞</text>'
            )
            continue
        w = max(1.0, frac(float(v)) * bar_w)
        body.append(
            f'<rect class="bar" x="{_n(label_w)}" y="{_n(y + 3)}" width="{_n(w)}" height="{_n(row_h - 6)}" fill="{c}">'
            f"<title>{_e(p)}: {key} = {format_number(v)}</title></rect>"
            f'<text x="{_n(label_w + w + 4)}" y="{_n(y + 13)}" font-size="11">{_e(format_number(v))}</text>'
        )
    defs = (
        f'<defs><pattern id="hatch-{hid}" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">'
        '<rect width="6" height="6" fill="#fbe3e0"/><line x1="0" y1="0" x2="0" y2="6" stroke="#c0392b" stroke-width="2.2"/>'
        "</pattern></defs>"
    )
    return _svg(width, top + len(rows) * row_h + 6, [defs, *body], f"{key} per policy")


_BOUND_TITLES = {
    "su_R": "R: Su's repetition sum",
    "su_R_avg": "R / n",
    "rho_Q": "ρ(Q), spectral radius",
    "fu_arp": "Fu's ARP",
    "zeta_n": "ζn (row support size)",
    "occupation_lsr": "loop-start rate LSR_T",
    "greedy_cycle_occupancy": "greedy cycle occupancy",
    "mean_p_eos": "mean P(reach <eos>)",
    "greedy_loop_fraction": "greedy loop fraction",
    "row_collision_full": "row collision Σ p²",
}


def _bounds_plot(report: Report, colors: Mapping[str, str]) -> str:
    policies = [p for p in report.policies() if p in report.bounds]
    keys = [k for k in BOUND_KEYS if any(k in report.bounds[p] for p in policies)]
    if not policies or not keys:
        return '<p class="empty" data-missing="bounds">No bounds in this report.</p>'
    panels = [
        _bar_panel(_BOUND_TITLES.get(k, k), k, [(p, report.bounds[p].get(k)) for p in policies], colors)
        for k in keys
    ]
    caption = (
        "The repetition bounds of each policy's transition matrix (spec §12 keys). Hatched bars marked ∞ diverge: "
        "under that policy the chain can cycle forever (ρ(Q) = 1, typical of greedy decoding)."
    )
    return _figure("bounds", f'<div class="grid">{"".join(panels)}</div>', caption)


def _scatter_plot(report: Report, colors: Mapping[str, str]) -> str:
    metrics = [k for k in PRIMARY_METRICS if any(k in report.measured.get(p, {}) and k in report.predicted.get(p, {}) for p in report.policies())]
    metrics += [
        k for k in report.prediction.spearman
        if k not in metrics and any(k in report.measured.get(p, {}) and k in report.predicted.get(p, {}) for p in report.policies())
    ]
    if not metrics:
        return '<p class="empty" data-missing="scatter">No predicted and measured metric pairs in this report.</p>'
    panels = []
    size, left, bottom, top, right = 300.0, 46.0, 36.0, 30.0, 12.0
    for k in metrics:
        pts = []
        for p in report.policies():
            mv, pv = report.measured.get(p, {}).get(k), report.predicted.get(p, {}).get(k)
            if _finite(mv) and _finite(pv):
                pts.append((p, float(mv), float(pv), report.se("measured", p, k), report.se("predicted", p, k)))
        hi = max([v for _, m, pr, _, _ in pts for v in (m, pr)] + [1e-9]) * 1.1
        lo = min([v for _, m, pr, _, _ in pts for v in (m, pr)] + [0.0])
        span = (hi - lo) or 1.0
        pw, ph = size - left - right, size - top - bottom

        def X(v: float) -> float:
            return left + (v - lo) / span * pw

        def Y(v: float) -> float:
            return top + ph - (v - lo) / span * ph

        sp = report.prediction.spearman.get(k, {})
        title = f"{k}: Spearman ρ = {format_number(sp.get('rho'), 3)}" if sp else k
        sub = f"p = {format_number(sp.get('p'), 2)}, {format_number(sp.get('n_policies'))} policies" if sp else ""
        body = [
            f'<text x="{_n(size / 2)}" y="13" text-anchor="middle" font-size="12.5" font-weight="600">{_e(title)}</text>',
            f'<text x="{_n(size / 2)}" y="26" text-anchor="middle" font-size="10.5" fill="#5b6575">{_e(sub)}</text>',
            f'<rect x="{_n(left)}" y="{_n(top)}" width="{_n(pw)}" height="{_n(ph)}" fill="#fafbfc" stroke="#c3cad4"/>',
            f'<line class="diagonal" x1="{_n(X(lo))}" y1="{_n(Y(lo))}" x2="{_n(X(hi))}" y2="{_n(Y(hi))}" stroke="#8a94a3" '
            'stroke-dasharray="5 4"><title>predicted = measured</title></line>',
        ]
        for t in range(5):
            v = lo + span * t / 4
            body.append(f'<text x="{_n(X(v))}" y="{_n(top + ph + 13)}" font-size="9.5" text-anchor="middle">{_e(format_number(v, 2))}</text>')
            body.append(f'<text x="{_n(left - 4)}" y="{_n(Y(v) + 3)}" font-size="9.5" text-anchor="end">{_e(format_number(v, 2))}</text>')
        body.append(f'<text x="{_n(left + pw / 2)}" y="{_n(size - 4)}" font-size="11" text-anchor="middle">measured</text>')
        body.append(
            f'<text x="12" y="{_n(top + ph / 2)}" font-size="11" text-anchor="middle" transform="rotate(-90 12 {_n(top + ph / 2)})">predicted</text>'
        )
        for p, m, pr, mse, pse in pts:
            c = colors.get(p, "#333")
            if mse:
                body.append(f'<line x1="{_n(X(m - mse))}" y1="{_n(Y(pr))}" x2="{_n(X(m + mse))}" y2="{_n(Y(pr))}" stroke="{c}" stroke-width="1.2"/>')
            if pse:
                body.append(f'<line x1="{_n(X(m))}" y1="{_n(Y(pr - pse))}" x2="{_n(X(m))}" y2="{_n(Y(pr + pse))}" stroke="{c}" stroke-width="1.2"/>')
            body.append(
                f'<circle class="point" cx="{_n(X(m))}" cy="{_n(Y(pr))}" r="4.5" fill="{c}" stroke="#fff" stroke-width="1">'
                f"<title>{_e(p)}: measured {format_number(m)}, predicted {format_number(pr)}</title></circle>"
            )
        panels.append(_svg(size, size, body, f"predicted against measured {k}"))
    cal = report.prediction.calibration_error
    cal_txt = "; ".join(f"{k} {format_number(cal[k], 3)}" for k in metrics if k in cal)
    caption = (
        f"Predicted ({_e(report.prediction.predictor)}) against measured repetition, one point per policy, with ± one "
        "standard error; the dashed line is perfect calibration. The rank correlation across policies says whether the "
        "prediction orders the policies right" + (f"; mean absolute calibration error: {_e(cal_txt)}." if cal_txt else ".")
    )
    return _figure("scatter", f'<div class="grid">{"".join(panels)}</div>{_legend({p: colors[p] for p in report.policies() if p in colors})}', caption)


def _loop_map_plot(report: Report) -> str:
    lm = report.loop_map
    if not lm.cycles:
        return '<p class="empty" data-missing="loop-map">No greedy cycles in this report.</p>'
    cycles = sorted(lm.cycles, key=lambda c: (-c.basin_size, len(c.tokens)))[:10]
    total = lm.n_states or sum(c.basin_size for c in lm.cycles) or 1
    width, row_h, top = 940.0, 78.0, 52.0
    bar_x, bar_w = 470.0, 300.0
    body = []
    # overall fate bar
    lf = lm.loop_fraction
    if _finite(lf):
        body.append(f'<text x="0" y="14" font-size="12.5" font-weight="600">{_e(format_number(100 * lf, 3))} % of {_e(format_number(total))} states end in a loop under {_e(lm.policy)} decoding</text>')
        body.append(f'<rect x="0" y="22" width="{_n(bar_w + bar_x - 100)}" height="12" fill="#dfe7ef"/>')
        body.append(
            f'<rect class="loop-fraction" x="0" y="22" width="{_n(max(1.0, lf * (bar_w + bar_x - 100)))}" height="12" fill="#c0392b">'
            f"<title>loop fraction {format_number(lf)}</title></rect>"
        )
    else:
        body.append(f'<text x="0" y="14" font-size="12.5" font-weight="600">{len(lm.cycles)} cycle(s) under {_e(lm.policy)} decoding</text>')
    max_basin = max(c.basin_size for c in cycles) or 1
    for i, c in enumerate(cycles):
        y0 = top + i * row_h
        cx, cy, r = 40.0, y0 + row_h / 2, 24.0
        k = len(c.tokens)
        body.append(f'<circle cx="{_n(cx)}" cy="{_n(cy)}" r="{_n(r)}" fill="none" stroke="#b9c3cf" stroke-width="1.5"/>')
        if k == 1:
            body.append(
                f'<path d="M {_n(cx - 6)} {_n(cy - r - 4)} a 9 9 0 1 1 12 0" fill="none" stroke="#c0392b" stroke-width="1.6" marker-end="url(#arrow)"/>'
            )
        pts = [(cx + r * math.sin(2 * math.pi * j / k), cy - r * math.cos(2 * math.pi * j / k)) for j in range(k)]
        if k > 1:
            for j in range(k):
                (x1, y1), (x2, y2) = pts[j], pts[(j + 1) % k]
                mx, my = (x1 + x2) / 2, (y1 + y2) / 2
                # shorten the chord so the arrow head stops at the node
                dx, dy = x2 - x1, y2 - y1
                d = math.hypot(dx, dy) or 1.0
                body.append(
                    f'<line x1="{_n(x1 + dx / d * 5)}" y1="{_n(y1 + dy / d * 5)}" x2="{_n(x2 - dx / d * 6)}" y2="{_n(y2 - dy / d * 6)}" '
                    f'stroke="#c0392b" stroke-width="1.4" marker-end="url(#arrow)"/>'
                )
                del mx, my
        for j, (x, y) in enumerate(pts):
            body.append(
                f'<circle class="node" cx="{_n(x)}" cy="{_n(y)}" r="4.2" fill="#0072B2"><title>token {_e(c.tokens[j])}</title></circle>'
            )
        body.append(f'<text x="82" y="{_n(cy - 6)}" font-size="12.5" font-weight="600">“{_e(_short(c.text, 48))}”</text>')
        body.append(
            f'<text x="82" y="{_n(cy + 12)}" font-size="11" fill="#5b6575">cycle of {k} token{"s" if k != 1 else ""}: '
            f'{_e(_short(" ".join(str(t) for t in c.tokens), 50))}</text>'
        )
        w = max(1.0, c.basin_size / max_basin * bar_w)
        body.append(
            f'<rect class="basin" x="{_n(bar_x)}" y="{_n(cy - 9)}" width="{_n(w)}" height="18" fill="#E69F00">'
            f"<title>basin: {c.basin_size} states</title></rect>"
        )
        body.append(
            f'<text x="{_n(bar_x + w + 6)}" y="{_n(cy + 4)}" font-size="11">{c.basin_size} states '
            f"({_e(format_number(100 * c.basin_size / total, 3))} %)</text>"
        )
    defs = (
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="8" refY="5" markerWidth="6" markerHeight="6" orient="auto-start-reverse">'
        '<path d="M 0 0 L 10 5 L 0 10 z" fill="#c0392b"/></marker></defs>'
    )
    more = f" Showing the {len(cycles)} largest of {len(lm.cycles)}." if len(lm.cycles) > len(cycles) else ""
    svg = _svg(width, top + len(cycles) * row_h + 4, [defs, *body], "greedy loop map")
    caption = (
        f"The greedy functional graph: every state has one successor under {_e(lm.policy)} decoding, so every start ends "
        "either at &lt;eos&gt; or on a cycle. Rings are the cycles (arrows follow the tokens), orange bars the basins: "
        f"how many states fall into each cycle.{more}"
    )
    return _figure("loop-map", svg, caption)


def _attribution_plot(report: Report) -> str:
    at = report.attribution
    entries = at.entries() if at is not None else []
    if at is None or not entries:
        return '<p class="empty" data-missing="attribution">No attribution in this report (run with training records).</p>'
    pro = [e for e in entries if _finite(e.contribution) and e.contribution >= 0][:12]
    opp = [e for e in entries if not (_finite(e.contribution) and e.contribution >= 0)][-8:]
    top = pro + opp
    vals = [float(e.contribution) for e in top if _finite(e.contribution)]
    vmax = max([abs(v) for v in vals] + [1e-12])
    width, label_w, row_h, top_y = 960.0, 560.0, 26.0, 10.0
    mid = label_w + (width - label_w) / 2
    half = (width - label_w) / 2 - 50
    body = [f'<line x1="{_n(mid)}" y1="{_n(top_y - 4)}" x2="{_n(mid)}" y2="{_n(top_y + len(top) * row_h)}" stroke="#5b6575"/>']
    for i, e in enumerate(top):
        y = top_y + i * row_h
        pid = e.ident()
        label = e.label()
        body.append(
            f'<text x="0" y="{_n(y + 16)}" font-size="11.5"><tspan font-weight="600">#{_e(pid)}</tspan> '
            f"{_e(_short(label, 86))}<title>{_e(label)}</title></text>"
        )
        v = float(e.contribution) if _finite(e.contribution) else 0.0
        w = max(1.0, abs(v) / vmax * half)
        x = mid if v >= 0 else mid - w
        color = "#c0392b" if v >= 0 else "#1e8449"
        body.append(
            f'<rect class="contribution" x="{_n(x)}" y="{_n(y + 5)}" width="{_n(w)}" height="{_n(row_h - 10)}" fill="{color}">'
            f"<title>pair {_e(pid)}: contribution {format_number(v)}</title></rect>"
        )
        tx = x + w + 4 if v >= 0 else x - 4
        anchor = "start" if v >= 0 else "end"
        body.append(f'<text x="{_n(tx)}" y="{_n(y + 16)}" font-size="10.5" text-anchor="{anchor}">{_e(format_number(v))}</text>')
    svg = _svg(width, top_y + len(top) * row_h + 6, body, "attribution to training pairs")
    q = at.query.get("text", at.query) if isinstance(at.query, Mapping) else at.query
    caption = (
        f"Training pairs that pushed the model towards the loop “{_e(_short(q, 80))}” ({_e(at.mode)} mode): red bars "
        f"(proponents) raised it, green bars (opponents) lowered it. Δm = {_e(format_number(at.delta_m))}, completeness "
        f"residual |Δm − Σ contributions| = {_e(format_number(at.completeness_residual))}."
        + (" In final mode this is a similarity, not a decomposition." if at.mode == "final" else "")
    )
    return _figure("attribution", svg, caption)


# ----------------------------------------------------------------------------------------------------
# tables and page
# ----------------------------------------------------------------------------------------------------


def _arrow(key: str) -> str:
    hib = higher_is_better(key)
    return " ↑" if hib is True else (" ↓" if hib is False else "")


def _table(report: Report, table: Mapping[str, Mapping[str, Any]], keys: Sequence[str], *, se_section: str | None = None) -> str:
    policies = [p for p in report.policies() if p in table]
    keys = [k for k in keys if any(k in table[p] for p in policies)]
    if not policies or not keys:
        return ""
    head = '<tr><th class="l">policy</th>' + "".join(f"<th>{_e(k + _arrow(k))}</th>" for k in keys) + "</tr>"
    rows = []
    for p in policies:
        cells = []
        for k in keys:
            if k not in table[p]:
                cells.append("<td>—</td>")
                continue
            txt = format_number(table[p][k])
            se = report.se(se_section, p, k) if se_section else None
            if se is not None:
                txt += f" ± {format_number(se, 2)}"
            if se_section == "measured" and k in report.predicted.get(p, {}):
                txt += f" <small>({_e(format_number(report.predicted[p][k]))})</small>"
                cells.append(f"<td>{txt}</td>")
            else:
                cells.append(f"<td>{_e(txt)}</td>")
        rows.append(f'<tr><td class="l"><code>{_e(p)}</code></td>' + "".join(cells) + "</tr>")
    return f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def _kv_table(pairs: Sequence[tuple[str, Any]]) -> str:
    rows = "".join(f'<tr><th class="l">{_e(k)}</th><td class="text">{_e(v if isinstance(v, str) else format_number(v) if v is None or isinstance(v, (int, float)) else v)}</td></tr>' for k, v in pairs)
    return f"<table>{rows}</table>"


def render_html(report: Report) -> str:
    """The report as one self-contained HTML page (inline CSS and SVG; no script, no network)."""
    m, s, pr, mx, env = report.model, report.settings, report.prompts, report.matrix, report.environment
    policies = report.policies()
    colors = _colors(policies + [p for p in report.spectrum if p not in policies])
    parts: list[str] = []
    parts.append(f"<h1>repdiag report: {_e(m.id)}</h1>")
    kind = ", ".join(x for x in (m.kind, m.architecture) if x)
    parts.append(
        f'<p class="sub">{_e(kind)} · {_e(_int_human(m.n_parameters))} parameters · vocabulary {_e(format_number(m.vocab_size))} · '
        f"{_e(m.device)} {_e(m.dtype)} · seed {_e(format_number(s.seed))} · {_e(format_number(s.max_new_tokens))} new tokens · "
        f"{_e(format_number(pr.n_trace))} trace / {_e(format_number(pr.n_measure))} measurement prompts</p>"
    )
    for note in report.notes:
        parts.append(f'<p class="note">{_e(note)}</p>')

    parts.append("<h2>Predicted against measured repetition</h2>")
    parts.append(_scatter_plot(report, colors))
    t = _table(report, report.measured, PRIMARY_METRICS, se_section="measured")
    if t:
        parts.append("<p>Measured ± standard error (predicted) per policy:</p>" + t)
    if report.prediction.spearman:
        rows = "".join(
            f'<tr><td class="l"><code>{_e(k)}</code></td><td>{_e(format_number(v.get("rho"), 3))}</td><td>{_e(format_number(v.get("p"), 2))}</td>'
            f'<td>{_e(format_number(v.get("n_policies")))}</td><td>{_e(format_number(report.prediction.calibration_error.get(k), 3))}</td></tr>'
            for k, v in ((k, report.prediction.spearman[k]) for k in _metric_order(report.prediction.spearman))
        )
        parts.append(
            '<table><thead><tr><th class="l">metric</th><th>Spearman ρ</th><th>p</th><th>policies</th><th>calibration error</th></tr></thead>'
            f"<tbody>{rows}</tbody></table>"
        )
    cf = closed_form_rows(report.prediction.closed_form)
    if cf:
        rows = "".join(
            f'<tr><td class="l">{_e(path)}</td><td>{_e(format_number(r, 3))}</td><td>{_e(format_number(pv, 2))}</td><td>{_e(format_number(n))}</td></tr>'
            for path, r, pv, n in cf
        )
        parts.append(
            "<details><summary>Closed-form explanations (spec §7): rank correlation with the measurement, per family</summary>"
            '<table><thead><tr><th class="l">quantity / family</th><th>Spearman ρ</th><th>p</th><th>policies</th></tr></thead>'
            f"<tbody>{rows}</tbody></table></details>"
        )
    t = _table(report, report.measured, SECONDARY_METRICS)
    if t:
        parts.append("<p>More measured metrics:</p>" + t)

    parts.append("<h2>Repetition bounds per policy</h2>")
    parts.append(_bounds_plot(report, colors))
    parts.append(_table(report, report.bounds, BOUND_KEYS))

    parts.append("<h2>Spectrum of Q</h2>")
    parts.append(_spectrum_plot(report, colors))

    parts.append("<h2>Greedy loop map</h2>")
    parts.append(_loop_map_plot(report))

    parts.append("<h2>Attribution to training pairs</h2>")
    parts.append(_attribution_plot(report))

    qt = _table(report, report.quality, QUALITY_KEYS)
    if qt:
        parts.append("<h2>Quality price</h2>" + qt)

    if report.examples:
        rows = "".join(
            f'<tr><td class="l"><code>{_e(e.policy)}</code></td><td class="text">{_e(e.prompt)}</td><td class="text">{_e(e.output)}</td></tr>'
            for e in report.examples
        )
        parts.append(
            '<h2>Examples</h2><table><thead><tr><th class="l">policy</th><th class="l">prompt</th><th class="l">output</th></tr></thead>'
            f"<tbody>{rows}</tbody></table>"
        )

    parts.append("<h2>Provenance</h2>")
    parts.append(
        _kv_table(
            [
                ("model", f"{m.id} @ {m.revision}"),
                ("tokenizer fingerprint", m.tokenizer_fingerprint),
                ("matrix", f"{mx.builder}, order {format_number(mx.order)}, {format_number(mx.n_states)} states, "
                           f"coverage {format_number(mx.coverage_rows)} rows / {format_number(mx.coverage_mass)} mass"),
                ("prompts", f"{pr.source}; split: {pr.split_rule}"),
                ("mitigations", ", ".join(s.mitigations)),
                ("environment", f"python {env.python}, torch {env.torch}, transformers {env.transformers}, numpy {env.numpy}, "
                                f"{env.platform}, {format_number(env.threads)} thread(s)"),
            ]
        )
    )
    parts.append(f"<footer>repdiag {_e(report.tool.version)} · report schema {_e(report.schema_version)}</footer>")
    title = f"repdiag report: {m.id}"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )
