"""Contrastive search (SimCTG, SUY22; spec §8.11) for decoder-only and encoder-decoder HF models.

transformers 5 moved contrastive search to a Hub repo (``transformers-community/contrastive-search``)
that needs the network and ``trust_remote_code``. repdiag ships its own implementation as a
``custom_generate`` **callable**, which ``generate()`` accepts without remote code::

    model.generate(**inputs, penalty_alpha=0.6, top_k=4, custom_generate=contrastive_generate)

(``Policy.generate_kwargs()`` of the ``contrastive`` mitigation returns exactly these kwargs), or the
plain wrapper :func:`contrastive_search`. ``generate()`` does all the usual preparation (encoder run,
decoder start token, logits processors, stopping criteria, ``max_new_tokens``) and then calls
``contrastive_generate(model, input_ids, logits_processor=..., stopping_criteria=...,
generation_config=..., **model_kwargs)``.

At step ``t`` (the definition):
``x_t = argmax_{v ∈ V^(k)} {(1−α) p(v|x_<t) − α max_{j<t} cos(h_v, h_{x_j})}``, where ``V^(k)`` are the
``k`` most likely tokens of the processed distribution, ``h`` the model's last-layer hidden states
(decoder states for encoder-decoder models) and ``j`` runs over every earlier position of the
(decoder) sequence, the prompt included for decoder-only models, padding excluded. Ties go to the
higher-probability candidate (the first of ``torch.topk``).

Implementation: each step runs one batched forward of the ``B·k`` candidates on the KV cache
(repeated ``k`` times with ``Cache.batch_repeat_interleave``, then cut back to the chosen candidate
with ``batch_select_indices``). A model that returns no cache (or ``use_cache=False``) gets the
same step by recomputing the whole sequence, ``O(L)`` per step. The cosine penalty is computed
as ``(B, k, L)`` without copying the context ``k`` times.
"""

from __future__ import annotations

from typing import Any

from .models import forward_accepts

__all__ = ["contrastive_generate", "contrastive_search"]


def _outputs_cache(out):
    for key in ("cache", "past_key_values"):
        value = out.get(key) if hasattr(out, "get") else None
        if value is not None:
            return value
    return None


def _forward(model, ids, mask, enc_outputs, enc_mask, accepts_pos: bool, *, cache=None, use_cache=False,
             user_dec_mask: bool = False):
    """One forward: (last-position logits as float32, last-layer hidden states (B, len(ids), H), cache).

    Without ``cache`` ``ids`` is the whole sequence; with it only the new tokens (``mask`` always
    covers the whole sequence)."""
    kwargs: dict[str, Any] = {"output_hidden_states": True, "use_cache": use_cache, "return_dict": True}
    if cache is not None:
        kwargs["cache"] = cache
    if model.config.is_encoder_decoder:
        if user_dec_mask:
            kwargs["decoder_attention_mask"] = mask
        out = model(encoder_outputs=enc_outputs, attention_mask=enc_mask, decoder_input_ids=ids, **kwargs)
        hidden = out.decoder_hidden_states[-1]
    else:
        if accepts_pos:
            kwargs["position_ids"] = ((mask.long().cumsum(-1) - 1).clamp(min=0))[:, -ids.shape[1]:]
        out = model(input_ids=ids, attention_mask=mask, **kwargs)
        hidden = out.hidden_states[-1]
    return out.logits[:, -1].float(), hidden, (_outputs_cache(out) if use_cache else None)


