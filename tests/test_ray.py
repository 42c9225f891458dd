"""Executors (issue 10): the probe, analyze's generate() and attribute's gradient features sharded over Ray
actors give the same bytes as one process, also when a worker dies or a run resumes from a shard folder.

The Ray tests run on a local two-node ``ray.cluster_utils.Cluster`` (CPU only, one CPU per node) and are
skipped when Ray is not installed (``pip install 'repdiag[ray]'``). The rest run everywhere. The shard
folder without Ray: ``tests/test_shards.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys

import numpy as np
import pytest

from repdiag.executors import LocalExecutor, get_executor
from repdiag.transition import build_probe, load_matrix, probe_shards_of


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    from tiny_models import save_tiny

    return save_tiny("t5", tmp_path_factory.mktemp("t5") / "t5")


# ----------------------------------------------------------------------------------------------
# without Ray
# ----------------------------------------------------------------------------------------------


def test_probe_shards_are_whole_batches():
    for n, b, k in [(100, 8, 3), (64, 64, 4), (7, 4, 10), (1000, 64, 7), (0, 4, 2)]:
        ranges = probe_shards_of(n, b, k)
        assert [lo for lo, _ in ranges] == sorted(lo for lo, _ in ranges)
        assert sum(hi - lo for lo, hi in ranges) == n
        assert all(lo % b == 0 for lo, _ in ranges) and len(ranges) <= max(k, 0)
        assert all(ranges[i][1] == ranges[i + 1][0] for i in range(len(ranges) - 1))


def test_local_shards_merge_to_the_same_bytes(tiny_t5, tmp_path):
    from repdiag.models import load_model

    lm = load_model(str(tiny_t5))
    ref = build_probe(lm, ["a b c", "d e"], batch_size=4, keep_per_prompt=True)
    ref.save(tmp_path / "ref.npz")
    for n in (1, 3, 50):
        tm = build_probe(lm, ["a b c", "d e"], batch_size=4, keep_per_prompt=True, executor=LocalExecutor(n))
        tm.save(tmp_path / f"s{n}.npz")
        assert _sha(tmp_path / f"s{n}.npz") == _sha(tmp_path / "ref.npz")
        for a, b in zip(tm.per_prompt, ref.per_prompt):
            assert (a.csr() != b.csr()).nnz == 0 and np.array_equal(a.residual, b.residual)


def test_executor_ray_without_ray_is_exit_2(tiny_t5, tmp_path, monkeypatch, capsys):
    from repdiag.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    rc = main(["-q", "matrix", "build", str(tiny_t5), "--mode", "probe", "--executor", "ray",
               "-o", str(tmp_path / "m.npz")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "pip install 'repdiag[ray]'" in " ".join(err.split())
    assert not (tmp_path / "m.npz").exists()


def test_attribute_executor_ray_without_ray_is_exit_2(tmp_path, monkeypatch, capsys):
    from repdiag.cli import main
    from test_shards import make_attribution_run

    run = make_attribution_run(tmp_path, n_pairs=8)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    rc = main(run["cli"] + ["--mode", "checkpoints", "--executor", "ray", "--dump", str(tmp_path / "d")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "pip install 'repdiag[ray]'" in " ".join(err.split()) and err.count("error:") == 1
    assert not (tmp_path / "d").exists()
    assert main(run["cli"] + ["--executor", "dask"]) == 2
    assert main(run["cli"] + ["--workers", "2"]) == 2


def test_executor_option_errors(tiny_t5, tmp_path, capsys):
    from repdiag.cli import main
    from repdiag.errors import UsageError

    assert main(["-q", "matrix", "build", str(tiny_t5), "--mode", "probe", "--executor", "dask",
                 "-o", str(tmp_path / "m.npz")]) == 2
    assert main(["-q", "matrix", "build", str(tiny_t5), "--mode", "probe", "--workers", "2",
                 "-o", str(tmp_path / "m.npz")]) == 2
    with pytest.raises(UsageError):
        get_executor("local", address="auto")


# ----------------------------------------------------------------------------------------------
# on a local two-node Ray cluster
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'repdiag[ray]'")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_ray_probe_cli_same_bytes(ray_cluster, tiny_t5, tmp_path):
    """`repdiag matrix build --mode probe --executor ray` on two nodes == the local build, byte for byte."""
    from repdiag.cli import main

    local = tmp_path / "local.npz"
    dist = tmp_path / "ray.npz"
    base = ["-q", "matrix", "build", str(tiny_t5), "--mode", "probe", "--batch-size", "4"]
    assert main(base + ["-o", str(local)]) == 0
    assert main(base + ["--executor", "ray", "--ray-address", ray_cluster.address, "--workers", "2",
                        "-o", str(dist)]) == 0
    assert _sha(dist) == _sha(local)
    assert load_matrix(dist).meta["builder"] == "probe"


def test_ray_trace_cli_same_bytes(ray_cluster, tiny_t5, tmp_path, monkeypatch):
    """`repdiag matrix build --mode trace --executor ray`: the decoding jobs on two nodes, the same .npz."""
    from repdiag.cli import main
    from repdiag.executors import RayExecutor

    jobs = []
    real = RayExecutor.trace_jobs

    def spy(self, lm, tasks, kwargs, progress=None):
        jobs.append(len(tasks))
        return real(self, lm, tasks, kwargs, progress)

    monkeypatch.setattr(RayExecutor, "trace_jobs", spy)
    local = tmp_path / "local.npz"
    dist = tmp_path / "ray.npz"
    base = ["-q", "matrix", "build", str(tiny_t5), "--mode", "trace", "--batch-size", "3", "--max-new-tokens", "6"]
    assert main(base + ["-o", str(local)]) == 0
    assert main(base + ["--executor", "ray", "--ray-address", ray_cluster.address, "--workers", "2",
                        "-o", str(dist)]) == 0
    assert jobs and jobs[0] >= 4  # greedy and sample jobs of several prompt batches
    assert _sha(dist) == _sha(local)
    assert load_matrix(dist).meta["builder"] == "trace"


def test_ray_worker_killed_mid_build_same_result(ray_cluster, tiny_t5, tmp_path):
    """SIGKILL one actor's process after the first shard: Ray restarts it, retries its shard, same bytes."""
    from repdiag.executors import RayExecutor
    from repdiag.models import load_model

    lm = load_model(str(tiny_t5))
    prompts = ["a b c", "d e"]
    ref = build_probe(lm, prompts, batch_size=2)
    ref.save(tmp_path / "ref.npz")
    with RayExecutor(num_workers=2, shards_per_worker=4) as ex:
        ex._ensure_actors(lm)
        pids = ex.worker_pids()
        killed = []

        def tick(n: int, total: int) -> None:
            if not killed:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])

        tm = build_probe(lm, prompts, batch_size=2, executor=ex, progress=tick)
        assert killed and ex.worker_pids()[0] != pids[0]  # the actor was restarted
        assert ex.tasks_run == len(probe_shards_of(lm.vocab_size, 2, 8))  # each shard merged once
    tm.save(tmp_path / "ray.npz")
    assert _sha(tmp_path / "ray.npz") == _sha(tmp_path / "ref.npz")


