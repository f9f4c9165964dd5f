"""Run metrics: a JSONL file (one record per line, rank 0 writes), throughput and peak memory per rank."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process in MiB: CUDA max allocated on GPU, peak resident set size (RSS) on CPU.

    The CPU figure includes the pages of the safetensors file touched while loading the model (memory-mapped).
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def current_memory_mb(device: torch.device) -> float:
    """Memory in use now, in MiB: CUDA allocated on GPU, resident set size on Linux CPU (peak RSS elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return peak_memory_mb(device)


def gather_floats(value: float) -> list[float]:
    """``value`` from every rank, in rank order (collective)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return [float(v) for v in out]


def write_atomically(path: Path, text: str) -> None:
    """``path`` holds ``text`` or what it held before, never a part (a temporary file renamed into place)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class MetricsLog:
    """Append-only JSONL metrics file; only the main rank writes. On resume, records past the resumed step go."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self.start = time.time()

    def truncate_after(self, step: int, pending_eval: bool = False) -> None:
        """Drop "train", "stopped" and periodic "eval" records with step > ``step`` (a killed run may have logged steps
        its checkpoint lacks), with ``pending_eval`` the periodic "eval" at ``step`` too (the resumed run makes it: an
        earlier resume killed before its next checkpoint made it already), the records of the end of a run, and a
        last line a killed run left half-written. The file is replaced atomically: a run killed while resuming
        leaves the old file, never an empty or partial one."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line, record in _parsed_lines(self.path):
            if record.get("event") in ("train", "stopped", "eval") and record.get("step", 0) > step:
                continue
            if (
                pending_eval
                and record.get("event") == "eval"
                and record.get("when") == "step"
                and record["step"] == step
            ):
                continue
            if record.get("event") in ("eval", "summary") and record.get("when") == "after":
                continue
            kept.append(line)
        write_atomically(self.path, "".join(k + "\n" for k in kept))

    def reset(self) -> None:
        """Start an empty file (a fresh run)."""
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")

    def write(self, event: str, **fields: Any) -> None:
        """Append one record ``{"event": event, "time": seconds since start, **fields}``; a non-finite number (the
        loss of a skipped step) is written as null, so every line is standard JSON (jq, pandas, JavaScript)."""
        if not self.enabled:
            return
        record = {"event": event, "time": round(time.time() - self.start, 3), **fields}
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record, allow_nan=False) + "\n")


def _parsed_lines(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of every record of a metrics file. A last line that is not JSON is what a run killed (or out
    of disk space) while appending leaves, and is skipped; a bad line before it is an error naming the line."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not a JSON record ({err})") from None
    return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics file (a half-written last line, left by a killed run, is skipped)."""
    return [record for _, record in _parsed_lines(path)]
