"""The mitigation registry: each entry's generate() kwargs equal generate() called by hand, nothing hidden."""

from __future__ import annotations

import json

import pytest
import torch

from repdiag.contrastive import contrastive_generate
from repdiag.decoding import PARAMS, Policy, parse_policy
from repdiag.errors import PolicyError
from repdiag.mitigations import (
    DEFAULT_ANALYZE_MITIGATIONS,
    MITIGATIONS,
    get_mitigation,
    list_mitigations,
    register_mitigation,
    resolve_mitigations,
)
from tiny_models import build_tiny

EOS = 1  # tests/tiny_models.py

# what a user types by hand, written out independently of the registry
BY_HAND = {
    "greedy": dict(do_sample=False),
    "beam4": dict(num_beams=4, do_sample=False),
    "sampling": dict(do_sample=True, top_k=0),
    "temperature_0.7": dict(do_sample=True, top_k=0, temperature=0.7),
    "temperature_1.3": dict(do_sample=True, top_k=0, temperature=1.3),
    "top_k_10": dict(do_sample=True, top_k=10),
    "top_k_50": dict(do_sample=True, top_k=50),
    "top_p_0.9": dict(do_sample=True, top_k=0, top_p=0.9),
    "top_p_0.95": dict(do_sample=True, top_k=0, top_p=0.95),
    "typical_0.9": dict(do_sample=True, top_k=0, typical_p=0.9),
    "min_p_0.1": dict(do_sample=True, top_k=0, min_p=0.1),
    "epsilon_3e-4": dict(do_sample=True, top_k=0, epsilon_cutoff=3e-4),
    "eta_2e-3": dict(do_sample=True, top_k=0, eta_cutoff=2e-3),
    "repetition_penalty_1.2": dict(do_sample=False, repetition_penalty=1.2),
    "repetition_penalty_1.5": dict(do_sample=False, repetition_penalty=1.5),
    "no_repeat_ngram_3": dict(do_sample=False, no_repeat_ngram_size=3),
    "encoder_repetition_penalty": dict(do_sample=False, encoder_repetition_penalty=1.2),
    "eos_boost": dict(do_sample=True, top_k=0, sequence_bias={(EOS,): 1.0}),
    "contrastive": dict(do_sample=False, penalty_alpha=0.6, top_k=4, custom_generate=contrastive_generate),
    "rp1.3_t0.7_k3_p0.9": dict(do_sample=True, repetition_penalty=1.3, temperature=0.7, top_k=3, top_p=0.9),
    "t0.7_top_p_0.9": dict(do_sample=True, top_k=0, temperature=0.7, top_p=0.9),
    "rp1.2_top_p_0.9": dict(do_sample=True, top_k=0, repetition_penalty=1.2, top_p=0.9),
    "ngram3_top_p_0.9": dict(do_sample=True, top_k=0, no_repeat_ngram_size=3, top_p=0.9),
}


def test_registry_has_the_required_entries():
    required = {"greedy", "beam4", "temperature_0.7", "temperature_1.3", "top_k_10", "top_k_50", "top_p_0.9",
                "top_p_0.95", "typical_0.9", "min_p_0.1", "epsilon_3e-4", "repetition_penalty_1.2",
                "repetition_penalty_1.5", "no_repeat_ngram_3", "encoder_repetition_penalty", "eos_boost",
                "contrastive", "rebalanced_encoding", "rp1.3_t0.7_k3_p0.9"}
    assert required <= set(MITIGATIONS)
    assert any(n.startswith("eta_") for n in MITIGATIONS)
    assert set(BY_HAND) == {p.name for p in list_mitigations() if p.measurable}
    for p in list_mitigations():
        assert p.description and p.source and "\n" not in p.description
    assert get_mitigation("rebalanced_encoding").exactness == "prediction only"
    assert get_mitigation("contrastive").exactness == "measure only"


def test_default_subset_spans_families():
    assert len(DEFAULT_ANALYZE_MITIGATIONS) >= 6
    fams = [get_mitigation(n).family for n in DEFAULT_ANALYZE_MITIGATIONS]
    assert {"greedy", "temperature", "truncation", "penalty", "ngram-ban", "contrastive"} <= set(fams)
    assert [p.name for p in resolve_mitigations(None)] == list(DEFAULT_ANALYZE_MITIGATIONS)
    assert all(p.measurable for p in resolve_mitigations("all"))
    assert [p.name for p in resolve_mitigations("greedy,top_k_10")] == ["greedy", "top_k_10"]


def test_kwargs_hide_nothing():
    extras = {"sequence_bias": "eos_boost", "custom_generate": "penalty_alpha"}
    for p in list_mitigations():
        if not p.measurable:
            with pytest.raises(PolicyError):
                p.generate_kwargs(eos_token_id=EOS)
            continue
        kw = p.generate_kwargs(eos_token_id=EOS)
        for key, value in kw.items():
            if key in extras:
                assert extras[key] in p.params
            else:
                assert key in PARAMS and p.params[key] == value
        assert set(p.params) - {"eos_boost"} <= set(kw)


