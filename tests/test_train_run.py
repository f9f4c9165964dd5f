"""End-to-end runs of ``python -m fsdp4bit.train`` on the real embedded model (first 4 blocks, CPU).

Under torchrun with 2 processes: loss finite and decreasing, adapter saved in peft's format and loadable by
``PeftModel.from_pretrained``, metrics, held-out evaluations every 4 steps and plot written; a run killed after step
6 resumes from its step-4 checkpoint (ignoring a half-written one) and reproduces the uninterrupted run's losses;
stop signals (through ``launch/train.sh`` to the whole group, to one rank only, to a single process) save the step in
flight and exit with the signal's status, and the resumed run reproduces the losses; and plain ``python`` (debug
mode, world size 1) runs with its extra checks.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import metrics_records, repo_env, run_in_own_group

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "cpu_tiny.toml"
TIMEOUT_S = 300


def _run(
    args: list[str], out_dir: Path, *, torchrun: bool, extra: list[str] = (), signal_when=None
) -> subprocess.CompletedProcess:
    cmd = [sys.executable]
    if torchrun:
        cmd += [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--rdzv_backend=c10d",
            "--rdzv_endpoint=localhost:0",
        ]
    cmd += ["-m", "fsdp4bit.train", "--config", str(CONFIG), "--set", f'output.dir="{out_dir}"', *extra, *args]
    return run_in_own_group(cmd, cwd=REPO, env=repo_env(REPO), timeout_s=TIMEOUT_S, signal_when=signal_when)


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted 8-step run under torchrun with 2 processes, held-out perplexity every 4 steps."""
    out = tmp_path_factory.mktemp("straight")
    proc = _run(["--set", "train.eval_every=4"], out, torchrun=True)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "held-out perplexity: before" in proc.stdout
    return out


def test_loss_finite_and_decreasing(straight: Path) -> None:
    losses = [r["loss"] for r in metrics_records(straight, "train")]
    assert len(losses) == 8
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-2:]) < sum(losses[:2]), losses


def test_metrics_and_plot_written(straight: Path) -> None:
    (summary,) = metrics_records(straight, "summary")
    assert summary["world_size"] == 2 and len(summary["peak_mem_mb_per_rank"]) == 2
    assert len(summary["load_peak_mem_mb_per_rank"]) == 2 and min(summary["load_peak_mem_mb_per_rank"]) > 0
    assert summary["ppl_after"] < summary["ppl_before"]
    # every 4 steps: step 4 (step 8's is the "after" one)
    assert [(r["when"], r["step"]) for r in metrics_records(straight, "eval")] == [
        ("before", 0),
        ("step", 4),
        ("after", 8),
    ]
    assert all(r["tokens_per_s"] > 0 for r in metrics_records(straight, "train"))
    assert (straight / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_adapter_loads_with_peft(straight: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from fsdp4bit.train.config import load_config
    from fsdp4bit.train.model import resolve_model_path

    adapter = straight / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    saved = load_file(adapter / "adapter_model.safetensors")
    assert len(saved) == 4 * 7 * 2  # 4 blocks x 7 projections x (lora_A, lora_B)
    base_path = resolve_model_path(load_config(CONFIG).model)
    base = AutoModelForCausalLM.from_pretrained(base_path, num_hidden_layers=4, dtype=torch.float32)
    ids = torch.arange(100, 164).view(1, 64)
    with torch.no_grad():
        base_logits = base(ids).logits
    model = PeftModel.from_pretrained(base, adapter)
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved)
    for key, value in saved.items():
        match = [v for k, v in loaded.items() if k.replace(".default", "") == key]
        assert len(match) == 1 and torch.equal(match[0], value), key
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base_logits)


