"""Where the heavy loops run: in this process (:class:`LocalExecutor`) or on Ray (:class:`RayExecutor`).

An executor runs the shards of a job and hands back their results; the caller merges them in a fixed
order (by token range for the probe), so the output is the same bytes whatever the executor and the
number of workers. Ray is optional (``pip install 'repdiag[ray]'``) and imported only here, lazily.

Ray: one actor per worker holds the model, loaded once in the actor (``repdiag.models.load_model``
with the same id / revision / dtype, or a picklable factory), and serves many shards. Actors are
created with ``max_restarts`` / ``max_task_retries``: a shard whose worker dies is re-run on the
restarted actor, and the merge keys results by shard so none is counted twice.

Same bytes: each probe shard is a whole number of probe batches, so every row is computed in the same
batch as the single-process probe; the actors use the driver's torch thread count (CPU kernels can
round differently with another count), overridable with ``threads``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from .errors import MissingExtraError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    from .models import LoadedModel

EXECUTORS = ("local", "ray")
RAY_INSTALL = "pip install 'repdiag[ray]'"


def _import_ray():
    try:
        import ray  # noqa: PLC0415
    except ImportError as exc:
        raise MissingExtraError(f"--executor ray needs Ray, which is not installed: {RAY_INSTALL}") from exc
    return ray


def model_spec(lm: "LoadedModel", *, trust_remote_code: bool = False) -> dict[str, Any]:
    """The ``load_model`` arguments that rebuild ``lm`` in a worker."""
    if lm.model_id in ("<in-memory>", "", None):
        raise UsageError("a model built in memory cannot be reloaded by Ray workers: pass model=<factory> "
                         "to RayExecutor or load the model from a hub id / folder")
    return {"name_or_path": lm.model_id, "revision": lm.revision, "device": str(lm.device),
            "dtype": str(lm.dtype).replace("torch.", ""), "trust_remote_code": bool(trust_remote_code)}


def _load(spec: Any) -> "LoadedModel":
    if callable(spec):
        return spec()
    from .models import load_model

    spec = dict(spec)
    return load_model(spec.pop("name_or_path"), **spec)


class Executor:
    """Runs shards of work; subclasses: :class:`LocalExecutor`, :class:`RayExecutor`."""

    name = "base"
    n_workers = 1

    def probe_shards(self, lm: "LoadedModel", prompts: Sequence[str], ids: np.ndarray, *, top_k: int,
                     batch_size: int, keep_per_prompt: bool = False,
                     progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
        raise NotImplementedError

    def generate_batches(self, lm: "LoadedModel", policy: Any, prompts: Sequence[str], batches: Sequence[int],
                         kwargs: dict[str, Any], progress: Callable[[int], None] | None = None,
                         ) -> dict[int, tuple[list, list, list]]:
        """``{batch index: measure.generate_batch(...)}`` for ``batches``."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class LocalExecutor(Executor):
    """This process, in ``n_shards`` sequential shards (1 by default; more only to exercise the merge)."""

    name = "local"

    def __init__(self, n_shards: int = 1):
        self.n_shards = max(1, int(n_shards))

    def probe_shards(self, lm, prompts, ids, *, top_k, batch_size, keep_per_prompt=False, progress=None):
        from .transition import probe_shard, probe_shards_of

        out: list[dict[str, Any]] = []
        cache: dict = {}
        for lo, hi in probe_shards_of(len(ids), batch_size, self.n_shards):
            out.append(probe_shard(lm, prompts, ids[lo:hi], top_k=top_k, batch_size=batch_size,
                                   keep_per_prompt=keep_per_prompt, context_cache=cache))
            if progress is not None:
                progress(hi - lo)
        return out

    def generate_batches(self, lm, policy, prompts, batches, kwargs, progress=None):
        from .measure import generate_batch

        out = {}
        for b in batches:
            out[b] = generate_batch(lm, policy, prompts, b, **kwargs)
            if progress is not None:
                progress(len(out[b][0]))
        return out


_WORKER_CLASS = None


