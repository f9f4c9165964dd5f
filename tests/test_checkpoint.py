"""fsdp4bit.checkpoint keeps what a user saved: a failed or interrupted save never loses the previous checkpoint."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from helpers import fail_renames

import fsdp4bit.functional as F
from fsdp4bit import checkpoint
from fsdp4bit.nn import Linear4bit, Params4bit


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


def _save_with_failing_renames(model, path, monkeypatch, prefixes: tuple[str, ...], error: BaseException) -> None:
    """``checkpoint.save(model, path)`` where every rename onto ``path`` of a folder whose name starts with one of
    ``prefixes`` raises ``error``; the save raises it."""
    undo = fail_renames(monkeypatch, prefixes, error, onto=os.path.basename(os.fspath(path).rstrip("/")))
    with pytest.raises(type(error)):
        checkpoint.save(model, path)
    undo()


def test_crash_between_the_renames_loses_nothing(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    old, new = _layer(0), _layer(1)
    checkpoint.save(old, path)
    # a kill once the old folder is moved aside: neither the new folder's move nor replace_folder's roll-back (which
    # puts the old one back when the move fails) happens
    _save_with_failing_renames(new, path, monkeypatch, (".ckpt.tmp-", ".ckpt.old"), KeyboardInterrupt())
    assert not path.exists() and (tmp_path / ".ckpt.old").is_dir()
    loaded = _layer(2)
    checkpoint.load(loaded, path)  # reads the checkpoint the save was replacing
    assert _same(loaded, old)
    checkpoint.save(new, path)  # restores it, cleans the unfinished write, then replaces it
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    checkpoint.load(loaded, path)
    assert _same(loaded, new)


def test_a_failed_move_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    """replace_folder's second rename fails (e.g. EXDEV, EACCES): the folder it moved aside comes back at once."""
    path = tmp_path / "ckpt"
    old, new = _layer(0), _layer(1)
    checkpoint.save(old, path)
    _save_with_failing_renames(new, path, monkeypatch, (".ckpt.tmp-",), OSError("refused"))
    assert not (tmp_path / ".ckpt.old").exists()
    loaded = _layer(2)
    checkpoint.load(loaded, path)
    assert _same(loaded, old)


def test_checkpoint_an_older_save_left_aside_comes_back(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    old = _layer(0)
    checkpoint.save(old, path)
    os.rename(path, tmp_path / ".ckpt.tmp-0123.old")  # how saves before session 25 left it after a crash
    (tmp_path / ".ckpt.tmp-4567").mkdir()  # an unfinished write

    _failed_save_keeps(old, path, monkeypatch)


def test_a_trailing_slash_names_the_same_checkpoint(tmp_path, monkeypatch):
    """A path with a trailing slash and one without share one backup and temporary name, so an interrupted save of
    "one/" never lends its backup to another folder's load or save."""
    old, new = _layer(0), _layer(1)
    checkpoint.save(old, f"{tmp_path}/one/")
    _save_with_failing_renames(new, f"{tmp_path}/one/", monkeypatch, (".one.tmp-", ".one.old"), KeyboardInterrupt())
    with pytest.raises(FileNotFoundError, match="two"):
        checkpoint.load(_layer(2), f"{tmp_path}/two/")
    checkpoint.save(new, f"{tmp_path}/two/")
    assert {".one.old", "two"} <= set(os.listdir(tmp_path))
    loaded = _layer(2)
    checkpoint.load(loaded, tmp_path / "one")
    assert _same(loaded, old)


def test_save_writes_through_a_link_to_a_checkpoint(tmp_path):
    checkpoint.save(_layer(0), tmp_path / "step1")
    os.symlink(tmp_path / "step1", tmp_path / "latest")
    new = _layer(1)
    for _ in range(2):  # the second save replaces what the first wrote through the link
        checkpoint.save(new, tmp_path / "latest")
    assert os.path.islink(tmp_path / "latest")
    assert sorted(os.listdir(tmp_path)) == ["latest", "step1"]
    loaded = _layer(2)
    checkpoint.load(loaded, tmp_path / "step1")
    assert _same(loaded, new)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def _unchanged_after_failed_load(model: Linear4bit, path, match: str) -> None:
    before = {key: _bytes(value).clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        checkpoint.load(model, path)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(_bytes(after[key]), value), key


def _built(
    blocksize: int = 64, compress_statistics: bool = True, quant_storage=torch.uint8, quant_type: str = "nf4"
) -> Linear4bit:
    layer = Linear4bit(128, 16, compress_statistics=compress_statistics, quant_storage=quant_storage)
    layer.weight = Params4bit(
        layer.weight.data.clone(),
        blocksize=blocksize,
        compress_statistics=compress_statistics,
        quant_storage=quant_storage,
        quant_type=quant_type,
    )
    return layer.to("cpu")


@pytest.mark.parametrize(
    ("saved", "model", "match"),
    [
        ({"quant_storage": torch.float16}, {"quant_storage": torch.bfloat16}, "dtype torch.float16, the model's has"),
        (
            {},
            {"compress_statistics": False},
            r"\(compress_statistics=True\), the model's has compress_statistics=False",
        ),
        ({"compress_statistics": False}, {}, "'weight' has no double quantization \\(compress_statistics=False\\)"),
        ({}, {"quant_type": "fp4"}, "the checkpoint's 4-bit weight 'weight' is nf4, the model's fp4"),
        ({"blocksize": 128}, {}, "blocksize 128, the model's has 64"),
    ],
)
def test_load_of_another_layout_raises_before_anything_loads(tmp_path, saved, model, match):
    """DCP writes into the model's own tensors: an entry of another dtype (cast values: rewritten 4-bit words) or
    another 4-bit layout must raise before it runs."""
    torch.manual_seed(0)
    checkpoint.save(_built(**saved), tmp_path / "ckpt")
    torch.manual_seed(1)
    _unchanged_after_failed_load(_built(**model), tmp_path / "ckpt", match)


def test_float_entries_of_another_dtype_load_cast():
    """Only packed words refuse another dtype: float parameters load cast, as DCP loads them."""
    import tempfile

    torch.manual_seed(0)
    source = torch.nn.Sequential(_built(), torch.nn.LayerNorm(16))
    target = torch.nn.Sequential(_built(), torch.nn.LayerNorm(16)).to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint.save(source, f"{folder}/ckpt")
        checkpoint.load(target, f"{folder}/ckpt")
    assert torch.equal(target[1].weight, source[1].weight.to(torch.bfloat16))
    assert torch.equal(target[0].bias, source[0].bias.to(torch.bfloat16))
    assert torch.equal(F.packed_bytes(target[0].weight), F.packed_bytes(source[0].weight))


def test_load_state_dict_of_a_keep_vars_state_dict():
    source, target = _built(), _built(blocksize=128)
    target.load_state_dict(source.state_dict(keep_vars=True))
    assert torch.equal(F.packed_bytes(target.weight), F.packed_bytes(source.weight))
    assert target.weight.data_ptr() != source.weight.data_ptr()
