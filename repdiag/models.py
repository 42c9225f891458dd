"""Loading any Hugging Face text generator, offline-safe, and the bundled default model.

One front door, :func:`load_model`, in the manner of ``inseq.load_model``: a hub id, a local folder,
a single ``.gguf`` file, or ``"default"`` (the model that ships inside the package). The config
decides between an encoder-decoder (T5, mT5, BART, mBART, Marian, Pegasus, M2M100/NLLB, LED, ...)
and a decoder-only model (GPT-2, Llama, ...); encoder-only models (BERT, ...) are refused with a
one-line reason. ``trust_remote_code`` stays off unless the caller asks; safetensors are preferred.

A hub id that is not in the local cache fails at once when ``HF_HUB_OFFLINE=1``, and within a few
seconds otherwise (a short reachability probe of the hub runs before any download is attempted),
so nothing hangs for a network timeout.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import MissingExtraError, ModelLoadError, OfflineModelError, UnsupportedModelError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MODEL_DIR",
    "LoadedModel",
    "load_model",
    "wrap_model",
    "resolve_dtype",
    "resolve_device",
    "tokenizer_fingerprint",
    "hub_reachable",
]

#: the bundled default model (trained by ``examples/train_default_model.py``), shipped in the package.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"
DEFAULT_NAMES = (None, "", "default")
_DTYPES = ("float32", "float64", "float16", "bfloat16", "auto")
#: seconds the hub reachability probe may take before a hub id is declared unreachable.
HUB_PROBE_TIMEOUT_S = 3.0


@dataclass
class LoadedModel:
    """A generator ready for repdiag: model in eval mode, its tokenizer, and what kind it is."""

    model: "PreTrainedModel"
    tokenizer: "PreTrainedTokenizerBase"
    kind: str  # "seq2seq" | "causal"
    model_id: str
    revision: str | None
    device: "torch.device"
    dtype: "torch.dtype"
    eos_token_id: int
    pad_token_id: int
    decoder_start_token_id: int | None
    vocab_size: int
    tokenizer_fingerprint: str

    @property
    def max_source_tokens(self) -> int:
        """Longest input the tokenizer declares (``model_max_length``; 512 when it declares none)."""
        declared = getattr(self.tokenizer, "model_max_length", None)
        return int(declared) if isinstance(declared, int) and 0 < declared < 1_000_000 else 512

    @property
    def is_seq2seq(self) -> bool:
        return self.kind == "seq2seq"

    @property
    def architecture(self) -> str:
        return type(self.model).__name__

    @property
    def n_parameters(self) -> int:
        return int(sum(p.numel() for p in self.model.parameters()))

    def describe(self) -> dict[str, Any]:
        """The ``model`` section of a report: identity, size and the model's own decoding defaults."""
        gen = getattr(self.model, "generation_config", None)
        defaults = {}
        if gen is not None:
            for key in ("do_sample", "num_beams", "temperature", "top_k", "top_p", "repetition_penalty",
                        "no_repeat_ngram_size", "max_new_tokens", "max_length", "length_penalty"):
                value = getattr(gen, key, None)
                if value is not None:
                    defaults[key] = value
        return {
            "id": self.model_id,
            "revision": self.revision,
            "kind": self.kind,
            "architecture": self.architecture,
            "n_parameters": self.n_parameters,
            "vocab_size": self.vocab_size,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "default_generation_config": defaults,
        }


def tokenizer_fingerprint(tokenizer: "PreTrainedTokenizerBase") -> str:
    """SHA-256 of the tokenizer's vocabulary (id → piece, sorted by id): equal iff the ids mean the same."""
    vocab = tokenizer.get_vocab()
    items = sorted((int(i), str(t)) for t, i in vocab.items())
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def resolve_dtype(dtype: str | "torch.dtype") -> "torch.dtype | str":
    """Map a dtype name to a ``torch.dtype`` (``"auto"`` is passed through to transformers)."""
    import torch

    if not isinstance(dtype, str):
        return dtype
    if dtype not in _DTYPES:
        raise UsageError(f"unknown --dtype {dtype!r}: choose one of {', '.join(_DTYPES)}")
    return "auto" if dtype == "auto" else getattr(torch, dtype)


