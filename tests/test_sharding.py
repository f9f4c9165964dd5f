"""FSDP2 with 4-bit weights, in real multi-process runs (torchrun, gloo on CPU).

Each case starts ``tests/distributed/worker.py`` under torchrun with a process-group timeout and a
subprocess timeout, so a failing collective can never hang the suite.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import torchrun_worker

WORKER = Path(__file__).parent / "distributed" / "worker.py"
# On a GPU machine the same scenarios run on CUDA with NCCL, for the world sizes its GPUs allow.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MAX_WORLD = torch.cuda.device_count() if DEVICE == "cuda" else 8


def skip_unless_fsdp_shards(storage: str) -> None:
    from fsdp4bit.sharding import fsdp_supports_integer_params

    if storage == "uint8" and not fsdp_supports_integer_params():
        pytest.skip("this torch's FSDP2 cannot shard integer (uint8) parameters; shard_model says so (tested)")


def torchrun(nproc: int, *args: str, timeout: int = 240) -> dict:
    """Run the worker on ``nproc`` processes; return rank 0's report, fail with the output on error."""
    if nproc > MAX_WORLD:
        pytest.skip(f"world size {nproc} needs {nproc} GPUs, {MAX_WORLD} here")
    return torchrun_worker(WORKER, nproc, *args, device=DEVICE, timeout=timeout)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_allgather_is_bit_exact_for_every_storage_dtype(world):
    """Packed bytes with every NaN/Inf pattern round-trip shard -> all-gather unchanged; stats too."""
    report = torchrun(world, "bytes")
    nf4_dq = report["bfloat16-nf4-dq1-bs64"]["allgather_bytes_per_param"]
    assert nf4_dq <= 0.52, f"NF4 bs64 double-quant all-gather moves {nf4_dq:.4f} bytes/param"


@pytest.mark.parametrize(
    "world,storage,precision,reshard,ckpt",
    [
        (1, "uint8", "fp32", "reshard", "nockpt"),
        (2, "uint8", "fp32", "reshard", "nockpt"),
        (3, "float32", "fp32", "noreshard", "ckpt"),
        (2, "bfloat16", "bf16", "reshard", "ckpt"),
        (1, "bfloat16", "fp32", "offload", "nockpt"),
    ],
)
def test_lora_training_matches_single_process(world, storage, precision, reshard, ckpt):
    """AdamW steps on a 4-bit base + LoRA model under FSDP2 give the single-process losses and weights."""
    skip_unless_fsdp_shards(storage)
    report = torchrun(world, "train", storage, precision, reshard, ckpt)
    assert len(report["losses"]) == len(report["reference"]) == 6


@pytest.mark.parametrize(
    "save_world,load_worlds,storage", [(2, (1, 3), "bfloat16"), (1, (2,), "uint8"), (1, (1,), "float32")]
)
def test_dcp_checkpoint_loads_on_other_world_sizes(tmp_path, save_world, load_worlds, storage):
    """A DCP checkpoint of a sharded 4-bit model reloads bit-exactly on a different number of ranks."""
    skip_unless_fsdp_shards(storage)
    path = str(tmp_path / "ckpt")
    torchrun(save_world, "dcp_save", path, storage)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p], "temporary checkpoint folder left behind"
    for world in load_worlds:
        torchrun(world, "dcp_load", path, storage)


@pytest.mark.parametrize("storage", ["bfloat16", "float32"])
def test_gather_inputs_follow_in_place_writes(storage):
    """The pre-hook's kept all-gather inputs (padded copies on uneven shards at world size 3) are rebuilt after an
    in-place write to a shard's words or statistics."""
    assert torchrun(3, "gather_cache", storage)["shards"] > 0


@pytest.mark.parametrize("world,storage", [(2, "bfloat16"), (3, "float32"), (1, "uint8")])
def test_torch_state_dict_api_round_trips(tmp_path, world, storage):
    """get/set_model_state_dict (sharded via DCP, full, full from rank 0 broadcast) restore every byte and output."""
    skip_unless_fsdp_shards(storage)
    report = torchrun(world, "dsd", str(tmp_path), storage)
    assert report["cases"] == ["sharded", "full", "full_rank0"]


def test_hsdp_trains_and_round_trips_state_dicts(tmp_path):
    """HSDP (a 2-D mesh: 2 replicas, each sharded over 2 ranks) trains like one process and its state dicts
    (sharded via DCP, full, full from rank 0) round-trip: the statistics follow the shard dimension."""
    report = torchrun(4, "train", "bfloat16", "fp32", "reshard", "nockpt", "hsdp")
    assert len(report["losses"]) == 6
    report = torchrun(4, "dsd", str(tmp_path), "bfloat16", "hsdp")
    assert report["cases"] == ["sharded", "full", "full_rank0"]


def test_hsdp_checkpoint_loads_on_other_mesh_shapes(tmp_path):
    """fsdp4bit.checkpoint saved under HSDP (2 x 2) reloads bit-exactly under FSDP at 2 ranks and HSDP at 4, and an
    FSDP checkpoint of 2 ranks reloads under HSDP: DCP stores the replicated shards once."""
    hsdp, fsdp = str(tmp_path / "hsdp"), str(tmp_path / "fsdp")
    torchrun(4, "dcp_save", hsdp, "bfloat16", "hsdp")
    torchrun(2, "dcp_load", hsdp, "bfloat16")
    torchrun(4, "dcp_load", hsdp, "bfloat16", "hsdp")
    torchrun(2, "dcp_save", fsdp, "bfloat16")
    torchrun(4, "dcp_load", fsdp, "bfloat16", "hsdp")


