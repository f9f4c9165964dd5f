"""QLoRA-layer timings on a GPU: 4-bit Linear4bit vs bf16 F.linear in the same run.

- forward+backward (gradient to the input only, the weight is frozen) at 8192 tokens, 14336x4096, and at 256
  tokens (where both directions take the fused 4-bit GEMM on Hopper);
- forward matmul at 4096 tokens;
- the whole ``functional.quantize_4bit`` (NF4 bs64, double quant), i.e. kernel + double-quant statistics.

The ratios come from back-to-back batches (``batched_ms``: 10 calls between two events, the two sides
alternating batch by batch, so clock drift and host time between calls cancel); the synchronous one-call
timings (``cuda_ms``, the GPU idle before each call) are kept under "sync" for comparison with older runs.

    python bench/layer.py [--json bench/results/layer_<gpu>.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import fsdp4bit as bnb


def event_ms(run, reps: int) -> list[float]:
    """GPU milliseconds of ``run()`` between two CUDA events, ``reps`` times (shared by the bench scripts)."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def cuda_ms(fn, reps: int = 30, warmup: int = 5) -> float:
    """Median ms of one call, the GPU idle before each (host overhead included)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    return statistics.median(event_ms(fn, reps))


def batched_ms(fns: dict[str, object], calls: int = 10, reps: int = 21, warmup: int = 3) -> dict[str, float]:
    """Median ms per call of each function in ``fns``, run ``calls`` times back to back between two events; the
    functions take turns batch by batch."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / calls)
    return {name: statistics.median(t) for name, t in times.items()}


def qlora_layer(device: str, out_f: int = 14336, in_f: int = 4096) -> tuple[torch.Tensor, bnb.nn.Linear4bit]:
    """(bf16 weight, the same weight as an NF4 bs64 double-quant Linear4bit computing in bf16) on ``device``."""
    torch.manual_seed(0)
    w = torch.randn(out_f, in_f, device=device, dtype=torch.bfloat16) * 0.02
    layer = bnb.nn.Linear4bit(in_f, out_f, bias=False, quant_type="nf4", compute_dtype=torch.bfloat16)
    layer.weight = bnb.nn.Params4bit(w.clone(), quant_type="nf4", compress_statistics=True)
    return w, layer.to(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    dev = "cuda"
    w, layer = qlora_layer(dev)
    out_f, in_f = w.shape
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": [out_f, in_f]}
    sync = {}
    for tokens in (8192, 256):
        x = torch.randn(tokens, in_f, device=dev, dtype=torch.bfloat16, requires_grad=True)
        g = torch.randn(tokens, out_f, device=dev, dtype=torch.bfloat16)

        def ours():
            layer(x).backward(g)

        def ref():
            torch.nn.functional.linear(x, w).backward(g)

        res[f"fwd_bwd_{tokens}_ms"] = batched_ms({"fsdp4bit": ours, "bf16_linear": ref})
        sync[f"fwd_bwd_{tokens}_ms"] = {"fsdp4bit": cuda_ms(ours), "bf16_linear": cuda_ms(ref)}
    for tokens in (4096,):
        x = torch.randn(tokens, in_f, device=dev, dtype=torch.bfloat16)
        with torch.no_grad():
            fns = {"fsdp4bit": lambda: layer(x), "bf16_linear": lambda: torch.nn.functional.linear(x, w)}
            res[f"fwd_{tokens}_ms"] = batched_ms(fns)
            sync[f"fwd_{tokens}_ms"] = {name: cuda_ms(fn) for name, fn in fns.items()}
    res["sync"] = sync
    res["quantize_4bit_dq_us"] = 1000 * cuda_ms(
        lambda: bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    )
    res["quantize_4bit_us"] = 1000 * cuda_ms(lambda: bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4"))
    for val in [*res.values(), *sync.values()]:
        if isinstance(val, dict) and "bf16_linear" in val:
            val["ratio"] = val["fsdp4bit"] / val["bf16_linear"]
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
