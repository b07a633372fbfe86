#!/usr/bin/env bash
# Downloads, here, the wheels the GPU check needs that the lent GPU box lacks, into .whl/ (ignored by git),
# for CPython 3.12 on manylinux x86-64, and prints their total size. scripts/gpu_check.sh installs them there
# with pip --no-index --no-deps --target and PYTHONPATH (the box has no network).
#
# The box's python3 holds BOX_HAS (below; the device tool's KINDS.md lists all) but none of MISSING.
# FLOORS are on the box too, at versions nobody has read there; they are carried because the code needs
# at least these (the committed gRPC stubs were generated with grpcio 1.85.1 / protobuf 7.35.1, pydantic
# needs typing-extensions 4.16, fastapi anyio 4.1): gpu_check.sh installs one only where the box's copy
# is older. Versions are those of the tested .venv. Usage:
#   scripts/gpu_bundle.sh [--python-version 3.12] [--dest .whl]
# (--python-version 3.11 --dest /tmp/whl311 builds the same set for a local 3.11 stand-in of the box)
set -euo pipefail
cd "$(dirname "$0")/.."

# What the box's python3 holds that pagedgen and its cuda tests import (KINDS.md), for the record and the
# test that every dependency in pyproject.toml is either here or carried (tests/backends/cuda/test_gpu_check.py).
BOX_HAS=(
    torch triton numpy transformers tokenizers safetensors jinja2 grpcio protobuf tqdm prometheus-client
    pyyaml requests httpx anyio h11 click typing-extensions packaging pytest pytest-timeout pytest-xdist
    hypothesis
)

PYV=3.12
DEST=.whl
while [[ $# -gt 0 ]]; do
    case "$1" in
        --python-version) PYV=$2; shift 2 ;;
        --dest) DEST=$2; shift 2 ;;
        *) echo "usage: $0 [--python-version X.Y] [--dest DIR]" >&2; exit 2 ;;
    esac
done

MISSING=(
    structlog==26.1.0               # logging everywhere
    gguf==0.19.0                    # GGUF reader (model.weights)
    grpcio-health-checking==1.85.1  # the gRPC service
    grpcio-reflection==1.85.1
    fastapi==0.165.0                # the OpenAI-compatible HTTP front end
    starlette==1.10.0
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    opentelemetry-api==1.45.2       # imported by fastapi.applications
    uvicorn==0.54.0
    xgrammar==0.2.8                 # structured output (engine.structured_output, imported on first use)
    apache-tvm-ffi==0.1.15.post2
)
FLOORS=(
    grpcio==1.85.3
    protobuf==7.36.2
    typing-extensions==4.16.0
    anyio==4.16.0
)

PYTHON=${PYTHON:-python3}
rm -rf "$DEST"                      # one version of each: two would stop the install on the box
mkdir -p "$DEST"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    "${platforms[@]}" -d "$DEST" "${MISSING[@]}" "${FLOORS[@]}"

count=$(ls "$DEST"/*.whl | wc -l)
want=$(( ${#MISSING[@]} + ${#FLOORS[@]} ))
if [[ $count -ne $want ]]; then
    echo "gpu_bundle: expected $want wheels in $DEST, found $count" >&2
    exit 1
fi
ls -l "$DEST"/*.whl | awk '{printf "%9d  %s\n", $5, $NF}'
bytes=$(cat "$DEST"/*.whl | wc -c)
echo "gpu_bundle: $count wheels for cp${PYV/./}, $(( bytes / 1024 )) KiB ($(( (bytes + 1048575) / 1048576 )) MiB) in $DEST"
