"""Distributed checkpoints of (FSDP2-sharded) 4-bit models: DCP save/load across world sizes, atomic writes.

The state dict of a sharded Linear4bit holds its packed words as a Shard(0) DTensor (DCP reshards it
on load) and its statistics whole, so a checkpoint written on W ranks loads on any number of ranks.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from .quant_state import unpack_tensor_to_dict
from .tensor_ops import plain


def fsync_dir(path: str | os.PathLike) -> None:
    """Flush folder ``path``'s entries (a rename into it) to disk, so a crash after it cannot undo the rename."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _is_blob(key: str) -> bool:
    """Whether ``key`` is a packed JSON quant-state entry (its length depends on its values)."""
    return key.rsplit(".", 1)[-1].startswith("bitsandbytes__")


def _save_target_problem(path: str) -> str:
    """Why ``path`` cannot take a checkpoint ("" if it can): save replaces only a checkpoint folder or an empty one."""
    if not os.path.exists(path):
        return ""
    if not os.path.isdir(path):
        return f"path {path!r} exists and is not a folder: save writes a checkpoint folder and would replace it"
    if os.listdir(path) and not os.path.exists(os.path.join(path, ".metadata")):
        return f"path {path!r} is a folder that holds no checkpoint (no .metadata): save would replace it"
    return ""


def _checkpoint_path(path: str | os.PathLike) -> str:
    """``path`` absolute, normalized and with symbolic links resolved: "ckpt/" and "ckpt" name one checkpoint (and one
    backup and temporary name), and a link to a checkpoint is written through, as ``torch.save`` writes through a link
    to a file (renaming the link itself would move it, not the checkpoint)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    return os.path.realpath(os.fspath(path))


def _parent(path: str) -> str:
    """The folder holding ``path`` (where save's temporary and backup folders live)."""
    return os.path.dirname(os.path.abspath(path)) or "."


def _backup(path: str) -> str:
    """Where :func:`replace_folder` keeps the folder it replaces until the new one is in place."""
    return os.path.join(_parent(path), f".{os.path.basename(path)}.old")


def temp_folder(path: str | os.PathLike, token: str | None = None) -> str:
    """The temporary folder a write to ``path`` fills before :func:`replace_folder` swaps it in: ``.NAME.tmp-TOKEN``
    beside it (TOKEN a fresh random one unless given), a name :func:`recover_folder` knows to clear."""
    path = os.fspath(path)
    name = f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex if token is None else token}"
    return os.path.join(_parent(path), name)