def test_resume_after_kill_matches(straight: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    killed = _run(["--set", "train.eval_every=3"], out, torchrun=True, extra=["--set", "debug.kill_after_step=6"])
    assert killed.returncode != 0
    assert [r["step"] for r in metrics_records(out, "train")] == [1, 2, 3, 4, 5, 6]
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000004"]
    # What a kill in the middle of a later save would leave: both must be ignored on resume.
    (ckpts / ".tmp-step-00000008").mkdir()
    (ckpts / ".tmp-step-00000008" / "__0_0.distcp").write_bytes(b"partial")
    (ckpts / "step-00000099").mkdir()
    config = (out / "config.toml").read_text()
    # another schedule or base model: refused before anything is built or written
    changed = _run(["--set", "train.lr=1e-4", "--set", "model.quant_type=fp4"], out, torchrun=False)
    assert changed.returncode != 0 and "train.lr=" in changed.stdout and "differ from the run" in changed.stdout
    assert "model.quant_type='nf4' -> 'fp4'" in changed.stdout
    fresh = _run(["--set", "checkpoint.resume=false"], out, torchrun=False)  # a new run beside the old checkpoints
    assert fresh.returncode != 0 and "holds checkpoints of an earlier run" in fresh.stdout
    assert [r["step"] for r in metrics_records(out, "train")] == [1, 2, 3, 4, 5, 6]
    assert (out / "config.toml").read_text() == config
    resumed = _run(["--set", "train.eval_every=3"], out, torchrun=True)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert "resumed from" in resumed.stdout and "step 4" in resumed.stdout
    # the killed run's evaluation at step 6 (after its step-4 checkpoint) was dropped and made again
    assert [r["step"] for r in metrics_records(out, "eval") if r["when"] == "step"] == [3, 6]
    assert not (ckpts / ".tmp-step-00000008").exists()
    _assert_same_losses(out, straight)
    ppl = {r["when"]: r["ppl"] for r in metrics_records(out, "eval")}
    want_ppl = {r["when"]: r["ppl"] for r in metrics_records(straight, "eval")}
    assert ppl["after"] == pytest.approx(want_ppl["after"], rel=1e-4)


def _assert_same_losses(out: Path, straight: Path) -> None:
    """The run in ``out`` logged the uninterrupted run's 8 losses (to float32 noise: the resumed half recomputes)."""
    want = {r["step"]: r["loss"] for r in metrics_records(straight, "train")}
    got = {r["step"]: r["loss"] for r in metrics_records(out, "train")}
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-5), (step, got[step], want[step])


# checkpoints only at the end, and SIGUSR1 taken as a stop signal too (SLURM's --signal)
_STOP_ARGS = ["--set", "checkpoint.every=0", "--set", 'checkpoint.save_on_signals=["SIGTERM", "SIGUSR1"]']


