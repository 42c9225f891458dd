"""Compare a current report with a baseline report: the CI gate.

``compare(baseline, current, fail_on=["rep_w16:+0.02", "su_R:+10%", "greedy.rep_r:0.05"])`` returns a
:class:`CompareResult`; its ``regressions`` decide the exit code (1 when any). A gate names

- ``KEY``: a metric key of spec §9.7 (in ``measured``), else a bound key (``bounds``), else a quality
  key (``quality``), checked for **every** policy the baseline has it for;
- ``POLICY.KEY``: one policy (the policy is everything before the last dot, so spec strings such as
  ``temperature=0.7`` work);
- an optional section prefix: ``predicted.rep_w16``, ``bounds.greedy.su_R``.

``rep_w`` stands for the report's single ``rep_w{w}`` key. The tolerance is absolute (``+0.02``) or
relative to the baseline (``+10%``) and is the allowed change in the *worse* direction of the metric
(:func:`repdiag.report.model.higher_is_better`); the sign is then only documentation. For a key with
no direction a sign picks the direction (``+``: may not rise more; ``-``: may not fall more), no sign
checks both. With ``z`` set, a change also needs to exceed ``z · sqrt(se_b² + se_c²)`` (noise-aware).

Neither file is modified. Bad input (unreadable file, other schema major, missing gated metric,
different model with ``same_model``) raises :class:`~repdiag.errors.BadInputError`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..errors import BadInputError, UsageError
from .model import NUMBER_SECTIONS, Report, format_number, higher_is_better, load_report

__all__ = ["Tolerance", "Gate", "Check", "CompareResult", "parse_fail_on", "compare", "render_compare_table", "DEFAULT_KEYS"]

#: sections searched for a bare KEY, in order
_SEARCH_ORDER = ("measured", "bounds", "quality")

#: metrics shown in a compare without ``--fail-on`` (informational rows, never failing)
DEFAULT_KEYS = ("rep_w16", "rep_r", "seq_rep_4", "seq_rep_pooled_1_4", "rep_sen", "nonterminated", "su_R_avg", "rho_Q")


@dataclass(frozen=True)
class Tolerance:
    """``value`` absolute, or a fraction of ``|baseline|`` when ``relative``; ``sign`` is +1, -1 or 0."""

    value: float
    relative: bool
    sign: int
    text: str

    def absolute(self, baseline: float) -> float:
        if self.relative:
            return self.value * abs(baseline) if math.isfinite(baseline) else math.inf
        return self.value


@dataclass(frozen=True)
class Gate:
    """One ``--fail-on`` item: which metric (section/policy/key) and its tolerance."""

    text: str
    key: str
    policy: str | None
    section: str | None
    tolerance: Tolerance


@dataclass(frozen=True)
class Check:
    """One compared number: ``status`` is ``"pass"``, ``"fail"`` or ``"info"`` (no tolerance given)."""

    section: str
    policy: str
    key: str
    baseline: float | None
    current: float | None
    delta: float | None
    tolerance: float | None
    tolerance_text: str | None
    higher_is_better: bool | None
    status: str
    message: str
    baseline_se: float | None = None
    current_se: float | None = None

    @property
    def metric(self) -> str:
        return f"{self.policy}.{self.key}" if self.section == "measured" else f"{self.section}.{self.policy}.{self.key}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "policy": self.policy,
            "key": self.key,
            "baseline": self.baseline,
            "current": self.current,
            "delta": self.delta,
            "tolerance": self.tolerance,
            "tolerance_text": self.tolerance_text,
            "higher_is_better": self.higher_is_better,
            "status": self.status,
            "message": self.message,
            "baseline_se": self.baseline_se,
            "current_se": self.current_se,
        }


@dataclass(frozen=True)
class CompareResult:
    checks: tuple[Check, ...]
    warnings: tuple[str, ...] = ()
    baseline_model: str | None = None
    current_model: str | None = None
    gates: tuple[str, ...] = field(default_factory=tuple)

    @property
    def regressions(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.status == "fail")

    @property
    def ok(self) -> bool:
        return not self.regressions

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "n_checks": len(self.checks),
            "n_regressions": len(self.regressions),
            "gates": list(self.gates),
            "baseline_model": self.baseline_model,
            "current_model": self.current_model,
            "warnings": list(self.warnings),
            "checks": [c.to_dict() for c in self.checks],
        }


# --------------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------------

_TOL = re.compile(r"^(?P<sign>[+-]?)(?P<num>(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?)(?P<pct>%?)$")


def _parse_tolerance(text: str, item: str) -> Tolerance:
    m = _TOL.match(text.strip())
    if not m:
        raise UsageError(
            f"--fail-on {item!r}: tolerance {text!r} is not a number; write METRIC:+0.02 (absolute) or METRIC:+10% (relative)"
        )
    value = float(m["num"])
    relative = bool(m["pct"])
    if relative:
        value /= 100.0
    sign = {"+": 1, "-": -1, "": 0}[m["sign"]]
    return Tolerance(value=value, relative=relative, sign=sign, text=text.strip())


def parse_fail_on(items: Iterable[str]) -> list[Gate]:
    """Parse ``METRIC:TOL`` items (syntax errors are ``UsageError``, exit 2)."""
    gates = []
    for item in items:
        if ":" not in item:
            raise UsageError(f"--fail-on {item!r} has no tolerance: write METRIC:TOL, e.g. rep_w16:+0.02 or su_R:+10%")
        metric, tol = item.rsplit(":", 1)
        metric = metric.strip()
        if not metric:
            raise UsageError(f"--fail-on {item!r} names no metric: write METRIC:TOL, e.g. rep_w16:+0.02")
        tolerance = _parse_tolerance(tol, item)
        section = None
        head, _, rest = metric.partition(".")
        if head in NUMBER_SECTIONS and rest:
            section, metric = head, rest
        policy, key = (metric.rsplit(".", 1) if "." in metric else (None, metric))
        gates.append(Gate(text=item, key=key, policy=policy, section=section, tolerance=tolerance))
    return gates


# --------------------------------------------------------------------------------------------------
# comparison
# --------------------------------------------------------------------------------------------------


def _as_report(obj: Report | str | Path, what: str) -> Report:
    if isinstance(obj, Report):
        return obj
    return load_report(obj, what=what)


def _resolve_key(report: Report, section: str, key: str) -> str:
    """``rep_w`` → the report's single ``rep_w{w}`` key."""
    table = report.section(section)
    if key == "rep_w" and not any("rep_w" in row for row in table.values()):
        found = sorted({k for row in table.values() for k in row if re.fullmatch(r"rep_w\d+", k)})
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise BadInputError(f"--fail-on rep_w is ambiguous: the report has {', '.join(found)}; name one")
    return key


