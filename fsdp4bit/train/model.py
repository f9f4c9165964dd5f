"""The frozen 4-bit base model: built on the meta device, loaded and quantized one decoder block at a time.

No rank ever holds the whole float model: the module tree is created without parameter storage
(``accelerate.init_empty_weights``), every ``nn.Linear`` but the skipped ones becomes ``fsdp4bit.nn.Linear4bit``,
and each block's tensors are read from the safetensors file(s) one tensor at a time and quantized as they move to
the device, by the library's loader (``fsdp4bit.loading.materialize``). Peak float memory is one tensor.
Each block is handed to the caller as soon as it is loaded (the trainer initialises its adapters and shards it
there), so no rank holds the whole 4-bit model either. Sharding goes through :func:`shard`, the one place that
calls FSDP2.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from fsdp4bit.loading import TiedParams, materialize, safetensors_reader
from fsdp4bit.nn import Linear4bit, Params4bit

from .config import ModelConfig
from .distributed import any_rank
from .embedded import ensure_embedded_model
from .lora import is_adapter


def dtype_of(name: str) -> torch.dtype:
    """torch dtype from its config name ("bfloat16" -> torch.bfloat16)."""
    return getattr(torch, name)


def resolve_model_path(cfg: ModelConfig) -> Path:
    """The local HF folder to load: ``cfg.path`` or the cached embedded model (converted on first use)."""
    if not cfg.path:
        return ensure_embedded_model(cfg.cache_dir)
    path = Path(cfg.path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.path {path} is not a Hugging Face model folder (no config.json)")
    return path


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors file(s) of a single-file or sharded (``*.index.json``) checkpoint (not opened here: the reader
    lists their tensors)."""
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        return [path / file for file in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
    return [single]


def replace_linears(model: nn.Module, cfg: ModelConfig) -> int:
    """Swap every ``nn.Linear`` not named in ``cfg.skip_modules`` for a meta-device Linear4bit in ``cfg``'s 4-bit
    format (its template weight carries the blocksize the loader quantizes with, its bias the model's dtype);
    returns the count."""
    compute_dtype = dtype_of(cfg.compute_dtype) if cfg.compute_dtype else None
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and name.rsplit(".", 1)[-1] not in cfg.skip_modules
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        replacement = Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=cfg.compress_statistics,
            quant_type=cfg.quant_type,
            quant_storage=dtype_of(cfg.quant_storage),
            device="meta",
        )
        replacement.weight.blocksize = cfg.blocksize
        if module.bias is not None:  # in the model's dtype (Linear4bit builds a float32 one)
            replacement.bias = nn.Parameter(replacement.bias.to(module.bias.dtype), module.bias.requires_grad)
        setattr(model.get_submodule(parent_name), child, replacement)
    return len(targets)


def quantized_weight(value: torch.Tensor, module: Linear4bit, cfg: ModelConfig, device: torch.device) -> Params4bit:
    """``value`` as ``module``'s frozen weight in ``cfg``'s 4-bit format, quantized as it moves to ``device``."""
    return Params4bit(
        value,
        requires_grad=False,
        blocksize=cfg.blocksize,
        compress_statistics=cfg.compress_statistics,
        quant_type=cfg.quant_type,
        quant_storage=dtype_of(cfg.quant_storage),
        module=module,
    ).to(device)


def decoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every decoder block, found through the model's ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [(n, m) for n, m in model.named_modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"{type(model).__name__} declares no decoder block class (_no_split_modules is empty)")
    return blocks


def build_model(cfg: ModelConfig) -> PreTrainedModel:
    """The causal LM on the meta device, every targeted linear a 4-bit ``Linear4bit`` without storage yet (buffers
    such as rotary tables are real). :func:`load_blocks` gives it its weights."""
    path = resolve_model_path(cfg)
    hf_config = AutoConfig.from_pretrained(path)
    if cfg.num_layers:
        hf_config.num_hidden_layers = min(cfg.num_layers, hf_config.num_hidden_layers)
        if getattr(hf_config, "layer_types", None):
            hf_config.layer_types = hf_config.layer_types[: hf_config.num_hidden_layers]
    hf_config.use_cache = False
    with init_empty_weights(include_buffers=False):
        attention = {"attn_implementation": cfg.attention} if cfg.attention else {}
        try:
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype_of(cfg.dtype), **attention)
        except (ValueError, ImportError) as err:
            if not cfg.attention or "attention" not in str(err).lower():
                raise
            raise ValueError(f"model.attention={cfg.attention!r}: {err}") from None
    replace_linears(model, cfg)
    model.requires_grad_(False)
    return model


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer saved with ``cfg``'s model."""
    return AutoTokenizer.from_pretrained(resolve_model_path(cfg))


