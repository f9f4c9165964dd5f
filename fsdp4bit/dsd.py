"""torch's state-dict API (``torch.distributed.checkpoint.state_dict``, "DSD") on 4-bit layers.

DSD's ``get_model_state_dict`` / ``set_model_state_dict`` (accelerate's FSDP2 ``save_state``/``load_state`` and
``get_state_dict``, torchtitan's checkpointer) check every key by ``getattr`` along its dotted path, and their
``broadcast_from_rank0`` load hands entries that are not parameters or buffers to rank 0 only. A 4-bit layer's
statistics (``weight.absmax``, ``weight.quant_state.bitsandbytes__nf4``, ...) are neither attributes of the weight
(an FSDP2 shard is a DTensor) nor parameters; this module bridges both.
"""

from __future__ import annotations

import torch


class KeyPaths:
    """Stands for every public attribute path below a 4-bit layer's ``weight`` key, so DSD's key check passes.

    Linear4bit's ``_fqn_modifiers`` (DSD's hook for modules whose keys are not plain attribute paths) routes
    the walk of ``weight.*`` keys through this object.
    """

    __slots__ = ()

    def __getattr__(self, name: str) -> KeyPaths:
        if name.startswith("_"):  # DSD probes dunder and hook names with hasattr: those do not exist
            raise AttributeError(name)
        return self


def statistics_on_every_rank(weight, stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The statistics a sharded weight loads, taken from a rank of its mesh that was given them.

    DSD's ``broadcast_from_rank0`` load copies the packed words into every shard but passes the statistics to
    rank 0 alone. Loading a sharded 4-bit weight is therefore collective over its mesh: per mesh dimension, one
    all-gather of a flag, and a broadcast from the lowest holder where ranks differ (dimension by dimension, so
    they reach every rank of an HSDP mesh). Returns ``stats`` unchanged when every rank (or none) has them.
    """
    mesh = weight.device_mesh
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else "cpu"
    for dim in range(mesh.ndim):
        stats = _share(stats, mesh.get_group(dim), mesh.size(dim), device)
    return stats


def _share(stats: dict[str, torch.Tensor], group, world: int, device) -> dict[str, torch.Tensor]:
    """``stats`` of the lowest rank of ``group`` that has any, on the ranks that have none."""
    import torch.distributed as dist

    have = torch.tensor([1 if stats else 0], dtype=torch.int32, device=device)
    flags = have.new_empty(world)
    dist.all_gather_into_tensor(flags, have, group=group)
    holders = flags.nonzero().flatten().tolist()
    if len(holders) in (0, world):
        return stats
    payload = [{k: v.detach().cpu() for k, v in stats.items()} if stats else None]
    dist.broadcast_object_list(payload, src=dist.get_global_rank(group, holders[0]), group=group, device=device)
    return stats if stats else payload[0]
