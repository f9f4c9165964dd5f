"""Command line: ``python -m fsdp4bit.train --config configs/X.toml [--set section.field=value ...]``."""

from __future__ import annotations

import argparse
import os
import sys

from .config import Config, load_config, to_toml


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line arguments."""
    parser = argparse.ArgumentParser(
        prog="fsdp4bit-train",
        description="QLoRA finetuning with a frozen 4-bit base sharded by FSDP2. Run it under torchrun for several "
        "processes, or with plain python for the single-process debug mode.",
    )
    parser.add_argument("--config", help="TOML config file (default: built-in defaults, the embedded CPU run)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field, e.g. --set train.steps=5 (value parsed as TOML; repeatable)",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_args(argv)


def check_inputs(cfg: Config) -> None:
    """Config errors naming the field, before a process group or the model is set up (exit code 2): a data file or
    model folder that does not exist, an embedded model that cannot be converted into ``model.cache_dir``, data files
    that are not UTF-8, hold no text, are listed twice, hold a malformed example (named by its line or place) or no
    trained token, or give fewer sequences than one global micro-batch, flex attention on the CPU, and a run folder
    whose checkpoints the run would mix with (another run's, or settings a resume must keep). The
    datasets built here are kept, and the run takes them (``data.build_datasets``)."""
    from .data import RankBatches, build_datasets, resolve_data_file
    from .distributed import device_type, launched_by_launcher
    from .model import load_tokenizer, resolve_model_path
    from .train_checkpoint import chat_date_of_run, check_run_folder

    for field in ("train_files", "eval_files"):
        for name in getattr(cfg.data, field):
            try:
                resolve_data_file(name)
            except FileNotFoundError as err:
                raise FileNotFoundError(f"data.{field}: {err}") from None
    if cfg.model.attention == "flex_attention" and device_type(cfg.dist.device) == "cpu":
        raise ValueError(
            "model.attention: flex_attention has no backward on the CPU in torch; use sdpa or eager (or run on CUDA)"
        )
    check_run_folder(cfg)  # a resume with other settings, or a new run beside an earlier run's checkpoints
    resolve_model_path(cfg.model)  # converts the embedded model on first use
    train, _ = build_datasets(cfg.data, load_tokenizer(cfg.model), chat_date_of_run(cfg))
    world = int(os.environ["WORLD_SIZE"]) if launched_by_launcher() else 1
    RankBatches(train, cfg.train.micro_batch_size, 0, world, cfg.train.seed)  # its check: one global micro-batch


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m fsdp4bit.train`` and the ``fsdp4bit-train`` console script."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if not args.print_config:
            check_inputs(cfg)
    except (ValueError, OSError) as err:
        print(f"fsdp4bit-train: config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_toml(cfg))
        return 0
    from .loop import run
    from .preemption import exit_code

    summary = run(cfg)
    return exit_code(summary["stopped_by"]) if "stopped_by" in summary else 0
