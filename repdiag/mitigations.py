"""The registry of mitigations: name → :class:`~repdiag.decoding.Policy`, with what it does and its source.

An explicit dict registry in the style of inseq's ``STEP_SCORES_MAP`` / ``register_step_function``:
:func:`register_mitigation` refuses to overwrite silently, :func:`get_mitigation` raises
:class:`~repdiag.errors.PolicyError` listing the valid names. Each entry's ``generate()`` kwargs are
exactly its ``params`` (``Policy.generate_kwargs``), so running an entry equals calling
``generate()`` by hand with the arguments shown by ``repdiag list mitigations``.

Sampling entries pass ``top_k=0`` unless they are top-k entries: ``generate(do_sample=True)`` alone
applies Hugging Face's default top-k 50, and repdiag wants each entry to be the one named knob.
"""

from __future__ import annotations

from typing import Any

from .decoding import Policy
from .errors import PolicyError

__all__ = [
    "MITIGATIONS",
    "DEFAULT_ANALYZE_MITIGATIONS",
    "register_mitigation",
    "get_mitigation",
    "list_mitigations",
    "resolve_mitigations",
]

#: name -> Policy (with description and source); insertion order is the listing order.
MITIGATIONS: dict[str, Policy] = {}

_S = {"do_sample": True, "top_k": 0}  # pure sampling, HF's implicit top-k 50 switched off


def register_mitigation(
    name: str,
    params: "dict[str, Any] | Policy",
    description: str = "",
    source: str = "",
    *,
    overwrite: bool = False,
) -> Policy:
    """Add a mitigation; an existing name raises :class:`PolicyError` unless ``overwrite=True``."""
    if not isinstance(name, str) or not name or any(c in name for c in ",= \t"):
        raise PolicyError(f"mitigation name {name!r} is invalid: use letters, digits, '_', '.', '-'")
    if name in MITIGATIONS and not overwrite:
        raise PolicyError(f"mitigation {name!r} is already registered: pass overwrite=True to replace it")
    if isinstance(params, Policy):
        policy = Policy(name, params.params, description or params.description, source or params.source)
    else:
        policy = Policy(name, dict(params), description, source)
    MITIGATIONS[name] = policy
    return policy


def get_mitigation(name: str) -> Policy:
    """The registered policy called ``name``; an unknown name lists the valid ones."""
    try:
        return MITIGATIONS[name]
    except KeyError:
        raise PolicyError(
            f"unknown mitigation {name!r}; valid names: {', '.join(MITIGATIONS)} "
            "(or key=value generate() arguments such as temperature=0.7,do_sample=true)"
        ) from None


def list_mitigations() -> list[Policy]:
    """All registered policies, in registry order."""
    return list(MITIGATIONS.values())


def resolve_mitigations(spec: "str | list[str] | None") -> list[Policy]:
    """``None``/``"default"`` → :data:`DEFAULT_ANALYZE_MITIGATIONS`; ``"all"`` → every measurable entry;
    else a comma-separated list (or list) of names; a ``key=value`` policy spec may be given as one item
    of a list."""
    from .decoding import parse_policy

    if spec is None or spec == "default":
        return [MITIGATIONS[n] for n in DEFAULT_ANALYZE_MITIGATIONS]
    if spec == "all":
        return [p for p in MITIGATIONS.values() if p.measurable]
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = [parse_policy(s.strip()) for s in items if s.strip()]
    if not out:
        raise PolicyError("no mitigation given: use names from `repdiag list mitigations`, 'default' or 'all'")
    return out


_HF = "transformers GenerationConfig"
_R = register_mitigation

