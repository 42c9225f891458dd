"""``repdiag attribute``: which training pairs pushed the model towards an output (kernel attribution)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import OutputFormat, STATE, existing_file, print_json, stderr, stdout


def _parse_loop(text: Optional[str]):
    if text is None:
        return "auto"
    from ..errors import UsageError

    try:
        s, p = text.split(":")
        return int(s), int(p)
    except ValueError as exc:
        raise UsageError(f"--loop expects START:PERIOD (e.g. 3:2), not {text!r}") from exc


def _query_from_report(path: Path) -> tuple[str, list[int] | None]:
    """(prompt, generated ids or None) of the worst loop in a report.json."""
    from ..errors import BadInputError

    try:
        rep = json.loads(existing_file(path, "report").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BadInputError(f"{str(path)!r} is not JSON ({exc.msg})") from exc
    q = (rep.get("attribution") or {}).get("query") if isinstance(rep.get("attribution"), dict) else None
    if q and q.get("prompt") is not None:
        return q["prompt"], q.get("generated_ids")
    for key in ("loop_map", "examples"):
        sec = rep.get(key)
        items = sec if isinstance(sec, list) else (sec or {}).get("examples", []) if isinstance(sec, dict) else []
        for it in items:
            if isinstance(it, dict) and isinstance(it.get("prompt"), str):
                gen = it.get("generated_ids") or it.get("output_ids") or it.get("ids")
                return it["prompt"], gen if isinstance(gen, list) else None
    raise BadInputError(f"{str(path)!r} names no prompt to attribute (no attribution.query, loop_map or examples): "
                        "pass --query TEXT")


def _generate(lm, prompt: str, max_new_tokens: int) -> list[int]:
    import torch

    enc = lm.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = lm.model.generate(**{k: v.to(lm.device) for k, v in enc.items()}, max_new_tokens=max_new_tokens,
                                do_sample=False, num_beams=1, pad_token_id=lm.pad_token_id)
    return [int(t) for t in out[0].tolist()]


def register(app: typer.Typer) -> None:
    @app.command("attribute")
    def attribute_cmd(
        model: Annotated[str, typer.Argument(help="Hub id, local folder, or 'default'.")],
        train: Annotated[Optional[Path], typer.Option(
            "--train", help="Training pairs (JSONL source/target, .gz allowed, or TSV), in the order the record "
                            "indexes them. Default for the bundled model: its own training pairs.")] = None,
        record: Annotated[Optional[Path], typer.Option(
            "--record", help="Training record folder (PathRecorder). Default for the bundled model: its "
                             "shipped record.")] = None,
        query: Annotated[Optional[str], typer.Option("--query", help="Prompt; the output is its greedy "
                                                                     "continuation (or --generated).")] = None,
        from_report: Annotated[Optional[Path], typer.Option("--from-report", help="Take the query from a "
                                                                                  "report.json.")] = None,
        generated: Annotated[Optional[str], typer.Option("--generated", help="Fixed output text to attribute "
                                                                             "instead of generating.")] = None,
        mode: Annotated[str, typer.Option("--mode", help="auto|exact|trapezoid|first-order|checkpoints|final")]
        = "auto",
        measurement: Annotated[str, typer.Option("--output", "--measurement",
                                                 help="loop|loop_margin|token|sequence")] = "loop",
        loop: Annotated[Optional[str], typer.Option("--loop", help="START:PERIOD of the loop in the output "
                                                                   "(default: detected).")] = None,
        top: Annotated[int, typer.Option("--top", min=1, help="Proponents and opponents to show.")] = 20,
        dump: Annotated[Optional[Path], typer.Option("--dump", help="Write the run, query and contributions "
                                                                    "in the exchange format.")] = None,
        fmt: Annotated[OutputFormat, typer.Option("--format", help="table or json.")] = OutputFormat.table,
        layers: Annotated[Optional[str], typer.Option("--layers", help="Regex of parameters (checkpoint/final "
                                                                       "modes).")] = None,
        backend: Annotated[str, typer.Option("--backend", help="auto|loop|vmap per-example gradients.")] = "auto",
        max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 48,
        revision: Annotated[Optional[str], typer.Option("--revision")] = None,
        trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code")] = False,
        executor: Annotated[str, typer.Option("--executor", help="Checkpoints/final modes: local (this process) or "
                                                                 "ray (actors that each hold the model; same "
                                                                 "bytes). Needs repdiag\\[ray].")] = "local",
        ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="Ray cluster to join (e.g. auto); "
                                                                                 "default: start a local Ray.")]
        = None,
        workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="Ray actors (default: the "
                                                                               "cluster's CPUs).")] = None,
        shard_dir: Annotated[Optional[Path], typer.Option(
            "--shard-dir", help="Checkpoints/final modes: write each finished feature shard here; a rerun with the "
                                "same folder loads them instead of recomputing (same bytes). Refused (exit 2) when "
                                "the folder holds another job's shards.")] = None,
    ) -> None:
        """Attribute a (looping) output to training pairs: proponents, opponents, Δm, residual, mode."""
        from ..attribution.api import MODES, attribute
        from ..attribution.data import read_pairs
        from ..attribution.outputs import Query
        from ..attribution.runfile import Record
        from ..errors import UsageError
        from ..models import load_model

        if (query is None) == (from_report is None):
            raise UsageError("pass exactly one of --query TEXT or --from-report report.json")
        if mode not in MODES:
            raise UsageError(f"unknown --mode {mode!r}; choose from {', '.join(MODES)}")
        _check_executor(executor, ray_address, workers)
        extra: dict = {}
        if model in ("default", "") and train is None:  # the bundled model ships its pairs, record and cache
            from ..attribution.api import cache_settings
            from ..models import DEFAULT_MODEL_DIR
            from ..prompts import default_model_train_pairs

            pairs, _ids = default_model_train_pairs(DEFAULT_MODEL_DIR)
            record = record or DEFAULT_MODEL_DIR / "record"
            if mode in ("auto", "checkpoints") and layers is None:
                extra = cache_settings(record)
                layers = extra.pop("layers", None)
        elif train is None:
            raise UsageError("pass --train PAIRS (the training pairs in record order) for a model other than "
                             "the bundled one")
        else:
            pairs = read_pairs(train)
        rec = Record.load(record) if record is not None else None
        # load in the record's training precision so that the replay can reproduce the final weights
        dtype = (rec.meta.get("model") or {}).get("dtype", "float32") if rec is not None else "float32"
        lm = load_model(model, revision=revision, trust_remote_code=trust_remote_code,
                        dtype=dtype if dtype in ("float32", "float64") else "float32")
        gen_ids = None
        prompt = query
        if from_report is not None:
            prompt, gen_ids = _query_from_report(from_report)
        if generated is not None:
            gen_ids = lm.tokenizer(text_target=generated)["input_ids"] if lm.kind == "seq2seq" else \
                lm.tokenizer(generated, add_special_tokens=False)["input_ids"]
        if gen_ids is None:
            gen_ids = _generate(lm, prompt, max_new_tokens)
        prompt_ids = lm.tokenizer(prompt)["input_ids"]
        q = Query.build(lm.kind, prompt_ids, gen_ids, decoder_start_token_id=lm.decoder_start_token_id,
                        loop=_parse_loop(loop), prompt=prompt)
        q = Query(q.kind, q.prompt_ids, q.generated_ids, q.loop, q.token_position, q.decoder_start_token_id,
                  prompt, lm.tokenizer.decode(list(q.generated_ids)), q.names)
        if measurement not in q.names:
            raise UsageError(f"measurement {measurement!r} needs a loop and none was found in the output "
                             f"{q.generated_text!r}: pass --loop START:PERIOD or --output sequence")
        notes = []

        def note(msg: str) -> None:
            notes.append(msg)
            if not STATE.quiet:
                stderr.print(f"[yellow]note:[/] {msg}", highlight=False)

        ex = _make_executor(executor, ray_address, workers, shard_dir, lm, trust_remote_code)
        try:
            res = attribute(lm.model, q, record=rec, train=pairs, tokenizer=lm.tokenizer, mode=mode,
                            measurement=measurement, backend=backend, layers=layers, eos_token_id=lm.eos_token_id,
                            pad_token_id=lm.pad_token_id, notify=note, executor=ex, **extra)
        finally:
            if ex is not None:
                ex.close()
        if dump is not None:
            from ..attribution.dump import write_dump

            write_dump(res, dump, record=rec, pairs=[(p.source, p.target) for p in pairs])
        if not STATE.quiet:
            for w in res.warnings:
                if w not in notes:
                    stderr.print(f"[yellow]warning:[/] {w}", highlight=False)
        if fmt == OutputFormat.json:
            print_json(res.to_dict(top, include_contributions=True))
            return
        _print_table(res, top)


def _check_executor(name: str, address: Optional[str], workers: Optional[int]) -> None:
    """Raise UsageError for an unknown executor or Ray options without ``--executor ray``."""
    from ..errors import UsageError
    from ..executors import EXECUTORS

    if name.lower() not in EXECUTORS:
        raise UsageError(f"unknown --executor {name!r}: use local or ray")
    if name.lower() == "local" and (address is not None or workers is not None):
        raise UsageError("--ray-address and --workers need --executor ray")


def _make_executor(name: str, address: Optional[str], workers: Optional[int], shard_dir: Optional[Path], lm,
                   trust_remote_code: bool):
    """None (this process, no shard folder), or the executor of ``--executor`` / ``--shard-dir``.

    Ray actors load the model as the driver did (id, revision, dtype), once per actor.
    """
    from ..executors import get_executor, model_spec

    if name.lower() == "local":
        return None if shard_dir is None else get_executor("local", shard_dir=shard_dir)
    return get_executor("ray", address, workers, shard_dir=shard_dir,
                        model=model_spec(lm, trust_remote_code=trust_remote_code))


def _fmt(x) -> str:
    if x is None:
        return "—"
    return f"{x:.6g}" if isinstance(x, float) else str(x)


def _print_table(res, top: int) -> None:
    from rich.table import Table

    d = res.to_dict(top)
    q = d["query"]
    stdout.print(f"mode: {d['mode']}  kernel: {d['kernel']}  decomposition: {str(d['decomposition']).lower()}",
                 highlight=False)
    stdout.print(f"query: {q.get('prompt')!r} → {q.get('generated')!r}  measurement: {d['measurement']}"
                 + (f"  loop: start {q['loop']['start']}, period {q['loop']['period']}" if q.get("loop") else ""),
                 highlight=False)
    if d["decomposition"]:
        stdout.print(f"b = m(θ0) = {_fmt(d['b'])}   Δm = {_fmt(d['delta_m'])}   Σ C_i = {_fmt(d['sum_contributions'])}"
                     f"   residual = {_fmt(d['completeness_residual'])}   completeness = {_fmt(d['completeness'])}"
                     + "".join(f"   {k} = {_fmt(v)}" for k, v in d["optimizer_terms"].items()), highlight=False)
    else:
        stdout.print(f"m(θ_T) = {_fmt(d['m_final'])}   (similarity scores; no completeness)", highlight=False)
    for title, rows in (("proponents", d["top"]), ("opponents", d["opponents"])):
        t = Table(title=title, title_justify="left")
        for col in ("#", "pair", "source", "target", "contribution", "share of Δm", "used"):
            t.add_column(col, justify="right" if col in ("#", "pair", "contribution", "share of Δm", "used")
                         else "left")
        for r in rows:
            t.add_row(str(r["rank"]), str(r["index"]), str(r["pair"]["source"]), str(r["pair"]["target"]),
                      _fmt(r["contribution"]), _fmt(r.get("share_of_delta_m")), _fmt(r.get("times_used")))
        stdout.print(t)
