"""Session 25's experiment, not part of fsdp4bit: the fused GEMM's weights looked up with byte permutes and scaled
with bf16 multiplies (round(bf16(code) x bf16(scale)), torchao's NF4 values) instead of shuffled float32 codes times
the float32 scale (NOTES.md, "Status (end of session 25)"). To rerun it on an H100:

    git apply bench/experiments/gemm_prmt_lookup.patch && python3 bench/experiments/gemm_prmt_bench.py

Per 2 packed bytes (4 weights) of a fragment: 1 PRMT gathers the thread's byte of 2 words, 4 PRMTs look the nibbles
up in 16-bit code tables held as byte planes in 8 registers, a SHF + LOP3 + 2 PRMTs pick entries 8-15 by each
nibble's bit 3, 2 PRMTs interleave low and high bytes into fragment registers, 2 HMUL2 scale them.
FSDP4BIT_GEMM_PRMT=1 picks it (bf16, 256-token tiles, plain kernel only); 2 and 3 pick two timing probes with wrong
values (see ``call``). Checks variant 1 against a float64 product with its weights (NF4) or the exact ones (FP4),
then times every variant against the shuffle kernel (TOKENS: the token counts). `python3
bench/experiments/sass_counts.py EXTENSION.so` counts each variant's instructions.
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
from fsdp4bit.codebooks import get_4bit_code

ext = kernels.native_for("cuda").ext


def call(A, packed, st, N, b, look):
    """The fused GEMM with lookup variant ``look``: 0 the shuffle kernel, 1 byte permutes + HMUL2, and two probes
    with wrong values (timing only): 2 one shift per weight in place of the shuffle, 3 byte permutes without the
    HMUL2 (a sign flip in its place)."""
    os.environ["FSDP4BIT_GEMM_PRMT"] = str(int(look))
    return fused(ext, A, packed, st, N, b)


def w_fast(packed, st, N, K):
    ones = torch.full_like(packed, 0xFF) if packed.dtype == torch.uint8 else None
    s_bf = Fq.dequantize_4bit(ones, st)  # bf16(1.0 * s) per element
    b = Fq.packed_bytes(packed).view(-1)
    idx = torch.stack([b >> 4, b & 15], -1).view(N, K).long()
    code = get_4bit_code(st.quant_type).to("cuda", torch.float32).to(torch.bfloat16)
    return code[idx] * s_bf


ok = True
torch.manual_seed(0)
for M, N, K, bs, nested, qt, bias in [
    (4096, 14336, 4096, 64, True, "nf4", False),
    (1000, 4096, 14336, 64, True, "nf4", True),
    (300, 1000, 640, 128, False, "fp4", False),
    (257, 130, 4096, 64, True, "nf4", True),
]:
    packed, st = quantized(N, K, torch.bfloat16, bs, nested, qt)
    A = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16) if bias else None
    Wd, Wf = Fq.dequantize_4bit(packed, st), w_fast(packed, st, N, K)
    ref = A.double() @ Wd.double().T + (b.double() if bias else 0)
    reff = A.double() @ Wf.double().T + (b.double() if bias else 0)
    res = {}
    for name, fn in [
        ("cublas", lambda: F.linear(A, Wd, b)),
        ("shfl", lambda: call(A, packed, st, N, b, 0)),
        ("prmt", lambda: call(A, packed, st, N, b, 1)),
        ("cublas_fast", lambda: F.linear(A, Wf, b)),
    ]:
        torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)
        out = fn().double()
        res[name] = (
            ((out - ref).norm() / ref.norm()).item(),
            ((out - reff).norm() / reff.norm()).item(),
            int(torch.isnan(out).sum()),
        )
    wdiff = ((Wf.float() - Wd.float()).abs() / Wd.float().abs().clamp_min(1e-30)).max().item()
    if qt == "nf4":  # w_fast reads the bf16 scale as the value of code 15 (1.0 in NF4 only)
        good = res["prmt"][2] == 0 and res["prmt"][1] <= 1.5 * res["cublas_fast"][1] + 1e-6
    else:
        good = res["prmt"][2] == 0 and res["prmt"][0] <= 2.5 * res["cublas"][0] + 1e-6
    ok &= good
    print(
        f"check {M}x{N}x{K} bs{bs} nested={nested} {qt} bias={bias}: max rel |Wfast-W| {wdiff:.2e}; "
        + "; ".join(f"{k} err(exact W) {v[0]:.3e} err(fast W) {v[1]:.3e} NaN {v[2]}" for k, v in res.items())
        + (" ok" if good else " FAIL"),
        flush=True,
    )
if not ok:
    sys.exit("check FAILED")
for N, K in [(14336, 4096), (4096, 14336)]:
    packed, st = quantized(N, K, torch.bfloat16, 64, True)
    W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    for M in [int(m) for m in os.environ.get("TOKENS", "1024,2048,4096,8192").split(",")]:
        A = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        fns = {
            "bf16": lambda: F.linear(A, W),
            "deq": lambda: F.linear(A, Fq.dequantize_4bit(packed, st)),
            "shfl": lambda: call(A, packed, st, N, None, 0),
            "prmt": lambda: call(A, packed, st, N, None, 1),
            "shift": lambda: call(A, packed, st, N, None, 2),
            "prmt_noscale": lambda: call(A, packed, st, N, None, 3),
        }
        us = {k: v * 1000 for k, v in batched_ms(fns, reps=11).items()}
        print(f"{M}x{N}x{K}: " + "  ".join(f"{k} {us[k]:.1f}us ({us[k] / us['bf16']:.3f})" for k in us), flush=True)
