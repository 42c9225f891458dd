"""Write a Hugging Face Llama folder as one ``.gguf`` file, the way llama.cpp's converter does.

A test helper (no network, no llama.cpp checkout): it follows ``convert_hf_to_gguf.py``'s
``LlamaModel`` for the parts a small SentencePiece Llama needs, so that transformers' GGUF loader
(``modeling_gguf_pytorch_utils.load_gguf_checkpoint`` and ``integrations/gguf``) reads it back as it
reads a file downloaded from the hub:

- metadata: ``general.architecture = "llama"`` and the ``llama.*`` hyper-parameter keys;
- tensors: ``token_embd``, ``blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,ffn_norm,ffn_gate,
  ffn_up,ffn_down}``, ``output_norm`` and, only when the embeddings are not tied, ``output`` (a
  file without ``output.weight`` is read back with ``tie_word_embeddings=True``);
- the q/k row permutation llama.cpp applies to Hugging Face Llama weights (transformers undoes it);
- the tokenizer: ``tokenizer.ggml.model = "llama"`` with the SentencePiece pieces, scores and token
  types read from ``tokenizer.model``, and the special token ids.

``tokenizer.model`` is read with a minimal protobuf decoder, so neither ``sentencepiece`` nor
``protobuf`` is needed. ``quantize="Q8_0"`` stores the 2-D weight matrices as llama.cpp's Q8_0 blocks;
as in llama.cpp, 1-D tensors (the norms) stay F32 and a matrix whose rows are not a multiple of the
32-value block (here ``ffn_down``, rows of 172) falls back to F16.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

# SentencePiece ``ModelProto.SentencePiece.Type`` -> llama.cpp ``gguf.TokenType``
_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED, _SP_UNUSED, _SP_BYTE = 1, 2, 3, 4, 5, 6


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes):
    """Yield ``(field_number, wire_type, value)`` for one protobuf message."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def read_sentencepiece_model(path: Path) -> tuple[list[str], list[float], list[int], bool]:
    """``(pieces, scores, types, add_dummy_prefix)`` from a SentencePiece ``tokenizer.model``."""
    pieces: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    add_dummy_prefix = True  # NormalizerSpec's default
    for number, _, value in _fields(Path(path).read_bytes()):
        if number == 1:  # repeated SentencePiece pieces
            piece, score, kind = "", 0.0, _SP_NORMAL
            for sub, _, sub_value in _fields(value):
                if sub == 1:
                    piece = sub_value.decode("utf-8")
                elif sub == 2:
                    score = struct.unpack("<f", sub_value)[0]
                elif sub == 3:
                    kind = sub_value
            pieces.append(piece)
            scores.append(score)
            types.append(kind)
        elif number == 3:  # NormalizerSpec
            for sub, _, sub_value in _fields(value):
                if sub == 3:
                    add_dummy_prefix = bool(sub_value)
    return pieces, scores, types, add_dummy_prefix


def _permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: Hugging Face's half-rotary rows to GGML's interleaved rows."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    parts = hf_name.split(".")  # model.layers.N.<module>.weight
    if parts[:2] != ["model", "layers"]:
        raise ValueError(f"no GGUF name for tensor {hf_name!r}")
    return f"blk.{parts[2]}.{_LAYER_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"


def write_llama_gguf(model_dir: str | Path, out_path: str | Path, quantize: str = "F32") -> Path:
    """Convert the Llama folder ``model_dir`` into the single file ``out_path``; ``quantize`` is F32 or Q8_0."""
    import gguf
    from safetensors.numpy import load_file

    model_dir, out_path = Path(model_dir), Path(out_path)
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise ValueError(f"{model_dir} is a {config.get('model_type')!r} model, not llama")
    qtype = {"F32": gguf.GGMLQuantizationType.F32, "Q8_0": gguf.GGMLQuantizationType.Q8_0}[quantize]
    file_type = {"F32": gguf.LlamaFileType.ALL_F32, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quantize]

    n_head = config["num_attention_heads"]
    n_head_kv = config.get("num_key_value_heads", n_head)
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    rope = config.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))

    writer = gguf.GGUFWriter(str(out_path), "llama")
    writer.add_name(model_dir.name)
    writer.add_file_type(file_type)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(rope_theta)
    writer.add_vocab_size(config["vocab_size"])

    # tokenizer: llama.cpp's ``_set_vocab_sentencepiece``
    pieces, scores, types, add_dummy_prefix = read_sentencepiece_model(model_dir / "tokenizer.model")
    if len(pieces) != config["vocab_size"]:
        raise ValueError(f"tokenizer.model has {len(pieces)} pieces, the config {config['vocab_size']}")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)  # SentencePiece's type numbers are gguf.TokenType's
    writer.add_add_space_prefix(add_dummy_prefix)
    tok_config = {}
    if (model_dir / "tokenizer_config.json").exists():
        tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    for key, add in (
        ("bos_token_id", writer.add_bos_token_id),
        ("eos_token_id", writer.add_eos_token_id),
        ("pad_token_id", writer.add_pad_token_id),
    ):
        if isinstance(config.get(key), int):
            add(config[key])
    unk = tok_config.get("unk_token")
    if isinstance(unk, str) and unk in pieces:
        writer.add_unk_token_id(pieces.index(unk))
    writer.add_add_bos_token(bool(tok_config.get("add_bos_token", True)))
    writer.add_add_eos_token(bool(tok_config.get("add_eos_token", False)))

    tensors = load_file(str(model_dir / "model.safetensors"))
    if config.get("tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    order = sorted(tensors, key=lambda n: (n != "model.embed_tokens.weight", n == "model.norm.weight", n == "lm_head.weight"))
    for hf_name in order:
        data = tensors[hf_name].astype(np.float32)
        if hf_name.endswith("self_attn.q_proj.weight"):
            data = _permute(data, n_head, n_head)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            data = _permute(data, n_head, n_head_kv)
        data = np.ascontiguousarray(data)
        if qtype != gguf.GGMLQuantizationType.F32 and data.ndim == 2:
            try:
                writer.add_tensor(_gguf_name(hf_name), gguf.quants.quantize(data, qtype), raw_dtype=qtype)
            except gguf.quants.QuantError:  # rows not a multiple of the block size: llama.cpp falls back to F16
                writer.add_tensor(_gguf_name(hf_name), data.astype(np.float16))
        else:
            writer.add_tensor(_gguf_name(hf_name), data)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path
