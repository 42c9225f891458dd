"""``--shard-dir``: finished shards on disk, and a rerun that resumes from them (no Ray needed).

Every test compares bytes with an uninterrupted run without a shard folder, and counts which shards
were loaded and which recomputed (the executor's counters, or the shard files' inodes: a shard that
is written again gets a new inode, since every write is a temporary file renamed into place).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from repdiag.attribution import Query, Record, checkpoint_kernel, tangent_kernel
from repdiag.attribution.sharding import feature_layout
from repdiag.attribution.toy import encode_all, repeat_pairs, train_sgd
from repdiag.errors import UsageError
from repdiag.executors import LocalExecutor
from repdiag.shards import ShardStore, pack_probe_shard, unpack_probe_shard
from repdiag.transition import build_probe, probe_shard, probe_shards_of
from tiny_models import build_tiny, save_tiny


class Interrupted(Exception):
    """Raised by a progress callback to simulate a run killed after some shards."""


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _inodes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in sorted(folder.glob("*.npz"))}


def _stop_after(n: int):
    seen = [0]

    def progress(*_args) -> None:
        seen[0] += 1
        if seen[0] == n:
            raise Interrupted
    return progress


def _count_calls(monkeypatch, method: str) -> list:
    """Record the shards a :class:`repdiag.executors.Worker` method computes in this process."""
    from repdiag.executors import Worker

    calls: list = []
    real = getattr(Worker, method)

    def spy(self, *args):
        calls.append(args[-1])
        return real(self, *args)

    monkeypatch.setattr(Worker, method, spy)
    return calls


def make_attribution_run(folder: Path, *, n_pairs: int = 40, dtype=torch.float32) -> dict:
    """A tiny T5 trained with SGD and recorded (checkpoints every 2 steps), saved with its training file."""
    model, tok = build_tiny("t5", dtype=dtype)
    pairs = repeat_pairs(n_pairs, seed=6, max_len=3)
    train_sgd(model, encode_all(tok, "seq2seq", pairs), folder / "rec", kind="seq2seq", pad_token_id=0,
              batch_size=8, lr=0.05, pairs=pairs, checkpoint_every=2)
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    train = folder / "train.jsonl"
    train.write_text("".join(json.dumps({"source": p.source, "target": p.target}) + "\n" for p in pairs))
    query = Query.build("seq2seq", tok("copy a b")["input_ids"], tok(text_target="a b a b a b")["input_ids"],
                        decoder_start_token_id=0)
    return dict(model=model, tok=tok, pairs=pairs, dir=folder, record=folder / "rec", train=train, query=query,
                cli=["attribute", str(folder / "model"), "--train", str(train), "--record", str(folder / "rec"),
                     "--query", "copy a b", "--generated", "a b a b a b", "--format", "json", "--backend", "loop"])


@pytest.fixture(scope="module")
def run64(tmp_path_factory):
    return make_attribution_run(tmp_path_factory.mktemp("run64"), n_pairs=70, dtype=torch.float64)


@pytest.fixture(scope="module")
def run32(tmp_path_factory):
    return make_attribution_run(tmp_path_factory.mktemp("run32"))


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    return save_tiny("t5", tmp_path_factory.mktemp("t5") / "t5")


# ---------------------------------------------------------------------------------------------- the store
def test_probe_shard_round_trips_through_npz(tiny_t5, tmp_path):
    from repdiag.models import load_model

    lm = load_model(str(tiny_t5))
    shard = probe_shard(lm, ["a b", "c"], np.arange(3, 11), top_k=5, batch_size=4, keep_per_prompt=True)
    store = ShardStore(tmp_path)
    store.begin({"job": "x"})
    store.save("s", pack_probe_shard(shard))
    back = unpack_probe_shard(store.load("s"))
    assert np.array_equal(back["ids"], shard["ids"]) and back["ids"].dtype == np.int64
    assert np.array_equal(back["shift"], shard["shift"], equal_nan=True)
    for a, b in [(back["rows"], shard["rows"])] + list(zip(back["per_prompt"], shard["per_prompt"])):
        assert len(a["tokens"]) == 8
        assert all(np.array_equal(x, y) and x.dtype == y.dtype for x, y in zip(a["tokens"], b["tokens"]))
        assert all(np.array_equal(x, y) and x.dtype == y.dtype for x, y in zip(a["probs"], b["probs"]))
        assert np.array_equal(a["residual"], b["residual"])
    with np.load(tmp_path / "s.npz", allow_pickle=False) as z:  # plain arrays only
        assert "__fingerprint__" in z.files


def test_store_refuses_another_job_and_ignores_foreign_shards(tmp_path):
    a = ShardStore(tmp_path)
    assert a.begin({"job": "probe", "top_k": 5}, lambda: {"backend": "vmap"}) == {"backend": "vmap"}
    a.save("s", {"x": np.arange(3)})
    # the same job again: the stored choice comes back, resolve() is not called
    assert ShardStore(tmp_path).begin({"job": "probe", "top_k": 5}, lambda: 1 / 0) == {"backend": "vmap"}
    with pytest.raises(UsageError, match="differs in 'top_k'"):
        ShardStore(tmp_path).begin({"job": "probe", "top_k": 6})
    # a shard written for another fingerprint (e.g. copied in by hand) or unreadable is not used
    other = ShardStore(tmp_path / "other")
    other.begin({"job": "probe", "top_k": 6})
    other.save("s", {"x": np.arange(3)})
    (tmp_path / "s.npz").write_bytes((tmp_path / "other" / "s.npz").read_bytes())
    b = ShardStore(tmp_path)
    b.begin({"job": "probe", "top_k": 5})
    assert b.load("s") is None
    (tmp_path / "s.npz").write_bytes(b"not a zip")
    assert b.load("s") is None and b.load("missing") is None


def test_feature_layout_is_whole_chunks():
    assert feature_layout(70, 2, 32) == [(0, 0, 32), (0, 32, 64), (0, 64, 70), (1, 0, 32), (1, 32, 64), (1, 64, 70)]
    assert feature_layout(70, 1, 40) == [(0, 0, 64), (0, 64, 70)]  # rounded up to whole chunks of 32
    assert feature_layout(0, 2) == [(0, 0, 0), (1, 0, 0)]


# ---------------------------------------------------------------------------------------------- probe
def test_probe_resume_after_interruption_same_bytes(tiny_t5, tmp_path):
    from repdiag.models import load_model

    lm = load_model(str(tiny_t5))
    prompts = ["a b c", "d e"]
    kw = dict(batch_size=4, keep_per_prompt=True)
    build_probe(lm, prompts, **kw).save(tmp_path / "ref.npz")
    shards = tmp_path / "shards"
    ex = LocalExecutor(shard_dir=shards)
    with pytest.raises(Interrupted):
        build_probe(lm, prompts, executor=ex, progress=_stop_after(5), **kw)
    assert (ex.shards_computed, ex.shards_loaded) == (5, 0) and len(_inodes(shards)) == 5
    kept = _inodes(shards)
    again = LocalExecutor(shard_dir=shards)
    tm = build_probe(lm, prompts, executor=again, **kw)
    total = len(probe_shards_of(lm.vocab_size, 4, 16))  # 16 shards per job, each a whole number of batches
    assert total > 5 and (again.shards_loaded, again.shards_computed) == (5, total - 5)
    assert all(_inodes(shards)[name] == ino for name, ino in kept.items())  # kept shards were not rewritten
    tm.save(tmp_path / "resumed.npz")
    assert _sha(tmp_path / "resumed.npz") == _sha(tmp_path / "ref.npz")
    ref_pp = build_probe(lm, prompts, **kw).per_prompt
    for a, b in zip(tm.per_prompt, ref_pp):
        assert (a.csr() != b.csr()).nnz == 0 and np.array_equal(a.residual, b.residual)
    # a complete folder: nothing is computed
    third = LocalExecutor(shard_dir=shards)
    build_probe(lm, prompts, executor=third, **kw).save(tmp_path / "third.npz")
    assert (third.shards_loaded, third.shards_computed) == (total, 0)
    assert _sha(tmp_path / "third.npz") == _sha(tmp_path / "ref.npz")


def test_matrix_build_shard_dir_cli(tiny_t5, tmp_path, capsys, monkeypatch):
    from repdiag.cli import main

    base = ["-q", "matrix", "build", str(tiny_t5), "--mode", "probe", "--batch-size", "4"]
    assert main(base + ["-o", str(tmp_path / "ref.npz")]) == 0
    shards = tmp_path / "shards"
    assert main(base + ["--shard-dir", str(shards), "-o", str(tmp_path / "a.npz")]) == 0
    assert _sha(tmp_path / "a.npz") == _sha(tmp_path / "ref.npz")
    files = sorted(shards.glob("probe-*.npz"))
    assert len(files) >= 4
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["job"]["model_id"] == str(tiny_t5) and manifest["job"]["batch_size"] == 4
    kept = _inodes(shards)
    gone = files[1::2]
    for f in gone:
        f.unlink()
    computed = _count_calls(monkeypatch, "probe")
    assert main(base + ["--shard-dir", str(shards), "-o", str(tmp_path / "b.npz")]) == 0
    assert _sha(tmp_path / "b.npz") == _sha(tmp_path / "ref.npz")
    assert len(computed) == len(gone)  # only the deleted shards were recomputed ...
    now = _inodes(shards)
    assert sorted(now) == sorted(kept)
    assert all(now[n] == kept[n] for n in kept if n not in {f.name for f in gone})  # ... and the others not rewritten
    # another job in the same folder: one-line error, exit 2, nothing written
    capsys.readouterr()
    assert main(base + ["--top-k", "3", "--shard-dir", str(shards), "-o", str(tmp_path / "c.npz")]) == 2
    err = capsys.readouterr().err
    assert "holds shards of another job" in " ".join(err.split()) and "top_k" in err and err.count("error:") == 1
    assert not (tmp_path / "c.npz").exists()
    # trace mode does not shard
    assert main(["-q", "matrix", "build", str(tiny_t5), "--mode", "trace", "--shard-dir", str(tmp_path / "t"),
                 "-o", str(tmp_path / "t.npz")]) == 2


# ---------------------------------------------------------------------------------------------- attribution
def test_checkpoint_kernel_sharded_equals_one_process(run64):
    rec, q, m = Record.load(run64["record"]), run64["query"], run64["model"]
    ref = checkpoint_kernel(m, rec, q, backend="loop")
    for n in (32, 64, 1000):
        res = checkpoint_kernel(m, rec, q, backend="loop", shard_examples=n, executor=LocalExecutor())
        assert res.contributions.tobytes() == ref.contributions.tobytes()
        assert all(res.all_contributions[k].tobytes() == v.tobytes() for k, v in ref.all_contributions.items())
        assert (res.b, res.m_final, res.residual) == (ref.b, ref.m_final, ref.residual)
    assert float(np.abs(ref.contributions).max()) > 0


def test_checkpoint_kernel_resumes_from_shards(run64, tmp_path):
    rec, q, m = Record.load(run64["record"]), run64["query"], run64["model"]
    ref = checkpoint_kernel(m, rec, q, backend="loop")
    n_points = len(ref.checkpoints)
    total = n_points * 3  # 70 examples in shards of 32
    ex = LocalExecutor(shard_dir=tmp_path)
    with pytest.raises(Interrupted):
        checkpoint_kernel(m, rec, q, backend="loop", shard_examples=32, executor=ex, progress=_stop_after(4))
    assert ex.shards_computed == 4 and len(_inodes(tmp_path)) == 4
    kept = _inodes(tmp_path)
    again = LocalExecutor(shard_dir=tmp_path)
    res = checkpoint_kernel(m, rec, q, backend="loop", shard_examples=32, executor=again)
    assert (again.shards_loaded, again.shards_computed) == (4, total - 4)
    assert all(_inodes(tmp_path)[k] == v for k, v in kept.items())
    assert res.contributions.tobytes() == ref.contributions.tobytes()
    assert all(res.all_contributions[k].tobytes() == v.tobytes() for k, v in ref.all_contributions.items())
    assert res.to_dict(5) == ref.to_dict(5)
    # another shard size is another layout, hence another job
    with pytest.raises(UsageError, match="another job"):
        checkpoint_kernel(m, rec, q, backend="loop", shard_examples=64, executor=LocalExecutor(shard_dir=tmp_path))


def test_projected_checkpoint_kernel_sharded_with_cache(run64, tmp_path):
    from repdiag.attribution.projection import Projector

    rec, q, m = Record.load(run64["record"]), run64["query"], run64["model"]
    pr = Projector(dim=64, seed=3)
    ref = checkpoint_kernel(m, rec, q, backend="loop", projector=pr)
    res = checkpoint_kernel(m, rec, q, backend="loop", projector=pr, shard_examples=32,
                            executor=LocalExecutor(shard_dir=tmp_path / "shards"), cache_dir=tmp_path / "cache")
    assert res.contributions.tobytes() == ref.contributions.tobytes()
    n_points = len(ref.checkpoints)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == n_points
    # every point now hits the feature cache: one (empty) shard per point, for m and ∇m only
    ex = LocalExecutor()
    hit = checkpoint_kernel(m, rec, q, backend="loop", projector=pr, shard_examples=32, executor=ex,
                            cache_dir=tmp_path / "cache")
    assert ex.shards_computed == n_points
    assert np.allclose(hit.contributions, ref.contributions, rtol=1e-2, atol=1e-3 * np.abs(ref.contributions).max())


def test_tangent_kernel_resume_with_auto_backend(run64, tmp_path):
    """The backend that ``auto`` chose is stored with the shards, and a resumed run reuses it."""
    rec, q, m = Record.load(run64["record"]), run64["query"], run64["model"]
    ex = LocalExecutor(shard_dir=tmp_path)
    with pytest.raises(Interrupted):
        tangent_kernel(m, rec.examples(), q, kind="seq2seq", pad_token_id=0, backend="auto", shard_examples=32,
                       executor=ex, progress=_stop_after(1))
    chosen = json.loads((tmp_path / "manifest.json").read_text())["resolved"]["backend"]
    assert chosen in ("loop", "vmap")
    ref = tangent_kernel(m, rec.examples(), q, kind="seq2seq", pad_token_id=0, backend=chosen)
    again = LocalExecutor(shard_dir=tmp_path)
    res = tangent_kernel(m, rec.examples(), q, kind="seq2seq", pad_token_id=0, backend="auto", shard_examples=32,
                         executor=again)
    assert (again.shards_loaded, again.shards_computed) == (1, 2) and res.backend == chosen
    assert res.contributions.tobytes() == ref.contributions.tobytes() and res.b == ref.b


def test_attribute_cli_shard_dir_resume_same_bytes(run32, tmp_path, capsys, monkeypatch):
    from repdiag.cli import main

    args = run32["cli"] + ["--mode", "checkpoints"]
    assert main(args + ["--dump", str(tmp_path / "ref")]) == 0
    ref_out = capsys.readouterr().out
    shards = tmp_path / "shards"
    assert main(args + ["--shard-dir", str(shards), "--dump", str(tmp_path / "a")]) == 0
    assert capsys.readouterr().out == ref_out
    files = sorted(shards.glob("features-*.npz"))
    assert len(files) == len(json.loads(ref_out)["checkpoints"])  # one shard per checkpoint (40 examples)
    kept = _inodes(shards)
    files[1].unlink()
    computed = _count_calls(monkeypatch, "features")
    assert main(args + ["--shard-dir", str(shards), "--dump", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out == ref_out
    assert computed == [(1, 0, 40)]  # only the deleted shard (point 1, examples 0:40) was recomputed
    now = _inodes(shards)
    assert all(now[n] == kept[n] for n in kept if n != files[1].name)
    for name in ("scores.json", "scores.safetensors", "query.json", "index.json", "train.jsonl"):
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    out = json.loads(ref_out)
    assert out["mode"] == "checkpoints" and len(out["contributions"]) == 40 and any(out["contributions"])
    # the replay modes do not shard, and say so
    assert main(run32["cli"] + ["--mode", "trapezoid", "--shard-dir", str(tmp_path / "r")]) == 0
    assert "replays the training steps in order" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------------------------- analyze
def _same(a, b) -> bool:
    """Equal values AND types, recursively (arrays: same dtype, shape and bytes)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (type(a) is type(b) and a.dtype == b.dtype and a.shape == b.shape
                and a.tobytes() == b.tobytes())
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_trace_and_generate_results_round_trip_through_npz(tiny_t5, tmp_path):
    from repdiag.decoding import parse_policy
    from repdiag.hook import RepetitionMonitor
    from repdiag.measure import generate_batch
    from repdiag.models import load_model
    from repdiag.shards import pack_generate_shard, pack_trace_job, unpack_generate_shard, unpack_trace_job
    from repdiag.transition import trace_job

    lm = load_model(str(tiny_t5))
    store = ShardStore(tmp_path)
    store.begin({"job": "x"})
    batch = [lm.tokenizer(p)["input_ids"] for p in ("a b a b", "c d", "e")]
    for mode, top in (("greedy", None), ("sample", 8)):  # full rows, and the top entries + eos of a large vocabulary
        blocks = trace_job(lm, batch, mode, 7, prompt_offset=3, max_new_tokens=6, order=2, top_entries=top)
        assert any("first" in b for b in blocks) and any("ctx" in b for b in blocks)
        store.save(f"t-{mode}", pack_trace_job(blocks))
        back = unpack_trace_job(store.load(f"t-{mode}"))
        assert _same(back, blocks)
        assert isinstance(back[0]["sequences"][0]["prompt_index"], int) and back[0]["first"][1] == blocks[0]["first"][1]
    prompts = ["a b a b a b", "c d c d", "e"]
    part = {1: generate_batch(lm, parse_policy("temperature_0.7"), prompts, 1, max_new_tokens=12, seed=3,
                              batch_size=2, monitor_factory=RepetitionMonitor)}
    store.save("g", pack_generate_shard(part))
    back = unpack_generate_shard(store.load("g"))
    assert _same(back, part) and len(back[1][0]) == 1
    loops = {0: ([(4, 5, 4, 5)], [False], [{"tokens": [4, 5], "length": 4, "x": 0.1 + 0.2, "none": None}])}
    assert _same(unpack_generate_shard(pack_generate_shard(loops)), loops)
    with pytest.raises(ValueError, match="JSON"):  # a tuple would come back as a list: refused, not altered
        pack_generate_shard({0: ([()], [True], [{"tokens": (1, 2)}])})


