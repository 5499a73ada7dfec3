#!/usr/bin/env bash
# Install the project into ./.venv (created if missing): `bash scripts/install.sh [extra]`,
# e.g. `test` or `torch`. $PYTHON picks the interpreter (default python3.11, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".${1:+[$1]}"
