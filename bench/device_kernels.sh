#!/usr/bin/env bash
# Kernel-engineering device session: build, forward/quantize breakdown, layer benchmark, GPU kernel tests.
# Logs go to $OUT.   bash bench/device_kernels.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FSDP4BIT_CACHE_DIR=/tmp/f4cache PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, fsdp4bit.kernels as k; print('torch', torch.__version__, 'backend', k.backend_name('cuda'), 'build_s', k.build_seconds('cuda'))" 2>&1 | tail -3
python3 bench/forward_breakdown.py --json "$OUT/breakdown.json" 2>&1 | tee "$OUT/breakdown.log"
python3 bench/layer.py --json "$OUT/layer.json" 2>&1 | tee "$OUT/layer.log"
python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_core.py -k "cuda or not cpu" 2>&1 | tee "$OUT/pytest_core.log" | tail -6
timeout "${SPEC_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider -x tests/test_linear4bit.py -k "cuda and not compile" 2>&1 | tee "$OUT/pytest_linear4bit.log" | tail -3
