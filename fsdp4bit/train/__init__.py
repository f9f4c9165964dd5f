"""QLoRA finetuning entry point: a frozen 4-bit (NF4) base from a Hugging Face causal LM, LoRA adapters via peft,
FSDP2 sharding over every process torchrun starts, and a single-process debug mode under plain python.

Modules, one job each: ``config`` (validated TOML config), ``cli`` (command line), ``distributed`` (process
group), ``embedded`` (the offline SmolLM2 default), ``model`` (meta-device build, block-wise 4-bit load,
sharding), ``lora`` (peft adapters, saving), ``data`` (packing, per-rank batches), ``optim`` (AdamW + schedule),
``evaluate`` (perplexity), ``train_checkpoint`` (atomic DCP checkpoints), ``metrics`` (JSONL, memory),
``plot`` (loss PNG), ``debug`` (debug-mode checks), ``loop`` (the run).
"""

from .cli import main
from .config import Config, load_config

__all__ = ["Config", "load_config", "main"]
