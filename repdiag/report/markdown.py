"""Markdown renderings: the summary a reviewer reads (GitHub-flavoured), and the compare table.

Deterministic text (no dates). ``append_step_summary`` appends to ``$GITHUB_STEP_SUMMARY`` trimmed
below GitHub's 1 MiB per-step limit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .compare import CompareResult
from .model import Report, format_number, higher_is_better

__all__ = [
    "render_markdown",
    "render_compare_markdown",
    "append_step_summary",
    "trim_markdown",
    "STEP_SUMMARY_LIMIT",
    "PRIMARY_METRICS",
    "BOUND_KEYS",
]

#: GitHub aborts a job summary above 1 MiB per step; stay clearly below it
STEP_SUMMARY_LIMIT = 1024 * 1024 - 4096

#: the metrics predicted and measured side by side (issue 6)
PRIMARY_METRICS = ("rep_w16", "rep_r", "seq_rep_4")
#: further measured metrics shown when present
SECONDARY_METRICS = (
    "seq_rep_1", "seq_rep_pooled_1_4", "rep_sen", "simctg_rep_2", "simctg_rep_4", "simctg_diversity",
    "uniq_seq", "loop_onset", "length", "nonterminated",
)
#: bounds shown in the summary (all of them are in report.json)
BOUND_KEYS = (
    "rho_Q", "su_R", "su_R_avg", "fu_arp", "zeta_n", "occupation_lsr", "greedy_cycle_occupancy",
    "mean_p_eos", "greedy_loop_fraction", "row_collision_full",
)
QUALITY_KEYS = ("mean_logprob", "chrf", "bleu")


def _esc(text: Any) -> str:
    """Escape text for a Markdown table cell (one line, pipes escaped)."""
    s = " ".join(str(text).split())
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return s.replace("\\", "\\\\").replace("|", "\\|").replace("`", "&#96;")


def _code(text: Any) -> str:
    """An identifier as a code span (backticks and pipes made safe)."""
    s = " ".join(str(text).split()).replace("`", "'").replace("|", "\\|")
    return f"`{s}`"


def _quote(text: Any) -> str:
    """User text (model output, training pairs) as an escaped quotation."""
    s = _esc(text)
    return f"“{s}”" if s else "—"


def _arrow(key: str) -> str:
    hib = higher_is_better(key)
    return " ↑" if hib is True else (" ↓" if hib is False else "")


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str | None = None) -> list[str]:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|" if align is None else align)
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _present(tables: Iterable[Mapping[str, Mapping[str, Any]]], keys: Sequence[str]) -> list[str]:
    have = {k for t in tables for row in t.values() for k in row}
    return [k for k in keys if k in have]


def _positive(e: Any) -> bool:
    c = e.contribution
    return isinstance(c, (int, float)) and c >= 0


def _policy_table(section: Mapping[str, Mapping[str, Any]], keys: Sequence[str], policies: Sequence[str]) -> list[str]:
    """One row per policy present in ``section``, one column per key (with its better-direction arrow)."""
    rows = [[_code(p)] + [format_number(section[p].get(k)) if k in section[p] else "—" for k in keys]
            for p in policies if p in section]
    return _table(["policy"] + [f"{k}{_arrow(k)}" for k in keys], rows)


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{100 * float(x):.1f} %"


def _int_human(n: Any) -> str:
    if n is None:
        return "n/a"
    n = int(n)
    if n >= 1_000_000:
        return f"{n / 1e6:.2f} M"
    if n >= 10_000:
        return f"{n / 1e3:.1f} k"
    return str(n)


def closed_form_rows(closed_form: Mapping[str, Any], min_policies: int = 3) -> list[tuple[str, Any, Any, Any]]:
    """Flatten ``prediction.closed_form`` to (path, rho, p, n_policies) rows, skipping tiny families.

    Any nesting works (e.g. quantity → family → {rho, p, n_policies}); the path joins the keys with " / ".
    """
    rows: list[tuple[str, Any, Any, Any]] = []

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, Mapping) and "rho" in node:
            n = node.get("n_policies")
            if node.get("rho") is not None and (not isinstance(n, int) or n >= min_policies):
                rows.append((" / ".join(path), node.get("rho"), node.get("p"), n))
            return
        if isinstance(node, Mapping):
            for k in sorted(node):
                walk(node[k], (*path, str(k)))

    walk(closed_form, ())
    return rows


def _metric_order(keys: Iterable[str]) -> list[str]:
    keys = list(keys)
    return [k for k in PRIMARY_METRICS if k in keys] + sorted(k for k in keys if k not in PRIMARY_METRICS)


def render_markdown(report: Report, *, max_examples: int = 6, max_cycles: int = 8, max_pairs: int = 10) -> str:
    """The reviewer's summary of one report (GitHub-flavoured Markdown)."""
    m, s, pr, mx = report.model, report.settings, report.prompts, report.matrix
    policies = report.policies()
    out: list[str] = []
    kind = ", ".join(x for x in (m.kind, m.architecture) if x)
    out.append(f"## repdiag report: {_code(m.id)}" + (f" ({_esc(kind)})" if kind else ""))
    out.append("")
    facts = [
        f"model {_code(m.id)}" + (f" @ {_code(m.revision)}" if m.revision else ""),
        f"{_int_human(m.n_parameters)} parameters",
        f"vocabulary {format_number(m.vocab_size)}",
        f"{_esc(m.device)} {_esc(m.dtype)}",
        f"seed {format_number(s.seed)}",
        f"{format_number(s.max_new_tokens)} new tokens",
        f"{format_number(pr.n_trace)} trace / {format_number(pr.n_measure)} measurement prompts",
    ]
    out.append(" · ".join(facts))
    out.append("")
    matrix_bits = [f"builder {_code(mx.builder)}", f"order {format_number(mx.order)}", f"{format_number(mx.n_states)} states"]
    if mx.top_k is not None:
        matrix_bits.append(f"top-{mx.top_k} rows")
    matrix_bits.append(f"coverage {_pct(mx.coverage_rows)} of rows, {_pct(mx.coverage_mass)} of mass")
    reached = mx.extra.get("reached_rows")
    if isinstance(reached, dict) and reached.get("probed") is not None:
        matrix_bits.append(f"{format_number(reached['probed'])} unvisited rows probed as the simulation reached them "
                           f"(at {format_number(reached.get('fills'))} steps)")
    out.append("Transition matrix: " + ", ".join(matrix_bits) + ".")
    if pr.split_rule:
        out.append(f"Prompt split: {_esc(pr.split_rule)} (source: {_esc(pr.source)}).")
    out.append("")
    for note in report.notes:
        out.append(f"> **Note.** {_esc(note)}")
        out.append("")

    # ---- predicted vs measured -------------------------------------------------------------------
    prim = _present([report.measured, report.predicted], PRIMARY_METRICS)
    if policies and prim:
        out.append("### Repetition per policy: measured ± stderr (predicted)")
        out.append("")
        header = ["policy"] + [f"{k}{_arrow(k)}" for k in prim]
        rows = []
        for p in policies:
            row = [_code(p)]
            for k in prim:
                mv = report.measured.get(p, {}).get(k)
                cell = format_number(mv) if k in report.measured.get(p, {}) else "—"
                se = report.se("measured", p, k)
                if se is not None and mv is not None:
                    cell += f" ± {format_number(se, 2)}"
                if k in report.predicted.get(p, {}):
                    cell += f" ({format_number(report.predicted[p][k])})"
                row.append(cell)
            if any(cell != "—" for cell in row[1:]):
                rows.append(row)
        out += _table(header, rows)
        out.append("")
    pred = report.prediction
    if pred.spearman:
        out.append(
            f"Predictor **{_esc(pred.predictor)}**: Spearman rank correlation of predicted against measured "
            f"repetition across policies, and the mean absolute calibration error."
        )
        out.append("")
        rows = []
        for k in _metric_order(pred.spearman):
            sp = pred.spearman[k]
            rows.append([
                _code(k), format_number(sp.get("rho"), 3), format_number(sp.get("p"), 2),
                format_number(sp.get("n_policies")), format_number(pred.calibration_error.get(k), 3),
            ])
        out += _table(["metric", "Spearman ρ", "p", "policies", "calibration error"], rows)
        out.append("")
    cf = closed_form_rows(pred.closed_form)
    if cf:
        out.append(
            "<details><summary>Closed-form explanations (spec §7): rank correlation with the measurement, per family</summary>"
        )
        out.append("")
        out += _table(["quantity / family", "Spearman ρ", "p", "policies"],
                      [[_esc(path), format_number(r, 3), format_number(pv, 2), format_number(n)] for path, r, pv, n in cf])
        out.append("")
        out.append("</details>")
        out.append("")

    # ---- other measured metrics ------------------------------------------------------------------
    sec = _present([report.measured], SECONDARY_METRICS)
    if policies and sec:
        out.append("### More measured metrics")
        out.append("")
        out += _policy_table(report.measured, sec, policies)
        out.append("")

    # ---- bounds ----------------------------------------------------------------------------------
    bk = _present([report.bounds], BOUND_KEYS)
    if report.bounds and bk:
        out.append("### Repetition bounds of the policy matrices")
        out.append("")
        out += _policy_table(report.bounds, bk, policies)
        out.append("")
        out.append("`inf`: the expected repetition sum diverges (ρ(Q) = 1): decoding can loop forever.")
        out.append("")

    # ---- quality ---------------------------------------------------------------------------------
    qk = _present([report.quality], QUALITY_KEYS)
    if report.quality and qk:
        out.append("### Quality price")
        out.append("")
        out += _policy_table(report.quality, qk, policies)
        out.append("")

    # ---- loop map --------------------------------------------------------------------------------
    lm = report.loop_map
    if lm.cycles or lm.loop_fraction is not None:
        out.append(f"### Loop map ({_esc(lm.policy)})")
        out.append("")
        out.append(
            f"{_pct(lm.loop_fraction)} of the states end in a loop under {_esc(lm.policy)} decoding; "
            f"{len(lm.cycles)} cycle(s)."
        )
        out.append("")
        if lm.cycles:
            cycles = sorted(lm.cycles, key=lambda c: -c.basin_size)[:max_cycles]
            rows = [[str(i + 1), _quote(c.text), str(len(c.tokens)), str(c.basin_size)] for i, c in enumerate(cycles)]
            out += _table(["#", "cycle", "length", "basin"], rows, align="|---:|:---|---:|---:|")
            if len(lm.cycles) > max_cycles:
                out.append("")
                out.append(f"… and {len(lm.cycles) - max_cycles} more in report.json.")
            out.append("")

    # ---- attribution -----------------------------------------------------------------------------
    at = report.attribution
    if at is not None:
        out.append(f"### Attribution ({_esc(at.mode)} mode)")
        out.append("")
        q = at.query.get("text", at.query) if isinstance(at.query, Mapping) else at.query
        out.append(
            f"Query: {_quote(q)} · Δm = {format_number(at.delta_m)} · completeness residual "
            f"{format_number(at.completeness_residual)}"
        )
        out.append("")
        entries = at.entries()
        if entries:
            pro = [e for e in entries if _positive(e)][:max_pairs]
            opp = [e for e in entries if not _positive(e)][-max_pairs:]
            rows = [[_esc(e.ident()), format_number(e.contribution), _esc(e.label())] for e in pro + opp]
            out += _table(["pair", "contribution", "training pair (source → target)"], rows, align="|:---|---:|:---|")
            out.append("")

    # ---- examples --------------------------------------------------------------------------------
    if report.examples:
        out.append("<details><summary>Examples</summary>")
        out.append("")
        rows = [[_code(e.policy), _esc(e.prompt), _esc(e.output)] for e in report.examples[:max_examples]]
        out += _table(["policy", "prompt", "output"], rows, align="|:---|:---|:---|")
        out.append("")
        out.append("</details>")
        out.append("")
    env = report.environment
    out.append(
        f"<sub>repdiag {_esc(report.tool.version)} · schema {_esc(report.schema_version)} · python {_esc(env.python)} · "
        f"torch {_esc(env.torch)} · transformers {_esc(env.transformers)} · {format_number(env.threads)} thread(s)</sub>"
    )
    return "\n".join(out).rstrip() + "\n"


