#!/usr/bin/env bash
# Sets up ./.venv and runs the pipeline on the embedded SmolLM2-135M-Instruct, in ./demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
mkdir -p demo && cd demo
flexi convert --force