def untied_embeddings(model: PreTrainedModel) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of the input and output embeddings when they hold separate weights (untied), else
    none: each is then loaded and sharded as its own unit (torchtitan's layout), so neither loading nor a training
    step holds both vocabulary-sized tables unsharded at once. Tied ones stay in the root."""
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if inputs is None or outputs is None or getattr(model.config, "tie_word_embeddings", False):
        return []
    names = {id(m): n for n, m in model.named_modules()}
    return [(names[id(inputs)], inputs), (names[id(outputs)], outputs)]


def load_blocks(
    model: PreTrainedModel, cfg: ModelConfig, device: torch.device, finish: Callable[[nn.Module], None]
) -> None:
    """Load ``model`` (from :func:`build_model`, adapters attached or not) from ``cfg``'s checkpoint one unit at a
    time, calling ``finish`` on each as soon as it is loaded: every decoder block, then the input and output
    embeddings when untied (:func:`untied_embeddings`), then the root.

    The trainer's ``finish`` initialises the unit's adapters and shards it, so a rank holds at most one unit's
    weights unsharded (plus one float tensor) on top of its shards of the units before: loading memory falls with
    the world size instead of holding the whole 4-bit model first.
    """
    path = resolve_model_path(cfg)

    def check_loaded(module: nn.Module, prefix: str) -> None:
        missing = [prefix + n for n, p in module.named_parameters() if p.is_meta and not is_adapter(n)]
        if missing:
            raise ValueError(f"{path}: no tensor in the checkpoint for {missing[:5]} ({len(missing)} missing)")

    read, keys = safetensors_reader(checkpoint_files(path))
    tied, dtype = TiedParams(model), dtype_of(cfg.dtype)
    for name, unit in [*decoder_blocks(model), *untied_embeddings(model)]:
        materialize(unit, name + ".", read, keys, device, tied, missing_ok=True, dtype=dtype)
        check_loaded(unit, name + ".")
        finish(unit)
    materialize(model, "", read, keys, device, tied, missing_ok=True, dtype=dtype)
    if getattr(model.config, "tie_word_embeddings", False):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    check_loaded(model, "")
    finish(model)


@torch.no_grad()
def keeps_packed_segments_apart(model: nn.Module, tokens: torch.Tensor, device: torch.device) -> bool:
    """Whether ``model`` keeps packed segments apart when their position ids restart (collective under FSDP: every
    rank runs the same forward, and the answer is every rank's). Not every Hugging Face model does: some build
    their causal mask without the position ids, some do not read them, and recurrent layers carry state across.

    One eager forward of three rows over A and B, the first two runs of up to 16 of ``tokens`` (training ids, at
    least 2): B after A with restarting positions, B alone at the start, and B after A with positions counting on.
    A model that keeps them apart computes B after A exactly as B alone (0 difference in float32 and bf16 on CPU,
    and with sdpa in bf16 on CUDA, where measured); a leak, even a partial one through a recurrent layer, shows as
    at least a percent of the crossing row's difference. The threshold is 0.1% of it (a floor at the logits' bf16
    rounding let a tiny BioGPT's 44% leak through)."""
    length = min(len(tokens) // 2, 16)  # a sequence's length would make three vocabulary-wide logit rows of it
    a, b = tokens[:length].cpu(), tokens[length : 2 * length].cpu()
    restart, counting = torch.arange(length).repeat(2), torch.arange(2 * length)
    ids = torch.stack([torch.cat([a, b]), torch.cat([b, a]), torch.cat([a, b])]).to(device)
    positions = torch.stack([restart, counting, counting]).to(device)
    was_training = model.training
    model.eval()
    with torch.compiler.set_stance("force_eager"):  # compiled blocks keep their training shapes static
        logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits.float()
    model.train(was_training)
    alone = logits[1, :length]
    packed, crossing = (logits[0, length:] - alone).abs().max(), (logits[2, length:] - alone).abs().max()
    return not any_rank(not bool(packed <= 1e-3 * crossing), device)  # (a NaN difference is a leak)


def count_4bit(model: nn.Module) -> tuple[int, int]:
    """(Linear4bit modules, plain float nn.Linear modules other than peft's adapters) in ``model``."""
    quantized = plain = 0
    for name, module in model.named_modules():
        quantized += isinstance(module, Linear4bit)
        plain += type(module) is nn.Linear and not is_adapter(name)
    return quantized, plain


def shard(
    module: nn.Module,
    *,
    mesh: DeviceMesh,
    mp_dtype: torch.dtype | None,
    reshard_after_forward: bool,
    cpu_offload: bool,
) -> nn.Module:
    """Apply FSDP2 to one module (a decoder block as it is loaded, then the root) through
    ``fsdp4bit.sharding.shard_module``: the 4-bit weights shard with their statistics like every other parameter
    (world size 1 included)."""
    from fsdp4bit.sharding import shard_module

    mp_policy = MixedPrecisionPolicy(param_dtype=mp_dtype, reduce_dtype=torch.float32) if mp_dtype else None
    return shard_module(
        module, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward, cpu_offload=cpu_offload
    )
