"""Does dequantizing the next layer's weight on a side stream hide it behind this layer's GEMM? (GPU)

A chain of 8 layers alternating 14336x4096 / 4096x14336 (NF4 bs64 double quant, bf16), forward only, at T tokens:
bf16 ``F.linear``; dequantize + ``F.linear`` in order; and the same with layer i + 1's dequantization issued on a
normal-priority side stream (after layer i - 1's GEMM) while layer i's GEMM runs on a high-priority stream. Prints
µs per layer and the ratio to bf16 (session 17, H100: no gain at 4096 tokens; NOTES.md). With ``--carveouts``, the
same through cuBLASLt with each SM carveout (``torch._C._set_sm_carveout_experimental``: the GEMMs leave that many
SMs to the side stream's dequantization), bf16 too (session 21, H100: the stacked forward at 4096 tokens
~1.05-1.08x, within the spread between machines; NOTES.md).

    python bench/dequant_prefetch.py [T] [--carveouts 2,4,8,16]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as Fn

from fsdp4bit import functional as F

LAYERS = 8


def with_blas(fn, carveout: int | None):
    """``fn`` run through cuBLASLt with ``carveout`` SMs left out of its GEMMs, the defaults restored after."""

    def run() -> torch.Tensor:
        torch.backends.cuda.preferred_blas_library("cublaslt")
        torch._C._set_sm_carveout_experimental(carveout)
        try:
            return fn()
        finally:
            torch._C._set_sm_carveout_experimental(None)
            torch.backends.cuda.preferred_blas_library("default")

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tokens", nargs="?", type=int, default=4096)
    parser.add_argument("--carveouts", default="", help="comma-separated SM carveouts to time through cuBLASLt")
    args = parser.parse_args()
    T = args.tokens
    torch.manual_seed(0)
    shapes = [(14336, 4096) if i % 2 == 0 else (4096, 14336) for i in range(LAYERS)]
    Ws = [torch.randn(s, device="cuda", dtype=torch.bfloat16) * 0.02 for s in shapes]
    Qs = [F.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4") for W in Ws]
    x0 = torch.randn(T, 4096, device="cuda", dtype=torch.bfloat16)
    hi, lo = torch.cuda.Stream(priority=-1), torch.cuda.Stream(priority=0)

    def deq(i: int) -> torch.Tensor:
        return F.dequantize_4bit(Qs[i][0], Qs[i][1])

    def bf16() -> torch.Tensor:
        x = x0
        for W in Ws:
            x = Fn.linear(x, W)
        return x

    def in_order() -> torch.Tensor:
        x = x0
        for i in range(LAYERS):
            x = Fn.linear(x, deq(i))
        return x

    def prefetch() -> torch.Tensor:
        keep = []  # every weight stays alive until both streams are joined
        lo.wait_stream(torch.cuda.current_stream())
        hi.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(lo):
            W = deq(0)
        ready = torch.cuda.Event()
        ready.record(lo)
        x = x0
        for i in range(LAYERS):
            before = torch.cuda.Event()
            before.record(hi)  # complete once layer i - 1's GEMM is
            if i + 1 < LAYERS:
                lo.wait_event(before)
                with torch.cuda.stream(lo):
                    W_next = deq(i + 1)
                ready_next = torch.cuda.Event()
                ready_next.record(lo)
            hi.wait_event(ready)
            with torch.cuda.stream(hi):
                x = Fn.linear(x, W)
            keep.append(W)
            if i + 1 < LAYERS:
                W, ready = W_next, ready_next
        torch.cuda.current_stream().wait_stream(hi)
        torch.cuda.current_stream().wait_stream(lo)
        return x

    fns = {"bf16": bf16, "dequantize + F.linear": in_order, "with the prefetch": prefetch}
    for c in (int(v) for v in args.carveouts.split(",") if v):
        fns[f"bf16, cuBLASLt carveout {c}"] = with_blas(bf16, c)
        fns[f"with the prefetch, cuBLASLt carveout {c}"] = with_blas(prefetch, c)
    print("prefetch output equals the in-order one:", torch.equal(in_order(), prefetch()))
    for f in fns.values():
        for _ in range(3):
            f()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(15):
        for k, f in fns.items():
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            f()
            e.record()
            e.synchronize()
            times[k].append(s.elapsed_time(e))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"T={T}, {LAYERS} layers: "
        + ", ".join(f"{k} {v / LAYERS * 1e3:.1f} us ({v / med['bf16']:.3f}x)" for k, v in med.items())
    )


if __name__ == "__main__":
    main()
