#!/usr/bin/env bash
# Regenerates the README's figures for `flexi generate --show-layers` and `flexi patterns` from a checkpoint.
#   bash docs/make_figures.sh /work/ckpts/skip4 [--threshold T]    (extra arguments go to both verbs)
# Needs chromium (Debian package) for the screenshots. One thread: on a shared 2-core machine it is ~5x faster.
set -euo pipefail
CKPT=${1:?usage: make_figures.sh CHECKPOINT_DIR [--threshold T]}
shift
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1 PYTHONPATH=${PYTHONPATH:-$PWD}
PY=${PYTHON:-python}
PROMPT=${PROMPT:-"Repeat this sentence exactly, and nothing else: The quick brown fox jumps over the lazy dog."}
OUT=${PATTERNS_OUT:-/tmp/flexi-patterns-docs}
shot() { chromium --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
           --no-first-run --hide-scrollbars --screenshot="$1" --window-size="$2" "file://$3" 2>/dev/null; }

# 1. --show-layers as text (no colours in a pipe: each token carries its layer count) and as a picture.
$PY -m flexicli generate -m "$CKPT" --show-layers --compare --max-new-tokens 48 "$@" "$PROMPT" > docs/generate-show-layers.txt
FORCE_COLOR=1 COLORTERM=truecolor $PY -m flexicli generate -m "$CKPT" --show-layers --compare --max-new-tokens 48 \
    "$@" "$PROMPT" | $PY docs/terminal_svg.py 110 > /tmp/flexi-show-layers.svg
read -r W H < <(sed -n 's/.*viewBox="0 0 \([0-9.]*\) \([0-9.]*\)".*/\1 \2/p' /tmp/flexi-show-layers.svg | head -1)
shot docs/generate-show-layers.png "${W%.*},${H%.*}" /tmp/flexi-show-layers.svg

# 2. flexi patterns on the built-in categories; its figures and a screenshot of its HTML report.
$PY -m flexicli patterns -m "$CKPT" -o "$OUT" --per-category 3 --max-new-tokens 32 --force "$@" | tee docs/patterns-summary.txt
cp "$OUT/layer_usage.png" docs/patterns-layer-usage.png
cp "$OUT/category_layers.png" docs/patterns-categories.png
shot docs/patterns-report.png 1100,1500 "$OUT/report.html"
