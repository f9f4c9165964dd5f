"""Session 24's probe, not part of fsdp4bit: does a dequantized weight in another layout, or a tuned cuBLAS
algorithm, make the training-shape GEMMs faster than ``F.linear`` on the bf16 weight? (NOTES.md, "Status (end of
session 24)".) H100, 14336x4096 weight, 4096 and 8192 tokens, back-to-back batches (``layer.batched_ms``):

- forward ``F.linear(x, W)`` (cuBLAS TN) against ``x @ W.t().contiguous()`` (NN) and ``(W @ x.t())`` (the
  transposed product);
- backward to the input ``g @ W`` (NN) against ``g @ Wt.t()`` (NT);
- with ``TUNE=1``, the same again under TunableOp (``torch.cuda.tunable``), which times cuBLAS' candidate algorithms
  per shape and layout and prints what it picked (``Default`` = cuBLAS' own heuristic choice).

    PYTHONPATH=. TUNE=1 python3 bench/experiments/gemm_layouts.py
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import torch
from layer import batched_ms

N, K = 14336, 4096


def cases(x: torch.Tensor, g: torch.Tensor, W: torch.Tensor, Wt: torch.Tensor, tag: str) -> dict:
    """The forward and input-gradient GEMMs of one token count, by weight layout."""
    M = x.shape[0]
    return {
        f"{tag}fwd{M} F.linear(x, W) TN": lambda: torch.nn.functional.linear(x, W),
        f"{tag}fwd{M} mm(x, Wt) NN": lambda: torch.mm(x, Wt),
        f"{tag}fwd{M} mm(W, x.t())": lambda: torch.mm(W, x.t()),
        f"{tag}bwd{M} mm(g, W) NN": lambda: torch.mm(g, W),
        f"{tag}bwd{M} mm(g, Wt.t()) NT": lambda: torch.mm(g, Wt.t()),
    }


def run(W: torch.Tensor, Wt: torch.Tensor, tag: str = "") -> dict:
    """µs per call of every case, two batches of back-to-back calls each."""
    res: dict[str, list[float]] = {}
    for M in (4096, 8192):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
        for _ in range(2):
            for name, ms in batched_ms(cases(x, g, W, Wt, tag)).items():
                res.setdefault(name, []).append(round(ms * 1000, 1))
    return res


def main() -> None:
    torch.manual_seed(0)
    W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    Wt = W.t().contiguous()
    x = torch.randn(4096, K, device="cuda", dtype=torch.bfloat16)
    print("max |TN - NN|:", (torch.nn.functional.linear(x, W).float() - torch.mm(x, Wt).float()).abs().max().item())
    print(json.dumps(run(W, Wt), indent=1))
    if os.environ.get("TUNE"):
        torch.cuda.tunable.enable(True)
        torch.cuda.tunable.set_max_tuning_duration(200)
        print(json.dumps(run(W, Wt, "tuned "), indent=1))
        for result in torch.cuda.tunable.get_results():  # (op, shape, algorithm, ms): "Default" = cuBLAS' heuristic
            print(result)


if __name__ == "__main__":
    main()
