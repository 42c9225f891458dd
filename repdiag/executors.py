"""Where the heavy loops run: in this process (:class:`LocalExecutor`) or on Ray (:class:`RayExecutor`).

An executor runs the shards of a job on :class:`Worker` objects that each hold the model, and hands back
their results keyed by shard; the caller merges them in a fixed order (by token range for the probe, by
weight point and training-example range for attribution), so the output is the same bytes whatever the
executor and the number of workers. Ray is optional (``pip install 'repdiag[ray]'``) and imported only
here, lazily.

Ray: one actor per worker holds the model, loaded once in the actor (``repdiag.models.load_model``
with the same id / revision / dtype, or a picklable factory), and serves many shards. Actors are
created with ``max_restarts`` / ``max_task_retries``: a shard whose worker dies is re-run on the
restarted actor, and the merge keys results by shard so none is counted twice.

Shard folder (``shard_dir``, :mod:`repdiag.shards`): each finished shard is written atomically as it
arrives, with a manifest that fingerprints the job; a rerun with the same folder loads the shards
present and computes only the others (with either executor), and a folder of another job is refused.
The probe, the trace jobs (one shard per job) and the measurement's ``generate()`` batches (one shard
per batch) are stored this way. ``job_folders=True`` (``repdiag analyze``, several jobs in one run): each
job in its own subfolder, ``trace``, ``measure-<policy>`` and ``probe-<job fingerprint>``.

Same bytes: each probe shard is a whole number of probe batches and each attribution shard a whole
number of gradient chunks, so every number is computed from the same inputs as in the single-process
loop; the actors use the driver's torch thread count (CPU kernels can round differently with another
count), overridable with ``threads``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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
    if getattr(lm, "model_id", None) in ("<in-memory>", "", None):
        raise UsageError("a model built in memory cannot be reloaded by Ray workers: pass model=<factory> "
                         "to RayExecutor or load the model from a hub id / folder")
    return {"name_or_path": lm.model_id, "revision": lm.revision, "device": str(lm.device),
            "dtype": str(lm.dtype).replace("torch.", ""), "trust_remote_code": bool(trust_remote_code)}


def _model_fields(lm: "LoadedModel") -> dict[str, Any]:
    """What a stored job's results depend on in the model (part of its fingerprint)."""
    return {"model_id": lm.model_id, "revision": lm.revision, "dtype": str(lm.dtype).replace("torch.", ""),
            "device": str(lm.device), "tokenizer": lm.tokenizer_fingerprint, "vocab_size": int(lm.vocab_size)}


def _describe(value: Any) -> Any:
    """A JSON value describing ``value`` for a fingerprint: itself when plain, else its type and plain fields."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    kind = value if isinstance(value, type) else type(value)
    out: dict[str, Any] = {"type": f"{kind.__module__}.{kind.__qualname__}"}
    if not isinstance(value, type) and hasattr(value, "__dict__"):  # e.g. a logits processor's settings
        out["fields"] = {k: v for k, v in sorted(vars(value).items())
                         if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None)))}
    return out


def _load(spec: Any) -> "LoadedModel":
    if callable(spec):
        return spec()
    from .models import load_model

    spec = dict(spec)
    return load_model(spec.pop("name_or_path"), **spec)


class Worker:
    """Holds one model and serves shards of any job (in this process, or inside a Ray actor).

    ``lm``: a :class:`~repdiag.models.LoadedModel` (the attribution jobs also take a bare ``nn.Module``).
    Caches kept across shards: the prompts' prepared KV caches (probe) and the attribution job's work
    copy of the model at its current weight point.
    """

    def __init__(self, lm: Any) -> None:
        self.lm = lm
        self.contexts: dict = {}  # the prompts' prepared KV caches, reused across shards
        self.feature_state: dict = {}  # the attribution job's work model, reused across shards

    def probe(self, prompts, ids, top_k, batch_size, keep_per_prompt):
        """One probe shard (:func:`repdiag.transition.probe_shard`)."""
        from repdiag.transition import probe_shard

        return probe_shard(self.lm, prompts, ids, top_k=top_k, batch_size=batch_size,
                           keep_per_prompt=keep_per_prompt, context_cache=self.contexts)

    def generate(self, policy, prompts, batches, kwargs):
        """``{batch index: measure.generate_batch(...)}`` for ``batches``."""
        from repdiag.measure import generate_batch

        return {b: generate_batch(self.lm, policy, prompts, b, **kwargs) for b in batches}

    def trace(self, kwargs, batch, mode, job_seed, prompt_offset):
        """One trace job (:func:`repdiag.transition.trace_job`); ``kwargs`` are shared by the job's tasks."""
        from repdiag.transition import trace_job

        return trace_job(self.lm, batch, mode, job_seed, prompt_offset=prompt_offset, **kwargs)

    def _module(self) -> Any:
        return getattr(self.lm, "model", self.lm)

    def resolve_features(self, job):
        """The attribution job's gradient backend (:func:`repdiag.attribution.sharding.resolve_backend`)."""
        from repdiag.attribution.sharding import resolve_backend

        return resolve_backend(self._module(), job, self.feature_state)

    def features(self, job, shard):
        """One attribution feature shard (:func:`repdiag.attribution.sharding.feature_shard`)."""
        from repdiag.attribution.sharding import feature_shard

        return feature_shard(self._module(), job, shard, self.feature_state)


