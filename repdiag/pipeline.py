"""``repdiag analyze``: load → transition matrix → bounds per policy → measured and simulated runs → report.

The stages call the rooms and hold no statistics of their own:

1. ``models.load_model``;
2. prompts (file, the bundled model's held-out inputs, or the built-in set) and their seeded split
   into trace and measurement prompts (``prompts.split_prompts``), never shared;
3. the trace-built chain of the model (``transition``; k = 2 with back-off, probe rows for the states
   the analysis reaches; spec §7.1) and its order-1 token matrix;
4. the bounds of the token matrix under every policy (``bounds.policy_bounds`` → ``theory``);
5. ``generate()`` under every mitigation on the measurement prompts (``measure``, metrics of §9);
6. the chain-simulation prediction of the same metrics under every per-step policy (``simulate``),
   the Spearman correlation across policies and the calibration error (§7.1), and the closed forms
   per family of policies (§7);
7. the greedy loop map and, for the bundled model, kernel attribution of its worst loop;
8. a :class:`repdiag.report.Report`, written as ``report.json`` (deterministic) with ``timings.json``.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .errors import UsageError

__all__ = ["AnalyzeOptions", "AnalysisResult", "run_analysis", "PREDICTED_METRICS", "spearman_block"]

#: the metrics predicted by the chain simulation and correlated with the measurement (issue 6 item 7).
PREDICTED_METRICS = ("rep_w16", "rep_r", "seq_rep_4")
#: closed-form quantities shown beside the prediction as explanations (spec §7), per family.
#: the analysis shows headline bounds only: the Monte Carlo block and the rigorous lower bounds (the
#: costly parts of theory.compute_quantities) are left to `repdiag bounds`.
ANALYZE_THEORY_OPTIONS = {"mc_trajectories": 2, "lower_bounds_K": 1}
CLOSED_FORM_KEYS = ("occupation_lsr_trunc", "su_R_avg", "rho_Q", "greedy_cycle_occupancy", "fu_arp")


class Stages:
    """Progress reporting for the stages: ``stage(name, total)`` → ``advance(n)``; no-op by default."""

    def start(self, name: str, total: int | None = None) -> None:  # pragma: no cover - trivial
        pass

    def advance(self, n: int = 1) -> None:  # pragma: no cover - trivial
        pass

    def note(self, text: str) -> None:  # pragma: no cover - trivial
        pass


@dataclass
class AnalyzeOptions:
    """Everything ``repdiag analyze`` takes; the defaults finish in about a minute on the bundled model."""

    model: str | None = "default"
    revision: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    trust_remote_code: bool = False
    prompts: Path | None = None
    trace_prompts: Path | None = None
    n_prompts: int | None = 48
    max_new_tokens: int = 48
    seed: int = 0
    mitigations: Sequence[str] | None = None
    order: int = 2
    top_k: int = 64
    max_probe_rows: int = 4096
    bound_states: int = 512
    n_trajectories: int = 256
    batch_size: int = 16
    attribute: bool = True
    out: Path = Path("repdiag-report")
    executor: str = "local"  # where the trace jobs, generate() batches and reached-row probes run: local or ray
    ray_address: str | None = None
    workers: int | None = None
    # resume from finished shards: the trace jobs, generate() batches and reached-row probes (one subfolder per job)
    shard_dir: Path | None = None

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "order", "top_k", "n_trajectories", "batch_size", "bound_states"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_probe_rows < 0:
            raise UsageError(f"--max-probe-rows must be at least 0, got {self.max_probe_rows}")


@dataclass
class AnalysisResult:
    """The report (a ``repdiag.report.Report``), wall-clock timings per stage, and the raw runs."""

    report: Any
    timings: dict[str, float]
    measurements: list = field(default_factory=list)


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - t0, 3)


def spearman_block(predicted: dict[str, dict[str, Any]], measured: dict[str, dict[str, Any]],
                   policies: Sequence[str], keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Spearman ρ (with its p-value and the number of policies) between predicted and measured, per key.

    Policies without both numbers are left out; fewer than 3 policies (or a constant side) gives
    ``rho = p = None``.
    """
    from scipy.stats import spearmanr

    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        pairs = [(predicted[p][key], measured[p][key]) for p in policies
                 if p in predicted and p in measured and predicted[p].get(key) is not None
                 and measured[p].get(key) is not None]
        rho = pval = None
        if len(pairs) >= 3:
            x, y = np.array(pairs, dtype=float).T
            if len(np.unique(x)) > 1 and len(np.unique(y)) > 1:  # ranks; inf (a divergent bound) ranks last
                result = spearmanr(x, y)
                rho, pval = float(result.statistic), float(result.pvalue)
        out[key] = {"rho": rho, "p": pval, "n_policies": len(pairs)}
    return out


