"""Prompts for an analysis: reading a prompts file, the defaults, and the seeded trace/measure split.

A prompts file is plain text (one prompt a line) or JSONL (``.jsonl``: one object a line with a
``prompt`` field and an optional ``reference``). Without a file, the bundled default model uses its
held-out inputs (with their docstrings as references) and any other model a small built-in set.

The prompts are split by a seeded rule into *trace* prompts (used to build the transition matrix) and
*measurement* prompts (used for the generation runs), never shared, so that the prediction is never
tuned to the measurement (repetition-theory.md §7.1).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BadInputError, UsageError

__all__ = ["PromptSet", "PromptSplit", "load_prompts", "builtin_prompts", "default_model_prompts",
           "default_model_train_pairs", "default_model_input", "name_words", "split_prompts"]

#: used when neither a prompts file nor the bundled model's held-out inputs apply: short, generic
#: openings that suit story, translation and summarisation models alike.
BUILTIN_PROMPTS = (
    "Once upon a time",
    "The dog",
    "The little girl went to the park",
    "Tom and his friend",
    "The weather today is",
    "In the morning, the children",
    "She opened the box and",
    "The cat sat on the mat.",
    "We went to the market to buy",
    "The old man told a story about",
    "It was a sunny day and",
    "The teacher asked the class",
    "My favourite food is",
    "The bird flew over the",
    "A small boat sailed across the lake.",
    "He wanted to see what was inside",
    "The city council approved the new budget on Monday.",
    "Researchers found that the new method",
    "The train was late because",
    "After the rain stopped, they",
    "The company announced its results",
    "Please translate this sentence.",
    "The meeting will start at noon.",
    "There was a big red ball",
)


@dataclass(frozen=True)
class PromptSet:
    """Prompts with optional references, and where they came from."""

    prompts: tuple[str, ...]
    references: tuple[str | None, ...]
    source: str

    def __post_init__(self) -> None:
        if len(self.prompts) != len(self.references):
            raise ValueError("prompts and references must have the same length")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def has_references(self) -> bool:
        return any(r is not None for r in self.references)

    def take(self, n: int | None) -> "PromptSet":
        """The first ``n`` prompts (all when ``n`` is None)."""
        if n is None:
            return self
        if n < 1:
            raise UsageError(f"--n-prompts must be at least 1, got {n}")
        return PromptSet(self.prompts[:n], self.references[:n], self.source)

    def subset(self, indices: "list[int] | tuple[int, ...]") -> "PromptSet":
        return PromptSet(tuple(self.prompts[i] for i in indices), tuple(self.references[i] for i in indices),
                         self.source)

    def fingerprint(self) -> str:
        """SHA-256 (16 hex digits) of the prompt texts, in order."""
        return hashlib.sha256(json.dumps(list(self.prompts)).encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class PromptSplit:
    """Disjoint trace and measurement prompt indices, and the rule that produced them."""

    trace: tuple[int, ...]
    measure: tuple[int, ...]
    rule: str
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"trace_indices": list(self.trace), "measure_indices": list(self.measure), "split_rule": self.rule,
                "n_trace": len(self.trace), "n_measure": len(self.measure), **self.extra}


def load_prompts(path: str | Path) -> PromptSet:
    """Read a prompts file: JSONL (``.jsonl``, fields ``prompt`` and optional ``reference``) or plain text.

    Raises ``BadInputError`` for a missing or empty file and for a malformed JSONL line (its number).
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"prompts file {str(path)!r} does not exist: check the path")
    text = path.read_text(encoding="utf-8", errors="replace")
    prompts: list[str] = []
    references: list[str | None] = []
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadInputError(f"{path.name} line {number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise BadInputError(f"{path.name} line {number}: expected an object with a string 'prompt' field")
            reference = record.get("reference")
            if reference is not None and not isinstance(reference, str):
                raise BadInputError(f"{path.name} line {number}: 'reference' must be a string")
            prompts.append(record["prompt"])
            references.append(reference)
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        references = [None] * len(prompts)
    if not prompts:
        raise BadInputError(f"prompts file {str(path)!r} holds no prompt: one prompt a line, or JSONL with 'prompt'")
    return PromptSet(tuple(prompts), tuple(references), str(path))


def builtin_prompts() -> PromptSet:
    """The small built-in prompt set (:data:`BUILTIN_PROMPTS`)."""
    return PromptSet(BUILTIN_PROMPTS, (None,) * len(BUILTIN_PROMPTS), "builtin")


def name_words(name: str) -> str:
    """A qualified name as lower-case words: ``"_BaseV4._ip_int_from_string"`` → ``"base v 4 ip int from string"``."""
    name = name.replace(".<locals>.", ".")
    words: list[str] = []
    for part in re.split(r"[._]+", name):
        words += re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", part) or ([part] if part else [])
    return " ".join(w.lower() for w in words)


def default_model_input(name: str, source: str) -> str:
    """What the bundled model reads for a function: its name as words, ``": "``, then its source.

    The one definition of the input format, used by ``examples/train_default_model.py`` for training
    and by ``repdiag analyze`` for the held-out prompts.
    """
    return f"{name_words(name)}: {source}"


def default_model_prompts(model_dir: Path) -> PromptSet | None:
    """The bundled default model's held-out inputs (:func:`default_model_input`), docstrings as references."""
    heldout = model_dir / "heldout.jsonl.gz"
    if not heldout.is_file():
        return None
    prompts, references = [], []
    with gzip.open(heldout, "rt", encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                prompts.append(default_model_input(record["name"], record["source"]))
                references.append(record.get("target"))
    return PromptSet(tuple(prompts), tuple(references), "default-model held-out functions")


def default_model_train_pairs(model_dir: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """The bundled model's training pairs as it read them, ``(default_model_input, target)``, and their ids.

    In file order: the order the shipped training record indexes (the attribution checks the pairs'
    hashes). An id is ``module:qualified name:line``.
    """
    with gzip.open(model_dir / "train.jsonl.gz", "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return [(default_model_input(r["name"], r["source"]), r["target"]) for r in rows], [r["id"] for r in rows]


def split_prompts(n: int, seed: int, trace_fraction: float = 0.5) -> PromptSplit:
    """Split ``n`` prompts into disjoint trace and measurement sets by a seeded permutation.

    Rule: ``numpy.random.default_rng(seed).permutation(n)``; the first ``ceil(n * trace_fraction)``
    indices (at least 1, and at most ``n - 1``) are trace prompts, the rest measurement prompts; both
    lists are returned sorted.
    """
    if n < 2:
        raise UsageError(f"need at least 2 prompts to split into trace and measurement prompts, got {n}")
    if not 0.0 < trace_fraction < 1.0:
        raise UsageError(f"trace fraction must lie in (0, 1), got {trace_fraction}")
    order = np.random.default_rng(seed).permutation(n)
    n_trace = min(max(1, math.ceil(n * trace_fraction)), n - 1)
    rule = (f"numpy.random.default_rng({seed}).permutation({n}); first {n_trace} -> trace, "
            f"remaining {n - n_trace} -> measure")
    return PromptSplit(tuple(sorted(int(i) for i in order[:n_trace])),
                       tuple(sorted(int(i) for i in order[n_trace:])), rule)
