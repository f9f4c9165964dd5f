#!/usr/bin/env bash
# Kernel-tuning device session: the nvcc-only tile sweep (bench/cuda/sweep.cu), the GPU kernel tests, the
# forward breakdown and chunked-forward experiment, and a cuda-gdb backtrace of a TORCH_CHECK thrown inside
# the CUDA extension. Logs go to $OUT.   bash bench/device_tune.sh [sweep|tests|forward|probe ...]
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FSDP4BIT_CACHE_DIR=/tmp/f4cache PYTHONPATH=$PWD
steps=${*:-sweep tests forward probe ncu}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
# the torch extension builds on the CPU while the sweep uses the GPU
python3 -c "import fsdp4bit.kernels as k; print('extension', k.backend_name('cuda'), 'build_s', round(k.build_seconds('cuda'), 1))" \
  > "$OUT/build.log" 2>&1 &
build=$!
if [[ " $steps " == *" sweep "* ]]; then
  nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90,code=sm_90 -I csrc/cuda bench/cuda/sweep.cu \
    -o /tmp/sweep && /tmp/sweep > "$OUT/sweep.log" 2>&1
  grep -E "copy|FAIL" "$OUT/sweep.log"
fi
wait $build
tail -2 "$OUT/build.log"
if [[ " $steps " == *" tests "* ]]; then
  python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k cuda 2>&1 | tee "$OUT/pytest_kernels.log" | tail -3
fi
if [[ " $steps " == *" forward "* ]]; then
  python3 bench/forward_breakdown.py --json "$OUT/breakdown.json" > "$OUT/breakdown.log" 2>&1
  python3 bench/forward_chunked.py --json "$OUT/chunked.json" > "$OUT/chunked.log" 2>&1
  tail -14 "$OUT/chunked.log"
fi
if [[ " $steps " == *" probe "* ]]; then
  echo "CC=${CC:-} CXX=${CXX:-} c++=$(readlink -f "$(command -v c++)")"; ${CC:-gcc} --version | head -1
  so=$(ls /tmp/f4cache/fsdp4bit_cuda_*/*.so | head -1)
  ldd "$so" | grep -E "stdc|gcc_s" | tee "$OUT/ldd.log"
  nm -C --defined-only "$so" | grep -c "basic_ostream" | sed 's/^/ostream symbols defined in the extension: /'
  grep -E "^(cxx|nvcc|ldflags|cuda_cflags) " /tmp/f4cache/fsdp4bit_cuda_*/build.ninja | cut -c1-400 | tee "$OUT/ninja.log"
  python3 -c "import tests.test_kernels as t; print(t._RAISE_INSIDE_EXTENSION)" > /tmp/raise.py
  python3 /tmp/raise.py cuda > "$OUT/raise.log" 2>&1; echo "TORCH_CHECK inside the CUDA extension: exit $?"; tail -3 "$OUT/raise.log"
  python3 /tmp/raise.py cpu > "$OUT/raise_cpu.log" 2>&1; echo "TORCH_CHECK inside the CPU extension: exit $?"; tail -3 "$OUT/raise_cpu.log"
fi
if [[ " $steps " == *" ncu "* ]]; then
  nvcc -O3 -std=c++17 --expt-relaxed-constexpr -gencode=arch=compute_90,code=sm_90 -I csrc/cuda bench/cuda/sweep.cu -o /tmp/sweep 2>/dev/null
  cuobjdump -sass -fun '_ZN8fsdp4bit11gemv_kernelI13__nv_bfloat16Li1ELi4ELb1EEEvPKT_PKhNS_6Code16ENS_6ScalesEillPS2_' /tmp/sweep > "$OUT/gemv_m1r4.sass" 2>&1
  grep -cE "^\s+/\*[0-9a-f]{4}\*/" "$OUT/gemv_m1r4.sass" | sed 's/^/gemv SASS instructions: /'
  timeout 200 ncu --set full -k regex:gemv_kernel --launch-skip 3 -c 1 /tmp/sweep gemv "M1 R4" 14336x4096 > "$OUT/ncu_gemv.txt" 2>&1
  timeout 200 ncu --set full -k regex:quantize_kernel --launch-skip 3 -c 1 /tmp/sweep quantize "P2 cps16" 14336x4096 > "$OUT/ncu_quant.txt" 2>&1
  grep -E "Duration|DRAM Throughput|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Issue Slots Busy|No Eligible|Stall" "$OUT/ncu_gemv.txt" | head -20
  grep -E "Duration|DRAM Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Issue Slots Busy|No Eligible" "$OUT/ncu_quant.txt" | head -10
  python3 - <<'PY' 2>&1 | tee "$OUT/quant_profile.log"
import torch, sys
sys.path.insert(0, "bench")
from forward_breakdown import kernel_table
import fsdp4bit as bnb
w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16)
kernel_table(lambda: bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True), "quantize_4bit dq")
PY
fi