def _locate(gate: Gate, baseline: Report) -> tuple[str, str, list[str]]:
    """(section, key, policies) a gate applies to, from the baseline; BadInputError when absent."""
    sections = (gate.section,) if gate.section else _SEARCH_ORDER
    for section in sections:
        table = baseline.section(section)
        key = _resolve_key(baseline, section, gate.key)
        if gate.policy is not None:
            if gate.policy in table and key in table[gate.policy]:
                return section, key, [gate.policy]
            continue
        policies = [p for p in _ordered(baseline, table) if key in table[p]]
        if policies:
            return section, key, policies
    where = f"policy {gate.policy!r}" if gate.policy else "any policy"
    known = sorted({k for s in sections for row in baseline.section(s).values() for k in row})
    hint = f"known keys: {', '.join(known[:12])}{' ...' if len(known) > 12 else ''}" if known else "the report has no metrics"
    raise BadInputError(
        f"--fail-on {gate.text!r}: metric {gate.key!r} is not in the baseline for {where} "
        f"(searched {', '.join(sections)}); {hint}"
    )


def _ordered(report: Report, table: Mapping[str, Any]) -> list[str]:
    order = [p for p in report.policies() if p in table]
    return order + [p for p in table if p not in order]


def _num(v: Any) -> float | None:
    if v is None:
        return None
    return float(v)