_R("greedy", {"do_sample": False}, "argmax at every step (lowest id on ties)", f"{_HF} do_sample=False")
_R("beam4", {"num_beams": 4, "do_sample": False}, "beam search with 4 beams", f"{_HF} num_beams")
_R("sampling", dict(_S), "ancestral sampling from the full distribution", "HOL20 baseline; top_k=0 disables HF's top-k 50")
_R("temperature_0.7", {**_S, "temperature": 0.7}, "sampling at temperature 0.7 (sharper)", "FU21 T_t; HF temperature")
_R("temperature_1.3", {**_S, "temperature": 1.3}, "sampling at temperature 1.3 (flatter)", "FU21 T_t; HF temperature")
_R("top_k_10", {"do_sample": True, "top_k": 10}, "sample among the 10 most likely tokens (ties kept)", "FAN18; HF top_k")
_R("top_k_50", {"do_sample": True, "top_k": 50}, "sample among the 50 most likely tokens (ties kept)", "FAN18; HF top_k")
_R("top_p_0.9", {**_S, "top_p": 0.9}, "nucleus sampling, smallest set with mass >= 0.9", "HOL20; HF top_p")
_R("top_p_0.95", {**_S, "top_p": 0.95}, "nucleus sampling, smallest set with mass >= 0.95", "HOL20; HF top_p")
_R("typical_0.9", {**_S, "typical_p": 0.9}, "locally typical sampling, mass 0.9", "MEI23; HF typical_p")
_R("min_p_0.1", {**_S, "min_p": 0.1}, "keep tokens with p >= 0.1 * max p", "Nguyen et al. 2024 min-p; HF min_p")
_R("epsilon_3e-4", {**_S, "epsilon_cutoff": 3e-4}, "keep tokens with p >= 3e-4", "Hewitt et al. 2022 (3e-4..9e-4); HF epsilon_cutoff")
_R("eta_2e-3", {**_S, "eta_cutoff": 2e-3}, "keep p >= min(eta, sqrt(eta) exp(-H)), eta = 2e-3",
   "Hewitt et al. 2022 (3e-4..4e-3); HF eta_cutoff")
_R("repetition_penalty_1.2", {"do_sample": False, "repetition_penalty": 1.2},
   "greedy with CTRL/HF repetition penalty 1.2 on every token already in the sequence", "KES19 (CTRL, 1.2); HF repetition_penalty")
_R("repetition_penalty_1.5", {"do_sample": False, "repetition_penalty": 1.5},
   "greedy with repetition penalty 1.5", "KES19; HF repetition_penalty")
_R("no_repeat_ngram_3", {"do_sample": False, "no_repeat_ngram_size": 3},
   "greedy that bans any token completing a 3-gram already in the sequence", "HF no_repeat_ngram_size (Paulus et al. 2018)")
_R("encoder_repetition_penalty", {"do_sample": False, "encoder_repetition_penalty": 1.2},
   "greedy with HF's encoder repetition penalty 1.2: rewards tokens of the source (seq2seq; "
   "on decoder-only models HF applies it to the prompt)", "HF encoder_repetition_penalty (hallucination penalty, PR #26129)")
_R("eos_boost", {**_S, "eos_boost": 1.0}, "sampling with +1 on the <eos> logit (sequence_bias)", "FU21 T_l length penalty beta=1; HF sequence_bias")
_R("contrastive", {"do_sample": False, "penalty_alpha": 0.6, "top_k": 4},
   "contrastive search: argmax of (1-a) p - a max cos(h_v, h_prev) over the top 4, a = 0.6",
   "SUY22 SimCTG; repdiag's local custom_generate (transformers 5 moved it to the Hub)")
_R("rebalanced_encoding", {**_S, "rebalanced_encoding": 0.1},
   "merge high-inflow pairs (gamma 0.1) into new tokens (needs retraining)",
   "FU21 rebalanced encoding, matrix-level (spec 8.10)")
_R("rp1.3_t0.7_k3_p0.9", {"do_sample": True, "repetition_penalty": 1.3, "temperature": 0.7, "top_k": 3, "top_p": 0.9},
   "repetition penalty 1.3 -> T 0.7 -> top-k 3 -> top-p 0.9 (HF order)", "spec 12 composite HF chain")
_R("t0.7_top_p_0.9", {**_S, "temperature": 0.7, "top_p": 0.9}, "T 0.7 then nucleus 0.9", "HOL20 + temperature; HF")
_R("rp1.2_top_p_0.9", {**_S, "repetition_penalty": 1.2, "top_p": 0.9}, "repetition penalty 1.2 then nucleus 0.9",
   "KES19 + HOL20; HF")
_R("ngram3_top_p_0.9", {**_S, "no_repeat_ngram_size": 3, "top_p": 0.9}, "no-repeat-3-gram then nucleus 0.9", "HF")

#: `repdiag analyze`'s default subset: one policy per family, cheap first.
DEFAULT_ANALYZE_MITIGATIONS: tuple[str, ...] = (
    "greedy",
    "temperature_0.7",
    "top_p_0.9",
    "repetition_penalty_1.2",
    "no_repeat_ngram_3",
    "contrastive",
)