def _calibration(predicted: dict, measured: dict, policies: Sequence[str], keys: Sequence[str]) -> dict[str, Any]:
    """Mean absolute error between predicted and measured levels, per key (spec §7.1 "Calibration")."""
    out: dict[str, Any] = {}
    for key in keys:
        errs = [abs(predicted[p][key] - measured[p][key]) for p in policies
                if predicted.get(p, {}).get(key) is not None and measured.get(p, {}).get(key) is not None]
        out[key] = float(np.mean(errs)) if errs else None
    return out


class RichStages(Stages):
    """Stages shown as a rich progress bar on stderr (transient; off with ``--quiet``).

    When stderr is not a terminal (CI logs, a redirected run) the bar cannot redraw: each stage is
    printed as one line with the seconds elapsed since the start instead.
    """

    def __init__(self, console: Any, disable: bool = False) -> None:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn)

        self.console = console
        self.disable = disable
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True,
                                 disable=disable)
        self.task: Any = None
        self.started = time.perf_counter()
        self.log_lines = not disable and not console.is_terminal

    def __enter__(self) -> "RichStages":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def start(self, name: str, total: int | None = None) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(name, total=total)
        if self.log_lines:
            self.console.print(f"[{time.perf_counter() - self.started:7.1f} s] {name}", highlight=False, markup=False)

    def advance(self, n: int = 1) -> None:
        if self.task is not None:
            self.progress.advance(self.task, n)

    def note(self, text: str) -> None:
        if not self.disable:
            self.console.print(text, highlight=False)


def _load_prompt_sets(options: AnalyzeOptions, lm: Any) -> tuple[Any, Any, dict[str, Any]]:
    """(trace prompts, measurement prompts, the report's ``prompts`` section)."""
    from .models import DEFAULT_MODEL_DIR
    from .prompts import builtin_prompts, default_model_prompts, load_prompts, split_prompts

    if options.prompts is not None:
        prompt_set = load_prompts(options.prompts)
    else:
        prompt_set = (default_model_prompts(DEFAULT_MODEL_DIR) if lm.model_id == "default" else None) \
            or builtin_prompts()
    prompt_set = prompt_set.take(options.n_prompts)
    if options.trace_prompts is not None:
        trace = load_prompts(options.trace_prompts)
        overlap = set(trace.prompts) & set(prompt_set.prompts)
        if overlap:
            raise UsageError(f"--trace-prompts shares {len(overlap)} prompt(s) with the measurement prompts: "
                             "trace and measurement prompts must be disjoint")
        section = {"source": prompt_set.source, "trace_source": trace.source, "split_rule": "--trace-prompts file",
                   "n_trace": len(trace), "n_measure": len(prompt_set), "trace_indices": [],
                   "measure_indices": list(range(len(prompt_set)))}
        return trace, prompt_set, section
    split = split_prompts(len(prompt_set), options.seed)
    section = {"source": prompt_set.source, **split.to_dict(), "fingerprint": prompt_set.fingerprint()}
    return prompt_set.subset(split.trace), prompt_set.subset(split.measure), section


