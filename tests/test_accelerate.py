"""accelerate's FSDP2 plugin with Linear4bit layers (accelerate #3983 is the failure this guards against)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")
WORKER = Path(__file__).parent / "distributed" / "accelerate_worker.py"


@pytest.mark.parametrize("storage", ["uint8", "bfloat16"])
def test_accelerate_fsdp2_trains_4bit_model(storage):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "2",
        "--cpu",
        "--main_process_port",
        str(port),
        str(WORKER),
        storage,
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
    losses, ref = report["losses"], report["reference"]
    assert all(v == v and v < 1e6 for v in losses), losses  # finite, no NaN
    assert losses[-1] < losses[0], losses
    for a, b in zip(losses, ref, strict=True):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (losses, ref)
