"""Kernel attribution: query outputs, the recorder and its format, modes, bad input, CLI, batched backend."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from repdiag.attribution import Query, Record, attribute, checkpoint_kernel, path_kernel, tangent_kernel
from repdiag.attribution.data import TrainPair, collate, example_losses
from repdiag.attribution.dump import contributions_agree
from repdiag.attribution.features import GradientComputer, ParamSpace
from repdiag.attribution.recorder import IndexedCollator, PathRecorder, PathRecorderCallback
from repdiag.attribution.toy import encode_all, repeat_pairs, train_sgd
from repdiag.errors import RecordError, UsageError
from tiny_models import build_tiny


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def t5_run(tmp_path_factory):
    """A tiny float64 T5 trained 6 SGD steps with the plain-loop recorder (checkpoints every 2 steps)."""
    model, tok = build_tiny("t5", dtype=torch.float64)
    pairs = repeat_pairs(24, seed=3, max_len=3)
    ex = encode_all(tok, "seq2seq", pairs)
    d = tmp_path_factory.mktemp("t5rec")
    train_sgd(model, ex, d, kind="seq2seq", pad_token_id=0, batch_size=8, lr=0.05, epochs=2, pairs=pairs,
              checkpoint_every=2)
    q = Query.build("seq2seq", tok("copy a b")["input_ids"], tok(text_target="a b a b a b")["input_ids"],
                    decoder_start_token_id=0)
    return dict(model=model, tok=tok, pairs=pairs, ex=ex, dir=d, query=q)


# ---------------------------------------------------------------------------------------------- outputs
@pytest.mark.parametrize("arch", ["t5", "gpt2"])
def test_query_measurements_match_manual_logprobs(arch):
    model, tok = build_tiny(arch, dtype=torch.float64)
    kind = "seq2seq" if arch == "t5" else "causal"
    prompt = tok("copy a b")["input_ids"]
    y = [6, 7, 6, 7, 6, 7, 1]
    q = Query.build(kind, prompt, ([0] + y) if kind == "seq2seq" else (prompt + y), decoder_start_token_id=0)
    assert q.generated_ids == tuple(y) and q.loop == (0, 2)
    v = dict(zip(q.names, q.values(model).tolist()))
    # manual: log p(y_t | ...) one prefix at a time
    lps = []
    with torch.no_grad():
        for t in range(len(y)):
            if kind == "seq2seq":
                out = model(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([[0] + y[:t]]))
            else:
                out = model(input_ids=torch.tensor([prompt + y[:t]]))
            lps.append(float(torch.log_softmax(out.logits[0, -1], -1)[y[t]]))
    lps = np.array(lps)
    assert v["sequence"] == pytest.approx(lps.sum(), abs=1e-9)
    assert v["token"] == pytest.approx(lps[2], abs=1e-9)                  # t = start + period
    assert v["loop"] == pytest.approx(lps[2:4].sum(), abs=1e-9)
    p = np.exp(lps[2:4])
    assert v["loop_margin"] == pytest.approx(np.sum(np.log(p / (1 - p))), abs=1e-7)


def test_query_without_loop_drops_loop_measurements():
    q = Query.build("seq2seq", [4, 6, 1], [6, 7, 8, 9], loop="auto")
    assert q.loop is None and q.names == ("token", "sequence")
    with pytest.raises(UsageError):
        Query("seq2seq", (4,), (6, 7), loop=(1, 2))


def test_per_example_loss_is_summed_token_nll():
    model, tok = build_tiny("t5", dtype=torch.float64)
    exs = encode_all(tok, "seq2seq", repeat_pairs(3, seed=1))
    batch = collate(exs, 0)
    with torch.no_grad():
        ours = example_losses(model, batch, "seq2seq")
        hf = model(**batch).loss
    ntok = (batch["labels"] != -100).sum()
    assert float(ours.sum() / ntok) == pytest.approx(float(hf), rel=1e-12)


# ---------------------------------------------------------------------------------------------- recorder
def test_record_format(t5_run):
    d = t5_run["dir"]
    meta = json.loads((d / "record.json").read_text())
    assert meta["format"] == "repdiag-training-record" and meta["version"] == 1
    assert meta["weight_model"] in ("token_mean_microbatch_sum", "token_mean_batch")
    assert meta["optimizer"]["name"] == "SGD" and meta["steps"]["count"] == 6
    assert [c["step"] for c in meta["checkpoints"]] == [2, 4, 6]
    assert meta["weight_check"][0]["matching"]
    files = {p.name for p in d.rglob("*") if p.is_file()}
    assert not any(f.endswith((".pt", ".pkl", ".bin", ".pickle")) for f in files)
    rec = Record.load(d)
    assert rec.n_examples == 24 and len(rec.steps) == 6
    assert rec.examples()[0] == t5_run["ex"][0]
    st = rec.steps[0]
    assert sum(len(m) for m in st.micro) == 8 and st.lr == (0.05,)
    assert sum(st.flat_weights) == pytest.approx(8 / sum(sum(m) for m in st.ntok))


def test_wrong_weight_model_fails_loudly(tmp_path):
    model, tok = build_tiny("t5", dtype=torch.float64)
    ex = encode_all(tok, "seq2seq", repeat_pairs(8, seed=0))
    with pytest.raises(RecordError, match="cannot reconstruct the update"):
        train_sgd(model, ex, tmp_path, kind="seq2seq", pad_token_id=0, batch_size=4, lr=0.05, weight_model="sum")


def _check_ga_record(folder, model, tok):
    meta = json.loads((folder / "record.json").read_text())
    assert meta["weight_model"] == "token_mean_microbatch_sum"       # spec §2.1: micro-batch means, summed
    assert meta["training"]["gradient_accumulation_steps"] == 2
    record = Record.load(folder)
    assert len(record.steps) == 4 and all(len(s.micro) == 2 for s in record.steps)
    assert any(s.clip < 1.0 for s in record.steps)                    # clipping happened and was recorded
    q = Query.build("seq2seq", tok("copy a b")["input_ids"], tok(text_target="a b a b a b")["input_ids"],
                    decoder_start_token_id=0)
    model.eval()
    res = path_kernel(model, record, q, rule="trapezoid", backend="auto")   # verifies checkpoints + final weights
    assert res.diagnostics["replay_final_max_abs_error"] < 1e-5
    assert abs(res.residual) <= 0.1 * res.diagnostics["sum_abs_step_changes"]


def test_callback_with_trainer_event_order(tmp_path):
    """The callback driven in HF Trainer's order (transformers 5.24 ``_inner_training_loop``): collation one batch
    ahead (accelerate's prefetch), GA=2 with micro-batch token means summed, clipping before
    ``on_pre_optimizer_step``, the scheduler after ``on_optimizer_step``. Runs without ``accelerate``."""
    import transformers as tr

    model, tok = build_tiny("t5", dtype=torch.float32)
    pairs = repeat_pairs(16, seed=5, max_len=3)
    data = [{"idx": i, "input_ids": list(e.input_ids), "labels": list(e.labels)}
            for i, e in enumerate(encode_all(tok, "seq2seq", pairs))]
    rec = PathRecorder(tmp_path / "rec", model, n_examples=len(pairs), train_pairs=pairs, checkpoint_every=2)
    collator = IndexedCollator(tr.DataCollatorForSeq2Seq(tok, model=None, label_pad_token_id=-100), rec)
    cb = PathRecorderCallback(rec)

    class Args:
        gradient_accumulation_steps, max_grad_norm, per_device_train_batch_size = 2, 0.5, 4
        optim, lr_scheduler_type, seed, fp16, bf16, dataloader_num_workers = "sgd", "linear", 0, False, False, 0

    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / 4)
    model.train()
    cb.on_train_begin(Args, None, None, model=model, optimizer=opt)
    g = torch.Generator().manual_seed(0)
    for _epoch in range(2):
        order = torch.randperm(16, generator=g).tolist()
        batches = iter([collator([data[i] for i in order[k:k + 4]]) for k in range(0, 16, 4)])  # eager = prefetch
        for _update in range(2):
            for _micro in range(2):
                loss = model(**next(batches)).loss      # T5 ignores num_items_in_batch: a micro-batch token mean
                loss.backward()                         # ... and Trainer skips its /GA scaling (spec §2.1)
            torch.nn.utils.clip_grad_norm_(model.parameters(), Args.max_grad_norm)
            cb.on_pre_optimizer_step(Args, None, None, optimizer=opt)
            opt.step()
            cb.on_optimizer_step(Args, None, None)
            sched.step()
            model.zero_grad()
    cb.on_train_end(Args, None, None)
    _check_ga_record(tmp_path / "rec", model, tok)


def test_trainer_callback_gradient_accumulation(tmp_path):
    """HF Trainer (optim=sgd, GA=2, clipping on): the recorder finds the weight model and the replay reproduces it."""
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    import transformers as tr

    model, tok = build_tiny("t5", dtype=torch.float32)
    model.train()
    pairs = repeat_pairs(16, seed=5, max_len=3)
    data = [{"idx": i, **dict(zip(("input_ids", "labels"), (list(e.input_ids), list(e.labels))))}
            for i, e in enumerate(encode_all(tok, "seq2seq", pairs))]
    rec = PathRecorder(tmp_path / "rec", model, n_examples=len(pairs), train_pairs=pairs, checkpoint_every=2)
    collator = IndexedCollator(tr.DataCollatorForSeq2Seq(tok, model=None, label_pad_token_id=-100), rec)
    args = tr.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                                gradient_accumulation_steps=2, num_train_epochs=2, learning_rate=0.05, optim="sgd",
                                max_grad_norm=0.5, remove_unused_columns=False, report_to=[], save_strategy="no",
                                logging_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0)
    trainer = tr.Trainer(model=model, args=args, train_dataset=data, data_collator=collator,
                         callbacks=[PathRecorderCallback(rec)])
    trainer.train()
    _check_ga_record(tmp_path / "rec", model, tok)


# ---------------------------------------------------------------------------------------------- modes
def test_modes_and_auto(t5_run):
    m, rec, q = t5_run["model"], Record.load(t5_run["dir"]), t5_run["query"]
    notes = []
    res = attribute(m, q, record=rec, train=t5_run["pairs"], tokenizer=t5_run["tok"], notify=notes.append,
                    backend="auto")
    assert res.mode == "trapezoid" and res.decomposition and not notes
    d = res.to_dict(5)
    for key in ("mode", "query", "completeness_residual", "delta_m", "top", "b", "completeness", "warnings"):
        assert key in d
    assert d["top"][0]["pair"]["source"] is not None and d["top"][0]["contribution"] > 0
    assert res.total + res.residual == pytest.approx(res.delta_m, rel=1e-9)
    fo = path_kernel(m, rec, q, rule="first", backend="auto")
    assert fo.mode == "first-order"
    ck = checkpoint_kernel(m, rec, q, backend="auto")
    assert ck.mode == "checkpoints" and ck.checkpoints == (0, 2, 4, 6) and ck.completeness is not None
    fin = tangent_kernel(m, t5_run["ex"], q, kind="seq2seq", pad_token_id=0, backend="auto")
    assert fin.mode == "final" and not fin.decomposition and fin.to_dict()["completeness"] is None
    # ranking agreement between replay and checkpoints on this run
    from scipy.stats import spearmanr

    assert spearmanr(ck.contributions, res.contributions).statistic > 0.5


def test_auto_falls_back_for_adam_and_says_so(tmp_path):
    model, tok = build_tiny("t5", dtype=torch.float64)
    pairs = repeat_pairs(8, seed=0, max_len=3)
    ex = encode_all(tok, "seq2seq", pairs)
    train_sgd(model, ex, tmp_path, kind="seq2seq", pad_token_id=0, batch_size=4, lr=1e-3, optimizer="adamw",
              pairs=pairs, checkpoint_every=1, checkpoint_dtype="float16")
    q = Query.build("seq2seq", tok("copy a b")["input_ids"], tok(text_target="a b a b a b")["input_ids"],
                    decoder_start_token_id=0)
    notes = []
    res = attribute(model, q, record=tmp_path, train=pairs, notify=notes.append, backend="auto")
    assert res.mode == "checkpoints" and notes and "fell back" in notes[0] and "AdamW" in notes[0]
    assert any("float16" in w for w in res.warnings) and res.warnings[0] == notes[0]
    with pytest.raises(RecordError, match="use --mode checkpoints"):
        attribute(model, q, record=tmp_path, mode="exact", notify=None)


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_inputs(t5_run, tmp_path):
    import shutil

    rec = Record.load(t5_run["dir"])
    q = t5_run["query"]
    bart, _ = build_tiny("bart", dtype=torch.float64)
    with pytest.raises(RecordError, match="architecture|record is for"):
        path_kernel(bart, rec, q)
    shuffled = list(reversed(t5_run["pairs"]))
    with pytest.raises(RecordError, match="differs from the one recorded"):
        attribute(t5_run["model"], q, record=rec, train=shuffled, notify=None)
    with pytest.raises(RecordError, match="has 3 pairs"):
        attribute(t5_run["model"], q, record=rec, train=t5_run["pairs"][:3], notify=None)
    broken = tmp_path / "broken"
    shutil.copytree(t5_run["dir"], broken)
    (broken / "checkpoints" / "step-00000004.safetensors").unlink()
    with pytest.raises(RecordError, match="missing"):
        checkpoint_kernel(t5_run["model"], Record.load(broken), q)
    other, _ = build_tiny("t5", seed=1, dtype=torch.float64)
    with pytest.raises(RecordError, match="final weights"):
        path_kernel(other, rec, q)
    with pytest.raises(RecordError, match="no record.json"):
        Record.load(tmp_path)


# ---------------------------------------------------------------------------------------------- backends
def test_vmap_backend_matches_loop_and_falls_back(monkeypatch):
    model, tok = build_tiny("t5", dtype=torch.float64)
    exs = encode_all(tok, "seq2seq", repeat_pairs(5, seed=2))
    space = ParamSpace(model)
    loop = GradientComputer(space, "seq2seq", 0, "loop")(exs)
    auto = GradientComputer(space, "seq2seq", 0, "auto")
    got = auto(exs)
    assert auto.backend == "vmap" and not auto.warnings
    assert float((got - loop).abs().max()) <= 1e-10 * float(loop.abs().max())

    def boom(self, examples):
        raise RuntimeError("no batching rule")

    monkeypatch.setattr(GradientComputer, "_vmap", boom)
    fb = GradientComputer(space, "seq2seq", 0, "auto")
    assert torch.equal(fb(exs), loop) and fb.backend == "loop" and "fell back" in fb.warnings[0]


# ---------------------------------------------------------------------------------------------- planted cause
def test_planted_cause_is_top_proponent(tmp_path):
    """Four planted pairs teach 'rev z' → 'x y x y x y …'; the loop's top proponents must be those pairs."""
    model, tok = build_tiny("t5", dtype=torch.float64)
    planted = [TrainPair(f"rev {c} z", "x y x y x y x y") for c in "abcd"]
    pairs = repeat_pairs(28, seed=4, max_len=3, planted=planted)
    ex = encode_all(tok, "seq2seq", pairs)
    train_sgd(model, ex, tmp_path, kind="seq2seq", pad_token_id=0, batch_size=8, lr=0.05, epochs=2, pairs=pairs,
              checkpoint_every=4)
    q = Query.build("seq2seq", tok("rev e z")["input_ids"], tok(text_target="x y x y x y")["input_ids"],
                    decoder_start_token_id=0)
    planted_ids = set(range(28, 32))
    for mode in ("trapezoid", "checkpoints"):
        res = attribute(model, q, record=tmp_path, train=pairs, mode=mode, notify=None, backend="auto")
        pro, _ = res.ranked(4)
        precision = len(planted_ids & set(pro)) / 4
        print(f"\nplanted cause, mode {mode}: precision@4 = {precision:.2f}")
        assert precision >= 0.75


# ---------------------------------------------------------------------------------------------- dump + CLI
def test_agreement_rule():
    c = np.array([3.0, -1.0, 0.5, 2.0])
    assert contributions_agree(c, c + 1e-9)
    assert not contributions_agree(c, c[::-1])


def test_cli_attribute_json_and_dump(tmp_path, capsys):
    from repdiag.cli import main

    model, tok = build_tiny("t5", dtype=torch.float32)
    pairs = repeat_pairs(16, seed=6, max_len=3)
    ex = encode_all(tok, "seq2seq", pairs)
    train_sgd(model, ex, tmp_path / "rec", kind="seq2seq", pad_token_id=0, batch_size=8, lr=0.05, pairs=pairs)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"source": p.source, "target": p.target}) + "\n" for p in pairs))
    args = ["attribute", str(tmp_path / "model"), "--train", str(train), "--record", str(tmp_path / "rec"),
            "--query", "copy a b", "--generated", "a b a b a b", "--format", "json", "--top", "3",
            "--dump", str(tmp_path / "dump"), "--backend", "auto"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "trapezoid" and len(out["contributions"]) == 16 and len(out["top"]) <= 3
    assert out["query"]["loop"] == {"start": 0, "period": 2}
    dump = tmp_path / "dump"
    for f in ("index.json", "train.jsonl", "query.json", "scores.json", "scores.safetensors", "run/record.json"):
        assert (dump / f).is_file()
    scores = json.loads((dump / "scores.json").read_text())
    assert contributions_agree(out["contributions"], scores["contributions"])
    # table output works too
    table = args[:8] + ["--generated", "a b a b a b", "--backend", "auto"]
    assert main(table) == 0
    assert "proponents" in capsys.readouterr().out
    # bad input → exit 2 with one line
    (tmp_path / "rec" / "record.json").write_text("{}")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "not a repdiag-training-record" in " ".join(err.split()) and err.count("error:") == 1  # (rich wraps)


# ---------------------------------------------------------------------------------------------- projection
def test_projector_is_deterministic_and_preserves_inner_products():
    from repdiag.attribution.projection import Projector

    torch.manual_seed(0)
    a, b = torch.randn(2, 3000, dtype=torch.float64)
    names, numels = ["x", "y"], [1000, 2000]
    pr = Projector(dim=4096, seed=7, block=700)
    pa, pb = pr.project(a, names, numels), pr.project(torch.stack([a, b]), names, numels)
    assert torch.equal(pa, pb[0])
    assert abs(float(pb[0] @ pb[1]) - float(a @ b)) <= 4 * float(a.norm() * b.norm()) * (2 / 4096) ** 0.5
    assert not torch.equal(pa, Projector(dim=4096, seed=8, block=700).project(a, names, numels))


def test_checkpoint_mode_with_projection_and_cache(t5_run, tmp_path):
    from scipy.stats import spearmanr

    from repdiag.attribution.projection import Projector

    m, rec, q = t5_run["model"], Record.load(t5_run["dir"]), t5_run["query"]
    full = checkpoint_kernel(m, rec, q, backend="auto")
    pr = Projector(dim=512, seed=0)
    first = checkpoint_kernel(m, rec, q, backend="auto", projector=pr, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npy"))) == 4 and any("projected" in w for w in first.warnings)
    again = checkpoint_kernel(m, rec, q, backend="auto", projector=pr, cache_dir=tmp_path)   # from the cache
    assert np.allclose(again.contributions, first.contributions, rtol=1e-2, atol=1e-3 * np.abs(first.contributions).max())
    assert spearmanr(first.contributions, full.contributions).statistic > 0.8
    # the batched backend's gradients feed the projector too (they must come back detached)
    batched = checkpoint_kernel(m, rec, q, backend="vmap", projector=pr)
    assert np.allclose(batched.contributions, first.contributions, rtol=1e-3,
                       atol=1e-6 * np.abs(first.contributions).max())


def test_attribute_loop_entry_point(t5_run):
    """What ``repdiag analyze`` calls: a LoadedModel, the pairs, the record, the prompt and generate()'s ids."""
    from repdiag.attribution import attribute_loop
    from repdiag.models import wrap_model

    lm = wrap_model(t5_run["model"], t5_run["tok"])
    gen = [0] + t5_run["tok"](text_target="a b a b a b")["input_ids"]          # as generate() returns it
    res = attribute_loop(lm, t5_run["pairs"], t5_run["dir"], "copy a b", gen, mode="checkpoints", top=3,
                         notify=None)
    d = res.to_dict(3)
    assert d["mode"] == "checkpoints" and d["query"]["loop"] == {"start": 0, "period": 2}
    assert d["query"]["generated_ids"] == gen[1:] and len(d["top"]) <= 3
    for key in ("completeness_residual", "delta_m", "b", "completeness", "warnings"):
        assert key in d
    assert {"source", "target"} <= set(d["top"][0]["pair"]) and "contribution" in d["top"][0]
    no_loop = attribute_loop(lm, t5_run["pairs"], t5_run["dir"], "copy a b", [0, 6, 7, 8, 1], mode="final",
                             notify=None)
    assert no_loop.measurement == "sequence" and "no loop found" in no_loop.warnings[0]


def test_causal_model_record_and_replay(tmp_path):
    """Decoder-only (GPT-2): record with the plain loop, replay exactly, attribute a loop in the continuation."""
    model, tok = build_tiny("gpt2", dtype=torch.float64)
    pairs = repeat_pairs(12, seed=7, max_len=3)
    ex = encode_all(tok, "causal", pairs)
    assert ex[0].labels[0] == -100 and ex[0].labels[-1] == tok.eos_token_id
    train_sgd(model, ex, tmp_path, kind="causal", pad_token_id=0, batch_size=4, lr=0.05, pairs=pairs)
    rec = Record.load(tmp_path)
    assert rec.kind == "causal" and rec.examples()[3] == ex[3]
    prompt = tok("copy a b")["input_ids"]
    q = Query.build("causal", prompt, prompt + [6, 7, 6, 7, 6, 7])
    assert q.loop == (0, 2)
    res = path_kernel(model, rec, q, rule="exact", rules=["first"], backend="auto")
    # HF's causal-LM loss computes in float32 (logits.float()), so the float64 replay matches to ~1e-9, not bitwise
    assert res.diagnostics["replay_final_max_abs_error"] <= 1e-8
    print(f"\nGPT-2 exact: residual / Σ|Δm_s| = {abs(res.residual) / res.diagnostics['sum_abs_step_changes']:.1e}")
    assert abs(res.residual) <= 1e-5 * res.diagnostics["sum_abs_step_changes"]
