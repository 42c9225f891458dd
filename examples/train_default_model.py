#!/usr/bin/env python
"""Train repdiag's bundled default model: a small T5 that writes the first sentence of a docstring.

Data: every function of the running interpreter's standard library that has a docstring (test*, idlelib,
lib2to3, turtledemo and site-packages skipped) gives one pair

    source = the function's source with its docstring removed (dedented; the ``def`` line, so the function
             name, comes first unless the function is decorated)
    target = the first sentence of its docstring

Exact duplicate pairs are dropped, then the pairs are split by a hash of their module name into a training
set and a held-out set (whole modules on one side). A byte-level BPE tokenizer is trained with `tokenizers`
on the training pairs, a small T5 is built from ``T5Config`` and trained with ``transformers.Trainer``
(AdamW, linear warm-up then cosine decay), and the held-out cross-entropy is compared with an add-one unigram
model of the training targets on the very same held-out target tokens.

    python examples/train_default_model.py                      # writes repdiag/default_model/
    python examples/train_default_model.py --out /tmp/m --max-steps 200 --threads 1
    python examples/train_default_model.py --out /tmp/m --no-record   # no training record

``--record`` (on by default) records the training path with ``repdiag.attribution.PathRecorder`` into
``OUT/record/`` (docs/attribution-format.md): θ0 and two intermediate checkpoints in float16, the step
schedule (example ids, loss weights, learning rate, clip factor) and the token ids of every training
example; the recorder changes nothing of the training (same seed, same weights). After training it
precomputes the projected per-example gradient features of the checkpoint kernel (TracInCP) at θ0, the two
checkpoints and the final weights into ``OUT/record/features/`` (settings in ``features/settings.json``),
so that ``repdiag analyze`` attributes a loop of the bundled model to its training pairs in seconds.

Everything random is seeded (``--seed``); with the same thread count and library versions the weights are
reproducible.  ``train()`` takes extra ``transformers.TrainerCallback`` objects and a data-collator hook so
that a training-path recorder can be plugged in: each batch carries ``example_ids`` (the row numbers of
``train.jsonl.gz``), which the trainer removes before the model's forward pass and keeps in
``trainer.last_example_ids`` for callbacks to read.

Needs torch, transformers, tokenizers, safetensors and accelerate (which ``transformers.Trainer`` requires).
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import inspect
import io
import json
import math
import os
import platform
import re
import sys
import sysconfig
import tempfile
import textwrap
import time
import tokenize
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from repdiag.prompts import default_model_input

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "repdiag" / "default_model"

SKIP_PARTS = {"idlelib", "lib2to3", "turtledemo", "site-packages", "dist-packages", "__pycache__"}
HELDOUT_PERCENT = 8          # a module goes to the held-out set when sha256(module) mod 100 < this
SPLIT_RULE = (f"held-out if int(sha256(module name, utf-8).hexdigest()[:8], 16) % 100 < {HELDOUT_PERCENT}, "
              "else train (whole modules on one side)")
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]   # ids 0, 1, 2
# the checkpoint-kernel feature cache shipped with the record: parameters, projection, precision
FEATURE_LAYERS = r"^decoder\.block\.1\.|^decoder\.final_layer_norm"   # the last decoder block (262,656 parameters)
FEATURE_DIM = 128
FEATURE_SEED = 0
_ABBREV = re.compile(r"(?:\b(?:e\.g|i\.e|etc|vs|cf|approx|resp|No|no)\.|\b[A-Za-z]\.)$")


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------

@dataclass
class Pair:
    id: str
    module: str
    name: str
    source: str
    target: str

    def to_dict(self) -> dict:
        return asdict(self)


def first_sentence(docstring: str) -> str | None:
    """The first sentence of a docstring's first paragraph, whitespace collapsed; None if unusable."""
    doc = inspect.cleandoc(docstring)
    para = re.split(r"\n\s*\n", doc, maxsplit=1)[0]
    text = " ".join(para.split())
    if not text:
        return None
    end = None
    for m in re.finditer(r"[.!?](?=\s|$)", text):
        head = text[: m.end()]
        if m.group() == "." and _ABBREV.search(head):
            continue
        end = m.end()
        break
    sentence = text[:end] if end else text
    if len(sentence.split()) < 2 or len(sentence) > 400 or sentence.startswith(">>>"):
        return None
    return sentence


def _strip_docstring(node: ast.AST, lines: list[str]) -> str | None:
    """The function's source lines without its docstring, dedented; None when that is not clean."""
    body = node.body
    ds = body[0]
    if len(body) < 2:
        return None                                   # nothing left but the signature
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
    if ds.lineno <= node.lineno or ds.end_lineno is None:
        return None                                   # one-line def: docstring on the def line
    # nothing else may share the docstring's lines
    if lines[ds.lineno - 1][: ds.col_offset].strip():
        return None
    if lines[ds.end_lineno - 1][ds.end_col_offset:].strip() not in ("",):
        return None
    if body[1].lineno <= ds.end_lineno:
        return None
    kept = lines[start - 1: ds.lineno - 1] + lines[ds.end_lineno: node.end_lineno]
    src = textwrap.dedent("".join(kept)).strip("\n")
    src = "\n".join(line.rstrip() for line in src.splitlines())
    return src or None


