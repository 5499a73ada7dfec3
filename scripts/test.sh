#!/usr/bin/env bash
# Install into ./.venv (created if missing) with the test extra and run the whole test suite.
# The browser test (tests/test_serve_browser.py) drives Debian's headless Chromium: install it
# when missing (as root, or through sudo), so CI runs that test instead of skipping it.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  if command -v apt-get >/dev/null; then
    echo "installing chromium and chromium-driver for the browser test" >&2
    $SUDO apt-get update -q >/dev/null && $SUDO env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null \
      || echo "could not install chromium (the browser test will be skipped)" >&2
  else
    echo "no apt-get: install chromium and chromedriver yourself, or the browser test is skipped" >&2
  fi
fi
bash scripts/install.sh test
# Two pytest-xdist workers unless the command line says otherwise (-n 0: one process); each
# test file stays on one worker (a module fixture that trains for minutes is made once).
case " $* " in
  *" -n"*|*" --numprocesses"*) ;;
  *) set -- -n "${RLHF_JAX_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@" ;;
esac
exec .venv/bin/python -m pytest "$@"
