"""Overhead of ``RepetitionMonitor`` inside ``generate()`` (issue 8 goal: ≤ 5 %).

A t5-small-shaped model with random weights (``T5Config``: d_model 512, 6 + 6 layers, 8 heads,
d_ff 2048, vocab 32,128; nothing downloaded), batch 8, exactly 64 new tokens
(``min_new_tokens = max_new_tokens = 64``), greedy and beam search (4 beams). Each decoding mode runs
without the monitor, with the monitor in record mode, and with the monitor in record mode with a
TransitionMatrix attached; the three are interleaved (rotating order) ``--repeats`` times in one
process. Reported, per variant: the median wall time and the median process CPU time of
generate(), the overhead of the medians and the median of the paired ratios (each monitored run
against the unmonitored run of the same round); and the monitor's own share of generate(): the time
spent inside its calls (timed from inside the run, so it is immune to load from other processes,
which makes whole-run ratios noisy on a shared machine).

    .venv/bin/python benchmarks/bench_hook.py --repeats 5 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time


def build_model(seed: int = 0):
    import torch
    import transformers as tr

    torch.manual_seed(seed)
    cfg = tr.T5Config(vocab_size=32128, d_model=512, d_ff=2048, d_kv=64, num_heads=8, num_layers=6,
                      num_decoder_layers=6, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
                      dropout_rate=0.0)
    model = tr.T5ForConditionalGeneration(cfg).eval()
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    model.generation_config.decoder_start_token_id = 0
    return model


def build_matrix(vocab: int = 32128, top: int = 8, seed: int = 0):
    """A random sparse order-1 TransitionMatrix over the whole vocabulary (``<eos>`` = token 1)."""
    import numpy as np
    import scipy.sparse as sp

    from repdiag.transition import TransitionMatrix

    rng = np.random.default_rng(seed)
    cols = rng.integers(2, vocab, size=(vocab, top))
    cols[:, 0] = 1  # the <eos> column is always stored
    vals = rng.dirichlet(np.ones(top), size=vocab) * 0.9
    A = sp.csr_matrix((vals.ravel(), (np.repeat(np.arange(vocab), top), cols.ravel())), shape=(vocab, vocab))
    A.sum_duplicates()
    residual = 1.0 - np.asarray(A.sum(axis=1)).ravel()
    A = A.tolil()
    A[1, :] = 0
    A[1, 1] = 1.0
    A = A.tocsr()
    residual[1] = 0.0
    return TransitionMatrix(matrix=A, residual=residual, eos_index=1, state_tokens=np.arange(vocab)[:, None],
                            meta={"builder": "bench_hook random", "vocab_size": vocab})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--source-len", type=int, default=32)
    ap.add_argument("--modes", default="greedy,beam4")
    args = ap.parse_args(argv)

    import torch

    from repdiag.hook import RepetitionMonitor

    class TimedMonitor(RepetitionMonitor):
        """The monitor, with the time spent inside its calls summed (for the 'own share' figure)."""

        spent = 0.0

        def __call__(self, input_ids, scores):
            t0 = time.perf_counter()
            out = super().__call__(input_ids, scores)
            self.spent += time.perf_counter() - t0
            return out

    torch.set_num_threads(args.threads)
    model = build_model()
    matrix = build_matrix()
    g = torch.Generator().manual_seed(1)
    src = torch.randint(2, 32000, (args.batch, args.source_len), generator=g)
    enc = {"input_ids": src, "attention_mask": torch.ones_like(src)}
    modes = {"greedy": dict(num_beams=1, do_sample=False), "beam4": dict(num_beams=4, do_sample=False)}

    def run(mode: str, variant: str) -> tuple[float, float, torch.Tensor, object]:
        kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, **modes[mode])
        mon = None
        if variant == "record":
            mon = TimedMonitor()
        elif variant == "record+matrix":
            mon = TimedMonitor(matrix=matrix)
        if mon is not None:
            kw.update(logits_processor=[mon], stopping_criteria=[mon])
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            out = model.generate(**enc, **kw)
        return time.perf_counter() - t0, time.process_time() - c0, out, mon

    variants = ["none", "record", "record+matrix"]
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"{args.new_tokens} new tokens, repeats {args.repeats}")
    for mode in args.modes.split(","):
        run(mode, "none")  # warm-up
        times: dict[str, list[float]] = {v: [] for v in variants}
        cpu: dict[str, list[float]] = {v: [] for v in variants}
        share: dict[str, list[float]] = {v: [] for v in variants}
        outs: dict[str, torch.Tensor] = {}
        report_s = 0.0
        for r in range(args.repeats):
            order = variants[r % 3:] + variants[: r % 3]
            for v in order:
                dt, dc, out, mon = run(mode, v)
                times[v].append(dt)
                cpu[v].append(dc)
                if mon is not None:
                    share[v].append(mon.spent / dt)
                outs[v] = out
                if mon is not None and r == 0:
                    t0 = time.perf_counter()
                    mon.report(out)
                    report_s = max(report_s, time.perf_counter() - t0)
        assert all(torch.equal(outs["none"], outs[v]) for v in variants), "record mode changed the tokens"
        assert outs["none"].shape[1] == args.new_tokens + 1
        print(f"\n{mode}: generate(), median of {args.repeats} runs")
        for label, series in (("wall", times), ("cpu", cpu)):
            base = statistics.median(series["none"])
            for v in variants:
                med = statistics.median(series[v])
                line = f"  {label:4s} {v:14s} {med:7.3f} s  ({min(series[v]):.3f}–{max(series[v]):.3f})"
                if v != "none":
                    paired = statistics.median(t / b for t, b in zip(series[v], series["none"]))
                    line += f"   overhead: medians {100 * (med / base - 1):+.1f} %, paired {100 * (paired - 1):+.1f} %"
                print(line)
        for v in variants[1:]:
            print(f"  monitor's own share of generate() [{v}]: median {100 * statistics.median(share[v]):.2f} % "
                  f"(max {100 * max(share[v]):.2f} %)")
        print(f"  report() after generation (not in the timings): {report_s * 1e3:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
