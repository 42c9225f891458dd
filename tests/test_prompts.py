"""Prompt files, defaults and the seeded trace/measure split."""

from __future__ import annotations

import pytest

from repdiag.errors import BadInputError, UsageError
from repdiag.prompts import builtin_prompts, load_prompts, split_prompts


def test_plain_text_one_prompt_a_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first prompt\n\n  second prompt \n")
    prompts = load_prompts(path)
    assert prompts.prompts == ("first prompt", "second prompt")
    assert not prompts.has_references


def test_jsonl_with_references(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a b", "reference": "b a"}\n{"prompt": "c"}\n')
    prompts = load_prompts(path)
    assert prompts.prompts == ("a b", "c")
    assert prompts.references == ("b a", None)
    assert prompts.take(1).prompts == ("a b",)


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(BadInputError, match="line 2"):
        load_prompts(path)


def test_missing_prompt_field_names_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"text": "no"}\n')
    with pytest.raises(BadInputError, match="line 2.*'prompt'"):
        load_prompts(path)


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("\n\n")
    with pytest.raises(BadInputError, match="no prompt"):
        load_prompts(path)


def test_split_is_disjoint_seeded_and_complete():
    split = split_prompts(24, seed=3)
    assert set(split.trace).isdisjoint(split.measure)
    assert sorted(split.trace + split.measure) == list(range(24))
    assert len(split.trace) == 12
    assert split_prompts(24, seed=3) == split
    assert split_prompts(24, seed=4).trace != split.trace
    assert "default_rng(3)" in split.rule


def test_split_needs_two_prompts():
    with pytest.raises(UsageError):
        split_prompts(1, seed=0)


def test_builtin_set_and_take():
    prompts = builtin_prompts()
    assert len(prompts) >= 20
    with pytest.raises(UsageError):
        prompts.take(0)


def test_default_model_input_format():
    from repdiag.prompts import default_model_input, name_words

    assert name_words("_BaseV4._ip_int_from_string") == "base v 4 ip int from string"
    assert name_words("outer.<locals>.inner") == "outer inner"
    assert default_model_input("TestCase.doCleanups", "def f(): pass") == "test case do cleanups: def f(): pass"


def test_bundled_model_prompts_are_its_heldout_inputs():
    from repdiag.models import DEFAULT_MODEL_DIR
    from repdiag.prompts import default_model_prompts

    prompts = default_model_prompts(DEFAULT_MODEL_DIR)
    assert prompts is not None and len(prompts) > 400
    assert prompts.has_references
    assert ": def " in prompts.prompts[0]
