"""Config validation of fsdp4bit.train: unknown or wrongly-typed fields fail with an error naming the field."""

from __future__ import annotations

import json
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
        ({"model": {"attention": "flash_attention_2"}}, "model.attention"),
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
        ({"checkpoint": {"save_on_signals": ["SIGKILL"]}}, "checkpoint.save_on_signals"),
        ({"train": {"eval_every": -1}}, "train.eval_every"),
        ({"data": {"chat_loss": "all"}}, "data.chat_loss"),
        ({"data": {"chat_date": "2023-02-29"}}, "data.chat_date"),
        ({"data": {"chat_date": "2024-2-29"}}, "data.chat_date"),
        ({"data": {"chat_date": "20240229"}}, "data.chat_date"),
        ({"data": {"chat_date": "today"}}, "data.chat_date"),
        (
            {
                "data": {"eval_files": [], "eval_fraction": 0.0},
                "train": {"eval_after": False, "eval_before": False, "eval_every": 5},
            },
            "data.eval_fraction",
        ),
        ({"checkpoint": {"save_on_signals": "SIGTERM"}}, "checkpoint.save_on_signals"),
    ],
)
def test_bad_value_names_the_field(data: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"'{field}'"):
        from_dict(data)


@pytest.mark.parametrize("attention", ["eager", "flex_attention"])
def test_attention_setting_reaches_the_model(attention: str) -> None:
    from fsdp4bit.train.model import build_model

    cfg = load_config(REPO / "configs" / "cpu_tiny.toml", [f'model.attention="{attention}"'])
    assert build_model(cfg.model).config._attn_implementation == attention


def test_attention_default_is_transformers_choice_and_a_refusal_names_the_field(tmp_path: Path) -> None:
    """Gemma-2 has no sdpa attention: the empty default lets transformers pick (eager), as before the setting
    existed; asking for sdpa is a ValueError naming model.attention."""
    from transformers import AutoConfig

    from fsdp4bit.train.model import build_model

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=8)
    AutoConfig.for_model("gemma2", vocab_size=97, num_key_value_heads=2, **sizes).save_pretrained(tmp_path)
    cfg = load_config(REPO / "configs" / "cpu_tiny.toml", [f'model.path="{tmp_path}"'])
    assert build_model(cfg.model).config._attn_implementation == "eager"
    cfg.model.attention = "sdpa"
    with pytest.raises(ValueError, match=r"^model\.attention='sdpa': .*Gemma2"):
        build_model(cfg.model)


def test_flex_attention_on_the_cpu_is_a_config_error() -> None:
    proc = _cli(
        [
            "--config",
            "configs/cpu_tiny.toml",
            "--set",
            'model.attention="flex_attention"',
            "--set",
            'dist.device="cpu"',
        ],
        REPO,
    )
    assert proc.returncode == 2
    assert "config error: model.attention: flex_attention has no backward on the CPU" in proc.stderr


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