def _worker_class(ray: Any) -> Any:
    """The Ray actor class (built once, lazily, so that importing repdiag never imports Ray)."""
    global _WORKER_CLASS
    if _WORKER_CLASS is None:

        class ModelWorker:
            """Holds one loaded model; serves probe shards."""

            def __init__(self, spec: Any, threads: int | None):
                import torch

                if threads:
                    torch.set_num_threads(int(threads))
                self.lm = _load(spec)
                self.contexts: dict = {}  # the prompts' prepared KV caches, reused across shards

            def pid(self) -> int:
                return os.getpid()

            def probe(self, prompts, ids, top_k, batch_size, keep_per_prompt):
                from repdiag.transition import probe_shard

                return probe_shard(self.lm, prompts, ids, top_k=top_k, batch_size=batch_size,
                                   keep_per_prompt=keep_per_prompt, context_cache=self.contexts)

            def generate(self, policy, prompts, batches, kwargs):
                from repdiag.measure import generate_batch

                return {b: generate_batch(self.lm, policy, prompts, b, **kwargs) for b in batches}

        _WORKER_CLASS = ray.remote(ModelWorker)
    return _WORKER_CLASS


class RayExecutor(Executor):
    """Shards on Ray actors that each hold the model.

    ``address``: a running cluster (``ray start --head`` / ``auto`` / ``ray://...``); ``None`` starts a
    local Ray (or joins the one this process already initialised). ``num_workers``: actors (default: the
    cluster's CPUs, at least 1). ``model``: ``load_model`` kwargs or a picklable zero-argument factory;
    default: rebuilt from the ``LoadedModel`` passed to the first job. ``shards_per_worker``: shards per
    actor and job (smaller shards balance load and lose less on a failure; each is ≥ one batch).
    """

    name = "ray"

    def __init__(self, address: str | None = None, num_workers: int | None = None, *, model: Any = None,
                 threads: int | None = None, shards_per_worker: int = 4, num_cpus_per_worker: float = 1,
                 num_gpus_per_worker: float = 0, max_restarts: int = 3, max_task_retries: int = 3,
                 trust_remote_code: bool = False, init_kwargs: dict[str, Any] | None = None):
        ray = _import_ray()
        self.ray = ray
        self._owns_ray = False
        if not ray.is_initialized():
            kw = dict(init_kwargs or {})
            kw.setdefault("include_dashboard", False)
            kw.setdefault("log_to_driver", False)
            if address is None:
                ray.init(**kw)
            else:
                ray.init(address=address, **kw)
            self._owns_ray = True
        if num_workers is None:
            num_workers = max(1, int(ray.cluster_resources().get("CPU", 1) // max(num_cpus_per_worker, 1e-9)))
        if int(num_workers) < 1:
            raise UsageError("--workers must be ≥ 1")
        self.n_workers = int(num_workers)
        if threads is None:
            import torch

            threads = torch.get_num_threads()
        self.threads = threads
        self.model = model
        self.trust_remote_code = trust_remote_code
        self.shards_per_worker = max(1, int(shards_per_worker))
        self.actor_options = {"num_cpus": num_cpus_per_worker, "num_gpus": num_gpus_per_worker,
                              "max_restarts": max_restarts, "max_task_retries": max_task_retries}
        self.actors: list[Any] = []
        self._spec_key: Any = None
        self.tasks_run = 0

    def _ensure_actors(self, lm: "LoadedModel") -> list[Any]:
        spec = self.model if self.model is not None else model_spec(lm, trust_remote_code=self.trust_remote_code)
        key = repr(sorted(spec.items())) if isinstance(spec, dict) else id(spec)
        if self.actors and key == self._spec_key:
            return self.actors
        self._kill_actors()
        options = dict(self.actor_options)
        if isinstance(spec, dict) and str(spec.get("device", "cpu")).startswith("cuda") and not options["num_gpus"]:
            # a CUDA model: one GPU per actor (Ray shows it as cuda:0 inside the actor)
            spec = dict(spec, device="cuda")
            options["num_gpus"] = 1
        cls = _worker_class(self.ray).options(**options)
        self.actors = [cls.remote(spec, self.threads) for _ in range(self.n_workers)]
        self._spec_key = key
        return self.actors

    def worker_pids(self) -> list[int]:
        return self.ray.get([a.pid.remote() for a in self.actors])

    def probe_shards(self, lm, prompts, ids, *, top_k, batch_size, keep_per_prompt=False, progress=None):
        from .transition import probe_shards_of

        ray = self.ray
        actors = self._ensure_actors(lm)
        ids = np.asarray(ids, dtype=np.int64)
        ranges = probe_shards_of(len(ids), batch_size, self.n_workers * self.shards_per_worker)
        prompts_ref = ray.put(list(prompts))
        results: dict[int, dict[str, Any]] = {}  # keyed by shard start: a shard is merged once
        queue = list(range(len(ranges)))
        inflight: dict[Any, tuple[int, int]] = {}  # ref -> (shard, actor)
        free = list(range(len(actors)))
        while queue or inflight:
            while queue and free:
                j, a = queue.pop(0), free.pop(0)
                lo, hi = ranges[j]
                ref = actors[a].probe.remote(prompts_ref, ids[lo:hi], top_k, batch_size, keep_per_prompt)
                inflight[ref] = (j, a)
            done, _ = ray.wait(list(inflight), num_returns=1)
            for ref in done:
                j, a = inflight.pop(ref)
                results[ranges[j][0]] = ray.get(ref)  # re-raises after Ray's retries are exhausted
                self.tasks_run += 1
                free.append(a)
                if progress is not None:
                    progress(ranges[j][1] - ranges[j][0])
        return [results[k] for k in sorted(results)]

    def _run(self, calls: list[tuple[Callable[[Any], Any], int]], progress: Callable[[int], None] | None) -> dict[int, Any]:
        """Run ``calls`` ([(actor -> ObjectRef, weight)]) one at a time per actor; results by call index."""
        ray = self.ray
        results: dict[int, Any] = {}
        queue = list(range(len(calls)))
        inflight: dict[Any, tuple[int, int]] = {}
        free = list(range(len(self.actors)))
        while queue or inflight:
            while queue and free:
                j, a = queue.pop(0), free.pop(0)
                inflight[calls[j][0](self.actors[a])] = (j, a)
            done, _ = ray.wait(list(inflight), num_returns=1)
            for ref in done:
                j, a = inflight.pop(ref)
                results[j] = ray.get(ref)
                self.tasks_run += 1
                free.append(a)
                if progress is not None:
                    progress(calls[j][1])
        return results

    def generate_batches(self, lm, policy, prompts, batches, kwargs, progress=None):
        ray = self.ray
        self._ensure_actors(lm)
        batches = list(batches)
        n_groups = max(1, min(len(batches), self.n_workers * self.shards_per_worker))
        groups = [g.tolist() for g in np.array_split(np.asarray(batches, dtype=np.int64), n_groups) if len(g)]
        prompts_ref = ray.put(list(prompts))
        bs = int(kwargs.get("batch_size", 16))
        calls = [((lambda actor, g=g: actor.generate.remote(policy, prompts_ref, g, kwargs)),
                  sum(len(prompts[b * bs:(b + 1) * bs]) for b in g)) for g in groups]
        out: dict[int, Any] = {}
        for part in self._run(calls, progress).values():
            out.update(part)  # keyed by batch index: a retried group overwrites, never adds
        return out

    def _kill_actors(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []

    def close(self) -> None:
        self._kill_actors()
        if self._owns_ray:
            self.ray.shutdown()
            self._owns_ray = False


def get_executor(name: str = "local", address: str | None = None, workers: int | None = None,
                 **kwargs: Any) -> Executor:
    """``local`` or ``ray`` (``address``: a Ray cluster, default a local one; ``workers``: actors)."""
    name = (name or "local").lower()
    if name == "local":
        if address is not None:
            raise UsageError("--ray-address needs --executor ray")
        return LocalExecutor()
    if name == "ray":
        return RayExecutor(address=address, num_workers=workers, **kwargs)
    raise UsageError(f"unknown --executor {name!r}: use local or ray")
