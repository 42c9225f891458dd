"""measure.mean_logprobs (the quality column's mean_logprob) against a brute-force loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from repdiag.measure import mean_logprobs
from tiny_models import build_tiny


def _brute_force(lm, prompt: str, target: list[int]) -> float:
    """Mean of log p(target[j] | prompt, target[:j]) with one model(...) call per output token."""
    enc = lm.tokenizer(prompt)["input_ids"]
    values = []
    with torch.no_grad():
        for j, token in enumerate(target):
            if lm.kind == "seq2seq":
                dec = [lm.decoder_start_token_id, *target[:j]]
                logits = lm.model(input_ids=torch.tensor([enc]), decoder_input_ids=torch.tensor([dec])).logits
            else:
                logits = lm.model(input_ids=torch.tensor([enc + target[:j]])).logits
            values.append(float(torch.log_softmax(logits[0, -1].double(), -1)[token]))
    return float(np.mean(values))


@pytest.mark.parametrize("arch", ["t5", "gpt2", "llama"])
def test_mean_logprobs_equals_a_brute_force_loop(arch):
    from repdiag.models import wrap_model

    model, tok = build_tiny(arch, seed=2, dtype=torch.float64)
    lm = wrap_model(model, tok, model_id=f"tiny-{arch}")
    prompts = ["a b c d", "e", "f g"]
    sequences = [(5, 6, 7, 5), (9,), ()]
    terminated = [True, False, False]
    got = mean_logprobs(lm, prompts, sequences, terminated, batch_size=2)
    eos = lm.eos_token_id
    assert abs(got[0] - _brute_force(lm, prompts[0], [5, 6, 7, 5, eos])) <= 1e-12  # the emitted eos counts
    assert abs(got[1] - _brute_force(lm, prompts[1], [9])) <= 1e-12
    assert np.isnan(got[2])  # an empty output scores NaN