def contrastive_generate(
    model,
    input_ids,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    **model_kwargs,
):
    """The ``custom_generate`` callable: contrastive search with ``generation_config.penalty_alpha``
    and ``generation_config.top_k``. Returns the sequences (or a ``Generate*Output`` when
    ``return_dict_in_generate=True``), like ``generate()``. Uses the model's KV cache when it
    returns one (``batch_repeat_interleave`` / ``batch_select_indices`` per step), else recomputes
    the whole sequence each step."""
    import torch
    from transformers.generation.utils import GenerateDecoderOnlyOutput, GenerateEncoderDecoderOutput
    from transformers.modeling_outputs import BaseModelOutput

    alpha = generation_config.penalty_alpha
    k = generation_config.top_k
    if alpha is None or not (0.0 <= float(alpha) <= 1.0) or k is None or int(k) < 1:
        raise ValueError(f"contrastive search needs 0 <= penalty_alpha <= 1 and top_k >= 1, got {alpha}, {k}")
    alpha = float(alpha)
    k = int(k)
    device = input_ids.device
    B = input_ids.shape[0]
    is_ed = bool(model.config.is_encoder_decoder)
    pad = generation_config._pad_token_tensor
    has_eos_stop = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    want_scores = bool(generation_config.return_dict_in_generate and generation_config.output_scores)
    scores_out = () if want_scores else None
    use_cache = generation_config.use_cache is not False

    enc_outputs = enc_mask = enc_outputs_k = enc_mask_k = None
    accepts_pos = False
    user_dec_mask = False
    if is_ed:
        enc = model_kwargs["encoder_outputs"]
        enc_h = enc["last_hidden_state"] if hasattr(enc, "keys") else enc[0]
        enc_outputs = BaseModelOutput(last_hidden_state=enc_h)
        enc_mask = model_kwargs.get("attention_mask")
        enc_outputs_k = BaseModelOutput(last_hidden_state=enc_h.repeat_interleave(k, dim=0))
        enc_mask_k = enc_mask.repeat_interleave(k, dim=0) if enc_mask is not None else None
        mask = model_kwargs.get("decoder_attention_mask")
        user_dec_mask = mask is not None
        if mask is None:
            mask = torch.ones_like(input_ids)
    else:
        mask = model_kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(input_ids)
        accepts_pos = forward_accepts(model, "position_ids")

    unfinished = torch.ones(B, dtype=torch.long, device=device)
    logits, ctx_hidden, cache = _forward(model, input_ids, mask, enc_outputs, enc_mask, accepts_pos,
                                         use_cache=use_cache, user_dec_mask=user_dec_mask)
    rows = torch.arange(B, device=device)
    while True:
        scores = logits_processor(input_ids, logits)
        if want_scores:
            scores_out += (scores,)
        probs = torch.softmax(scores, dim=-1)
        top_probs, top_ids = torch.topk(probs, k=k, dim=-1)  # (B, k)
        cand_mask = torch.cat([mask.repeat_interleave(k, dim=0), mask.new_ones((B * k, 1))], dim=-1)
        if cache is not None:
            cache.batch_repeat_interleave(k)
            cand_logits, cand_hidden, cache = _forward(
                model, top_ids.reshape(-1, 1), cand_mask, enc_outputs_k, enc_mask_k, accepts_pos,
                cache=cache, use_cache=True, user_dec_mask=user_dec_mask,
            )
        else:
            cand_ids = torch.cat([input_ids.repeat_interleave(k, dim=0), top_ids.reshape(-1, 1)], dim=-1)
            cand_logits, cand_hidden, _ = _forward(model, cand_ids, cand_mask, enc_outputs_k, enc_mask_k,
                                                   accepts_pos, user_dec_mask=user_dec_mask)
        next_h = cand_hidden[:, -1, :].reshape(B, k, -1)  # h_v
        ctx_n = ctx_hidden / ctx_hidden.norm(dim=-1, keepdim=True)  # h_{x_j}, j < t: (B, L, H)
        nxt_n = next_h / next_h.norm(dim=-1, keepdim=True)
        cos = torch.einsum("blh,bkh->bkl", ctx_n, nxt_n)
        cos = cos.masked_fill((mask == 0)[:, None, :], float("-inf"))
        penalty = cos.max(dim=-1).values  # (B, k)
        contrastive = (1.0 - alpha) * top_probs - alpha * penalty
        sel = contrastive.argmax(dim=-1)  # first maximum = the more probable candidate
        next_tokens = top_ids[rows, sel]
        if has_eos_stop and pad is not None:
            next_tokens = next_tokens * unfinished + pad.to(device) * (1 - unfinished)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        mask = torch.cat([mask, mask.new_ones((B, 1))], dim=-1)
        pick = rows * k + sel
        logits = cand_logits[pick]
        if cache is not None:
            cache.batch_select_indices(pick)
            ctx_hidden = torch.cat([ctx_hidden, next_h[rows, sel][:, None, :]], dim=1)
        else:
            ctx_hidden = cand_hidden[pick]
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        unfinished = unfinished & ~stopping_criteria(input_ids, scores_out)
        if unfinished.max() == 0:
            break
    if streamer is not None:
        streamer.end()
    if generation_config.return_dict_in_generate:
        if is_ed:
            return GenerateEncoderDecoderOutput(sequences=input_ids, scores=scores_out)
        return GenerateDecoderOnlyOutput(sequences=input_ids, scores=scores_out)
    return input_ids


def contrastive_search(
    model,
    input_ids,
    attention_mask=None,
    top_k: int = 4,
    penalty_alpha: float = 0.6,
    max_new_tokens: int = 32,
    **generate_kwargs: Any,
):
    """Plain-function form: ``model.generate`` with repdiag's contrastive search (same tokens)."""
    return model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=False,
        top_k=int(top_k),
        penalty_alpha=float(penalty_alpha),
        max_new_tokens=int(max_new_tokens),
        custom_generate=contrastive_generate,
        **generate_kwargs,
    )
