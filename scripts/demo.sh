#!/usr/bin/env bash
# Sets up ./.venv and runs the whole pipeline on the embedded SmolLM2-135M-Instruct, in ./demo.
# A short run: about 25 minutes on a 2-core CPU (24.9 min from a clean clone and an empty cache at 6e8125b, pip's
# download cache warm; the first run also generates the built-in training data: 4.6 of its 22 training minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
mkdir -p demo && cd demo
flexi convert --force
flexi train --skip-target 4 --steps 40 --seq-len 128 --eval-every 20 --save-every 20
flexi eval --max-samples 8 --prompts 4 --tasks-per-category 1 || true   # a 40-step model may fail the verdict
flexi generate --show-layers --max-new-tokens 40 "Repeat this sentence exactly: the cat sat on the mat."
flexi patterns --force --per-category 1 --max-new-tokens 24 -o patterns
flexi push --dry-run --force
flexi bench --skip 8 --repeats 3
