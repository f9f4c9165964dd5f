"""Eager forward+backward step of a frozen 4-bit layer against bf16 nn.Linear: host issue and wall time per step.

At few tokens an eager QLoRA step is host-bound, so this measures what a training loop sees without CUDA graphs:
``layer(x).backward(g)`` (the input gradient only; the weight is frozen) 100 times back to back, the device
synchronized before and after, best of 5 loops; "issue" is the host time to queue the 100 steps, "wall" includes
the wait for the GPU. The layers are ``layer_graphs.layers``' (NF4, blocksize 64, double quant, bf16 compute, and
nn.Linear with the same weight). The host's speed moves between machines and runs, so compare builds alternately in
one call (``PYTHONPATH`` picks the package).

    python bench/eager_step.py [--shapes 14336x4096,4096x4096] [--tokens 1,16,256]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from layer_graphs import layers

import fsdp4bit


def step_us(step: Callable[[], object], loops: int = 5, steps: int = 100) -> tuple[float, float]:
    """(issue, wall) microseconds per step, each the best of ``loops`` loops of ``steps`` steps."""
    for _ in range(30):
        step()
    best = (float("inf"), float("inf"))
    for _ in range(loops):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        issued = time.perf_counter()
        torch.cuda.synchronize()
        done = time.perf_counter()
        best = min(best, ((issued - start) / steps * 1e6, (done - start) / steps * 1e6))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="14336x4096,4096x4096", help="N x K weights")
    parser.add_argument("--tokens", default="1,16,256", help="rows of the input")
    args = parser.parse_args()
    print(f"fsdp4bit from {fsdp4bit.__file__}")
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.split("x"))
        quant, plain = layers(N, K)
        for M in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
            grad = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
            (q_issue, q_wall), (p_issue, p_wall) = (
                step_us(lambda layer=layer: layer(x).backward(grad)) for layer in (quant, plain)
            )
            print(
                f"{shape:>11} {M:>5} tokens: 4-bit issue {q_issue:6.1f} wall {q_wall:6.1f} | bf16 issue {p_issue:6.1f}"
                f" wall {p_wall:6.1f} | wall ratio {q_wall / p_wall:.2f}"
            )


if __name__ == "__main__":
    main()
