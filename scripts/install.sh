#!/usr/bin/env bash
# Install goca-scfg into ./.venv (created if missing). Torch and torchvision are installed first, pinned,
# so pip keeps them when it resolves the rest. On a GPU box with its own CUDA torch, set TORCH_SPEC="" to
# keep whatever torch the venv already has.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
TORCH_SPEC=${TORCH_SPEC-"torch==2.14.1 torchvision==0.29.1"}
if [ -n "$TORCH_SPEC" ]; then
  # shellcheck disable=SC2086
  python -m pip install -q $TORCH_SPEC
fi
python -m pip install -q -e '.[test]'
