"""Session 19's experiment, not part of fsdp4bit: a fused 4-bit GEMM whose first warpgroup dequantizes W into
shared memory for shared-memory wgmmas (NOTES.md, "Fused 4-bit GEMM", session 19). To rerun it on an H100:

    git apply bench/experiments/gemm_dq_warpgroup.patch && python3 bench/experiments/gemm_dq_bench.py

FSDP4BIT_GEMM_DQ picks the kernel of the patched launcher past 256 tokens: 0 the register kernel, 1 (3 slots,
3 packed slots, tensor-store epilogue), 2 (4, 4, direct stores), 3 (3, 6, direct); probes of variant 2 (wrong
outputs, timing only): 11 no dequantization, 12 no shuffle lookup, 13 consumers not waiting for the 16-bit W,
14 no dequantization and no epilogue. Checks every kernel bit-exact against the register kernel, then times them.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch
import torch.nn.functional as F
from gemm4_fused import fused, quantized
from layer import batched_ms

import fsdp4bit.functional as Fq
from fsdp4bit import kernels


def with_variant(v, fn):
    def run():
        os.environ["FSDP4BIT_GEMM_DQ"] = str(v)
        return fn()

    return run


native = kernels.native_for("cuda")
ext = native.ext
ok = True
for M, N, K, dtype, bs, nested, qt, bias in [
    (4096, 14336, 4096, torch.bfloat16, 64, True, "nf4", False),
    (2048, 4096, 14336, torch.bfloat16, 64, True, "nf4", True),
    (513, 384, 4160, torch.float16, 64, True, "fp4", True),
    (1000, 1000, 640, torch.bfloat16, 128, False, "nf4", False),
    (777, 131, 128, torch.float16, 64, False, "nf4", True),
]:
    packed, st = quantized(N, K, dtype, bs, nested, qt)
    A = torch.randn(M, K, device="cuda", dtype=dtype)
    b = torch.randn(N, device="cuda", dtype=dtype) if bias else None
    Wd = Fq.dequantize_4bit(packed, st)
    ref = A.double() @ Wd.double().T + (b.double() if bias else 0)
    err_cublas = ((F.linear(A, Wd, b).double() - ref).norm() / ref.norm()).item()
    outs = {}
    for v in [0, 1, 2, 3]:
        os.environ["FSDP4BIT_GEMM_DQ"] = str(v)
        torch.full((M, N), float("nan"), device="cuda", dtype=dtype)
        o = fused(ext, A, packed, st, N, b)
        torch.cuda.synchronize()
        outs[v] = o
        err = ((o.double() - ref).norm() / ref.norm()).item()
        nan = int(torch.isnan(o).sum())
        same = bool(torch.equal(o, outs[0]))
        good = nan == 0 and err <= 1.5 * err_cublas + 1e-6
        ok &= good
        print(
            f"check {M}x{N}x{K} {qt} bias={bias} v{v}: err {err:.3e} (cublas {err_cublas:.3e}) nan {nan} "
            f"bit-equal to v0 {same} {'ok' if good else 'FAIL'}",
            flush=True,
        )
if not ok:
    sys.exit("check failed")
rows = []
for N, K in [(14336, 4096), (4096, 14336)]:
    packed, st = quantized(N, K, torch.bfloat16, 64, True)
    W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    for M in [4096, 8192]:
        A = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        fns = {"bf16": lambda: F.linear(A, W), "deq": lambda: F.linear(A, Fq.dequantize_4bit(packed, st))}
        for v in [0, 2, 11, 12, 13, 14]:
            fns[f"v{v}"] = with_variant(v, lambda: fused(ext, A, packed, st, N))
        ms = batched_ms(fns, reps=11)
        us = {k: v * 1000 for k, v in ms.items()}
        tf = {k: 2 * M * N * K / v / 1e6 for k, v in us.items()}
        print(
            f"{M}x{N}x{K}: " + "  ".join(f"{k} {us[k]:.1f}us/{tf[k]:.0f}TF ({us[k] / us['bf16']:.3f})" for k in us),
            flush=True,
        )
