#!/usr/bin/env bash
# The GPU roofline check (kvjax/roofline.py), for a device with jax preinstalled and the repo
# copied (no virtualenv): decode-kernel bandwidth, flash TFLOP/s, full vs SnapKV vs KIVI-4
# decode step and compression overhead, each goal with PASS/FAIL.
#   scripts/gpu_check.sh [out.json] [scripts/roofline.py flags, e.g. --sections=decode,flash]
# PYTHON overrides the interpreter (default python3). About 4 minutes on an H200.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check.json}"
shift || true
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" exec "${PYTHON:-python3}" scripts/roofline.py \
    --json_out="$out" "$@"
