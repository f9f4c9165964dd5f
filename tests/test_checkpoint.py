"""fsdp4bit.checkpoint keeps what a user saved: a failed or interrupted save never loses the previous checkpoint."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

import fsdp4bit.functional as F
from fsdp4bit import checkpoint
from fsdp4bit.nn import Linear4bit


def _layer(seed: int) -> Linear4bit:
    torch.manual_seed(seed)
    return Linear4bit(64, 32, quant_type="nf4").to("cpu")


def _failing_write(*args, **kwargs):
    """DCP's save failing on every rank, as it reports a writer's error."""
    raise dcp.api.CheckpointException("write failed", {})


def _same(a: Linear4bit, b: Linear4bit) -> bool:
    return torch.equal(F.packed_bytes(a.weight), F.packed_bytes(b.weight)) and torch.equal(a.bias, b.bias)


def _failed_save_keeps(old: Linear4bit, path, monkeypatch) -> None:
    """A save whose DCP write fails raises, leaves only the checkpoint folder beside it, and ``old`` still loads."""
    monkeypatch.setattr(dcp, "save", _failing_write)
    with pytest.raises(dcp.api.CheckpointException):
        checkpoint.save(_layer(1), path)
    assert sorted(os.listdir(path.parent)) == ["ckpt"]
    loaded = _layer(2)
    checkpoint.load(loaded, path)
    assert _same(loaded, old)


def test_failed_save_keeps_the_old_checkpoint_and_leaves_nothing_behind(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    old = _layer(0)
    checkpoint.save(old, path)

    _failed_save_keeps(old, path, monkeypatch)


def test_crash_between_the_renames_loses_nothing(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    old, new = _layer(0), _layer(1)
    checkpoint.save(old, path)
    rename = os.rename

    def crash_before_the_new_folder_moves_in(src, dst):
        if os.path.basename(src).startswith(".ckpt.tmp-") and os.fspath(dst) == os.fspath(path):
            raise KeyboardInterrupt  # the old folder is already moved aside
        rename(src, dst)

    monkeypatch.setattr(os, "rename", crash_before_the_new_folder_moves_in)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(new, path)
    monkeypatch.setattr(os, "rename", rename)
    assert not path.exists() and (tmp_path / ".ckpt.old").is_dir()
    loaded = _layer(2)
    checkpoint.load(loaded, path)  # reads the checkpoint the save was replacing
    assert _same(loaded, old)
    checkpoint.save(new, path)  # restores it, cleans the unfinished write, then replaces it
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    checkpoint.load(loaded, path)
    assert _same(loaded, new)


def test_checkpoint_an_older_save_left_aside_comes_back(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    old = _layer(0)
    checkpoint.save(old, path)
    os.rename(path, tmp_path / ".ckpt.tmp-0123.old")  # how saves before session 25 left it after a crash
    (tmp_path / ".ckpt.tmp-4567").mkdir()  # an unfinished write

    _failed_save_keeps(old, path, monkeypatch)
