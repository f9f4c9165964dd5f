"""The fused 4-bit GEMM (csrc/cuda/gemm.cuh: Hopper wgmma, weights dequantized in registers) against
dequantize + cuBLAS, at every M, including shapes where fsdp4bit does not take it (``applied`` in the JSON).

It is called through the extension's own entry point (``gemm_4bit``), checked first (every output written,
relative error against a float64 reference within that of dequantize + F.linear), then timed with
bench/layer.py's ``batched_ms`` (batches of 10 calls back to back between two events, the three sides taking
turns, median of 15 batches) against bf16 F.linear, dequantize + F.linear and fsdp4bit.matmul_4bit (which
takes the fused GEMM where ``applied``) for an M sweep on four weight shapes. Results: NOTES.md ("Fused 4-bit GEMM").

    python bench/gemm4_fused.py [--json bench/results/gemm4_fused_<gpu>.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from layer import batched_ms

import fsdp4bit
import fsdp4bit.functional as Fq
from fsdp4bit import kernels
from fsdp4bit.codebooks import get_4bit_code


def quantized(N: int, K: int, dtype: torch.dtype, bs: int, nested: bool, quant_type: str = "nf4"):
    W = torch.randn(N, K, device="cuda", dtype=dtype)
    return Fq.quantize_4bit(W, blocksize=bs, compress_statistics=nested, quant_type=quant_type)


def fused(ext, A: torch.Tensor, packed: torch.Tensor, st, N: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A @ W.T + bias through the extension's fused GEMM, whatever fsdp4bit's dispatch would pick."""
    code, K, packed = get_4bit_code(st.quant_type), A.shape[1], Fq.packed_bytes(packed)
    if st.nested:
        nested = (st.state2.absmax, st.state2.code, st.offset)
        return ext.gemm_4bit(A, packed, st.absmax, *nested, st.blocksize, st.state2.blocksize, code, N, K, bias)
    return ext.gemm_4bit(A, packed, st.absmax, None, None, None, st.blocksize, 256, code, N, K, bias)


def check(ext, M, N, K, dtype, bs, nested, quant_type="nf4") -> bool:
    packed, st = quantized(N, K, dtype, bs, nested, quant_type)
    A = torch.randn(M, K, device="cuda", dtype=dtype)
    torch.full((M, N), float("nan"), device="cuda", dtype=dtype)  # poison the memory the output will reuse
    out = fused(ext, A, packed, st, N)
    Wd = Fq.dequantize_4bit(packed, st)
    ref = A.double() @ Wd.double().T
    err = ((out.double() - ref).norm() / ref.norm()).item()
    err_cublas = ((F.linear(A, Wd).double() - ref).norm() / ref.norm()).item()
    unwritten = int(torch.isnan(out).sum())
    ok = unwritten == 0 and err <= 1.5 * err_cublas + 1e-6
    print(
        f"check {M}x{N}x{K} {str(dtype)[6:]} bs{bs} nested={nested} {quant_type}: rel err {err:.2e} "
        f"(dequantize + F.linear {err_cublas:.2e}), NaN {unwritten}: {'ok' if ok else 'FAIL'}",
        flush=True,
    )
    return ok


def graphed(fn, calls: int):
    """``calls`` calls of ``fn`` captured in one CUDA graph: a replay times the GPU alone, not Python."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay


def hopper_setup(
    doc: str, parser: argparse.ArgumentParser | None = None
) -> tuple[argparse.Namespace, kernels.NativeOps | None]:
    """(the parsed arguments, --json and those of ``parser`` if given, the CUDA kernels), or None kernels without a
    compute capability 9.0 GPU; exits when the extension did not build."""
    parser = parser or argparse.ArgumentParser(description=doc)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        print("needs a compute capability 9.0 GPU (H100/H200); nothing run")
        return args, None
    native = kernels.native_for("cuda")
    if native is None:
        sys.exit("the CUDA extension did not build")
    return args, native


def main() -> None:
    args, native = hopper_setup(__doc__)
    if native is None:
        return
    ext = native.ext
    cases = [
        (300, 1000, 640, torch.bfloat16, 64, True),
        (4096, 14336, 4096, torch.bfloat16, 64, True),
        (257, 129, 64, torch.float16, 128, False),
        (1000, 4096, 14336, torch.bfloat16, 64, True),
        (513, 384, 4160, torch.float16, 64, True, "fp4"),
        (77, 131, 128, torch.float16, 64, False),
        (200, 4096, 4096, torch.bfloat16, 64, True),  # split-K: 16 tiles x 8 parts
        (33, 1000, 4160, torch.float16, 128, False),  # split-K: 8 tiles, 65 k steps in 8 unequal parts
    ]
    if not all([check(ext, *c) for c in cases]):
        sys.exit("fused GEMM check failed")
    rows = []
    for N, K in [(14336, 4096), (4096, 14336), (4096, 4096), (1024, 4096), (28672, 8192)]:
        packed, st = quantized(N, K, torch.bfloat16, 64, True)
        W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        for M in [16, 32, 64, 128, 256, 512, 768, 1024, 1536, 2048, 4096, 8192]:
            A = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ms = batched_ms(
                {
                    "bf16": lambda: F.linear(A, W),
                    "dequant": lambda: F.linear(A, Fq.dequantize_4bit(packed, st)),
                    "fused": lambda: fused(ext, A, packed, st, N),
                    "matmul_4bit": lambda: fsdp4bit.matmul_4bit(A, packed, st),
                },
                reps=15,
            )
            r = {"M": M, "N": N, "K": K, **{k: v * 1000 for k, v in ms.items()}}
            r["applied"] = native.gemm_applies(A, 64, (N, K))
            r["fused_tflops"] = 2 * M * N * K / r["fused"] / 1e6
            r["bf16_tflops"] = 2 * M * N * K / r["bf16"] / 1e6
            rows.append(r)
            print(
                f"{M:5d}x{N}x{K}: bf16 {r['bf16']:8.1f} us ({r['bf16_tflops']:4.0f} TFLOP/s)  dequant+F.linear "
                f"{r['dequant']:8.1f}  fused {r['fused']:8.1f} ({r['fused_tflops']:4.0f})  fused/dequant "
                f"{r['fused'] / r['dequant']:.3f}  matmul_4bit {r['matmul_4bit']:8.1f}  applied {r['applied']}",
                flush=True,
            )
    dump_rows(args.json, rows)


def dump_rows(path: str | None, rows: list[dict]) -> None:
    """The benchmark's rows and the GPU's name as JSON at ``path`` (nothing without one)."""
    if path:
        with open(path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
