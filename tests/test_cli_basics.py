"""The CLI shell: lazy imports, --version, env, exit codes and atomic writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from repdiag import __version__
from repdiag._atomic import atomic_path, dumps_json, write_json
from repdiag.cli import app, main
from repdiag.errors import BadInputError


def test_import_cli_does_not_import_torch():
    code = "import sys, repdiag.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"repdiag {__version__}"


def test_env_json(capsys):
    assert main(["env", "--format", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["versions"]["repdiag"] == __version__
    assert info["default_model"]["path"].endswith("default_model")
    assert info["offline"]["HF_HUB_OFFLINE"] == "1"


def test_exit_codes_of_the_guard(capsys):
    @app.command(name="_raise_bad", hidden=True)
    def _raise_bad() -> None:
        raise BadInputError("the file is bad: fix it")

    @app.command(name="_raise_bug", hidden=True)
    def _raise_bug() -> None:
        raise ZeroDivisionError("boom")

    try:
        assert main(["_raise_bad"]) == 2
        assert capsys.readouterr().err.strip() == "error: the file is bad: fix it"
        assert main(["_raise_bug"]) == 3
        assert "--debug" in capsys.readouterr().err
    finally:
        app.registered_commands[:] = [c for c in app.registered_commands if c.name not in ("_raise_bad", "_raise_bug")]


def test_unknown_option_is_a_usage_error(capsys):
    assert main(["env", "--no-such-flag"]) == 2


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "report.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_json_is_deterministic_and_uses_inf_strings():
    text = dumps_json({"b": float("inf"), "a": [1.0, float("-inf")]})
    assert text == dumps_json({"a": [1.0, float("-inf")], "b": float("inf")})
    assert json.loads(text) == {"a": [1.0, "-inf"], "b": "inf"}


@pytest.mark.skipif(os.environ.get("CI", "").lower() != "true",
                    reason="checked in CI only (CI=true): a developer may run another torch")
def test_ci_keeps_the_pinned_cpu_torch():
    """CI installs torch==2.13.0 first; no extra (ray, accelerate, playwright) may pull another build."""
    import torch

    assert torch.__version__.split("+")[0] == "2.13.0"


def test_every_public_name_resolves():
    import repdiag

    for name in repdiag.__all__:
        assert getattr(repdiag, name) is not None


@pytest.mark.parametrize("command", [["analyze"], ["matrix", "build"], ["attribute"]])
def test_help_keeps_the_extra_name_in_brackets(command, capsys, monkeypatch):
    """Rich markup would eat "[ray]" from "repdiag[ray]": the help must still name the install."""
    monkeypatch.setenv("COLUMNS", "300")
    assert main([*command, "--help"]) == 0
    assert "repdiag[ray]" in capsys.readouterr().out
