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

__all__ = ["Chain", "SimulationResult", "simulate_chain", "simulate_policy", "is_simulable", "MissingRowCounter",
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


def compact_id(vocabulary: np.ndarray, token: int) -> int:
    """The position of ``token`` in the sorted ``vocabulary`` (ValueError when it is not there)."""
    pos = int(np.searchsorted(vocabulary, token))
    if pos >= len(vocabulary) or vocabulary[pos] != token:
        raise ValueError(f"token {token} is not in the simulation vocabulary")
    return pos


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
    import torch

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not starts:
        raise ValueError("starts must hold at least one trajectory start")
    to_model = (lambda ids: np.asarray(ids, dtype=np.int64)) if vocabulary is None else (lambda ids: vocabulary[ids])
    to_compact = (lambda ids: list(ids)) if vocabulary is None else (lambda ids: [compact_id(vocabulary, t) for t in ids])
    eos_c, pad_c = to_compact([eos_token_id, pad_token_id])
    batch = len(starts)
    width = max(len(s) for s in starts)
    history = torch.full((batch, width + max_new_tokens), pad_c, dtype=torch.long)
    for row, start in enumerate(starts):
        if len(start):
            history[row, width - len(start):width] = torch.as_tensor(to_compact(start), dtype=torch.long)
    # the chain's context: the real tokens of each history (left-padded with -1, never the padding)
    context = np.full((batch, width + max_new_tokens), -1, dtype=np.int64)
    for row, start in enumerate(starts):
        if len(start):
            context[row, width - len(start):width] = np.asarray(start, dtype=np.int64)
    generator = torch.Generator().manual_seed(seed)
    finished = torch.zeros(batch, dtype=torch.bool)
    generated = np.full((batch, max_new_tokens), -1, dtype=np.int64)
    order = chain.order
    # generate() hands processors raw logits; a chain that knows each row's logit shift gives the same
    # scale (the repetition penalty's sign rule depends on it, spec §8.8), else log-probabilities
    next_scores = getattr(chain, "next_logits", chain.next_logprobs)
    if vocabulary is not None:
        next_scores = partial(next_scores, columns=vocabulary)
        if first_scores is not None:
            first_scores = np.asarray(first_scores)[..., vocabulary]
    steps_done = 0
    for step in range(max_new_tokens):
        end = width + step
        contexts = context[:, max(0, end - order):end]
        if contexts.shape[1] < order:
            contexts = np.concatenate([np.full((batch, order - contexts.shape[1]), -1, np.int64), contexts], axis=1)
        if step == 0 and first_scores is not None:
            step_scores = np.broadcast_to(np.asarray(first_scores), (batch, np.shape(first_scores)[-1]))
        else:
            step_scores = next_scores(contexts)
        scores = torch.from_numpy(np.array(step_scores, dtype=np.float32))
        scores = processors(history[:, :end], scores)
        if do_sample:  # inverse CDF, one uniform per row: columns of probability 0 do not change the draw
            cdf = torch.cumsum(torch.softmax(scores, dim=-1).double(), dim=-1)
            u = torch.rand((batch, 1), generator=generator, dtype=torch.float64)
            next_tokens = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1).clamp_max(cdf.shape[1] - 1)
        else:
            next_tokens = torch.argmax(scores, dim=-1)
        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_c), next_tokens)
        history[:, end] = next_tokens
        tokens = to_model(next_tokens.numpy())
        alive = ~finished.numpy()
        generated[alive, step] = tokens[alive]
        context[:, end] = np.where(alive, tokens, eos_token_id)  # a finished row stays in <eos>
        finished |= next_tokens == eos_c
        steps_done = step + 1
        if bool(finished.all()):
            break
    sequences, terminated = [], []
    for row in range(batch):
        seq = generated[row, :steps_done]
        seq = seq[seq >= 0]
        eos_at = np.flatnonzero(seq == eos_token_id)
        if eos_at.size:
            sequences.append(tuple(int(t) for t in seq[: eos_at[0]]))
            terminated.append(True)
        else:
            sequences.append(tuple(int(t) for t in seq))
            terminated.append(False)
    return SimulationResult(tuple(sequences), tuple(terminated), order, seed)


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
    if not is_simulable(policy):
        raise ValueError(f"policy {policy.name!r} is not a per-step policy and cannot be simulated on a chain")
    if n_trajectories < 1:
        raise ValueError(f"n_trajectories must be >= 1, got {n_trajectories}")
    all_starts = [list(starts[i % len(starts)]) for i in range(n_trajectories)]
    if first_scores is not None and np.ndim(first_scores) == 2:  # one row per start, cycled like the starts
        first_scores = np.asarray(first_scores)[np.arange(n_trajectories) % len(first_scores)]
    eos_for_processors = eos_token_id if vocabulary is None else compact_id(vocabulary, eos_token_id)
    processors = policy.logits_processors(eos_for_processors, **(processor_kwargs or {}))
    return simulate_chain(chain, processors, do_sample=policy.do_sample, starts=all_starts,
                          max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                          pad_token_id=pad_token_id, seed=seed, first_scores=first_scores, vocabulary=vocabulary)


