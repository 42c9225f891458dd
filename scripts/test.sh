#!/usr/bin/env bash
# Command two of the README (and what .ci/run runs): install repdiag with its test extras into .venv
# (torch pinned to the CPU build 2.13.0) and run the whole test suite with pytest.
# pytest exits 5 when it collects no test, so an empty suite fails too.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]"
exec .venv/bin/python -m pytest "$@"
