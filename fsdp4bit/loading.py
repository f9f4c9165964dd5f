"""Build a sharded 4-bit model from a checkpoint, block by block, so no rank ever holds the whole model.

The model is constructed on the meta device (Linear4bit layers included). For each block, in order, its
tensors are read one at a time from the checkpoint (safetensors file(s) or any key -> tensor callable),
float weights of Linear4bit layers are quantized on the target device (bitsandbytes-format weights are
taken as they are), and the block is sharded with FSDP2 before the next one is read. Peak memory per
rank: one block's float tensors plus 1/W of the 4-bit model. The QLoRA trainer (``fsdp4bit.train.model``) loads
through :func:`materialize` too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .nn import Linear4bit, Params4bit
from .quant_state import PACKED_KEY_PREFIX
from .sharding import units_bottom_up

Reader = Callable[[str], torch.Tensor]


def safetensors_reader(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> tuple[Reader, set[str]]:
    """A reader over one or more safetensors files (tensors are read lazily, one key at a time) and its keys.

    Each read opens its file and closes it again: a file kept open stays memory-mapped, and every page a load has
    read then stays resident until the reader is dropped (the trainer's loader did that: 794 MiB peak per rank
    against 563 reopening, ``bench/trainer_load.py``, see NOTES), while reopening costs a header parse per tensor."""
    from safetensors import safe_open

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    index: dict[str, str] = {}
    for path in paths:
        with safe_open(os.fspath(path), framework="pt") as f:
            for key in f.keys():
                index[key] = os.fspath(path)

    def read(key: str) -> torch.Tensor:
        with safe_open(index[key], framework="pt") as f:
            return f.get_tensor(key)

    return read, set(index)


def checkpoint_name(name: str) -> str:
    """A model tensor's name in the checkpoint: peft inserts ``base_layer`` into the names of the layers it wraps."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def _read(key: str, read: Reader, keys: set[str], shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """The checkpoint's tensor ``key`` (KeyError if it has none), checked against ``shape`` (ValueError) when given."""
    if key not in keys:
        raise KeyError(f"checkpoint has no tensor {key!r}")
    value = read(key)
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(value.shape)}, the model's has {tuple(shape)}")
    return value


def _load_linear4bit(
    layer: Linear4bit, prefix: str, read: Reader, keys: set[str], device: torch.device, dtype: torch.dtype | None
) -> None:
    """Read, check and build the layer's weight and bias, then set both (the layer is unchanged if anything fails).
    A float weight is cast to ``dtype`` (None: the template weight's float dtype, the one the layer was built in, else
    float32) and quantized in the template weight's format."""
    prefix = checkpoint_name(prefix)
    weight_key = prefix + "weight"
    shape = (layer.out_features, layer.in_features)
    stat_keys = [k for k in keys if k.startswith(weight_key + ".")]
    if stat_keys:
        stats = {k[len(prefix) :]: read(k) for k in stat_keys}
        weight = Params4bit.from_prequantized(_read(weight_key, read, keys), stats, device=device)
        if tuple(weight.quant_state.shape) != shape:
            raise ValueError(
                f"checkpoint tensor {weight_key!r} is a 4-bit weight of shape {tuple(weight.quant_state.shape)}, "
                f"the model's has {shape}"
            )
    else:
        template = layer.weight
        if dtype is None:
            dtype = template.dtype if template.dtype.is_floating_point else torch.float32
        weight = Params4bit(
            _read(weight_key, read, keys, shape).to(dtype),
            requires_grad=False,
            blocksize=template.blocksize,
            compress_statistics=template.compress_statistics,
            quant_type=template.quant_type,
            quant_storage=template.quant_storage,
        ).to(device)
    bias = (
        None
        if layer.bias is None
        else _read(prefix + "bias", read, keys, tuple(layer.bias.shape)).to(device, layer.bias.dtype)
    )
    layer.weight = weight
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=layer.bias.requires_grad)


class TiedParams:
    """The meta parameters ``model`` holds under several names (tied embeddings: one Parameter object, e.g.
    ``embed_tokens.weight`` and ``lm_head.weight``): each is read once, from whichever of its names the checkpoint
    has (``save_pretrained`` writes only one), and the one new Parameter is set under every name, so the tie
    survives loading."""

    def __init__(self, model: nn.Module, prefix: str = "") -> None:
        self.names: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            if param.is_meta:
                self.names.setdefault(id(param), []).append(prefix + name)
        self.loaded: dict[int, nn.Parameter] = {}

    def key(self, param: nn.Parameter, name: str, keys: set[str]) -> str:
        """The checkpoint key to read ``param`` (found as ``name``) from: its own, else a tied name's."""
        if name in keys:
            return name
        names = (checkpoint_name(other) for other in self.names.get(id(param), ()))
        return next((other for other in names if other in keys), name)


