"""Per-example gradient features cut into shards by weight point (checkpoint) and training shard.

The checkpoint kernel (TracInCP) and the tangent kernel need, at every weight point ``θ_j``, the
measurement values ``m(θ_j)``, their gradient ``G_j = ∇m(θ_j)`` and the products ``G_j · ∇ℓ_i(θ_j)`` of
the used training examples (or, with a projector, their projected gradients). A shard is one point and
one contiguous run of the used examples; its boundaries are multiples of :data:`CHUNK`, the chunk in
which the single-process loop computes gradients, so every number is computed from the same inputs in
the same order wherever the shard runs: the merged result is the same bytes for any executor and any
number of workers. :func:`run_feature_job` runs the shards on an executor
(:class:`repdiag.executors.Executor`; default: this process), which loads shards already finished in a
``--shard-dir`` and saves new ones.

A worker computes a shard with :func:`feature_shard`: it keeps one private work copy of the model (and
the point it last set) in a state dict, so a worker that serves many shards loads and copies the model
once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .data import examples_sha
from .outputs import Query

if TYPE_CHECKING:  # pragma: no cover
    from ..executors import Executor
    from .projection import Projector

__all__ = ["CHUNK", "SHARD_EXAMPLES", "FeatureJob", "feature_layout", "feature_shard", "resolve_backend",
           "run_feature_job", "point_tensors", "merged_warnings"]

#: examples per gradient call (the single-process loop's chunk); shard boundaries are multiples of it
CHUNK = 32
#: default examples per shard (rounded up to a multiple of CHUNK)
SHARD_EXAMPLES = 256


@dataclass(frozen=True)
class FeatureJob:
    """What every shard of one attribution query needs (picklable; sent once to each worker).

    ``points``: ``(source, step)`` with source ``theta0`` / ``checkpoint`` (read from ``record``) or
    ``final`` (the model's own weights). ``used``: the training indices whose features are computed, in
    order. ``backend``: ``loop`` / ``vmap`` once resolved (see :func:`resolve_backend`).
    """

    kind: str
    pad_token_id: int
    query: Query
    examples: tuple
    used: tuple
    points: tuple
    record: str | None
    layers: str | None
    dtype: str
    backend: str
    projector: "Projector | None"
    key: str

    def describe(self) -> dict[str, Any]:
        """The job's identity for a shard folder's fingerprint (everything a shard's numbers depend on)."""
        return {"job": "attribution/features", "kind": self.kind, "pad_token_id": self.pad_token_id,
                "query": self.query.describe(), "examples": examples_sha(e for e in self.examples if e is not None),
                "n_examples": len(self.examples),
                "used": hashlib.sha256(json.dumps(list(self.used)).encode()).hexdigest(),
                "points": [list(p) for p in self.points], "layers": self.layers or "all", "dtype": self.dtype,
                "backend": self.backend, "projector": None if self.projector is None else self.projector.spec(),
                "chunk": CHUNK, "record": None if self.record is None else
                hashlib.sha256((Path(self.record) / "record.json").read_bytes()).hexdigest()}


def feature_layout(n_used: int, n_points: int, shard_examples: int = SHARD_EXAMPLES) -> list[tuple[int, int, int]]:
    """Shards ``(point, lo, hi)`` over positions ``lo:hi`` of the used examples, point by point.

    ``lo`` and ``hi`` are multiples of :data:`CHUNK` (``hi`` may be ``n_used``); a point with no used
    example still gets one empty shard (its ``m(θ_j)`` and ``G_j`` are needed).
    """
    size = max(CHUNK, -(-int(shard_examples) // CHUNK) * CHUNK)
    out = []
    for j in range(n_points):
        starts = range(0, n_used, size) if n_used else [0]
        out += [(j, lo, min(lo + size, n_used)) for lo in starts]
    return out


def _context(model, job: FeatureJob, state: dict) -> dict[str, Any]:
    """The worker's work copy of ``model`` for ``job`` (built once per job, kept in ``state``)."""
    if state.get("key") == job.key:
        return state
    import torch

    from .features import GradientComputer, ParamSpace
    from .kernel import _Measure, work_model
    from .runfile import Record

    state.clear()
    work = work_model(model, getattr(torch, job.dtype))
    space = ParamSpace(work, layers=job.layers)
    state.update(key=job.key, full=ParamSpace(work), space=space,
                 final={n: p.detach().clone() for n, p in work.named_parameters()},
                 record=Record.load(job.record) if job.record is not None else None,
                 meas=_Measure(space, job.query), point=None,
                 gc=GradientComputer(space, job.kind, job.pad_token_id, job.backend))
    return state


def point_tensors(record, source: str, step: int, final: dict) -> dict:
    """The parameter tensors of one weight point (θ0, a recorded checkpoint or the final weights)."""
    if source == "theta0":
        return record.theta0()
    if source == "checkpoint":
        return record.checkpoint(step)
    return final


def _at_point(ctx: dict[str, Any], job: FeatureJob, j: int) -> tuple[Any, Any]:
    """Set the work model to point ``j`` (unless it is there) and return ``(m, G)`` at it."""
    import torch

    if ctx["point"] != j:
        source, step = job.points[j]
        tensors = point_tensors(ctx["record"], source, step, ctx["final"])
        full, final = ctx["full"], ctx["final"]
        full.set(full.flat_from({nm: tensors.get(nm, final[nm]) for nm in full.names}).to(getattr(torch, job.dtype)))
        ctx["point"] = j
        ctx["mG"] = ctx["meas"].grad()
    return ctx["mG"]


def resolve_backend(model, job: FeatureJob, state: dict) -> dict[str, Any]:
    """``{"backend", "warnings"}``: the gradient backend for the whole job, decided once.

    ``loop`` is kept; ``vmap`` / ``auto`` run the self-check (and ``auto`` the speed race) on the first
    chunk of used examples at the first point, as the single-process loop decides on its first call.
    """
    if job.backend == "loop" or not job.used:
        return {"backend": "loop", "warnings": []}
    ctx = _context(model, job, state)
    _at_point(ctx, job, 0)
    gc = ctx["gc"]
    backend = gc.resolve([job.examples[i] for i in job.used[:CHUNK]])
    return {"backend": backend, "warnings": list(gc.warnings)}


def feature_shard(model, job: FeatureJob, shard: tuple[int, int, int], state: dict) -> dict[str, np.ndarray]:
    """One shard ``(point, lo, hi)``: ``m`` (Q,) at the point and, for used examples ``lo:hi``, either
    ``dots`` (Q × n: ``G·∇ℓ_i``) or, with a projector, ``features`` (n × dim) and ``projected_G`` (Q × dim);
    ``warnings``: the gradient backend's."""
    j, lo, hi = shard
    ctx = _context(model, job, state)
    m, G = _at_point(ctx, job, j)
    space, gc, pr = ctx["space"], ctx["gc"], job.projector
    # every shard starts from the job's backend (a vmap failure falls back to loop for the rest of this shard
    # only), so a shard's numbers and warnings depend on the shard alone, not on what its worker ran before
    gc.backend = job.backend
    seen = len(gc.warnings)
    out = {"m": m.numpy().copy()}
    block = np.zeros((hi - lo, pr.dim)) if pr is not None else np.zeros((len(m), hi - lo))
    for k in range(lo, hi, CHUNK):
        part = job.used[k:min(k + CHUNK, hi)]
        g = gc([job.examples[i] for i in part]).double()
        if pr is None:
            block[:, k - lo:k - lo + len(part)] = (G @ g.T).numpy()
        else:
            block[k - lo:k - lo + len(part)] = pr.project(g, space.names, space.numels).numpy()
    if pr is None:
        out["dots"] = block
    else:
        out["features"] = block
        out["projected_G"] = pr.project(G, space.names, space.numels).numpy()
    out["warnings"] = np.array(gc.warnings[seen:], dtype=str)
    return out


def _weights_sha(model) -> str:
    """sha256 of the model's weights (the record's ``params_sha256``)."""
    from .runfile import params_sha256

    return params_sha256(dict(model.named_parameters()))


def merged_warnings(base: Sequence[str], shards: dict) -> list[str]:
    """``base`` then every shard's warnings, in shard order, each once."""
    out = list(base)
    for s in sorted(shards):
        out += [str(w) for w in shards[s]["warnings"]]
    return list(dict.fromkeys(out))


def run_feature_job(model, job: FeatureJob, *, executor: "Executor | None" = None, skip_points: Sequence[int] = (),
                    shard_examples: int = SHARD_EXAMPLES,
                    progress: Callable[[int, int], None] | None = None) -> tuple[FeatureJob, dict, list[str]]:
    """Run every shard of ``job`` and return ``(resolved job, {(point, lo, hi): result}, backend warnings)``.

    ``skip_points``: points whose features are already known (a feature cache hit): one empty shard each,
    for ``m`` and ``G``. With a shard folder on the executor, finished shards are loaded, not recomputed,
    and the backend chosen by the run that started the folder is reused.
    """
    from ..executors import LocalExecutor

    ex = executor if executor is not None else LocalExecutor()
    fields = dict(job.describe(), weights=_weights_sha(model), shard_examples=int(shard_examples))
    key = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]
    job = replace(job, key=key)
    resolved = ex.open_job(fields, lambda: ex.call_one(model, "resolve_features", job))
    job = replace(job, backend=resolved["backend"], key=f"{key}/{resolved['backend']}")
    layout = [s for s in feature_layout(len(job.used), len(job.points), shard_examples) if s[0] not in skip_points]
    layout = sorted(layout + [(j, 0, 0) for j in skip_points])
    tasks = [(f"features-p{j:04d}-{lo:08d}-{hi:08d}", ((j, lo, hi),), 1) for j, lo, hi in layout]
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0], len(tasks))

    results = ex.run_shards(model, "features", (job,), tasks, pack=dict, unpack=dict, progress=tick)
    by_shard = {s: results[name] for s, (name, _, _) in zip(layout, tasks)}
    return job, by_shard, list(resolved.get("warnings", []))
