"""Where the time of a 4-bit Linear forward goes on a GPU (14336x4096 NF4 bs64 double quant, bf16).

Each piece is timed three ways: ``sync`` (one call between two events, synchronised after each call, as
bench/layer.py does: launch latency counts), ``stream`` (20 calls back to back between two events: GPU
time only) and ``cpu`` (host microseconds to enqueue one call). Pieces: dequantize alone, F.linear on
the dequantized weight, the ``fsdp4bit::matmul_4bit`` operator through the dispatcher, the eager
``ops.matmul_4bit`` entry point, ``Linear4bit.forward``, and bf16 F.linear; then a torch.profiler
kernel table of the layer and of bf16 F.linear, and the pieces of ``functional.quantize_4bit``.

    python bench/forward_breakdown.py [--tokens 4096] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from layer import cuda_ms as sync_ms  # one call between two events, the GPU idle before each call
from layer import event_ms, qlora_layer

import fsdp4bit as bnb
from fsdp4bit import ops
from fsdp4bit.codebooks import get_dynamic_map


def stream_ms(fn, calls: int = 20, reps: int = 5) -> float:
    """Median ms per call of ``calls`` back-to-back calls (launch latency hidden behind the GPU work)."""
    fn()
    torch.cuda.synchronize()

    def run():
        for _ in range(calls):
            fn()

    return statistics.median(t / calls for t in event_ms(run, reps))


def cpu_us(fn, calls: int = 20) -> float:
    """Host microseconds per call to enqueue ``fn`` (GPU drained before and after)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def measure(fn) -> dict[str, float]:
    return {"sync_ms": sync_ms(fn), "stream_ms": stream_ms(fn), "cpu_us": cpu_us(fn)}


def kernel_table(fn, label: str, calls: int = 3) -> list[dict]:
    """CUDA kernels one call launches (name, count per call, device µs per call), from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        dev_us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if evt.device_type.name == "CUDA" and dev_us > 0:
            rows.append({"kernel": evt.key[:110], "count": evt.count / calls, "us": dev_us / calls})
    rows.sort(key=lambda r: -r["us"])
    print(f"--- kernels of {label} (per call)")
    for r in rows[:12]:
        print(f"{r['us']:9.1f} us  x{r['count']:.0f}  {r['kernel']}")
    return rows[:12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    dev = "cuda"
    w, layer = qlora_layer(dev)
    in_f = w.shape[1]
    st = layer.weight.quant_state
    packed = bnb.functional.packed_bytes(layer.weight)
    stats = (*st.absmax_tensors(), st.blocksize, st.state2.blocksize, st.quant_type, list(st.shape))
    x = torch.randn(args.tokens, in_f, device=dev, dtype=torch.bfloat16)
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": args.tokens}
    with torch.no_grad():
        wdq = ops.dequantize_4bit(packed, *stats, torch.bfloat16)
        pieces = {
            "dequantize": lambda: ops.dequantize_4bit(packed, *stats, torch.bfloat16),
            "linear_on_dequantized": lambda: torch.nn.functional.linear(x, wdq),
            "matmul_4bit_dispatcher_op": lambda: torch.ops.fsdp4bit.matmul_4bit(x, None, packed, *stats),
            "matmul_4bit_eager_entry": lambda: ops.matmul_4bit(x, None, packed, *stats),
            "linear4bit_forward": lambda: layer(x),
            "bf16_linear": lambda: torch.nn.functional.linear(x, w),
        }
        res["no_grad"] = {name: measure(fn) for name, fn in pieces.items()}
        res["kernels_layer"] = kernel_table(lambda: layer(x), "Linear4bit.forward")
        res["kernels_bf16"] = kernel_table(lambda: torch.nn.functional.linear(x, w), "bf16 F.linear")
    xg = x.clone().requires_grad_(True)
    res["grad_enabled_forward"] = {
        "linear4bit_forward": measure(lambda: layer(xg)),
        "bf16_linear": measure(lambda: torch.nn.functional.linear(xg, w)),
    }
    code = get_dynamic_map(dev)
    absmax = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")[1].absmax
    native = bnb.kernels.native_for(dev)
    res["quantize"] = {
        "native_kernel": measure(lambda: native.quantize_4bit(w, 64, "nf4")),
        "ops_quantize_4bit": measure(lambda: ops.quantize_4bit(w, 64, "nf4")),
        "double_quant": measure(lambda: ops.double_quant(absmax, code, 256)),
        "functional_dq": measure(
            lambda: bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        ),
        "functional_plain": measure(lambda: bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4")),
    }
    for group in ("no_grad", "grad_enabled_forward", "quantize"):
        print(f"--- {group}")
        for name, m in res[group].items():
            print(
                f"{name:>28}: sync {m['sync_ms'] * 1e3:8.1f} us  stream {m['stream_ms'] * 1e3:8.1f} us  "
                f"cpu {m['cpu_us']:7.1f} us"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
