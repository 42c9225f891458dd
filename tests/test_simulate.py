"""The chain-simulation predictor on hand-made chains, with Hugging Face's own processors."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import LogitsProcessorList, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

from repdiag.simulate import simulate_chain

EOS, PAD = 3, 4


class MatrixChain:
    """An order-1 chain over token ids from a row-stochastic matrix (rows indexed by the last token).

    The start token (PAD, as T5's decoder start) has the row ``start_row``.
    """

    order = 1

    def __init__(self, matrix: np.ndarray, start_row: np.ndarray):
        matrix = matrix.copy()
        matrix[PAD] = start_row
        with np.errstate(divide="ignore"):
            self.log = np.log(matrix)

    def next_logprobs(self, contexts):
        return self.log[contexts[:, -1]]


def two_cycle_chain(p_stay: float) -> MatrixChain:
    # tokens 0,1 alternate with prob p_stay; otherwise eos. token 2 unused; PAD row absorbing on PAD.
    m = np.zeros((5, 5))
    m[0, 1], m[0, EOS] = p_stay, 1 - p_stay
    m[1, 0], m[1, EOS] = p_stay, 1 - p_stay
    m[2, 0] = 1.0
    m[EOS, EOS] = 1.0
    start = np.zeros(5)
    start[0] = 1.0
    return MatrixChain(m, start)


def test_greedy_follows_the_argmax_cycle():
    chain = two_cycle_chain(0.9)
    result = simulate_chain(chain, LogitsProcessorList(), do_sample=False, starts=[[PAD]], max_new_tokens=6,
                            eos_token_id=EOS, pad_token_id=PAD, seed=0)
    assert result.sequences == ((0, 1, 0, 1, 0, 1),)
    assert result.terminated == (False,)


def test_sampled_lengths_match_the_geometric_law():
    p = 0.8
    chain = two_cycle_chain(p)
    n = 4000
    result = simulate_chain(chain, LogitsProcessorList(), do_sample=True, starts=[[PAD]] * n, max_new_tokens=200,
                            eos_token_id=EOS, pad_token_id=PAD, seed=1)
    lengths = np.array([len(s) for s in result.sequences])
    # the first token is 0 surely; every later token survives with probability p: E[len] = 1/(1-p)
    expected, sd = 1 / (1 - p), np.sqrt(p) / (1 - p)
    assert abs(lengths.mean() - expected) < 4 * sd / np.sqrt(n)
    assert all(result.terminated)
    assert all(all(a != b for a, b in zip(s, s[1:])) for s in result.sequences)  # strict alternation


def test_no_repeat_ngram_processor_acts_on_the_simulated_history():
    chain = two_cycle_chain(0.999)
    processors = LogitsProcessorList([NoRepeatNGramLogitsProcessor(3)])
    result = simulate_chain(chain, processors, do_sample=False, starts=[[PAD]], max_new_tokens=20,
                            eos_token_id=EOS, pad_token_id=PAD, seed=0)
    seq = result.sequences[0]
    trigrams = [tuple(seq[i:i + 3]) for i in range(len(seq) - 2)]
    assert len(trigrams) == len(set(trigrams))
    assert result.terminated == (True,)  # the ban forces <eos> once the 2-cycle's trigrams are used up


def test_repetition_penalty_changes_greedy_choice():
    m = np.zeros((5, 5))
    m[0, 0], m[0, 1] = 0.6, 0.4
    m[1, 0], m[1, 1] = 0.6, 0.4
    m[EOS, EOS] = m[2, 2] = 1.0
    start = np.zeros(5)
    start[0] = 1.0
    chain = MatrixChain(m, start)
    plain = simulate_chain(chain, LogitsProcessorList(), do_sample=False, starts=[[PAD]], max_new_tokens=4,
                           eos_token_id=EOS, pad_token_id=PAD, seed=0)
    assert plain.sequences[0] == (0, 0, 0, 0)
    penalised = simulate_chain(chain, LogitsProcessorList([RepetitionPenaltyLogitsProcessor(2.0)]),
                               do_sample=False, starts=[[PAD]], max_new_tokens=4, eos_token_id=EOS,
                               pad_token_id=PAD, seed=0)
    # log 0.6 * 2 < log 0.4 once token 0 is in the history: the penalty moves greedy to token 1
    assert penalised.sequences[0][:2] == (0, 1)


def test_bad_arguments():
    with pytest.raises(ValueError):
        simulate_chain(two_cycle_chain(0.5), LogitsProcessorList(), do_sample=False, starts=[], max_new_tokens=3,
                       eos_token_id=EOS, pad_token_id=PAD, seed=0)


def test_compact_vocabulary_gives_the_same_trajectories_as_the_full_one(monkeypatch):
    """Columns of probability 0 change nothing: the stored-entries view of a chain without residual
    simulates exactly as the full vocabulary (greedy, sampling and a history-dependent processor)."""
    import scipy.sparse as sp

    import repdiag.simulate as sim
    from repdiag.mitigations import resolve_mitigations
    from repdiag.simulate import simulate_policy, simulation_vocabulary
    from repdiag.transition import TransitionMatrix

    rng = np.random.default_rng(0)
    V, eos, pad = 40, 1, 0
    support = np.array([1, 5, 7, 11, 12, 20, 33])
    rows, cols, vals = [], [], []
    for i in range(V):  # every row lives on the support: no residual anywhere
        p = rng.dirichlet(np.ones(len(support)) * 0.5)
        rows += [i] * len(support)
        cols += list(support)
        vals += list(p)
    rows, cols, vals = zip(*[(r, c, v) for r, c, v in zip(rows, cols, vals) if r != eos])
    matrix = sp.csr_matrix((list(vals) + [1.0], (list(rows) + [eos], list(cols) + [eos])), shape=(V, V))
    chain = TransitionMatrix(matrix, np.zeros(V), eos, np.arange(V)[:, None], {"builder": "test"})
    starts = [[3, 5], [7]]
    vocabulary = np.union1d(np.union1d(chain.support(), [3, 5, 7]), [eos, pad])
    assert len(vocabulary) < V
    for name in ("greedy", "temperature_1.3", "top_p_0.9", "repetition_penalty_1.5", "no_repeat_ngram_3"):
        policy = resolve_mitigations([name])[0]
        kw = dict(starts=starts, n_trajectories=16, max_new_tokens=20, eos_token_id=eos, pad_token_id=pad, seed=3)
        full = simulate_policy(chain, policy, **kw)
        compact = simulate_policy(chain, policy, vocabulary=vocabulary, **kw)
        assert full.sequences == compact.sequences and full.terminated == compact.terminated, name
        assert set(t for s in compact.sequences for t in s) <= set(support.tolist())
    # the switch: full vocabulary up to FULL_VOCABULARY_MAX tokens
    assert simulation_vocabulary(chain, starts, (eos, pad)) is None
    monkeypatch.setattr(sim, "FULL_VOCABULARY_MAX", 10)
    np.testing.assert_array_equal(simulation_vocabulary(chain, starts, (eos, pad)), vocabulary)