def _module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def stdlib_files(stdlib: Path) -> list[Path]:
    out = []
    for p in sorted(stdlib.rglob("*.py")):
        rel = p.relative_to(stdlib)
        if any(part in SKIP_PARTS or part.startswith("test") for part in rel.parts):
            continue
        out.append(p)
    return out


def extract_pairs(stdlib: Path | None = None) -> tuple[list[Pair], dict]:
    """All (source without docstring -> first docstring sentence) pairs of the standard library."""
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    files = stdlib_files(stdlib)
    pairs: list[Pair] = []
    per_file: dict[str, int] = {}
    unreadable = []
    for path in files:
        rel = path.relative_to(stdlib)
        try:
            with tokenize.open(path) as fh:
                text = fh.read()
            tree = ast.parse(text)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            unreadable.append(str(rel))
            continue
        lines = text.splitlines(keepends=True)
        module = _module_name(rel)
        n_before = len(pairs)

        def visit(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    qual = f"{prefix}{child.name}"
                    doc = ast.get_docstring(child, clean=False)
                    if doc:
                        target = first_sentence(doc)
                        source = _strip_docstring(child, lines) if target else None
                        if target and source:
                            pairs.append(Pair(id=f"{module}:{qual}:{child.lineno}", module=module,
                                              name=qual, source=source, target=target))
                    visit(child, f"{qual}.<locals>.")
                elif isinstance(child, ast.ClassDef):
                    visit(child, f"{prefix}{child.name}.")
                else:
                    visit(child, prefix)

        visit(tree, "")
        if len(pairs) > n_before:
            per_file[str(rel)] = len(pairs) - n_before
    n_raw = len(pairs)
    seen: set[tuple[str, str]] = set()
    unique = []
    for p in pairs:
        key = (p.source, p.target)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    manifest = {
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "stdlib": "the running interpreter's standard library (sysconfig stdlib path)",
        "skipped": "paths with a part starting with 'test', or named " + ", ".join(sorted(SKIP_PARTS)),
        "files_scanned": len(files),
        "files_unparsable": unreadable,
        "files_with_pairs": len(per_file),
        "pairs_per_file": per_file,
        "pairs_extracted": n_raw,
        "pairs_after_dedup": len(unique),
        "dedup_rule": "exact duplicate (source, target) pairs dropped, first occurrence kept (files in sorted order)",
    }
    return unique, manifest


def model_input(pair: Pair | dict, input_format: str = "name+source") -> str:
    """The text the model reads for a pair: ``source``, or its name as words, ": ", then ``source``."""
    name, source = (pair.name, pair.source) if isinstance(pair, Pair) else (pair["name"], pair["source"])
    if input_format == "source":
        return source
    return default_model_input(name, source)  # the one definition, shared with `repdiag analyze`


def heldout_module(module: str) -> bool:
    return int(hashlib.sha256(module.encode("utf-8")).hexdigest()[:8], 16) % 100 < HELDOUT_PERCENT


def split_pairs(pairs: Sequence[Pair]) -> tuple[list[Pair], list[Pair]]:
    train = [p for p in pairs if not heldout_module(p.module)]
    held = [p for p in pairs if heldout_module(p.module)]
    return train, held


def write_jsonl_gz(path: Path, rows: Iterable[dict]) -> None:
    """Deterministic gzip (mtime 0, no file name) of one JSON object per line."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))
    path.write_bytes(buf.getvalue())


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# --------------------------------------------------------------------------------------------------
# tokenizer and model
# --------------------------------------------------------------------------------------------------

def train_tokenizer(texts: Iterable[str], vocab_size: int, max_length: int = 512):
    """Byte-level BPE; <pad>=0 (also the decoder start), </s>=1 appended to every text, <unk>=2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer=trainer)
    assert [tk.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                      special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=max_length)


@dataclass
class ModelShape:
    d_model: int = 128
    d_ff: int = 512
    d_kv: int = 32
    num_heads: int = 4
    num_layers: int = 2
    num_decoder_layers: int = 2
    dropout_rate: float = 0.0      # 0: the attribution recorder can replay steps exactly


def build_model(vocab_size: int, shape: ModelShape, seed: int):
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=vocab_size, d_model=shape.d_model, d_ff=shape.d_ff, d_kv=shape.d_kv,
                   num_heads=shape.num_heads, num_layers=shape.num_layers,
                   num_decoder_layers=shape.num_decoder_layers, dropout_rate=shape.dropout_rate,
                   feed_forward_proj="relu", tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
                   decoder_start_token_id=0, relative_attention_num_buckets=32,
                   relative_attention_max_distance=128)
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(cfg)


