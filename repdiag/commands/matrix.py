"""``repdiag matrix build`` and ``repdiag matrix show``: build a transition matrix and look at it."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ._common import OutputFormat, existing_file, print_json, progress_bar, stderr, stdout


class Mode(str, enum.Enum):
    probe = "probe"
    trace = "trace"


def register(app: typer.Typer) -> None:
    sub = typer.Typer(
        name="matrix",
        no_args_is_help=True,
        help="Build a model's token-transition matrix (probe or trace, k-gram states) and inspect it.",
    )

    @sub.command("build")
    def build(
        model: Annotated[str, typer.Argument(help="Hub id, local folder, .gguf file or 'default'.")],
        output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the matrix (.npz).")],
        mode: Annotated[Mode, typer.Option("--mode", help="probe: one row per token; trace: decode and average.")] = Mode.trace,
        order: Annotated[Optional[int], typer.Option("--order", min=1, help="k of the k-gram states (trace; probe is 1). Default: 2 for trace.")] = None,
        top_k: Annotated[int, typer.Option("--top-k", min=0, help="Entries kept per row; 0 = complete rows for vocabularies ≤ 1024, else 64.")] = 0,
        prompts: Annotated[Optional[Path], typer.Option("--prompts", help="Prompts file (one per line, or .jsonl). Default: the built-in set.")] = None,
        max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="Trace: tokens decoded per prompt and mode.")] = 64,
        seed: Annotated[int, typer.Option("--seed", help="Trace: seed of the temperature-1 sampling run.")] = 0,
        trace_modes: Annotated[str, typer.Option("--trace-modes", help="Trace: comma list of greedy,sample.")] = "greedy,sample",
        max_probe_rows: Annotated[int, typer.Option("--max-probe-rows", min=0, help="Trace: unvisited rows filled by the probe, at most.")] = 4096,
        batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Probe rows per decoder step; trace: prompts per generate() batch (one job each).")] = 64,
        revision: Annotated[Optional[str], typer.Option("--revision", help="Hub revision.")] = None,
        device: Annotated[str, typer.Option("--device", help="cpu, cuda, mps or auto.")] = "cpu",
        dtype: Annotated[str, typer.Option("--dtype", help="float32, float64, float16, bfloat16 or auto.")] = "float32",
        trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Run code shipped with a hub model.")] = False,
        executor: Annotated[str, typer.Option("--executor", help="local (this process) or ray (actors that each hold the model: probe rows, or trace jobs; same bytes). Needs repdiag\\[ray].")] = "local",
        ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="Ray cluster to join (e.g. auto, ray://host:10001); default: start a local Ray.")] = None,
        workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="Ray actors (default: the cluster's CPUs).")] = None,
        shard_dir: Annotated[Optional[Path], typer.Option("--shard-dir", help="Probe: write each finished shard here; a rerun with the same folder loads them instead of recomputing (same bytes). Refused (exit 2) when the folder holds another job's shards.")] = None,
    ) -> None:
        """Build the transition matrix of MODEL and write it as .npz."""
        from ..errors import UsageError
        from ..models import load_model
        from ..transition import build_probe, build_trace, read_prompts

        prompt_list = read_prompts(existing_file(prompts, "prompts file")) if prompts is not None else None
        if mode is Mode.probe and order not in (None, 1):
            raise UsageError("--mode probe builds order-1 rows: use --mode trace for --order ≥ 2")
        modes = [m.strip() for m in trace_modes.split(",") if m.strip()]
        ex = _make_executor(executor, ray_address, workers, mode, trust_remote_code, shard_dir)
        try:
            lm = load_model(model, revision=revision, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
            with progress_bar() as bar:
                task = bar.add_task(f"{mode.value} rows", total=None)

                def tick(n: int, total: int) -> None:
                    bar.update(task, advance=n, total=total)

                if mode is Mode.probe:
                    tm = build_probe(lm, prompt_list, top_k=top_k or None, batch_size=batch_size, progress=tick,
                                     executor=ex)
                else:
                    tm = build_trace(lm, prompt_list, order=order or 2, top_k=top_k or None, modes=modes,
                                     max_new_tokens=max_new_tokens, seed=seed, max_probe_rows=max_probe_rows,
                                     batch_size=batch_size, progress=tick, executor=ex)
        finally:
            if ex is not None:
                ex.close()
        tm.save(output)
        cov = tm.meta.get("coverage", {})
        stderr.print(
            f"wrote {output}: {tm.n_states} states, order {tm.order}, nnz {tm.nnz}, "
            f"residual mass {float(tm.residual.sum()):.4g}"
            + (f", rows visited {cov.get('rows_visited', 0):.1%}, mass on visited {cov.get('mass_visited', 0):.1%}"
               if mode is Mode.trace else ""),
            highlight=False,
        )

    @sub.command("show")
    def show(
        path: Annotated[Path, typer.Argument(help="A repdiag .npz matrix or a dense .npy (eos last).")],
        top: Annotated[int, typer.Option("--top", min=0, help="How many top transitions to list.")] = 20,
        model: Annotated[Optional[str], typer.Option("--model", help="Tokenizer for token strings (default: the matrix's model when it is a local folder).")] = None,
        eos_index: Annotated[Optional[int], typer.Option("--eos-index", help="State index of <eos> in a dense .npy (default: last).")] = None,
        output_format: Annotated[OutputFormat, typer.Option("--format", help="table or json.")] = OutputFormat.table,
    ) -> None:
        """Shape, nnz, residual mass, coverage and the top transitions (as token strings)."""
        from ..transition import load_matrix

        tm = load_matrix(path, eos_index=eos_index)
        tokenizer = _tokenizer_for(model or tm.meta.get("model_id"), explicit=model is not None)
        info = tm.describe()
        info["top_transitions"] = _top_transitions(tm, top, tokenizer)
        if output_format is OutputFormat.json:
            print_json(info)
            return
        from rich.table import Table

        meta = tm.meta
        stdout.print(f"[bold]{path}[/]  builder {meta.get('builder')}  model {meta.get('model_id')}  policy {meta.get('policy')}")
        stdout.print(
            f"shape {tm.n_states}×{tm.n_states}  order {tm.order}  storage {info['storage']}  nnz {info['nnz']}  "
            f"eos state {tm.eos_index} (token {tm.eos_token_id})",
            highlight=False,
        )
        res = info["residual"]
        stdout.print(f"residual mass: total {res['total']:.6g}  mean {res['mean']:.3g}  max {res['max']:.3g}", highlight=False)
        if "rows" in info:
            stdout.print("rows: " + "  ".join(f"{k} {v}" for k, v in info["rows"].items()), highlight=False)
        cov = meta.get("coverage")
        if cov:
            stdout.print("coverage: " + "  ".join(f"{k} {_fmt(v)}" for k, v in sorted(cov.items())), highlight=False)
        if meta.get("delta2_hat") is not None:
            stdout.print(f"δ̂² (Theorem 2): {meta['delta2_hat']:.4g}  (state rows: {_fmt(meta.get('delta2_hat_state'))})", highlight=False)
        table = Table(title=f"top {top} transitions", show_lines=False)
        for col in ("from", "to", "p", "from id", "to id"):
            table.add_column(col, justify="right" if col in ("p", "from id", "to id") else "left")
        for row in info["top_transitions"]:
            table.add_row(row["from"], row["to"], f"{row['p']:.4f}", str(row["from_state"]), str(row["to_state"]))
        stdout.print(table)

    app.add_typer(sub, name="matrix")


def _make_executor(name: str, address: Optional[str], workers: Optional[int], mode: Mode, trust_remote_code: bool,
                   shard_dir: Optional[Path] = None) -> Any:
    """None for the plain local path; a LocalExecutor with a shard folder for ``--shard-dir`` (probe mode);
    a RayExecutor for ``--executor ray`` (probe rows, or the trace's decoding jobs and probe fallback)."""
    from ..errors import UsageError
    from ..executors import EXECUTORS, get_executor

    name = name.lower()
    if name not in EXECUTORS:
        raise UsageError(f"unknown --executor {name!r}: use local or ray")
    if name == "local" and (address is not None or workers is not None):
        raise UsageError("--ray-address and --workers need --executor ray")
    if mode is not Mode.probe and shard_dir is not None:
        raise UsageError("--shard-dir keeps probe shards: use --mode probe (a trace job is not resumable)")
    if name == "local" and shard_dir is None:
        return None
    return get_executor(name, address, workers, shard_dir=shard_dir,
                        **({"trust_remote_code": trust_remote_code} if name == "ray" else {}))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _tokenizer_for(model: str | None, *, explicit: bool) -> Any:
    """A tokenizer for token strings: only from a local folder unless the user named the model."""
    if not model:
        return None
    if not explicit and not Path(model).is_dir():
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model, local_files_only=not explicit)
    except Exception:  # noqa: BLE001 - token strings are a nicety; ids are shown instead
        if explicit:
            from ..errors import ModelLoadError

            raise ModelLoadError(f"cannot load the tokenizer of {model!r} for token strings: drop --model to show ids")
        return None


def _top_transitions(tm: Any, top: int, tokenizer: Any) -> list[dict[str, Any]]:
    """The ``top`` largest stored entries outside the <eos> row (ties: lower row, then lower column)."""
    import numpy as np

    if top <= 0:
        return []
    C = tm.csr()
    rows = np.repeat(np.arange(tm.n_states), np.diff(C.indptr))
    cols = C.indices
    vals = C.data
    keep = rows != tm.eos_index
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    order = np.lexsort((cols, rows, -vals))[:top]
    out = []
    for i in order:
        s, t = int(rows[i]), int(cols[i])
        out.append({
            "from_state": s,
            "to_state": t,
            "from": tm.state_label(s, tokenizer),
            "to": tm.state_label(t, tokenizer) if tokenizer is None else str(tokenizer.convert_ids_to_tokens(int(tm.state_tokens[t, -1]))),
            "p": float(vals[i]),
        })
    return out