def _simulate_all(chain: Any, policies: Sequence[Any], lm: Any, trace_prompts: Any, measure_prompts: Any,
                  options: AnalyzeOptions, stages: Stages, timings: dict[str, float],
                  executor: Any = None) -> tuple[dict, dict, Any, dict]:
    """Chain-simulation predictions (§7.1) of every per-step policy: (means, standard errors, reach, columns).

    The policies step in lockstep; the rows the trace never visited are probed at the step that first
    reads them (``simulate.simulate_reaching``, at most ``options.max_probe_rows``, conditioned on the
    first two trace prompts; on ``executor`` when one is given); the returned ``ReachOutcome`` holds
    the filled chain.
    """
    from . import metrics as metrics_mod
    from .measure import sentence_end_ids
    from .simulate import is_simulable, simulate_reaching
    from .transition import ProbePrompts, fill_rows

    first_scores = None
    if lm.kind == "seq2seq":  # each measurement input's own first step, then the chain
        from .transition import first_step_logits

        first_scores = first_step_logits(lm, measure_prompts.prompts, batch_size=options.batch_size)
        starts = [[lm.decoder_start_token_id]] * len(first_scores)
    else:
        starts = [lm.tokenizer(p, truncation=True, max_length=lm.max_source_tokens)["input_ids"] for p in measure_prompts.prompts]
    simulable = [p for p in policies if is_simulable(p)]
    extra_ids = np.array([lm.eos_token_id, lm.pad_token_id])
    if first_scores is not None:  # a large vocabulary's simulation keeps each input's likeliest first tokens
        k = min(options.top_k, first_scores.shape[1])
        extra_ids = np.union1d(extra_ids, np.argpartition(first_scores, -k, axis=1)[:, -k:])
    probe_prompts = ProbePrompts(lm, trace_prompts.prompts[:2])  # their prefixes run once for every fill

    def fill(current: Any, tokens: np.ndarray) -> Any:
        t0 = time.perf_counter()
        filled = fill_rows(current, lm, tokens, probe_prompts, batch_size=64, executor=executor)
        timings["probe_reached_rows"] = timings.get("probe_reached_rows", 0.0) + time.perf_counter() - t0
        return filled

    stages.start("simulating the chain under each policy", total=options.max_new_tokens)
    reach = simulate_reaching(chain, simulable, starts=starts, n_trajectories=options.n_trajectories,
                              max_new_tokens=options.max_new_tokens, eos_token_id=lm.eos_token_id,
                              pad_token_id=lm.pad_token_id, seed=options.seed, first_scores=first_scores,
                              extra_ids=extra_ids, fill=fill, max_probe_rows=options.max_probe_rows,
                              on_step=lambda _step, _probed: stages.advance())
    ends, dot = sentence_end_ids(lm.tokenizer)
    predicted, stderr = {}, {}
    for policy in simulable:
        result = reach.results[policy.name]
        scores = metrics_mod.compute_metrics(result.sequences, unit="token", terminated=result.terminated,
                                             sentence_end=ends, dot=dot, per_sequence=True)
        se = scores.pop("stderr")
        scores.pop("per_sequence")
        predicted[policy.name] = {k: scores.get(k) for k in (*PREDICTED_METRICS, "loop_fraction", "nonterminated",
                                                              "length")}
        predicted[policy.name]["n_trajectories"] = result.n_trajectories
        stderr[policy.name] = {k: se.get(k) for k in PREDICTED_METRICS}
    return predicted, stderr, reach, _vocabulary_section(reach.chain, None if reach.columns is None else len(reach.columns))


def _vocabulary_section(chain: Any, n_columns: int | None) -> dict[str, Any]:
    """How much of the vocabulary the simulation sampled from (``simulate.simulation_vocabulary``;
    ``n_columns`` None: all of it)."""
    full = n_columns is None
    section: dict[str, Any] = {"mode": "full" if full else "stored entries",
                               "columns": int(chain.vocab_size if full else n_columns),
                               "vocab_size": int(chain.vocab_size)}
    if not full:  # the residual mass the simulation leaves out, visit-weighted over the traced rows
        w = np.asarray(chain.visits, dtype=np.float64)
        section["residual_left_out_mean"] = float((w * chain.residual).sum() / w.sum()) if w.sum() else None
    return section