def generation_config(max_new_tokens: int):
    from transformers import GenerationConfig

    return GenerationConfig(pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, bos_token_id=None,
                            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------

def encode_pairs(tokenizer, pairs: Sequence[Pair], max_source_tokens: int, max_target_tokens: int,
                 input_format: str = "name+source") -> list[dict]:
    """Token ids per pair; a truncated text keeps its final </s>."""
    def enc(texts, limit):
        out = []
        for ids in tokenizer(list(texts), add_special_tokens=True, verbose=False)["input_ids"]:
            if len(ids) > limit:
                ids = ids[: limit - 1] + [tokenizer.eos_token_id]
            out.append(ids)
        return out

    src = enc((model_input(p, input_format) for p in pairs), max_source_tokens)
    tgt = enc((p.target for p in pairs), max_target_tokens)
    return [{"input_ids": s, "labels": t, "example_ids": i} for i, (s, t) in enumerate(zip(src, tgt))]


class PairDataset:
    """A map-style dataset of encoded pairs (``input_ids``, ``labels``, ``example_ids``)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def make_collator(pad_id: int = 0) -> Callable[[list[dict]], dict]:
    """Pad to the longest in the batch; labels padded with -100; keeps ``example_ids`` as a tensor."""
    import torch

    def collate(features: list[dict]) -> dict:
        n_src = max(len(f["input_ids"]) for f in features)
        n_tgt = max(len(f["labels"]) for f in features)
        ids = torch.full((len(features), n_src), pad_id, dtype=torch.long)
        mask = torch.zeros((len(features), n_src), dtype=torch.long)
        labels = torch.full((len(features), n_tgt), -100, dtype=torch.long)
        for i, f in enumerate(features):
            ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[i, : len(f["input_ids"])] = 1
            labels[i, : len(f["labels"])] = torch.tensor(f["labels"])
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if "example_ids" in features[0]:
            batch["example_ids"] = torch.tensor([f["example_ids"] for f in features], dtype=torch.long)
        return batch

    return collate


def _trainer_class():
    from transformers import Trainer

    class PairTrainer(Trainer):
        """`Trainer` that takes ``example_ids`` out of the batch (kept in ``last_example_ids``)."""

        last_example_ids = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            self.last_example_ids = inputs.pop("example_ids", None)
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return PairTrainer


@dataclass
class TrainSettings:
    epochs: float = 3.0
    max_steps: int = -1
    batch_size: int = 16
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    warmup: float = 0.06
    seed: int = 20210126
    logging_steps: int = 50


def train(model, tokenizer, train_rows: list[dict], settings: TrainSettings, *,
          callbacks: Sequence[Any] = (), data_collator: Callable | None = None,
          work_dir: str | None = None):
    """Train ``model`` in place with ``transformers.Trainer``; returns (trainer, train_seconds).

    ``callbacks``: extra ``TrainerCallback`` objects (e.g. a training-path recorder).
    ``data_collator``: replaces the default padding collator; it receives the rows (dicts with
    ``input_ids``, ``labels``, ``example_ids``) and must return a batch the trainer accepts.
    ``remove_unused_columns`` is off, so ``example_ids`` reach the collator and the trainer.
    """
    from transformers import TrainingArguments

    work_dir = work_dir or tempfile.mkdtemp(prefix="repdiag-train-")
    args = TrainingArguments(
        output_dir=work_dir,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=settings.warmup,
        optim="adamw_torch",
        max_grad_norm=1.0,
        seed=settings.seed,
        data_seed=settings.seed,
        logging_steps=settings.logging_steps,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length",   # ~2x fewer padded tokens
        disable_tqdm=True,
    )
    trainer = _trainer_class()(model=model, args=args, train_dataset=PairDataset(train_rows),
                               data_collator=data_collator or make_collator(tokenizer.pad_token_id),
                               callbacks=list(callbacks))
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    model.eval()
    return trainer, seconds


# --------------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------------

def heldout_cross_entropy(model, rows: list[dict], batch_size: int = 64) -> tuple[float, int]:
    """Mean cross-entropy (nats per target token, </s> included) of the model on the rows' targets."""
    import torch

    collate = make_collator()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = collate(rows[i: i + batch_size])
            batch.pop("example_ids", None)
            logits = model(**batch).logits
            lp = torch.log_softmax(logits.double(), dim=-1)
            labels = batch["labels"]
            mask = labels != -100
            tok_lp = lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            total += float(-(tok_lp * mask).sum())
            count += int(mask.sum())
    return total / count, count


def unigram_cross_entropy(train_rows: list[dict], held_rows: list[dict], vocab_size: int) -> float:
    """Add-one unigram model of the training target tokens, scored on the held-out target tokens."""
    counts = Counter(t for r in train_rows for t in r["labels"])
    n = sum(counts.values())
    held = [t for r in held_rows for t in r["labels"]]
    return -sum(math.log((counts[t] + 1) / (n + vocab_size)) for t in held) / len(held)


def _first_word(text: str) -> str:
    words = text.strip().split()
    return re.sub(r"[^\w]", "", words[0]).lower() if words else ""


def has_loop(ids: Sequence[int], max_n: int = 4, min_repeats: int = 3) -> bool:
    """True if some n-gram (1 <= n <= max_n) occurs min_repeats times back to back."""
    ids = list(ids)
    for n in range(1, max_n + 1):
        for start in range(len(ids) - n * min_repeats + 1):
            gram = ids[start: start + n]
            if all(ids[start + k * n: start + (k + 1) * n] == gram for k in range(1, min_repeats)):
                return True
    return False


def greedy_outputs(model, tokenizer, rows: list[dict], max_new_tokens: int, batch_size: int = 32):
    """Greedy generations (token ids without the decoder start, cut after </s>) for the rows' sources."""
    import torch

    collate = make_collator()
    outs = []
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = collate([{"input_ids": r["input_ids"], "labels": [1]} for r in rows[i: i + batch_size]])
            gen = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)
            for seq in gen.tolist():
                seq = seq[1:]
                if 1 in seq:
                    seq = seq[: seq.index(1) + 1]
                else:
                    seq = [t for t in seq if t != 0] if all(t == 0 for t in seq) else seq
                outs.append(seq)
    return outs


