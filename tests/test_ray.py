"""Executors (issue 10, first increment): the probe sharded over Ray actors gives the same bytes as one process.

The Ray tests run on a local two-node ``ray.cluster_utils.Cluster`` (CPU only, one CPU per node) and are
skipped when Ray is not installed (``pip install 'repdiag[ray]'``). The rest run everywhere.
"""

from __future__ import annotations

import hashlib
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
    """`repdiag analyze --executor ray`: generate() batches on two nodes, same report.json bytes."""
    from repdiag.cli import main
    from repdiag.executors import RayExecutor
    from tiny_models import save_tiny

    seen = []
    real = RayExecutor.generate_batches

    def spy(self, lm, policy, prompts, batches, kwargs, progress=None):
        out = real(self, lm, policy, prompts, batches, kwargs, progress)
        seen.append((policy.name, sorted(out)))
        return out

    monkeypatch.setattr(RayExecutor, "generate_batches", spy)

    folder = save_tiny("gpt2", tmp_path / "gpt2")
    args = ["analyze", str(folder), "--n-prompts", "8", "--max-new-tokens", "8", "--n-trajectories", "16",
            "--mitigations", "greedy,temperature_0.7", "--batch-size", "2", "--no-attribution", "--quiet"]
    assert main(args + ["--out", str(tmp_path / "local")]) == 0
    assert main(args + ["--out", str(tmp_path / "ray"), "--executor", "ray", "--workers", "2"]) == 0
    assert [name for name, _ in seen] == ["greedy", "temperature_0.7"] and all(len(b) >= 2 for _, b in seen)
    assert (tmp_path / "ray" / "report.json").read_bytes() == (tmp_path / "local" / "report.json").read_bytes()
