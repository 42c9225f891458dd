"""A reference plain-SGD training loop with the recorder, and synthetic repeating-target data.

Used by the tests and the benchmark (and a worked example of :class:`PathRecorder` in a plain loop).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

from .data import Example, TrainPair, collate, encode_pair
from .recorder import PathRecorder

__all__ = ["repeat_pairs", "encode_all", "train_sgd"]

LETTERS = list("abcdefghijklmnopqrstuvwxyz")


def repeat_pairs(n: int, seed: int = 0, *, max_len: int = 4, planted: Sequence[TrainPair] = ()) -> list[TrainPair]:
    """``n`` pairs ``copy x y → x y x y …`` / ``rev x y → y x``; ``planted`` pairs are appended last."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(2, max_len)
        toks = [rng.choice(LETTERS[:12]) for _ in range(k)]
        if rng.random() < 0.5:
            out.append(TrainPair("copy " + " ".join(toks), " ".join(toks + toks[:2])))
        else:
            out.append(TrainPair("rev " + " ".join(toks), " ".join(reversed(toks))))
    return out + list(planted)


def encode_all(tokenizer, kind: str, pairs: Sequence[TrainPair]) -> list[Example]:
    return [encode_pair(tokenizer, kind, p.source, p.target) for p in pairs]


def train_sgd(model, examples: Sequence[Example], record_dir: str | Path | None, *, kind: str, pad_token_id: int,
              batch_size: int = 8, lr: float = 0.05, epochs: int = 1, seed: int = 0, repeat_each: int = 1,
              checkpoint_every: int | None = None, pairs: Sequence[TrainPair] | None = None,
              weight_model: str = "auto", max_grad_norm: float | None = None, momentum: float = 0.0,
              weight_decay: float = 0.0, checkpoint_dtype: str = "float32", optimizer: str = "sgd",
              record_kwargs: dict | None = None) -> PathRecorder | None:
    """Train ``model`` in place with HF's token-mean loss and (optionally) record the run.

    ``repeat_each``: apply every batch that many times at ``lr`` (the η-halving check uses
    ``lr/2, repeat_each=2``).
    """
    import torch

    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    rec = None
    if record_dir is not None:
        rec = PathRecorder(record_dir, model, kind=kind, pad_token_id=pad_token_id, n_examples=len(examples),
                           train_pairs=pairs, checkpoint_every=checkpoint_every, checkpoint_dtype=checkpoint_dtype,
                           weight_model=weight_model, **(record_kwargs or {}))
        rec.begin()
    rng = random.Random(seed)
    model.train()
    for _ in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for k in range(0, len(order), batch_size):
            ids = order[k:k + batch_size]
            for _r in range(repeat_each):
                batch = collate([examples[i] for i in ids], pad_token_id)
                if rec is not None:
                    rec.observe_batch(ids, batch)
                loss = model(**batch).loss
                loss.backward()
                if rec is not None:
                    rec.pre_step(opt, max_grad_norm=max_grad_norm)
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                opt.step()
                opt.zero_grad()
                if rec is not None:
                    rec.post_step()
    model.eval()
    if rec is not None:
        rec.end()
    return rec