def test_eos_boost_needs_eos_id():
    with pytest.raises(PolicyError, match="eos_token_id"):
        get_mitigation("eos_boost").generate_kwargs()


def _generate(model, enc, kwargs, seed):
    torch.manual_seed(seed)
    return model.generate(**enc, max_new_tokens=8, pad_token_id=0, **kwargs)


@pytest.fixture(scope="module")
def gpt2():
    model, tok = build_tiny("gpt2")
    tok.padding_side = "left"
    return model, tok(["a b c d", "copy e f"], return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def t5():
    model, tok = build_tiny("t5")
    return model, tok(["a b c d", "copy e f"], return_tensors="pt", padding=True)


@pytest.mark.parametrize("name", list(BY_HAND))
def test_generate_kwargs_equal_generate_by_hand(name, gpt2, t5):
    policy = get_mitigation(name)
    for model, enc in (gpt2, t5) if name in ("encoder_repetition_penalty", "contrastive", "beam4") else (gpt2,):
        for seed in (0, 1) if get_mitigation(name).do_sample else (0,):
            via_registry = _generate(model, enc, policy.generate_kwargs(eos_token_id=EOS), seed)
            by_hand = _generate(model, enc, BY_HAND[name], seed)
            assert torch.equal(via_registry, by_hand), name


def _proc_signature(procs):
    out = []
    for p in procs:
        attrs = {k: v for k, v in vars(p).items() if isinstance(v, (int, float, bool, str)) and not k.startswith("_")}
        out.append((type(p).__name__, tuple(sorted(attrs.items()))))
    return out


@pytest.mark.parametrize("name", [n for n in BY_HAND if n not in ("contrastive", "beam4")])
def test_logits_processors_are_the_ones_generate_builds(name, gpt2):
    """Policy.logits_processors() equals GenerationMixin._get_logits_processor for the same kwargs."""
    model, enc = gpt2
    policy = get_mitigation(name)
    kwargs = policy.generate_kwargs(eos_token_id=EOS)
    gc, _ = model._prepare_generation_config(None, **kwargs)
    gc.min_length = 0
    built = model._get_logits_processor(gc, input_ids_seq_length=enc["input_ids"].shape[1],
                                        encoder_input_ids=enc["input_ids"], device="cpu", model_kwargs={})
    ours = policy.logits_processors(eos_token_id=EOS, encoder_input_ids=enc["input_ids"])
    assert _proc_signature(ours) == _proc_signature(built)


def test_consistent_policy_runs_through_generate(gpt2):
    model, enc = gpt2
    pol = parse_policy("do_sample=true,top_k=2,consistent=true")
    kw = pol.generate_kwargs(eos_token_id=EOS)
    assert kw["top_k"] == 0 and len(kw["logits_processor"]) == 1
    torch.manual_seed(0)
    out = model.generate(**enc, max_new_tokens=6, pad_token_id=0, **kw)
    assert out.shape[0] == 2


def test_register_refuses_overwrite_and_unknown_names_list_valid_ones():
    with pytest.raises(PolicyError, match="already registered"):
        register_mitigation("greedy", {"do_sample": False}, "x", "y")
    try:
        p = register_mitigation("my_t0.9", {"do_sample": True, "temperature": 0.9, "top_k": 0}, "mine", "test")
        assert isinstance(p, Policy) and parse_policy("my_t0.9") is p
        register_mitigation("my_t0.9", {"do_sample": True, "temperature": 0.8}, "mine", "test", overwrite=True)
        assert get_mitigation("my_t0.9").params["temperature"] == 0.8
    finally:
        MITIGATIONS.pop("my_t0.9", None)
    with pytest.raises(PolicyError) as err:
        get_mitigation("nucleus")
    msg = str(err.value)
    assert "\n" not in msg and "greedy" in msg and "top_p_0.9" in msg
    with pytest.raises(PolicyError):
        register_mitigation("bad name", {"do_sample": False})
    with pytest.raises(PolicyError):
        register_mitigation("neg_t", {"do_sample": True, "temperature": -1.0})


def test_cli_list_mitigations():
    from typer.testing import CliRunner

    from repdiag.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["list", "mitigations"])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert len(lines) == len(MITIGATIONS)
    assert any(ln.lstrip("* ").startswith("contrastive ") for ln in lines)
    res = runner.invoke(app, ["list", "mitigations", "--format", "json"])
    assert res.exit_code == 0
    doc = json.loads(res.stdout)
    assert [m["name"] for m in doc["mitigations"]] == list(MITIGATIONS)
    assert doc["default"] == list(DEFAULT_ANALYZE_MITIGATIONS)
    assert {"name", "description", "source", "family", "exactness"} <= set(doc["mitigations"][0])
