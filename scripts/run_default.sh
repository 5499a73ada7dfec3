#!/usr/bin/env bash
# Install into ./.venv (created if missing) and run the default experiment end to end, offline:
# the whole RLHF pipeline (pre-train -> SFT -> preferences -> reward model -> PPO) on the
# embedded review task. Re-running resumes; finished stages are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e .
WORKDIR="${1:-runs/default}"
shift || true
.venv/bin/rlhf-jax pipeline --config=experiments/reviews/pipeline.py --workdir="$WORKDIR" "$@"
