"""accelerate's FSDP2 plugin (fsdp_version=2) prepares and trains a model with Linear4bit layers.

Run with ``accelerate launch --multi_gpu --num_processes N accelerate_worker.py STORAGE`` (accelerate shards with
FSDP only on accelerators); rank 0 prints what accelerate built (world size, distributed type, whether the
parameters are sharded DTensors) and the losses next to a single-process reference computed on the whole batch.
"""

from __future__ import annotations

import json
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import FullyShardedDataParallelPlugin
from torch import nn
from torch.distributed.tensor import DTensor

import fsdp4bit as bnb
from fsdp4bit.train.distributed import teardown


class Block(nn.Module):
    """A frozen 4-bit base with a trainable LoRA pair."""

    def __init__(self, in_f: int, out_f: int, storage: torch.dtype) -> None:
        super().__init__()
        self.base = bnb.nn.Linear4bit(in_f, out_f, quant_type="nf4", quant_storage=storage)
        self.lora_a = nn.Linear(in_f, 4, bias=False)
        self.lora_b = nn.Linear(4, out_f, bias=False)

    def forward(self, x):
        return self.base(x) + self.lora_b(self.lora_a(x))


def build(storage: torch.dtype, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(Block(33, 21, storage), nn.GELU(), Block(21, 3, storage)).to(device)
    for name, param in model.named_parameters():
        if "base" in name:
            param.requires_grad_(False)
    return model


def run(model, opt, batches, backward) -> list[float]:
    losses = []
    for x, y in batches:
        loss = nn.functional.mse_loss(model(x), y)
        backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def main() -> None:
    storage = {"uint8": torch.uint8, "bfloat16": torch.bfloat16}[sys.argv[1]]
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["Block"]
    )
    acc = Accelerator(fsdp_plugin=plugin)
    gen = torch.Generator().manual_seed(1)
    world, rank = acc.num_processes, acc.process_index
    batch = (torch.randn(4 * world, 33, generator=gen), torch.randn(4 * world, 3, generator=gen))
    data = [tuple(t.to(acc.device) for t in batch)] * 5
    model = build(storage, acc.device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, opt = acc.prepare(model, opt)
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    local = [(x[rank * 4 : (rank + 1) * 4], y[rank * 4 : (rank + 1) * 4]) for x, y in data]
    losses = torch.tensor(run(model, opt, local, acc.backward), device=acc.device)
    losses = acc.reduce(losses, reduction="mean").tolist()
    ref = build(storage, acc.device)
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    ref_losses = run(ref, ref_opt, data, lambda loss: loss.backward())
    if acc.is_main_process:
        kind = acc.distributed_type.name
        report = {
            "world": world,
            "distributed_type": kind,
            "sharded": sharded,
            "losses": losses,
            "reference": ref_losses,
        }
        print("REPORT " + json.dumps(report))
    del model, opt, acc
    teardown()


if __name__ == "__main__":
    main()