def render_compare_markdown(result: CompareResult, *, title: str = "repdiag compare") -> str:
    """One table per policy: ``metric | baseline | current | Δ | tolerance | status``."""
    n = len(result.regressions)
    head = "✅ no regression" if n == 0 else f"❌ {n} regression{'s' if n != 1 else ''}"
    out = [f"## {title}: {head}", ""]
    if result.baseline_model or result.current_model:
        out.append(f"baseline model {_code(result.baseline_model)} · current model {_code(result.current_model)}")
        out.append("")
    if result.gates:
        out.append("Gates: " + ", ".join(_code(g) for g in result.gates))
        out.append("")
    for w in result.warnings:
        out.append(f"> ⚠️ {_esc(w)}")
        out.append("")
    if not result.checks:
        out.append("No metric in common to compare.")
        return "\n".join(out).rstrip() + "\n"
    groups: dict[str, list] = {}
    for c in result.checks:
        groups.setdefault(c.policy, []).append(c)
    for policy, checks in groups.items():
        out.append(f"### {_code(policy)}")
        out.append("")
        rows = []
        for c in checks:
            name = c.key if c.section == "measured" else f"{c.section}.{c.key}"
            b = format_number(c.baseline) + (f" ± {format_number(c.baseline_se, 2)}" if c.baseline_se is not None else "")
            cur = format_number(c.current) + (f" ± {format_number(c.current_se, 2)}" if c.current_se is not None else "")
            d = "n/a" if c.delta is None else (format_number(c.delta) if c.delta <= 0 else "+" + format_number(c.delta))
            tol = "—" if c.tolerance is None else f"{format_number(c.tolerance)} ({_esc(c.tolerance_text)})"
            status = {"pass": "✅ pass", "fail": "❌ **fail**", "info": "·"}[c.status]
            rows.append([f"{_code(name)}{_arrow(c.key)}", b, cur, d, tol, status])
        out += _table(["metric", "baseline", "current", "Δ", "tolerance", "status"], rows, align="|:---|---:|---:|---:|---:|:---|")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def trim_markdown(text: str, limit: int = STEP_SUMMARY_LIMIT) -> str:
    """Cut ``text`` at a line boundary so that its UTF-8 size stays below ``limit`` bytes."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    tail = "\n\n_… truncated to stay below GitHub's 1 MiB summary limit; see the report artifact._\n"
    budget = limit - len(tail.encode("utf-8"))
    cut = data[:budget].decode("utf-8", errors="ignore")
    if "\n" in cut:
        cut = cut[: cut.rfind("\n")]
    return cut + tail


def append_step_summary(text: str, *, env: Mapping[str, str] | None = None) -> Path | None:
    """Append ``text`` (trimmed below 1 MiB) to ``$GITHUB_STEP_SUMMARY`` when it is set."""
    env = os.environ if env is None else env
    target = env.get("GITHUB_STEP_SUMMARY")
    if not target:
        return None
    path = Path(target)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(trim_markdown(text) + "\n")
    return path
