"""Config validation of fsdp4bit.train: unknown or wrongly-typed fields fail with an error naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fsdp4bit.train.config import Config, from_dict, load_config, to_toml

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_shipped_configs_load() -> None:
    assert isinstance(from_dict({}), Config)
    for path in sorted((REPO / "configs").glob("*.toml")):
        cfg = load_config(path)
        assert cfg.lora.r > 0, path


def test_unknown_field_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"unknown config field 'train\.stepz'"):
        from_dict({"train": {"stepz": 5}})


def test_unknown_section_names_the_section() -> None:
    with pytest.raises(ValueError, match=r"unknown config field 'trian'"):
        from_dict({"trian": {"steps": 5}})


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"train": {"steps": "5"}}, "train.steps"),
        ({"train": {"steps": 5.5}}, "train.steps"),
        ({"model": {"compress_statistics": 1}}, "model.compress_statistics"),
        ({"lora": {"r": True}}, "lora.r"),
        ({"lora": {"target_modules": "q_proj"}}, "lora.target_modules"),
        ({"lora": {"target_modules": ["q_proj", 3]}}, r"lora.target_modules\[1\]"),
        ({"train": "fast"}, "train"),
    ],
)
def test_wrong_type_names_the_field(data: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"'{field}'"):
        from_dict(data)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"model": {"quant_type": "int4"}}, "model.quant_type"),
        ({"model": {"quant_storage": "int8"}}, "model.quant_storage"),
        ({"train": {"steps": 0}}, "train.steps"),
        ({"train": {"lr": -1.0}}, "train.lr"),
        ({"model": {"blocksize": 96}}, "model.blocksize"),
        ({"model": {"blocksize": 8192}}, "model.blocksize"),
        ({"debug": {"mode": "maybe"}}, "debug.mode"),
        ({"train": {"lr": float("nan")}}, "train.lr"),
        ({"train": {"weight_decay": float("inf")}}, "train.weight_decay"),
        ({"train": {"min_lr_ratio": 5.0}}, "train.min_lr_ratio"),
        ({"lora": {"dropout": 1.5}}, "lora.dropout"),
        ({"data": {"seq_len": 1}}, "data.seq_len"),
        ({"output": {"dir": ""}}, "output.dir"),
    ],
)
def test_bad_value_names_the_field(data: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"'{field}'"):
        from_dict(data)


def test_int_accepted_for_float() -> None:
    assert from_dict({"train": {"lr": 1}}).train.lr == 1.0


def test_overrides_and_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[train]\nsteps = 3\n[output]\ndir = "x"\n')
    cfg = load_config(path, ["train.steps=7", "lora.target_modules=['q_proj']", "output.dir=runs/y"])
    assert (cfg.train.steps, cfg.lora.target_modules, cfg.output.dir) == (7, ["q_proj"], "runs/y")
    again = tmp_path / "again.toml"
    again.write_text(to_toml(cfg))
    assert load_config(again) == cfg
    with pytest.raises(ValueError, match=r"unknown config field 'train\.nope'"):
        load_config(path, ["train.nope=1"])


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m fsdp4bit.train ARGS`` run in ``cwd``."""
    return subprocess.run(
        [sys.executable, "-m", "fsdp4bit.train", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_cli_reports_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nsteps = 'many'\n")
    proc = _cli(["--config", str(path)], REPO)
    assert proc.returncode == 2
    assert "'train.steps' must be int" in proc.stderr


def test_resume_refuses_changed_settings() -> None:
    from fsdp4bit.train.train_checkpoint import check_resume_settings, resume_settings

    saved = resume_settings(Config())
    assert saved["train.lr"] == Config().train.lr and "data.seq_len" in saved
    check_resume_settings(saved, resume_settings(Config()), Path("ck"))
    check_resume_settings(None, resume_settings(Config()), Path("ck"))  # a checkpoint from before they were kept
    now = Config()
    now.train.lr, now.data.seq_len = 1e-4, 64
    with pytest.raises(ValueError) as err:
        check_resume_settings(saved, resume_settings(now), Path("ck"))
    assert str(err.value).startswith(
        f"cannot resume from ck: train.lr={Config().train.lr!r} -> 0.0001, data.seq_len={Config().data.seq_len!r} -> 64 "
        "differ from the run that wrote it"
    )


def test_override_of_a_str_field_keeps_its_text() -> None:
    cfg = load_config(None, ["output.dir=123", "debug.mode=off", "model.dtype=bfloat16"])
    assert (cfg.output.dir, cfg.debug.mode, cfg.model.dtype) == ("123", "off", "bfloat16")
    assert load_config(None, ["train.steps=7"]).train.steps == 7  # other fields still parse as TOML


def test_cli_reports_a_missing_input_before_any_work(tmp_path: Path) -> None:
    proc = _cli(["--set", 'data.train_files=["nope.txt"]'], tmp_path)
    assert proc.returncode == 2
    assert "config error: data.train_files: data file not found: nope.txt" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written
