#!/usr/bin/env bash
# One device-machine session: the GPU test suite, the kernel and layer benchmarks, the single-GPU trainer.
# Logs and JSON go to $OUT.   bash bench/device_run.sh   (carry .gpu_model for the trainer run)
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FSDP4BIT_CACHE_DIR=/tmp/f4cache PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, fsdp4bit.kernels as k; print('torch', torch.__version__, 'backend', k.backend_name('cuda'), 'build_s', k.build_seconds('cuda'))" 2>&1 | tail -1
python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_kernels.py tests/test_core.py -k "cuda or not cpu" 2>&1 | tee "$OUT/pytest_core.log" | tail -2
python3 -m pytest -q -p no:cacheprovider tests/test_sharding.py -k "cuda or not cpu" 2>&1 | tee "$OUT/pytest_sharding.log" | tail -2
python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_linear4bit.py -k cuda 2>&1 | tee "$OUT/pytest_spec_cuda.log" | tail -2
python3 bench/layer.py --json "$OUT/layer.json" 2>&1 | tail -30 > "$OUT/layer.log"
python3 bench/kernels.py > "$OUT/kernels.log" 2>&1; cp bench/results/kernels_*H100*.json "$OUT/" 2>/dev/null
tail -12 "$OUT/kernels.log"
[ -d .gpu_model ] && bash bench/gpu_trainer.sh 2>&1 | tail -8 | tee "$OUT/trainer.log"
cat "$OUT/layer.log" | tr -d '\n ' ; echo
