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
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .decoding import Policy

__all__ = ["Chain", "SimulationResult", "simulate_chain", "simulate_policy", "is_simulable"]


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
) -> SimulationResult:
    """Step ``len(starts)`` trajectories of ``chain`` under ``processors`` for ``max_new_tokens`` steps.

    ``starts`` are the histories the processors see first, as ``generate()`` would pass them in
    ``input_ids`` (the decoder start token for an encoder-decoder model; the prompt ids for a
    decoder-only one). Histories of different lengths are left-padded with ``pad_token_id``, as in
    batched generation. Sampling draws from ``softmax(scores)`` with a seeded ``torch.Generator``;
    greedy takes the lowest-index argmax. A finished trajectory emits ``pad_token_id``, as
    ``generate()`` does, and the run stops when every trajectory has emitted ``<eos>``.
    ``first_scores`` ((vocab,) or (B, vocab)) replaces the chain's row at the first step: an
    encoder-decoder model's first distribution follows the decoder start token, which is no state of
    the chain, and depends on the input.
    """
    import torch

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not starts:
        raise ValueError("starts must hold at least one trajectory start")
    batch = len(starts)
    width = max(len(s) for s in starts)
    history = torch.full((batch, width + max_new_tokens), pad_token_id, dtype=torch.long)
    for row, start in enumerate(starts):
        if len(start):
            history[row, width - len(start):width] = torch.as_tensor(list(start), dtype=torch.long)
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
        if do_sample:
            probs = torch.softmax(scores, dim=-1)
            next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            next_tokens = torch.argmax(scores, dim=-1)
        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_token_id), next_tokens)
        history[:, end] = next_tokens
        tokens = next_tokens.numpy()
        alive = ~finished.numpy()
        generated[alive, step] = tokens[alive]
        context[:, end] = np.where(alive, tokens, eos_token_id)  # a finished row stays in <eos>
        finished |= next_tokens == eos_token_id
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
) -> SimulationResult:
    """Simulate ``n_trajectories`` trajectories under ``policy``'s own HF processors (§7.1).

    The starts (and the rows of a 2-D ``first_scores``) are cycled so that every start prompt gets
    ``n_trajectories / len(starts)`` trajectories (rounded up for the first ones).
    """
    if not is_simulable(policy):
        raise ValueError(f"policy {policy.name!r} is not a per-step policy and cannot be simulated on a chain")
    if n_trajectories < 1:
        raise ValueError(f"n_trajectories must be >= 1, got {n_trajectories}")
    all_starts = [list(starts[i % len(starts)]) for i in range(n_trajectories)]
    if first_scores is not None and np.ndim(first_scores) == 2:  # one row per start, cycled like the starts
        first_scores = np.asarray(first_scores)[np.arange(n_trajectories) % len(first_scores)]
    processors = policy.logits_processors(eos_token_id, **(processor_kwargs or {}))
    return simulate_chain(chain, processors, do_sample=policy.do_sample, starts=all_starts,
                          max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                          pad_token_id=pad_token_id, seed=seed, first_scores=first_scores)
