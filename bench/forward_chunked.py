"""Experiment: can a 4-bit forward at 4096 tokens hide its dequantize behind the GEMM on a GPU?

Plain path: dequantize the whole 14336x4096 weight to bf16 in device memory (117 MB written, then read by
the GEMM), then one cuBLAS GEMM. Chunked path: dequantize S row-chunks of the weight in turn into a buffer
small enough to stay in the 50 MB L2 and run the GEMM of each chunk straight after, writing its columns of
the output in place (a (T, N) output viewed [:, rows] is a cuBLAS-compatible strided matrix). The
two-stream variant dequantizes chunk i + 1 while chunk i's GEMM runs. All times are GPU time of calls back
to back (bench/forward_breakdown.py's ``stream_ms``), against bf16 F.linear in the same run.

    python bench/forward_chunked.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch
from forward_breakdown import stream_ms
from layer import qlora_layer

import fsdp4bit as bnb
from fsdp4bit import kernels

BS, QT = 64, "nf4"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    native = kernels.native_for("cuda")
    w, layer = qlora_layer("cuda")
    N, K = w.shape
    st = layer.weight.quant_state
    packed = bnb.functional.packed_bytes(layer.weight)
    qabs, nested, ncode, offset = st.absmax_tensors()
    x = torch.randn(args.tokens, K, device="cuda", dtype=torch.bfloat16)

    def dequant_rows(r0: int, r1: int) -> torch.Tensor:
        e0, e1 = r0 * K, r1 * K
        b0, b1 = e0 // BS, e1 // BS
        return native.dequantize_4bit(
            packed[e0 // 2 : e1 // 2],
            qabs[b0:b1],
            nested[b0 // 256 :],
            ncode,
            offset,
            BS,
            256,
            QT,
            (r1 - r0, K),
            torch.bfloat16,
        )

    def plain():
        return torch.nn.functional.linear(x, dequant_rows(0, N))

    def chunked(S: int):
        rows = N // S

        def run():
            out = torch.empty(args.tokens, N, device="cuda", dtype=torch.bfloat16)
            for i in range(S):
                torch.mm(x, dequant_rows(i * rows, (i + 1) * rows).t(), out=out[:, i * rows : (i + 1) * rows])
            return out

        return run

    side = torch.cuda.Stream()

    def two_stream(S: int):
        rows = N // S

        def run():
            out = torch.empty(args.tokens, N, device="cuda", dtype=torch.bfloat16)
            main = torch.cuda.current_stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):
                bufs = [dequant_rows(0, rows)]
            for i in range(S):
                done = torch.cuda.Event()
                done.record(side)
                if i + 1 < S:
                    with torch.cuda.stream(side):
                        bufs.append(dequant_rows((i + 1) * rows, (i + 2) * rows))
                main.wait_event(done)
                buf = bufs[i]
                buf.record_stream(main)
                torch.mm(x, buf.t(), out=out[:, i * rows : (i + 1) * rows])
            return out

        return run

    ref = torch.nn.functional.linear(x, dequant_rows(0, N))
    res = {"device": torch.cuda.get_device_name(), "tokens": args.tokens, "shape": [N, K]}
    res["bf16_linear_ms"] = stream_ms(lambda: torch.nn.functional.linear(x, w))
    res["dequantize_ms"] = stream_ms(lambda: dequant_rows(0, N))
    res["plain_ms"] = stream_ms(plain)
    res["linear4bit_ms"] = stream_ms(lambda: layer(x))
    for S in (2, 4, 7, 8, 14):
        for name, make in (("chunked", chunked), ("two_stream", two_stream)):
            fn = make(S)
            assert torch.equal(fn(), ref), f"{name} S={S} differs from the plain path"
            res[f"{name}_{S}_ms"] = stream_ms(fn)
    base = res["bf16_linear_ms"]
    for key in list(res):
        if key.endswith("_ms"):
            print(f"{key:22s} {res[key]:.4f} ms  {res[key] / base:.3f}x bf16")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
