#!/usr/bin/env bash
# GPU check of the cuda backend in one call on a bare lent GPU box (no network): sections (a)-(i) of
# bench/gpu_check (kernel tests, decode bandwidth, prefill TFLOP/s, graph capture, logits vs HF,
# throughput vs HF generate() in bf16 and with 4-bit weights, serve + streamed Generate, memory vs
# budget, the W4A16/W8A16 GEMM's bandwidth at 8B decode shapes).
#   scripts/gpu_check.sh [--quick] [--dry-run] [--skip LETTER]...
# --quick: about 4 minutes on an H200; the full run about 8 (hard limits 240 / 480 s, compiles included).
# --dry-run: the same sections at toy sizes on the CPU under TRITON_INTERPRET=1 (the setup, proven
# where no GPU is lent). With $OUT set (the device tool), the whole log goes to $OUT/gpu_check.log and
# the summary to $OUT/gpu_check.json, rewritten after every section.
# First, the carried wheels (scripts/gpu_bundle.sh; carry .whl) the box lacks, or has in an older version,
# are installed with pip --no-index --no-deps --target and put on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."

limit=480
for arg in "$@"; do
    case "$arg" in
        --quick) limit=240 ;;
        --dry-run) limit=1200; export TRITON_INTERPRET=1 ;;
    esac
done
[[ " $* " == *" --dry-run "* ]] || unset TRITON_INTERPRET

PYTHON=${PYTHON:-}
if [[ -z $PYTHON ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
SITE=${PAGEDGEN_SITE:-/tmp/pagedgen-site}
WHEELS=${PAGEDGEN_WHEELS:-.whl}
log=/dev/null
if [[ -n ${OUT:-} ]]; then mkdir -p "$OUT"; log=$OUT/gpu_check.log; fi

{
    echo "gpu_check: $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])') limit ${limit}s"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        # a carried wheel is installed where the box lacks its package or has an older version
        mapfile -t wanted < <("$PYTHON" - "$WHEELS" <<'PY'
import glob, importlib.metadata as md, os, sys
from packaging.utils import parse_wheel_filename
from packaging.version import Version
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.whl"))):
    name, version, _, _ = parse_wheel_filename(os.path.basename(path))
    try:
        have = Version(md.version(name))
    except md.PackageNotFoundError:
        have = None
    print(path if have is None or have < version else f"# {name} {have} kept (carried {version})")
PY
        )
        printf '%s\n' "${wanted[@]}" | grep '^#' || true
        install=($(printf '%s\n' "${wanted[@]}" | grep -v '^#' || true))
        if (( ${#install[@]} )); then
            echo "installing ${#install[@]} carried wheels into $SITE"
            "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$SITE" "${install[@]}" || { echo "gpu_check: wheel install failed"; exit 3; }
        fi
    fi
    export PYTHONPATH=".:clients:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
    timeout --kill-after=10 "$limit" "$PYTHON" -m bench.gpu_check "$@"
    code=$?
    (( code == 124 )) && echo "gpu_check: stopped at the ${limit}s limit (the SUMMARY lines above hold what was measured)"
    exit $code
} 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
