"""Kernel benchmark: fsdp4bit's native quantize / dequantize / 1-token gemv against the memory floor and
the incumbents (bitsandbytes, torchao) where importable, plus bf16 F.linear.

GPU (default): NF4, blocksize 64, double quant, bf16, shapes 4096x4096 ... 28672x8192. Each timing is the
median over replays of a CUDA graph that runs the op REPS times, cycling through enough input sets that
they overflow the L2 cache (so small shapes are not flattered); eager back-to-back timing is the fallback
when an op cannot be captured. Floor = bytes the op must move / measured device-to-device copy bandwidth.
On sm_90 the 1-token gemvs are programmatic dependent launches, so back to back each one starts during the
previous one's tail (a decode step's projections do the same); ``FSDP4BIT_NO_PDL=1`` times them launched plainly.
``--cpu``: the CPU kernels on this machine, with the PyTorch reference and bitsandbytes' CPU backend. On a GPU
machine without network, ``bench/incumbents.py`` stages bitsandbytes and torchao to put on PYTHONPATH.

    python bench/kernels.py            # GPU table, JSON in bench/results/kernels_<device>.json
    python bench/kernels.py --cpu      # CPU table, JSON in bench/results/kernels_cpu.json
    FSDP4BIT_NO_PDL=1 python bench/kernels.py --json bench/results/kernels_<device>_no_pdl.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from layer import event_ms  # noqa: E402

from fsdp4bit import kernels, reference  # noqa: E402
from fsdp4bit.codebooks import get_dynamic_map  # noqa: E402

SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192))
BS, QT = 64, "nf4"
RESULTS = Path(__file__).resolve().parent / "results"


def double_quant(absmax: torch.Tensor):
    """bitsandbytes-style double quant of a float32 absmax: (uint8 codes, nested absmax, code, offset)."""
    code = get_dynamic_map(absmax.device)
    offset = absmax.mean()
    q, nested = reference.quantize_blockwise(absmax - offset, code, 256)
    return q, nested, code, offset


def try_import(name: str):
    try:
        return importlib.import_module(name)
    except Exception:  # noqa: BLE001 - optional competitor, any import failure means: skip it
        return None


# ----------------------------------------------------------------------------------------- GPU
def torchao_to_nf4():
    """torchao's ``to_nf4`` (``torchao.quantization`` since 0.18, ``torchao.dtypes.nf4tensor`` before)."""
    try:
        from torchao.quantization import to_nf4
    except ImportError:
        from torchao.dtypes.nf4tensor import to_nf4
    return to_nf4


def l2_bytes() -> int:
    """The GPU's L2 size (50 MB where torch does not report it): input sets are rotated past 4x that."""
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)


def gemv_bytes(N: int, K: int) -> int:
    """Bytes a 1-token gemv of an NF4 bs64 double-quant (N, K) weight must move: packed W, uint8 absmax, the nested
    absmax, a and the output."""
    nb = N * K // BS
    return N * K // 2 + nb + 4 * math.ceil(nb / 256) + 2 * K + 2 * N


def gemv_call(native, state: tuple, x: torch.Tensor, N: int, K: int):
    """One 1-token gemv of ``state`` (packed, uint8 absmax, nested absmax, nested code, offset) on ``native``."""
    return lambda: native.gemv_4bit(x, *state, BS, 256, QT, (N, K))


