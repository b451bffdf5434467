#!/usr/bin/env bash
# Sets up ./.venv and runs the whole test suite: the tiny-model tier and the real SmolLM2 tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest tests -q --durations=15 "$@"  # the 15 slowest: where CI time goes
