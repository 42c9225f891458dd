#!/usr/bin/env bash
# Command one of the README: install repdiag (torch pinned to the CPU build 2.13.0) into .venv and
# run `repdiag analyze` on the bundled default model, writing the report into ./repdiag-report/.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/pip install --quiet --disable-pip-version-check -e .
exec .venv/bin/repdiag analyze --out repdiag-report "$@"
