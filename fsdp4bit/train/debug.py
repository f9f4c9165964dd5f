"""Debug-mode checks (on by default under plain ``python``; ``debug.mode = "on"`` enables them anywhere).

What debug mode adds to a run:
- ``torch.use_deterministic_algorithms(True, warn_only=True)`` and fixed seeds (seeds are fixed in every mode);
- after model load: every targeted ``nn.Linear`` is a quantized ``Linear4bit``;
- every step: the loss and every adapter gradient are finite (NaN/Inf raise ``FloatingPointError`` naming the
  first bad parameter, on all ranks at once), and no frozen parameter holds a gradient;
- at the end: the frozen base (4-bit bytes, statistics and float weights) is bit-for-bit unchanged;
- optionally ``torch.autograd.detect_anomaly`` around the backward (``debug.detect_anomaly``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from fsdp4bit.functional import packed_bytes
from fsdp4bit.nn import Linear4bit, Params4bit

from .config import ModelConfig
from .distributed import any_rank, reshard_all
from .lora import is_adapter


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def check_quantized(model: nn.Module, cfg: ModelConfig) -> None:
    """Raise if a linear that should be 4-bit is still float, or a Linear4bit was never quantized (peft's adapter
    linears, ``lora_A`` / ``lora_B``, are float by design)."""
    for name, module in model.named_modules():
        if is_adapter(name):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if type(module) is nn.Linear and leaf not in cfg.skip_modules:
            raise AssertionError(f"{name} is still a float nn.Linear; it should be fsdp4bit.nn.Linear4bit")
        if isinstance(module, Linear4bit) and getattr(_local(module.weight), "quant_state", None) is None:
            raise AssertionError(f"{name} is a Linear4bit whose weight was never quantized")


def check_step(model: nn.Module, loss: torch.Tensor, step: int, device: torch.device) -> None:
    """Loss and adapter gradients finite; frozen parameters without gradients. Raises on every rank together."""
    problem = None
    if not torch.isfinite(loss).all():
        problem = f"loss is {loss.item()}"
    for name, param in model.named_parameters():
        if problem:
            break
        grad = param.grad
        if not param.requires_grad:
            if grad is not None:
                problem = f"frozen parameter {name} received a gradient"
        elif grad is not None and not torch.isfinite(_local(grad)).all():
            problem = f"gradient of {name} has NaN/Inf"
    if any_rank(problem is not None, device):
        raise FloatingPointError(f"debug check failed at step {step}: {problem or 'on another rank'}")


def base_fingerprint(model: nn.Module) -> dict[str, float]:
    """Per frozen tensor, a float64 sum of its bytes/values (4-bit weights: packed bytes and absmax), over the rank's
    shards (units left unsharded by a forward without backward are sharded first)."""
    reshard_all(model)
    out = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            continue
        local = _local(param)
        if isinstance(local, Params4bit) and local.quant_state is not None:
            out[name] = float(packed_bytes(local).double().sum()) + float(local.quant_state.absmax.double().sum())
        else:
            out[name] = float(local.detach().double().sum())
    return out


def check_base_unchanged(before: dict[str, float], model: nn.Module) -> None:
    """Raise if any frozen tensor differs from its fingerprint taken before training."""
    after = base_fingerprint(model)
    changed = [name for name, value in before.items() if after.get(name) != value]
    if changed:
        raise AssertionError(f"frozen base parameters changed during training: {changed[:5]}")
