"""`repdiag analyze` on a 268M-parameter causal LM with a 262,144-token vocabulary (issue 4's scale goal).

No model of that size can be downloaded here, so this builds one with the dimensions of Gemma 3 270M
(``Gemma3ForCausalLM``: hidden 640, 18 layers, 4 heads / 1 KV head of dim 256, MLP 2,048, vocabulary
262,144, tied embeddings: 268,098,176 parameters) and random weights, saves it to a temporary folder
with ``save_pretrained`` and runs the real CLI on it, as a user would on a hub download. Random
weights give near-uniform next-token distributions, the worst case for the truncated storage and the
probe; ``--logit-scale`` multiplies the final norm so that the rows are peaked as a trained model's
are (the default 10 gives a mean top-1 probability of 0.32 on a few built-in prompts).

The tokenizer is the bundled model's byte-level BPE (4,096 entries) with extra entries ``<x_N>`` up
to 262,144 ids: the prompts tokenize to real sub-words and every id decodes.

Prints the wall time of the whole command, each stage's time from ``timings.json``, the rows traced and
probed, and how the simulation sampled (``prediction.simulation_vocabulary``). Then, in the same run,
the yardstick: one plain greedy ``generate()`` of the same size (as many prompts as ``analyze``
measures on, ``--max-new-tokens`` tokens each) with the same torch threads, and ``analyze``'s wall
time in units of it. ``analyze`` runs at least eight such batches (two trace modes, six mitigations),
so about 8 is the floor; the ratio, unlike the seconds, carries over between machines and loads.

    .venv/bin/python benchmarks/bench_large_vocab.py --prompts 12 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VOCAB = 262_144


def build_tokenizer(folder: Path) -> None:
    """The bundled byte-level BPE, extended to ``VOCAB`` ids, without the ``</s>`` suffix of seq2seq inputs."""
    from transformers import PreTrainedTokenizerFast

    spec = json.loads((REPO / "repdiag" / "default_model" / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<x_{i}>": i for i in range(len(vocab), VOCAB)})
    spec["post_processor"] = None
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), eos_token="</s>",
                                  pad_token="<pad>", unk_token="<unk>")
    tok.save_pretrained(folder)


def build_model(folder: Path, logit_scale: float, seed: int):
    """Random Gemma-3-270M-shaped causal LM, saved to ``folder`` and returned."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                              max_position_embeddings=2048, sliding_window=512, pad_token_id=0, eos_token_id=1,
                              bos_token_id=None, tie_word_embeddings=True)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # Gemma's RMSNorm multiplies by (1 + weight)
        model.model.norm.weight.fill_(logit_scale - 1.0)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    model.save_pretrained(folder)
    return model


def mean_top1(model, folder: Path) -> float:
    """Mean top-1 next-token probability over the positions of a few built-in prompts."""
    import torch
    from transformers import AutoTokenizer

    from repdiag.prompts import BUILTIN_PROMPTS

    tok = AutoTokenizer.from_pretrained(folder)
    enc = tok(list(BUILTIN_PROMPTS[:4]), return_tensors="pt", padding=True)
    with torch.inference_mode():
        probs = torch.softmax(model(**enc).logits.float(), dim=-1)
    top1 = probs.max(dim=-1).values
    return float(top1[enc["attention_mask"].bool()].mean())


def plain_generate_seconds(folder: Path, n_prompts: int, max_new_tokens: int) -> float:
    """Wall time of one greedy ``generate()`` of ``n_prompts`` built-in prompts × ``max_new_tokens`` tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from repdiag.prompts import BUILTIN_PROMPTS

    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    enc = tok(list(BUILTIN_PROMPTS[:n_prompts]), return_tensors="pt", padding=True)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                       pad_token_id=0)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--logit-scale", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="build the model here (or reuse it when this folder already holds one) instead of a temporary folder")
    ap.add_argument("--extra", default="", help="more analyze options, e.g. '--mitigations greedy,top_p_0.9'")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model_dir or Path(tmp) / "gemma3-shaped"
        if not (folder / "config.json").exists():
            folder.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            model = build_model(folder, args.logit_scale, args.seed)
            build_tokenizer(folder)
            n_params = sum(p.numel() for p in model.parameters())
            print(f"model: {n_params:,} parameters, vocabulary {VOCAB:,}; built and saved in "
                  f"{time.perf_counter() - t0:.1f} s; mean top-1 probability {mean_top1(model, folder):.3f}")
            del model
        out = Path(tmp) / "report"
        cmd = [str(Path(sys.executable).parent / "repdiag"), "analyze", str(folder),
               "--n-prompts", str(args.prompts), "--max-new-tokens", str(args.max_new_tokens),
               "--out", str(out), *args.extra.split()]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-4000:])
            raise SystemExit(f"analyze failed with exit {proc.returncode}")
        timings = json.loads((out / "timings.json").read_text())
        report = json.loads((out / "report.json").read_text())
        print(f"repdiag analyze: {wall:.1f} s wall ({' '.join(cmd[2:])})")
        for stage, seconds in timings["seconds"].items():
            if isinstance(seconds, (int, float)):
                print(f"  {stage:<20} {seconds:7.1f} s")
        cov = report["matrix"]["coverage"]
        print(f"matrix: {report['matrix']['n_states']:,} states, {cov['n_visited']:,} traced, "
              f"{cov['n_probed']:,} probed, mass on visited rows {cov['mass_visited']:.3f}")
        print("reached rows:", json.dumps(report["matrix"]["reached_rows"]))
        print("simulation vocabulary:", json.dumps(report["prediction"]["simulation_vocabulary"]))
        print("prediction spearman:", json.dumps(report["prediction"]["spearman"]))
        n_measure = report["prompts"]["n_measure"]
        plain = plain_generate_seconds(folder, n_measure, args.max_new_tokens)
        print(f"yardstick: one plain greedy generate() of {n_measure} prompts × {args.max_new_tokens} tokens "
              f"took {plain:.1f} s; analyze took {wall / plain:.1f}× that")


if __name__ == "__main__":
    main()
