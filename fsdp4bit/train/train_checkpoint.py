"""Atomic distributed checkpoints of adapters, optimizer, LR schedule and data position (torch.distributed.checkpoint).

Layout: ``<dir>/step-00000020/`` holds the DCP shards plus ``progress.json``. Every rank writes into
``<dir>/.tmp-step-00000020``; after a barrier rank 0 writes progress.json, fsyncs every file and the folder,
and renames the folder into place, so a checkpoint folder either is complete or does not exist under its
final name. A run killed mid-save leaves only a ``.tmp-*`` folder, which is ignored and removed on the next
start. Only the adapters are saved: the frozen 4-bit base is rebuilt from the model folder. The RNG needs no
saving, because every step reseeds from (seed, step, rank).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from fsdp4bit.checkpoint import fsync_dir, fsync_tree

from .distributed import barrier, reshard_all
from .lora import trainable_parameters

_NAME = re.compile(r"^step-(\d{8})$")
PROGRESS_FILE = "progress.json"


# The settings a resumed run must share with the run that wrote the checkpoint: the restored optimizer and schedule
# keep the old learning rates, weight decay and betas (loading an optimizer's state restores its param groups'
# hyperparameters, so a changed value would be ignored silently), the data position counts sequences of the old
# length in the old data, and the restored adapters were trained on that base model (its weights, 4-bit format and
# blocks) with that LoRA setup.
# The micro-batch size and gradient accumulation may change (with the world size: a run resumed on fewer ranks can
# keep its global batch), as the data position is a place in the stream of sequences.
RESUME_SETTINGS = (
    "model.path",
    "model.num_layers",
    "model.dtype",
    "model.quant_type",
    "model.blocksize",
    "model.compress_statistics",
    "model.skip_modules",
    "lora.r",
    "lora.alpha",
    "lora.dropout",
    "lora.target_modules",
    "data.train_files",
    "train.steps",
    "train.lr",
    "train.min_lr_ratio",
    "train.warmup_steps",
    "train.weight_decay",
    "train.betas",
    "train.seed",
    "data.seq_len",
    "data.packing",
    "data.chat_loss",
)


def resume_settings(cfg: Any) -> dict[str, Any]:
    """The values of :data:`RESUME_SETTINGS` in ``cfg`` (a run config), by dotted name, and ``data.held_out``: where
    the held-out text comes from (without ``data.eval_files``, the fraction decides which sequences are trained on)."""
    values = {}
    for name in RESUME_SETTINGS:
        section, field_name = name.split(".")
        values[name] = getattr(getattr(cfg, section), field_name)
    data = cfg.data
    values["data.held_out"] = "data.eval_files" if data.eval_files else f"data.eval_fraction={data.eval_fraction}"
    return values


def check_resume_settings(saved: dict[str, Any] | None, now: dict[str, Any], path: Path) -> None:
    """ValueError naming each setting that differs from the checkpoint's (a checkpoint without them is taken)."""
    changed = [
        f"{name}={saved[name]!r} -> {now[name]!r}"
        for name in now
        if saved and name in saved and saved[name] != now[name]
    ]
    if changed:
        raise ValueError(
            f"cannot resume from {path}: {', '.join(changed)} differ from the run that wrote it (the restored "
            "optimizer and schedule keep its learning rates, weight decay and betas, and its data position counts its "
            "sequences); resume with its settings, or start a new run (checkpoint.resume=false, or another output "
            "folder)"
        )


@dataclass
class Progress:
    """Where training stands: optimizer steps done, micro-batches consumed, the world size that ran them, the
    settings a resumed run must keep (:data:`RESUME_SETTINGS`; None in checkpoints written before they were kept),
    the data stream position (epoch, offset), the sequences an optimizer step took, the training sequences there
    were, whether the optimizer had made an update (:func:`save_checkpoint` fills it), whether the step's held-out
    evaluation is still to be made (a stop signal skipped it), whether packed examples were kept apart (position
    ids restarting at each, first tokens untrained) and the day chat templates rendered as today (these seven None in
    checkpoints written before they were kept)."""

    step: int
    data_position: int
    world_size: int
    settings: dict[str, Any] | None = None
    data_stream: list[int] | None = None
    step_sequences: int | None = None
    data_sequences: int | None = None
    optimizer_stepped: bool | None = None
    eval_pending: bool | None = None
    segments_apart: bool | None = None
    chat_date: str | None = None


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and (path / PROGRESS_FILE).is_file() and (path / ".metadata").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def checkpoint_root(cfg: Any) -> Path:
    """The folder holding a run's checkpoints (``output.dir/checkpoints``)."""
    return Path(cfg.output.dir) / "checkpoints"


