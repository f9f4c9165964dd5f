"""The training run: model, adapters, sharding, data, evaluation, the step loop, checkpoints and outputs."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from tqdm import tqdm

from . import debug as dbg
from .config import Config, to_toml
from .data import RankBatches, build_datasets, holds_boundaries, rendered_dates, stream_of, trained_tokens
from .distributed import DistInfo, from_main, setup, teardown
from .embedded import ensure_embedded_model
from .evaluate import perplexity
from .lora import AdapterInit, attach_lora, save_adapter, trainable_parameters
from .loss import global_count, token_nll
from .metrics import MetricsLog, current_memory_mb, gather_floats, peak_memory_mb, read_metrics, write_atomically
from .model import (
    build_model,
    count_4bit,
    decoder_blocks,
    dtype_of,
    keeps_packed_segments_apart,
    load_blocks,
    load_tokenizer,
    shard,
)
from .optim import build_optimizer
from .plot import plot_loss
from .preemption import StopRequested, StopSignals, agree_stop, reduce_loss_and_stop
from .train_checkpoint import (
    Progress,
    chat_date_of_run,
    check_run_folder,
    checkpoint_root,
    complete_checkpoints,
    load_checkpoint,
    remove_partial,
    resume_settings,
    save_checkpoint,
)


def _say(info: DistInfo, text: str) -> None:
    if info.is_main:
        tqdm.write(text, file=sys.stdout)
        sys.stdout.flush()


def _reseed(seed: int, step: int, rank: int) -> None:
    """Every step starts from RNG state (seed, step, rank): dropout masks are the same after a resume."""
    torch.manual_seed(seed * 1_000_003 + step * 101 + rank)


def _grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def run(cfg: Config) -> dict[str, Any]:
    """Run training as configured; returns the summary record (also written to metrics.jsonl on rank 0), or for a run
    stopped by one of ``checkpoint.save_on_signals`` {"stopped_by": signal name, "step", "checkpoint"}."""
    wall_start = time.time()
    if not cfg.model.path:
        ensure_embedded_model(cfg.model.cache_dir)  # before any collective: conversion may take a while
    info = setup(cfg)
    try:
        summary = _run(cfg, info, wall_start)
    except BaseException:
        if info.world_size == 1:  # no other rank can be waiting in a collective
            teardown()
        raise
    teardown()
    return summary


def _resume_data(
    progress: Progress,
    batches: RankBatches,
    tcfg: Any,
    info: DistInfo,
    packed: bool = False,
    dated_chats: str | None = None,
) -> None:
    """Move ``batches`` to where the checkpoint's run stopped in the data (its stream position, or for checkpoints
    written before that was kept, its micro-step count at its batch size and world size); say so where an optimizer
    step now takes another number of sequences (another world size, micro-batch size or accumulation), where
    the ``packed`` examples of a checkpoint written before they were kept apart are now trained apart, and where
    chats whose template writes the date are rendered on another day than the checkpoint's (``dated_chats``: the
    day now, None where no chat template rendered a date)."""
    saved = progress.settings or {}
    micro = saved.get("train.micro_batch_size", tcfg.micro_batch_size)
    accum = saved.get("train.grad_accum", tcfg.grad_accum)
    stream = progress.data_stream or stream_of(
        progress.data_position, len(batches.sequences), micro, progress.world_size
    )
    batches.seek(progress.data_position, (stream[0], stream[1]))
    if progress.data_sequences not in (None, len(batches.sequences)):
        _say(
            info,
            f"warning: the training data now packs into {len(batches.sequences)} sequences, the checkpoint's run had "
            f"{progress.data_sequences} (a data file changed): each epoch's order differs from the stopped run's",
        )
    if packed and progress.segments_apart is None:
        _say(
            info,
            "warning: the checkpoint's run let packed examples attend to each other and trained their first tokens "
            "(it was written before examples were kept apart); this run keeps them apart from here on",
        )
    if dated_chats is not None and progress.chat_date != dated_chats:
        _say(
            info,
            f"warning: the chat template writes today's date into prompts, now rendered as {dated_chats} "
            f"(data.chat_date); the checkpoint's run rendered {progress.chat_date or 'the day of each start'}, so "
            "the chats' tokens differ from those it trained on",
        )
    was = progress.step_sequences or micro * accum * progress.world_size
    now = tcfg.micro_batch_size * tcfg.grad_accum * info.world_size
    if was != now:
        _say(
            info,
            f"warning: an optimizer step now takes {now} sequences ({info.world_size} ranks x train.micro_batch_size "
            f"{tcfg.micro_batch_size} x train.grad_accum {tcfg.grad_accum}), the checkpoint's run took {was}: the "
            "data goes on where it stopped, with another global batch",
        )


def _run(cfg: Config, info: DistInfo, wall_start: float) -> dict[str, Any]:
    tcfg = cfg.train
    out_dir = Path(cfg.output.dir)
    ckpt_root = checkpoint_root(cfg)
    check_run_folder(cfg)  # on every rank, before anything is written or built
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(out_dir / "config.toml", to_toml(cfg))
        remove_partial(ckpt_root)
    if info.debug:
        torch.use_deterministic_algorithms(True, warn_only=True)
    _say(info, f"fsdp4bit.train: world size {info.world_size}, device {info.device}, debug mode {info.debug}")

    torch.manual_seed(tcfg.seed)
    t0 = time.time()
    model = build_model(cfg.model)
    # rank 0's day: ranks started either side of midnight render the same chats (every rank reads the checkpoint,
    # so an unreadable one fails every rank alike, not rank 0 alone with the others waiting in the broadcast)
    chat_date = from_main(chat_date_of_run(cfg))
    train_seqs, eval_seqs = build_datasets(cfg.data, load_tokenizer(cfg.model), chat_date)
    peft_model = attach_lora(model, cfg.lora, tcfg.seed)
    init_adapters = AdapterInit()
    if cfg.model.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mp_dtype = dtype_of(tcfg.mixed_precision) if tcfg.mixed_precision else None

    blocks = {id(block) for _, block in decoder_blocks(model)}

    def finish(module: torch.nn.Module) -> None:
        """A unit just loaded (a block, an untied embedding, the root): adapters get their initial values, a block
        is compiled if asked, then FSDP2 shards it."""
        init_adapters(module)
        if cfg.model.compile and id(module) in blocks:
            module.compile()
        shard(
            module,
            mesh=info.mesh,
            mp_dtype=mp_dtype,
            reshard_after_forward=cfg.dist.reshard_after_forward,
            cpu_offload=cfg.dist.cpu_offload,
        )

    load_blocks(model, cfg.model, info.device, finish)
    load_peak = gather_floats(peak_memory_mb(info.device))
    n4, nfloat = count_4bit(model)
    if info.debug:
        dbg.check_quantized(model, cfg.model)
    params = [p for _, p in trainable_parameters(peft_model)]
    n_trainable = sum(p.numel() for p in params)
    _say(
        info,
        f"model ready in {time.time() - t0:.1f}s: {n4} Linear4bit ({cfg.model.quant_type}, blocksize "
        f"{cfg.model.blocksize}), {nfloat} float Linear, {n_trainable:,} trainable adapter parameters; "
        f"{len(train_seqs)} train / {len(eval_seqs)} held-out sequences of {cfg.data.seq_len} tokens; "
        f"peak memory per rank after loading (MB): {[round(p, 1) for p in load_peak]}",
    )
    packed = holds_boundaries(train_seqs)
    if (packed or holds_boundaries(eval_seqs)) and not keeps_packed_segments_apart(
        peft_model, train_seqs[0, 0], info.device
    ):
        raise ValueError(
            f"data.packing: the {model.config.model_type} model does not keep packed examples apart (it ignores "
            "position ids that restart at each example: its attention mask or recurrent state crosses them), so "
            "they would see each other; set data.packing = false to give each example a sequence of its own"
        )
    optimizer, scheduler = build_optimizer(params, tcfg)
    batches = RankBatches(train_seqs, tcfg.micro_batch_size, info.rank, info.world_size, tcfg.seed)
    metrics = MetricsLog(out_dir / "metrics.jsonl", info.is_main)
    fingerprint = dbg.base_fingerprint(peft_model) if info.debug else None

    start_step, eval_pending = 0, False
    found = complete_checkpoints(ckpt_root) if cfg.checkpoint.resume else []
    settings = resume_settings(cfg)
    if found:
        progress = load_checkpoint(found[-1][1], peft_model, optimizer, scheduler, settings)
        _resume_data(progress, batches, tcfg, info, packed, chat_date if rendered_dates() else None)
        start_step, eval_pending = progress.step, bool(progress.eval_pending)
        metrics.truncate_after(start_step, pending_eval=eval_pending)
        _say(info, f"resumed from {found[-1][1]} (step {start_step})")
    else:
        metrics.reset()
        metrics.write("start", world_size=info.world_size, chat_date=chat_date, config=dataclasses.asdict(cfg))

    def held_out(when: str, step: int, after_batch: Callable[[], None] | None = None) -> float:
        """Held-out perplexity now (collective), recorded in the metrics as measured ``when`` at ``step``."""
        ppl, loss = perplexity(
            peft_model, eval_seqs, cfg.data.eval_batch_size, info.rank, info.world_size, info.device, after_batch
        )
        metrics.write("eval", when=when, step=step, ppl=ppl, loss=loss)
        return ppl

    ppl_before = None
    if tcfg.eval_before and not found:
        ppl_before = held_out("before", 0)
        _say(info, f"held-out perplexity before finetuning: {ppl_before:.2f}")
    elif found and info.is_main:
        before = [r for r in read_metrics(metrics.path) if r["event"] == "eval" and r["when"] == "before"]
        ppl_before = before[0]["ppl"] if before else None
    if eval_pending:  # the stopped run skipped this step's evaluation to save in time
        _say(info, f"step {start_step}: held-out perplexity {held_out('step', start_step):.2f}")

    fsdp_root = model if isinstance(model, FSDPModule) else None
    step_sequences = tcfg.micro_batch_size * tcfg.grad_accum * info.world_size
    tokens_per_step = step_sequences * cfg.data.seq_len
    step_seconds: list[float] = []
    train_peak = 0.0
    bar = tqdm(total=tcfg.steps, initial=start_step, desc="train", disable=not info.is_main, dynamic_ncols=True)
    peft_model.train()
    with StopSignals(cfg.checkpoint.save_on_signals) as stops:

        def check_stop() -> None:
            """Between held-out batches: the ranks agree whether a stop signal came (a long evaluation would
            otherwise outlast the grace period before SIGKILL) and abandon the evaluation together."""
            agreed = agree_stop(stops.requested, info.device)
            if agreed:
                raise StopRequested(agreed)

        for step in range(start_step, tcfg.steps):
            _reseed(tcfg.seed, step, info.rank)
            t_step = time.perf_counter()
            loss_sum = torch.zeros((), device=info.device)
            micro_batches = [batches.next() for _ in range(tcfg.grad_accum)]
            # The step's loss is the mean over every trained token of all its micro-batches on all ranks (prompt
            # tokens are not trained, so counts differ between batches); FSDP averages gradients over the ranks.
            trained = global_count(sum(trained_tokens(b) for b in micro_batches), info.device)
            divisor = max(trained, 1)
            for micro, batch in enumerate(micro_batches):
                if fsdp_root is not None:
                    fsdp_root.set_requires_gradient_sync(micro == tcfg.grad_accum - 1)
                anomaly = torch.autograd.detect_anomaly() if cfg.debug.detect_anomaly else contextlib.nullcontext()
                with anomaly:
                    nll = token_nll(peft_model, batch.to(info.device))
                    (nll * (info.world_size / divisor)).backward()
                loss_sum += nll.detach() / divisor
            if info.debug:
                dbg.check_step(peft_model, loss_sum, step + 1, info.device)
            grad_norm = _grad_norm(params, tcfg.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            loss_value, stop_signal = reduce_loss_and_stop(loss_sum, stops.requested)
            # All three are global (all ranks' sums, the gradient norm over every shard), so every rank skips together.
            if not trained:
                loss_value = math.nan  # no token to learn from: a zero loss would be a false point on the curve
            skipped = not (math.isfinite(loss_value) and math.isfinite(grad_norm))
            if skipped:
                why = (
                    "its batches hold no trained token (every token of its sequences is a prompt's)"
                    if not trained
                    else f"loss {loss_value} / gradient norm {grad_norm} is not finite"
                )
                _say(
                    info,
                    f"warning: step {step + 1}: {why}; the update is skipped (adapters and optimizer state "
                    "unchanged, the schedule and data go on)",
                )
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if info.device.type == "cuda":
                torch.cuda.synchronize(info.device)
            seconds = time.perf_counter() - t_step
            tok_s = tokens_per_step / seconds
            step_seconds.append(seconds)
            mem = peak_memory_mb(info.device) if info.device.type == "cuda" else current_memory_mb(info.device)
            train_peak = max(train_peak, mem)
            metrics.write(
                "train",
                step=step + 1,
                loss=loss_value,
                lr=lr,
                grad_norm=grad_norm,
                tokens_per_s=tok_s,
                step_s=seconds,
                mem_mb_rank0=mem,
                skipped=skipped,
            )
            bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:.0f}", mem=f"{mem:.0f}MB", refresh=False)
            bar.update(1)
            if (step + 1) % tcfg.log_every == 0:
                _say(
                    info,
                    f"step {step + 1}/{tcfg.steps} loss {loss_value:.4f} lr {lr:.2e} grad_norm {grad_norm:.3f} "
                    f"{tok_s:.0f} tok/s peak mem {mem:.0f} MB" + (" (update skipped)" if skipped else ""),
                )
            done = step + 1 == tcfg.steps
            due = tcfg.eval_every and (step + 1) % tcfg.eval_every == 0 and not (done and tcfg.eval_after)
            skipped_eval = bool(due and stop_signal)  # stopping in time comes first; the resumed run evaluates
            if due and not stop_signal:
                try:
                    ppl = held_out("step", step + 1, check_stop if stops.names else None)
                except StopRequested as stop:
                    stop_signal, skipped_eval = stop.signal_name, True
                else:
                    _say(info, f"step {step + 1}: held-out perplexity {ppl:.2f}")
                    if stops.names:  # a signal during its last batch
                        stop_signal = agree_stop(stops.requested, info.device)
            if (cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0) or done or stop_signal:
                saved = save_checkpoint(
                    ckpt_root,
                    Progress(
                        step + 1,
                        batches.position,
                        info.world_size,
                        settings,
                        list(batches.stream),
                        step_sequences,
                        len(train_seqs),
                        eval_pending=skipped_eval,
                        segments_apart=True,
                        chat_date=chat_date,
                    ),
                    peft_model,
                    optimizer,
                    scheduler,
                    cfg.checkpoint.keep,
                    info.is_main,
                )
            if cfg.debug.kill_after_step and step + 1 == cfg.debug.kill_after_step:
                sys.stdout.flush()
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            if stop_signal:  # the last step too: the adapter save and evaluation may not fit before SIGKILL
                bar.close()
                if fingerprint is not None:
                    dbg.check_base_unchanged(fingerprint, peft_model)
                metrics.write("stopped", step=step + 1, signal=stop_signal, checkpoint=str(saved))
                _say(
                    info,
                    f"{stop_signal} received: stopped after step {step + 1}/{tcfg.steps} with its checkpoint {saved}; "
                    "run the same command to resume",
                )
                return {"stopped_by": stop_signal, "step": step + 1, "checkpoint": str(saved)}
    bar.close()

    save_adapter(peft_model, out_dir / "adapter")
    ppl_after = held_out("after", tcfg.steps) if tcfg.eval_after else None
    if fingerprint is not None:
        dbg.check_base_unchanged(fingerprint, peft_model)
    peak = gather_floats(peak_memory_mb(info.device))
    peak_train = gather_floats(train_peak)
    # Tokens over time of the steps after the first (compilation, first-touch allocations): a mean of the steps'
    # rates would weigh a fast step as much as a slow one and overstate the throughput.
    steady = step_seconds[1:] or step_seconds
    skipped_steps = (
        sum(1 for r in read_metrics(metrics.path) if r["event"] == "train" and r.get("skipped"))
        if info.is_main
        else None
    )
    summary = {
        "ppl_before": ppl_before,
        "ppl_after": ppl_after,
        "tokens_per_s": tokens_per_step * len(steady) / sum(steady) if steady else None,
        "skipped_steps": skipped_steps,
        "peak_mem_mb_per_rank": [round(p, 1) for p in peak],
        "load_peak_mem_mb_per_rank": [round(p, 1) for p in load_peak],
        "train_peak_mem_mb_per_rank": [round(p, 1) for p in peak_train],
        "wall_s": round(time.time() - wall_start, 1),
        "world_size": info.world_size,
        "steps": tcfg.steps,
        "resumed_from_step": start_step if found else None,
    }
    metrics.write("summary", when="after", **summary)
    if info.is_main:
        plot_loss(metrics.path, out_dir / "loss.png")
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        _say(info, f"held-out perplexity: before {fmt(ppl_before)} -> after {fmt(ppl_after)}")
        _say(
            info,
            f"throughput {fmt(summary['tokens_per_s'])} tokens/s (global); peak memory per rank (MB): "
            f"{summary['peak_mem_mb_per_rank']} (process), {summary['train_peak_mem_mb_per_rank']} (during training); "
            f"wall time {summary['wall_s']} s",
        )
        _say(info, f"outputs: {out_dir / 'adapter'} (peft adapter), {metrics.path}, {out_dir / 'loss.png'}")
    return summary
