"""FSDP2 with 4-bit weights in the combinations a QLoRA run puts together, at world sizes 1-3 with uneven shapes
(shards that split quantization blocks, ranks holding no words): mixed precision x quant_storage x nf4/fp4 x
double quant, activation checkpointing (torch.utils.checkpoint with and without reentrant, checkpoint_wrapper) x
reshard_after_forward, gradient accumulation without sync, torch.compile, CPU offload, evaluation and inference,
and checkpoints saved at 2 ranks and loaded at 3 and 1 (``tests/distributed/combinations_worker.py``; each
scenario compares with the unsharded model: outputs, adapter gradients, 4-bit bytes and statistics).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import torchrun_worker

WORKER = Path(__file__).parent / "distributed" / "combinations_worker.py"


@pytest.fixture(autouse=True)
def _needs_uint8_sharding():
    from fsdp4bit.sharding import fsdp_supports_integer_params

    if not fsdp_supports_integer_params():  # every scenario includes uint8 storage
        pytest.skip("this torch's FSDP2 cannot shard integer (uint8) parameters")


def torchrun(nproc: int, *args: str, timeout: int = 300) -> dict:
    """Run the worker on ``nproc`` CPU processes (gloo); return rank 0's report, fail with the output on error."""
    return torchrun_worker(WORKER, nproc, *args, device="cpu", timeout=timeout)


def test_mixed_precision_storage_quant_matrix_at_three_ranks(tmp_path):
    """param_dtype None/bf16/fp16 (fp32 reduction) x uint8/f16/bf16/f32 storage x nf4/fp4 x double quant (48
    models, reshard_after_forward alternating): outputs equal the unsharded model's, adapter gradients equal up to
    the reduction's rounding, gathered words and absmax bit for bit, and fp32 outputs match a float64 reference;
    layers of 1x1 to 1x130 (ranks with no words or no blocks) train and checkpoint the same; repeated inference
    under torch.inference_mode gives the unsharded outputs (the refill of gathered statistics raised "Inference
    tensors do not track version counter"), also between micro-batches; one FSDP group of 4-bit layers in four
    storages (one without a bias, blocksize 32) next to a float layer; a whole-bf16 model without a policy."""
    report = torchrun(3, "three", str(tmp_path))
    assert report["matrix"] == 48 and report["tiny"] == 16 and report["mixed"] == 3, report
    assert len(report["features"]) == 7, report["features"]


def test_training_feature_combinations_at_two_ranks():
    """Activation checkpointing (non-reentrant, reentrant, checkpoint_wrapper both ways) x reshard_after_forward x
    mixed precision, with and without gradient accumulation under set_requires_gradient_sync(False), compiled
    blocks, shard_model(cpu_offload=True) on a CPU-only machine (it raised "Cannot access accelerator device"),
    gathered weights kept across micro-batches, a no_grad evaluation before training, and inference under
    torch.inference_mode (FSDP2's set-up there raised "Cannot set version_counter for inference tensor", a second
    gather "Inference tensors do not track version counter")."""
    report = torchrun(2, "features")
    assert len(report["cases"]) == 55, report["cases"]


@pytest.fixture(scope="module")
def saved_at_two_ranks(tmp_path_factory) -> str:
    """Checkpoints (fsdp4bit.checkpoint) and full state dicts of 8 models saved at 2 ranks (see the worker's save)."""
    path = str(tmp_path_factory.mktemp("combinations"))
    assert torchrun(2, "save", path)["saved"] == 8
    return path


def test_checkpoints_of_combinations_load_on_other_world_sizes(saved_at_two_ranks):
    """Models of every storage (mixed precision, CPU offload, a trainable 4-bit layer bias, reshard_after_forward
    both ways), trained and saved at 2 ranks (after a forward that left weights unsharded), load at 3 and 1 through
    fsdp4bit.checkpoint and torch's set_model_state_dict (full), into models that gathered other weights first, and
    at 1 rank into unsharded models: bytes, statistics and outputs exactly the saved ones."""
    for world in (3, 1):
        assert torchrun(world, "load", saved_at_two_ranks)["loaded"] == 8


def test_load_state_dict_into_a_model_left_unsharded_by_a_forward(saved_at_two_ranks):
    """load_state_dict of a sharded state dict into a sharded model whose forward (reshard_after_forward=False) left
    its weights unsharded: plain FSDP2 reshards them first (its load pre-hook) and loads; the saved bytes, statistics
    and outputs come back exactly."""
    torchrun(3, "load", saved_at_two_ranks, "sharded_sd")