def resolve_device(device: str | None) -> "torch.device":
    """``"auto"`` → cuda if available, else mps, else cpu; any other name is checked to exist."""
    import torch

    name = (device or "cpu").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise UsageError(f"unknown --device {device!r}: use cpu, cuda, cuda:N, mps or auto") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device} was asked for but no CUDA device is available: use --device cpu")
    return dev


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """True when the Hugging Face hub endpoint accepts a TCP connection within ``timeout`` seconds.

    DNS resolution runs in a daemon thread so that a resolver that retries for tens of seconds
    cannot hold the caller past ``timeout``.
    """
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host, port = parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme != "http" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _offline_mode() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return 1 <= len(parts) <= 2 and all(p and not p.startswith(".") for p in parts) and "\\" not in name


def _cached(name: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(name, "config.json", revision=revision)
    return isinstance(hit, str)


def _resolve_source(name: str | None, revision: str | None) -> tuple[str, str, str | None, bool]:
    """Return ``(model_id, where_to_load, gguf_file, local_files_only)`` for a user's MODEL argument."""
    if name in DEFAULT_NAMES:
        if not (DEFAULT_MODEL_DIR / "config.json").exists():
            raise ModelLoadError(
                f"the bundled default model is missing from {DEFAULT_MODEL_DIR}: reinstall repdiag, "
                "or rebuild it with `python examples/train_default_model.py`"
            )
        return "default", str(DEFAULT_MODEL_DIR), None, True
    assert name is not None
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {name!r} does not exist: check the path")
        return name, str(path.parent), path.name, True
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{name!r} is a file: pass a model folder, a hub id or a .gguf file")
        if not (path / "config.json").exists():
            raise ModelLoadError(f"folder {name!r} has no config.json: it is not a saved Hugging Face model")
        return name, str(path), None, True
    if name.startswith((".", "/", "~")) or not _looks_like_hub_id(name):
        raise ModelLoadError(f"model folder {name!r} does not exist and is not a hub id: check the path")
    if _cached(name, revision):
        return name, name, None, True
    if _offline_mode():
        raise OfflineModelError(
            f"hub model {name!r} is not in the local cache and HF_HUB_OFFLINE is set: download it on a "
            "machine with network, or pass a local folder"
        )
    if not hub_reachable():
        raise OfflineModelError(
            f"hub model {name!r} is not in the local cache and the hub cannot be reached: check the network, "
            "or pass a local folder"
        )
    return name, name, None, False


def _model_kind(config: Any) -> str:
    """``"seq2seq"`` or ``"causal"`` from the config; encoder-only models raise ``UnsupportedModelError``."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", "")
    if getattr(config, "is_encoder_decoder", False) or model_type in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES:
        return "seq2seq"
    encoder_only = model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not encoder_only:
        return "causal"
    reason = "encoder-only" if encoder_only or model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES else "not a text generator"
    raise UnsupportedModelError(
        f"model type {model_type!r} is {reason}: repdiag needs an encoder-decoder (T5, BART, Marian, ...) "
        "or a decoder-only (GPT-2, Llama, ...) generator"
    )


def _check_gguf_extra() -> None:
    import importlib.util

    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(
            f"loading a .gguf file needs {' and '.join(missing)}: pip install 'repdiag[gguf]'"
        )


def _gguf_model_kwargs() -> dict[str, Any]:
    """Ask transformers to unpack every quantized GGUF block into the requested dtype.

    Transformers releases with ``GgufConfig`` may otherwise keep the blocks packed (when the
    ``kernels`` package is installed and the architecture has a packed path); older ones always
    dequantize, and need nothing.
    """
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:  # pragma: no cover - transformers without GgufConfig always dequantizes
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def load_model(
    name_or_path: str | None = "default",
    *,
    revision: str | None = None,
    device: str | None = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a generator and its tokenizer from a hub id, a local folder, a ``.gguf`` file or ``"default"``.

    Parameters
    ----------
    name_or_path
        Hub id (``google/flan-t5-small``), a folder saved with ``save_pretrained``, a single
        ``.gguf`` file (dequantized to ``dtype``; needs ``repdiag[gguf]``), or ``"default"``/``None``
        for the model bundled with repdiag.
    revision
        Hub revision (branch, tag or commit) when ``name_or_path`` is a hub id.
    device, dtype
        Where and in which precision to place the model (``"auto"`` allowed for both).
    trust_remote_code
        Run code shipped with a hub model. Off unless the user passes ``--trust-remote-code``.

    Raises
    ------
    ModelLoadError, OfflineModelError, UnsupportedModelError, MissingExtraError
        One-line reasons: missing folder, uncached hub id while offline, encoder-only model, ...
    """
    model_id, source, gguf_file, local_only = _resolve_source(name_or_path, revision)
    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    if gguf_file is not None:
        _check_gguf_extra()

    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    common: dict[str, Any] = {"trust_remote_code": trust_remote_code, "local_files_only": local_only}
    if revision is not None and gguf_file is None:
        common["revision"] = revision
    # a damaged .gguf file fails inside the gguf reader's struct/numpy parsing, not with an OSError
    bad_file: tuple[type[BaseException], ...] = (OSError, ValueError)
    if gguf_file is not None:
        common["gguf_file"] = gguf_file
        bad_file += (struct.error, KeyError, IndexError, NotImplementedError)
    try:
        config = AutoConfig.from_pretrained(source, **common)
    except bad_file as exc:
        raise ModelLoadError(f"cannot read the config of {model_id!r}: {_first_line(exc)}") from exc
    kind = _model_kind(config)
    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    load_kwargs: dict[str, Any] = {**common, "dtype": torch_dtype}
    if gguf_file is not None:
        load_kwargs.update(_gguf_model_kwargs())
    try:
        model = auto.from_pretrained(source, config=config, **load_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
    except (*bad_file, ImportError) as exc:
        raise ModelLoadError(f"cannot load {model_id!r}: {_first_line(exc)}") from exc
    model = model.to(torch_device)
    return wrap_model(model, tokenizer, model_id=model_id, revision=revision)


def wrap_model(
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    model_id: str = "<in-memory>",
    revision: str | None = None,
) -> LoadedModel:
    """Wrap an already-built model and tokenizer (eval mode; pad token and padding side fixed up)."""
    kind = _model_kind(model.config)
    model.eval()
    gen = getattr(model, "generation_config", None)
    eos = _first_int(getattr(gen, "eos_token_id", None), model.config.eos_token_id, tokenizer.eos_token_id)
    if eos is None:
        raise UnsupportedModelError(f"{model_id!r} defines no eos token: repdiag needs one to measure termination")
    pad = _first_int(getattr(gen, "pad_token_id", None), model.config.pad_token_id, tokenizer.pad_token_id, eos)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
    if kind == "causal":
        tokenizer.padding_side = "left"  # batched generation of a decoder-only model needs left padding
    start = None
    if kind == "seq2seq":
        start = _first_int(getattr(gen, "decoder_start_token_id", None), model.config.decoder_start_token_id, pad)
    head = model.get_output_embeddings()
    vocab_size = int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)
    param = next(model.parameters())
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        kind=kind,
        model_id=model_id,
        revision=revision,
        device=param.device,
        dtype=param.dtype,
        eos_token_id=eos,
        pad_token_id=pad,
        decoder_start_token_id=start,
        vocab_size=vocab_size,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
    )


def forward_accepts(model: Any, argument: str) -> bool:
    """Whether ``model.forward`` takes ``argument`` by name (e.g. ``logits_to_keep``, which not every
    architecture has)."""
    import inspect

    return argument in inspect.signature(model.forward).parameters


def _first_int(*values: Any) -> int | None:
    for value in values:
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
