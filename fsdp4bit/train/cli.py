"""Command line: ``python -m fsdp4bit.train --config configs/X.toml [--set section.field=value ...]``."""

from __future__ import annotations

import argparse
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
    """FileNotFoundError naming the field for a data file or model folder that does not exist, before a process group
    or model is set up (a config error, exit code 2)."""
    from .data import resolve_data_file
    from .model import resolve_model_path

    for field in ("train_files", "eval_files"):
        for name in getattr(cfg.data, field):
            try:
                resolve_data_file(name)
            except FileNotFoundError as err:
                raise FileNotFoundError(f"data.{field}: {err}") from None
    if cfg.model.path:
        resolve_model_path(cfg.model)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m fsdp4bit.train`` and the ``fsdp4bit-train`` console script."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if not args.print_config:
            check_inputs(cfg)
    except (ValueError, FileNotFoundError) as err:
        print(f"fsdp4bit-train: config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_toml(cfg))
        return 0
    from .loop import run

    run(cfg)
    return 0
