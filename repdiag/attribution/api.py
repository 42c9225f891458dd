"""Entry points: :func:`attribute` (any query) and :func:`attribute_loop` (what ``repdiag analyze`` calls).

Mode selection (``mode="auto"``, spec §4.3), always stated in the result:

1. θ0 at training precision + the full schedule + plain SGD → ``trapezoid`` (path kernel by replay);
2. otherwise checkpoints (θ0 and/or intermediate ones) + the schedule → ``checkpoints`` (TracInCP);
3. otherwise → ``final`` (tangent kernel; a similarity, not a decomposition).

Every step down that chain is a warning in the result and a note on stderr; an explicitly requested
mode that the record cannot support raises :class:`~repdiag.errors.RecordError`.
"""

from __future__ import annotations

import json

import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import RecordError, UsageError
from .data import Example, TrainPair, encode_pair, pair_sha, read_pairs
from .kernel import KernelAttribution, _check_optimizer_exact, checkpoint_kernel, path_kernel, tangent_kernel
from .outputs import MEASUREMENTS, Query
from .runfile import Record

__all__ = ["MODES", "attribute", "attribute_loop", "choose_mode", "load_train_pairs", "check_train_pairs"]

MODES = ("auto", "exact", "trapezoid", "first-order", "checkpoints", "final")
_RULE = {"exact": "exact", "trapezoid": "trapezoid", "first-order": "first"}
MAX_REPLAY_PARAMETERS = 5_000_000


def _note_stderr(msg: str) -> None:
    sys.stderr.write(f"repdiag attribution: {msg}\n")
    sys.stderr.flush()


def load_train_pairs(train) -> list[TrainPair]:
    """Training pairs from a path (JSONL/TSV) or a sequence of pairs / dicts / ``(source, target)`` tuples."""
    if train is None:
        return []
    if isinstance(train, (str, Path)):
        return read_pairs(train)
    out = []
    for p in train:
        if isinstance(p, TrainPair):
            out.append(p)
        elif isinstance(p, dict):
            out.append(TrainPair(str(p.get("source", p.get("input"))), str(p.get("target", p.get("output")))))
        else:
            out.append(TrainPair(str(p[0]), str(p[1])))
    return out


def check_train_pairs(record: Record, pairs: Sequence[TrainPair], tokenizer=None, eos_token_id=None) -> None:
    """Raise RecordError when the training pairs are not the ones the record was made with."""
    if len(pairs) != record.n_examples:
        raise RecordError(f"the training file has {len(pairs)} pairs but the record has {record.n_examples} "
                          "examples: pass the training file the record was made with")
    shas = record.meta.get("pair_sha256")
    if shas:
        for i, (p, s) in enumerate(zip(pairs, shas)):
            if pair_sha(p.source, p.target) != s:
                raise RecordError(f"training pair {i} ({p.source[:40]!r}) differs from the one recorded: pass the "
                                  "training file the record was made with, in the same order")
        return
    if tokenizer is None:
        return
    examples = record.examples()
    for i, (p, e) in enumerate(zip(pairs, examples)):
        if e is None:
            continue
        enc = encode_pair(tokenizer, record.kind, p.source, p.target, eos_token_id=eos_token_id)
        if enc != e:
            raise RecordError(f"training pair {i} ({p.source[:40]!r}) does not tokenize to the recorded example: "
                              "pass the training file the record was made with, in the same order")


