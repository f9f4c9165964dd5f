"""GPU time of a frozen 4-bit layer's forward and forward+backward at few tokens, in CUDA graphs (no host time).

At 16-512 tokens an eager step is host-bound (bench/host_overhead.py), so timing it eagerly measures Python;
this captures 10 steps of each side in one CUDA graph and times replays with events, the sides taking turns
(median of 15), for ``fsdp4bit.nn.Linear4bit`` (NF4, blocksize 64, double quant, bf16 compute: the fused GEMM
where it applies, else dequantize + cuBLAS) and ``torch.nn.Linear`` in bf16 with the same weight (both frozen;
the backward is the input gradient). It is the number the GEMM's own kernels (scale kernel, split-K sum) move.

    python bench/layer_graphs.py [--shapes 14336x4096,4096x14336] [--tokens 16,128,256] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch
from gemm4_fused import graphed
from layer import batched_ms

import fsdp4bit

REPS = 10  # steps per CUDA graph


def graph_us(fns: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median microseconds of one call of each function, from replays of a CUDA graph holding ``REPS`` calls (the
    sides taking turns, median of 15)."""
    replays = {name: graphed(fn, REPS) for name, fn in fns.items()}
    return {name: ms * 1000 / REPS for name, ms in batched_ms(replays, calls=1, reps=15).items()}


def layers(N: int, K: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(NF4 Linear4bit, bf16 nn.Linear) of the same random weight, both frozen, on the GPU."""
    torch.manual_seed(0)
    weight = torch.randn(N, K) * 0.02
    quant = fsdp4bit.nn.Linear4bit(
        K, N, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4"
    )
    quant.weight = fsdp4bit.nn.Params4bit(weight.clone(), quant_type="nf4", compress_statistics=True)
    plain = torch.nn.Linear(K, N, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    plain.weight.copy_(weight)
    return quant.to("cuda"), plain.to("cuda")


def steps(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> dict[str, Callable[[], object]]:
    def forward() -> object:
        with torch.no_grad():
            return layer(x)

    def forward_backward() -> object:
        xg = x.detach().requires_grad_(True)
        return torch.autograd.grad(layer(xg), xg, grad)

    return {"forward": forward, "forward+backward": forward_backward}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="14336x4096,4096x14336,4096x4096", help="N x K weights")
    parser.add_argument("--tokens", default="16,128,256,512", help="rows of the input")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    rows = []
    print(f"{'N x K':>12} {'tokens':>6} {'case':>16} {'4-bit us':>9} {'bf16 us':>8} {'ratio':>6}")
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.split("x"))
        quant, plain = layers(N, K)
        for M in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            grad = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
            ours, theirs = steps(quant, x, grad), steps(plain, x, grad)
            for case in ours:
                us = graph_us({"4-bit": ours[case], "bf16": theirs[case]})
                q_us, p_us = us["4-bit"], us["bf16"]
                rows.append({"N": N, "K": K, "tokens": M, "case": case, "linear4bit_us": q_us, "bf16_us": p_us})
                print(f"{shape:>12} {M:>6} {case:>16} {q_us:>9.1f} {p_us:>8.1f} {q_us / p_us:>6.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