def test_cli_refuses_a_resume_with_other_settings_before_any_work(tmp_path: Path) -> None:
    """Each rank raised it with a traceback once its process group was up; the command line says it first (exit 2),
    and so for a new run beside an earlier run's checkpoints."""
    from fsdp4bit.train.train_checkpoint import PROGRESS_FILE, resume_settings

    out = tmp_path / "run"
    folder = out / "checkpoints" / "step-00000004"
    folder.mkdir(parents=True)
    saved = resume_settings(load_config(None, ["train.steps=4"]))
    (folder / PROGRESS_FILE).write_text(json.dumps({"step": 4, "settings": saved}))
    (folder / ".metadata").write_text("")
    base = ["--set", f'output.dir="{out}"']
    proc = _cli([*base, "--set", "train.steps=6"], REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config error: cannot resume from " in proc.stderr and "train.steps=4 -> 6 differ" in proc.stderr
    proc = _cli([*base, "--set", "train.steps=4", "--set", "checkpoint.resume=false"], REPO)
    assert proc.returncode == 2 and "holds checkpoints of an earlier run (step-00000004)" in proc.stderr
    for content, message in (('{"step": 4,', "JSONDecodeError"), ("[4]", "it holds a JSON list, not an object")):
        (folder / PROGRESS_FILE).write_text(content)
        proc = _cli([*base, "--set", "train.steps=4"], REPO)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"config error: cannot read {folder / PROGRESS_FILE}: {message}" in proc.stderr


def test_resume_refuses_another_held_out_split() -> None:
    """Without eval_files the held-out fraction decides which sequences are trained on: a resume must keep it (with
    eval_files the files may change: the training sequences stay)."""
    from fsdp4bit.train.train_checkpoint import check_resume_settings, resume_settings

    def cfg(eval_files: list[str], fraction: float) -> Config:
        out = Config()
        out.data.eval_files, out.data.eval_fraction = eval_files, fraction
        return out

    check_resume_settings(resume_settings(cfg(["a.txt"], 0.05)), resume_settings(cfg(["b.txt"], 0.2)), Path("ck"))
    for before, after in ((cfg([], 0.05), cfg([], 0.1)), (cfg([], 0.05), cfg(["a.txt"], 0.05))):
        with pytest.raises(ValueError, match=r"^cannot resume from ck: data\.held_out='data\.eval_fraction=0\.05' -> "):
            check_resume_settings(resume_settings(before), resume_settings(after), Path("ck"))


def test_override_of_a_str_field_keeps_its_text() -> None:
    cfg = load_config(None, ["output.dir=123", "debug.mode=off", "model.dtype=bfloat16"])
    assert (cfg.output.dir, cfg.debug.mode, cfg.model.dtype) == ("123", "off", "bfloat16")
    assert load_config(None, ["train.steps=7"]).train.steps == 7  # other fields still parse as TOML


def test_cli_reports_a_missing_input_before_any_work(tmp_path: Path) -> None:
    proc = _cli(["--set", 'data.train_files=["nope.txt"]'], tmp_path)
    assert proc.returncode == 2
    assert "config error: data.train_files: data file not found: nope.txt" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def _taken(world: int, micro: int, steps: int, seqs, start=None) -> tuple[list[int], object]:
    """The sequence ids every rank of a ``world``-rank run takes in ``steps`` micro-steps, in stream order, and
    rank 0's batches at the end (each sequence is a row holding its id)."""
    from fsdp4bit.train.data import RankBatches

    ranks = [RankBatches(seqs, micro, r, world, seed=7) for r in range(world)]
    if start is not None:
        for batches in ranks:
            batches.seek(start.position, start.stream)
    taken = []
    for _ in range(steps):
        for batches in ranks:
            taken += batches.next()[:, 0].tolist()
    return taken, ranks[0]


def test_data_order_is_the_old_micro_step_formula() -> None:
    """Micro-step k of rank r takes the stream's sequences (k * world + r) * micro onwards, epoch by epoch (the rule
    checkpoints written before the stream position was kept counted on)."""
    import torch

    from fsdp4bit.train.data import RankBatches, stream_of

    seqs = torch.arange(23).view(23, 1).repeat(1, 4)
    batches = RankBatches(seqs, 2, 1, 3, seed=7)
    for k in range(9):
        epoch, slot = divmod(k, 23 // 6)
        order = torch.randperm(23, generator=torch.Generator().manual_seed(7 + epoch))
        start = (slot * 3 + 1) * 2
        assert torch.equal(batches.next(), seqs[order[start : start + 2]]), k
        assert batches.stream == stream_of(k + 1, 23, 2, 3)


def test_resume_on_another_world_size_goes_on_where_the_data_stopped() -> None:
    """A run stopped after 5 micro-steps on 2 ranks and resumed on 3 (or 1) with another micro-batch size takes the
    sequences the straight run would have taken next: none twice, none skipped, in the same order."""
    import torch

    seqs = torch.arange(40).view(40, 1).repeat(1, 4)
    first, stopped = _taken(2, 3, 5, seqs)
    assert stopped.stream == (0, 30)
    for world, micro in ((3, 2), (1, 5)):
        rest, _ = _taken(world, micro, 4, seqs, start=stopped)
        straight, _ = _taken(1, 1, 70, seqs)
        epoch_end = 30 + (40 - 30) // (world * micro) * world * micro
        assert first + rest[: epoch_end - 30] == straight[:epoch_end], (world, micro)
        assert sorted(straight[:40]) == list(range(40))
    with pytest.raises(ValueError, match=r"^data stream position \(0, 41\) lies outside 40 training sequences$"):
        stopped.seek(0, (0, 41))


def test_resume_reads_old_checkpoints_data_position(capsys: pytest.CaptureFixture) -> None:
    """A checkpoint written before the stream position was kept (micro-steps at its batch size and world size)
    resumes at the same place on another world size, and the run says that a step now takes other sequences (and,
    for packed examples, that they are now kept apart)."""
    import torch

    from fsdp4bit.train.data import RankBatches
    from fsdp4bit.train.distributed import DistInfo
    from fsdp4bit.train.loop import _resume_data
    from fsdp4bit.train.train_checkpoint import Progress

    old_settings = {"train.micro_batch_size": 3, "train.grad_accum": 2, "train.lr": 1e-3}
    progress = Progress(step=2, data_position=5, world_size=2, settings=old_settings)
    cfg = Config()
    cfg.train.micro_batch_size, cfg.train.grad_accum = 2, 2
    batches = RankBatches(torch.zeros(40, 4), 2, 0, 3, seed=0)
    _resume_data(progress, batches, cfg.train, DistInfo(0, 3, 0, torch.device("cpu"), None, True, False))
    assert batches.stream == (0, 30) and batches.position == 5
    assert "warning" not in capsys.readouterr().out  # the same 12 sequences per step: nothing to say
    cfg.train.grad_accum = 3
    _resume_data(progress, batches, cfg.train, DistInfo(0, 3, 0, torch.device("cpu"), None, True, False))
    assert (
        "warning: an optimizer step now takes 18 sequences (3 ranks x train.micro_batch_size 2 x train.grad_accum 3), "
        "the checkpoint's run took 12" in capsys.readouterr().out
    )
    progress.data_sequences = 41  # the data changed since: the epochs' permutations differ
    _resume_data(progress, batches, cfg.train, DistInfo(0, 3, 0, torch.device("cpu"), None, True, False))
    assert "warning: the training data now packs into 40 sequences, the checkpoint's run had 41" in (
        capsys.readouterr().out
    )
    _resume_data(progress, batches, cfg.train, DistInfo(0, 3, 0, torch.device("cpu"), None, True, False), True)
    assert "warning: the checkpoint's run let packed examples attend to each other" in capsys.readouterr().out
    progress.segments_apart = True  # written since: nothing changed for its examples
    _resume_data(progress, batches, cfg.train, DistInfo(0, 3, 0, torch.device("cpu"), None, True, False), True)
    assert "attend to each other" not in capsys.readouterr().out
    # chats whose template writes the date: rendered on the checkpoint's day, or not (another data.chat_date, or
    # a checkpoint written before the day was kept)
    info = DistInfo(0, 3, 0, torch.device("cpu"), None, True, False)
    progress.chat_date = "2024-02-29"
    _resume_data(progress, batches, cfg.train, info, True, "2024-02-29")
    assert "date" not in capsys.readouterr().out
    for kept, said in (("2024-02-29", "rendered 2024-02-29"), (None, "rendered the day of each start")):
        progress.chat_date = kept
        _resume_data(progress, batches, cfg.train, info, True, "2025-01-01")
        out = capsys.readouterr().out
        assert "warning: the chat template writes today's date into prompts, now rendered as 2025-01-01" in out
        assert f"the checkpoint's run {said}, so the chats' tokens differ" in out
    with pytest.raises(ValueError, match="^the checkpoint's run took 6 sequences per micro-step .* now packs into 5:"):
        _resume_data(
            progress,
            RankBatches(torch.zeros(5, 4), 1, 0, 1, seed=0),
            cfg.train,
            DistInfo(0, 1, 0, torch.device("cpu"), None, True, False),
        )