def test_analyze_shard_dir_resume_same_report_bytes(tiny_t5, tmp_path, capsys, monkeypatch):
    """`analyze --shard-dir`: trace jobs, generate() batches and reached-row probes in one subfolder per job;
    a rerun loads them, one that lost some shards recomputes only those; the report is the same bytes."""
    from repdiag.cli import main
    from repdiag.executors import LocalExecutor, Worker

    counters: list[tuple[int, int]] = []
    real_close = LocalExecutor.close

    def close(self):
        counters.append((self.shards_computed, self.shards_loaded))
        real_close(self)

    monkeypatch.setattr(LocalExecutor, "close", close)
    calls: list[tuple] = []
    for method, key in (("trace", lambda a: ("trace", a[2], a[4])),
                        ("generate", lambda a: ("generate", a[0].name, tuple(a[2]))),
                        ("probe", lambda a: ("probe", int(a[1][0]), int(a[1][-1])))):
        def spy(self, *args, _real=getattr(Worker, method), _key=key):
            calls.append(_key(args))
            return _real(self, *args)
        monkeypatch.setattr(Worker, method, spy)

    args = ["-q", "analyze", str(tiny_t5), "--n-prompts", "8", "--max-new-tokens", "8", "--n-trajectories", "16",
            "--mitigations", "greedy,temperature_0.7", "--batch-size", "2", "--no-attribution"]
    assert main(args + ["--out", str(tmp_path / "ref")]) == 0
    ref = (tmp_path / "ref" / "report.json").read_bytes()
    assert calls == [] and counters == []  # without --shard-dir: no executor, as before
    shards = tmp_path / "shards"
    assert main(args + ["--out", str(tmp_path / "a"), "--shard-dir", str(shards)]) == 0
    assert (tmp_path / "a" / "report.json").read_bytes() == ref
    jobs = sorted(p.name for p in shards.iterdir())
    probes = [j for j in jobs if j.startswith("probe-")]
    assert jobs == ["measure-greedy", "measure-temperature_0.7", *probes, "trace"] and len(probes) >= 1
    files = {j: sorted((shards / j).glob("*.npz")) for j in jobs}
    # 4 trace prompts in batches of 2, greedy and sampled; 4 measurement prompts in batches of 2 per policy
    assert [f.name for f in files["trace"]] == [f"trace-{k:05d}.npz" for k in range(4)]
    assert [f.name for f in files["measure-greedy"]] == ["batch-00000.npz", "batch-00001.npz"]
    manifest = json.loads((shards / "measure-temperature_0.7" / "manifest.json").read_text())
    assert manifest["job"]["policy"] == "temperature_0.7" and manifest["job"]["max_new_tokens"] == 8
    n_total = sum(len(v) for v in files.values())
    assert counters == [(n_total, 0)] and len(calls) == n_total
    report = json.loads(ref)
    assert report["matrix"]["reached_rows"]["probed"] > 0  # the probe job really ran

    # a complete folder: nothing is computed
    calls.clear()
    assert main(args + ["--out", str(tmp_path / "b"), "--shard-dir", str(shards)]) == 0
    assert (tmp_path / "b" / "report.json").read_bytes() == ref
    assert calls == [] and counters[-1] == (0, n_total)

    # lose one trace job, one generate() batch and one probe shard: only those are recomputed
    kept = {j: _inodes(shards / j) for j in jobs}
    gone = [files["trace"][2], files["measure-temperature_0.7"][1], files[probes[0]][0]]
    for f in gone:
        f.unlink()
    calls.clear()
    assert main(args + ["--out", str(tmp_path / "c"), "--shard-dir", str(shards)]) == 0
    assert (tmp_path / "c" / "report.json").read_bytes() == ref
    assert counters[-1] == (3, n_total - 3)
    assert calls[0] == ("trace", "sample", 0) and calls[1] == ("generate", "temperature_0.7", (1,))
    assert calls[2][0] == "probe" and len(calls) == 3
    for j in jobs:  # the shards that were there are not rewritten
        now = _inodes(shards / j)
        assert sorted(now) == sorted(kept[j])
        assert all(now[n] == ino for n, ino in kept[j].items() if n not in {f.name for f in gone})

    # another analysis in the same folder: one-line error, exit 2, no report
    capsys.readouterr()
    assert main(["-q", "analyze", str(tiny_t5), "--n-prompts", "8", "--max-new-tokens", "9", "--n-trajectories", "16",
                 "--mitigations", "greedy,temperature_0.7", "--batch-size", "2", "--no-attribution",
                 "--out", str(tmp_path / "d"), "--shard-dir", str(shards)]) == 2
    err = capsys.readouterr().err
    assert "holds shards of another job" in " ".join(err.split()) and "max_new_tokens" in err
    assert err.count("error:") == 1 and not (tmp_path / "d" / "report.json").exists()
    # a file is not a folder
    (tmp_path / "file").write_text("x")
    assert main(args + ["--out", str(tmp_path / "e"), "--shard-dir", str(tmp_path / "file")]) == 2
