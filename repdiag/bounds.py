"""Bounds of a transition matrix under decoding policies: ``decoding`` transforms, then ``theory``.

:func:`bounds_document` is what ``repdiag bounds MATRIX --format json`` prints: the layout of
repetition-theory.md §12 (``{"n", "eos_index", "route", "quantities"}``) for the raw matrix; with one
policy, the same layout for the policy matrix ``A^π`` plus the policy-case keys (``mean_p_eos``,
``greedy_loop_fraction``, ``row_collision_full``) inside ``quantities``; with several policies,
``{"policies": {SPEC: <that layout>}}``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from rich.table import Table

    from .decoding import Policy
    from .transition import TransitionMatrix

__all__ = ["bounds_document", "policy_bounds", "render_bounds_table", "HEADLINE_KEYS"]

#: the quantities shown in tables (and in ``repdiag analyze``'s per-policy bounds).
HEADLINE_KEYS = ("zeta_n", "rho_Q", "su_R", "su_R_avg", "fu_arp", "fu_arp_corrected", "states_on_cycles")


def _policy_matrix(tm: "TransitionMatrix", policy: "Policy") -> tuple[Any, int]:
    """``A^π`` in a form theory accepts (residual spread first, as spec A3 requires)."""
    A = tm.to_dense() if np.any(tm.residual > 0) else tm.matrix
    return policy.transform(A, tm.eos_index, row_logit_shift=tm.row_logit_shift,
                            state_tokens=tm.state_tokens if tm.order > 1 else None)


def su_R_ngram_cap(A: Any, eos_index: int, N: int) -> float:
    """``R^(N) ≈ Σ_{k=1}^{N−2} tr(Q^k)``, Su's sum capped by ``no_repeat_ngram_size = N`` (spec §8.9).

    Under the ban ``E_k(t)`` cannot occur for ``k ≥ N − 1``; ``N ≤ 2`` gives 0. Approximate, because
    the bans renormalise rows.
    """
    import scipy.sparse as sp

    keep = np.delete(np.arange(A.shape[0]), eos_index)
    B = A[keep][:, keep] if not sp.issparse(A) else sp.csr_matrix(A)[keep][:, keep]
    Q = B.multiply(B).tocsr() if sp.issparse(B) else B * B
    total, power = 0.0, Q
    for k in range(1, N - 1):
        total += float(power.diagonal().sum())
        power = power @ Q
    return total


def policy_bounds(tm: "TransitionMatrix", policy: "Policy | None", *, horizon: int = 20,
                  **theory_options: Any) -> dict[str, Any]:
    """The §12 layout for ``tm`` under ``policy`` (``None``: the raw matrix, residual model of §2.3)."""
    from . import theory

    if policy is None:
        doc = theory.compute_quantities(tm.matrix, tm.eos_index, residual=tm.residual, T=horizon, **theory_options)
        doc["policy"] = "raw"
        return doc
    A, eos = _policy_matrix(tm, policy)
    doc = theory.compute_quantities(A, eos, T=horizon, **theory_options)
    doc["quantities"].update(theory.policy_case_quantities(A, eos))
    cap = policy.ngram_cap
    if cap is not None:
        doc["quantities"]["su_R_ngram_cap"] = su_R_ngram_cap(A, eos, cap)
        doc["ngram_cap"] = {"N": cap, "note": "no-repeat-n-gram: E_k(t) impossible for k >= N-1 "
                                              "(spec §8.9); su_R_ngram_cap = sum_{k<=N-2} tr(Q^k), approximate"}
    doc["policy"] = policy.spec_string()
    doc["exactness"] = policy.exactness
    return doc


def bounds_document(tm: "TransitionMatrix", policies: Sequence[str] = (), *, horizon: int = 20,
                    **theory_options: Any) -> dict[str, Any]:
    """What ``repdiag bounds`` prints: raw layout, one policy's layout, or ``{"policies": {...}}``."""
    from .decoding import parse_policy

    parsed = [parse_policy(spec) for spec in policies]
    if not parsed:
        return policy_bounds(tm, None, horizon=horizon, **theory_options)
    if len(parsed) == 1:
        return policy_bounds(tm, parsed[0], horizon=horizon, **theory_options)
    return {"policies": {spec: policy_bounds(tm, p, horizon=horizon, **theory_options)
                         for spec, p in zip(policies, parsed)}}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "inf" if value == float("inf") else f"{value:.4g}"
    return str(value)


def render_bounds_table(doc: dict[str, Any]) -> "Table":
    """A rich table of the headline quantities, one column per policy."""
    from rich.table import Table

    layouts = doc["policies"] if "policies" in doc else {doc.get("policy", "raw"): doc}
    table = Table(title="repetition bounds (repetition-theory.md §12)")
    table.add_column("quantity", style="bold")
    for name in layouts:
        table.add_column(name, justify="right")
    keys = list(HEADLINE_KEYS) + ["mean_p_eos", "greedy_loop_fraction"]
    for key in keys:
        row = []
        for layout in layouts.values():
            q = layout["quantities"]
            value = q.get(key, q.get("greedy", {}).get("loop_fraction") if key == "greedy_loop_fraction" else None)
            row.append("—" if value is None else _fmt(value))
        table.add_row(key, *row)
    table.add_row("route", *[layout.get("route", "") for layout in layouts.values()])
    return table
