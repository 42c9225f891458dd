"""Watch a model repeat itself inside your own generate() call (copy these lines)."""
import torch
import transformers

import repdiag

torch.manual_seed(0)  # a tiny random GPT-2 built from a config (no download); use your own model here
model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=1)).eval()
prompt = torch.tensor([[5, 6, 7], [8, 9, 10]])

with repdiag.watch(model) as monitor:  # or: generate(..., logits_processor=[mon], stopping_criteria=[mon])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False)

for seq in monitor.report().sequences:
    print(f"sequence {seq.index}: {seq.length} tokens, loop from token {seq.loop_onset} (period {seq.loop_period}, unit {seq.loop_tokens})")
