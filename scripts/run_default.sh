#!/usr/bin/env bash
# Install into ./.venv (created if missing) and run the default experiment end to end, offline:
# the whole RLHF pipeline (pre-train -> SFT -> preferences -> reward model -> PPO) on the
# embedded review task. Re-running resumes; finished stages are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
WORKDIR="${1:-runs/default}"
shift || true
.venv/bin/rlhf-jax pipeline --config=experiments/reviews/pipeline.py --workdir="$WORKDIR" "$@"
