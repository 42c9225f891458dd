"""`repdiag analyze` end to end on tiny models saved to folders (the real loading code), and its refusals."""

from __future__ import annotations

import json
import time

import pytest

from repdiag.cli import main
from repdiag.report import validate_report_dict

from tiny_models import TINYSTORIES, require_tinystories, save_tiny

FAST = ["--n-prompts", "6", "--max-new-tokens", "8", "--n-trajectories", "16",
        "--mitigations", "greedy,temperature_0.7,repetition_penalty_1.2,no_repeat_ngram_3", "--quiet"]


def run_analyze(tmp_path, model: str, *extra: str) -> tuple[int, dict | None]:
    out = tmp_path / "report"
    code = main(["analyze", model, "--out", str(out), *FAST, *extra])
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else None
    if report is not None:
        validate_report_dict(report)  # every report the suite produces passes the JSON Schema
    return code, report


@pytest.mark.parametrize("arch", ["t5", "bart", "marian", "pegasus", "gpt2", "llama"])
def test_analyze_tiny_models(tmp_path, arch):
    folder = save_tiny(arch, tmp_path / arch)
    code, report = run_analyze(tmp_path, str(folder))
    assert code == 0
    assert report["model"]["kind"] == ("causal" if arch in ("gpt2", "llama") else "seq2seq")
    assert set(report["measured"]) == {"greedy", "temperature_0.7", "repetition_penalty_1.2", "no_repeat_ngram_3"}
    for policy, values in report["measured"].items():
        assert 0.0 <= values["rep_w16"] <= 1.0
        assert 0.0 <= values["nonterminated"] <= 1.0
    # the trace and measurement prompts never overlap
    prompts = report["prompts"]
    assert set(prompts["trace_indices"]).isdisjoint(prompts["measure_indices"])
    assert prompts["n_trace"] + prompts["n_measure"] == 6
    # every simulated policy has a prediction, and the correlation block names how many policies it used
    assert set(report["predicted"]) == set(report["measured"])
    assert report["prediction"]["spearman"]["rep_w16"]["n_policies"] == 4
    assert (tmp_path / "report" / "timings.json").exists()


def test_report_holds_the_numbers_the_table_shows(tmp_path, capsys):
    folder = save_tiny("t5", tmp_path / "t5")
    code, report = run_analyze(tmp_path, str(folder))
    assert code == 0
    shown = capsys.readouterr().out
    greedy = report["measured"]["greedy"]
    assert f"{greedy['rep_w16']:.2f}" in shown
    assert f"{report['measured']['temperature_0.7']['seq_rep_4']:.2f}" in shown
    rho = report["prediction"]["spearman"]["rep_w16"]["rho"]
    assert (f"{rho:.3f}" if rho is not None else "—") in shown


def test_same_inputs_give_the_same_report_bytes(tmp_path):
    folder = save_tiny("gpt2", tmp_path / "gpt2")
    first = tmp_path / "a"
    second = tmp_path / "b"
    assert main(["analyze", str(folder), "--out", str(first), *FAST]) == 0
    assert main(["analyze", str(folder), "--out", str(second), *FAST]) == 0
    assert (first / "report.json").read_bytes() == (second / "report.json").read_bytes()


def test_real_tinystories_model(tmp_path):
    require_tinystories()
    code, report = run_analyze(tmp_path, str(TINYSTORIES), "--max-new-tokens", "40")
    assert code == 0
    assert report["model"]["architecture"] == "LlamaForCausalLM"
    # greedy decoding of this model really loops: the measured greedy repetition is high
    assert report["measured"]["greedy"]["rep_w16"] > report["measured"]["temperature_0.7"]["rep_w16"]
    # the rows the simulation reached were probed, no more: every simulated step read a built row
    matrix = report["matrix"]
    reached = matrix["reached_rows"]
    assert 0 < reached["probed"] == matrix["coverage"]["n_probed"] < 512 - matrix["coverage"]["n_visited"]
    assert all(share == 0.0 for share in reached["missing_step_share"].values())
    assert 0 < matrix["coverage_rows"] <= 1 and 0 < matrix["coverage_mass"] <= 1
    assert report["prediction"]["simulation_vocabulary"] == {"mode": "full", "columns": 512, "vocab_size": 512}


def test_bert_folder_is_refused_as_encoder_only(tmp_path, capsys):
    folder = save_tiny("bert", tmp_path / "bert")
    code, _ = run_analyze(tmp_path, str(folder))
    assert code == 2
    err = capsys.readouterr().err
    assert "encoder-only" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("model", ["/no/such/folder", "google/flan-t5-small"])
