"""accelerate's FSDP2 plugin with Linear4bit layers (accelerate #3983 is the failure this guards against).

accelerate shards with FSDP only on accelerators: on CPU ``accelerate launch --cpu`` starts one process (MPI
is its multi-CPU launcher) and torchrun with ``cpu=True`` gets DDP. So this runs on a machine with 2+ GPUs (the
device tool) and skips elsewhere; the worker reports what accelerate actually built, and the test checks it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port

pytest.importorskip("accelerate")
WORKER = Path(__file__).parent / "distributed" / "accelerate_worker.py"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="accelerate runs FSDP2 only on 2+ accelerators")
@pytest.mark.parametrize("storage", ["uint8", "bfloat16"])
def test_accelerate_fsdp2_trains_4bit_model(storage, tmp_path):
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        str(port),
        str(WORKER),
        storage,
        str(tmp_path),
    ]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"},
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    report = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("REPORT "))[7:])
    assert (report["world"], report["distributed_type"], report["sharded"]) == (2, "FSDP", True), report
    if storage == "bfloat16":
        assert report["base_sharded"], report  # the 4-bit weights themselves are sharded, not only the adapters
    outcomes = report["state_dicts"]
    assert outcomes["SHARDED_STATE_DICT"] == "restored", outcomes
    # torch's broadcast load with cpu offload cannot take the statistics (pytorch/pytorch#149516): loud, never wrong
    assert outcomes["FULL_STATE_DICT"] == "restored" or outcomes["FULL_STATE_DICT"].startswith("KeyError"), outcomes
    losses, ref = report["losses"], report["reference"]
    assert all(v == v and v < 1e6 for v in losses), losses  # finite, no NaN
    assert losses[-1] < losses[0], losses
    for a, b in zip(losses, ref, strict=True):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (losses, ref)
