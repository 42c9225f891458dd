"""Tiny Hugging Face models built from configs (no hub), shared by the tests and benchmarks.

``build_tiny(arch)`` returns ``(model, tokenizer)`` with random weights (seeded) and a 32-token
word-level tokenizer; ``save_tiny(arch, folder)`` writes both with ``save_pretrained`` so that the
real loading code (``repdiag.models.load_model``) can be exercised on a local folder.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

WORDS = ["<pad>", "</s>", "<unk>", "<s>", "copy", "rev"] + list("abcdefghijklmnopqrstuvwxyz")  # 32 tokens
ARCHS = ("t5", "bart", "marian", "pegasus", "gpt2", "llama", "bert")
SEQ2SEQ = ("t5", "bart", "marian", "pegasus")
TINYSTORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "tinystories-260k"


def missing_input(reason: str) -> None:
    """A test's optional input is missing: skip it (naming what), but fail under ``CI=true``.

    ``.ci/run`` installs chromium and the test extras (playwright, gguf) or stops, so there a missing
    one is a broken set-up that must not pass as a skip.
    """
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}: CI provides it, so this is a broken set-up")
    pytest.skip(reason)


def require_tinystories() -> None:
    """Skip unless the shared TinyStories model folder exists.

    Always a skip, CI included: shared/models/README.md says a test that needs the folder skips where it
    is absent and nothing else may depend on it. Where it exists (the project's layout, shared/ beside
    the clone) every such test runs and asserts its numbers.
    """
    if not TINYSTORIES.is_dir():
        pytest.skip(f"the shared model folder {TINYSTORIES} is absent")


def build_tokenizer(arch: str = "t5"):
    """A word-level fast tokenizer over :data:`WORDS` (pad 0, eos 1, unk 2, bos 3)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if arch == "bart":
        tk.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", 3), ("</s>", 1)]
        )
    elif arch in ("gpt2", "llama"):
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
    elif arch != "bert":
        tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    kwargs = dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>", bos_token="<s>")
    if arch == "bert":
        kwargs = dict(pad_token="<pad>", unk_token="<unk>", cls_token="<s>", sep_token="</s>", mask_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=tk, **kwargs)


def build_config(arch: str):
    import transformers as tr

    v = len(WORDS)
    if arch == "t5":
        return tr.T5Config(vocab_size=v, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
                           num_decoder_layers=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                           dropout_rate=0.0)
    if arch == "bart":
        return tr.BartConfig(vocab_size=v, d_model=32, encoder_layers=2, decoder_layers=2,
                             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                             decoder_ffn_dim=64, max_position_embeddings=128, pad_token_id=0, bos_token_id=3,
                             eos_token_id=1, decoder_start_token_id=1, forced_eos_token_id=None, dropout=0.0,
                             attention_dropout=0.0)
    if arch == "marian":
        return tr.MarianConfig(vocab_size=v, d_model=32, encoder_layers=2, decoder_layers=2,
                               encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                               decoder_ffn_dim=64, max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
                               decoder_start_token_id=0, forced_eos_token_id=None, dropout=0.0)
    if arch == "pegasus":
        return tr.PegasusConfig(vocab_size=v, d_model=32, encoder_layers=2, decoder_layers=2,
                                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                decoder_ffn_dim=64, max_position_embeddings=128, pad_token_id=0, eos_token_id=1,
                                decoder_start_token_id=0, forced_eos_token_id=None, dropout=0.0)
    if arch == "gpt2":
        return tr.GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=3,
                             eos_token_id=1, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if arch == "llama":
        return tr.LlamaConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                              bos_token_id=3, eos_token_id=1, pad_token_id=0)
    if arch == "bert":
        return tr.BertConfig(vocab_size=v, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=128, pad_token_id=0)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose from {ARCHS}")


def build_tiny(arch: str = "t5", seed: int = 0, dtype: torch.dtype = torch.float32):
    """Build ``(model, tokenizer)`` for ``arch`` with seeded random weights, in eval mode."""
    import transformers as tr

    torch.manual_seed(seed)
    config = build_config(arch)
    if arch in SEQ2SEQ:
        model = tr.AutoModelForSeq2SeqLM.from_config(config)
    elif arch == "bert":
        model = tr.AutoModel.from_config(config)
    else:
        model = tr.AutoModelForCausalLM.from_config(config)
    model = model.to(dtype).eval()
    if arch != "bert":
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = 1
    return model, build_tokenizer(arch)


def save_tiny(arch: str, folder: str | Path, seed: int = 0) -> Path:
    """Build a tiny model and save it (model, tokenizer, generation config) into ``folder``."""
    folder = Path(folder)
    model, tok = build_tiny(arch, seed=seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