def fsync_tree(path: str | os.PathLike) -> None:
    """Flush every file and folder under ``path`` to disk (before a rename publishes it)."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(root)


def recover_folder(path: str | os.PathLike) -> None:
    """Finish a :func:`replace_folder` a crash interrupted: the old folder comes back if the new one never reached
    ``path``, else its leftover copy goes; folders of unfinished writes to ``path`` (``.NAME.tmp-*``) go (one writer
    per path)."""
    path = os.fspath(path)
    backup = _backup(path)
    if os.path.isdir(backup):
        if os.path.exists(path):
            shutil.rmtree(backup)
        else:
            os.rename(backup, path)
    parent = _parent(path)
    prefix = os.path.basename(temp_folder(path, ""))
    stale = sorted(name for name in os.listdir(parent) if name.startswith(prefix))
    for name in stale:
        if name.endswith(".old") and not os.path.exists(path):  # where saves before session 25 kept it
            os.rename(os.path.join(parent, name), path)
        else:
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def on_rank0(step: Callable[[], Any]) -> Any:
    """``step()`` on rank 0 only, its result given to every rank. An exception there is raised on every rank (rank
    0's own, a RuntimeError naming it elsewhere): the other ranks would otherwise wait for rank 0 at the next
    collective until the process group timed out."""
    result, error = None, None
    if _rank() == 0:
        try:
            result = step()
        except Exception as err:  # a KeyboardInterrupt stops the job anyway
            error = err
    message = None
    if dist.is_initialized():
        box = [result, None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(box, src=0)
        result, message = box
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0 failed: {message}")
    return result


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model``'s state with DCP into ``path`` atomically: a temporary folder renamed into place at the end.
    An existing ``path`` must be a checkpoint folder (or an empty one), which is replaced; missing parent folders are
    made. A failed write leaves the previous checkpoint as it was and removes its temporary folder; a crash between
    the two renames that swap the folders leaves the old checkpoint at ``.NAME.old``, which :func:`load` reads and
    the next save restores. What only rank 0 does (checks, folders, renames) raises on every rank if it fails."""
    _check_model(model)
    path = _checkpoint_path(path)
    parent = _parent(path)

    def prepare() -> tuple[str, str]:
        os.makedirs(parent, exist_ok=True)
        recover_folder(path)
        problem = _save_target_problem(path)
        token = "" if problem else uuid.uuid4().hex
        if token:
            os.makedirs(temp_folder(path, token), exist_ok=False)
        return token, problem

    token, problem = on_rank0(prepare)
    if problem:
        raise ValueError(problem)
    tmp = temp_folder(path, token)  # each rank's own spelling of the folder (its own view of the path)
    try:
        dcp.save(model.state_dict(), checkpoint_id=tmp)
    except BaseException:  # DCP's CheckpointException is a BaseException: every rank raises it
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    _barrier()

    on_rank0(lambda: replace_folder(tmp, path))


def replace_folder(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the complete folder ``tmp`` to ``path`` (``tmp`` beside it, as :func:`temp_folder` names it; a link
    ``path`` is replaced through, not moved): an existing ``path`` is renamed to ``.NAME.old`` first and deleted once
    ``tmp`` is in place, so a crash leaves one of the two whole, never neither (deleting first, a crash between would
    leave nothing; :func:`recover_folder` finishes the swap, and a failed rename puts the old folder back)."""
    tmp, path = os.fspath(tmp), os.path.realpath(os.fspath(path))
    if not os.path.isdir(tmp) or os.path.realpath(_parent(tmp)) != _parent(path):
        raise ValueError(f"tmp must be a folder beside {path!r} (a rename moves it into place), got {tmp!r}")
    backup = None
    if os.path.exists(path):
        backup = _backup(path)
        os.rename(path, backup)
    try:
        os.rename(tmp, path)
    except BaseException:
        if backup:
            os.rename(backup, path)
        raise
    if backup:
        shutil.rmtree(backup)
    fsync_dir(_parent(path))


def load(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a checkpoint written by :func:`save` (on any world size) into ``model`` in place. Entries the model lacks
    are ignored; a missing entry, or one of another shape, dtype or 4-bit layout, raises ValueError before anything
    loads."""
    _check_model(model)
    path = _checkpoint_path(path)
    if not os.path.isdir(path) and os.path.isdir(_backup(path)):
        path = _backup(path)  # a save crashed between its renames: the checkpoint it was replacing
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint folder at {path!r}")
    if not os.path.exists(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"{path!r} holds no checkpoint (no .metadata file)")
    state = model.state_dict()
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    missing = [key for key in state if key not in saved]
    if missing:
        raise ValueError(f"checkpoint {path!r} has no entries {missing}{_format_hint(missing, saved)}")
    blobs = {key: torch.empty(saved[key].size, dtype=torch.uint8) for key in state if _is_blob(key)}
    if blobs:  # first the small JSON entries, at their saved lengths: their layouts must be the model's
        dcp.load(blobs, checkpoint_id=path)
        _check_layouts(state, blobs)
    _check_entries(state, saved)
    state.update(blobs)
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state)


def _check_entries(state: dict, saved: dict) -> None:
    """Every tensor of ``state`` has the checkpoint's shape (the JSON entries' lengths aside), and every packed 4-bit
    weight its dtype: DCP casts another dtype's values into the model's tensors, which is right for float parameters
    and rewrites packed words."""
    packed = {key.partition(".quant_state.bitsandbytes__")[0] for key in state if _is_blob(key)}  # 4-bit weights
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or _is_blob(key):
            continue
        size = getattr(saved[key], "size", None)
        if size is not None and size != value.shape:
            raise ValueError(f"checkpoint entry {key!r} has shape {tuple(size)}, the model's has {tuple(value.shape)}")
        dtype = getattr(getattr(saved[key], "properties", None), "dtype", None)
        if key in packed and dtype is not None and dtype != value.dtype:
            raise ValueError(
                f"checkpoint entry {key!r} has dtype {dtype}, the model's has {value.dtype} (a 4-bit weight's dtype "
                "is its quant_storage: build the model with the checkpoint's)"
            )


def _format_hint(missing: list[str], saved: dict) -> str:
    """Why a 4-bit weight's entries are missing, where the checkpoint holds that weight in another format."""
    hints = []
    for key in missing:
        weight, blob, quant_type = key.partition(".quant_state.bitsandbytes__")
        if blob:
            theirs = [k.rsplit("__", 1)[1] for k in saved if k.startswith(weight + blob)]
            if theirs:
                hints.append(f"the checkpoint's 4-bit weight {weight!r} is {theirs[0]}, the model's {quant_type}")
        elif key.endswith((".nested_absmax", ".nested_quant_map")):
            weight = key.rsplit(".", 1)[0]
            if weight + ".absmax" in saved:
                hints.append(
                    f"the checkpoint's 4-bit weight {weight!r} has no double quantization (compress_statistics=False), "
                    "the model's has"
                )
    return f" ({'; '.join(dict.fromkeys(hints))})" if hints else ""


# What a 4-bit weight's JSON entry says of its layout (its dtypes and the double-quant offset are values it loads)
_LAYOUT_KEYS = ("blocksize", "shape", "nested_blocksize")  # the quant type is in the entry's key


def _check_layouts(state: dict, blobs: dict) -> None:
    """The checkpoint's 4-bit weights have the model's layouts: shape (the same byte count can hold another shape),
    quant type, blocksize and double quantization, so the statistics the model's state dict holds are the ones
    the checkpoint has and ``load_state_dict`` cannot fail after DCP has written into the model."""
    for key, blob in blobs.items():
        ours, theirs = unpack_tensor_to_dict(plain(state[key]), key), unpack_tensor_to_dict(blob, key)
        if (ours.get("nested_blocksize") is None) != (theirs.get("nested_blocksize") is None):
            raise ValueError(
                f"checkpoint entry {key!r} describes a 4-bit weight with double quantization "
                f"(compress_statistics={theirs.get('nested_blocksize') is not None}), the model's has "
                f"compress_statistics={ours.get('nested_blocksize') is not None}"
            )
        for field in _LAYOUT_KEYS:
            if ours.get(field) != theirs.get(field):
                raise ValueError(
                    f"checkpoint entry {key!r} describes a 4-bit weight with {field} {theirs.get(field)!r}, the "
                    f"model's has {ours.get(field)!r}"
                )


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict as plain CPU tensors in bitsandbytes' format (collective: every rank calls it)."""
    _check_model(model)
    out = {}
    for key, value in model.state_dict().items():
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        out[key] = plain(value).cpu() if isinstance(value, torch.Tensor) else value
    return out
