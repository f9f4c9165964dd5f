"""LoRA adapters through peft: attach them to the 4-bit base, and save them in peft's adapter format.

peft wraps ``fsdp4bit.nn.Linear4bit`` through its default dispatch (Linear4bit subclasses ``nn.Linear``); the
base layer keeps its 4-bit weight and ``compute_dtype`` (which peft also uses to pick the adapter dtype).
Saving gathers each sharded adapter tensor to full size (every rank takes part), then rank 0 writes
``adapter_model.safetensors`` + ``adapter_config.json`` with ``PeftModel.save_pretrained``: the folder loads
with ``PeftModel.from_pretrained`` on a float (or bitsandbytes 4-bit) copy of the base model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

from fsdp4bit.checkpoint import fsync_tree, on_rank0, recover_folder, replace_folder, temp_folder

from .config import LoraSection


def attach_lora(model: PreTrainedModel, cfg: LoraSection, seed: int) -> PeftModel:
    """Wrap ``model`` with LoRA adapters (same seed on every rank, so FSDP shards identical initial values).

    On a base still on the meta device (the trainer's, before :func:`fsdp4bit.train.model.load_blocks`) the
    adapters are created on meta too (peft's ``low_cpu_mem_usage``); an :class:`AdapterInit` made right after this
    call gives them their values block by block.
    """
    torch.manual_seed(seed)
    lora_config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
        bias="none",
    )
    on_meta = any(p.is_meta for p in model.parameters())
    peft_model = get_peft_model(model, lora_config, low_cpu_mem_usage=on_meta)
    if not any(p.requires_grad for p in peft_model.parameters()):
        raise ValueError(f"lora.target_modules {cfg.target_modules} matched no module of {type(model).__name__}")
    return peft_model


def _fresh_linear(meta: nn.Linear) -> nn.Linear:
    """A CPU ``nn.Linear`` shaped like ``meta``, initialised by its constructor as peft's would be."""
    fresh = nn.Linear(meta.in_features, meta.out_features, bias=meta.bias is not None)
    fresh.requires_grad_(meta.weight.requires_grad)
    return fresh


class AdapterInit:
    """Initial values for adapters that :func:`attach_lora` created on the meta device, block by block.

    Each adapter is built and initialised as peft's ``update_layer`` does on a loaded base (the same random draws),
    then moved where peft puts it (its base layer's device). The draws continue from the CPU generator state at
    construction (right after ``attach_lora`` seeded it), restored around each call, so the values equal peft's on
    a loaded base with the same seed, whatever else draws random numbers between blocks.
    """

    def __init__(self) -> None:
        self.state = torch.get_rng_state()

    def __call__(self, module: nn.Module) -> int:
        """Initialise every meta adapter in ``module``; returns how many."""
        count = 0
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.state)
            for layer in module.modules():
                if not isinstance(layer, LoraLayer):
                    continue
                for name in list(layer.lora_A.keys()):
                    if not layer.lora_A[name].weight.is_meta:
                        continue
                    layer.lora_A[name] = _fresh_linear(layer.lora_A[name])
                    layer.lora_B[name] = _fresh_linear(layer.lora_B[name])
                    layer.reset_lora_parameters(name, True)
                    layer._move_adapter_to_device_of_base_layer(name)
                    count += 1
            self.state = torch.get_rng_state()
        return count


def is_adapter(name: str) -> bool:
    """Whether a module or parameter name lies inside a peft adapter (``...q_proj.lora_A.default.weight``)."""
    return any(part.startswith("lora_") for part in name.split("."))


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter that trains (the adapters), in a fixed order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def gather_full(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full-size CPU copies of the trainable parameters. Collective: every rank must call it."""
    out = {}
    for name, param in trainable_parameters(model):
        value = param.full_tensor() if isinstance(param, DTensor) else param
        out[name] = value.detach().to("cpu", copy=True)
    return out


def save_adapter(model: PeftModel, out_dir: Path) -> None:
    """Write the adapters to ``out_dir`` in peft's format (collective; rank 0 writes into a temporary folder swapped
    in by :func:`fsdp4bit.checkpoint.replace_folder`, and a failure there raises on every rank). A link named
    ``out_dir`` is written through, as the library's checkpoints are."""
    state = gather_full(model)
    out_dir = Path(os.path.realpath(out_dir))

    def write() -> None:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        recover_folder(out_dir)
        tmp = temp_folder(out_dir)
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        fsync_tree(tmp)
        replace_folder(tmp, out_dir)

    on_rank0(write)
