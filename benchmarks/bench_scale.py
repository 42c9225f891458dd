"""Local vs Ray probe (issue 10): speed-up with 1 and 2 workers, and the overhead per task.

t5-small-shaped model with random weights (the model of ``bench_probe.py``, saved to a temporary folder
so that every Ray actor loads it with ``repdiag.models.load_model``, once per actor), one prompt, the
first ``--rows`` token rows, batch 64, K = 64, ``--threads`` torch threads in the driver and in every
actor. Each configuration builds the same rows and the script asserts that the saved ``.npz`` is the
same bytes as the local build.

Reported per Ray configuration: the actors' start-up (process + imports + model load, paid once per
actor and reused by later jobs), the build's wall time, the speed-up over local, and the overhead per
task: ``(wall with 1 worker − local wall) / tasks`` (the scheduling, serialisation and per-shard prompt
preparation that the sharding adds).

    .venv/bin/python benchmarks/bench_scale.py --rows 2048

``--attribution`` measures ``repdiag attribute``'s per-example gradient features instead: the bundled
default model (its final weights, final mode = one weight point), the first ``--examples`` examples of
its training record, loop backend, shards of 32 examples; one process vs Ray with 1 and 2 workers
(each actor loads the model once), gradients/s in all and per worker, and the scores asserted to be
the same bytes as the one-process run:

    .venv/bin/python benchmarks/bench_scale.py --attribution --examples 256
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))


def _sha(tm, folder: Path, name: str) -> str:
    path = folder / name
    tm.save(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", default="1,2", help="comma list of Ray worker counts")
    ap.add_argument("--shards-per-worker", type=int, default=4)
    ap.add_argument("--fine-shards", type=int, default=32,
                    help="also 1 worker with this many shards (one batch each at the defaults): marginal cost per task")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--attribution", action="store_true", help="benchmark attribution's gradient features instead")
    ap.add_argument("--examples", type=int, default=256, help="--attribution: training examples")
    args = ap.parse_args()
    if args.attribution:
        bench_attribution(args)
        return

    import ray

    from bench_probe import build_model
    from repdiag.executors import RayExecutor
    from repdiag.models import load_model
    from repdiag.transition import build_probe

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    src = build_model()
    src.model.save_pretrained(tmp / "model")
    src.tokenizer.save_pretrained(tmp / "model")
    del src
    lm = load_model(str(tmp / "model"))
    prompts = ["translate a b c d e f g h i j k l m n o p"]
    rows = np.arange(args.rows)
    kw = dict(rows=rows, top_k=args.top_k, batch_size=args.batch_size)
    print(f"model: t5-small shape, random weights, vocab {lm.vocab_size}; rows {args.rows}, batch {args.batch_size}, "
          f"K {args.top_k}, torch threads {args.threads}, {os.cpu_count()} CPUs, ray {ray.__version__}")

    t0 = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=16)  # logical CPUs: a scheduling label
    print(f"ray.init: {time.perf_counter() - t0:.2f} s")
    configs = [(int(w), args.shards_per_worker) for w in args.workers.split(",") if w]
    if args.fine_shards:
        configs.append((1, args.fine_shards))
    executors = {}
    for n, spw in configs:
        ex = RayExecutor(num_workers=n, threads=args.threads, shards_per_worker=spw)
        t0 = time.perf_counter()
        ex._ensure_actors(lm)
        ex.worker_pids()  # waits until every actor has loaded the model
        print(f"ray {n} worker(s), {spw} shards/worker: actor start-up (process, imports, model load) "
              f"{time.perf_counter() - t0:.2f} s")
        executors[(n, spw)] = ex
    warm = dict(kw, rows=rows[:args.batch_size])
    build_probe(lm, prompts, **warm)
    for ex in executors.values():
        build_probe(lm, prompts, executor=ex, **warm)

    walls: dict = {"local": []}
    tasks: dict = {}
    ref = None
    for r in range(args.rounds):
        t0 = time.perf_counter()
        tm = build_probe(lm, prompts, **kw)
        walls["local"].append(time.perf_counter() - t0)
        if ref is None:
            ref = _sha(tm, tmp, "local.npz")
        for key, ex in executors.items():
            before = ex.tasks_run
            t0 = time.perf_counter()
            tm = build_probe(lm, prompts, executor=ex, **kw)
            walls.setdefault(key, []).append(time.perf_counter() - t0)
            tasks[key] = ex.tasks_run - before
            assert _sha(tm, tmp, "ray.npz") == ref, f"Ray {key} gave different bytes"
        print(f"round {r + 1}: " + ", ".join(f"{k}: {v[-1]:.2f} s" for k, v in walls.items()))
    med = {k: float(np.median(v)) for k, v in walls.items()}
    local = med["local"]
    print(f"local: median {local:.2f} s wall, {args.rows / local:.1f} rows/s")
    for (n, spw), wall in ((k, v) for k, v in med.items() if k != "local"):
        t = tasks[(n, spw)]
        print(f"ray {n} worker(s), {t} tasks of {args.rows // t} rows: median {wall:.2f} s wall, "
              f"{args.rows / wall:.1f} rows/s, speed-up {local / wall:.2f}x, same bytes: True")
    base = med.get((1, args.shards_per_worker))
    if base is not None:
        t1 = tasks[(1, args.shards_per_worker)]
        print(f"overhead per task, 1 worker vs local: {(base - local) / t1 * 1000:.0f} ms "
              f"({(base - local) / local:+.1%} of the local wall, {t1} tasks)")
        fine = med.get((1, args.fine_shards)) if args.fine_shards else None
        if fine is not None:
            tf = tasks[(1, args.fine_shards)]
            print(f"marginal overhead per task ({tf} vs {t1} tasks, 1 worker): {(fine - base) / (tf - t1) * 1000:.0f} ms")
    for ex in executors.values():
        ex.close()
    ray.shutdown()


def bench_attribution(args: argparse.Namespace) -> None:
    """Gradients/s of the final-mode feature shards: one process vs Ray with each ``--workers`` count."""
    import ray

    from repdiag.attribution import Query, Record, tangent_kernel
    from repdiag.executors import RayExecutor, model_spec
    from repdiag.models import DEFAULT_MODEL_DIR, load_model

    torch.set_num_threads(args.threads)
    lm = load_model("default")
    examples = Record.load(DEFAULT_MODEL_DIR / "record").examples()[:args.examples]
    prompt = "def add(a, b):"
    enc = lm.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        gen = lm.model.generate(**enc, max_new_tokens=16, do_sample=False, num_beams=1)[0].tolist()
    query = Query.build(lm.kind, enc["input_ids"][0].tolist(), gen, decoder_start_token_id=lm.decoder_start_token_id)
    n_params = sum(p.numel() for p in lm.model.parameters())
    kw = dict(kind=lm.kind, pad_token_id=lm.pad_token_id, measurement="sequence", backend="loop", shard_examples=32)
    print(f"default model ({n_params:,} parameters), {len(examples)} examples, final mode (one weight point), "
          f"loop backend, shards of 32, torch threads {args.threads}, {os.cpu_count()} CPUs, ray {ray.__version__}")
    t0 = time.perf_counter()
    ref = tangent_kernel(lm.model, examples, query, **kw)
    local = time.perf_counter() - t0
    n = len(examples)
    print(f"| one process | 1 | {local:.2f} | {n / local:.1f} | {n / local:.1f} | 1.00× |")
    t0 = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=16)
    print(f"ray.init: {time.perf_counter() - t0:.2f} s")
    for w in [int(x) for x in args.workers.split(",") if x]:
        with RayExecutor(num_workers=w, threads=args.threads, model=model_spec(lm)) as ex:
            t0 = time.perf_counter()
            ex._ensure_actors(lm)
            ex.worker_pids()  # waits until every actor has loaded the model
            start = time.perf_counter() - t0
            t0 = time.perf_counter()
            res = tangent_kernel(lm.model, examples, query, executor=ex, **kw)
            wall = time.perf_counter() - t0
            assert res.contributions.tobytes() == ref.contributions.tobytes(), f"Ray {w} gave different scores"
            print(f"| Ray, {w} worker(s) | {ex.shards_computed} | {wall:.2f} | {n / wall:.1f} | {n / wall / w:.1f} | "
                  f"{local / wall:.2f}× |  (actor start-up {start:.1f} s, same bytes: True)")
    ray.shutdown()


if __name__ == "__main__":
    main()