Task = tuple[str, tuple, int]  # (shard name, arguments after the shared ones, progress weight)


class Executor:
    """Runs shards of work; subclasses: :class:`LocalExecutor`, :class:`RayExecutor`.

    ``shard_dir``: a folder where each finished shard is written (:class:`repdiag.shards.ShardStore`);
    a rerun with the same folder loads those shards instead of recomputing them. ``shards_computed`` /
    ``shards_loaded`` count both kinds in this executor's jobs. ``job_folders``: one subfolder of
    ``shard_dir`` per job (for a run of several jobs, e.g. ``repdiag analyze``); else the folder holds one job.
    """

    name = "base"
    n_workers = 1

    def __init__(self, shard_dir: str | os.PathLike[str] | None = None, *, job_folders: bool = False) -> None:
        from .shards import ShardStore

        self.store = ShardStore(shard_dir, per_job=job_folders) if shard_dir is not None else None
        self._job_store = self.store  # the store of the job opened last (open_job)
        self.shards_computed = 0
        self.shards_loaded = 0

    @property
    def threads(self) -> int:
        """The torch thread count of the processes that compute shards (part of a shard's fingerprint)."""
        import torch

        return torch.get_num_threads()

    def _map(self, lm: Any, method: str, shared: tuple, tasks: Sequence[tuple],
             on_result: Callable[[int, Any], None]) -> None:
        """Call ``Worker.<method>(*shared, *tasks[k])`` for every k; ``on_result(k, result)`` as each ends."""
        raise NotImplementedError

    def _probe_split(self) -> int:
        """Shards per probe job when no shard folder fixes the layout."""
        return 1

    def call_one(self, lm: Any, method: str, *args: Any) -> Any:
        """``Worker.<method>(*args)`` on one worker (not a shard: never stored)."""
        out: dict[int, Any] = {}
        self._map(lm, method, (), [args], out.__setitem__)
        return out[0]

    def open_job(self, fields: dict[str, Any], resolve: Callable[[], dict[str, Any]] | None = None,
                 folder: str | None = None) -> dict[str, Any]:
        """Start a job: its once-per-job choices (``resolve()``, or those stored in the shard folder).

        ``folder``: the job's subfolder when the executor has ``job_folders`` (ignored otherwise)."""
        import torch

        from . import __version__

        if self.store is None:
            return resolve() if resolve is not None else {}
        job = dict(fields, threads=int(self.threads), torch=torch.__version__, repdiag=__version__)
        self._job_store = self.store.job(folder)
        return self._job_store.begin(job, resolve)

    def run_shards(self, lm: Any, method: str, shared: tuple, tasks: Sequence[Task], *,
                   pack: Callable[[Any], dict], unpack: Callable[[dict], Any],
                   progress: Callable[[int], None] | None = None) -> dict[str, Any]:
        """``{shard name: result}`` for ``tasks``: loaded from the shard folder when there, else computed
        by ``Worker.<method>`` and (with a folder) saved as soon as it finishes. Call :meth:`open_job` first."""
        results: dict[str, Any] = {}
        todo: list[Task] = []
        for task in tasks:
            hit = self._job_store.load(task[0]) if self._job_store is not None else None
            if hit is None:
                todo.append(task)
                continue
            results[task[0]] = unpack(hit)
            self.shards_loaded += 1
            if progress is not None:
                progress(task[2])

        def finished(k: int, result: Any) -> None:
            name, _, weight = todo[k]
            if self._job_store is not None:
                self._job_store.save(name, pack(result))
            results[name] = result  # keyed by shard: a retried shard is merged once
            self.shards_computed += 1
            if progress is not None:
                progress(weight)

        self._map(lm, method, shared, [t[1] for t in todo], finished)
        return results

    def trace_jobs(self, lm: "LoadedModel", tasks: Sequence[tuple[list[list[int]], str, int, int]],
                   kwargs: dict[str, Any], progress: Callable[[int], None] | None = None) -> list[list[dict[str, Any]]]:
        """:func:`repdiag.transition.trace_job` for every ``(batch, mode, job seed, prompt offset)``, in task order.

        Each job seeds its own sampling, so a job decodes alike on any worker; the caller accumulates
        the results in task order (the same sums as one process). With a shard folder each job is a
        shard (``trace-<job>``), stored as plain arrays (:func:`repdiag.shards.pack_trace_job`)."""
        if self.store is not None:
            return self._stored_trace_jobs(lm, tasks, kwargs, progress)
        out: dict[int, Any] = {}

        def finished(k: int, blocks: Any) -> None:
            out[k] = blocks  # keyed by job: a retried job is merged once
            if progress is not None:
                progress(1)

        self._map(lm, "trace", (kwargs,), list(tasks), finished)
        return [out[k] for k in range(len(tasks))]

    def _stored_trace_jobs(self, lm, tasks, kwargs, progress):
        from .shards import pack_trace_job, unpack_trace_job

        tasks = [(list(map(list, batch)), str(mode), int(job_seed), int(lo)) for batch, mode, job_seed, lo in tasks]
        content = json.dumps([[b, m, s, lo] for b, m, s, lo in tasks], separators=(",", ":"))
        self.open_job({"job": "trace", **_model_fields(lm), "n_jobs": len(tasks),
                       "tasks": hashlib.sha256(content.encode("utf-8")).hexdigest(),
                       "modes": sorted({t[1] for t in tasks}), "seeds": [t[2] for t in tasks],
                       **{k: _describe(kwargs[k]) for k in sorted(kwargs)}}, folder="trace")
        named = [(f"trace-{k:05d}", t, 1) for k, t in enumerate(tasks)]
        out = self.run_shards(lm, "trace", (kwargs,), named, pack=pack_trace_job, unpack=unpack_trace_job,
                              progress=progress)
        return [out[name] for name, _, _ in named]

    def _stored_generate_batches(self, lm, policy, prompts, batches, kwargs, progress):
        """:meth:`generate_batches` through the shard folder: one shard per batch (``batch-<index>``)."""
        from .shards import pack_generate_shard, unpack_generate_shard
        from .transition import prompts_fingerprint

        prompts = list(prompts)
        bs = int(kwargs.get("batch_size", 16))
        factory = kwargs.get("monitor_factory")
        settings = {k: _describe(v) for k, v in sorted(kwargs.items()) if k != "monitor_factory"}
        gen_kwargs = dict(policy.generate_kwargs(eos_token_id=lm.eos_token_id))
        self.open_job({"job": "measure", **_model_fields(lm), "prompts": prompts_fingerprint(prompts),
                       "n_prompts": len(prompts), "batches": [int(b) for b in batches],
                       "policy": policy.name, "params": {k: _describe(v) for k, v in sorted(policy.params.items())},
                       "generate_kwargs": {k: _describe(v) for k, v in sorted(gen_kwargs.items())},
                       **settings, "monitor": None if factory is None else _describe(factory)},
                      folder="measure-" + re.sub(r"[^A-Za-z0-9._-]", "_", policy.name))
        named = [(f"batch-{int(b):05d}", ([int(b)], kwargs), len(prompts[b * bs:(b + 1) * bs])) for b in batches]
        out = self.run_shards(lm, "generate", (policy, prompts), named, pack=pack_generate_shard,
                              unpack=unpack_generate_shard, progress=progress)
        return {int(b): out[name][int(b)] for (name, _, _), b in zip(named, batches)}

    def probe_shards(self, lm: "LoadedModel", prompts: Sequence[str], ids: np.ndarray, *, top_k: int,
                     batch_size: int, keep_per_prompt: bool = False,
                     progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
        """:func:`repdiag.transition.probe_shard` results for ``ids`` cut into whole batches, in row order."""
        from .shards import fingerprint, pack_probe_shard, unpack_probe_shard
        from .transition import probe_shards_of, prompts_fingerprint

        ids = np.asarray(ids, dtype=np.int64)
        split = self.store.probe_shards if self.store is not None else self._probe_split()
        ranges = probe_shards_of(len(ids), batch_size, split)
        fields = {"job": "probe", "model_id": lm.model_id, "revision": lm.revision,
                  "dtype": str(lm.dtype).replace("torch.", ""), "device": str(lm.device),
                  "tokenizer": lm.tokenizer_fingerprint, "vocab_size": int(lm.vocab_size),
                  "prompts": prompts_fingerprint(list(prompts)), "n_prompts": len(prompts),
                  "rows": hashlib.sha256(ids.astype("<i8").tobytes()).hexdigest(), "n_rows": len(ids),
                  "top_k": int(top_k), "batch_size": int(batch_size), "keep_per_prompt": bool(keep_per_prompt),
                  "ranges": [list(r) for r in ranges]}
        # with job folders (analyze: one probe job per round of reached rows) the folder is named by the job
        self.open_job(fields, folder=f"probe-{fingerprint(fields)[:16]}")
        tasks = [(f"probe-{lo:08d}-{hi:08d}", (ids[lo:hi], top_k, batch_size, keep_per_prompt), hi - lo)
                 for lo, hi in ranges]
        out = self.run_shards(lm, "probe", (list(prompts),), tasks, pack=pack_probe_shard,
                              unpack=unpack_probe_shard, progress=progress)
        return [out[name] for name, _, _ in tasks]

    def generate_batches(self, lm: "LoadedModel", policy: Any, prompts: Sequence[str], batches: Sequence[int],
                         kwargs: dict[str, Any], progress: Callable[[int], None] | None = None,
                         ) -> dict[int, tuple[list, list, list]]:
        """``{batch index: measure.generate_batch(...)}`` for ``batches``.

        With a shard folder each batch is a shard, loaded when present (any executor)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class LocalExecutor(Executor):
    """This process, in ``n_shards`` sequential probe shards (1 by default; more only to exercise the merge)."""

    name = "local"

    def __init__(self, n_shards: int = 1, *, shard_dir: str | os.PathLike[str] | None = None,
                 job_folders: bool = False):
        super().__init__(shard_dir, job_folders=job_folders)
        self.n_shards = max(1, int(n_shards))
        self._worker: tuple[Any, Worker] | None = None

    def _probe_split(self) -> int:
        return self.n_shards

    def _map(self, lm, method, shared, tasks, on_result):
        if self._worker is None or self._worker[0] is not lm:
            self._worker = (lm, Worker(lm))
        fn = getattr(self._worker[1], method)
        for k, args in enumerate(tasks):
            on_result(k, fn(*shared, *args))

    def close(self) -> None:
        self._worker = None  # drops the worker's caches (prompt KV caches, attribution work copy)

    def generate_batches(self, lm, policy, prompts, batches, kwargs, progress=None):
        if self.store is not None:
            return self._stored_generate_batches(lm, policy, prompts, batches, kwargs, progress)
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

        class ModelWorker(Worker):
            """A :class:`Worker` in a Ray actor: loads its model once, with the driver's thread count."""

            def __init__(self, spec: Any, threads: int | None):
                import torch

                if threads:
                    torch.set_num_threads(int(threads))
                super().__init__(_load(spec))

            def pid(self) -> int:
                return os.getpid()

        _WORKER_CLASS = ray.remote(ModelWorker)
    return _WORKER_CLASS


class RayExecutor(Executor):
    """Shards on Ray actors that each hold the model.

    ``address``: a running cluster (``ray start --head`` / ``auto`` / ``ray://...``); ``None`` starts a
    local Ray (or joins the one this process already initialised). ``num_workers``: actors (default: the
    cluster's CPUs, at least 1). ``model``: ``load_model`` kwargs or a picklable zero-argument factory;
    default: rebuilt from the ``LoadedModel`` passed to the first job. ``shards_per_worker``: probe shards
    per actor and job (smaller shards balance load and lose less on a failure; each is ≥ one batch).
    ``shard_dir``: see :class:`Executor`.
    """

    name = "ray"

    def __init__(self, address: str | None = None, num_workers: int | None = None, *, model: Any = None,
                 threads: int | None = None, shards_per_worker: int = 4, num_cpus_per_worker: float = 1,
                 num_gpus_per_worker: float = 0, max_restarts: int = 3, max_task_retries: int = 3,
                 trust_remote_code: bool = False, init_kwargs: dict[str, Any] | None = None,
                 shard_dir: str | os.PathLike[str] | None = None, job_folders: bool = False):
        super().__init__(shard_dir, job_folders=job_folders)
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
        self._threads = int(threads)
        self.model = model
        self.trust_remote_code = trust_remote_code
        self.shards_per_worker = max(1, int(shards_per_worker))
        self.actor_options = {"num_cpus": num_cpus_per_worker, "num_gpus": num_gpus_per_worker,
                              "max_restarts": max_restarts, "max_task_retries": max_task_retries}
        self.actors: list[Any] = []
        self._spec_key: Any = None
        self.tasks_run = 0

    @property
    def threads(self) -> int:
        return self._threads

    def _probe_split(self) -> int:
        return self.n_workers * self.shards_per_worker

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

    def _run(self, calls: list[Callable[[Any], Any]], on_result: Callable[[int, Any], None]) -> None:
        """Run ``calls`` (actor -> ObjectRef) one at a time per actor; ``on_result(index, result)`` as each ends."""
        ray = self.ray
        queue = list(range(len(calls)))
        inflight: dict[Any, tuple[int, int]] = {}
        free = list(range(len(self.actors)))
        while queue or inflight:
            while queue and free:
                j, a = queue.pop(0), free.pop(0)
                inflight[calls[j](self.actors[a])] = (j, a)
            done, _ = ray.wait(list(inflight), num_returns=1)
            for ref in done:
                j, a = inflight.pop(ref)
                result = ray.get(ref)  # re-raises after Ray's retries are exhausted
                self.tasks_run += 1
                free.append(a)
                on_result(j, result)

    def _map(self, lm, method, shared, tasks, on_result):
        self._ensure_actors(lm)
        refs = [self.ray.put(a) for a in shared]
        self._run([(lambda actor, args=args: getattr(actor, method).remote(*refs, *args)) for args in tasks],
                  on_result)

    def generate_batches(self, lm, policy, prompts, batches, kwargs, progress=None):
        if self.store is not None:
            return self._stored_generate_batches(lm, policy, prompts, batches, kwargs, progress)
        batches = list(batches)
        n_groups = max(1, min(len(batches), self.n_workers * self.shards_per_worker))
        groups = [g.tolist() for g in np.array_split(np.asarray(batches, dtype=np.int64), n_groups) if len(g)]
        bs = int(kwargs.get("batch_size", 16))
        out: dict[int, Any] = {}

        def merge(k: int, part: dict) -> None:
            out.update(part)  # keyed by batch index: a retried group overwrites, never adds
            if progress is not None:
                progress(sum(len(prompts[b * bs:(b + 1) * bs]) for b in groups[k]))

        self._map(lm, "generate", (policy, list(prompts)), [(g, kwargs) for g in groups], merge)
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
                 shard_dir: str | os.PathLike[str] | None = None, job_folders: bool = False,
                 **kwargs: Any) -> Executor:
    """``local`` or ``ray`` (``address``: a Ray cluster, default a local one; ``workers``: actors;
    ``shard_dir``: where finished shards are written and, on a rerun, loaded from; ``job_folders``: one
    subfolder of it per job)."""
    name = (name or "local").lower()
    if name == "local":
        if address is not None:
            raise UsageError("--ray-address needs --executor ray")
        return LocalExecutor(shard_dir=shard_dir, job_folders=job_folders)
    if name == "ray":
        return RayExecutor(address=address, num_workers=workers, shard_dir=shard_dir, job_folders=job_folders,
                           **kwargs)
    raise UsageError(f"unknown --executor {name!r}: use local or ray")
