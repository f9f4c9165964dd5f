"""accelerate's FSDP2 plugin (fsdp_version=2) prepares and trains a model with Linear4bit layers.

Run with ``accelerate launch --multi_gpu --num_processes N accelerate_worker.py STORAGE FOLDER`` (accelerate shards with
FSDP only on accelerators); rank 0 prints what accelerate built (world size, distributed type, whether the
parameters are sharded DTensors), the losses next to a single-process reference computed on the whole batch, and
how accelerate's state-dict round trips ended (``check_state_dicts``).
"""

from __future__ import annotations

import json
import os
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


def check_state_dicts(acc: Accelerator, model: nn.Module, path: str) -> dict[str, str]:
    """accelerate's FSDP2 state-dict paths (torch's DSD underneath) on the sharded 4-bit model: ``get_state_dict``
    (what ``Trainer.save_model`` writes) equals fsdp4bit's own full state dict, and ``save_state`` -> every value
    overwritten -> ``load_state`` gives back the same outputs, or fails loudly on every rank: accelerate forces
    ``offload_to_cpu`` for FULL_STATE_DICT on several processes, and torch's broadcast load with it raises KeyError
    on every entry that is not a parameter or buffer (pytorch/pytorch#149516), here the 4-bit statistics."""
    from worker import plain_bytes, scrambled

    from fsdp4bit import checkpoint

    probe = torch.randn(5, 33, generator=torch.Generator().manual_seed(7)).to(acc.device)
    with torch.no_grad():
        expected = model(probe)
    reference = {k: plain_bytes(v).cpu() for k, v in checkpoint.full_state_dict(model).items()}
    full = acc.get_state_dict(model)
    if acc.is_main_process:
        assert set(full) == set(reference), set(full) ^ set(reference)
        for k, v in reference.items():
            assert torch.equal(plain_bytes(full[k]).cpu(), v), f"get_state_dict: {k} differs"
    plugin = acc.state.fsdp_plugin
    outcomes = {}
    for kind in ("SHARDED_STATE_DICT", "FULL_STATE_DICT"):  # SHARDED_STATE_DICT is accelerate's FSDP2 default
        plugin.state_dict_config = plugin.optim_state_dict_config = None  # the kind's own defaults
        plugin.set_state_dict_type(kind)
        folder = os.path.join(path, kind)
        acc.save_state(folder)
        scrambled(model)
        try:
            acc.load_state(folder)
        except KeyError as err:
            assert kind == "FULL_STATE_DICT" and ".weight." in str(err), f"{kind}: {err!r}"
            outcomes[kind] = f"KeyError {err}"
            continue
        with torch.no_grad():
            assert torch.equal(model(probe), expected), f"{kind}: the reloaded model computes something else"
        outcomes[kind] = "restored"
    return outcomes


def main() -> None:
    storage = {"uint8": torch.uint8, "bfloat16": torch.bfloat16}[sys.argv[1]]
    path = sys.argv[2]
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
    # accelerate leaves integer (uint8-stored) Params4bit unsharded, by class name (its bitsandbytes workaround)
    base_sharded = all(isinstance(m.weight, DTensor) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    local = [(x[rank * 4 : (rank + 1) * 4], y[rank * 4 : (rank + 1) * 4]) for x, y in data]
    losses = torch.tensor(run(model, opt, local, acc.backward), device=acc.device)
    losses = acc.reduce(losses, reduction="mean").tolist()
    state_dicts = check_state_dicts(acc, model, path)
    ref = build(storage, acc.device)
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    ref_losses = run(ref, ref_opt, data, lambda loss: loss.backward())
    if acc.is_main_process:
        kind = acc.distributed_type.name
        report = {
            "world": world,
            "distributed_type": kind,
            "sharded": sharded,
            "base_sharded": base_sharded,
            "losses": losses,
            "reference": ref_losses,
            "state_dicts": state_dicts,
        }
        print("REPORT " + json.dumps(report))
    del model, opt, acc
    teardown()


if __name__ == "__main__":
    main()