def _closed_form_block(bounds: dict, measured: dict, policies: Sequence[Any]) -> dict[str, Any]:
    """Spearman of each closed-form quantity against measured rep-w16, across all policies and per family."""
    names = [p.name for p in policies]
    families: dict[str, list[str]] = {}
    for p in policies:
        families.setdefault(p.family, []).append(p.name)
    out: dict[str, Any] = {}
    for key in CLOSED_FORM_KEYS:
        as_pred = {name: {"rep_w16": bounds.get(name, {}).get(key)} for name in names}
        block = {"all": spearman_block(as_pred, measured, names, ["rep_w16"])["rep_w16"]}
        for family, members in sorted(families.items()):
            block[family] = spearman_block(as_pred, measured, members, ["rep_w16"])["rep_w16"]
        out[key] = block
    return out


def _policy_bounds_summary(tm: Any, policies: Sequence[Any], horizon: int,
                           stages: Stages) -> tuple[dict, dict, dict, dict]:
    """Headline bounds of the token matrix per policy, the greedy layout, Q's spectra, and the routes."""
    from .bounds import HEADLINE_KEYS, policy_bounds

    bounds: dict[str, dict[str, Any]] = {}
    spectra: dict[str, list] = {}
    greedy_layout = None
    stages.start("bounds per policy", total=len(policies) + 1)
    raw = policy_bounds(tm, None, horizon=horizon, **ANALYZE_THEORY_OPTIONS)
    bounds["raw"] = _headline(raw, HEADLINE_KEYS)
    routes = {"raw": raw.get("route")}
    stages.advance()
    for policy in policies:
        layout = policy_bounds(tm, policy, horizon=horizon, **ANALYZE_THEORY_OPTIONS)
        bounds[policy.name] = _headline(layout, HEADLINE_KEYS)
        routes[policy.name] = layout.get("route")
        if layout.get("spectrum_Q") is not None:
            spectra[policy.name] = layout["spectrum_Q"]
        if not policy.do_sample and greedy_layout is None and policy.name == "greedy":
            greedy_layout = layout
        stages.advance()
    if greedy_layout is None:
        from .decoding import parse_policy

        greedy_layout = policy_bounds(tm, parse_policy("do_sample=false"), horizon=horizon, **ANALYZE_THEORY_OPTIONS)
    return bounds, greedy_layout, spectra, routes