@pytest.mark.parametrize(
    "kind, world", [(kind, world) for kind in ("float", "bnb", "nested") for world in (1, 2)] + [("tied", 2)]
)
def test_sharded_model_built_from_meta_device_checkpoint(tmp_path, kind, world):
    """Float and bitsandbytes-format checkpoints load block by block into a sharded 4-bit model; units nested in
    units (each block and its 4-bit layer) are sharded inner first, by load_sharded and shard_model; blocks sharing
    a 4-bit weight are loaded and sharded as one group."""
    torchrun(world, "load_meta", str(tmp_path / f"model_{kind}.safetensors"), kind)


def test_shard_model_explains_integer_storage_on_old_torch(monkeypatch):
    """Where FSDP2 cannot shard uint8 parameters, shard_model says why and what to do instead of crashing."""
    import fsdp4bit as bnb
    from fsdp4bit import sharding

    monkeypatch.setattr(sharding, "fsdp_supports_integer_params", lambda: False)
    layer = bnb.nn.Linear4bit(8, 8, quant_type="nf4").to("cpu")
    with pytest.raises(ValueError, match="quant_storage=torch.bfloat16"):
        sharding.shard_model(layer)


def test_sharding_refuses_an_unquantized_weight():
    """A Params4bit not quantized yet (still float, never moved with ``.to(device)``) is refused before FSDP2
    sees it, by the model-wide and the one-module entry points alike."""
    import fsdp4bit as bnb
    from fsdp4bit import sharding

    layer = bnb.nn.Linear4bit(8, 8, quant_type="nf4", quant_storage=torch.bfloat16)
    for shard in (sharding.shard_model, sharding.shard_module):
        with pytest.raises(ValueError, match=r"^weight is a Params4bit that is not quantized yet: call \.to\(device\)"):
            shard(layer)


def test_failures_raise_on_every_rank_and_other_storages_load():
    """A cross-storage sharded load is bit-exact; a save failing on rank 0 alone, or torch's fully_shard of an
    unquantized weight, raises on every rank (the subprocess timeout would catch a rank left waiting); tied 4-bit
    weights shard and give the unsharded outputs."""
    report = torchrun(2, "robustness")
    assert report["save_raised"] in ("NotADirectoryError", "FileExistsError")


def test_shard_model_checks_its_arguments():
    """Before fully_shard (and any process group): what would fail later with an AttributeError is a TypeError."""
    import fsdp4bit as bnb
    from fsdp4bit import sharding

    layer = bnb.nn.Linear4bit(8, 8, quant_type="nf4", quant_storage=torch.bfloat16).to("cpu")
    with pytest.raises(TypeError, match="^model must be a torch.nn.Module, got NoneType$"):
        sharding.shard_model(None)
    with pytest.raises(TypeError, match="^mp_policy must be a torch.distributed.fsdp.MixedPrecisionPolicy or None"):
        sharding.shard_model(layer, mp_policy="bf16")
    with pytest.raises(TypeError, match="^mesh must be a torch.distributed.device_mesh.DeviceMesh or None"):
        sharding.shard_module(layer, mesh="world")
    with pytest.raises(TypeError, match="^block_types must be a tuple of torch.nn.Module classes or None"):
        sharding.shard_model(layer, block_types=["Linear4bit"])
    trainable = bnb.nn.Linear4bit(8, 8, quant_type="nf4", quant_storage=torch.float32).to("cpu")
    trainable.requires_grad_(True)  # the words take no gradient: refused before FSDP2's cryptic view error
    with pytest.raises(ValueError, match="^weight is a Params4bit that requires grad: a 4-bit weight is frozen"):
        sharding.shard_model(trainable)
    # a CPU weight bound for an accelerator mesh: FSDP2 would move it as a new Parameter that requires grad
    with pytest.raises(ValueError, match=r"^weight is a 4-bit weight on cpu, and fully_shard puts parameters on cuda"):
        sharding.check_shardable(layer, "cuda")
    sharding.check_shardable(layer, "cpu")


def test_shard_groups_put_tied_units_together():
    """FSDP2 refuses a parameter in two groups: units sharing one are sharded together (where the last of them
    stands), and a unit sharing one with a module around it is left to that module."""
    import fsdp4bit as bnb
    from fsdp4bit.sharding import shard_groups, units_bottom_up

    def layer() -> torch.nn.Module:
        return bnb.nn.Linear4bit(8, 8, quant_type="nf4")

    blocks = torch.nn.ModuleList(torch.nn.Sequential(layer(), layer()) for _ in range(3))
    model = torch.nn.Sequential(blocks, layer())
    blocks[2][0].weight = blocks[0][1].weight
    layers = [m for _, m in units_bottom_up(model, lambda m: isinstance(m, bnb.nn.Linear4bit))]
    assert shard_groups(model, layers) == [
        [blocks[0][0]],
        [blocks[1][0]],
        [blocks[1][1]],
        [blocks[0][1], blocks[2][0]],
        [blocks[2][1]],
        [model[1]],
    ]
    model[1].bias = blocks[1][1].bias  # shared with a root-level layer: the block is left to the root
    sequential = [m for _, m in units_bottom_up(model, lambda m: isinstance(m, torch.nn.Sequential))]
    assert shard_groups(model, sequential) == [[blocks[0], blocks[2]]]
    # a member inside another unit: the group comes first (the outer unit would take the member's parameters)
    outer = torch.nn.Sequential(torch.nn.Sequential(layer()), layer())
    model = torch.nn.Sequential(outer, torch.nn.Sequential(layer()))
    model[1][0].weight = outer[0][0].weight
    units = [m for _, m in units_bottom_up(model, lambda m: isinstance(m, torch.nn.Sequential))]
    assert units == [outer[0], outer, model[1]]
    assert shard_groups(model, units) == [[outer[0], model[1]], [outer]]