class MissingRowCounter:
    """A view of a :class:`~repdiag.transition.TransitionMatrix` that counts the steps read from missing rows.

    A missing row (neither traced nor probed) is a uniform placeholder: a simulated step that reads it
    is noise. ``hits[s]`` is the number of steps that read state ``s`` while it was missing.
    """

    def __init__(self, chain: Any):
        self.chain = chain
        self.order = chain.order
        self.vocab_size = chain.vocab_size
        self.hits = np.zeros(chain.n_states, dtype=np.int64)
        self.steps = 0
        self._missing = chain.missing  # the chain does not change while a simulation reads it

    def _count(self, contexts: np.ndarray) -> np.ndarray:
        states = self.chain.lookup_states(contexts)
        self.steps += int((states != self.chain.eos_index).sum())
        np.add.at(self.hits, states[self._missing[states]], 1)
        return states

    def support(self) -> np.ndarray:
        return self.chain.support()

    def next_logits(self, contexts: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
        return self.chain.state_logits(self._count(contexts), columns)

    def next_logprobs(self, contexts: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
        self._count(contexts)
        return self.chain.next_logprobs(contexts, columns)


@dataclass(frozen=True)
class ReachOutcome:
    """What :func:`simulate_reaching` did: the final chain, each run's result, and how the rows were filled.

    ``missing_steps[name]`` is the share of the run's simulated steps (before ``<eos>``) that still read
    a missing row in its final simulation: 0 when the probe budget sufficed.
    """

    chain: Any
    results: dict[str, SimulationResult]
    rounds: int
    probed: int
    missing_steps: dict[str, float]


def simulate_reaching(
    chain: Any,
    runs: dict[str, Callable[[Any], SimulationResult]],
    fill: Callable[[Any, np.ndarray], Any],
    *,
    max_probe_rows: int,
    max_rounds: int = 8,
    on_round: Callable[[int, int], None] | None = None,
) -> ReachOutcome:
    """Simulate every run, probing the missing rows the simulations reach, until none is reached.

    "Probe only the rows the analysis reaches" (issue 4, spec §7.1): each round simulates the runs
    still pending on a :class:`MissingRowCounter`; the missing rows they stepped on, most steps first,
    are handed to ``fill(chain, tokens)`` (which probes them and returns the new chain) while the
    total stays within ``max_probe_rows``; the runs that stepped on a missing row are simulated
    again on the new chain. A run that read no missing row is final: filling rows it never read
    cannot change its seeded trajectories. Stops when no run reads a missing row, the budget is
    spent, or after ``max_rounds`` fills. ``on_round(round, rows probed so far)`` reports progress.
    """
    results: dict[str, SimulationResult] = {}
    missing_steps: dict[str, float] = {}
    pending = list(runs)
    probed = rounds = 0
    while pending:
        hits = np.zeros(chain.n_states, dtype=np.int64)
        still_missing = []
        for name in pending:
            view = MissingRowCounter(chain)
            results[name] = runs[name](view)
            missing_steps[name] = float(view.hits.sum() / view.steps) if view.steps else 0.0
            if view.hits.any():
                still_missing.append(name)
                hits += view.hits
        budget = max_probe_rows - probed
        if not still_missing or budget <= 0 or rounds >= max_rounds:
            break
        reached = np.flatnonzero(hits)
        reached = reached[np.argsort(-hits[reached], kind="stable")][:budget]
        chain = fill(chain, reached)
        probed += len(reached)
        rounds += 1
        if on_round is not None:
            on_round(rounds, probed)
        pending = still_missing
    return ReachOutcome(chain, results, rounds, probed, missing_steps)
