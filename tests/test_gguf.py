"""A single ``.gguf`` file loads like a model folder (issue 3): the real TinyStories Llama, converted
the way llama.cpp converts a Hugging Face Llama (``gguf_writer.py``), read back through transformers.

The F32 file gives the original model's logits exactly; the Q8_0 file is dequantized to float32
and stays within the quantization error (max abs logit difference measured 0.27, on logits up
to 22 in size) with the same greedy text.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from tiny_models import TINYSTORIES, missing_input, require_tinystories


@pytest.fixture(autouse=True, scope="module")
def _needs_gguf_and_tinystories():
    """Skip without the gguf extra (fail under CI, which installs it) or without the shared model."""
    if importlib.util.find_spec("gguf") is None:
        missing_input("gguf is not installed (repdiag[gguf])")
    require_tinystories()

TEXT = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park!"
Q8_LOGIT_TOLERANCE = 0.5  # measured 0.267 max abs difference; the logits reach about 22 in size


@pytest.fixture(scope="module")
def gguf_files(tmp_path_factory):
    from gguf_writer import write_llama_gguf

    folder = tmp_path_factory.mktemp("gguf")
    return {
        "F32": write_llama_gguf(TINYSTORIES, folder / "tinystories-260k-f32.gguf"),
        "Q8_0": write_llama_gguf(TINYSTORIES, folder / "tinystories-260k-q8_0.gguf", quantize="Q8_0"),
    }


@pytest.fixture(scope="module")
def original():
    from repdiag.models import load_model

    return load_model(str(TINYSTORIES))


def _logits(lm, text: str = TEXT):
    import torch

    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        return ids, lm.model(ids).logits


def _greedy(lm, prompt: str = "The dog", n: int = 40) -> str:
    ids = lm.tokenizer(prompt, return_tensors="pt")
    out = lm.model.generate(**ids, max_new_tokens=n, do_sample=False)
    return lm.tokenizer.decode(out[0], skip_special_tokens=True)


def test_f32_gguf_loads_as_the_original_model(gguf_files, original):
    import torch

    from repdiag.models import load_model

    lm = load_model(str(gguf_files["F32"]))
    assert lm.kind == "causal"
    assert lm.architecture == "LlamaForCausalLM"
    assert lm.vocab_size == 512
    assert lm.model.config.tie_word_embeddings
    assert lm.eos_token_id == original.eos_token_id
    assert next(lm.model.parameters()).dtype == torch.float32
    # the tokenizer rebuilt from the GGUF metadata cuts text as the SentencePiece original does
    ids, logits = _logits(lm)
    ref_ids, ref_logits = _logits(original)
    assert ids.tolist() == ref_ids.tolist()
    assert lm.tokenizer.decode(ids[0], skip_special_tokens=True) == TEXT
    assert torch.allclose(logits, ref_logits, rtol=0, atol=1e-5), (logits - ref_logits).abs().max()
    text = _greedy(lm)
    assert text == _greedy(original)
    assert text.startswith("The dog was a big, red ball.")


def test_q8_0_gguf_is_dequantized_to_float32(gguf_files, original):
    import torch

    from repdiag.models import load_model

    lm = load_model(str(gguf_files["Q8_0"]))
    assert {p.dtype for p in lm.model.parameters()} == {torch.float32}
    _, logits = _logits(lm)
    _, ref_logits = _logits(original)
    diff = (logits - ref_logits).abs().max().item()
    assert 0 < diff < Q8_LOGIT_TOLERANCE  # really quantized, and close
    assert _greedy(lm) == _greedy(original)


def test_q8_0_gguf_is_dequantized_to_the_requested_dtype(gguf_files):
    import torch

    from repdiag.models import load_model

    lm = load_model(str(gguf_files["Q8_0"]), dtype="bfloat16")
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}


def test_analyze_runs_on_a_gguf_file(gguf_files, tmp_path):
    from repdiag.cli import main

    out = tmp_path / "report"
    code = main([
        "analyze", str(gguf_files["F32"]), "--n-prompts", "6", "--max-new-tokens", "8",
        "--n-trajectories", "16", "--mitigations", "greedy,temperature_0.7", "--no-attribution",
        "--quiet", "--out", str(out),
    ])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["architecture"] == "LlamaForCausalLM"
    assert report["model"]["id"] == str(gguf_files["F32"])
    assert set(report["measured"]) == {"greedy", "temperature_0.7"}
