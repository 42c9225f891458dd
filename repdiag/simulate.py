"""The chain-simulation predictor (repetition-theory.md §7.1): repdiag's primary prediction.

The trace-built k-gram chain of the model (``transition.TransitionMatrix``, k = 2 with back-off by
default) is stepped for ``max_new_tokens`` steps from the prompts' start states, for many
trajectories at once. At every step the policy's **own** Hugging Face logits processors and warpers
(the very objects ``generate()`` builds, from ``decoding.Policy.logits_processors``) act on the
simulated history, so history-dependent policies (repetition penalty, no-repeat-n-gram) behave as
they would on real output. The simulated sequences are then scored with the **same** metric as the
real ones (``repdiag.metrics``). The prediction of a metric is its mean over trajectories, with a
standard error (keys ``sim.<metric>``, ``sim.n_trajectories``, ``sim.order``).

The simulation never calls the model: it only reads the chain.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .decoding import Policy

__all__ = ["Chain", "SimulationResult", "simulate_chain", "simulate_policy", "is_simulable",
           "ReachOutcome", "simulate_reaching",
           "compact_id", "simulation_vocabulary", "FULL_VOCABULARY_MAX"]


class Chain(Protocol):
    """What the simulator needs of a chain: its order and the next-token log-probabilities of contexts.

    A chain may also offer ``next_logits(contexts)`` (log-probabilities plus each row's logit shift,
    as ``TransitionMatrix`` does); the simulator then prefers it.
    """

    order: int

    def next_logprobs(self, contexts: np.ndarray) -> np.ndarray:
        """``contexts``: int array (B, order) of the last tokens, left-padded with -1.

        Returns float (B, vocab) log-probabilities over token ids (``-inf`` where impossible).
        """


@dataclass(frozen=True)
class SimulationResult:
    """Simulated generations: the generated token ids of each trajectory (``<eos>`` excluded)."""

    sequences: tuple[tuple[int, ...], ...]
    terminated: tuple[bool, ...]
    order: int
    seed: int

    @property
    def n_trajectories(self) -> int:
        return len(self.sequences)


def is_simulable(policy: "Policy") -> bool:
    """Per-step policies only: beam search is global and contrastive search needs hidden states."""
    return int(policy.effective()["num_beams"] or 1) == 1 and not policy.is_contrastive and policy.measurable


#: above this many tokens the simulation runs on the chain's stored entries (:func:`simulation_vocabulary`)
FULL_VOCABULARY_MAX = 16_384


def simulation_vocabulary(chain: Any, starts: Sequence[Sequence[int]], extra_ids: Sequence[int] | np.ndarray,
                          ) -> np.ndarray | None:
    """The simulation's columns: ``None`` (every token) up to :data:`FULL_VOCABULARY_MAX` tokens.

    Above it, the sorted union of the chain's stored entries (``chain.support()``), the start tokens
    and ``extra_ids`` (``<eos>``, padding, an encoder-decoder's likeliest first tokens): the rows'
    residual mass, spread over hundreds of thousands of tokens, is left out (see
    ``TransitionMatrix.next_distribution``'s ``columns``).
    """
    if chain.vocab_size <= FULL_VOCABULARY_MAX:
        return None
    start_ids = np.fromiter((t for s in starts for t in s), dtype=np.int64)
    return np.union1d(np.union1d(chain.support(), start_ids), np.asarray(extra_ids, dtype=np.int64).ravel())


def compact_ids(vocabulary: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Positions of ``tokens`` in the sorted ``vocabulary`` (ValueError naming the first one not there)."""
    pos = np.minimum(np.searchsorted(vocabulary, tokens), len(vocabulary) - 1)
    absent = vocabulary[pos] != tokens
    if absent.any():
        raise ValueError(f"token {int(np.asarray(tokens)[absent].flat[0])} is not in the simulation vocabulary")
    return pos


def compact_id(vocabulary: np.ndarray, token: int) -> int:
    """The position of ``token`` in the sorted ``vocabulary`` (ValueError when it is not there)."""
    return int(compact_ids(vocabulary, np.array([token]))[0])


class _Walk:
    """The trajectories of one simulated run between two steps: the loop state of :func:`simulate_chain`.

    Histories are kept in real token ids; each :meth:`advance` maps them to the columns of the
    vocabulary it is given, so the vocabulary may grow between steps (``simulate_reaching`` adds the
    columns of the rows it probes). Growing it changes no draw: a column that no row read so far
    stores has score ``-inf`` under every processor, and the inverse-CDF draw and the greedy argmax
    ignore such columns. The processors are built per ``<eos>`` column by ``processors_for``.
    """

    def __init__(self, order: int, processors_for: Callable[[int], Any], *, do_sample: bool,
                 starts: Sequence[Sequence[int]], max_new_tokens: int, eos_token_id: int, pad_token_id: int,
                 seed: int, first_scores: np.ndarray | None):
        import torch

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not starts:
            raise ValueError("starts must hold at least one trajectory start")
        self.order, self.do_sample, self.max_new_tokens = order, do_sample, max_new_tokens
        self.eos, self.pad = eos_token_id, pad_token_id
        self.first_scores = first_scores
        self.seed = seed
        self._processors_for = processors_for
        self._processors: dict[int, Any] = {}
        batch = len(starts)
        self.width = max(len(s) for s in starts)
        # what generate() passes the processors (left-padded with the padding token) and the chain's
        # context (the real tokens only, left-padded with -1); a finished row's context stays <eos>
        self.history = np.full((batch, self.width + max_new_tokens), pad_token_id, dtype=np.int64)
        self.context = np.full((batch, self.width + max_new_tokens), -1, dtype=np.int64)
        for row, start in enumerate(starts):
            if len(start):
                self.history[row, self.width - len(start):self.width] = start
                self.context[row, self.width - len(start):self.width] = start
        self.generator = torch.Generator().manual_seed(seed)
        self.finished = np.zeros(batch, dtype=bool)
        self.generated = np.full((batch, max_new_tokens), -1, dtype=np.int64)
        self.step = 0

    @property
    def done(self) -> bool:
        return self.step >= self.max_new_tokens or bool(self.finished.all())

    @property
    def reads_chain(self) -> bool:
        """False at a first step that ``first_scores`` replaces."""
        return not (self.step == 0 and self.first_scores is not None)

    def contexts(self) -> np.ndarray:
        """``(batch, order)``: the last ``order`` tokens of each history (left-padded with -1)."""
        end = self.width + self.step
        ctx = self.context[:, max(0, end - self.order):end]
        if ctx.shape[1] < self.order:
            ctx = np.concatenate([np.full((len(ctx), self.order - ctx.shape[1]), -1, np.int64), ctx], axis=1)
        return ctx

    def advance(self, chain_scores: np.ndarray | None, vocabulary: np.ndarray | None) -> None:
        """One step from the chain's ``(batch, columns)`` scores (``None`` where ``first_scores`` replaces them)."""
        import torch

        end = self.width + self.step
        if chain_scores is None:
            first = np.asarray(self.first_scores)
            if vocabulary is not None:
                first = first[..., vocabulary]
            chain_scores = np.broadcast_to(first, (len(self.history), first.shape[-1]))
        history = self.history[:, :end]
        eos_c = self.eos
        if vocabulary is not None:
            history = compact_ids(vocabulary, history)
            eos_c = compact_id(vocabulary, self.eos)
        if eos_c not in self._processors:
            self._processors[eos_c] = self._processors_for(eos_c)
        scores = torch.from_numpy(np.array(chain_scores, dtype=np.float32))
        scores = self._processors[eos_c](torch.from_numpy(history), scores)
        if self.do_sample:  # inverse CDF, one uniform per row: columns of probability 0 do not change the draw
            cdf = torch.cumsum(torch.softmax(scores, dim=-1).double(), dim=-1)
            u = torch.rand((len(cdf), 1), generator=self.generator, dtype=torch.float64)
            picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1).clamp_max(cdf.shape[1] - 1)
        else:
            picked = torch.argmax(scores, dim=-1)
        tokens = picked.numpy() if vocabulary is None else vocabulary[picked.numpy()]
        tokens = np.where(self.finished, self.pad, tokens)  # a finished trajectory emits padding
        alive = ~self.finished
        self.history[:, end] = tokens
        self.generated[alive, self.step] = tokens[alive]
        self.context[:, end] = np.where(alive, tokens, self.eos)
        self.finished |= tokens == self.eos
        self.step += 1

    def result(self) -> SimulationResult:
        sequences, terminated = [], []
        for row in self.generated[:, :self.step]:
            seq = row[row >= 0]
            eos_at = np.flatnonzero(seq == self.eos)
            cut = eos_at[0] if eos_at.size else len(seq)
            sequences.append(tuple(int(t) for t in seq[:cut]))
            terminated.append(bool(eos_at.size))
        return SimulationResult(tuple(sequences), tuple(terminated), self.order, self.seed)


def simulate_chain(
    chain: Chain,
    processors: Callable[["torch.LongTensor", "torch.FloatTensor"], "torch.FloatTensor"],
    *,
    do_sample: bool,
    starts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    seed: int,
    first_scores: np.ndarray | None = None,
    vocabulary: np.ndarray | None = None,
) -> SimulationResult:
    """Step ``len(starts)`` trajectories of ``chain`` under ``processors`` for ``max_new_tokens`` steps.

    ``starts`` are the histories the processors see first, as ``generate()`` would pass them in
    ``input_ids`` (the decoder start token for an encoder-decoder model; the prompt ids for a
    decoder-only one). Histories of different lengths are left-padded with ``pad_token_id``, as in
    batched generation. Sampling draws from ``softmax(scores)`` by inverse CDF with one seeded
    uniform per trajectory (so zero-probability columns never change a draw); greedy takes the
    lowest-index argmax. A finished trajectory emits ``pad_token_id``, as
    ``generate()`` does, and the run stops when every trajectory has emitted ``<eos>``.
    ``first_scores`` ((vocab,) or (B, vocab)) replaces the chain's row at the first step: an
    encoder-decoder model's first distribution follows the decoder start token, which is no state of
    the chain, and depends on the input.

    ``vocabulary`` (sorted token ids holding every start token, ``<eos>`` and the padding token):
    the processors and the sampling then act on these columns only, as on a vocabulary of
    ``len(vocabulary)`` tokens (the processors must be built for the compact ``<eos>`` id,
    ``compact_id(vocabulary, eos_token_id)``; ``processors`` see compact ids, the chain and the
    returned sequences real ones). The chain must accept ``columns=`` (``TransitionMatrix`` does:
    stored entries only). It is the large-vocabulary mode of the simulation, where a dense
    ``(trajectories, vocabulary size)`` array per step, sorted by top-p, would take seconds.
    """
    walk = _Walk(chain.order, lambda _eos: processors, do_sample=do_sample, starts=starts,
                 max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed,
                 first_scores=first_scores)
    # generate() hands processors raw logits; a chain that knows each row's logit shift gives the same
    # scale (the repetition penalty's sign rule depends on it, spec §8.8), else log-probabilities
    next_scores = getattr(chain, "next_logits", chain.next_logprobs)
    if vocabulary is not None:
        next_scores = partial(next_scores, columns=vocabulary)
    while not walk.done:
        walk.advance(next_scores(walk.contexts()) if walk.reads_chain else None, vocabulary)
    return walk.result()


def _cycled(starts: Sequence[Sequence[int]], first_scores: np.ndarray | None, n_trajectories: int,
            ) -> tuple[list[list[int]], np.ndarray | None]:
    """``n_trajectories`` starts (and rows of a 2-D ``first_scores``), cycling through the given ones."""
    if n_trajectories < 1:
        raise ValueError(f"n_trajectories must be >= 1, got {n_trajectories}")
    if not starts:
        raise ValueError("starts must hold at least one trajectory start")
    cycled = [list(starts[i % len(starts)]) for i in range(n_trajectories)]
    if first_scores is not None and np.ndim(first_scores) == 2:  # one row per start, cycled like the starts
        first_scores = np.asarray(first_scores)[np.arange(n_trajectories) % len(first_scores)]
    return cycled, first_scores


def _check_simulable(policy: "Policy") -> None:
    if not is_simulable(policy):
        raise ValueError(f"policy {policy.name!r} is not a per-step policy and cannot be simulated on a chain")


def simulate_policy(
    chain: Chain,
    policy: "Policy",
    *,
    starts: Sequence[Sequence[int]],
    n_trajectories: int,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    seed: int,
    first_scores: np.ndarray | None = None,
    processor_kwargs: dict[str, Any] | None = None,
    vocabulary: np.ndarray | None = None,
) -> SimulationResult:
    """Simulate ``n_trajectories`` trajectories under ``policy``'s own HF processors (§7.1).

    The starts (and the rows of a 2-D ``first_scores``) are cycled so that every start prompt gets
    ``n_trajectories / len(starts)`` trajectories (rounded up for the first ones). ``vocabulary``:
    see :func:`simulate_chain` (the processors are built for its compact ``<eos>`` id here).
    """
    _check_simulable(policy)
    all_starts, first_scores = _cycled(starts, first_scores, n_trajectories)
    eos_for_processors = eos_token_id if vocabulary is None else compact_id(vocabulary, eos_token_id)
    processors = policy.logits_processors(eos_for_processors, **(processor_kwargs or {}))
    return simulate_chain(chain, processors, do_sample=policy.do_sample, starts=all_starts,
                          max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                          pad_token_id=pad_token_id, seed=seed, first_scores=first_scores, vocabulary=vocabulary)


@dataclass(frozen=True)
class ReachOutcome:
    """What :func:`simulate_reaching` did: the final chain, each policy's result, and how the rows were filled.

    ``fills`` is the number of steps at which rows were probed, ``probed`` the rows probed in all.
    ``missing_steps[name]`` is the share of the policy's simulated steps (before ``<eos>``) that read
    a missing row (a uniform placeholder): 0 when the probe budget sufficed. ``columns``: the
    simulation's columns at the end (``None``: the whole vocabulary).
    """

    chain: Any
    results: dict[str, SimulationResult]
    fills: int
    probed: int
    missing_steps: dict[str, float]
    columns: np.ndarray | None


def simulate_reaching(
    chain: Any,
    policies: Sequence["Policy"],
    *,
    starts: Sequence[Sequence[int]],
    n_trajectories: int,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    seed: int,
    first_scores: np.ndarray | None = None,
    extra_ids: Sequence[int] | np.ndarray = (),
    fill: Callable[[Any, np.ndarray], Any] | None = None,
    max_probe_rows: int = 0,
    on_step: Callable[[int, int], None] | None = None,
) -> ReachOutcome:
    """Simulate every policy (as :func:`simulate_policy`), probing each missing row before it is first read.

    "Probe only the rows the analysis reaches" (issue 4, spec §7.1). The policies step in lockstep
    on the :class:`~repdiag.transition.TransitionMatrix` ``chain``; before a step reads the chain,
    the missing rows (uniform placeholders) that its live trajectories are about to read, in all
    policies together, are handed to ``fill(chain, states)``, which probes them and returns the new
    chain, most-read first while the total stays within ``max_probe_rows``. No trajectory reads a
    placeholder while budget is left, and no row is probed that no trajectory reads: the
    trajectories are those of :func:`simulate_policy` on the chain with every row it reads probed.
    The simulation's columns (:func:`simulation_vocabulary`, with ``extra_ids``) grow with the probed
    rows' entries. ``on_step(step, rows probed so far)`` reports progress after every step.
    """
    for policy in policies:
        _check_simulable(policy)
    all_starts, first_scores = _cycled(starts, first_scores, n_trajectories)
    vocabulary = simulation_vocabulary(chain, starts, extra_ids)
    walks = {p.name: _Walk(chain.order, p.logits_processors, do_sample=p.do_sample, starts=all_starts,
                           max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                           seed=seed, first_scores=first_scores)
             for p in policies}
    missing_reads = dict.fromkeys(walks, 0)
    reads = dict.fromkeys(walks, 0)
    probed = fills = 0
    for step in range(max_new_tokens):
        active = {name: w for name, w in walks.items() if not w.done}
        if not active:
            break
        states = {name: chain.lookup_states(w.contexts()) for name, w in active.items() if w.reads_chain}
        budget = max_probe_rows - probed
        missing = chain.missing
        if fill is not None and budget > 0 and states:
            wanted = np.concatenate([s[missing[s]] for s in states.values()])
            if wanted.size:
                ids, counts = np.unique(wanted, return_counts=True)
                ids = ids[np.argsort(-counts, kind="stable")][:budget]
                chain = fill(chain, ids)
                missing = chain.missing
                probed += len(ids)
                fills += 1
                if vocabulary is not None:
                    vocabulary = np.union1d(vocabulary, chain.support(ids))
        for name, walk in active.items():
            if name not in states:
                walk.advance(None, vocabulary)
                continue
            s = states[name]
            read = s != chain.eos_index
            reads[name] += int(read.sum())
            missing_reads[name] += int((read & missing[s]).sum())
            walk.advance(chain.state_logits(s, vocabulary), vocabulary)
        if on_step is not None:
            on_step(step + 1, probed)
    results = {name: w.result() for name, w in walks.items()}
    shares = {name: missing_reads[name] / reads[name] if reads[name] else 0.0 for name in walks}
    return ReachOutcome(chain, results, fills, probed, shares, vocabulary)
