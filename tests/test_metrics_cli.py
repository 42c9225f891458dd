"""``repdiag metrics FILE``: JSON keys of spec §9.7, table output, bad input → exit 2 naming the line."""

from __future__ import annotations

import json

import pytest

from repdiag.cli import main
from repdiag.errors import BadInputError
from repdiag.metrics import compute_metrics, score_file


def _write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_json_output_keys(tmp_path, capsys):
    p = _write(tmp_path, "gen.jsonl", [
        json.dumps({"tokens": ["a", "b", "a", "b", "a", "."], "terminated": False}),
        json.dumps({"tokens": ["c", "d", "."], "terminated": True}),
    ])
    assert main(["metrics", str(p), "--format", "json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"unit", "n_sequences", "metrics"}
    assert out["unit"] == "token" and out["n_sequences"] == 2
    m = out["metrics"]
    for key in ("rep_w16", "rep_r", "seq_rep_pooled_1_4", "seq_rep_1", "seq_rep_2", "seq_rep_3", "seq_rep_4",
                "seq_rep_4_excluded", "uniq_seq", "simctg_rep_2", "simctg_rep_3", "simctg_rep_4",
                "simctg_diversity", "simctg_rep_2_code_quirk", "simctg_diversity_code_quirk", "rep_sen",
                "rep_sen_ditto_code", "loop_onset", "length", "nonterminated"):
        assert key in m, key
    assert m["nonterminated"] == 0.5
    ref = compute_metrics([["a", "b", "a", "b", "a", "."], ["c", "d", "."]], terminated=[False, True])
    assert m["rep_w16"] == pytest.approx(ref["rep_w16"])
    assert m["simctg_rep_2"] == pytest.approx(ref["simctg_rep_2"])


def test_teacher_forced_and_xu22_fields(tmp_path, capsys):
    p = _write(tmp_path, "tf.jsonl", [
        json.dumps({"tokens": [1, 2, 3], "gold": [1, 2, 1, 3], "pred": [2, 1, 1, 4],
                    "probs": [[0.5, 0.2], [0.6, 0.1], [0.7, 0.3]], "is_argmax": [[1, 0], [1, 0], [0, 1]]}),
    ])
    assert main(["metrics", str(p), "--format", "json"]) == 0
    m = json.loads(capsys.readouterr().out)["metrics"]
    assert m["rep_l16"] == pytest.approx(0.5) and m["wrep_l16"] == pytest.approx(0.25)
    assert m["acc"] == pytest.approx(0.25) and m["uniq"] == 3
    assert m["TP"] == pytest.approx([0.35, 0.5]) and m["WR"] == pytest.approx([0.5, 0.5])


def test_plain_text_is_words_and_table(tmp_path, capsys):
    p = _write(tmp_path, "gen.txt", ["the cat the cat the cat .", "", "a dog ."])
    assert main(["metrics", str(p)]) == 0
    out = capsys.readouterr().out
    assert "rep_w16" in out and "unit: word" in out
    res = score_file(p)
    assert res["unit"] == "word" and res["n_sequences"] == 2
    assert res["metrics"]["loop_onset"] == 0.0


def test_word_unit_on_text_jsonl(tmp_path):
    p = _write(tmp_path, "t.jsonl", [json.dumps({"text": "x y x y x"})])
    res = score_file(p)
    assert res["unit"] == "word" and res["metrics"]["length"] == 5.0
    assert score_file(p, unit="word")["metrics"] == res["metrics"]
    with pytest.raises(BadInputError):
        score_file(p, unit="token")  # text needs a tokenizer for model tokens


@pytest.mark.parametrize("bad, needle", [
    ('{"tokens": ["a"]}\n{"tokens": [1, 2}\n', "line 2"),
    ('{"tokens": ["a"]}\n\n{"txt": "a"}\n', "line 3"),
    ('{"tokens": "abc"}\n', "line 1"),
    ('{"tokens": ["a"], "gold": [1]}\n', "line 1"),
    ('[1, 2]\n', "line 1"),
])
def test_bad_jsonl_line_exit_2(tmp_path, capsys, bad, needle):
    p = tmp_path / "bad.jsonl"
    p.write_text(bad, encoding="utf-8")
    assert main(["metrics", str(p), "--format", "json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert needle in " ".join(captured.err.split())
    with pytest.raises(BadInputError, match=needle):
        score_file(p)


def test_missing_and_empty_file(tmp_path, capsys):
    assert main(["metrics", str(tmp_path / "nope.jsonl")]) == 2
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    assert main(["metrics", str(empty)]) == 2
    assert main(["metrics", str(empty), "--unit", "char"]) == 2


def test_model_tokenizer_splits_text(tmp_path, capsys):
    from tiny_models import save_tiny

    folder = save_tiny("t5", tmp_path / "tiny")
    p = _write(tmp_path, "t.jsonl", [json.dumps({"text": "a b a b a"}), json.dumps({"text": "c d"})])
    assert main(["metrics", str(p), "--format", "json", "--model", str(folder)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["unit"] == "token" and out["metrics"]["length"] == 3.5
    assert out["metrics"]["loop_onset"] == 0.0
    assert main(["metrics", str(p), "--format", "json", "--model", str(folder), "--unit", "word"]) == 0
    assert json.loads(capsys.readouterr().out)["unit"] == "word"
