#!/usr/bin/env bash
# Install into ./.venv (created if missing) and run the default experiment end to end, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e .
WORKDIR="${1:-runs/default}"
.venv/bin/rlhf-jax train --config=experiments/snack_bandit.py --workdir="$WORKDIR"
.venv/bin/rlhf-jax plot "$WORKDIR" --metric=reward_mean,bias,p_b_hunger_0,p_b_hunger_1 --out="$WORKDIR/curves.png"
echo "metrics: $WORKDIR/metrics.jsonl   curves: $WORKDIR/curves.png"
