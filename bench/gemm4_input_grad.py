"""The input gradient grad_out @ W of a 4-bit layer at 16-512 tokens on Hopper: the transposed fused GEMM against
dequantize + matmul and against bf16 (grad_out @ W in bf16), in GPU time.

Each side is captured as 5 calls in a CUDA graph (so host time drops out) and timed with bench/layer.py's
``batched_ms`` (the sides take turns). "rule" says whether fsdp4bit's dispatch takes the fused kernel for the call
(``NativeOps.gemm_applies(..., trans=True)``); the relative error is against float64. Results: NOTES.md
("Fused 4-bit GEMM", "Session 12").

    python bench/gemm4_input_grad.py [--json bench/results/gemm4_input_grad_<gpu>.json]
"""

from __future__ import annotations

import torch
from gemm4_fused import dump_rows, graphed, hopper_setup, quantized
from layer import batched_ms

import fsdp4bit.functional as Fq
from fsdp4bit.codebooks import get_4bit_code

CALLS = 5


def main() -> None:
    args, native = hopper_setup(__doc__)
    if native is None:
        return
    rows = []
    for N, K in [(14336, 4096), (4096, 14336), (28672, 8192), (4096, 4096), (2048, 4096), (6144, 4096)]:
        packed, st = quantized(N, K, torch.bfloat16, 64, True)
        Wd = Fq.dequantize_4bit(packed, st)
        pk, code = Fq.packed_bytes(packed), get_4bit_code("nf4")
        nested = (st.state2.absmax, st.state2.code, st.offset)
        for M in (16, 32, 64, 128, 256, 512):
            G = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)

            def fused(G=G):
                return native.ext.gemm_4bit(G, pk, st.absmax, *nested, 64, st.state2.blocksize, code, N, K, None, True)

            ref = G.double() @ Wd.double()
            err = ((fused().double() - ref).norm() / ref.norm()).item()
            sides = {
                "fused": graphed(fused, CALLS),
                "dequant": graphed(lambda G=G: G @ Fq.dequantize_4bit(packed, st), CALLS),
                "bf16": graphed(lambda G=G: G @ Wd, CALLS),
            }
            us = {k: v / CALLS * 1000 for k, v in batched_ms(sides, calls=1, reps=9).items()}
            r = {"M": M, "N": N, "K": K, **us, "rel_err": err, "rule": native.gemm_applies(G, 64, (N, K), trans=True)}
            rows.append(r)
            line = f"{M:4d} x {N:5d} @ {N}x{K}: fused {us['fused']:7.1f} us  dequantize + matmul {us['dequant']:7.1f}  "
            line += f"bf16 {us['bf16']:7.1f}  fused/dequant {us['fused'] / us['dequant']:.3f}  rule {r['rule']}  "
            print(line + f"rel err {err:.1e}", flush=True)
    dump_rows(args.json, rows)


if __name__ == "__main__":
    main()
