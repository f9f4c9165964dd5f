"""Peak host memory per rank when building a sharded 4-bit model from a float checkpoint.

Compares fsdp4bit.loading.load_sharded (meta device, block by block) with the naive way (every rank
builds the whole float model, quantizes, then shards). Run under torchrun:

    torchrun --nproc_per_node=2 bench/load_memory.py --dim 2048 --depth 16
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource

import torch
import torch.distributed as dist
from torch import nn

import fsdp4bit as bnb
from fsdp4bit.loading import load_sharded, safetensors_reader
from fsdp4bit.sharding import shard_model


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up = bnb.nn.Linear4bit(dim, 2 * dim, bias=False, quant_type="nf4", quant_storage=torch.bfloat16)
        self.down = bnb.nn.Linear4bit(2 * dim, dim, bias=False, quant_type="nf4", quant_storage=torch.bfloat16)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


def build(dim: int, depth: int, device: str) -> nn.Module:
    with torch.device(device):
        return nn.Sequential(*[Block(dim) for _ in range(depth)])


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--mode", choices=["meta", "naive"], default="meta")
    parser.add_argument("--path", default="/tmp/fsdp4bit_load_memory.safetensors")
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
    rank = dist.get_rank()
    if rank == 0 and not os.path.exists(args.path):
        from safetensors.torch import save_file

        model = build(args.dim, args.depth, "cpu")
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}, args.path)
        del model
    dist.barrier()
    start = rss_mb()
    read, keys = safetensors_reader(args.path)
    if args.mode == "meta":
        model = load_sharded(build(args.dim, args.depth, "meta"), read, keys, block_types=(Block,), device="cpu")
    else:
        model = build(args.dim, args.depth, "cpu")
        model.load_state_dict({k: read(k) for k in keys})
        shard_model(model.to("cpu"), block_types=(Block,))
    params = sum(4 * args.dim * args.dim for _ in range(args.depth))
    peak = torch.tensor([rss_mb() - start])
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(
            json.dumps(
                {
                    "mode": args.mode,
                    "world": dist.get_world_size(),
                    "params": params,
                    "bf16_model_mb": 2 * params / 2**20,
                    "peak_rss_growth_mb_max_rank": peak.item(),
                }
            )
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
