"""Build a sharded 4-bit model from a checkpoint, block by block, so no rank ever holds the whole model.

The model is constructed on the meta device (Linear4bit layers included). For each block, in order, its
tensors are read one at a time from the checkpoint (safetensors file(s) or any key -> tensor callable),
float weights of Linear4bit layers are quantized on the target device (bitsandbytes-format weights are
taken as they are), and the block is sharded with FSDP2 before the next one is read. Peak memory per
rank: one block's float tensors plus 1/W of the 4-bit model. The QLoRA trainer (``fsdp4bit.train.model``) loads
through :func:`materialize` too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable

import torch
from torch import nn

from .codebooks import check_float_dtype
from .nn import Linear4bit, Params4bit
from .quant_state import PACKED_KEY_PREFIX
from .sharding import as_block_types, fsdp_unit, shard_groups, units_bottom_up

Reader = Callable[[str], torch.Tensor]


def safetensors_files(path: str | os.PathLike) -> list[str]:
    """The safetensors file(s) ``path`` names: the file itself, the files of a sharded checkpoint's index json
    (``model.safetensors.index.json``, its ``weight_map``), or a Hugging Face folder's ``model.safetensors`` or index."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for name in ("model.safetensors", "model.safetensors.index.json"):
            if os.path.isfile(os.path.join(path, name)):
                return safetensors_files(os.path.join(path, name))
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    if not path.endswith(".json"):
        return [path]
    with open(path) as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{path} is not a safetensors index: it has no 'weight_map' object")
    folder = os.path.dirname(path)
    return [os.path.join(folder, name) for name in sorted(set(weight_map.values()))]


def _paths(paths: object) -> list[str]:
    """``paths`` (one path or an iterable of them) as a list of safetensors files (TypeError for anything else)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if isinstance(paths, (bytes, dict)) or not isinstance(paths, Iterable):
        raise TypeError(f"paths must be a path (str or os.PathLike) or an iterable of paths, got {paths!r}")
    out = []
    for path in paths:
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"paths must hold str or os.PathLike paths, got {type(path).__name__} {path!r}")
        out.extend(safetensors_files(path))
    return out


def safetensors_reader(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> tuple[Reader, set[str]]:
    """A reader over one or more safetensors files (tensors are read lazily, one key at a time) and its keys.

    A path may be a file, a sharded checkpoint's index json or a Hugging Face model folder (:func:`safetensors_files`).
    A key held by two files is an error (ValueError): which of its values the model should get is unknown.
    Each read opens its file and closes it again: a file kept open stays memory-mapped, and every page a load has
    read then stays resident until the reader is dropped (the trainer's loader did that: 794 MiB peak per rank
    against 563 reopening, ``bench/trainer_load.py``, see NOTES), while reopening costs a header parse per tensor."""
    from safetensors import safe_open

    index: dict[str, str] = {}
    for path in _paths(paths):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                if key in index and index[key] != path:
                    raise ValueError(f"checkpoint tensor {key!r} is in two files: {index[key]} and {path}")
                index[key] = path

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
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"read({key!r}) must return a torch.Tensor, got {type(value).__name__}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(value.shape)}, the model's has {tuple(shape)}")
    return value


def _prequantized(key: str, data: torch.Tensor, stats: dict[str, torch.Tensor], device: torch.device) -> Params4bit:
    """The checkpoint's 4-bit weight ``key`` from its words and statistics; an error names the key (a model has many)."""
    try:
        return Params4bit.from_prequantized(data, stats, device=device)
    except (ValueError, TypeError) as err:
        raise type(err)(f"checkpoint tensor {key!r} is not a valid 4-bit weight: {err}") from err


def _load_linear4bit(
    layer: Linear4bit,
    prefix: str,
    read: Reader,
    keys: set[str],
    device: torch.device,
    dtype: torch.dtype | None,
    tied: TiedParams,
) -> None:
    """Read, check and build the layer's weight and bias, then set both (the layer is unchanged if anything fails).
    A float weight is cast to ``dtype`` (None: the template weight's float dtype, the one the layer was built in, else
    float32) and quantized in the template weight's format. A weight or bias tied to one loaded before is that one
    (``tied``), and one saved under a tied name only is read from there."""
    template = layer.weight
    weight = tied.loaded.get(id(template))
    if weight is None:
        weight = _read_linear4bit_weight(
            layer, tied.key(template, checkpoint_name(prefix) + "weight", keys), read, keys, device, dtype
        )
    bias = None if layer.bias is None else tied.loaded.get(id(layer.bias))
    if layer.bias is not None and bias is None:
        key = tied.key(layer.bias, checkpoint_name(prefix) + "bias", keys)
        value = _read(key, read, keys, tuple(layer.bias.shape)).to(device, layer.bias.dtype)
        bias = nn.Parameter(value, requires_grad=layer.bias.requires_grad)
    if layer.bias is not None:
        tied.loaded[id(layer.bias)] = bias
        layer.bias = bias
    tied.loaded[id(template)] = weight
    layer.hold(weight)


