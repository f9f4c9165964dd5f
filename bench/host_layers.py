"""Host time of each layer of an eager 4-bit linear call on CUDA, outermost first, against bf16 F.linear.

``bench/host_overhead.py`` times whole calls; this splits one: ``Linear4bit(x)`` (the module call),
``autograd.matmul_4bit`` (bitsandbytes' function: argument checks and the state's tensors), ``ops.matmul_4bit``
(eager dispatch), ``NativeOps.gemv_4bit`` (the argument checks naming what is wrong) and the extension's
``matmul_4bit`` (C++: the route and the kernel launches), plus the pieces between them, and a forward+backward
through the layer, through the extension's autograd node alone and through bf16 nn.Linear. Per call: issue time,
the best of 7 loops of 300 calls (the GPU synchronized between loops only). NF4 bs64 double quant, bf16.

    python bench/host_layers.py [--shape 4096x4096] [--tokens 1,64,2048]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from eager_step import step_us
from layer_graphs import layers

from fsdp4bit import kernels, ops
from fsdp4bit.autograd import matmul_4bit
from fsdp4bit.functional import check_packed_matches


def issue_us(fn: Callable[[], object]) -> float:
    """Host microseconds per call of ``fn``: eager_step's issue time, the best of 7 loops of 300 calls."""
    return step_us(fn, loops=7, steps=300)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="4096x4096", help="N x K")
    parser.add_argument("--tokens", default="1,64,2048", help="rows of the input")
    args = parser.parse_args()
    native = kernels.native_for("cuda")
    if native is None:
        raise SystemExit("needs the CUDA extension")
    N, K = (int(v) for v in args.shape.split("x"))
    quant, plain = layers(N, K)
    weight = quant.weight
    state = weight.quant_state
    packed = check_packed_matches(weight, state, "B")
    stats = (*state.absmax_tensors(), state.blocksize, state.state2.blocksize, state.quant_type, list(state.shape))
    ext_args = native._state_args(packed, *stats)
    for tokens in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(tokens, K, device="cuda", dtype=torch.bfloat16)
        xg = x.clone().requires_grad_()
        grad = torch.randn(tokens, N, device="cuda", dtype=torch.bfloat16)
        no_grad = {
            "F.linear bf16": lambda: torch.nn.functional.linear(x, plain.weight),
            "Linear4bit(x)": lambda: quant(x),
            "autograd.matmul_4bit": lambda: matmul_4bit(x, weight, state),
            "ops.matmul_4bit": lambda: ops.matmul_4bit(x, None, packed, *stats),
            "NativeOps.gemv_4bit": lambda: native.gemv_4bit(x, packed, *stats),
            "ext.matmul_4bit": lambda: native.ext.matmul_4bit(x, None, packed, *ext_args),
        }
        pieces = {
            "check_packed_matches": lambda: check_packed_matches(weight, state, "B"),
            "NativeOps._check_matmul": lambda: native._check_matmul(x, packed, None, *stats),
            "NativeOps._state_args": lambda: native._state_args(packed, *stats),
            "Params4bit.quant_state": lambda: weight.quant_state,
        }
        grads = {
            "fwd+bwd Linear4bit": lambda: torch.autograd.grad(quant(xg), xg, grad),
            "fwd+bwd extension node": lambda: torch.autograd.grad(
                native.ext.matmul_4bit_autograd(xg, None, packed, *ext_args), xg, grad
            ),
            "fwd+bwd bf16 nn.Linear": lambda: torch.autograd.grad(plain(xg), xg, grad),
        }
        with torch.no_grad():
            times = {name: issue_us(fn) for name, fn in no_grad.items()}
        times |= {name: issue_us(fn) for name, fn in (pieces | grads).items()}
        for name, us in times.items():
            print(f"{N}x{K} {tokens:5d} tokens  {name:26s} {us:7.1f} us", flush=True)


if __name__ == "__main__":
    main()
