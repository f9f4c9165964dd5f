"""Where the fused 4-bit GEMM (plain and transposed) beats dequantize + cuBLAS: the sweep behind gemm.cu's rule
(for 513 to 1536 tokens by default; session 18 ran it at 16 to 256 tokens with ``--tokens``).

For 14 LLM layer shapes (N x K) and 640 to 2048 tokens, GPU time (CUDA graphs of 10 calls, so no host time) of
the extension's fused GEMM against ``F.linear(A, dequantize_4bit(W))``, and of the transposed one (a linear
layer's input gradient, ``G @ W``) against ``G @ dequantize_4bit(W)``, with each call's 256-token tiles and how
full they fill their waves of SMs. Results: NOTES.md ("Fused 4-bit GEMM", session 13).

    python bench/gemm4_rule_sweep.py [--tokens 640,768,...] [--shapes NxK,...] [--json bench/results/gemm4_rule_sweep_1k_<gpu>.json]
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from gemm4_fused import dump_rows, fused, graphed, hopper_setup, quantized
from layer import batched_ms

import fsdp4bit.functional as Fq
from fsdp4bit.codebooks import get_4bit_code

SHAPES = [
    (1024, 4096),
    (4096, 4096),
    (6144, 4096),
    (14336, 4096),
    (4096, 14336),
    (11008, 4096),
    (4096, 11008),
    (5120, 5120),
    (13824, 5120),
    (5120, 13824),
    (8192, 8192),
    (1024, 8192),
    (28672, 8192),
    (8192, 28672),
]
TOKENS = [640, 768, 1024, 1536, 2048]


def wave_fill(tiles: int, sms: int) -> float:
    """The share of the CTA slots of the waves that ``tiles`` work units take (one CTA per SM)."""
    return tiles / (math.ceil(tiles / sms) * sms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated token counts")
    parser.add_argument("--shapes", default=None, help="NxK,NxK,... instead of the 14 LLM layer shapes")
    args, native = hopper_setup(__doc__, parser)
    if native is None:
        return
    ext, sms = native.ext, torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")] if args.shapes else SHAPES
    for N, K in shapes:
        packed, st = quantized(N, K, torch.bfloat16, 64, True)
        flat, code = Fq.packed_bytes(packed), get_4bit_code(st.quant_type)
        nested = (st.state2.absmax, st.state2.code, st.offset)
        for M in [int(m) for m in args.tokens.split(",")]:
            A = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            G = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
            fns = {
                "deq": graphed(lambda: F.linear(A, Fq.dequantize_4bit(packed, st)), 10),
                "fused": graphed(lambda: fused(ext, A, packed, st, N), 10),
                "tdeq": graphed(lambda: G @ Fq.dequantize_4bit(packed, st), 10),
                "tfused": graphed(
                    lambda: ext.gemm_4bit(G, flat, st.absmax, *nested, 64, st.state2.blocksize, code, N, K, None, True),
                    10,
                ),
            }
            us = {k: v / 10 * 1e3 for k, v in batched_ms(fns, calls=1, reps=9).items()}
            tiles, ttiles = math.ceil(M / 256) * math.ceil(N / 128), math.ceil(M / 256) * math.ceil(K / 128)
            row = {"M": M, "N": N, "K": K, "tiles": tiles, "ttiles": ttiles, **us}
            row["applied"] = native.gemm_applies(A, 64, (N, K))
            rows.append(row)
            print(
                f"{M:5d} {N:5d}x{K:5d} tiles {tiles:4d} fill {wave_fill(tiles, sms):.2f}: fused/dequantize "
                f"{us['fused'] / us['deq']:.3f} ({us['fused']:7.1f}/{us['deq']:7.1f} us, applied {row['applied']})  "
                f"transposed tiles {ttiles:4d} fill {wave_fill(ttiles, sms):.2f}: {us['tfused'] / us['tdeq']:.3f}",
                flush=True,
            )
    dump_rows(args.json, rows)


if __name__ == "__main__":
    main()