def chat_date_of_run(cfg: Any) -> str:
    """The day the run's chat templates render as today (YYYY-MM-DD): ``data.chat_date``, else the one its newest
    checkpoint kept (a resume: the stopped run's chats), else today (this machine's local date)."""
    if cfg.data.chat_date:
        return cfg.data.chat_date
    found = complete_checkpoints(checkpoint_root(cfg)) if cfg.checkpoint.resume else []
    kept = read_progress(found[-1][1]).get("chat_date") if found else None  # None: written before it was kept
    return kept or datetime.date.today().isoformat()


def read_progress(path: Path) -> dict[str, Any]:
    """Checkpoint ``path``'s progress.json; ValueError naming the file where it cannot be read or holds no object."""
    file = path / PROGRESS_FILE
    try:
        saved = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read {file}: {type(err).__name__}: {err}") from None
    if not isinstance(saved, dict):
        raise ValueError(f"cannot read {file}: it holds a JSON {type(saved).__name__}, not an object")
    return saved


def remove_partial(root: Path) -> None:
    """Delete ``.tmp-*`` folders left by a run killed while saving (rank 0 only, before any save)."""
    if root.is_dir():
        for path in root.glob(".tmp-step-*"):
            shutil.rmtree(path, ignore_errors=True)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """What a checkpoint holds, every FSDP2 unit sharded first (:func:`~.distributed.reshard_all`: torch's optimizer
    state-dict API raised KeyError after an evaluation under ``dist.reshard_after_forward = false``)."""
    reshard_all(model)
    return {
        "adapters": {name: p.detach() for name, p in trainable_parameters(model)},
        "optimizer": get_optimizer_state_dict(model, optimizer),
        "scheduler": scheduler.state_dict(),
    }


def save_checkpoint(
    root: Path,
    progress: Progress,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    keep: int,
    is_main: bool,
) -> Path:
    """Write the checkpoint of ``progress.step`` atomically and prune to the newest ``keep`` (collective). An
    optimizer that has made no update yet (every step so far skipped) stays so: torch's state-dict API gives it
    the state of a zero update (step 1, zero moments), which would shrink its first real update's bias correction;
    that state is dropped again here, and on load (``optimizer_stepped`` false)."""
    final = root / f"step-{progress.step:08d}"
    tmp = root / f".tmp-step-{progress.step:08d}"
    stepped = bool(optimizer.state)
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    dcp.save(_state(model, optimizer, scheduler), checkpoint_id=tmp)
    if not stepped:
        optimizer.state.clear()
    barrier()
    if is_main:
        (tmp / PROGRESS_FILE).write_text(json.dumps({**progress.__dict__, "optimizer_stepped": stepped}))
        fsync_tree(tmp)
        replaced = _retire(final) if final.exists() else None
        os.rename(tmp, final)
        fsync_dir(root)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
        for _, old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(_retire(old), ignore_errors=True)
    barrier()
    return final


def _retire(path: Path) -> Path:
    """Rename the checkpoint ``path`` to a ``.tmp-`` name (no longer complete; removed at the next start) and return
    the new path: deleting it in place, a run killed mid-way would leave a folder that still looks complete (its
    progress.json and .metadata) with some of its shards gone."""
    doomed = path.with_name(f".tmp-{path.name}.old")  # not the new checkpoint's own .tmp- name
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    return doomed


def check_run_folder(cfg: Any) -> None:
    """ValueError where the run would mix with the run folder's earlier run: a new run (``checkpoint.resume=false``)
    beside its checkpoints (pruning keeps the newest steps, which may be the old run's), or a resume whose settings
    (:func:`resume_settings`) differ from the newest checkpoint's. The command line checks it before any process
    group starts (exit 2), and the run again."""
    root = checkpoint_root(cfg)
    try:
        found = complete_checkpoints(root)
    except OSError as err:
        raise ValueError(f"output.dir: cannot list its checkpoints: {err}") from None
    if found and not cfg.checkpoint.resume:
        raise ValueError(
            f"{root} holds checkpoints of an earlier run ({', '.join(p.name for _, p in found)}) and "
            "checkpoint.resume=false starts a new one: resume it (checkpoint.resume=true), or give the new run "
            "another output.dir (or remove those checkpoints)"
        )
    if found:
        check_resume_settings(read_progress(found[-1][1]).get("settings"), resume_settings(cfg), found[-1][1])


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, settings: dict[str, Any]
) -> Progress:
    """Restore adapters, optimizer and schedule in place from ``path``, after checking that the run's ``settings``
    (:func:`resume_settings`) are the checkpoint's; returns the saved progress (collective)."""
    saved = read_progress(path)
    known = {f.name for f in dataclasses.fields(Progress)}  # a newer version's fields are not this one's to read
    progress = Progress(**{key: value for key, value in saved.items() if key in known})
    check_resume_settings(progress.settings, settings, path)
    state = _state(model, optimizer, scheduler)
    dcp.load(state, checkpoint_id=path)
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    if progress.optimizer_stepped is False:
        optimizer.state.clear()
    scheduler.load_state_dict(state["scheduler"])
    return progress