def _headline(layout: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    q = layout["quantities"]
    out = {k: q.get(k) for k in keys}
    occ = q.get("occupation", {})
    out["occupation_lsr"] = occ.get("lsr")
    out["occupation_lsr_trunc"] = occ.get("lsr_trunc")
    out["greedy_cycle_occupancy"] = occ.get("greedy_cycle_occupancy")
    out["greedy_loop_fraction"] = q.get("greedy", {}).get("loop_fraction")
    for key in ("mean_p_eos", "su_R_ngram_cap"):
        if key in q:
            out[key] = q[key]
    if "row_collision_full" in q:
        out["row_collision_full_mean"] = float(np.mean(q["row_collision_full"]))
    return out


def token_text(tokenizer: Any, token_id: int) -> str:
    """A token's text with its leading space kept (SentencePiece ``▁``, byte-level ``Ġ``/``Ċ``)."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if piece is None:
        return f"<{token_id}>"
    if piece.startswith(("▁", "Ġ", "Ċ")) or piece in ("<0x0A>",):
        return piece.replace("▁", " ").replace("Ġ", " ").replace("Ċ", "\n").replace("<0x0A>", "\n")
    return tokenizer.decode([token_id]) if not piece.startswith("<") else piece


def _loop_map(greedy_layout: dict[str, Any], tm: Any, lm: Any, max_cycles: int = 12) -> dict[str, Any]:
    """The greedy loop map of the token matrix: cycles as text, basin sizes, loop fraction (spec §5)."""
    g = greedy_layout["quantities"]["greedy"]
    labels = [token_text(lm.tokenizer, int(t)) for t in tm.state_tokens[:, -1]]
    cycles = []
    order = np.argsort([-b for b in g["basin_sizes"]], kind="stable")
    for c in order[:max_cycles]:
        states = g["cycles"][c]
        cycles.append({"states": [int(s) for s in states], "tokens": [labels[s] for s in states],
                       "text": "".join(labels[s] for s in states), "length": len(states),
                       "basin_size": int(g["basin_sizes"][c])})
    return {"cycles": cycles, "n_cycles": len(g["cycles"]), "loop_fraction": g["loop_fraction"],
            "terminate_fraction": g["terminate_fraction"], "max_indegree_token": labels[g["max_indegree_token"]]
            if g.get("max_indegree_token") is not None and 0 <= g["max_indegree_token"] < len(labels) else None,
            "n_states": len(g["next"])}


def token_matrix(tm: Any, max_states: int = 2048) -> tuple[Any, dict[str, Any]]:
    """The order-1 token matrix of the chain over the tokens that have a row, for the bounds.

    States: the tokens whose 1-gram row was traced or probed (the ``max_states - 1`` most visited,
    then probed ones), plus ``<eos>`` last (spec layout). Each row is the token's 1-gram row in token
    space; the mass it sends to tokens outside the state set (``mass_outside``, reported) is
    renormalised away, i.e. the chain is conditioned on staying among the analysed tokens.
    """
    from .transition import ROW_PROBE, ROW_TRACE, TransitionMatrix

    V, eos_tok = tm.vocab_size, tm.eos_token_id
    source = tm.row_source[:V] if tm.row_source is not None else np.full(V, ROW_TRACE)
    visits = tm.visits[:V] if tm.visits is not None else np.zeros(V, dtype=np.int64)
    have = np.flatnonzero(((source == ROW_TRACE) | (source == ROW_PROBE)) & (np.arange(V) != eos_tok))
    ranked = have[np.lexsort((have, (source[have] != ROW_TRACE).astype(np.int64), -visits[have]))]
    tokens = np.sort(ranked[: max_states - 1])
    m = len(tokens)
    A = np.zeros((m + 1, m + 1))
    outside = np.zeros(m)
    for lo in range(0, m, 256):
        chunk = tokens[lo:lo + 256]
        rows = tm.next_distribution(chunk[:, None])
        A[lo:lo + len(chunk), :m] = rows[:, tokens]
        A[lo:lo + len(chunk), m] = rows[:, eos_tok]
        outside[lo:lo + len(chunk)] = 1.0 - A[lo:lo + len(chunk)].sum(axis=1)
    A[:m] /= A[:m].sum(axis=1, keepdims=True)
    A[m, m] = 1.0
    state_tokens = np.concatenate([tokens, [eos_tok]])[:, None].astype(np.int64)
    meta = {**tm.meta, "builder": f"{tm.meta.get('builder', 'trace')}:token-matrix", "order": 1}
    shift = None
    if tm.row_logit_shift is not None:
        shift = np.concatenate([tm.row_logit_shift[tokens], [0.0]])
        shift = np.where(np.isfinite(shift), shift, 0.0)
    token_tm = TransitionMatrix(A, np.zeros(m + 1), m, state_tokens, meta, row_logit_shift=shift)
    info = {"n_states": m + 1, "mass_outside_mean": float(outside.mean()) if m else 0.0,
            "mass_outside_max": float(outside.max()) if m else 0.0}
    return token_tm, info


def _build_chain(lm: Any, trace_prompts: Any, options: AnalyzeOptions, stages: Stages,
                 executor: Any = None) -> tuple[Any, Any, dict]:
    """The trace-built k-gram chain (§7.1), its order-1 token matrix, and the report's ``matrix`` section."""
    from .transition import build_trace

    stages.start("tracing the model on the trace prompts", total=None)
    chain = build_trace(lm, list(trace_prompts.prompts), order=options.order, top_k=options.top_k,
                        modes=("greedy", "sample"), max_new_tokens=options.max_new_tokens, seed=options.seed,
                        batch_size=options.batch_size, probe_fallback=False, executor=executor)
    tm, token_info = token_matrix(chain, max_states=options.bound_states)
    described = chain.describe()
    section = {"builder": "trace", "order": chain.order, "top_k": options.top_k, "n_states": chain.n_states,
               "storage": described["storage"], "nnz": described["nnz"], "rows": described.get("rows", {}),
               "coverage": chain.coverage(), "delta2_hat": chain.meta.get("delta2_hat"),
               "token_matrix": token_info, "trace_modes": ["greedy", "sample"],
               "tokenizer_fingerprint": lm.tokenizer_fingerprint}
    return chain, tm, section


def run_analysis(options: AnalyzeOptions, stages: Stages | None = None) -> AnalysisResult:
    """Run the whole analysis and return the report; nothing is written here (see :func:`write_outputs`).

    With ``options.executor == "ray"`` the trace's decoding jobs, the measurement's ``generate()``
    batches and the probe of the rows the simulation reaches run on Ray actors (same batches and
    seeds, merged by job / batch index / token range: the same report); the bounds and the
    simulation run here.
    """
    from .mitigations import resolve_mitigations

    stages = stages or Stages()
    timings: dict[str, float] = {}
    policies = resolve_mitigations(options.mitigations)
    measurable = [p for p in policies if p.measurable]
    executor = _executor_for(options)
    try:
        return _run_analysis(options, stages, timings, policies, measurable, executor)
    finally:
        if executor is not None:
            executor.close()


def _executor_for(options: AnalyzeOptions) -> Any:
    """None (this process), a local executor with a shard folder (``--shard-dir``), or the Ray executor of
    ``--executor ray``; raises MissingExtraError without Ray.

    With ``--shard-dir DIR`` each job (the trace, each policy's measurement, each round of reached-row
    probes) keeps its finished shards in its own subfolder of DIR (``trace``, ``measure-<policy>``,
    ``probe-<fingerprint>``), so a rerun loads them instead of recomputing."""
    from .executors import get_executor

    if (options.executor or "local").lower() == "local":
        if options.ray_address is not None or options.workers is not None:
            raise UsageError("--ray-address and --workers need --executor ray")
        if options.shard_dir is None:
            return None
        return get_executor("local", shard_dir=options.shard_dir, job_folders=True)
    return get_executor(options.executor, options.ray_address, options.workers,
                        shard_dir=options.shard_dir, job_folders=options.shard_dir is not None,
                        trust_remote_code=options.trust_remote_code)


def _run_analysis(options: AnalyzeOptions, stages: Stages, timings: dict[str, float], policies: list,
                  measurable: list, executor: Any) -> AnalysisResult:
    from . import __version__
    from .measure import measure_policies
    from .models import load_model
    from .report import EnvironmentInfo, Report

    with _timed(timings, "load_model"):
        stages.start("loading the model")
        lm = load_model(options.model, revision=options.revision, device=options.device, dtype=options.dtype,
                        trust_remote_code=options.trust_remote_code)
    trace_prompts, measure_prompts, prompts_section = _load_prompt_sets(options, lm)
    with _timed(timings, "transition_matrix"):
        chain, tm, matrix_section = _build_chain(lm, trace_prompts, options, stages, executor)
    with _timed(timings, "bounds"):
        bounds, greedy_layout, spectra, routes = _policy_bounds_summary(tm, policies, options.max_new_tokens, stages)
    matrix_section["bounds_route"] = routes
    with _timed(timings, "measure"):
        stages.start("generating under each mitigation", total=len(measurable) * len(measure_prompts))
        runs = measure_policies(lm, measurable, measure_prompts.prompts, measure_prompts.references,
                                max_new_tokens=options.max_new_tokens, seed=options.seed,
                                batch_size=options.batch_size, monitor_factory=_monitor_factory(),
                                on_batch=stages.advance, executor=executor)
    measured = {r.policy: r.report_metrics() for r in runs}
    measured_se = {r.policy: {k: r.stderr.get(k) for k in PREDICTED_METRICS} for r in runs}
    with _timed(timings, "simulate"):
        predicted, predicted_se, reach, sim_columns = _simulate_all(chain, measurable, lm, trace_prompts, measure_prompts,
                                                                    options, stages, timings, executor)
    coverage = reach.chain.coverage()
    matrix_section.update(coverage=coverage, coverage_rows=coverage.get("rows_visited"),
                          coverage_mass=coverage.get("mass_visited"))
    matrix_section["reached_rows"] = {"probed": reach.probed, "fills": reach.fills,
                                      "max_probe_rows": options.max_probe_rows,
                                      "missing_step_share": reach.missing_steps}
    names = [p.name for p in measurable]
    both = [n for n in names if n in predicted]
    prediction = {
        "predictor": "simulation",
        "order": options.order,
        "simulation_vocabulary": sim_columns,
        "n_trajectories": options.n_trajectories,
        "policies": both,
        "spearman": spearman_block(predicted, measured, both, PREDICTED_METRICS),
        "calibration_error": _calibration(predicted, measured, both, PREDICTED_METRICS),
        "closed_form": _closed_form_block(bounds, measured, measurable),
        "not_simulated": [n for n in names if n not in predicted],
    }
    attribution = None
    if options.attribute and lm.model_id == "default":
        with _timed(timings, "attribution"):
            attribution = _attribute_worst_loop(lm, runs, measure_prompts, stages)
    report_dict = {
        "schema_version": "1.0",
        "tool": {"name": "repdiag", "version": __version__},
        "model": lm.describe(),
        "environment": EnvironmentInfo.current().to_dict(),
        "settings": {"seed": options.seed, "max_new_tokens": options.max_new_tokens,
                     "n_prompts": len(trace_prompts) + len(measure_prompts), "mitigations": names,
                     "order": options.order, "top_k": options.top_k, "max_probe_rows": options.max_probe_rows,
                     "n_trajectories": options.n_trajectories, "batch_size": options.batch_size},
        "prompts": prompts_section,
        "matrix": matrix_section,
        "bounds": bounds,
        "spectrum": spectra,
        "measured": measured,
        "predicted": predicted,
        "stderr": {"measured": measured_se, "predicted": predicted_se},
        "quality": {r.policy: r.quality for r in runs},
        "prediction": prediction,
        "loop_map": _loop_map(greedy_layout, tm, lm),
        "attribution": attribution,
        "examples": [{"policy": r.policy, "prompt": measure_prompts.prompts[i], "output": r.texts[i]}
                     for r in runs for i in range(min(2, len(r.texts)))],
    }
    report = Report.from_dict(report_dict)
    return AnalysisResult(report=report, timings=timings, measurements=runs)


def _monitor_factory() -> Callable[[], Any] | None:
    """Fresh ``RepetitionMonitor`` per generate() batch: measure's loop onsets come from the hook."""
    from .hook import RepetitionMonitor

    return RepetitionMonitor


def _worst_loop(runs: Sequence[Any]) -> tuple[str, int, dict] | None:
    """The longest-running loop among the greedy outputs (else any policy): (policy, prompt index, event)."""
    ordered = sorted(runs, key=lambda r: r.policy != "greedy")
    for run in ordered:
        best = None
        for i, event in enumerate(run.loop_events):
            if event and (best is None or event["length"] > best[1]["length"]):
                best = (i, event)
        if best is not None:
            return run.policy, best[0], best[1]
    return None


def _attribute_worst_loop(lm: Any, runs: Sequence[Any], measure_prompts: Any, stages: Stages) -> dict | None:
    """Kernel attribution (checkpoint mode, TracInCP) of the bundled model's worst loop to its training pairs.

    The training pairs are what the model read in training: ``default_model_input(name, source)`` and the
    target, in ``train.jsonl.gz`` order (the record checks their hashes). The record's precomputed feature
    cache (``record/features``, its projector and parameter subset in ``settings.json``) makes a query cost
    only the query's own gradients at each checkpoint. Returns ``result.to_dict(10)`` plus ``policy`` (and
    each pair's ``id``); ``None`` when no output loops, there is no record, or the record does not fit.
    """
    import sys

    from .attribution import attribute_loop
    from .attribution.api import cache_settings
    from .errors import RecordError
    from .models import DEFAULT_MODEL_DIR
    from .prompts import default_model_train_pairs

    record = DEFAULT_MODEL_DIR / "record"
    found = _worst_loop(runs)
    if found is None or not (record / "record.json").is_file():
        return None
    policy, index, event = found
    run = next(r for r in runs if r.policy == policy)
    stages.start("attributing the worst loop to training pairs", total=None)
    pairs, pair_ids = default_model_train_pairs(DEFAULT_MODEL_DIR)
    kwargs = cache_settings(record)  # the shipped cache: same projector and parameters, or it is not hit
    try:
        result = attribute_loop(lm, pairs, record, measure_prompts.prompts[index], list(run.sequences[index]),
                                mode="checkpoints", top=10, backend="loop", **kwargs)
    except RecordError as exc:
        sys.stderr.write(f"repdiag: attribution skipped: {exc}\n")
        return None
    section = result.to_dict(10)
    for entry in [*section.get("top", []), *section.get("opponents", [])]:
        i = entry.get("index")
        if isinstance(i, int) and 0 <= i < len(pair_ids) and isinstance(entry.get("pair"), dict):
            entry["pair"]["id"] = pair_ids[i]
    section["policy"] = policy
    section["prompt_index"] = index
    return section


def write_outputs(result: AnalysisResult, out: Path) -> dict[str, Path]:
    """Write ``report.json`` (deterministic), ``timings.json`` and ``report.md`` into ``out``, atomically."""
    from ._atomic import write_json, write_text
    from .report import render_markdown, save_report

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file: pass a folder for the report")
    out.mkdir(parents=True, exist_ok=True)
    report_path = save_report(result.report, out / "report.json")
    write_json(out / "timings.json", {"seconds": result.timings,
                                      "total_seconds": round(sum(result.timings.values()), 3)})
    write_text(out / "report.md", render_markdown(result.report))
    return {"report": report_path, "timings": out / "timings.json", "markdown": out / "report.md"}


def _cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return "inf" if value == float("inf") else f"{value:.{digits}f}"
    return str(value)


def render_summary(result: AnalysisResult) -> Any:
    """The rich table ``repdiag analyze`` prints: per policy, measured and predicted repetition, bounds."""
    from rich.console import Group
    from rich.table import Table

    d = result.report.to_dict()
    measured, predicted, bounds = d["measured"], d["predicted"], d["bounds"]
    se = d.get("stderr", {}).get("measured", {})
    table = Table(title=f"repdiag analyze — {d['model']['id']} ({d['model']['architecture']})")
    for col in ("policy", "rep-w16", "seq-rep-4", "no-eos", "pred rep-w16", "pred seq-rep-4", "R/n", "ρ(Q)"):
        table.add_column(col, justify="left" if col == "policy" else "right", no_wrap=col == "policy")
    for policy in d["settings"]["mitigations"]:
        m, p, b = measured.get(policy, {}), predicted.get(policy, {}), bounds.get(policy, {})
        rep_w = _cell(m.get("rep_w16"), 2)
        if se.get(policy, {}).get("rep_w16") is not None:
            rep_w += f"±{se[policy]['rep_w16']:.2f}"
        table.add_row(policy, rep_w, _cell(m.get("seq_rep_4"), 2), _cell(m.get("nonterminated"), 2),
                      _cell(p.get("rep_w16"), 2), _cell(p.get("seq_rep_4"), 2), _cell(b.get("su_R_avg"), 2),
                      _cell(b.get("rho_Q"), 2))
    pred = d["prediction"]
    corr = Table(title="predicted (chain simulation, §7.1) against measured, across policies")
    for col in ("metric", "Spearman ρ", "p", "policies", "mean |pred − meas|"):
        corr.add_column(col, justify="right")
    for key, block in pred["spearman"].items():
        corr.add_row(key, _cell(block["rho"]), _cell(block["p"]), str(block["n_policies"]),
                     _cell(pred["calibration_error"].get(key)))
    parts: list[Any] = [table, corr]
    loops = d.get("loop_map", {}).get("cycles", [])[:5]
    if loops:
        lt = Table(title="greedy loop map of the token matrix (largest basins)")
        for col in ("cycle", "length", "basin"):
            lt.add_column(col)
        for c in loops:
            lt.add_row(repr(c["text"])[:60], str(c["length"]), str(c["basin_size"]))
        parts.append(lt)
    att = d.get("attribution")
    if att:
        at = Table(title=f"training pairs that pushed the worst loop ({att.get('mode')})")
        at.add_column("contribution", justify="right")
        at.add_column("training pair")
        for entry in att.get("top", [])[:5]:
            pair = entry.get("pair", {})
            at.add_row(_cell(entry.get("contribution"), 4), repr(str(pair.get("target", pair)))[:70])
        parts.append(at)
    return Group(*parts)