def test_ray_analyze_same_report_bytes(ray_cluster, tmp_path, monkeypatch):
    """`repdiag analyze --executor ray`: the trace jobs, generate() batches and the probe of the rows
    the simulation reaches on two nodes, same report.json bytes."""
    from repdiag.cli import main
    from repdiag.executors import RayExecutor
    from tiny_models import save_tiny

    seen = []
    probed = []
    real = RayExecutor.generate_batches
    real_probe = RayExecutor.probe_shards

    def spy(self, lm, policy, prompts, batches, kwargs, progress=None):
        out = real(self, lm, policy, prompts, batches, kwargs, progress)
        seen.append((policy.name, sorted(out)))
        return out

    def probe_spy(self, lm, prompts, ids, **kw):
        probed.append(len(ids))
        return real_probe(self, lm, prompts, ids, **kw)

    traced = []
    real_trace = RayExecutor.trace_jobs

    def trace_spy(self, lm, tasks, kwargs, progress=None):
        traced.append(len(tasks))
        return real_trace(self, lm, tasks, kwargs, progress)

    monkeypatch.setattr(RayExecutor, "generate_batches", spy)
    monkeypatch.setattr(RayExecutor, "probe_shards", probe_spy)
    monkeypatch.setattr(RayExecutor, "trace_jobs", trace_spy)

    folder = save_tiny("gpt2", tmp_path / "gpt2")
    args = ["analyze", str(folder), "--n-prompts", "8", "--max-new-tokens", "8", "--n-trajectories", "16",
            "--mitigations", "greedy,temperature_0.7", "--batch-size", "2", "--no-attribution", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "local")]) == 0
    assert main(args + ["--out", str(tmp_path / "ray"), "--executor", "ray", "--workers", "2"]) == 0
    assert [name for name, _ in seen] == ["greedy", "temperature_0.7"] and all(len(b) >= 2 for _, b in seen)
    report = json.loads((tmp_path / "ray" / "report.json").read_text())
    assert sum(probed) == report["matrix"]["reached_rows"]["probed"] > 0  # every reached row was probed on Ray
    assert traced == [4]  # the trace: 4 prompts in batches of 2, greedy and sampled
    assert (tmp_path / "ray" / "report.json").read_bytes() == (tmp_path / "local" / "report.json").read_bytes()