def evaluate(model, tokenizer, train_rows, held_rows, held_pairs, train_pairs, max_new_tokens: int,
             n_samples: int = 8) -> dict:
    ce, n_tokens = heldout_cross_entropy(model, held_rows)
    uni = unigram_cross_entropy(train_rows, held_rows, len(tokenizer))
    outs = greedy_outputs(model, tokenizer, held_rows, max_new_tokens)
    texts = [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
    gen_no_eos = [o[:-1] if o and o[-1] == 1 else o for o in outs]
    loops = sum(has_loop(o, 4, 3) for o in gen_no_eos)
    missing_eos = sum(1 for o in outs if not o or o[-1] != 1)
    ref_loops = sum(has_loop(r["labels"][:-1], 4, 3) for r in held_rows)
    first_ok = sum(_first_word(t) == _first_word(p.target) for t, p in zip(texts, held_pairs))
    common_first, _ = Counter(_first_word(p.target) for p in train_pairs).most_common(1)[0]
    baseline_first = sum(_first_word(p.target) == common_first for p in held_pairs)
    step = max(1, len(held_pairs) // n_samples)
    samples = [{"id": held_pairs[i].id, "target": held_pairs[i].target, "greedy": texts[i],
                "loops": bool(has_loop(gen_no_eos[i]))} for i in range(0, len(held_pairs), step)][:n_samples]
    n = len(held_pairs)
    return {
        "heldout_ce_nats_per_token": round(ce, 4),
        "unigram_ce_nats_per_token": round(uni, 4),
        "heldout_perplexity": round(math.exp(ce), 1),
        "unigram_perplexity": round(math.exp(uni), 1),
        "heldout_target_tokens": n_tokens,
        "heldout_pairs": n,
        "first_word_accuracy": round(first_ok / n, 4),
        "first_word_baseline": {"word": common_first, "accuracy": round(baseline_first / n, 4)},
        "greedy_loop_rate": round(loops / n, 4),
        "greedy_loops": loops,
        "greedy_missing_eos": missing_eos,
        "greedy_missing_eos_rate": round(missing_eos / n, 4),
        "reference_loops": ref_loops,
        "loop_definition": "an n-gram (n <= 4 tokens) repeated >= 3 times back to back in the greedy output "
                           f"(max_new_tokens={max_new_tokens})",
        "distinct_greedy_outputs": len(set(texts)),
        "greedy_first_words": [[w, c] for w, c in Counter(_first_word(t) for t in texts).most_common(5)],
        "samples": samples,
    }


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------

def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def precompute_features(model, tokenizer, record_dir: Path, held_rows: list[dict], held_pairs: Sequence[Pair],
                        input_format: str, max_new_tokens: int) -> dict:
    """Fill ``record_dir/features`` with the projected training features of the checkpoint kernel.

    Runs one checkpoint-mode attribution (the loop of the first held-out input whose greedy output loops)
    with ``Projector(FEATURE_DIM, seed=FEATURE_SEED)`` over the ``FEATURE_LAYERS`` parameters; the cache it
    leaves (one ``[n_examples, dim]`` float16 array per checkpoint, keyed by the checkpoint's weights) is
    what later queries reuse. Writes ``features/settings.json`` (how to query it) and returns it.
    """
    import torch

    from repdiag.attribution import Projector, Query, Record, checkpoint_kernel

    record = Record.load(record_dir)
    cache_dir = record_dir / "features"
    if cache_dir.exists():
        import shutil

        shutil.rmtree(cache_dir)
    t0 = time.perf_counter()
    query = None
    for k, row in enumerate(held_rows[:64]):
        gen = greedy_outputs(model, tokenizer, [row], max_new_tokens)[0]
        q = Query.build("seq2seq", row["input_ids"], gen, decoder_start_token_id=0)
        if query is None or q.loop is not None:
            query, pick = q, k
        if q.loop is not None:
            break
    projector = Projector(dim=FEATURE_DIM, seed=FEATURE_SEED)
    measurement = "loop" if query.loop is not None else "sequence"
    res = checkpoint_kernel(model, record, query, measurement=measurement, backend="loop", dtype="float32",
                            layers=FEATURE_LAYERS, projector=projector, cache_dir=cache_dir)
    seconds = time.perf_counter() - t0
    files = sorted(cache_dir.glob("*.npy"))
    settings = {
        "what": "projected per-example gradient features of the training examples at each checkpoint (θ0, the "
                "intermediate checkpoints, the final weights): repdiag.attribution.cache.FeatureCache entries "
                "written by checkpoint_kernel(..., projector, cache_dir); query with the same layers and projector",
        "layers": FEATURE_LAYERS,
        "projector": projector.spec(),
        "dtype": "float16",
        "gradient_dtype": "float32",
        "points": list(res.checkpoints),
        "n_examples": record.n_examples,
        "files": [f.name for f in files],
        "bytes": sum(f.stat().st_size for f in cache_dir.iterdir() if f.is_file()),
        "seconds": round(seconds, 1),
        "example_query": {"heldout_pair": held_pairs[pick].id, "loop": list(query.loop) if query.loop else None,
                          "measurement": measurement, "delta_m": round(res.delta_m, 4),
                          "completeness": None if res.completeness is None else round(res.completeness, 4)},
    }
    (cache_dir / "settings.json").write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n",
                                             encoding="utf-8")
    return settings


def write_model_card(out: Path, manifest: dict, metrics: dict, cmd: str) -> None:
    m = metrics
    shape = m["model"]
    samples = "\n".join(
        f"| `{s['id']}` | {s['target'].replace('|', '/')} | {s['greedy'].replace('|', '/') or '(empty)'} |"
        for s in m["eval"]["samples"])
    e = m["eval"]
    record_section = ""
    r = m.get("record")
    if r:
        f = r["features"]
        ckpts = ", ".join(str(s) for s, _ in r["checkpoints"])
        record_section = f"""
## Training record (attribution)

`record/` is the training path recorded by `repdiag.attribution.PathRecorder` while the model trained,
in the format {r['format']}, **{r['bytes'] / 1e6:.2f} MB**: θ0 ({r['theta0_dtype']}), the weights after steps {ckpts}
(float16), the schedule of all {r['steps']} optimizer steps (example ids, loss weights `{r['weight_model']}`,
learning rate, clip factor) and the token ids of the {r['n_examples']} training examples, whose pairs are
`train.jsonl.gz` in order (the model input `name words: source`, and the target). The final weights'
hash in `record.json` matches `model.safetensors`. AdamW is not replayable exactly, so the record
supports the checkpoint kernel (TracInCP over θ0, the two checkpoints and the final weights) and the
tangent kernel.

`record/features/` ({r['features_bytes'] / 1e6:.2f} MB, computed in {f['seconds']:.0f} s after training) caches
the training examples' loss gradients over the last decoder block (`{f['layers']}`), projected to
{f['projector']['dim']} dimensions ({f['projector']['kind']}, seed {f['projector']['seed']}) and stored in
{f['dtype']}, one array per checkpoint (`features/settings.json`). With it, `repdiag analyze` attributes
the worst loop of this model in checkpoint mode at the cost of a few gradients of the query and lists the
training pairs that pushed most towards it (an approximation: first-order, learning-rate weighted,
not Adam-preconditioned, projected; its completeness is reported).
"""
    card = f"""# repdiag default model: `docstring-t5-tiny`

A small T5 that reads a Python function's source (docstring removed) and writes the first sentence of its
docstring. It is repdiag's bundled default model (`repdiag analyze` with no MODEL, or `default`): a real
text generator, genuinely trained on real text that nobody in this project wrote, small enough to ship
inside the package, and, like most small models under greedy decoding, prone to loops. That makes it
the demo.

## Data and licence

* Source: the standard library of the interpreter that ran the training script,
  {manifest['python_implementation']} {manifest['python_version']}. Skipped: {manifest['skipped']}.
* Pairs: one per function or method with a docstring, `source` = its source without the docstring
  (dedented), `target` = the first sentence of the docstring. {manifest['files_scanned']} files scanned,
  {manifest['files_with_pairs']} with pairs, {manifest['pairs_extracted']} pairs, {manifest['pairs_after_dedup']}
  after dropping exact duplicates.
* Split by module (rule: {manifest['split_rule']}): **{manifest['train_pairs']} training pairs**
  ({manifest['train_modules']} modules) and **{manifest['heldout_pairs']} held-out pairs**
  ({manifest['heldout_modules']} modules).
* The pairs ship with the model (`train.jsonl.gz`, `heldout.jsonl.gz`; fields `id`, `module`, `name`,
  `source`, `target`) so that attribution can show them on any Python version. `manifest.json` lists the
  files and counts.
* Licence of the data: the Python standard library is distributed under the **PSF License Agreement**
  (Python Software Foundation License Version 2; https://docs.python.org/3/license.html), which permits
  copying and redistribution with its copyright notice retained: Copyright (c) 2001 Python Software
  Foundation; All Rights Reserved. The extracted excerpts are derived from that code and stay under that
  licence; the trained weights are repdiag's.

## Model

* Architecture: T5 (`T5ForConditionalGeneration`), d_model {shape['d_model']}, d_ff {shape['d_ff']},
  {shape['num_layers']} encoder + {shape['num_decoder_layers']} decoder layers, {shape['num_heads']} heads
  (d_kv {shape['d_kv']}), ReLU feed-forward, tied input/output embeddings, dropout {shape['dropout_rate']}.
* Parameters: **{m['parameters']:,}**; weights `model.safetensors` {m['sizes_bytes']['model.safetensors'] / 1e6:.2f} MB
  (float32); the whole folder {m['sizes_bytes']['total'] / 1e6:.2f} MB.
* Tokenizer: byte-level BPE trained with `tokenizers` on the training pairs, {m['vocab_size']} tokens;
  `<pad>` = 0 (also the decoder start), `</s>` = 1 (appended to every text), `<unk>` = 2. Loads with
  `AutoTokenizer.from_pretrained(folder)`.
* Inputs are cut to {m['settings']['max_source_tokens']} tokens, targets to {m['settings']['max_target_tokens']}
  (a cut text keeps its final `</s>`).
* `generation_config.json`: greedy (`do_sample=false`, `num_beams=1`), `max_new_tokens`
  {m['settings']['max_new_tokens']}, pad 0, eos 1, decoder start 0.

## Training

* `transformers.Trainer`, AdamW (lr {m['settings']['learning_rate']}, weight decay {m['settings']['weight_decay']}),
  linear warm-up over {m['settings']['warmup']} of the steps then cosine decay, batch {m['settings']['batch_size']},
  {m['train']['steps']} steps ({m['train']['epochs']:.2f} epochs), seed {m['settings']['seed']},
  {m['settings']['threads']} torch thread(s). Final training loss {m['train']['final_train_loss']}.
* Training time: **{m['train']['train_seconds']:.0f} s** (the `Trainer.train()` call; {m['train']['total_seconds']:.0f} s for the
  whole script) on {m['hardware']}.
* Reproduce (from the repository root):

  ```bash
  {cmd}
  ```

  torch {m['versions']['torch']}, transformers {m['versions']['transformers']}, tokenizers
  {m['versions']['tokenizers']}. Same seed, thread count and versions give the same weights.

## Evaluation on the held-out modules

| | nats / target token | perplexity |
|---|---|---|
| this model (cross-entropy, teacher forcing) | **{e['heldout_ce_nats_per_token']:.3f}** | {e['heldout_perplexity']} |
| add-one unigram of the training targets, same tokens | {e['unigram_ce_nats_per_token']:.3f} | {e['unigram_perplexity']} |

Measured on {e['heldout_target_tokens']} target tokens of {e['heldout_pairs']} held-out pairs (`</s>` included).

* First-word accuracy of greedy output: **{e['first_word_accuracy']:.1%}** (always guessing the most common
  first word, "{e['first_word_baseline']['word']}", scores {e['first_word_baseline']['accuracy']:.1%}).
* Distinct greedy outputs: {e['distinct_greedy_outputs']} of {e['heldout_pairs']}. Most common greedy first words:
  {', '.join(f'"{w}" {c}' for w, c in e['greedy_first_words'])}. At this training budget the first word is
  sensible but hardly depends on the input: the model has learnt the style of a docstring's first
  sentence far better than what a particular function does.

Greedy samples on held-out functions:

| id | reference | greedy output |
|---|---|---|
{samples}

## Known behaviour: it loops

Under greedy decoding the model loops on **{e['greedy_loops']} of {e['heldout_pairs']} held-out inputs
({e['greedy_loop_rate']:.1%})** ({e['loop_definition']}), and it misses `</s>` within
{m['settings']['max_new_tokens']} new tokens on {e['greedy_missing_eos']} ({e['greedy_missing_eos_rate']:.1%}). The human
references trip the same test {e['reference_loops']} times. That is intended: repdiag's demo diagnoses,
predicts and mitigates exactly this. It is a demonstration model, not a documentation writer: its
sentences are generic and often wrong about the details.

{record_section}
The figures above are also in `metrics.json` (machine-readable) and are checked against it by
`tests/test_default_model.py`.
"""
    (out / "README.md").write_text(card, encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default repdiag/default_model)")
    ap.add_argument("--epochs", type=float, default=TrainSettings.epochs)
    ap.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    ap.add_argument("--seed", type=int, default=TrainSettings.seed)
    ap.add_argument("--lr", type=float, default=TrainSettings.learning_rate)
    ap.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=ModelShape.d_model)
    ap.add_argument("--d-ff", type=int, default=ModelShape.d_ff)
    ap.add_argument("--layers", type=int, default=ModelShape.num_layers, help="encoder and decoder layers each")
    ap.add_argument("--dropout", type=float, default=ModelShape.dropout_rate)
    ap.add_argument("--max-source-tokens", type=int, default=256)
    ap.add_argument("--max-target-tokens", type=int, default=48)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--input-format", choices=["name+source", "source"], default="name+source",
                    help="what the model reads: the function's qualified name as words, ': ', then its source "
                         "(default), or the source alone")
    ap.add_argument("--record", action=argparse.BooleanOptionalAction, default=True,
                    help="record the training path into OUT/record (θ0 and 2 intermediate checkpoints in float16, "
                         "the step schedule, the examples) and precompute the checkpoint-kernel feature cache in "
                         "OUT/record/features, so that `repdiag analyze` can attribute loops (default: on; "
                         "--no-record trains the same weights without it)")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    import torch
    import tokenizers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    # data ------------------------------------------------------------------------------------
    pairs, manifest = extract_pairs()
    train_pairs, held_pairs = split_pairs(pairs)
    manifest.update({
        "split_rule": SPLIT_RULE,
        "train_pairs": len(train_pairs), "heldout_pairs": len(held_pairs),
        "train_modules": len({p.module for p in train_pairs}),
        "heldout_modules": len({p.module for p in held_pairs}),
        "heldout_module_names": sorted({p.module for p in held_pairs}),
        "seed": args.seed,
        "pair_fields": ["id", "module", "name", "source", "target"],
    })
    manifest["model_input"] = (
        "the `source` field as is" if args.input_format == "source" else
        "name_words(`name`) + ': ' + `source`, where name_words splits the qualified name at '.', '_' and "
        "case changes and lower-cases the words ('_BaseV4._ip_int_from_string' -> 'base v 4 ip int from string'); "
        "see repdiag.prompts.default_model_input") + "; the model's output is the `target` field"
    manifest["input_format"] = args.input_format
    print(f"data: Python {manifest['python_version']} standard library: {manifest['files_scanned']} files scanned, "
          f"{manifest['files_with_pairs']} with pairs; {manifest['pairs_extracted']} pairs, "
          f"{manifest['pairs_after_dedup']} after exact dedup", flush=True)
    print(f"split: {len(train_pairs)} train ({manifest['train_modules']} modules), {len(held_pairs)} held-out "
          f"({manifest['heldout_modules']} modules); rule: {SPLIT_RULE}", flush=True)

    # tokenizer and model ---------------------------------------------------------------------
    tokenizer = train_tokenizer((t for p in train_pairs for t in (model_input(p, args.input_format), p.target)),
                                args.vocab_size,
                                max_length=args.max_source_tokens)
    train_rows = encode_pairs(tokenizer, train_pairs, args.max_source_tokens, args.max_target_tokens,
                              args.input_format)
    held_rows = encode_pairs(tokenizer, held_pairs, args.max_source_tokens, args.max_target_tokens,
                             args.input_format)
    n_cut = sum(len(r["input_ids"]) >= args.max_source_tokens for r in train_rows)
    print(f"tokenizer: byte-level BPE, {len(tokenizer)} tokens; sources cut at {args.max_source_tokens} tokens: "
          f"{n_cut} of {len(train_rows)}", flush=True)
    shape = ModelShape(d_model=args.d_model, d_ff=args.d_ff, d_kv=args.d_model // 4, num_heads=4,
                       num_layers=args.layers, num_decoder_layers=args.layers, dropout_rate=args.dropout)
    model = build_model(len(tokenizer), shape, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: T5 {asdict(shape)}, {n_params:,} parameters", flush=True)

    # train -----------------------------------------------------------------------------------
    settings = TrainSettings(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                             learning_rate=args.lr, seed=args.seed)
    out: Path = args.out
    record_dir = out / "record"
    callbacks: list = []
    collator = None
    if record_dir.exists():
        import shutil

        shutil.rmtree(record_dir)          # an old record would not match the new weights
    if args.record:
        from repdiag.attribution import IndexedCollator, PathRecorder, PathRecorderCallback

        out.mkdir(parents=True, exist_ok=True)
        per_epoch = math.ceil(len(train_rows) / args.batch_size)
        total_steps = args.max_steps if args.max_steps > 0 else math.ceil(per_epoch * args.epochs)
        every = total_steps // 3 + 1       # two intermediate checkpoints, never one at the final step
        recorder = PathRecorder(record_dir, model, kind="seq2seq", pad_token_id=tokenizer.pad_token_id,
                                n_examples=len(train_rows),
                                train_pairs=[(model_input(p, args.input_format), p.target) for p in train_pairs],
                                theta0_dtype="float16", checkpoint_dtype="float16", checkpoint_every=every)
        callbacks = [PathRecorderCallback(recorder)]
        collator = IndexedCollator(make_collator(tokenizer.pad_token_id), recorder, id_key="example_ids")
        print(f"recording the training path into {record_dir} (checkpoints every {every} of {total_steps} steps)",
              flush=True)
    trainer, train_seconds = train(model, tokenizer, train_rows, settings, callbacks=callbacks,
                                   data_collator=collator)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    steps = trainer.state.global_step
    print(f"trained {steps} steps in {train_seconds:.0f} s; last logged loss {losses[-1] if losses else None}",
          flush=True)

    # evaluate --------------------------------------------------------------------------------
    t_eval = time.perf_counter()
    ev = evaluate(model, tokenizer, train_rows, held_rows, held_pairs, train_pairs, args.max_new_tokens)
    print(f"held-out CE {ev['heldout_ce_nats_per_token']:.3f} nats/token vs add-one unigram "
          f"{ev['unigram_ce_nats_per_token']:.3f}; first-word accuracy {ev['first_word_accuracy']:.1%} "
          f"(always '{ev['first_word_baseline']['word']}': {ev['first_word_baseline']['accuracy']:.1%}); "
          f"greedy loops {ev['greedy_loops']}/{ev['heldout_pairs']}, missing </s> {ev['greedy_missing_eos']}; "
          f"eval {time.perf_counter() - t_eval:.0f} s", flush=True)
    for s in ev["samples"]:
        print(f"  {s['id']}\n    ref:    {s['target']}\n    greedy: {s['greedy']}", flush=True)

    feature_settings = None
    if args.record:
        t_feat = time.perf_counter()
        feature_settings = precompute_features(model, tokenizer, record_dir, held_rows, held_pairs,
                                               args.input_format, args.max_new_tokens)
        print(f"feature cache: {len(feature_settings['files'])} checkpoints x {feature_settings['n_examples']} "
              f"examples, {feature_settings['bytes'] / 1e6:.2f} MB, {time.perf_counter() - t_feat:.0f} s", flush=True)

    # write -----------------------------------------------------------------------------------
    out.mkdir(parents=True, exist_ok=True)
    for old in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json"):
        (out / old).unlink(missing_ok=True)
    model.generation_config = generation_config(args.max_new_tokens)
    model.config.use_cache = True               # Trainer turns the KV cache off while training
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    write_jsonl_gz(out / "train.jsonl.gz", (p.to_dict() for p in train_pairs))
    write_jsonl_gz(out / "heldout.jsonl.gz", (p.to_dict() for p in held_pairs))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")

    cmd_parts = ["python examples/train_default_model.py"]   # --out changes where, not what
    for flag, val, default in [("--epochs", args.epochs, TrainSettings.epochs), ("--max-steps", args.max_steps, -1),
                               ("--threads", args.threads, 1), ("--seed", args.seed, TrainSettings.seed),
                               ("--lr", args.lr, TrainSettings.learning_rate),
                               ("--batch-size", args.batch_size, TrainSettings.batch_size),
                               ("--vocab-size", args.vocab_size, 4096), ("--d-model", args.d_model, 128),
                               ("--d-ff", args.d_ff, 512), ("--layers", args.layers, 2),
                               ("--dropout", args.dropout, 0.0), ("--max-source-tokens", args.max_source_tokens, 256),
                               ("--max-target-tokens", args.max_target_tokens, 48),
                               ("--max-new-tokens", args.max_new_tokens, 48),
                               ("--input-format", args.input_format, "name+source")]:
        if val != default:
            cmd_parts.append(f"{flag} {val:g}" if isinstance(val, float) else f"{flag} {val}")
    if not args.record:
        cmd_parts.append("--no-record")
    cmd = " ".join(cmd_parts)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    metrics = {
        "parameters": n_params,
        "vocab_size": len(tokenizer),
        "model": asdict(shape),
        "settings": {**asdict(settings), "threads": args.threads, "max_source_tokens": args.max_source_tokens,
                     "max_target_tokens": args.max_target_tokens, "max_new_tokens": args.max_new_tokens},
        "train": {"steps": steps, "epochs": round(steps * args.batch_size / len(train_rows), 3),
                  "train_seconds": round(train_seconds, 1),
                  "total_seconds": round(time.perf_counter() - t_start, 1),
                  "final_train_loss": round(losses[-1], 4) if losses else None,
                  "loss_log": [[h["step"], round(h["loss"], 4)] for h in trainer.state.log_history if "loss" in h]},
        "eval": ev,
        "command": cmd,
        "hardware": f"{cpu}, {os.cpu_count()} logical CPUs (shared with other jobs), {args.threads} torch thread(s)",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
    }
    if args.record:
        rmeta = json.loads((record_dir / "record.json").read_text(encoding="utf-8"))
        metrics["record"] = {
            "folder": "record",
            "format": f"{rmeta['format']} v{rmeta['version']} (docs/attribution-format.md)",
            "theta0_dtype": rmeta["theta0"]["dtype"] if rmeta.get("theta0") else None,
            "checkpoints": [[c["step"], c["dtype"]] for c in rmeta["checkpoints"]],
            "steps": rmeta["steps"]["count"],
            "n_examples": rmeta["n_examples"],
            "weight_model": rmeta["weight_model"],
            "final_sha256": rmeta["final"]["sha256"],
            "train_pairs": "model inputs (model_input(pair)) and targets of train.jsonl.gz, in its order",
            "features": feature_settings,
            "bytes": _dir_size(record_dir),
            "features_bytes": _dir_size(record_dir / "features"),
        }
    # sizes: the card's size line counts the card itself approximately, so write twice
    for _ in range(2):
        sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
        if record_dir.is_dir():
            sizes["record/"] = _dir_size(record_dir)
        sizes["total"] = sum(v for k, v in sizes.items() if k != "total")
        metrics["sizes_bytes"] = sizes
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        write_model_card(out, manifest, metrics, cmd)
    for p in out.rglob("*"):
        if p.is_file():
            p.chmod(0o644)                  # save_pretrained may write 0600; the package must be readable
    print(f"wrote {out} ({_dir_size(out) / 1e6:.2f} MB): {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
