#!/usr/bin/env bash
# README's test command: install everything (idempotent, Horovod included) and run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/install.sh
export PATH="$PWD/.venv/bin:$PATH"   # horovodrun for the multi-process tests
# pytest's entry script (not `python -m pytest`) so the installed package is tested, not ./hvd_compress.
exec .venv/bin/pytest "$@"
