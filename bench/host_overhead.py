"""Host (Python) time of one 4-bit linear call, against ``torch.nn.Linear`` of the same shape in the same run.

With one sequence per rank, a QLoRA step launches many tiny kernels and the GPU waits on the host: what
then matters is the Python time ``Linear4bit`` spends around its kernels. This benchmark measures it
with shapes small enough (256x256 by default) that the kernels cost little: per call, the forward
under ``torch.no_grad``, the same through bitsandbytes' idiom ``matmul_4bit(x, weight.t(), quant_state=...)``
(what transformers and peft call), the forward recording autograd (input requiring grad, no backward) and the
forward+backward (gradient to the input only, both layers frozen) of

- ``Linear4bit`` (NF4, blocksize 64, double-quantized statistics, bfloat16 storage, computing in float32
  on the CPU and bfloat16 on CUDA), and
- ``torch.nn.Linear`` with the same weight, in the compute dtype (both without bias unless ``--bias``),

for many rows (> 16: dequantize + one matmul) and for one row (the gemv kernel). Each case is timed with
``time.perf_counter`` over ``--iters`` calls after ``--warmup`` calls, ``--repeats`` times; the best of the
repeats is printed (as ``timeit`` does: on a shared machine the slower loops measure the neighbours). On
CUDA the device is synchronized only before and after each timed loop. ``--clock cpu`` times with
``time.thread_time`` instead, the CPU time of the calling thread: on a host shared with other work it leaves
out the time the thread waits for a core (with ``--threads 1`` on the CPU, so the kernels run in that thread).

``--compile`` times both layers ``torch.compile``d (no bitsandbytes idiom case): the host time of a compiled
graph's call, its guards and the operators it calls (the fsdp4bit:: operators' C++ kernels, CPU and CUDA).

    python bench/host_overhead.py [--device cuda] [--compile] [--json bench/results/host_overhead_<device>.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

import fsdp4bit as bnb
from fsdp4bit import kernels


def layers(features: int, device: str, dtype: torch.dtype, bias: bool) -> tuple[torch.nn.Linear, bnb.nn.Linear4bit]:
    """(plain frozen nn.Linear in ``dtype``, the same weight as a frozen NF4 Linear4bit computing in ``dtype``)."""
    torch.manual_seed(0)
    plain = torch.nn.Linear(features, features, bias=bias, device=device, dtype=dtype).requires_grad_(False)
    quant = bnb.nn.Linear4bit(
        features,
        features,
        bias=bias,
        compute_dtype=dtype,
        compress_statistics=True,
        quant_type="nf4",
        quant_storage=torch.bfloat16,
    )
    quant.weight = bnb.nn.Params4bit(
        plain.weight.detach().clone(), quant_type="nf4", compress_statistics=True, quant_storage=torch.bfloat16
    )
    if bias:
        quant.bias = torch.nn.Parameter(plain.bias.detach().clone(), requires_grad=False)
    return plain, quant.to(device)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}


def us_per_call(
    fn: Callable[[], object], device: str, iters: int, warmup: int, repeats: int, clock: Callable[[], float]
) -> float:
    """Best over ``repeats`` of the mean microseconds (of ``clock``) of one ``fn()`` call."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    rounds = []
    for _ in range(repeats):
        sync()
        start = clock()
        for _ in range(iters):
            fn()
        sync()
        rounds.append((clock() - start) / iters * 1e6)
    return min(rounds)


