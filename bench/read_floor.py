"""The practical floor of a 1-token gemv: how fast can any kernel merely *read* the bytes a gemv must read, timed
as ``bench/kernels.py`` times the gemv (a CUDA graph of 20 calls back to back, input sets rotated past L2)? (GPU)

``bench/kernels.py``'s floor is bytes / the bandwidth of a 1 GiB copy; at tens of MB a kernel's ramp-up and tail
cost a fixed ~1 µs (H100) that no kernel avoids. This builds a bespoke read-only kernel (``bench/cuda/read_floor.cu``:
16-byte loads, 4 or 8 in flight per thread, 1/2/4 CTAs per SM; launched plainly, as a programmatic dependent
launch waiting for the kernel before, or that plus an L2 prefetch of its slice before the wait) and reports the
best variant next to fsdp4bit's gemv over the same bytes, in the same run.

    python bench/read_floor.py [--json bench/results/read_floor_<gpu>.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import torch
from kernels import BS, QT, SHAPES, copy_bandwidth, double_quant, gemv_bytes, gemv_call, gpu_time_us, l2_bytes
from torch.utils.cpp_extension import load

from fsdp4bit import kernels

MODES = {0: "plain", 1: "PDL, wait first", 2: "PDL, L2 prefetch, wait"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    native = kernels.native_for("cuda")
    if native is None:
        raise SystemExit("needs the CUDA extension")
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}a" if major >= 9 else f"{major}{minor}"
    src = Path(__file__).resolve().parent / "cuda" / "read_floor.cu"
    ext = load(
        "fsdp4bit_read_floor", [str(src)], extra_cuda_cflags=["-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    )
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bw = copy_bandwidth()
    out = torch.zeros(4 * sms, dtype=torch.int32, device="cuda")
    rows = []
    print(f"{torch.cuda.get_device_name()}, copy bandwidth {bw / 1e12:.3f} TB/s; floor = bytes / that; µs per call")
    for N, K in SHAPES:
        gbytes = gemv_bytes(N, K)
        read_bytes = (gbytes + 15) // 16 * 16
        sets = max(2, math.ceil(4 * l2_bytes() / read_bytes))
        bufs = [torch.randint(0, 256, (read_bytes,), dtype=torch.uint8, device="cuda") for _ in range(sets)]
        best: dict[int, tuple[float, str]] = {}
        for mode, per_sm, unroll in itertools.product(MODES, (1, 2, 4), (4, 8)):
            fns = [lambda b=b: ext.read_bytes(b, out, per_sm * sms, mode, unroll) for b in bufs]
            us, _ = gpu_time_us(fns)
            best[mode] = min(best.get(mode, (math.inf, "")), (us, f"{per_sm} CTA/SM, unroll {unroll}"))
        del bufs
        states, xs = [], []
        for _ in range(sets):
            W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
            packed, absmax, _ = native.quantize_4bit(W, BS, QT)
            states.append((packed, *double_quant(absmax)))
            xs.append(torch.randn(1, K, device="cuda", dtype=torch.bfloat16))
        gemv_us, _ = gpu_time_us([gemv_call(native, s, x, N, K) for s, x in zip(states, xs)])
        del states, xs
        torch.cuda.empty_cache()
        floor = gbytes / bw * 1e6
        read_us = min(t for t, _ in best.values())
        row = {
            "shape": f"{N}x{K}",
            "bytes": gbytes,
            "floor_us": floor,
            "read_us": {MODES[m]: {"us": t, "variant": v} for m, (t, v) in best.items()},
            "best_read_us": read_us,
            "gemv_us": gemv_us,
        }
        rows.append(row)
        reads = ", ".join(f"{MODES[m]} {t:.2f} ({floor / t:.0%}; {v})" for m, (t, v) in best.items())
        print(
            f"{N:>5}x{K:<5} {gbytes / 1e6:6.2f} MB  floor {floor:5.2f} | read-only kernel: {reads} | fsdp4bit gemv "
            f"{gemv_us:5.2f} ({floor / gemv_us:.0%} of the floor, {read_us / gemv_us:.0%} of the best read)",
            flush=True,
        )
    if args.json:
        info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bw_TBps": bw / 1e12}
        Path(args.json).write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
