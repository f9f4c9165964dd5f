#!/usr/bin/env bash
# One device-machine session: the GPU test suite, then the kernel and layer benchmarks. Logs go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FSDP4BIT_CACHE_DIR=/tmp/f4cache
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, fsdp4bit.kernels as k; print('torch', torch.__version__, 'backend', k.backend_name('cuda'), 'build_s', k.build_seconds('cuda'))" 2>&1 | tail -1
python3 -m pytest -q -p no:cacheprovider -x tests/test_kernels.py tests/test_core.py tests/test_sharding.py -k "cuda or not cpu" 2>&1 | tee "$OUT/pytest_core.log" | tail -4
python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_linear4bit.py -k cuda 2>&1 | tee "$OUT/pytest_spec_cuda.log" | tail -4
python3 bench/layer.py --json "$OUT/layer.json" 2>&1 | tee "$OUT/layer.log" | tail -30
