#!/usr/bin/env bash
# One row of the skip-unit comparison (issue #16): convert with a skip unit and router, train with the defaults at
# a budget of N layer-equivalents for STEPS steps, then `flexi eval` (its default verdict) and `flexi bench`
# (CPU prefill/decode ratios against the original, same run). Run from an empty folder:
#   bash benchmarks/units_run.sh module flexidepth 4 60 runs/u_module_4
# FLEXI_TRAIN_ARGS adds options to `flexi train` (e.g. FLEXI_TRAIN_ARGS="--budget density": the seed paper's regulariser).
set -euo pipefail
UNIT=${1:?skip unit}; ROUTER=${2:?router}; N=${3:?budget}; STEPS=${4:?steps}; OUT=${5:?output folder}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"; cd "$OUT"
t0=$(date +%s)
flexi convert -o ckpt --skip-unit "$UNIT" --router "$ROUTER" --force > convert.json 2> convert.err
flexi train -m ckpt --skip-target "$N" --steps "$STEPS" --eval-every "$STEPS" --save-every "$STEPS" --json \
  ${FLEXI_TRAIN_ARGS:-} > train.json 2> train.err
t1=$(date +%s)
echo "convert+train wall seconds: $((t1 - t0))" | tee wall.txt
flexi eval -m ckpt --json > eval.json 2> eval.err || true  # a failed verdict exits non-zero; the JSON is the record
flexi bench -m ckpt --skip "$N" --json > bench.json 2> bench.err
echo "commit: $(git -C "$REPO" rev-parse --short HEAD)" >> wall.txt