def gpu_time_us(fns, reps: int = 20, replays: int = 7) -> tuple[float, str]:
    """Median microseconds per call over CUDA-graph replays (``fns`` cycled); eager timing as fallback."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for f in fns:  # warm the allocator on the side stream
                f()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(reps):
                fns[i % len(fns)]()
        mode = "graph"
        run = graph.replay
    except Exception:  # noqa: BLE001 - not capturable: time eagerly
        torch.cuda.synchronize()
        mode = "eager"

        def run():
            for i in range(reps):
                fns[i % len(fns)]()

    run()
    torch.cuda.synchronize()
    return statistics.median(t * 1e3 / reps for t in event_ms(run, replays)), mode


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + written): the faster of ``copy_`` (a DMA memcpy,
    ~2.43 TB/s on an H100) and an elementwise kernel (~2.8 TB/s), so the floor is the stricter one."""
    n = 1 << 30
    src = torch.rand(n // 4, device="cuda")
    dst = torch.empty_like(src)
    us_copy, _ = gpu_time_us([lambda: dst.copy_(src)], reps=10)
    us_kernel, _ = gpu_time_us([lambda: torch.mul(src, 1.0, out=dst)], reps=10)
    return 2 * n / (min(us_copy, us_kernel) * 1e-6)


def bench_gpu(shapes) -> dict:
    native = kernels.native_for("cuda")
    if native is None:
        raise SystemExit("no native CUDA kernels (see the warning above)")
    bnb = try_import("bitsandbytes")
    torchao = try_import("torchao")
    bw = copy_bandwidth()
    props = torch.cuda.get_device_properties(0)
    l2 = l2_bytes()
    info = {
        "device": props.name,
        "torch": torch.__version__,
        "copy_bw_TBps": bw / 1e12,
        "build_s": kernels.build_seconds("cuda"),
        "bitsandbytes": getattr(bnb, "__version__", None),
        "torchao": getattr(torchao, "__version__", None),
    }
    rows = []
    for N, K in shapes:
        n = N * K
        w_bytes = 2 * n
        sets = max(2, math.ceil(4 * l2 / w_bytes))
        Ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
        states = []
        for W in Ws:
            packed, absmax, _ = native.quantize_4bit(W, BS, QT)
            states.append((packed, *double_quant(absmax)))
        xs = [torch.randn(1, K, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
        nb = n // BS
        q_bytes = w_bytes + n // 2 + 4 * nb
        dq_bytes = n // 2 + nb + 4 * math.ceil(nb / 256) + 2 * n
        row = {
            "shape": f"{N}x{K}",
            "sets": sets,
            "floor_quantize_us": q_bytes / bw * 1e6,
            "floor_dequantize_us": dq_bytes / bw * 1e6,
            "floor_gemv_us": gemv_bytes(N, K) / bw * 1e6,
        }

        def dq(s):
            return lambda: native.dequantize_4bit(s[0], s[1], s[2], s[3], s[4], BS, 256, QT, (N, K), torch.bfloat16)

        row["fsdp4bit_quantize_us"], _ = gpu_time_us([lambda W=W: native.quantize_4bit(W, BS, QT) for W in Ws])
        row["fsdp4bit_dequantize_us"], _ = gpu_time_us([dq(s) for s in states])
        row["fsdp4bit_gemv_us"], _ = gpu_time_us([gemv_call(native, s, x, N, K) for s, x in zip(states, xs)])
        row["bf16_linear_us"], _ = gpu_time_us(
            [lambda W=W, x=x: torch.nn.functional.linear(x, W) for W, x in zip(Ws, xs)]
        )
        fn = try_import("fsdp4bit.functional")
        if fn is not None and hasattr(fn, "quantize_4bit"):
            try:
                row["fsdp4bit_functional_quantize_us"], row["functional_mode"] = gpu_time_us(
                    [
                        lambda W=W: fn.quantize_4bit(W, blocksize=BS, quant_type=QT, compress_statistics=True)
                        for W in Ws
                    ],
                    reps=5,
                )
            except Exception as exc:  # noqa: BLE001 - the lead's API may differ; report, don't fail
                row["functional_error"] = repr(exc)[:200]
        if bnb is not None:
            import bitsandbytes.functional as bf

            bstates = [bf.quantize_4bit(W, blocksize=BS, quant_type=QT, compress_statistics=True) for W in Ws]
            row["bnb_quantize_us"], _ = gpu_time_us(
                [lambda W=W: bf.quantize_4bit(W, blocksize=BS, quant_type=QT, compress_statistics=True) for W in Ws]
            )
            row["bnb_dequantize_us"], _ = gpu_time_us([lambda s=s: bf.dequantize_4bit(*s) for s in bstates])
            row["bnb_gemv_us"], _ = gpu_time_us(
                [lambda s=s, x=x: bnb.matmul_4bit(x, s[0].t(), quant_state=s[1]) for s, x in zip(bstates, xs)]
            )
        if torchao is not None:
            try:
                to_nf4 = torchao_to_nf4()
                ts = [to_nf4(W, BS, 256) for W in Ws]
                row["torchao_quantize_us"], _ = gpu_time_us([lambda W=W: to_nf4(W, BS, 256) for W in Ws], reps=5)
                row["torchao_dequantize_us"], _ = gpu_time_us([lambda t=t: t.get_original_weight() for t in ts], reps=5)
                row["torchao_gemv_us"], _ = gpu_time_us(
                    [lambda t=t, x=x: torch.nn.functional.linear(x, t) for t, x in zip(ts, xs)], reps=5
                )
            except Exception as exc:  # noqa: BLE001
                row["torchao_error"] = repr(exc)[:200]
        rows.append(row)
        del Ws, states, xs
        torch.cuda.empty_cache()
    return {"info": info, "rows": rows}


def print_gpu(res: dict) -> None:
    info = res["info"]
    print(
        f"\n{info['device']}  torch {info['torch']}  copy {info['copy_bw_TBps']:.2f} TB/s  "
        f"NF4 bs{BS} double-quant bf16; us, median; %floor = floor / time"
    )
    hdr = (
        f"{'shape':>12} | {'quant':>7} {'floor':>6} {'%':>4} | {'dequant':>7} {'floor':>6} {'%':>4} | "
        f"{'gemv':>6} {'floor':>6} {'%':>4} | {'bf16 lin':>8} | {'bnb q/dq/gemv':>18} | {'torchao q/dq/gemv':>18}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in res["rows"]:

        def pct(op):
            return 100 * r[f"floor_{op}_us"] / r[f"fsdp4bit_{op}_us"]

        def others(lib):
            ops = (f"{lib}_quantize_us", f"{lib}_dequantize_us", f"{lib}_gemv_us")
            return "/".join(f"{r[k]:.0f}" for k in ops if k in r) or "n/a"

        print(
            f"{r['shape']:>12} | {r['fsdp4bit_quantize_us']:7.1f} {r['floor_quantize_us']:6.1f} {pct('quantize'):4.0f} | "
            f"{r['fsdp4bit_dequantize_us']:7.1f} {r['floor_dequantize_us']:6.1f} {pct('dequantize'):4.0f} | "
            f"{r['fsdp4bit_gemv_us']:6.1f} {r['floor_gemv_us']:6.1f} {pct('gemv'):4.0f} | "
            f"{r['bf16_linear_us']:8.1f} | {others('bnb'):>18} | {others('torchao'):>18}"
        )
        if "fsdp4bit_functional_quantize_us" in r:
            print(
                f"{'':>12}   functional.quantize_4bit (with double quant): {r['fsdp4bit_functional_quantize_us']:.1f} us"
            )
        for lib in ("bnb", "torchao"):
            # speed-ups over the library in the same run: its quantize (bitsandbytes' with double quant) against
            # fsdp4bit's whole functional.quantize_4bit with double quant
            pairs = (
                ("quantize", "fsdp4bit_functional_quantize_us"),
                ("dequantize", "fsdp4bit_dequantize_us"),
                ("gemv", "fsdp4bit_gemv_us"),
            )
            got = [
                f"{op} {r[f'{lib}_{op}_us'] / r[ours]:.2f}x"
                for op, ours in pairs
                if f"{lib}_{op}_us" in r and ours in r
            ]
            if got:
                print(f"{'':>12}   fsdp4bit's speed-up over {lib}: " + ", ".join(got))
        if "torchao_error" in r:
            print(f"{'':>12}   torchao: {r['torchao_error']}")


# ----------------------------------------------------------------------------------------- CPU
def cpu_time_ms(fn, reps: int = 9) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bench_cpu(shapes) -> dict:
    native = kernels.native_for("cpu")
    bnb = try_import("bitsandbytes")
    fn = try_import("fsdp4bit.functional")
    info = {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "build_s": kernels.build_seconds("cpu"),
        "bitsandbytes": getattr(bnb, "__version__", None),
        "native": native is not None,
    }
    rows = []
    for N, K in shapes:
        W = torch.randn(N, K, dtype=torch.bfloat16)
        x = torch.randn(1, K, dtype=torch.bfloat16)
        row = {"shape": f"{N}x{K}"}
        packed, absmax = reference.quantize_4bit(W, BS, QT)
        q8, nested, code, offset = double_quant(absmax)
        row["reference_quantize_ms"] = cpu_time_ms(lambda: reference.quantize_4bit(W, BS, QT), reps=3)
        row["reference_dequantize_ms"] = cpu_time_ms(
            lambda: reference.dequantize_4bit(
                packed, reference.absmax_float32(q8, nested, code, offset, 256), BS, QT, N * K, torch.bfloat16
            ),
            reps=3,
        )
        if native is not None:
            row["fsdp4bit_quantize_ms"] = cpu_time_ms(lambda: native.quantize_4bit(W, BS, QT))
            row["fsdp4bit_dequantize_ms"] = cpu_time_ms(
                lambda: native.dequantize_4bit(packed, q8, nested, code, offset, BS, 256, QT, (N, K), torch.bfloat16)
            )
            row["fsdp4bit_gemv_ms"] = cpu_time_ms(
                lambda: native.gemv_4bit(x, packed, q8, nested, code, offset, BS, 256, QT, (N, K))
            )
        if fn is not None and hasattr(fn, "quantize_4bit"):
            try:
                row["fsdp4bit_functional_quantize_ms"] = cpu_time_ms(
                    lambda: fn.quantize_4bit(W, blocksize=BS, quant_type=QT, compress_statistics=True)
                )
            except Exception as exc:  # noqa: BLE001 - the lead's API may differ; report, don't fail
                row["functional_error"] = repr(exc)[:200]
        row["bf16_linear_ms"] = cpu_time_ms(lambda: torch.nn.functional.linear(x, W))
        if bnb is not None:
            import bitsandbytes.functional as bf

            bq, bst = bf.quantize_4bit(W, blocksize=BS, quant_type=QT, compress_statistics=True)
            row["bnb_quantize_ms"] = cpu_time_ms(
                lambda: bf.quantize_4bit(W, blocksize=BS, quant_type=QT, compress_statistics=True), reps=3
            )
            row["bnb_dequantize_ms"] = cpu_time_ms(lambda: bf.dequantize_4bit(bq, bst))
            row["bnb_gemv_ms"] = cpu_time_ms(lambda: bnb.matmul_4bit(x, bq.t(), quant_state=bst))
        rows.append(row)
    return {"info": info, "rows": rows}


def print_cpu(res: dict) -> None:
    info = res["info"]
    print(
        f"\nCPU {info['cpu']}  {info['threads']} threads  torch {info['torch']}  NF4 bs{BS} double-quant bf16; ms, median"
    )
    cols = [("quantize", "quantize"), ("dequant", "dequantize"), ("gemv", "gemv")]
    print(f"{'shape':>10} | {'op':>8} | {'fsdp4bit':>9} | {'reference':>9} | {'bnb':>8} | speed-up vs bnb")
    for r in res["rows"]:
        for label, op in cols:
            ours, ref, bnb = r.get(f"fsdp4bit_{op}_ms"), r.get(f"reference_{op}_ms"), r.get(f"bnb_{op}_ms")
            f = lambda v: f"{v:9.2f}" if v is not None else f"{'n/a':>9}"  # noqa: E731
            sp = f"{bnb / ours:.1f}x" if ours and bnb else "n/a"
            print(f"{r['shape']:>10} | {label:>8} | {f(ours)} | {f(ref)} | {f(bnb)[1:]} | {sp}")
        if "fsdp4bit_functional_quantize_ms" in r:
            print(
                f"{'':>10}   functional.quantize_4bit (with double quant): {r['fsdp4bit_functional_quantize_ms']:.2f} ms"
            )
        print(f"{'':>10}   bf16 F.linear (1 token): {r['bf16_linear_ms']:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="benchmark the CPU kernels instead of the GPU ones")
    parser.add_argument(
        "--shapes", default=None, help="comma-separated NxK list (default: the standard set; CPU: 4096x4096)"
    )
    parser.add_argument(
        "--json", default=None, help="where to write the results (default: bench/results/kernels_<device>.json)"
    )
    args = parser.parse_args()
    shapes = SHAPES
    if args.shapes:
        shapes = tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes.split(","))
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.cpu:
        res = bench_cpu(shapes if args.shapes else ((4096, 4096),))
        print_cpu(res)
        out = RESULTS / "kernels_cpu.json"
    else:
        res = bench_gpu(shapes)
        print_gpu(res)
        out = RESULTS / f"kernels_{torch.cuda.get_device_name(0).replace(' ', '_')}.json"
    out = Path(args.json) if args.json else out
    out.write_text(json.dumps(res, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
