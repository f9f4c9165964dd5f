"""Process-group setup: the same path under torchrun, ``accelerate launch`` and plain ``python`` (world size 1).

Launchers export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; plain ``python`` gets a world of
one on a free local port, so single-process debug runs go through the same FSDP2 code as multi-process runs.
"""

from __future__ import annotations

import gc
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule

from .config import Config


@dataclass
class DistInfo:
    """Where this process stands: rank, world size, device, mesh, and whether debug mode is on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh
    launched: bool
    debug: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launched_by_launcher() -> bool:
    """True under torchrun / accelerate launch / any env:// launcher (they set WORLD_SIZE and RANK)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def device_type(setting: str) -> str:
    """The device type ``dist.device`` names: ``auto`` is cuda where CUDA is available, else cpu."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def setup(cfg: Config) -> DistInfo:
    """Initialise the process group (always with a timeout) and a 1-D device mesh over all ranks."""
    launched = launched_by_launcher()
    if not launched:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    want = device_type(cfg.dist.device)
    if want == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("dist.device = 'cuda' but CUDA is not available")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = cfg.dist.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=cfg.dist.timeout_s), **kwargs)
    mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("dp_shard",))
    debug = cfg.debug.mode == "on" or (cfg.debug.mode == "auto" and not launched)
    return DistInfo(rank, world_size, local_rank, device, mesh, launched, debug)


def barrier() -> None:
    """A barrier that works for gloo and nccl alike."""
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank (collective; ``flag`` itself where there is no process group)."""
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def reshard_all(model: nn.Module) -> None:
    """Shard every FSDP2 unit of ``model`` again (no-op for those that are): a forward without backward (a held-out
    evaluation, the packing check) under ``dist.reshard_after_forward = false`` leaves parameters unsharded, where
    torch's optimizer state-dict API cannot map them and a parameter reads as the gathered (or mixed-precision)
    tensor, not the rank's shard."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def from_main(value: str) -> str:
    """Rank 0's ``value`` on every rank (collective; ``value`` itself where there is no process group): for what
    each rank would otherwise read from its own clock."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def teardown() -> None:
    """Finish collectives on every rank, then destroy the process group while the interpreter is fully alive.

    FSDP modules hold the process group and sit in reference cycles, so without a collection they (and the
    group) outlive the training function; gloo's worker threads may still be releasing the last collectives'
    tensors then. If that happens during interpreter finalization the thread cannot take the GIL and the
    process aborts ("terminate called without an active exception", seen on the 2-core CI machine). Call it
    only after a successful run: after a failure other ranks may be stuck in a different collective.
    """
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    gc.collect()