def forward_no_grad(layer: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.no_grad():
            return layer(x)

    return run


def matmul_transposed_no_grad(layer: bnb.nn.Linear4bit, x: torch.Tensor) -> Callable[[], object]:
    """bitsandbytes' own idiom (transformers and peft call it): ``matmul_4bit(x, weight.t(), quant_state=...)``."""

    def run() -> object:
        with torch.no_grad():
            return bnb.matmul_4bit(x, layer.weight.t(), quant_state=layer.weight.quant_state, bias=layer.bias)

    return run


def forward_grad(layer: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        return layer(x)

    return run


def forward_backward(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        return torch.autograd.grad(layer(x), x, grad)

    return run


def measure(args: argparse.Namespace) -> dict:
    device = args.device
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    plain, quant = layers(args.features, device, dtype, args.bias)
    if args.compile:
        plain, quant = torch.compile(plain), torch.compile(quant)
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "backend": kernels.backend_name(device),
        "threads": torch.get_num_threads(),
        "features": args.features,
        "bias": args.bias,
        "dtype": str(dtype).removeprefix("torch."),
        "iters": args.iters,
        "repeats": args.repeats,
        "clock": args.clock,
        "compiled": args.compile,
        "cases": [],
    }
    for rows in (args.rows, 1):
        x = torch.randn(rows, args.features, device=device, dtype=dtype)
        xg = x.clone().requires_grad_(True)
        grad = torch.randn(rows, args.features, device=device, dtype=dtype)
        cases = [
            ("forward no_grad", (forward_no_grad(quant, x), forward_no_grad(plain, x))),
            ("matmul_4bit(W.t())", (matmul_transposed_no_grad(quant, x), forward_no_grad(plain, x))),
            ("forward grad", (forward_grad(quant, xg), forward_grad(plain, xg))),
            ("forward+backward", (forward_backward(quant, xg, grad), forward_backward(plain, xg, grad))),
        ]
        if args.compile:  # the bitsandbytes idiom is an eager call
            cases = [case for case in cases if case[0] != "matmul_4bit(W.t())"]
        if args.cases:  # a subset, each timed with less of the others' noise around it
            cases = [case for case in cases if case[0] in args.cases]
        for name, fns in cases:
            q_us, p_us = (
                us_per_call(fn, device, args.iters, args.warmup, args.repeats, CLOCKS[args.clock]) for fn in fns
            )
            result["cases"].append({"rows": rows, "case": name, "linear4bit_us": q_us, "linear_us": p_us})
    return result


def print_table(result: dict) -> None:
    bias = " with bias" if result["bias"] else ""
    compiled = ", compiled" if result["compiled"] else ""
    print(
        f"device {result['device']} ({result['backend']}{compiled}), torch {result['torch']}, {result['threads']} threads, "
        f"{result['features']}x{result['features']} {result['dtype']}{bias}, {result['clock']} us per call "
        f"(best of {result['repeats']} x {result['iters']} calls)"
    )
    print(f"{'rows':>5} {'case':<18} {'Linear4bit':>11} {'nn.Linear':>10} {'4bit-plain':>11}")
    for c in result["cases"]:
        diff = c["linear4bit_us"] - c["linear_us"]
        print(f"{c['rows']:>5} {c['case']:<18} {c['linear4bit_us']:>11.1f} {c['linear_us']:>10.1f} {diff:>11.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--features", type=int, default=256, help="in and out features of the square layer")
    parser.add_argument("--bias", action="store_true", help="give both layers a (frozen) bias")
    parser.add_argument("--rows", type=int, default=64, help="rows of the many-row case (> 16: dequantize path)")
    parser.add_argument("--iters", type=int, default=2000, help="calls per timed loop")
    parser.add_argument("--warmup", type=int, default=200, help="untimed calls before each case")
    parser.add_argument("--repeats", type=int, default=5, help="timed loops per case (the best is reported)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall", help="wall: perf_counter, cpu: thread_time")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--compile", action="store_true", help="time both layers torch.compile'd")
    parser.add_argument(
        "--cases",
        type=lambda text: text.split(","),
        default=None,
        help='comma-separated case names to time (e.g. "forward no_grad,forward+backward"; default: all)',
    )
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.rows <= 16:
        parser.error("--rows must be > 16 so the dequantize + matmul path runs")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = measure(args)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