def _judge(
    section: str,
    policy: str,
    key: str,
    b: float | None,
    c: float | None,
    tol: Tolerance | None,
    *,
    b_se: float | None,
    c_se: float | None,
    z: float | None,
) -> Check:
    hib = higher_is_better(key)
    delta = None if b is None or c is None else (c - b if not (math.isinf(b) and math.isinf(c) and b == c) else 0.0)
    if tol is None:
        msg = f"{key} {_f(b)} → {_f(c)}"
        return Check(section, policy, key, b, c, delta, None, None, hib, "info", msg, b_se, c_se)
    allowed = tol.absolute(b) if b is not None else 0.0
    if z is not None and b_se is not None and c_se is not None:
        allowed = max(allowed, z * math.sqrt(b_se**2 + c_se**2))
    # worse-direction change: positive means worse
    if hib is True:
        dirs = [-1]
    elif hib is False:
        dirs = [1]
    else:
        dirs = [tol.sign] if tol.sign else [1, -1]
    if b is None or c is None:
        status, worse = "fail", math.nan
        msg = f"{key} is undefined ({_f(b)} → {_f(c)})"
    elif math.isnan(b) or math.isnan(c):
        status, worse = "fail", math.nan
        msg = f"{key} is not a number ({_f(b)} → {_f(c)})"
    else:
        worse = max(_worse(b, c, d) for d in dirs)
        status = "fail" if worse > allowed else "pass"
        verb = "rose" if c > b else ("fell" if c < b else "unchanged")
        rel = f" ({tol.text} of {_f(b)})" if tol.relative else ""
        cmp = ">" if status == "fail" else "≤"
        msg = f"{key} {verb} {_f(b)} → {_f(c)} ({_signed(delta)} {cmp} tol {_f(allowed)}{rel})"
    return Check(section, policy, key, b, c, delta, allowed, tol.text, hib, status, msg, b_se, c_se)


def _worse(b: float, c: float, direction: int) -> float:
    """How much worse ``c`` is than ``b`` when the bad direction is ``direction`` (+1 up, -1 down)."""
    if b == c:
        return 0.0
    return (c - b) * direction


def _f(x: float | None) -> str:
    return format_number(x)


def _signed(x: float | None) -> str:
    if x is None:
        return "n/a"
    s = _f(x)
    return s if s.startswith("-") or s in ("nan", "0", "n/a") else f"+{s}"


