"""A Llama-3-8B-shaped decoder stack under FSDP2: 4-bit NF4 base + LoRA against a bf16 base + LoRA.

    torchrun --nproc_per_node=N bench/fsdp_stack.py [--layers 4] [--seq 2048] [--steps 8] [--compile] [--json out.json]

Random weights (this measures speed and memory, not quality). For each base, one process per GPU: tokens/s
over all ranks, step time, peak memory per GPU, the bytes each rank receives from FSDP2's all-gathers per step
(counted at the ``torch.distributed`` all-gather FSDP2 calls) and their GPU time (profiler,
one step). ``--tiny`` shrinks the shapes so the script runs with gloo on CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from transformers import LlamaConfig, LlamaForCausalLM

import fsdp4bit as bnb
from fsdp4bit.train.config import LoraSection, ModelConfig
from fsdp4bit.train.lora import attach_lora
from fsdp4bit.train.model import decoder_blocks, quantized_weight, replace_linears, shard

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


class GatherCounter:
    """Counts the bytes FSDP2's all-gathers deliver to this rank (their output buffers). FSDP2 calls
    ``dist.all_gather_into_tensor`` (torch 2.11) or ``dist.all_gather_single`` (torch 2.13): both are wrapped."""

    NAMES = ("all_gather_into_tensor", "all_gather_single")

    def __init__(self) -> None:
        self.bytes = 0
        self._orig = {name: getattr(dist, name) for name in self.NAMES if hasattr(dist, name)}

    def __enter__(self) -> GatherCounter:
        for name, orig in self._orig.items():

            def counted(output, input, *args, _orig=orig, **kwargs):
                self.bytes += output.numel() * output.element_size()
                return _orig(output, input, *args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        for name, orig in self._orig.items():
            setattr(dist, name, orig)


# the base's 4-bit format, in the trainer's terms (its linear swap keeps lm_head in float)
QUANT = ModelConfig(
    dtype="bfloat16",
    quant_type="nf4",
    blocksize=64,
    compress_statistics=True,
    quant_storage="bfloat16",
    compute_dtype="bfloat16",
)


def to_4bit(model: nn.Module, device: torch.device) -> None:
    """Swap the decoder's float linears for the trainer's Linear4bit (``QUANT``), quantizing their weights on
    ``device``."""
    floats = {name: m.weight.data for name, m in model.named_modules() if type(m) is nn.Linear}
    replace_linears(model, QUANT)
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.weight = quantized_weight(floats[name], module, QUANT, device)


def build(base: str, shapes: dict, layers: int, device: torch.device, mesh, compile_blocks: bool = False) -> nn.Module:
    """The stack with frozen ``base`` ("nf4" or "bf16") linears and rank-16 LoRA on all of them (the trainer's
    ``attach_lora``), sharded by FSDP2 as the trainer shards (``shard``: each decoder block, then the root);
    ``compile_blocks`` compiles each block before sharding it (the trainer's ``model.compile``)."""
    cfg = LlamaConfig(**shapes, num_hidden_layers=layers, vocab_size=256, use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    if base == "nf4":
        to_4bit(model, device)
    model.requires_grad_(False)
    peft_model = attach_lora(model, LoraSection(r=16, alpha=16, dropout=0.0), seed=1)
    for module in [block for _, block in decoder_blocks(model)] + [model]:
        if compile_blocks and module is not model:
            module.compile()
        shard(module, mesh=mesh, mp_dtype=torch.bfloat16, reshard_after_forward=True, cpu_offload=False)
    return peft_model


def gather_gpu_ms(step, device: torch.device) -> float | None:
    """GPU milliseconds of the all-gather kernels in one ``step()`` (None on CPU)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    us = sum(e.device_time_total for e in prof.key_averages() if "AllGather" in e.key)
    return us / 1000.0


def print_profile(step, base: str, device: torch.device, show: bool) -> None:
    """Ops of one step, by self CPU time (and GPU time), printed where ``show`` (``--profile``)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    if not show:
        return
    table = prof.key_averages()
    print(f"--- {base}: by self CPU time")
    print(table.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    if cuda:
        print(f"--- {base}: by GPU time")
        print(table.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=60))


def run(base: str, args, shapes: dict, device: torch.device, mesh) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(base, shapes, args.layers, device, mesh, compile_blocks=args.compile)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator(device="cpu").manual_seed(100 + rank)
    ids = torch.randint(0, 256, (args.batch, args.seq), generator=gen).to(device)

    def step() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with GatherCounter() as counter:
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    gather_ms = gather_gpu_ms(step, device)
    if args.profile == base:
        print_profile(step, base, device, rank == 0)  # every rank steps (the all-gathers are collective)
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0], device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    step_s = statistics.median(times)
    result = {
        "base": base,
        "step_ms": step_s * 1000.0,
        "tokens_per_s": world * args.batch * args.seq / step_s,
        "peak_mem_mb_max_rank": peak.item(),
        "allgather_bytes_per_step_per_rank": counter.bytes,
        "allgather_gpu_ms_per_step_rank0": gather_ms,
        "trainable_params": sum(p.numel() for p in params),  # DTensors: numel is the global size
    }
    return result


def run_freed(base: str, args, shapes: dict, device: torch.device, mesh) -> dict:
    """``run`` with the model and optimizer freed before the next base is built."""
    result = run(base, args, shapes, device, mesh)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1, help="sequences per rank and step")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="small shapes, gloo on CPU")
    ap.add_argument("--compile", action="store_true", help="torch.compile each decoder block (as the trainer can)")
    ap.add_argument("--json", default="")
    ap.add_argument("--profile", choices=("bf16", "nf4"), help="print rank 0's op tables of one step of this base")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))
    shapes = TINY if args.tiny else LLAMA3_8B
    results = [run_freed(base, args, shapes, device, mesh) for base in ("bf16", "nf4")]
    if rank == 0:
        report = {
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "torch": torch.__version__,
            "world_size": world,
            "layers": args.layers,
            "seq": args.seq,
            "batch_per_rank": args.batch,
            "compile": args.compile,
            "shapes": shapes,
            "results": results,
        }
        for r in results:
            gather = r["allgather_gpu_ms_per_step_rank0"]
            print(
                f"{r['base']:>5} W={world}: {r['tokens_per_s']:9.0f} tok/s  step {r['step_ms']:8.1f} ms  "
                f"peak {r['peak_mem_mb_max_rank']:8.0f} MB  all-gather "
                f"{r['allgather_bytes_per_step_per_rank'] / 2**20:8.1f} MB/step"
                + ("" if gather is None else f" in {gather:6.2f} ms GPU")
            )
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(report, fh, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
