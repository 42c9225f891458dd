"""Per-example gradient throughput: the batched (torch.func vmap) backend vs the loop backend, and vs Captum.

    .venv/bin/python benchmarks/bench_attribution.py [--n 64] [--repeats 3] [--no-captum] [--default-model]

Measures examples/second for the ``[B, P]`` per-example gradients that every attribution mode needs
(``repdiag.attribution.features.GradientComputer``), on a tiny HF T5 and GPT-2 (float32, built from configs)
and optionally on the bundled default model (1.44 M parameters, its own training pairs). If Captum is
installed, it also runs ``captum.influence.TracInCP`` on the tiny T5 with the final weights as its single
checkpoint (lr 1) and compares its scores with repdiag's final mode (the same quantity, Grad-Dot:
``∇(−m)·∇ℓ_i`` with m = the query's sequence log-likelihood) — agreement and speed ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from repdiag.attribution.data import collate  # noqa: E402
from repdiag.attribution.features import GradientComputer, ParamSpace  # noqa: E402
from repdiag.attribution.kernel import work_model  # noqa: E402
from repdiag.attribution.toy import encode_all, repeat_pairs  # noqa: E402


def _time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_backends(name, model, kind, examples, repeats, chunk=32):
    model = work_model(model)
    space = ParamSpace(model)
    loop = GradientComputer(space, kind, 0, "loop")
    vm = GradientComputer(space, kind, 0, "vmap", chunk=chunk)
    auto = GradientComputer(space, kind, 0, "auto", chunk=chunk)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = loop(examples)
        got = vm(examples)
        auto(examples)
        t_loop = _time(lambda: loop(examples), repeats)
        t_vm = _time(lambda: vm(examples), repeats)
    err = float((got - ref).abs().max() / ref.abs().max())
    n = len(examples)
    print(f"| {name} | {space.size:,} | {n} | {n / t_loop:.1f} | {n / t_vm:.1f} | {t_loop / t_vm:.2f}× | "
          f"{auto.backend} | {err:.1e} |")
    return t_loop / t_vm


def bench_captum(examples, tok, repeats):
    try:
        from captum.influence import TracInCP
    except ImportError:
        print("captum not installed: skipped (pip install captum==0.9.0)")
        return
    import tempfile

    from safetensors.torch import load_file, save_file

    from repdiag.attribution.kernel import tangent_kernel
    from repdiag.attribution.outputs import Query
    from tiny_models import build_tiny

    model, _ = build_tiny("t5", dtype=torch.float32)
    model.train(False)

    class Wrapped(torch.nn.Module):  # Captum calls model(*inputs) and needs a tensor out: wrap the HF model
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, decoder_input_ids):
            return self.m(input_ids=input_ids, decoder_input_ids=decoder_input_ids, use_cache=False).logits

    def per_example_nll(logits, labels):  # summed token NLL per example (reduction "none" over examples)
        lp = torch.log_softmax(logits, -1)
        return -lp.gather(-1, labels[..., None])[..., 0].sum(-1)

    per_example_nll.reduction = "none"
    wrapped = Wrapped(model)
    rows = []
    for e in examples:
        b = collate([e], 0)
        dec = model.prepare_decoder_input_ids_from_labels(labels=b["labels"])
        rows.append((b["input_ids"][0], dec[0], b["labels"][0]))
    ds = [(x, d, y) for x, d, y in rows]
    loader = torch.utils.data.DataLoader(ds, batch_size=1)
    ckpt = Path(tempfile.mkdtemp()) / "final.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in wrapped.named_parameters()}, str(ckpt))

    def load(m, path):
        m.load_state_dict(load_file(path), strict=False)
        return 1.0

    prompt = tok("copy a b")["input_ids"]
    y = tok(text_target="a b a b a b")["input_ids"]
    q = Query.build("seq2seq", prompt, y, decoder_start_token_id=0, names=("sequence",))
    qb = q.batch()
    test = (qb["input_ids"], qb["decoder_input_ids"], torch.tensor([list(q.generated_ids)]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracin = TracInCP(wrapped, loader, checkpoints=[str(ckpt)], checkpoints_load_func=load,
                          loss_fn=per_example_nll, batch_size=1, sample_wise_grads_per_batch=False)
        t_cap = _time(lambda: tracin.influence(test), repeats)
        cap = tracin.influence(test)[0].double()
        t_ours = _time(lambda: tangent_kernel(model, examples, q, kind="seq2seq", pad_token_id=0,
                                              measurement="sequence", backend="auto", dtype="float32"), repeats)
        ours = tangent_kernel(model, examples, q, kind="seq2seq", pad_token_id=0, measurement="sequence",
                              backend="auto", dtype="float32")
    ours_t = torch.tensor(ours.contributions)
    # repdiag: s_i = −∇m·∇ℓ_i = ∇(−m)·∇ℓ_i; Captum: ∇(test loss)·∇(train loss) with test loss = −m
    rel = float((cap - ours_t).abs().max() / ours_t.abs().max())
    from scipy.stats import spearmanr

    rho = spearmanr(cap.numpy(), ours_t.numpy()).statistic
    print(f"Captum TracInCP (final checkpoint, lr 1) vs repdiag final mode on tiny T5, {len(examples)} pairs: "
          f"max relative difference {rel:.1e}, Spearman {rho:.4f}; time Captum {t_cap:.2f} s, repdiag "
          f"{t_ours:.2f} s ({t_cap / t_ours:.2f}× faster)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-captum", action="store_true")
    ap.add_argument("--default-model", action="store_true", help="also the bundled default model (slow)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from tiny_models import build_tiny

    print(f"torch {torch.__version__}, 1 thread\n")
    print("| model | parameters | examples | loop ex/s | batched ex/s | speed-up | `auto` picks | max rel diff |")
    print("|---|---|---|---|---|---|---|---|")
    t5, tok = build_tiny("t5", dtype=torch.float32)
    ex = encode_all(tok, "seq2seq", repeat_pairs(args.n, seed=0))
    bench_backends("tiny T5 (seq2seq)", t5, "seq2seq", ex, args.repeats)
    gpt, gtok = build_tiny("gpt2", dtype=torch.float32)
    gex = encode_all(gtok, "causal", repeat_pairs(args.n, seed=0))
    bench_backends("tiny GPT-2 (causal)", gpt, "causal", gex, args.repeats)
    if args.default_model:
        import gzip
        import json

        from repdiag.attribution.data import encode_pair
        from repdiag.models import load_model

        lm = load_model("default")
        path = ROOT / "repdiag" / "default_model" / "train.jsonl.gz"
        if not path.is_file():
            path = path.with_name("heldout.jsonl.gz")
        if path.is_file():
            lines = gzip.open(path, "rt", encoding="utf-8").read().splitlines()[: args.n]
            pairs = [json.loads(x) for x in lines]
        else:
            pairs = [{"source": p.source, "target": p.target} for p in repeat_pairs(args.n, seed=0)]
        dex = [encode_pair(lm.tokenizer, "seq2seq", p["source"][:400], p["target"]) for p in pairs]
        bench_backends("default model (T5, 1.44 M)", lm.model, "seq2seq", dex, 1)
    print()
    if not args.no_captum:
        bench_captum(ex, tok, args.repeats)


if __name__ == "__main__":
    main()
