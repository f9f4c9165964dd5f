"""Shared test helpers: devices to parametrize over, ids, buffer round-trips, subprocess runs."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

TRUE_FALSE = (True, False)
STORAGE = {"uint8": torch.uint8, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def get_available_devices() -> list[str]:
    """CPU always; CUDA where a GPU is present (CUDA cases are collected everywhere but skip without one)."""
    return ["cpu", "cuda"]


def skip_if_no_device(device: str) -> None:
    import pytest

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")


def describe_dtype(dtype: torch.dtype | str) -> str:
    return dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")


def id_formatter(label: str):
    """ids like 'bias=True' for pytest.mark.parametrize."""
    return lambda value: f"{label}={value}"


def torch_save_to_buffer(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def torch_load_from_buffer(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def assert_same_parameters(got: torch.nn.Module, want: torch.nn.Module) -> None:
    """``got`` has ``want``'s parameter names, and each its dtype, requires_grad flag and bytes (a 4-bit weight's
    packed bytes)."""
    from fsdp4bit.functional import packed_bytes
    from fsdp4bit.nn import Params4bit

    def raw(param: torch.Tensor) -> torch.Tensor:
        return packed_bytes(param) if isinstance(param, Params4bit) else param.detach().view(torch.uint8)

    got_params, want_params = dict(got.named_parameters()), dict(want.named_parameters())
    assert got_params.keys() == want_params.keys(), set(got_params) ^ set(want_params)
    for name, value in got_params.items():
        ref = want_params[name]
        assert value.dtype == ref.dtype and value.requires_grad == ref.requires_grad, name
        assert torch.equal(raw(value), raw(ref)), name


def run_in_own_group(
    cmd: list[str],
    *,
    cwd=None,
    env: dict,
    timeout_s: float,
    merge_stderr: bool = True,
    signal_when: Callable[[int], bool] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``cmd`` in a process group of its own (stderr into stdout unless ``merge_stderr`` is False), so a timeout
    kills every process it started (torchrun's workers included) and fails the test with the end of its output.
    ``signal_when(pid)`` (``pid``: the command's process, leader of its group) is polled from a thread while it runs,
    until it returns True: a test's hook to signal the run at a point of its progress."""
    stderr = subprocess.STDOUT if merge_stderr else subprocess.PIPE
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True, start_new_session=True
    )
    if signal_when is not None:

        def poll() -> None:
            while proc.poll() is None and not signal_when(proc.pid):
                time.sleep(0.05)

        threading.Thread(target=poll, daemon=True).start()
    try:
        output, errors = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, errors = proc.communicate()
        pytest.fail(f"run timed out after {timeout_s}s:\n{output[-4000:]}\n{(errors or '')[:4000]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, output, errors or "")


def free_port() -> int:
    """A TCP port free on this host now (for a launcher's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_worker(worker: Path, nproc: int, *args: str, device: str, timeout: int) -> dict:
    """Run ``worker`` under torchrun on ``nproc`` processes (``device`` in FSDP4BIT_TEST_DEVICE); return rank 0's
    ``REPORT`` json, fail with the output on error."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{free_port()}",
        str(worker),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FSDP4BIT_TEST_DEVICE": device, "PYTHONFAULTHANDLER": "1"}
    proc = run_in_own_group(cmd, env=env, timeout_s=timeout, merge_stderr=False)
    # the ranks' own errors (and PYTHONFAULTHANDLER's stacks) come first in stderr, torchrun's summary last
    output = f"stdout (end):\n{proc.stdout[-2000:]}\nstderr (start):\n{proc.stderr[:5000]}"
    assert proc.returncode == 0, output
    reports = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert reports, output
    return json.loads(reports[-1].removeprefix("REPORT "))


def repo_env(repo: Path) -> dict[str, str]:
    """This environment for a child process that imports the checkout at ``repo`` (first on PYTHONPATH), with
    Python's fault handler on so a crash prints its stack."""
    return {
        **os.environ,
        "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "PYTHONFAULTHANDLER": "1",
    }


def fail_renames(
    monkeypatch: pytest.MonkeyPatch, prefixes: tuple[str, ...], error: BaseException, onto: str | None = None
) -> Callable[[], None]:
    """Make ``os.rename`` of a path whose name starts with one of ``prefixes`` (onto a path named ``onto``, if given)
    raise ``error``, as a kill or a refused rename would; other renames run. Returns the undo."""
    rename = os.rename

    def failing(src, dst) -> None:
        named = os.path.basename(os.fspath(src)).startswith(prefixes)
        if named and (onto is None or os.path.basename(os.fspath(dst)) == onto):
            raise error
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing)
    return lambda: monkeypatch.setattr(os, "rename", rename)


def write_jsonl(path: Path, *examples: object) -> str:
    """A JSON Lines data file at ``path``: each example a JSON object (dumped) or a raw line (str); returns the path."""
    path.write_text("".join((e if isinstance(e, str) else json.dumps(e)) + "\n" for e in examples))
    return str(path)


def metrics_records(out_dir: Path, event: str) -> list[dict]:
    """The trainer's ``metrics.jsonl`` records of ``event`` in the run folder ``out_dir``."""
    from fsdp4bit.train.metrics import read_metrics

    return [r for r in read_metrics(out_dir / "metrics.jsonl") if r["event"] == event]