def compare(
    baseline: Report | str | Path,
    current: Report | str | Path,
    fail_on: Sequence[str] = (),
    same_model: bool = False,
    *,
    z: float | None = None,
    policy_map: Mapping[str, str] | None = None,
) -> CompareResult:
    """Compare ``current`` against ``baseline`` (Reports or paths to report.json files; read only).

    With ``fail_on`` empty, the common :data:`DEFAULT_KEYS` are listed as informational checks and
    nothing fails. ``policy_map`` pairs a baseline policy with a differently named current one
    (``{"top_p_0.9": "temperature_1.3"}``: "did switching the production setting make it worse?").
    Raises ``BadInputError`` for unreadable reports, another schema major version, a
    gated metric absent from either report, or a different model when ``same_model`` is set.
    """
    b = _as_report(baseline, "baseline")
    c = _as_report(current, "current report")
    if b.schema_major != c.schema_major:
        raise BadInputError(
            f"schema versions differ (baseline {b.schema_version}, current {c.schema_version}): "
            "regenerate the baseline with this repdiag version"
        )
    warnings: list[str] = []
    if b.model.identity() != c.model.identity():
        text = (
            f"different model: baseline {b.model.id}@{b.model.revision} (tokenizer {str(b.model.tokenizer_fingerprint)[:12]}), "
            f"current {c.model.id}@{c.model.revision} (tokenizer {str(c.model.tokenizer_fingerprint)[:12]})"
        )
        if same_model:
            raise BadInputError(f"{text}; drop --same-model to compare different models")
        warnings.append(text)
    env_b, env_c = b.environment.to_dict(), c.environment.to_dict()
    diff = sorted(k for k in set(env_b) | set(env_c) if env_b.get(k) != env_c.get(k))
    if diff:
        warnings.append(
            "environments differ (" + ", ".join(f"{k}: {env_b.get(k)} → {env_c.get(k)}" for k in diff) + ")"
        )
    if b.settings.to_dict() != c.settings.to_dict():
        keys = sorted(
            k for k in set(b.settings.to_dict()) | set(c.settings.to_dict())
            if b.settings.to_dict().get(k) != c.settings.to_dict().get(k)
        )
        warnings.append(f"settings differ ({', '.join(keys)}): the numbers may not be comparable")

    pmap = dict(policy_map or {})
    for old, new in pmap.items():
        if old not in b.policies():
            raise BadInputError(f"--policy-map {old}={new}: the baseline has no policy {old!r} ({', '.join(b.policies())})")
        if new not in c.policies():
            raise BadInputError(f"--policy-map {old}={new}: the current report has no policy {new!r} ({', '.join(c.policies())})")

    def label(policy: str) -> str:
        return policy if pmap.get(policy, policy) == policy else f"{policy}→{pmap[policy]}"

    gates = parse_fail_on(fail_on)
    checks: list[Check] = []
    seen: set[tuple[str, str, str]] = set()
    for gate in gates:
        section, key, policies = _locate(gate, b)
        cur_table = c.section(section)
        for policy in policies:
            cp = pmap.get(policy, policy)
            if cp not in cur_table or key not in cur_table[cp]:
                raise BadInputError(
                    f"--fail-on {gate.text!r}: {section}.{cp}.{key} is in the baseline but not in the current "
                    "report: run the same policies and metrics (or pass --policy-map), or gate another metric"
                )
            bv = _num(b.section(section)[policy][key])
            cv = _num(cur_table[cp][key])
            chk = _judge(
                section, label(policy), key, bv, cv, gate.tolerance,
                b_se=b.se(section, policy, key), c_se=c.se(section, cp, key), z=z,
            )
            ident = (section, policy, key)
            if ident in seen:  # a later, more specific gate replaces an earlier one
                checks = [x for x in checks if (x.section, x.policy, x.key) != ident]
            seen.add(ident)
            checks.append(chk)
    if not gates:
        for section in ("measured", "bounds"):
            bt, ct = b.section(section), c.section(section)
            for policy in _ordered(b, bt):
                cp = pmap.get(policy, policy)
                if cp not in ct:
                    continue
                for key in DEFAULT_KEYS:
                    if key in bt[policy] and key in ct[cp]:
                        checks.append(
                            _judge(
                                section, label(policy), key, _num(bt[policy][key]), _num(ct[cp][key]), None,
                                b_se=b.se(section, policy, key), c_se=c.se(section, cp, key), z=None,
                            )
                        )
    only_b = [p for p in b.policies() if pmap.get(p, p) not in c.policies()]
    only_c = [p for p in c.policies() if p not in b.policies() and p not in pmap.values()]
    if only_b:
        warnings.append(f"policies only in the baseline: {', '.join(only_b)}")
    if only_c:
        warnings.append(f"policies only in the current report (not compared): {', '.join(only_c)}")
    return CompareResult(
        checks=tuple(checks),
        warnings=tuple(warnings),
        baseline_model=b.model.id,
        current_model=c.model.id,
        gates=tuple(g.text for g in gates),
    )


def render_compare_table(result: CompareResult) -> Any:
    """A ``rich`` table of the checks (what ``repdiag compare --format table`` prints)."""
    from rich.table import Table
    from rich.text import Text

    if not result.checks:
        return Text("repdiag compare: no metric in common to compare")
    n = len(result.regressions)
    table = Table(title=f"repdiag compare: {'no regression' if n == 0 else f'{n} regression(s)'}")
    for col, justify in (
        ("policy", "left"), ("metric", "left"), ("baseline", "right"), ("current", "right"),
        ("Δ", "right"), ("tolerance", "right"), ("status", "left"),
    ):
        table.add_column(col, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for c in result.checks:
        name = c.key if c.section == "measured" else f"{c.section}.{c.key}"
        delta = "n/a" if c.delta is None else _signed(c.delta)
        tol = "—" if c.tolerance is None else _f(c.tolerance) + (f" ({c.tolerance_text.lstrip('+-')})" if "%" in (c.tolerance_text or "") else "")
        status = {"pass": "[green]pass[/]", "fail": "[bold red]FAIL[/]", "info": "·"}[c.status]
        table.add_row(c.policy, name, _f(c.baseline), _f(c.current), delta, tol, status)
    return table
