"""Path kernel (exact / trapezoid / first-order replay), checkpoint kernel (TracInCP) and tangent kernel.

All three write a query output's change as a sum over training examples (spec §2):
``m(θ_T) = b + Σ_i C_i + R``. The replay modes need θ0 and the full schedule of plain SGD; the checkpoint
mode needs checkpoints and the schedule; the final mode only the model (a similarity, not a
decomposition). See :func:`path_kernel`, :func:`checkpoint_kernel`, :func:`tangent_kernel`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..errors import RecordError, UsageError
from .data import Example
from .features import GradientComputer, ParamSpace
from .outputs import Query
from .runfile import Record
from .sharding import SHARD_EXAMPLES

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["KernelAttribution", "path_kernel", "checkpoint_kernel", "tangent_kernel", "work_model",
           "KERNEL_NAMES", "RULES"]

RULES = ("exact", "trapezoid", "first")
KERNEL_NAMES = {"exact": "path/exact", "trapezoid": "path/trapezoid", "first": "path/first-order",
                "checkpoints": "checkpoints", "final": "tangent@final"}
MODE_OF_RULE = {"exact": "exact", "trapezoid": "trapezoid", "first": "first-order"}

_GL3_X = (0.5 - 0.5 * math.sqrt(3 / 5), 0.5, 0.5 + 0.5 * math.sqrt(3 / 5))
_GL3_W = (5 / 18, 8 / 18, 5 / 18)


@dataclass(frozen=True)
class KernelAttribution:
    """The decomposition ``m(θ_T) = b + Σ_i C_i + optimizer terms + residual`` of one query measurement.

    ``contributions`` (shape ``[n]``, training-example order) are for ``measurement``;
    ``all_contributions`` holds every measurement computed (``{name: [n]}``). ``completeness`` is
    ``Σ_i C_i / Δm`` (``None`` in final mode, which is a similarity). ``pairs`` are the training pairs as
    text when known (for display).
    """

    mode: str
    kernel: str
    decomposition: bool
    measurement: str
    query: dict
    b: float
    m_final: float
    delta_m: float
    contributions: np.ndarray
    all_contributions: dict
    residual: float
    completeness: float | None
    optimizer_terms: dict = field(default_factory=dict)
    times_used: np.ndarray | None = None
    pairs: tuple | None = None
    steps: int = 0
    checkpoints: tuple = ()
    layers: str = "all"
    backend: str = "loop"
    warnings: tuple = ()
    diagnostics: dict = field(default_factory=dict)
    rules: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return float(np.sum(self.contributions))

    def ranked(self, top: int = 10) -> tuple[list[int], list[int]]:
        """Indices of the ``top`` proponents (largest positive C_i) and opponents (most negative)."""
        c = np.asarray(self.contributions)
        order = np.argsort(-c, kind="stable")
        pro = [int(i) for i in order[:top] if c[i] > 0]
        opp = [int(i) for i in np.argsort(c, kind="stable")[:top] if c[i] < 0]
        return pro, opp

    def _row(self, rank: int, i: int) -> dict:
        c = float(self.contributions[i])
        row: dict[str, Any] = {"rank": rank, "index": i, "contribution": c,
                               "share_of_delta_m": (c / self.delta_m) if self.delta_m not in (0.0,) and
                               self.decomposition else None}
        if self.pairs is not None and i < len(self.pairs) and self.pairs[i] is not None:
            src, tgt = self.pairs[i]
            row["pair"] = {"source": src, "target": tgt}
        else:
            row["pair"] = {"source": None, "target": None}
        if self.times_used is not None:
            row["times_used"] = int(self.times_used[i])
        if self.decomposition:  # Domingos, sequence-level form: a_i = 1, K^p(x, x_i) = C_i
            row["a"] = 1.0
            row["kernel_value"] = c
        return row

    def to_dict(self, top: int = 10, *, include_contributions: bool = False) -> dict:
        pro, opp = self.ranked(top)
        d = {
            "mode": self.mode,
            "kernel": self.kernel,
            "decomposition": self.decomposition,
            "measurement": self.measurement,
            "query": self.query,
            "b": self.b,
            "m_final": self.m_final,
            "delta_m": self.delta_m,
            "sum_contributions": self.total,
            "optimizer_terms": self.optimizer_terms,
            "completeness_residual": self.residual,
            "completeness": self.completeness,
            "top": [self._row(k + 1, i) for k, i in enumerate(pro)],
            "opponents": [self._row(k + 1, i) for k, i in enumerate(opp)],
            "n_examples": int(len(self.contributions)),
            "steps": self.steps,
            "checkpoints": list(self.checkpoints),
            "layers": self.layers,
            "backend": self.backend,
            "warnings": list(self.warnings),
            "domingos": ("sequence-level form: a_i = 1, b = m(θ0), K^p(x*, x_i) = C_i" if self.decomposition
                         else "not a decomposition (tangent-kernel similarity at the final weights)"),
            "rules": self.rules,
            "diagnostics": self.diagnostics,
        }
        if include_contributions:
            d["contributions"] = [float(x) for x in self.contributions]
            d["all_contributions"] = {k: [float(x) for x in v] for k, v in self.all_contributions.items()}
        return d


# --------------------------------------------------------------------------------------------------
def work_model(model, dtype=None):
    """A private copy of ``model`` (eval mode, optionally cast) whose parameters the kernels overwrite."""
    import torch

    m = copy.deepcopy(model)
    if dtype is not None:
        m = m.to(dtype)
    m.eval()
    try:  # eager attention: same numbers as sdpa (to round-off), and its mask code batches under vmap
        m.set_attn_implementation("eager")
    except Exception:  # noqa: BLE001 - older models without the switch keep their attention
        pass
    for p in m.parameters():
        p.requires_grad_(True)
    del torch
    return m


class _Measure:
    """Evaluates ``m(θ)`` (Q measurements) and ``∇m`` (Q × P) on a work model."""

    def __init__(self, space: ParamSpace, query: Query) -> None:
        self.space = space
        self.query = query
        self.evals = 0

    def value(self, flat=None) -> "torch.Tensor":
        import torch

        if flat is not None:
            self.space.set(flat)
        with torch.no_grad():
            return self.query.values(self.space.model).detach().double()

    def grad(self, flat=None) -> tuple["torch.Tensor", "torch.Tensor"]:
        import torch

        if flat is not None:
            self.space.set(flat)
        self.evals += 1
        v = self.query.values(self.space.model)
        rows = [self.space.grad_of(v[q], retain_graph=q < len(v) - 1) for q in range(len(v))]
        return v.detach().double(), torch.stack(rows).double()


def _examples_for(record: Record, train_examples: Sequence[Example | None] | None) -> list[Example]:
    ex = record.examples()
    out = []
    for i, e in enumerate(ex):
        if e is None and train_examples is not None and i < len(train_examples):
            e = train_examples[i]
        out.append(e)
    return out


def _lr_vector(space: ParamSpace, record: Record, lrs: Sequence[float], key: str = "lr"):
    """Per-parameter-element vector of a per-group hyper-parameter (lr or weight decay)."""
    import torch

    groups = record.optimizer.get("groups") or []
    if not groups:
        vals = {n: float(lrs[0]) for n in space.names} if key == "lr" else {n: 0.0 for n in space.names}
    else:
        vals = {}
        for g, grp in enumerate(groups):
            v = float(lrs[g]) if key == "lr" else float(grp.get(key) or 0.0)
            for n in grp["params"]:
                vals[n] = v
    missing = [n for n in space.names if n not in vals]
    if missing:
        raise RecordError(f"parameter {missing[0]!r} is in no optimizer group of the record: it was not trained "
                          "by the recorded optimizer")
    return torch.cat([torch.full((k,), vals[n], dtype=torch.float64) for n, k in zip(space.names, space.numels)])


def _check_optimizer_exact(record: Record) -> list[str]:
    """Reasons why the recorded optimizer is not plain SGD (empty list when the replay can be exact)."""
    opt = record.optimizer
    reasons = []
    name = (opt.get("name") or "").lower()
    if name and name != "sgd":
        reasons.append(f"optimizer {opt.get('name')} is not plain SGD (spec §2.5: its update is not a known linear "
                       "combination of per-example gradients)")
    for g in opt.get("groups") or []:
        if float(g.get("momentum") or 0.0) != 0.0:
            reasons.append("SGD with momentum is not supported by the replay yet")
            break
        if g.get("nesterov"):
            reasons.append("Nesterov SGD is not supported by the replay")
            break
        if g.get("maximize"):
            reasons.append("maximize=True is not supported by the replay")
            break
    return reasons


def _verify(flat, target: dict, space: ParamSpace, what: str, tol_rel: float, ckpt_dtype: str = "") -> float:
    import torch

    ref = space.flat_from({n: target[n] for n in space.names if n in target}) if set(space.names) <= set(target) \
        else None
    if ref is None:
        return float("nan")
    ref = ref.double()
    err = float((flat.double() - ref).abs().max())
    scale = float(ref.abs().max()) + 1e-30
    if err > tol_rel * scale:
        raise RecordError(f"the replay does not reproduce {what} (max |Δθ| = {err:.2e}, scale {scale:.2e}): the "
                          "record does not describe how this model was trained")
    del torch
    return err


def _query_meta(query: Query, measurement: str) -> dict:
    d = query.describe()
    d["measurement"] = measurement
    return d


def _pick(query: Query, measurement: str) -> int:
    if measurement not in query.names:
        raise UsageError(f"measurement {measurement!r} is not available for this query (have: "
                         f"{', '.join(query.names)})")
    return query.names.index(measurement)


# --------------------------------------------------------------------------------------------------
def path_kernel(model, record: Record, query: Query, *, rule: str = "trapezoid", rules: Sequence[str] | None = None,
                measurement: str = "loop", pairs=None, train_examples=None, backend: str = "loop",
                dtype: str = "float64", exact_tol: float = 1e-12, max_pieces: int = 16,
                hessian: bool = False, hessian_h: float = 1e-3, verify: bool = True,
                progress=None) -> KernelAttribution:
    """Replay the recorded SGD run and decompose ``Δm`` by the path kernel.

    ``rule``: the rule whose contributions are returned (``exact`` — adaptive Gauss–Legendre on each
    segment, refined until the per-step residual is at round-off; ``trapezoid``; ``first`` — TracIn /
    discretised Domingos). ``rules``: every rule to compute in the same replay (their totals and residuals
    go to ``.rules``; their contributions to ``.diagnostics["contributions"]``). ``hessian``: also compute
    ``½ Δᵀ H_m Δ`` per step by a central difference of ∇m (spec §6 assertion 4).
    """
    import torch

    rules = list(dict.fromkeys([rule, *(rules or [])]))
    for r in rules:
        if r not in RULES:
            raise UsageError(f"unknown rule {r!r}; choose from {', '.join(RULES)}")
    reasons = _check_optimizer_exact(record)
    if reasons:
        raise RecordError(f"cannot replay this run exactly: {reasons[0]}; use --mode checkpoints")
    if not record.has_theta0:
        raise RecordError("the record has no θ0: the replay modes need it; use --mode checkpoints or final")
    warnings = list(record.warnings)
    if not record.theta0_exact:
        warnings.append(f"θ0 was stored in {record.meta['theta0'].get('dtype')} (training ran in "
                        f"{record.meta['model'].get('dtype')}): the replay starts from a rounded θ0")
    tdtype = getattr(torch, dtype)
    record.check_model(model)
    final_ok = record.check_final(model)
    if not final_ok:
        raise RecordError("the model's weights are not the record's final weights: pass the model this record "
                          "was trained into")
    work = work_model(model, tdtype)
    space = ParamSpace(work)
    theta0 = record.theta0()
    record.check_tensors(theta0, "theta0.safetensors", work)
    theta = space.flat_from(theta0).to(tdtype)
    theta_final = space.get().double()
    examples = _examples_for(record, train_examples)
    n = len(examples)
    gc = GradientComputer(space, record.kind, record.meta.get("pad_token_id", 0), backend)
    meas = _Measure(space, query)
    Q = len(query.names)
    C = {r: torch.zeros((Q, n), dtype=torch.float64) for r in rules}
    wd_term = {r: torch.zeros(Q, dtype=torch.float64) for r in rules}
    step_res = {r: [] for r in rules}
    dms, hq, pieces_used = [], [], []
    times = np.zeros(n, dtype=np.int64)
    ckpt_steps = {int(c["step"]): c for c in record.checkpoints}
    opt_groups = record.optimizer.get("groups") or []
    has_wd = any(float(g.get("weight_decay") or 0.0) for g in opt_groups)
    wd_vec = _lr_vector(space, record, [0.0] * max(1, len(opt_groups)), key="weight_decay") if has_wd else None
    ckpt_err = {}
    mismatch: list[float] = []

    m_prev, G_prev = meas.grad(theta)
    b = m_prev.clone()
    for st in record.steps:
        ids = st.ids
        for i in ids:
            if i >= n or examples[i] is None:
                raise RecordError(f"step {st.step} uses example {i}, which the record's examples file lacks")
        w = torch.tensor(st.flat_weights, dtype=torch.float64)
        lr_vec = _lr_vector(space, record, st.lr)
        space.set(theta)
        g = gc([examples[i] for i in ids]).double()                     # B × P at θ_s
        direction = -(w[:, None] * g) * (lr_vec * st.clip)[None, :]      # −η c w_i ∇ℓ_i
        # the real update, as the trainer computed it: the weighted batch loss of each collated micro-batch
        batch_grad = _batch_gradient(space, record, examples, st)
        delta = -(lr_vec * st.clip) * batch_grad
        mismatch.append(float((direction.sum(0) - delta).abs().max() / (delta.abs().max() + 1e-300)))
        wd_delta = None
        if wd_vec is not None:
            wd_delta = -(lr_vec * wd_vec) * theta.double()
            delta = delta + wd_delta
        theta_next = (theta.double() + delta).to(tdtype)
        delta = theta_next.double() - theta.double()                     # the step as actually represented
        m_next, G_next = meas.grad(theta_next)
        dm = m_next - m_prev
        dms.append(dm)
        idx = torch.tensor(ids, dtype=torch.long)
        for i in ids:
            times[i] += 1
        gbars = {}
        if "first" in rules:
            gbars["first"] = G_prev
        if "trapezoid" in rules:
            gbars["trapezoid"] = 0.5 * (G_prev + G_next)
        if "exact" in rules:
            gbar, npieces = _adaptive_gl(meas, theta, delta, dm, m_prev, m_next, exact_tol, max_pieces, tdtype)
            gbars["exact"] = gbar
            pieces_used.append(npieces)
        for r, gb in gbars.items():
            C[r].index_add_(1, idx, gb @ direction.T)
            if wd_delta is not None:
                wd_term[r] += gb @ wd_delta
            step_res[r].append(dm - gb @ delta)
        if hessian:
            hp = (theta.double() + hessian_h * delta).to(tdtype)
            hm = (theta.double() - hessian_h * delta).to(tdtype)
            _, Gp = meas.grad(hp)
            _, Gm = meas.grad(hm)
            hq.append(0.5 * ((Gp - Gm) @ delta) / (2 * hessian_h))
        theta = theta_next
        m_prev, G_prev = m_next, G_next
        s_done = st.step + 1
        if verify and s_done in ckpt_steps:
            c = ckpt_steps[s_done]
            tol = {"float64": 1e-9, "float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}.get(c.get("dtype"), 1e-4)
            if record.meta["model"].get("dtype") != "float64":
                tol = max(tol, 1e-4)
            ckpt_err[s_done] = _verify(theta, record.checkpoint(s_done), space, f"checkpoint {s_done}", tol)
        if progress is not None:
            progress(st.step + 1, len(record.steps))
    final_err = float((theta.double() - theta_final).abs().max())
    scale = float(theta_final.abs().max())
    # float64 runs replay to round-off (T5: bitwise); HF's causal-LM loss upcasts logits with .float(), i.e. rounds
    # float64 logits to float32, so those runs replay to ~1e-9 — the measured error is in the diagnostics
    tol_final = 1e-6 if record.meta["model"].get("dtype") == "float64" and record.theta0_exact else 1e-3
    if verify and final_err > tol_final * scale:
        raise RecordError(f"the replay does not reproduce the model's final weights (max |Δθ| = {final_err:.2e}): "
                          "the record does not describe how this model was trained")
    # the measured change (at the recorded final weights, which the replay reproduced)
    m_final = meas.value(theta)
    dm_total = m_final - b
    q = _pick(query, measurement)
    out_rules, contribs = {}, {}
    for r in rules:
        tot = C[r].sum(1)
        res = dm_total - tot - wd_term[r]
        out_rules[MODE_OF_RULE[r]] = {
            "sum_contributions": float(tot[q]),
            "residual": float(res[q]),
            "residual_relative": float(abs(res[q]) / (abs(dm_total[q]) + 1e-300)),
            "sum_abs_step_residuals": float(sum(abs(float(x[q])) for x in step_res[r])),
            "by_measurement": {name: {"sum": float(tot[k]), "residual": float(res[k])}
                               for k, name in enumerate(query.names)},
        }
        contribs[MODE_OF_RULE[r]] = {name: C[r][k].numpy().copy() for k, name in enumerate(query.names)}
    diag: dict[str, Any] = {
        "replay_final_max_abs_error": final_err,
        "replay_checkpoint_max_abs_error": {str(k): v for k, v in ckpt_err.items()},
        "sum_abs_step_changes": float(sum(abs(float(x[q])) for x in dms)),
        "per_example_vs_batch_gradient_max_rel": max(mismatch) if mismatch else 0.0,
        "measure_gradient_evaluations": meas.evals,
        "contributions": contribs,
        "step_residuals": {MODE_OF_RULE[r]: [float(x[q]) for x in step_res[r]] for r in rules},
    }
    if pieces_used:
        diag["gl_pieces_histogram"] = {str(k): pieces_used.count(k) for k in sorted(set(pieces_used))}
    if hessian:
        diag["half_dHd"] = [float(x[q]) for x in hq]
    warnings += gc.warnings
    main = C[rule]
    return KernelAttribution(
        mode=MODE_OF_RULE[rule], kernel=KERNEL_NAMES[rule], decomposition=True, measurement=measurement,
        query=_query_meta(query, measurement), b=float(b[q]), m_final=float(m_final[q]),
        delta_m=float(dm_total[q]), contributions=main[q].numpy().copy(),
        all_contributions={name: main[k].numpy().copy() for k, name in enumerate(query.names)},
        residual=out_rules[MODE_OF_RULE[rule]]["residual"],
        completeness=float(main[q].sum() / dm_total[q]) if float(dm_total[q]) != 0 else None,
        optimizer_terms=({"weight_decay": float(wd_term[rule][q])} if has_wd else {}),
        times_used=times, pairs=pairs, steps=len(record.steps), checkpoints=tuple(sorted(ckpt_steps)),
        layers="all", backend=gc.backend or backend, warnings=tuple(dict.fromkeys(warnings)), diagnostics=diag,
        rules=out_rules,
    )


def _batch_gradient(space: ParamSpace, record: Record, examples, st) -> "torch.Tensor":
    """``Σ_i w_i ∇ℓ_i`` computed the way the trainer did: one backward per collated micro-batch."""
    import torch

    from .data import collate, example_losses

    dev = space.params[0].device
    total = None
    for mb, wts in zip(st.micro, st.weights):
        batch = collate([examples[i] for i in mb], record.meta.get("pad_token_id", 0), dev)
        losses = example_losses(space.model, batch, record.kind)
        loss = (losses * torch.tensor(wts, dtype=losses.dtype, device=dev)).sum()
        g = space.grad_of(loss).double()
        total = g if total is None else total + g
    return total


def _adaptive_gl(meas: _Measure, theta, delta, dm, m_prev, m_next, tol, max_pieces, tdtype):
    """``Ḡ = ∫_0^1 ∇m(θ + τΔ) dτ`` by composite 3-node Gauss–Legendre, refined until the residual is round-off."""
    import torch

    def gbar(pieces: int):
        acc = None
        for k in range(pieces):
            a = k / pieces
            for x, wgt in zip(_GL3_X, _GL3_W):
                tau = a + x / pieces
                _, G = meas.grad((theta.double() + tau * delta).to(tdtype))
                acc = G * (wgt / pieces) if acc is None else acc + G * (wgt / pieces)
        return acc

    thr = tol * (1.0 + m_prev.abs() + m_next.abs())
    pieces = 1
    best = gbar(1)
    best_err = (dm - best @ delta).abs()
    while bool((best_err > thr).any()) and pieces < max_pieces:
        cand = gbar(pieces * 2)
        err = (dm - cand @ delta).abs()
        if float(err.max()) > float(best_err.max()) / 1.5:  # at the noise floor: refining no longer helps
            if float(err.max()) < float(best_err.max()):
                best, best_err, pieces = cand, err, pieces * 2
            break
        best, best_err, pieces = cand, err, pieces * 2
    del torch
    return best, pieces


# --------------------------------------------------------------------------------------------------
def checkpoint_kernel(model, record: Record, query: Query, *, measurement: str = "loop", pairs=None,
                      train_examples=None, backend: str = "loop", dtype: str = "float64", layers: str | None = None,
                      rule: str = "trapezoid", projector=None, cache_dir=None, progress=None, executor=None,
                      shard_examples: int = SHARD_EXAMPLES) -> KernelAttribution:
    """TracInCP over the recorded checkpoints (θ0 and the final model count as checkpoints), spec §3.2.

    ``C_i ≈ −Σ_j W_ij · ½(∇m(θ_kj)·∇ℓ_i(θ_kj) + ∇m(θ_kj+1)·∇ℓ_i(θ_kj+1))`` (``rule="left"`` keeps only
    the left point), where ``W_ij`` is the learning-rate mass example i received in segment j.
    Completeness ``Σ C_i / Δm`` is reported; Δm is measured between the first and last checkpoint.
    ``projector`` (:class:`~repdiag.attribution.projection.Projector`): dot products of projected gradients
    (approximate, stated); with ``cache_dir`` the projected training features are cached per checkpoint, so
    further queries cost only their own gradients.

    ``executor`` (:class:`repdiag.executors.Executor`; default this process): runs the per-example
    gradient features in shards of (checkpoint, ``shard_examples`` training examples); the scores are the
    same bytes for any executor and worker count, and an executor with a shard folder resumes a job.
    """
    import torch

    from .features import ParamSpace
    from .sharding import FeatureJob, merged_warnings, point_tensors, run_feature_job

    if rule not in ("trapezoid", "left"):
        raise UsageError("checkpoint rule must be 'trapezoid' or 'left'")
    record.check_model(model)
    if not record.check_final(model):
        raise RecordError("the model's weights are not the record's final weights: pass the model this record "
                          "was trained into")
    warnings = list(record.warnings)
    reasons = _check_optimizer_exact(record)
    if reasons:
        warnings.append(f"approximate: {reasons[0]}; the checkpoint kernel weights gradients by the learning rate "
                        "only (not preconditioned)")
    tdtype = getattr(torch, dtype)
    final = dict(model.named_parameters())
    T = len(record.steps)
    points: list[tuple[str, int]] = []
    metas: list[dict] = []
    if record.has_theta0:
        points.append(("theta0", 0))
        metas.append({})
    for c in record.checkpoints:
        s = int(c["step"])
        if s <= 0 or s >= T:
            continue
        if not (record.path / c["file"]).is_file():
            raise RecordError(f"checkpoint {c['file']!r} listed in record.json is missing: the record folder is "
                              "incomplete")
        points.append(("checkpoint", s))
        metas.append(c)
    points.append(("final", T))
    metas.append({})
    if len(points) < 2:
        raise RecordError("the record has neither θ0 nor intermediate checkpoints: use --mode final")
    if any(c.get("params") for c in metas):
        warnings.append("checkpoints hold a parameter subset: the other parameters are taken from the final model")
    lowp = sorted({c.get("dtype") for c in metas if "file" in c and c.get("dtype") not in ("float32", "float64")})
    if lowp:
        warnings.append(f"checkpoints stored in {', '.join(lowp)}: their rounding (~1e-3 relative) enters the scores")
    examples = _examples_for(record, train_examples)
    n = len(examples)
    names = ParamSpace(model, layers=layers).names
    Q = len(query.names)
    # learning-rate mass per segment and example (group 0's lr; differing group lrs are warned about)
    K = len(points) - 1
    W = np.zeros((K, n))
    times = np.zeros(n, dtype=np.int64)
    bounds = [s for _, s in points]
    seg = 0
    groups_lr_differ = False
    for st in record.steps:
        while seg < K - 1 and st.step >= bounds[seg + 1]:
            seg += 1
        if len(set(st.lr)) > 1:
            groups_lr_differ = True
        for i, wi in zip(st.ids, st.flat_weights):
            if i >= n or examples[i] is None:
                raise RecordError(f"step {st.step} uses example {i}, which the record's examples file lacks")
            W[seg, i] += st.lr[0] * st.clip * wi
            times[i] += 1
    if groups_lr_differ:
        warnings.append("optimizer groups had different learning rates: the checkpoint kernel used group 0's")
    used = tuple(i for i in range(n) if times[i] > 0)
    # per point: check the tensors and look up the projected-feature cache
    cache, cached = None, {}
    if projector is not None and cache_dir is not None:
        from .cache import FeatureCache

        cache = FeatureCache(cache_dir)
    keys = {}
    for j, (source, s) in enumerate(points):
        tensors = point_tensors(record, source, s, final)
        record.check_tensors(tensors, "theta0.safetensors" if source == "theta0" else f"checkpoint {s}", model)
        if cache is not None:
            keys[j] = _cache_key_at(tensors, final, names, tdtype, projector, record, layers, used, n)
            hit = cache.load(keys[j], n, projector.dim)
            if hit is not None:
                cached[j] = hit
    job = FeatureJob(kind=record.kind, pad_token_id=int(record.meta.get("pad_token_id", 0)), query=query,
                     examples=tuple(examples), used=used, points=tuple(points), record=str(record.path.resolve()),
                     layers=layers, dtype=dtype, backend=backend, projector=projector, key="")
    job, shards, backend_warnings = run_feature_job(model, job, executor=executor, skip_points=sorted(cached),
                                                    shard_examples=shard_examples, progress=progress)
    D = np.zeros((K + 1, Q, n))
    ms = [shards[min(s for s in shards if s[0] == j)]["m"] for j in range(K + 1)]
    for j in range(K + 1):
        own = sorted(s for s in shards if s[0] == j)
        if projector is None:
            for _, lo, hi in own:
                D[j][:, list(used[lo:hi])] = shards[(j, lo, hi)]["dots"]
            continue
        feats = cached.get(j)
        if feats is None:
            feats = np.zeros((n, projector.dim))
            for _, lo, hi in own:
                feats[list(used[lo:hi])] = shards[(j, lo, hi)]["features"]
            if cache is not None:
                cache.save(keys[j], feats, {"layers": layers or "all", "projector": projector.spec(), "n": n})
        pg = torch.from_numpy(shards[own[0]]["projected_G"])
        D[j] = (pg @ torch.from_numpy(feats).T).numpy()
    # contributions: C = −Σ_j W_j ⊙ rule(D_j, D_j+1)   (∇ℓ is a loss gradient: minus sign)
    Cm = np.zeros((Q, n))
    for j in range(K):
        inner = 0.5 * (D[j] + D[j + 1]) if rule == "trapezoid" else D[j]
        Cm -= W[j][None, :] * inner
    q = _pick(query, measurement)
    b = float(ms[0][q])
    m_final = float(ms[-1][q])
    dm = m_final - b
    tot = float(Cm[q].sum())
    if abs(dm) > 0 and not 0.5 <= tot / dm <= 2.0:
        warnings.append(f"checkpoint mode is incomplete: Σ C_i / Δm = {tot / dm:.2f}; rank the pairs, do not read "
                        "the amounts as shares of Δm")
    if projector is not None:
        warnings.append(f"projected gradients ({projector.kind}, dim {projector.dim}, seed {projector.seed}): "
                        "inner products are approximate (JL error ≈ ‖a‖‖b‖·√(2/dim))")
    warnings += merged_warnings(backend_warnings, shards)
    return KernelAttribution(
        mode="checkpoints", kernel=f"checkpoints/{K + 1}" + ("~approx" if reasons else ""), decomposition=True,
        measurement=measurement, query=_query_meta(query, measurement), b=b, m_final=m_final, delta_m=dm,
        contributions=Cm[q].copy(), all_contributions={nm: Cm[k].copy() for k, nm in enumerate(query.names)},
        residual=float(dm - tot), completeness=(tot / dm) if dm != 0 else None, times_used=times, pairs=pairs,
        steps=T, checkpoints=tuple(bounds), layers=layers or "all", backend=job.backend,
        warnings=tuple(dict.fromkeys(warnings)),
        diagnostics={"rule": rule, "checkpoint_steps": bounds,
                     "measurements_at_checkpoints": [float(m[q]) for m in ms]},
    )


def _cache_key_at(tensors: dict, final: dict, names, tdtype, projector, record, layers, used, n) -> str:
    """The feature-cache key of one weight point: its tracked parameters (as the work model holds them),
    the parameter subset, the projector, the examples, the weight model and the used examples."""
    import hashlib

    import torch

    from .cache import cache_key

    flat = torch.cat([tensors.get(nm, final[nm]).detach().reshape(-1).to(tdtype) for nm in names])
    theta_sha = hashlib.sha256(flat.to(torch.float32).numpy().tobytes()).hexdigest()
    return cache_key(theta=theta_sha, layers=layers or "all", projector=projector.spec(),
                     examples=record.meta.get("examples"), n=n, weight_model=record.weight_model,
                     used=hashlib.sha256(str(list(used)).encode()).hexdigest(), kind=record.kind)


# --------------------------------------------------------------------------------------------------
def tangent_kernel(model, examples: Sequence[Example], query: Query, *, kind: str, pad_token_id: int,
                   measurement: str = "loop", pairs=None, backend: str = "loop", dtype: str = "float64",
                   layers: str | None = None, warnings: Sequence[str] = (), executor=None,
                   shard_examples: int = SHARD_EXAMPLES, progress=None) -> KernelAttribution:
    """Grad-Dot at the final weights: ``s_i = ∇m(θ_T) · ∇f_i(θ_T)`` with ``f_i = −ℓ_i`` (spec §2.7).

    A similarity, not a decomposition: there is no completeness (``completeness=None``, ``b = m(θ_T)``).
    ``executor``: as in :func:`checkpoint_kernel` (one weight point, sharded by training examples).
    """
    from .sharding import FeatureJob, merged_warnings, run_feature_job

    n = len(examples)
    idx = tuple(i for i in range(n) if examples[i] is not None)
    job = FeatureJob(kind=kind, pad_token_id=int(pad_token_id), query=query, examples=tuple(examples), used=idx,
                     points=(("final", 0),), record=None, layers=layers, dtype=dtype, backend=backend,
                     projector=None, key="")
    job, shards, backend_warnings = run_feature_job(model, job, executor=executor, shard_examples=shard_examples,
                                                    progress=progress)
    S = np.zeros((len(query.names), n))
    for _, lo, hi in sorted(shards):
        S[:, list(idx[lo:hi])] = -shards[(0, lo, hi)]["dots"]
    m = shards[min(shards)]["m"]
    q = _pick(query, measurement)
    w = list(warnings) + ["final mode: tangent-kernel similarity at the final weights (Grad-Dot), not a "
                          "decomposition of the output; amounts do not add up to anything"] + \
        merged_warnings(backend_warnings, shards)
    return KernelAttribution(
        mode="final", kernel=KERNEL_NAMES["final"], decomposition=False, measurement=measurement,
        query=_query_meta(query, measurement), b=float(m[q]), m_final=float(m[q]), delta_m=0.0,
        contributions=S[q].copy(), all_contributions={nm: S[k].copy() for k, nm in enumerate(query.names)},
        residual=float("nan"), completeness=None, pairs=pairs, layers=layers or "all",
        backend=job.backend, warnings=tuple(dict.fromkeys(w)),
    )
