"""Distributed checkpoints of (FSDP2-sharded) 4-bit models: DCP save/load across world sizes, atomic writes.

The state dict of a sharded Linear4bit holds its packed words as a Shard(0) DTensor (DCP reshards it
on load) and its statistics whole, so a checkpoint written on W ranks loads on any number of ranks.
"""

from __future__ import annotations

import os
import shutil
import uuid

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from .tensor_ops import plain


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model``'s state with DCP into ``path`` atomically: a temporary folder renamed into place at the end."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path)) or "."
    token = [uuid.uuid4().hex if _rank() == 0 else ""]
    if dist.is_initialized():
        dist.broadcast_object_list(token, src=0)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{token[0]}")
    if _rank() == 0:
        os.makedirs(tmp, exist_ok=False)
    _barrier()
    dcp.save(model.state_dict(), checkpoint_id=tmp)
    _barrier()
    if _rank() == 0:
        old = None
        if os.path.exists(path):
            old = f"{tmp}.old"
            os.rename(path, old)
        os.rename(tmp, path)
        if old:
            shutil.rmtree(old)
        fd = os.open(parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _barrier()


def load(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a checkpoint written by :func:`save` (on any world size) into ``model`` in place."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no checkpoint folder at {path!r}")
    state = model.state_dict()
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    for key in state:
        # The JSON metadata blob's length depends on its values: receive it at the saved length.
        if key.rsplit(".", 1)[-1].startswith("bitsandbytes__") and key in saved:
            state[key] = torch.empty(saved[key].size, dtype=torch.uint8)
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict as plain CPU tensors in bitsandbytes' format (collective: every rank calls it)."""
    out = {}
    for key, value in model.state_dict().items():
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        out[key] = plain(value).cpu() if isinstance(value, torch.Tensor) else value
    return out