def materialize(
    module: nn.Module,
    prefix: str,
    read: Reader,
    keys: set[str],
    device: torch.device,
    tied: TiedParams | None = None,
    missing_ok: bool = False,
    dtype: torch.dtype | None = None,
) -> None:
    """Give every meta tensor of ``module`` (recursively) its checkpoint value on ``device``, and move its other
    buffers there (KeyError for a tensor the checkpoint lacks, ValueError for one of another shape; with
    ``missing_ok`` a parameter the checkpoint lacks, 4-bit weights included, stays on meta for the caller to fill or
    report). Float parameters take their template's dtype; a float 4-bit weight is cast to ``dtype`` before it is
    quantized (None: the dtype its layer was built in, else float32; never the ``quant_storage``). A meta buffer the
    checkpoint lacks is an error too: non-persistent buffers (rotary tables) are computed when a module is built and
    never saved, so build the model with real buffers (``accelerate.init_empty_weights(include_buffers=False)``)."""
    tied = TiedParams(module, prefix) if tied is None else tied
    if isinstance(module, Linear4bit) and module.weight.is_meta:
        weight_key = checkpoint_name(prefix) + "weight"
        if not missing_ok or weight_key in keys:
            _load_linear4bit(module, prefix, read, keys, device, dtype)
    for name, child in module.named_children():
        materialize(child, f"{prefix}{name}.", read, keys, device, tied, missing_ok, dtype)
    for name, param in list(module.named_parameters(recurse=False)):
        if param.is_meta:
            new = tied.loaded.get(id(param))
            if new is None:
                key = tied.key(param, checkpoint_name(prefix + name), keys)
                if missing_ok and key not in keys:
                    continue
                value = _read(key, read, keys, tuple(param.shape)).to(device=device, dtype=param.dtype)
                new = tied.loaded[id(param)] = nn.Parameter(value, requires_grad=param.requires_grad)
            setattr(module, name, new)
    for name, buf in list(module.named_buffers(recurse=False)):
        if buf.is_meta:
            key = checkpoint_name(prefix + name)
            if key not in keys:
                kind = "non-persistent " if name in module._non_persistent_buffers_set else ""
                raise ValueError(
                    f"{kind}buffer {key!r} is on the meta device and the checkpoint has no value for it (a "
                    "non-persistent buffer such as a rotary table is computed when its module is built, never "
                    "saved): build the model with real buffers, e.g. under "
                    "accelerate.init_empty_weights(include_buffers=False)"
                )
            value = _read(key, read, keys, tuple(buf.shape)).to(device)
            module.register_buffer(name, value, persistent=name not in module._non_persistent_buffers_set)
        elif buf.device != device:
            module.register_buffer(name, buf.to(device), persistent=name not in module._non_persistent_buffers_set)


def _check_loaded(module: nn.Module, prefix: str) -> None:
    """KeyError naming the first parameter of ``module`` still on meta (neither in the checkpoint nor filled)."""
    for name, param in module.named_parameters():
        if param.is_meta:
            raise KeyError(f"checkpoint has no tensor {checkpoint_name(prefix + name)!r}")


def load_sharded(
    model: nn.Module,
    read: Reader,
    keys: set[str],
    *,
    block_types: tuple[type[nn.Module], ...],
    device: torch.device | str,
    shard: Callable[[nn.Module], None] | None = None,
    init: Callable[[nn.Module], object] | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Materialize a meta-device ``model`` from a checkpoint one block at a time, sharding each block with
    ``shard`` (default: FSDP2 ``fully_shard``) as soon as it is loaded (nested blocks inner first), then the root.

    ``init`` fills, per block and before it is sharded, the parameters the checkpoint does not hold: LoRA adapters
    that peft attached on the meta device (pass the model peft wrapped in place, e.g. ``peft_model.base_model.model``,
    and ``init=fsdp4bit.train.lora.AdapterInit()`` made right after ``get_peft_model``). Without it every parameter
    must come from the checkpoint. ``dtype``: the float dtype 4-bit weights are quantized from (:func:`materialize`).
    """
    from torch.distributed.fsdp import fully_shard

    params = [param for _, param in model.named_parameters()]
    if params and not any(param.is_meta for param in params):
        raise ValueError(
            f"load_sharded loads the meta tensors of a model built on the meta device, but none of its {len(params)} "
            "parameters is on meta: build it under torch.device('meta'), or load a materialized model with "
            "load_state_dict"
        )
    device = torch.device(device)
    shard = shard or fully_shard
    tied = TiedParams(model)
    units = [(m, f"{name}.") for name, m in units_bottom_up(model, lambda m: isinstance(m, block_types))]
    for module, prefix in [*units, (model, "")]:
        materialize(module, prefix, read, keys, device, tied, missing_ok=init is not None, dtype=dtype)
        if init is not None:
            init(module)
            _check_loaded(module, prefix)
        shard(module)
    return model


def is_bnb_checkpoint(keys: set[str]) -> bool:
    """True when the keys contain bitsandbytes' packed quant-state entries."""
    return any(PACKED_KEY_PREFIX in k for k in keys)
