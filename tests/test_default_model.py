"""The bundled default model (repdiag/default_model/): files, size, offline loading, output, model card."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

FOLDER = Path(__file__).resolve().parent.parent / "repdiag" / "default_model"
REQUIRED = ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "train.jsonl.gz", "heldout.jsonl.gz", "manifest.json", "metrics.json",
            "README.md"]
MAX_BYTES = 30 * 1024 * 1024


def _json(name: str) -> dict:
    return json.loads((FOLDER / name).read_text(encoding="utf-8"))


def _pairs(name: str) -> list[dict]:
    with gzip.open(FOLDER / name, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


@pytest.fixture(scope="module")
def loaded():
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(FOLDER, local_files_only=True)
    model = AutoModelForSeq2SeqLM.from_pretrained(FOLDER, local_files_only=True)
    model.eval()
    return model, tok


def test_files_exist_and_size():
    missing = [n for n in REQUIRED if not (FOLDER / n).is_file()]
    assert not missing, f"missing in {FOLDER}: {missing}"
    total = sum(p.stat().st_size for p in FOLDER.rglob("*") if p.is_file())
    assert total <= MAX_BYTES, f"default model folder is {total / 1e6:.1f} MB (> 30 MB)"


def test_pairs_match_manifest():
    manifest = _json("manifest.json")
    train, held = _pairs("train.jsonl.gz"), _pairs("heldout.jsonl.gz")
    assert len(train) == manifest["train_pairs"] and len(held) == manifest["heldout_pairs"]
    assert manifest["pairs_after_dedup"] == len(train) + len(held)
    for row in train[:5] + held[:5]:
        assert set(row) == {"id", "module", "name", "source", "target"}
        assert row["source"] and row["target"]
    # split by module: no module on both sides
    assert not {r["module"] for r in train} & {r["module"] for r in held}
    assert len(held) >= 100 and len(train) >= 10 * len(held) // 2


def test_gzip_is_deterministic():
    for name in ("train.jsonl.gz", "heldout.jsonl.gz"):
        head = (FOLDER / name).read_bytes()[:10]
        assert head[:2] == b"\x1f\x8b" and head[4:8] == b"\x00\x00\x00\x00", f"{name}: gzip mtime is not 0"


def test_special_tokens_and_generation_config(loaded):
    model, tok = loaded
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok("def f(): pass")["input_ids"][-1] == 1
    cfg = model.config
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.decoder_start_token_id) == (0, 1, 0)
    gen = model.generation_config
    assert (gen.pad_token_id, gen.eos_token_id, gen.decoder_start_token_id) == (0, 1, 0)
    assert not gen.do_sample and gen.num_beams in (None, 1)
    assert model.get_output_embeddings().weight.shape[0] == len(tok)


def test_greedy_output_on_heldout(loaded):
    import torch

    model, tok = loaded
    metrics = _json("metrics.json")
    held = _pairs("heldout.jsonl.gz")[:3]
    enc = tok([r["source"] for r in held], return_tensors="pt", padding=True, truncation=True,
              max_length=metrics["settings"]["max_source_tokens"])
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24)
    texts = tok.batch_decode(out, skip_special_tokens=True)
    assert len(texts) == 3
    for t in texts:
        assert t.strip(), "empty greedy output"


def test_model_card_states_the_recorded_figures():
    metrics, manifest = _json("metrics.json"), _json("manifest.json")
    card = (FOLDER / "README.md").read_text(encoding="utf-8")
    ev = metrics["eval"]
    ce, uni = ev["heldout_ce_nats_per_token"], ev["unigram_ce_nats_per_token"]
    assert ce < uni - 0.3, f"held-out CE {ce} is not clearly below the unigram baseline {uni}"
    # sensible first words: greedy outputs start with a word that commonly starts a training target
    # (at this training budget the model nearly always opens with "Return"; see the model card)
    assert ev["first_word_accuracy"] >= ev["first_word_baseline"]["accuracy"] - 0.02
    common = Counter((r["target"].split() or [""])[0].strip(".,:;").lower() for r in _pairs("train.jsonl.gz"))
    top20 = {w for w, _ in common.most_common(20)}
    firsts = [(s["greedy"].split() or [""])[0].strip(".,:;").lower() for s in ev["samples"]]
    assert all(w in top20 for w in firsts), firsts
    expected = [
        f"{ce:.3f}", f"{uni:.3f}", f"{metrics['parameters']:,}",
        f"{metrics['train']['train_seconds']:.0f} s", f"{metrics['sizes_bytes']['model.safetensors'] / 1e6:.2f} MB",
        f"{manifest['train_pairs']} training pairs", f"{manifest['heldout_pairs']} held-out pairs",
        str(manifest["pairs_after_dedup"]), f"CPython {manifest['python_version']}",
        f"{ev['first_word_accuracy']:.1%}", f"{ev['greedy_loops']} of {ev['heldout_pairs']}",
        metrics["command"], "PSF License",
    ]
    missing = [s for s in expected if s not in card]
    assert not missing, f"model card does not state: {missing}"
    total = sum(p.stat().st_size for p in FOLDER.rglob("*") if p.is_file())
    assert abs(total - metrics["sizes_bytes"]["total"]) < 0.05 * total
    rec = metrics.get("record")
    if rec:
        assert f"{rec['bytes'] / 1e6:.2f} MB" in card and "record/features/" in card


# --------------------------------------------------------------------------------------------------
# the training record shipped with the model (repdiag analyze attributes loops with it)
# --------------------------------------------------------------------------------------------------

RECORD = FOLDER / "record"


def _train_model_inputs() -> list[tuple[str, str]]:
    from repdiag.prompts import default_model_input

    return [(default_model_input(r["name"], r["source"]), r["target"]) for r in _pairs("train.jsonl.gz")]


def test_record_matches_the_shipped_model(loaded):
    from repdiag.attribution import Record, TrainPair
    from repdiag.attribution.api import check_train_pairs

    model, _ = loaded
    record = Record.load(RECORD)
    assert record.kind == "seq2seq" and record.n_examples == len(_pairs("train.jsonl.gz"))
    record.check_model(model)
    assert record.check_final(model), "record.json's final hash is not the shipped model.safetensors"
    assert record.meta["final"]["sha256"] == _json("metrics.json")["record"]["final_sha256"]
    # the pairs it was trained on (model inputs and targets), in train.jsonl.gz order
    check_train_pairs(record, [TrainPair(*p) for p in _train_model_inputs()])
    assert record.has_theta0 and record.meta["theta0"]["dtype"] == "float16"
    steps = [c["step"] for c in record.checkpoints]
    assert len(steps) == 2 and 0 < steps[0] < steps[1] < len(record.steps)
    assert all((RECORD / c["file"]).is_file() for c in record.checkpoints)
    fs = json.loads((RECORD / "features" / "settings.json").read_text(encoding="utf-8"))
    assert fs["points"] == [0, *steps, len(record.steps)]
    assert all((RECORD / "features" / f).is_file() for f in fs["files"]) and len(fs["files"]) == 4


def test_checkpoint_attribution_of_a_heldout_loop():
    import math

    import torch

    from repdiag.attribution import Projector, attribute_loop, find_loop
    from repdiag.models import load_model
    from repdiag.prompts import default_model_prompts

    lm = load_model("default")
    prompts = default_model_prompts(FOLDER).prompts
    found = None
    for prompt in prompts[:40]:
        enc = lm.tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            gen = lm.model.generate(**enc, max_new_tokens=48, do_sample=False, num_beams=1)[0].tolist()
        loop = find_loop(gen[1:])
        if loop is not None and loop[0] + 2 * loop[1] <= len(gen) - 1:
            found = (prompt, gen)
            break
    assert found is not None, "no held-out input of the first 40 loops under greedy decoding"
    fs = json.loads((RECORD / "features" / "settings.json").read_text(encoding="utf-8"))
    pj = fs["projector"]
    res = attribute_loop(lm, _train_model_inputs(), RECORD, found[0], found[1], mode="checkpoints", top=10,
                         backend="loop", layers=fs["layers"], dtype=fs["gradient_dtype"], cache_dir=RECORD / "features",
                         projector=Projector(dim=pj["dim"], kind=pj["kind"], seed=pj["seed"], block=pj["block"]),
                         notify=None)
    d = res.to_dict(10)
    assert d["mode"] == "checkpoints" and d["measurement"] == "loop"
    assert len(d["top"]) == 10 and math.isfinite(d["delta_m"]) and math.isfinite(d["completeness_residual"])
    for e in d["top"]:
        assert math.isfinite(e["contribution"]) and e["pair"]["target"]
    assert d["top"][0]["contribution"] > 0
    # the shipped cache was hit: no new feature file appeared
    assert sorted(p.name for p in (RECORD / "features").glob("*.npy")) == sorted(fs["files"])


def test_cli_attribute_on_the_bundled_model_uses_its_record(capsys):
    """`repdiag attribute default --query ...`: the shipped pairs, record and feature cache, no --train needed."""
    import json as _json

    from repdiag.cli import main
    from repdiag.models import DEFAULT_MODEL_DIR
    from repdiag.prompts import default_model_prompts

    prompt = default_model_prompts(DEFAULT_MODEL_DIR).prompts[0]
    code = main(["attribute", "default", "--query", prompt, "--mode", "checkpoints", "--top", "3",
                 "--format", "json", "--quiet"])
    assert code == 0
    out = _json.loads(capsys.readouterr().out)
    assert out["mode"] == "checkpoints"
    assert len(out["top"]) == 3
    assert all(isinstance(row["contribution"], float) for row in out["top"])
