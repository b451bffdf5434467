#!/usr/bin/env bash
# Does flexicli still pass its tiny test tier on the newest releases of the packages it follows most closely
# (torch, transformers, accelerate, huggingface-hub)? Everything else stays at requirements/lock.txt where it can.
# Run this before moving the lock's pins. Not run by CI: it downloads, and its answer changes with every release.
#
#   bash scripts/check_newest.sh            # extra arguments go to pytest, e.g. -x or -k fastpath
#   KEEP=1 bash scripts/check_newest.sh     # keep the throwaway venv (its path is printed)
#
# Which torch: $TORCH when set (a requirement such as 'torch==2.15.0', or a wheel file). Otherwise the newest torch
# pip finds; on a machine without nvidia-smi, PyTorch's CPU index ($TORCH_CPU_INDEX, default
# https://download.pytorch.org/whl/cpu) is searched too, so pip takes the +cpu build of the newest version instead
# of PyPI's multi-GB CUDA build. Set TORCH_CPU_INDEX= (empty) where only PyPI is reachable. pip's own configuration
# still applies: on the development machine /etc/xdg/pip caps torch at <=2.14.1, so "newest" there is 2.14.1.
#
# The newest releases are installed whatever flexicli's declared ranges say (that is what this finds out); `pip
# check` then reports any that fall outside pyproject.toml's ranges.
set -uo pipefail
cd "$(dirname "$0")/.."
LOCK=requirements/lock.txt
FLOAT="torch transformers accelerate huggingface-hub"
VENV=$(mktemp -d "${TMPDIR:-/tmp}/flexi-newest.XXXXXX")
[ -n "${KEEP:-}" ] || trap 'rm -rf "$VENV"' EXIT
echo "throwaway venv: $VENV"
python3 -m venv "$VENV" || exit 1
PY="$VENV/bin/python"
pip() { "$PY" -m pip -q "$@"; }

if [ -n "${TORCH:-}" ]; then
  pip install "$TORCH" || exit 1
elif command -v nvidia-smi >/dev/null 2>&1 || [ -z "${TORCH_CPU_INDEX-https://download.pytorch.org/whl/cpu}" ]; then
  pip install torch || exit 1
else
  pip install --extra-index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}" torch || exit 1
fi
TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null)  # (warns: no numpy yet)

# The lock without the floated packages, plus the torch just installed so that nothing replaces it.
CONS="$VENV/constraints.txt"
{ grep -v -i -E "^($(echo "$FLOAT" | tr ' ' '|' | sed 's/-/[-_]/g'))==" "$LOCK"; echo "torch==${TORCH_VERSION%%+*}"; } > "$CONS"
# flexicli's other requirements, by name, from pyproject.toml (dependencies and the test, plots and lm-eval extras).
OTHERS=$("$PY" - <<'EOF'
import re, tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = p["dependencies"] + sum((p["optional-dependencies"][x] for x in ("test", "plots", "lm-eval")), [])
names = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower() for r in reqs}
print(" ".join(sorted(names - {"torch", "transformers", "accelerate", "huggingface-hub"})))
EOF
)
if ! pip install -U -c "$CONS" transformers accelerate huggingface-hub $OTHERS; then
  echo "!! the newest releases do not install with the lock's other pins (above); trying without the lock" >&2
  pip install -U -c <(echo "torch==${TORCH_VERSION%%+*}") transformers accelerate huggingface-hub $OTHERS || exit 1
fi
pip install --no-deps -e . || exit 1

VERSIONS=$("$PY" - <<'EOF'
from importlib.metadata import version
print(", ".join(f"{n} {version(n)}" for n in ("torch", "transformers", "accelerate", "huggingface-hub")))
EOF
)
echo "trying: $VERSIONS"
"$PY" -m pip check || echo "!! pip check: the versions above fall outside a declared range"

LOG="$VENV/pytest.log"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PY" -m pytest tests -m "not real" -q -p no:cacheprovider -o addopts=-rfE "$@" \
  2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}
echo
echo "== check_newest: $VERSIONS"
if [ "$rc" -eq 0 ]; then
  echo "== tiny tier passed: $(tail -n 1 "$LOG")"
else
  echo "== tiny tier broke ($(tail -n 1 "$LOG")):"
  grep -E '^(FAILED|ERROR) ' "$LOG" | sed 's/^/   /'
fi
exit "$rc"
