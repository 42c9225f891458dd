"""Probe speed and memory on a t5-small-shaped model (random weights, no download).

Prints, in one run and on the same threads:
  * rows/s of the naive loop (one ``model(...)`` call per row, as a user would write it),
  * rows/s of ``repdiag.transition.build_probe`` (encoder once, cached decoder prefix, one-step batches),
  * FLOP/s of a plain fp32 matmul of the LM head's shape (batch × d_model) @ (d_model × vocab),
  * the probe's useful FLOP/s (FLOPs of one decoder step + LM head per row, counted by
    ``torch.utils.flop_counter``) and the ratios against the goals (≥ 10× naive, ≥ 50 % of the matmul),
  * the peak resident memory beyond the model during the probe (``VmHWM`` of /proc/self/status after
    resetting it through /proc/self/clear_refs), against the goal ≤ 1 GiB at K = 64.

    .venv/bin/python benchmarks/bench_probe.py              # rounds, then the full 32,128-row probe
    .venv/bin/python benchmarks/bench_probe.py --rows -1    # rounds only
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def build_model(seed: int = 0):
    import transformers as tr

    from repdiag.models import wrap_model
    from tiny_models import build_tokenizer

    torch.manual_seed(seed)
    cfg = tr.T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6,
                      num_heads=8, relative_attention_num_buckets=32, dropout_rate=0.0, feed_forward_proj="relu",
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=True)
    model = tr.T5ForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    # the 32-word test tokenizer encodes the prompt; ids index the 32,128-row embedding as usual
    return wrap_model(model, build_tokenizer("t5"), model_id="t5-small-shaped-random")


class Clock:
    """Wall and CPU seconds of this process (one torch thread: CPU time ≈ wall time on an idle machine)."""

    def __enter__(self):
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0


def naive_rows(lm, prompt_ids: list[int], rows: np.ndarray) -> Clock:
    """The naive loop: one model(...) call per row (encoder included), softmax and top-64 per row."""
    model = lm.model
    x = torch.tensor([prompt_ids])
    start = lm.decoder_start_token_id
    with torch.no_grad(), Clock() as clock:
        for i in rows:
            out = model(input_ids=x, decoder_input_ids=torch.tensor([[start, int(i)]]))
            p = torch.softmax(out.logits[0, -1], -1)
            torch.topk(p, 64)
    return clock


def matmul_run(batch: int, d: int, vocab: int, seconds: float) -> tuple[float, Clock]:
    a = torch.randn(batch, d)
    w = torch.randn(d, vocab)
    out = torch.empty(batch, vocab)
    torch.mm(a, w, out=out)
    n = 0
    with Clock() as clock:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            torch.mm(a, w, out=out)
            n += 1
    return 2.0 * batch * d * vocab * n, clock


def flops_per_row(lm, prompt: str, batch: int) -> float:
    """FLOPs of one one-step decoder batch (+ LM head) per row, as torch's FLOP counter sees them."""
    from torch.utils.flop_counter import FlopCounterMode

    from repdiag.transition import _prepare_prompt, _step_logits

    with torch.inference_mode():
        ctx = _prepare_prompt(lm, prompt)
        toks = torch.arange(batch)
        with FlopCounterMode(display=False) as counter:
            _step_logits(lm, ctx, toks)
    return counter.get_total_flops() / batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=0,
                    help="rows of the final memory run (0 = the full vocabulary, -1 = skip it)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--naive-rows", type=int, default=8, help="naive rows per round")
    ap.add_argument("--round-rows", type=int, default=512, help="probe rows per round")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from repdiag.transition import build_probe

    lm = build_model()
    prompt = "translate a b c d e f g h i j k l m n o p"
    prompt_ids = lm.tokenizer(prompt)["input_ids"]
    V = lm.vocab_size
    d = lm.model.config.d_model
    print(f"model: t5-small shape, random weights, {lm.n_parameters / 1e6:.1f} M parameters, vocab {V}, "
          f"prompt {len(prompt_ids)} tokens, torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs")

    fpr = flops_per_row(lm, prompt, args.batch_size)
    head = 2.0 * d * V
    print(f"useful FLOPs per probe row (one decoder step + LM head, torch FLOP counter): {fpr / 1e6:.1f} MFLOP "
          f"(LM head alone {head / 1e6:.1f})")

    # Interleaved rounds so that all three see the same machine load; rates per wall and per CPU second.
    build_probe(lm, [prompt], rows=np.arange(args.batch_size), top_k=args.top_k, batch_size=args.batch_size)
    per = {"naive": [], "probe": [], "matmul": []}
    for r in range(args.rounds):
        c = naive_rows(lm, prompt_ids, np.arange(100 + r * args.naive_rows, 100 + (r + 1) * args.naive_rows))
        per["naive"].append((args.naive_rows / c.wall, args.naive_rows / c.cpu))
        ids = np.arange(1000 + r * args.round_rows, 1000 + (r + 1) * args.round_rows)
        with Clock() as c:
            build_probe(lm, [prompt], rows=ids, top_k=args.top_k, batch_size=args.batch_size)
        per["probe"].append((len(ids) / c.wall, len(ids) / c.cpu))
        flops, c = matmul_run(args.batch_size, d, V, 1.0)
        per["matmul"].append((flops / c.wall, flops / c.cpu))
    med = {k: (float(np.median([x[0] for x in v])), float(np.median([x[1] for x in v]))) for k, v in per.items()}
    ratio_speed = [p[i] / n[i] for p, n in zip(per["probe"], per["naive"]) for i in (0, 1)]
    ratio_flops = [p[i] * fpr / m[i] for p, m in zip(per["probe"], per["matmul"]) for i in (0, 1)]
    print(f"{args.rounds} interleaved rounds (median; per wall second | per CPU second):")
    print(f"  naive loop (one model(...) per row): {med['naive'][0]:9.1f} | {med['naive'][1]:9.1f} rows/s")
    print(f"  repdiag probe (batch {args.batch_size}, K={args.top_k}):    {med['probe'][0]:9.1f} | {med['probe'][1]:9.1f} rows/s")
    print(f"  fp32 matmul ({args.batch_size}x{d}) @ ({d}x{V}):   {med['matmul'][0] / 1e9:9.2f} | {med['matmul'][1] / 1e9:9.2f} GFLOP/s")
    print(f"  probe useful FLOP/s:                  {med['probe'][0] * fpr / 1e9:9.2f} | {med['probe'][1] * fpr / 1e9:9.2f} GFLOP/s")
    print(f"ratio probe / naive (per round, wall and CPU): median {np.median(ratio_speed):.1f}x, "
          f"min {min(ratio_speed):.1f}x   (goal >= 10x)")
    print(f"ratio probe useful FLOP/s / matmul FLOP/s: median {np.median(ratio_flops):.0%}, "
          f"min {min(ratio_flops):.0%}   (goal >= 50 %)")

    if args.rows >= 0:
        n_rows = V if args.rows == 0 else min(args.rows, V)
        base_kib = _status_kib("VmRSS")
        peak_ok = _reset_peak()
        with Clock() as c:
            tm = build_probe(lm, [prompt], rows=np.arange(n_rows), top_k=args.top_k, batch_size=args.batch_size)
        peak_kib = _status_kib("VmHWM") if peak_ok else -1
        print(f"probe of {n_rows} rows (K={args.top_k}): {c.wall:.1f} s wall, {c.cpu:.1f} s CPU "
              f"({n_rows / c.wall:.1f} | {n_rows / c.cpu:.1f} rows/s), nnz {tm.nnz}, "
              f"residual mass mean {tm.residual.mean():.3g}")
        if peak_kib > 0:
            print(f"peak RSS beyond the model during it: {(peak_kib - base_kib) / 1024:.0f} MiB   (goal <= 1024 MiB at K = 64)")
        else:
            print("peak RSS: /proc/self/clear_refs not writable here; not measured")


if __name__ == "__main__":
    main()