def test_ray_probe_resumes_from_shard_dir(ray_cluster, tiny_t5, tmp_path):
    """Ray with --shard-dir: a run that lost some shards recomputes only those; same bytes as one process."""
    from repdiag.executors import RayExecutor
    from repdiag.models import load_model

    lm = load_model(str(tiny_t5))
    prompts = ["a b c", "d e"]
    build_probe(lm, prompts, batch_size=2).save(tmp_path / "ref.npz")
    with RayExecutor(num_workers=2, shard_dir=tmp_path / "shards") as ex:
        build_probe(lm, prompts, batch_size=2, executor=ex).save(tmp_path / "a.npz")
        files = sorted((tmp_path / "shards").glob("probe-*.npz"))
        assert (ex.shards_computed, ex.shards_loaded) == (len(files), 0) and len(files) == 16
        for f in files[::3]:
            f.unlink()
        build_probe(lm, prompts, batch_size=2, executor=ex).save(tmp_path / "b.npz")
        assert (ex.shards_computed, ex.shards_loaded) == (16 + len(files[::3]), 16 - len(files[::3]))
    assert _sha(tmp_path / "a.npz") == _sha(tmp_path / "ref.npz") == _sha(tmp_path / "b.npz")


def test_ray_attribute_cli_same_bytes(ray_cluster, tmp_path, capsys, monkeypatch):
    """`repdiag attribute --executor ray` on two nodes: same JSON on stdout and same --dump files as local; its
    shard folder is then complete for a local rerun, which computes nothing."""
    from repdiag.cli import main
    from repdiag.executors import Worker
    from test_shards import make_attribution_run

    run = make_attribution_run(tmp_path / "run")
    args = run["cli"] + ["--mode", "checkpoints"]
    assert main(args + ["--dump", str(tmp_path / "local")]) == 0
    local_out = capsys.readouterr().out
    shards = tmp_path / "shards"
    assert main(args + ["--executor", "ray", "--workers", "2", "--shard-dir", str(shards),
                        "--dump", str(tmp_path / "ray")]) == 0
    assert capsys.readouterr().out == local_out
    names = ("scores.json", "scores.safetensors", "query.json", "index.json", "train.jsonl")
    for name in names:
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    out = json.loads(local_out)
    assert len(sorted(shards.glob("features-*.npz"))) == len(out["checkpoints"]) and any(out["contributions"])
    calls = []
    real = Worker.features
    monkeypatch.setattr(Worker, "features", lambda self, job, shard: calls.append(shard) or real(self, job, shard))
    assert main(args + ["--shard-dir", str(shards), "--dump", str(tmp_path / "resumed")]) == 0
    assert capsys.readouterr().out == local_out and calls == []
    assert (tmp_path / "resumed" / "scores.json").read_bytes() == (tmp_path / "local" / "scores.json").read_bytes()


def test_ray_attribution_worker_killed_same_scores(ray_cluster, tmp_path):
    """SIGKILL one actor after the first feature shard: Ray restarts it and retries; each shard merged once."""
    import torch

    from repdiag.attribution import Record, checkpoint_kernel, tangent_kernel
    from repdiag.attribution.sharding import feature_layout
    from repdiag.executors import RayExecutor, model_spec
    from repdiag.models import load_model
    from test_shards import make_attribution_run

    run = make_attribution_run(tmp_path, n_pairs=70, dtype=torch.float64)
    lm = load_model(str(tmp_path / "model"), dtype="float64")
    rec, q = Record.load(run["record"]), run["query"]
    ref = checkpoint_kernel(lm.model, rec, q, backend="loop")
    ref_final = tangent_kernel(lm.model, rec.examples(), q, kind="seq2seq", pad_token_id=0, backend="loop")
    with RayExecutor(num_workers=2, model=model_spec(lm)) as ex:
        ex._ensure_actors(lm)
        pids = ex.worker_pids()
        killed = []

        def tick(done: int, total: int) -> None:
            if not killed:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])

        res = checkpoint_kernel(lm.model, rec, q, backend="loop", shard_examples=32, executor=ex, progress=tick)
        assert killed and ex.worker_pids()[0] != pids[0]  # the actor was restarted
        n_shards = len(feature_layout(70, len(ref.checkpoints), 32))
        assert ex.shards_computed == n_shards
        final = tangent_kernel(lm.model, rec.examples(), q, kind="seq2seq", pad_token_id=0, backend="loop",
                               shard_examples=32, executor=ex)
    assert res.contributions.tobytes() == ref.contributions.tobytes() and res.to_dict(5) == ref.to_dict(5)
    assert all(res.all_contributions[k].tobytes() == v.tobytes() for k, v in ref.all_contributions.items())
    assert final.contributions.tobytes() == ref_final.contributions.tobytes() and final.b == ref_final.b