def _trained_steps(out_dir: Path) -> int:
    """Steps the run in ``out_dir`` has logged so far (0 before its metrics file exists)."""
    try:
        return len(metrics_records(out_dir, "train"))
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def _worker_pid(launcher: int, local_rank: int) -> int | None:
    """The pid of torchrun ``launcher``'s worker of ``local_rank`` (from /proc), None before it has started."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == launcher and f"LOCAL_RANK={local_rank}".encode() in env:
            return int(entry.name)
    return None


def _signal_after(out_dir: Path, steps: int, signum: int, local_rank: int | None = None):
    """A ``signal_when`` hook: once the run in ``out_dir`` has logged ``steps`` steps, ``signum`` to its whole process
    group (as a scheduler signals a job), or to one torchrun worker only."""

    def send(pid: int) -> bool:
        if _trained_steps(out_dir) < steps:
            return False
        target = pid if local_rank is None else _worker_pid(pid, local_rank)
        if target is None:
            return False
        try:
            (os.killpg if local_rank is None else os.kill)(target, signum)
        except ProcessLookupError:  # the run ended first: the test's assertions say so
            pass
        return True

    return send


def _assert_stopped(proc: subprocess.CompletedProcess, out: Path, signal_name: str, steps: int = 8) -> int:
    """The run in ``out`` stopped on ``signal_name`` after a step it logged and saved; returns that step."""
    (record,) = metrics_records(out, "stopped")
    step = record["step"]
    assert record["signal"] == signal_name and 1 <= step < steps, record
    assert f"{signal_name} received: stopped after step {step}/{steps}" in proc.stdout, proc.stdout[-4000:]
    assert [r["step"] for r in metrics_records(out, "train")] == list(range(1, step + 1))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{step:08d}"]
    assert not (out / "adapter").exists()
    return step


def test_preemption_signal_saves_a_checkpoint_and_resumes(straight: Path, tmp_path: Path) -> None:
    """A preemption notice between periodic checkpoints, as SLURM's ``--signal=USR1`` sends it to the job's processes:
    ``launch/train.sh`` has torchrun forward SIGUSR1 (alone it would die of it and leave its workers), the ranks stop
    after the step in flight and save it; the resumed run matches the uninterrupted one."""
    out = tmp_path / "preempted"
    cmd = ["bash", "launch/train.sh", "--set", f'output.dir="{out}"', *_STOP_ARGS]
    env = {**repo_env(REPO), "NGPU": "2", "CONFIG": str(CONFIG)}
    env.pop("PET_SIGNALS_TO_HANDLE", None)
    stopped = run_in_own_group(
        cmd, cwd=REPO, env=env, timeout_s=TIMEOUT_S, signal_when=_signal_after(out, 2, signal.SIGUSR1)
    )
    assert stopped.returncode != 0  # torchrun, signalled itself, exits with 1
    step = _assert_stopped(stopped, out, "SIGUSR1")
    resumed = _run(_STOP_ARGS, out, torchrun=True)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert "resumed from" in resumed.stdout and f"(step {step})" in resumed.stdout
    assert [r["step"] for r in metrics_records(out, "stopped")] == [step]
    _assert_same_losses(out, straight)


@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="finds torchrun's workers in /proc")
def test_a_signal_to_one_rank_stops_every_rank(tmp_path: Path) -> None:
    """SIGUSR1 to worker 1 alone (torchrun not signalled): both ranks stop after the same step and save it, and
    each exits with 128 + 10, which torchrun reports."""
    out = tmp_path / "one_rank"
    args = [*_STOP_ARGS, "--set", "train.eval_before=false", "--set", "train.eval_after=false"]
    stopped = _run(args, out, torchrun=True, signal_when=_signal_after(out, 1, signal.SIGUSR1, local_rank=1))
    assert stopped.returncode != 0
    _assert_stopped(stopped, out, "SIGUSR1")
    assert f"exitcode  : {128 + signal.SIGUSR1}" in stopped.stdout, stopped.stdout[-4000:]


def test_a_stopped_single_process_run_exits_with_the_signals_status(tmp_path: Path) -> None:
    """Plain python (debug mode): SIGTERM saves the step in flight and the process exits with 143, what a shell or
    scheduler reads as "terminated by SIGTERM". The stopped step's held-out evaluation (every step here), skipped to
    save in time, is made when the run resumes: the curve has no gap."""
    out = tmp_path / "single"
    args = ["--set", "checkpoint.every=0", "--set", "train.eval_after=false", "--set", "train.eval_every=1"]
    stopped = _run(args, out, torchrun=False, signal_when=_signal_after(out, 1, signal.SIGTERM))
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stdout[-4000:]
    step = _assert_stopped(stopped, out, "SIGTERM")
    assert [r["step"] for r in metrics_records(out, "eval")] == list(range(step))  # 0: before training
    resumed = _run(args, out, torchrun=False)
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert [r["step"] for r in metrics_records(out, "eval")] == list(range(9))
    (summary,) = metrics_records(out, "summary")
    assert summary["ppl_before"] == metrics_records(out, "eval")[0]["ppl"]  # the stopped run's, kept on resume


def test_debug_mode_single_process(tmp_path: Path) -> None:
    out = tmp_path / "debug"
    proc = _run(["--set", "train.steps=3", "--set", "checkpoint.every=0"], out, torchrun=False)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "world size 1" in proc.stdout and "debug mode True" in proc.stdout
    losses = [r["loss"] for r in metrics_records(out, "train")]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
