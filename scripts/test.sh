#!/usr/bin/env bash
# Install into ./.venv (created if missing) with the test extra and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
exec .venv/bin/python -m pytest "$@"
