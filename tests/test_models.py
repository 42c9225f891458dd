"""Loading any HF generator from a local folder (the real loading code), and the one-line refusals."""

from __future__ import annotations

import inspect
import time

import pytest
import torch

from repdiag.errors import MissingExtraError, ModelLoadError, OfflineModelError, UnsupportedModelError
from repdiag.models import load_model, tokenizer_fingerprint

from tiny_models import ARCHS, SEQ2SEQ, TINYSTORIES, require_tinystories, save_tiny


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny(arch, root / arch) for arch in ARCHS}


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "bert"])
def test_kind_detected_from_config(tiny_folders, arch):
    lm = load_model(str(tiny_folders[arch]))
    assert lm.kind == ("seq2seq" if arch in SEQ2SEQ else "causal")
    assert lm.eos_token_id == 1
    assert lm.vocab_size == 32
    assert lm.model.training is False
    if lm.kind == "causal":
        assert lm.tokenizer.padding_side == "left"
        assert lm.decoder_start_token_id is None
    else:
        assert lm.decoder_start_token_id is not None


def test_dtype_and_fingerprint(tiny_folders):
    lm = load_model(str(tiny_folders["t5"]), dtype="float64")
    assert next(lm.model.parameters()).dtype == torch.float64
    assert lm.tokenizer_fingerprint == tokenizer_fingerprint(lm.tokenizer)
    assert len(lm.tokenizer_fingerprint) == 16


def test_bert_refused_as_encoder_only(tiny_folders):
    with pytest.raises(UnsupportedModelError, match="encoder-only"):
        load_model(str(tiny_folders["bert"]))


def test_missing_folder_fails_fast(tmp_path):
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "no-such-model"))
    assert time.perf_counter() - start < 5


def test_uncached_hub_id_fails_fast_offline():
    start = time.perf_counter()
    with pytest.raises(OfflineModelError, match="not in the local cache"):
        load_model("google/flan-t5-small")
    assert time.perf_counter() - start < 5


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_gguf_needs_the_extra(tmp_path):
    pytest.importorskip("torch")
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    try:
        import gguf  # noqa: F401
        import accelerate  # noqa: F401
    except ImportError:
        with pytest.raises(MissingExtraError, match=r"repdiag\[gguf\]"):
            load_model(str(fake))
    else:  # the extra is installed: a corrupt file must still fail with one line
        with pytest.raises(ModelLoadError):
            load_model(str(fake))


def test_trust_remote_code_is_off_by_default():
    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False


def test_real_tinystories_model_loads():
    require_tinystories()
    lm = load_model(str(TINYSTORIES))
    assert lm.kind == "causal"
    assert lm.vocab_size == 512
    assert lm.architecture == "LlamaForCausalLM"
    ids = lm.tokenizer("The dog", return_tensors="pt")
    out = lm.model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = lm.tokenizer.decode(out[0], skip_special_tokens=True)
    assert text.startswith("The dog was a big")