def choose_mode(record: Record | None, mode: str, n_parameters: int) -> tuple[str, list[str]]:
    """The mode to run and the notes explaining any step down from what was asked."""
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    notes: list[str] = []
    if record is None:
        if mode not in ("auto", "final"):
            raise RecordError(f"--mode {mode} needs a training record: pass --record or use --mode final")
        if mode == "auto":
            notes.append("no training record: fell back to mode final (tangent-kernel similarity, not a "
                         "decomposition)")
        return "final", notes
    replay_reasons = _check_optimizer_exact(record)
    if not record.has_theta0:
        replay_reasons.append("the record has no θ0")
    elif not record.theta0_exact:
        replay_reasons.append(f"θ0 was stored in {record.meta['theta0'].get('dtype')}, below the training precision")
    if n_parameters > MAX_REPLAY_PARAMETERS and mode == "auto":
        replay_reasons.append(f"{n_parameters} parameters exceed the replay limit of {MAX_REPLAY_PARAMETERS}")
    has_ckpt = record.has_theta0 or bool(record.checkpoints)
    if mode in _RULE:
        if replay_reasons:
            raise RecordError(f"--mode {mode} needs an exact replay, but {replay_reasons[0]}: use --mode checkpoints")
        return mode, notes
    if mode == "checkpoints":
        if not has_ckpt:
            raise RecordError("--mode checkpoints needs θ0 or intermediate checkpoints in the record: use --mode final")
        return mode, notes
    if mode == "final":
        return mode, notes
    if not replay_reasons:
        return "trapezoid", notes
    if has_ckpt:
        notes.append(f"auto: no exact replay ({replay_reasons[0]}); fell back to mode checkpoints (TracInCP, "
                     "first-order, completeness reported)")
        return "checkpoints", notes
    notes.append(f"auto: no replay ({replay_reasons[0]}) and no checkpoints; fell back to mode final (tangent "
                 "kernel, not a decomposition)")
    return "final", notes


def attribute(model, query: Query, *, record: Record | str | Path | None = None, train=None, tokenizer=None,
              mode: str = "auto", measurement: str = "loop", backend: str = "auto", layers: str | None = None,
              eos_token_id: int | None = None, pad_token_id: int | None = None,
              notify: Callable[[str], None] | None = _note_stderr, progress=None, executor=None,
              **kwargs: Any) -> KernelAttribution:
    """Attribute ``query``'s ``measurement`` to the training examples.

    Checkpoint mode also takes ``projector=Projector(dim, kind, seed)`` and ``cache_dir=...`` (projected
    training features cached per checkpoint; other modes ignore both).

    ``record``: a record folder or :class:`Record` (``None`` → final mode over ``train``). ``train``: the
    training pairs (path or sequence) — checked against the record, used to display pairs (and, in final
    mode without a record, as the examples). Extra ``kwargs`` go to the kernel function.

    ``executor`` (:class:`repdiag.executors.Executor`, e.g. Ray, or one with a shard folder): where the
    checkpoint and final modes compute their per-example gradient features, in shards (same bytes as
    without it). The replay modes walk the steps in order in this process; with an executor they say so.
    """
    if isinstance(record, (str, Path)):
        record = Record.load(record)
    pairs = load_train_pairs(train)
    if record is not None and pairs:
        check_train_pairs(record, pairs, tokenizer, eos_token_id)
    n_params = sum(p.numel() for p in model.parameters())
    chosen, notes = choose_mode(record, mode, n_params)
    if measurement not in query.names:
        raise UsageError(f"measurement {measurement!r} is not available for this query (have: "
                         f"{', '.join(query.names)}); a loop measurement needs a detected loop")
    for msg in notes:
        if notify is not None:
            notify(msg)
    display = tuple((p.source, p.target) for p in pairs) if pairs else None
    if chosen != "checkpoints":  # the replay modes stream exact dot products; projection is for checkpoints
        kwargs = {k: v for k, v in kwargs.items() if k not in ("projector", "cache_dir")}
    if chosen in _RULE and executor is not None:
        notes.append(f"mode {chosen} replays the training steps in order in this process: the executor and its "
                     "shard folder are used by the checkpoints and final modes only")
        if notify is not None:
            notify(notes[-1])
        kwargs.pop("shard_examples", None)
    if chosen in _RULE:
        res = path_kernel(model, record, query, rule=_RULE[chosen], measurement=measurement, pairs=display,
                          backend=backend, progress=progress, **kwargs)
    elif chosen == "checkpoints":
        res = checkpoint_kernel(model, record, query, measurement=measurement, pairs=display, backend=backend,
                                layers=layers, progress=progress, executor=executor, **kwargs)
    else:
        if record is not None:
            examples = [e for e in record.examples()]
            kind, pad = record.kind, record.meta.get("pad_token_id", 0)
        else:
            if not pairs or tokenizer is None:
                raise UsageError("final mode without a record needs the training pairs and the tokenizer")
            kind = query.kind
            examples = [encode_pair(tokenizer, kind, p.source, p.target, eos_token_id=eos_token_id) for p in pairs]
            pad = pad_token_id if pad_token_id is not None else (tokenizer.pad_token_id or 0)
        res = tangent_kernel(model, examples, query, kind=kind, pad_token_id=pad, measurement=measurement,
                             pairs=display, backend=backend, layers=layers,
                             warnings=record.warnings if record is not None else (), executor=executor,
                             progress=progress, **{k: v for k, v in kwargs.items() if k == "shard_examples"})
    if notes:
        import dataclasses

        res = dataclasses.replace(res, warnings=tuple(dict.fromkeys([*notes, *res.warnings])))
    if notify is not None:
        for w in res.warnings:
            if w not in notes and "fell back" in w:
                notify(w)
    return res


