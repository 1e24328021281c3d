#!/usr/bin/env bash
# Create .venv and install ssmlm with its test extras (idempotent). torch 2.13.0 is installed first so that
# pip does not pull a CUDA build on a CPU machine; a torch you already have (e.g. a CUDA build) is kept.
# SSMLM_VENV=<dir> and SSMLM_INSTALL=<a wheel or requirement> (instead of the editable checkout with its test
# extras) set up another venv: .ci/run installs the built wheel into a fresh one that way.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${SSMLM_VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q "torch==${SSMLM_TORCH_VERSION:-2.13.0}"
fi
if [ -n "${SSMLM_INSTALL:-}" ]; then
  "$VENV/bin/python" -m pip install -q "$SSMLM_INSTALL"
else
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
fi
