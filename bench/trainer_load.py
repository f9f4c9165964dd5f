"""Memory per rank while the trainer loads a 4-bit model: block by block vs the whole model first (GPU: torch's
allocated bytes; CPU: the process's peak / current resident memory).

``blockwise`` is the trainer's path (``fsdp4bit.train``): the model is built on the meta device, LoRA attached
there, and each decoder block is loaded, quantized, given its adapters and sharded before the next is read.
``whole`` is the path before session 27: every block loaded and quantized first, then sharded. Both build the
same model (a forward+backward loss on one fixed sequence is printed for each). The checkpoint is a Llama-shaped
folder of random bf16 weights, written once by rank 0 (``--path``).

    torchrun --nproc_per_node=W bench/trainer_load.py --mode blockwise|whole [--layers 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from fsdp4bit.train.config import LoraSection, ModelConfig
from fsdp4bit.train.lora import AdapterInit, attach_lora
from fsdp4bit.train.metrics import current_memory_mb, peak_memory_mb
from fsdp4bit.train.model import build_model, decoder_blocks, load_blocks, shard


def write_checkpoint(path: Path, layers: int, hidden: int, inter: int, vocab: int, device: torch.device) -> None:
    """A Llama config and random bf16 weights (std 0.02) as one safetensors file."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=max(1, hidden // 512),
        vocab_size=vocab,
        tie_word_embeddings=False,
    )
    with init_empty_weights():
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    gen = torch.Generator(device=device).manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        if "norm" in name:
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            value = torch.randn(shape, device=device, generator=gen, dtype=torch.float32) * 0.02
            tensors[name] = value.to(torch.bfloat16).cpu()
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "model.safetensors")
    cfg.save_pretrained(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=["blockwise", "whole"], default="blockwise")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--inter", type=int, default=14336)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--path", default="/tmp/fsdp4bit_trainer_load")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    path = Path(args.path)
    if rank == 0 and not (path / "model.safetensors").is_file():
        write_checkpoint(path, args.layers, args.hidden, args.inter, args.vocab, device)
    dist.barrier()
    mesh = init_device_mesh(device.type, (world,))
    cfg = ModelConfig(path=str(path), dtype="bfloat16", compute_dtype="bfloat16", quant_storage="bfloat16")
    options = dict(mesh=mesh, mp_dtype=torch.bfloat16, reshard_after_forward=True, cpu_offload=False)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model = build_model(cfg)
    peft_model = attach_lora(model, LoraSection(r=64, dropout=0.0), seed=0)
    init_adapters = AdapterInit()

    def finish(module: torch.nn.Module) -> None:
        init_adapters(module)
        if args.mode == "blockwise":
            shard(module, **options)

    load_blocks(model, cfg, device, finish)
    if args.mode == "whole":
        for module in [block for _, block in decoder_blocks(model)] + [model]:
            shard(module, **options)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    load_peak, resident = peak_memory_mb(device), current_memory_mb(device)

    ids = torch.arange(512, device=device).view(1, 512) * 61 % args.vocab
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    step_peak = peak_memory_mb(device)
    row = {
        "mode": args.mode,
        "world": world,
        "load_peak_mib": round(load_peak, 1),
        "resident_after_load_mib": round(resident, 1),
        "step_peak_mib": round(step_peak, 1),
        "load_s": round(seconds, 2),
        "loss": float(loss),
    }
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        summary = {
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "shape": {"layers": args.layers, "hidden": args.hidden, "inter": args.inter, "vocab": args.vocab},
            "mode": args.mode,
            "world": world,
            "load_peak_mib_max": max(r["load_peak_mib"] for r in rows),
            "resident_after_load_mib_max": max(r["resident_after_load_mib"] for r in rows),
            "step_peak_mib_max": max(r["step_peak_mib"] for r in rows),
            "load_s_max": max(r["load_s"] for r in rows),
            "loss": rows[0]["loss"],
        }
        print(json.dumps(summary))
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(summary) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