def attribute_loop(loaded_model, train_pairs, record_dir, prompt: str, generated_ids: Sequence[int], mode: str = "auto",
                   top: int = 10, *, measurement: str = "loop", loop: tuple[int, int] | str = "auto",
                   backend: str = "auto", notify: Callable[[str], None] | None = _note_stderr,
                   **kwargs: Any) -> KernelAttribution:
    """Attribute the loop in ``generated_ids`` (the output of ``generate(prompt)``) to training pairs.

    ``loaded_model``: a :class:`repdiag.models.LoadedModel`. ``generated_ids`` may include the decoder start
    token (seq2seq) or the echoed prompt (causal); both are stripped. The loop is found with the shared
    cycle detector unless ``loop=(start, period)`` is given; without a loop, ``measurement`` falls back to
    ``sequence`` (stated in the warnings). ``top`` is kept for the caller: ``result.to_dict(top)``.
    """
    lm = loaded_model
    tok = lm.tokenizer
    prompt_ids = tok(prompt)["input_ids"]
    query = Query.build(lm.kind, prompt_ids, generated_ids, decoder_start_token_id=lm.decoder_start_token_id,
                        loop=loop, prompt=prompt)
    query = Query(query.kind, query.prompt_ids, query.generated_ids, query.loop, query.token_position,
                  query.decoder_start_token_id, prompt, tok.decode(list(query.generated_ids)), query.names)
    extra = []
    if measurement not in query.names:
        extra.append(f"no loop found in the generated sequence: attributed measurement 'sequence' instead of "
                     f"{measurement!r}")
        measurement = "sequence"
    res = attribute(lm.model, query, record=record_dir, train=train_pairs, tokenizer=tok, mode=mode,
                    measurement=measurement, backend=backend, eos_token_id=lm.eos_token_id,
                    pad_token_id=lm.pad_token_id, notify=notify, **kwargs)
    if extra:
        import dataclasses

        if notify is not None:
            for m in extra:
                notify(m)
        res = dataclasses.replace(res, warnings=tuple([*extra, *res.warnings]))
    return res


def cache_settings(record_dir: str | Path) -> dict[str, Any]:
    """Keyword arguments that make a query hit a record's precomputed feature cache, or ``{}``.

    ``record/features/settings.json`` (written with the cache, e.g. by ``examples/train_default_model.py``)
    names the projector, the parameter subset and the gradient precision the cache was built with; a
    query must use the same ones, else it recomputes every training gradient.
    """
    from .projection import Projector

    settings_path = Path(record_dir) / "features" / "settings.json"
    if not settings_path.is_file():
        return {}
    fs = json.loads(settings_path.read_text(encoding="utf-8"))
    pj = fs["projector"]
    return {"projector": Projector(dim=int(pj["dim"]), kind=pj["kind"], seed=int(pj["seed"]), block=int(pj["block"])),
            "cache_dir": Path(record_dir) / "features", "layers": fs.get("layers"),
            "dtype": fs.get("gradient_dtype", "float32")}


__all__ += ["MEASUREMENTS", "Example", "cache_settings"]