def test_missing_model_exits_2_fast(tmp_path, capsys, model):
    start = time.perf_counter()
    code, _ = run_analyze(tmp_path, model)
    assert code == 2
    assert time.perf_counter() - start < 5
    assert capsys.readouterr().err.startswith("error:")


def test_bad_prompts_file_exits_2(tmp_path, capsys):
    folder = save_tiny("t5", tmp_path / "t5")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a b"}\n{oops\n')
    code, _ = run_analyze(tmp_path, str(folder), "--prompts", str(prompts))
    assert code == 2
    assert "line 2" in capsys.readouterr().err


def test_unknown_mitigation_exits_2(tmp_path, capsys):
    folder = save_tiny("t5", tmp_path / "t5")
    code = main(["analyze", str(folder), "--out", str(tmp_path / "r"), "--mitigations", "nonsense"])
    assert code == 2
    assert "nonsense" in capsys.readouterr().err


def test_baseline_compare_at_the_end(tmp_path):
    folder = save_tiny("gpt2", tmp_path / "gpt2")
    code, _ = run_analyze(tmp_path, str(folder))
    assert code == 0
    baseline = tmp_path / "baseline.json"
    baseline.write_bytes((tmp_path / "report" / "report.json").read_bytes())
    same = main(["analyze", str(folder), "--out", str(tmp_path / "again"), *FAST, "--baseline", str(baseline),
                 "--fail-on", "rep_w16:+0.01"])
    assert same == 0


@pytest.mark.parametrize("mitigations, needle", [
    ("temperature=-1,do_sample=true", "temperature"),
    ("top_p=1.5,do_sample=true", "top_p"),
])
def test_parameter_out_of_range_exits_2(tmp_path, capsys, mitigations, needle):
    folder = save_tiny("t5", tmp_path / "t5")
    code = main(["analyze", str(folder), "--out", str(tmp_path / "r"), "--mitigations", mitigations])
    assert code == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_empty_prompts_file_exits_2(tmp_path, capsys):
    folder = save_tiny("t5", tmp_path / "t5")
    prompts = tmp_path / "empty.txt"
    prompts.write_text("\n")
    assert main(["analyze", str(folder), "--out", str(tmp_path / "r"), "--prompts", str(prompts)]) == 2
    assert "no prompt" in capsys.readouterr().err


def test_all_mitigations(tmp_path):
    folder = save_tiny("gpt2", tmp_path / "gpt2")
    out = tmp_path / "all"
    args = [a for a in FAST if a not in ("--mitigations", "greedy,temperature_0.7,repetition_penalty_1.2,no_repeat_ngram_3")]
    assert main(["analyze", str(folder), "--out", str(out), *args, "--mitigations", "all"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert {"greedy", "beam4", "contrastive", "top_k_10", "eos_boost"} <= set(report["measured"])
    assert "rebalanced_encoding" not in report["measured"]  # prediction only: no generate() run
    assert {"beam4", "contrastive"} <= set(report["prediction"]["not_simulated"])


def test_stages_are_logged_one_line_each_when_stderr_is_not_a_terminal(tmp_path, capsys):
    folder = save_tiny("gpt2", tmp_path / "gpt2")
    args = [a for a in FAST if a != "--quiet"]
    assert main(["analyze", str(folder), "--out", str(tmp_path / "r"), "--no-attribution", *args]) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("[")]
    stages = [ln.split("] ", 1)[1] for ln in lines]
    assert stages[0] == "loading the model" and "simulating the chain under each policy" in stages
    seconds = [float(ln[1:].split(" s]")[0]) for ln in lines]
    assert seconds == sorted(seconds)


@pytest.mark.parametrize("arch", ["t5", "gpt2"])
def test_large_vocabulary_simulation_mode(tmp_path, monkeypatch, arch):
    """Above FULL_VOCABULARY_MAX tokens the simulation samples the chain's stored entries only."""
    import repdiag.simulate as sim

    monkeypatch.setattr(sim, "FULL_VOCABULARY_MAX", 10)  # the tiny models' 32 tokens count as "large"
    folder = save_tiny(arch, tmp_path / arch)
    code, report = run_analyze(tmp_path, str(folder), "--top-k", "6")
    assert code == 0
    vocab = report["prediction"]["simulation_vocabulary"]
    assert vocab["mode"] == "stored entries" and vocab["columns"] <= vocab["vocab_size"] == 32
    assert 0.0 <= vocab["residual_left_out_mean"] < 1.0
    for values in report["predicted"].values():
        assert 0.0 <= values["rep_w16"] <= 1.0 and 0.0 <= values["nonterminated"] <= 1.0
