"""Session 20's experiment, not part of fsdp4bit: the fused GEMM looking its weights up in per-row value tables
with byte permutes instead of shuffling float32 codes (NOTES.md, "Status (end of session 20)"). To rerun it on an
H100:

    git apply bench/experiments/gemm_value_tables.patch && python3 bench/experiments/gemm_value_tables_bench.py

Producer warps 1-2 write each row's 16 values code[e] * scale (rounded once, low bytes then high bytes) into the
stage; the consumers turn 4 weights into 2 fragment registers with 9 PRMTs and 3 shift or logic ops.
FSDP4BIT_GEMM_LUT=1 picks it (plain kernel only). Checks it bit-exact against the shuffle kernel, then times both
(LUT_TOKENS: the token counts).
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

ext = kernels.native_for("cuda").ext


def call(A, packed, st, N, b, lut):
    os.environ["FSDP4BIT_GEMM_LUT"] = "1" if lut else "0"
    return fused(ext, A, packed, st, N, b)


ok = True
torch.manual_seed(0)
cases = [
    (4096, 14336, 4096, torch.bfloat16, 64, True, "nf4", False),
    (2048, 4096, 14336, torch.bfloat16, 64, True, "nf4", True),
    (513, 384, 4160, torch.float16, 64, True, "fp4", True),
    (1000, 1000, 640, torch.bfloat16, 128, False, "nf4", False),
    (777, 131, 128, torch.float16, 64, False, "nf4", True),
    (9, 4096, 4096, torch.bfloat16, 64, True, "nf4", False),
    (33, 1000, 4096, torch.float16, 256, True, "fp4", True),
    (100, 14336, 4096, torch.bfloat16, 64, True, "nf4", True),
    (200, 4097, 1024, torch.bfloat16, 1024, False, "fp4", False),
    (300, 130, 64, torch.bfloat16, 64, True, "nf4", True),
]
for M, N, K, dtype, bs, nested, qt, bias in cases:
    packed, st = quantized(N, K, dtype, bs, nested, qt)
    A = torch.randn(M, K, device="cuda", dtype=dtype)
    b = torch.randn(N, device="cuda", dtype=dtype) if bias else None
    outs = []
    for lut in (False, True):
        torch.full((M, N), float("nan"), device="cuda", dtype=dtype)
        outs.append(call(A, packed, st, N, b, lut))
    torch.cuda.synchronize()
    same = torch.equal(outs[0], outs[1])
    nan = int(torch.isnan(outs[1]).sum())
    ok &= same and nan == 0
    print(
        f"check {M}x{N}x{K} {str(dtype)[6:]} bs{bs} nested={nested} {qt} bias={bias}: bit-equal {same}, NaN {nan}",
        flush=True,
    )
if not ok:
    sys.exit("check FAILED")
for N, K in [(14336, 4096), (4096, 14336)]:
    packed, st = quantized(N, K, torch.bfloat16, 64, True)
    W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    for M in [int(m) for m in os.environ.get("LUT_TOKENS", "16,128,256,512,1024,2048,4096,8192").split(",")]:
        A = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        fns = {
            "bf16": lambda: F.linear(A, W),
            "deq": lambda: F.linear(A, Fq.dequantize_4bit(packed, st)),
            "shfl": lambda: call(A, packed, st, N, None, False),
            "lut": lambda: call(A, packed, st, N, None, True),
        }
        us = {k: v * 1000 for k, v in batched_ms(fns, reps=11).items()}
        print(f"{M}x{N}x{K}: " + "  ".join(f"{k} {us[k]:.1f}us ({us[k] / us['bf16']:.3f})" for k in us), flush=True)
