#!/usr/bin/env bash
# The issue's acceptance run: the default `flexi convert && flexi train --skip-target N` from an empty cache (data
# preparation included), timed, then `flexi eval` (its default verdict) and `flexi eval` on standard-library
# docstrings (text of another kind, never trained on). Run from an empty folder:
#   bash benchmarks/default_run.sh 4 runs/default4
# A third argument, a config file (flexi train --config), measures a setting against the default the same way;
# FLEXI_CONVERT_ARGS adds options to `flexi convert` (e.g. FLEXI_CONVERT_ARGS="--skip-unit module").
set -euo pipefail
N=${1:-4}; OUT=${2:-runs/default$N}; CONFIG=${3:+$(realpath "$3")}; REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"; cd "$OUT"
export FLEXI_CACHE=$PWD/cache  # empty: the data preparation is part of the timed run
t0=$(date +%s)
flexi convert -o ckpt --force ${FLEXI_CONVERT_ARGS:-} > convert.json 2> convert.err
flexi train -m ckpt --skip-target "$N" ${CONFIG:+--config "$CONFIG"} --json > train.json 2> train.err
t1=$(date +%s)
echo "convert+train wall seconds: $((t1 - t0))" | tee wall.txt
flexi eval -m ckpt --json > eval.json 2> eval.err || true  # a failed verdict exits non-zero; the JSON is the record
python "$REPO/benchmarks/stdlib_text.py" -o stdlib.txt > /dev/null
# the task suite does not depend on --data: it ran above
flexi eval -m ckpt --data stdlib.txt --no-save --tasks-per-category 0 --json > eval_stdlib.json 2> eval_stdlib.err || true
echo "commit: $(git -C "$REPO" rev-parse --short HEAD)" >> wall.txt