def _read_linear4bit_weight(
    layer: Linear4bit, weight_key: str, read: Reader, keys: set[str], device: torch.device, dtype: torch.dtype | None
) -> Params4bit:
    """The 4-bit weight saved at ``weight_key``: prequantized (with its statistics entries) or float, quantized in
    the layer's template format."""
    shape = (layer.out_features, layer.in_features)
    stat_keys = [k for k in keys if k.startswith(weight_key + ".")]
    if stat_keys:
        owner = weight_key[: -len("weight")]
        stats = {k[len(owner) :]: _read(k, read, keys) for k in stat_keys}
        weight = _prequantized(weight_key, _read(weight_key, read, keys), stats, device)
        if tuple(weight.quant_state.shape) != shape:
            raise ValueError(
                f"checkpoint tensor {weight_key!r} is a 4-bit weight of shape {tuple(weight.quant_state.shape)}, "
                f"the model's has {shape}"
            )
        return weight
    template = layer.weight
    if dtype is None:
        dtype = template.dtype if template.dtype.is_floating_point else torch.float32
    return Params4bit(
        _read(weight_key, read, keys, shape).to(dtype),
        requires_grad=False,
        blocksize=template.blocksize,
        compress_statistics=template.compress_statistics,
        quant_type=template.quant_type,
        quant_storage=template.quant_storage,
    ).to(device)


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
    if dtype is not None:
        check_float_dtype(dtype, "dtype")
    tied = TiedParams(module, prefix) if tied is None else tied
    if isinstance(module, Linear4bit) and module.weight.is_meta:
        weight_key = tied.key(module.weight, checkpoint_name(prefix) + "weight", keys)
        if not missing_ok or weight_key in keys or id(module.weight) in tied.loaded:
            _load_linear4bit(module, prefix, read, keys, device, dtype, tied)
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
            value = _read(key, read, keys, tuple(buf.shape)).to(device, buf.dtype)  # as load_state_dict copies
            module.register_buffer(name, value, persistent=name not in module._non_persistent_buffers_set)
        elif buf.device != device:
            module.register_buffer(name, buf.to(device), persistent=name not in module._non_persistent_buffers_set)


def _check_loaded(module: nn.Module, prefix: str) -> None:
    """KeyError naming the first parameter of ``module`` still on meta (neither in the checkpoint nor filled)."""
    for name, param in module.named_parameters():
        if param.is_meta:
            raise KeyError(f"checkpoint has no tensor {checkpoint_name(prefix + name)!r}")


def _check_load_args(model: object, read: object, block_types: object, dtype: object) -> tuple[type, ...]:
    """TypeError/ValueError for arguments ``load_sharded`` would fail on later with an unrelated message; the
    block types as a tuple (a list or a single class is taken too, as in ``shard_model``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(read):
        raise TypeError(
            f"read must be a callable key -> torch.Tensor (e.g. safetensors_reader's), got {type(read).__name__}"
        )
    if dtype is not None:
        check_float_dtype(dtype, "dtype")
    types = as_block_types(block_types)
    if types is None:
        raise TypeError("block_types must be a tuple of torch.nn.Module classes, got None")
    return types


def _tie_hf_weights(model: nn.Module) -> None:
    """Tie a Hugging Face model's weights as ``from_pretrained`` does: built under ``accelerate.init_empty_weights``
    (which re-registers every parameter) a tied model's output embedding is a separate meta parameter, which the
    checkpoint (saved tied: one name) does not hold."""
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False) and callable(getattr(model, "tie_weights", None)):
        model.tie_weights()


def load_sharded(
    model: nn.Module,
    read: Reader,
    keys: set[str],
    *,
    block_types: tuple[type[nn.Module], ...],
    device: torch.device | str,
    shard: Callable[[nn.Module | list[nn.Module]], object] | None = None,
    init: Callable[[nn.Module], object] | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Materialize a meta-device ``model`` from a checkpoint one block at a time, sharding each block with
    ``shard`` (default: FSDP2 ``fully_shard``) as soon as it is loaded (nested blocks inner first), then the root.
    Blocks sharing a parameter are loaded, then sharded together: ``shard`` gets them as a list (one FSDP group;
    :func:`fsdp4bit.sharding.shard_groups`).

    ``init`` fills, per block and before it is sharded, the parameters the checkpoint does not hold: LoRA adapters
    that peft attached on the meta device (pass the model peft wrapped in place, e.g. ``peft_model.base_model.model``,
    and ``init=fsdp4bit.train.lora.AdapterInit()`` made right after ``get_peft_model``). Without it every parameter
    must come from the checkpoint. ``dtype``: the float dtype 4-bit weights are quantized from (:func:`materialize`).
    """
    from torch.distributed.fsdp import fully_shard

    block_types = _check_load_args(model, read, block_types, dtype)
    params = [param for _, param in model.named_parameters()]
    if params and not any(param.is_meta for param in params):
        raise ValueError(
            f"load_sharded loads the meta tensors of a model built on the meta device, but none of its {len(params)} "
            "parameters is on meta: build it under torch.device('meta'), or load a materialized model with "
            "load_state_dict"
        )
    _tie_hf_weights(model)
    device = torch.device(device)
    shard = shard or fully_shard
    tied = TiedParams(model)
    units = units_bottom_up(model, lambda m: isinstance(m, block_types))
    prefixes = {id(m): f"{name}." for name, m in units}
    for group in [*shard_groups(model, [m for _, m in units]), [model]]:
        for module in group:
            prefix = prefixes.get(id(module), "")
            materialize(module, prefix, read, keys, device, tied, missing_ok=init is not None, dtype=dtype)
            if init is not None:
                init(module)
                _check_loaded(module, prefix)
        shard(fsdp_unit(group))
    return model


def is_bnb_checkpoint(keys: set[str]) -> bool:
    """True when the keys contain bitsandbytes' packed quant-state entries."""
    return any(PACKED_KEY_PREFIX in k for k in keys)
