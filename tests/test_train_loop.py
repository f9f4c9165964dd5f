"""The training loop's semantics: updates skipped on a non-finite loss or gradient norm or without trained tokens,
the summary's throughput, optimizer settings on resume, what a run killed while resuming, pruning or saving its
adapter leaves, a fresh optimizer through a checkpoint, stop signals and the exit status, and the token-weighted loss
(against Hugging Face's, and over ranks and accumulation with instruction data).

The end-to-end case runs ``fsdp4bit.train.loop.run`` in a plain ``python`` subprocess (world size 1) on the tiny CPU
config, with a forward hook that turns one training step's logits into NaN.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import fail_renames, metrics_records, repo_env, run_in_own_group, write_jsonl

from fsdp4bit.train import train_checkpoint as tc
from fsdp4bit.train.config import load_config
from fsdp4bit.train.metrics import MetricsLog, read_metrics
from fsdp4bit.train.optim import build_optimizer, lr_factor
from fsdp4bit.train.preemption import StopSignals, agree_stop, exit_code, reduce_loss_and_stop

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "cpu_tiny.toml"
TIMEOUT_S = 300
NAN_STEP = 2

_NAN_RUN = """
import sys
from fsdp4bit.train import loop
from fsdp4bit.train.config import load_config

cfg = load_config(sys.argv[1], sys.argv[3:])
nan_step = int(sys.argv[2])
build_model = loop.build_model


def build(model_cfg):
    model = build_model(model_cfg)
    calls = [0]

    def hook(module, args, output):
        if module.training:
            calls[0] += 1
            if calls[0] == nan_step:
                return output * float("nan")
        return None

    model.lm_head.register_forward_hook(hook)
    return model


loop.build_model = build
loop.run(cfg)
"""


def _run_python(args: list[str]) -> subprocess.CompletedProcess:
    """``python *args`` in the repository, outside any launcher's environment."""
    env = repo_env(REPO)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return run_in_own_group([sys.executable, *args], cwd=REPO, env=env, timeout_s=TIMEOUT_S)


def _load_dcp(path: Path, tmp: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{path.name}.pt"
    dcp_to_torch_save(path, out)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 steps (1 sequence of 64 tokens each, a checkpoint after every step); step 2's logits are NaN."""
    out = tmp_path_factory.mktemp("nan_run")
    sets = {
        "output.dir": f'"{out}"',
        "train.steps": "4",
        "train.micro_batch_size": "1",
        "checkpoint.every": "1",
        "checkpoint.keep": "4",
        "train.eval_before": "false",
        "train.eval_after": "false",
        "debug.mode": '"off"',
    }
    args = [str(CONFIG), str(NAN_STEP)] + [f"{k}={v}" for k, v in sets.items()]
    proc = _run_python(["-c", _NAN_RUN, *args])
    assert proc.returncode == 0, proc.stdout[-4000:]
    (out / "stdout.txt").write_text(proc.stdout)
    return out


def test_non_finite_step_is_skipped_and_training_goes_on(nan_run: Path, tmp_path: Path) -> None:
    """A NaN loss used to reach AdamW through a NaN clipping factor: every adapter became NaN and every later loss
    (and the saved adapter) NaN. The update is skipped: adapters and optimizer state stay as they were, the
    schedule and the data go on."""
    records = metrics_records(nan_run, "train")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[1]["loss"] is None  # NaN, written as null: every line is standard JSON
    for line in (nan_run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    for r in records[2:]:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]), r
    assert [r["skipped"] for r in records] == [False, True, False, False]
    stdout = (nan_run / "stdout.txt").read_text()
    assert f"warning: step {NAN_STEP}: loss nan" in stdout and "update is skipped" in stdout
    cfg = load_config(CONFIG, ["train.steps=4"]).train
    assert [r["lr"] for r in records] == pytest.approx([cfg.lr * lr_factor(s, cfg) for s in range(4)], rel=1e-12)
    ckpts = nan_run / "checkpoints"
    assert json.loads((ckpts / "step-00000001" / tc.PROGRESS_FILE).read_text())["segments_apart"] is True
    after_1 = _load_dcp(ckpts / "step-00000001", tmp_path)
    after_2 = _load_dcp(ckpts / "step-00000002", tmp_path)
    after_3 = _load_dcp(ckpts / "step-00000003", tmp_path)
    assert after_1["adapters"].keys() == after_2["adapters"].keys()
    for name, value in after_1["adapters"].items():
        assert torch.equal(after_2["adapters"][name], value), name
        assert torch.isfinite(after_3["adapters"][name]).all(), name
    state_1, state_2 = after_1["optimizer"]["state"], after_2["optimizer"]["state"]
    for name, entry in state_1.items():
        for key, value in entry.items():
            assert torch.equal(state_2[name][key], value), (name, key)
    assert int(next(iter(after_3["optimizer"]["state"].values()))["step"]) == 2  # 2 real updates in 3 steps
    assert after_2["scheduler"]["last_epoch"] == 2
    from safetensors.torch import load_file

    for name, value in load_file(nan_run / "adapter" / "adapter_model.safetensors").items():
        assert torch.isfinite(value).all(), name
    (summary,) = [r for r in read_metrics(nan_run / "metrics.jsonl") if r["event"] == "summary"]
    assert summary["skipped_steps"] == 1


def test_summary_throughput_is_tokens_over_time(nan_run: Path) -> None:
    """The summary averaged the steps' rates (a fast step weighed as much as a slow one); it is the tokens of the
    steps after the first over their time."""
    records = metrics_records(nan_run, "train")
    tokens_per_step = 1 * 1 * 1 * 64  # micro-batch x accumulation x world x seq_len
    assert all(r["tokens_per_s"] == pytest.approx(tokens_per_step / r["step_s"], rel=1e-12) for r in records)
    steady = [r["step_s"] for r in records[1:]]
    (summary,) = [r for r in read_metrics(nan_run / "metrics.jsonl") if r["event"] == "summary"]
    assert summary["tokens_per_s"] == pytest.approx(tokens_per_step * len(steady) / sum(steady), rel=1e-12)


def test_resume_refuses_changed_weight_decay_and_betas() -> None:
    """Loading the optimizer's state restores its param groups' weight decay and betas, so a resumed run's changed
    values were ignored silently; a resume with other values is refused, naming them."""
    saved = json.loads(json.dumps(tc.resume_settings(load_config(CONFIG))))  # as progress.json holds them
    # what a resume would have done: the checkpoint's hyperparameters win over the config's
    param = torch.nn.Parameter(torch.ones(3))
    old_opt, _ = build_optimizer([param], load_config(CONFIG).train)
    new_cfg = load_config(CONFIG, ["train.weight_decay=0.1", "train.betas=[0.9, 0.95]"])
    new_opt, _ = build_optimizer([param], new_cfg.train)
    new_opt.load_state_dict(old_opt.state_dict())
    assert new_opt.param_groups[0]["weight_decay"] == 0.0 and new_opt.param_groups[0]["betas"] == (0.9, 0.999)
    with pytest.raises(ValueError) as err:
        tc.check_resume_settings(saved, tc.resume_settings(new_cfg), Path("ckpt"))
    assert "train.weight_decay=0.0 -> 0.1" in str(err.value)
    assert "train.betas=[0.9, 0.999] -> [0.9, 0.95]" in str(err.value)
    # the same values (a float given as an int in TOML) resume
    same = load_config(CONFIG, ["train.weight_decay=0", "train.betas=[0.9, 0.999]"])
    tc.check_resume_settings(saved, tc.resume_settings(same), Path("ckpt"))


def test_saving_a_step_twice_keeps_the_new_checkpoint(tmp_path: Path) -> None:
    """A save over an existing step folder (one a killed run left without its progress file) retired the old folder
    to the new checkpoint's own .tmp- name: the new one was deleted and the old one put back."""
    model = torch.nn.Linear(3, 2)
    optimizer, scheduler = build_optimizer(list(model.parameters()), load_config(CONFIG).train)
    for position in (111, 222):
        tc.save_checkpoint(tmp_path, tc.Progress(5, position, 1), model, optimizer, scheduler, 2, True)
    progress = json.loads((tmp_path / "step-00000005" / tc.PROGRESS_FILE).read_text())
    assert progress["data_position"] == 222
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000005"]


def _adamw_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> None:
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    optimizer.step()
    scheduler.step()


def test_a_checkpoint_from_a_newer_version_loads(tmp_path: Path) -> None:
    """progress.json gains a field now and then (eval_pending, segments_apart): a version that does not know one
    failed with TypeError on the keyword; it reads what it knows."""
    model = torch.nn.Linear(3, 2)
    optimizer, scheduler = build_optimizer(list(model.parameters()), load_config(CONFIG).train)
    path = tc.save_checkpoint(tmp_path, tc.Progress(4, 8, 1), model, optimizer, scheduler, 2, True)
    saved = json.loads((path / tc.PROGRESS_FILE).read_text())
    (path / tc.PROGRESS_FILE).write_text(json.dumps({**saved, "a_later_field": [1, 2]}))
    progress = tc.load_checkpoint(path, model, optimizer, scheduler, {})
    assert (progress.step, progress.data_position, progress.segments_apart) == (4, 8, None)


def test_a_checkpoint_before_any_update_leaves_the_optimizer_fresh(tmp_path: Path) -> None:
    """Every step so far skipped: torch's state-dict API gave AdamW the state of a zero update (step 1), so the first
    real update after such a checkpoint (saved, or loaded on resume) was larger than a fresh optimizer's."""
    cfg = load_config(CONFIG).train

    def fresh() -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        return model, *build_optimizer(list(model.parameters()), cfg)

    want, opt_w, sched_w = fresh()
    _adamw_step(want, opt_w, sched_w)
    saved, opt_s, sched_s = fresh()
    path = tc.save_checkpoint(tmp_path, tc.Progress(1, 2, 1), saved, opt_s, sched_s, 2, True)
    assert not opt_s.state
    assert json.loads((path / tc.PROGRESS_FILE).read_text())["optimizer_stepped"] is False
    _adamw_step(saved, opt_s, sched_s)
    loaded, opt_l, sched_l = fresh()
    tc.load_checkpoint(path, loaded, opt_l, sched_l, {})
    assert not opt_l.state
    _adamw_step(loaded, opt_l, sched_l)
    for got in (saved, loaded):
        for a, b in zip(got.parameters(), want.parameters(), strict=True):
            assert torch.equal(a, b)
    # after an update the state is kept, and saved
    path = tc.save_checkpoint(tmp_path, tc.Progress(2, 4, 1), saved, opt_s, sched_s, 2, True)
    assert json.loads((path / tc.PROGRESS_FILE).read_text())["optimizer_stepped"] is True
    tc.load_checkpoint(path, loaded, opt_l, sched_l, {})
    assert [s["step"].item() for s in opt_l.state.values()] == [1.0, 1.0]


def test_stop_signals_are_recorded_once_and_handlers_restored() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals(["SIGUSR1", "SIGUSR2"]) as stops:
        assert stops.requested is None
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stops.requested == "SIGUSR2"
        loss, agreed = reduce_loss_and_stop(torch.tensor(1.25), stops.requested)
        assert (loss, agreed) == (1.25, "SIGUSR2")
    assert signal.getsignal(signal.SIGUSR1) is before
    assert reduce_loss_and_stop(torch.tensor(2.0), None) == (2.0, None)
    assert agree_stop("SIGUSR1", torch.device("cpu")) == "SIGUSR1" and agree_stop(None, torch.device("cpu")) is None
    assert exit_code("SIGTERM") == 143
    with pytest.raises(ValueError, match=r"^names entries must be among \['SIGTERM', .*got 'SIGKILL'$"):
        StopSignals(["SIGKILL"])
    with pytest.raises(TypeError, match=r"^names must be a list of signal names, got str 'SIGTERM'$"):
        StopSignals("SIGTERM")
    with pytest.raises(ValueError, match=r"^name entries must be among"):
        exit_code("TERM")


_EVAL_STOP_RUN = """
import os, signal, sys
from fsdp4bit.train import cli, evaluate

token_nll, forwards, signalled_at = evaluate.token_nll, [0], int(sys.argv.pop(1))


def signalled_in_evaluation(model, batch):
    forwards[0] += 1
    print(f"held-out forward {forwards[0]}", flush=True)
    if forwards[0] == signalled_at and os.environ.get("RANK", "0") == "1":
        os.kill(os.getpid(), signal.SIGTERM)
    return token_nll(model, batch)


evaluate.token_nll = signalled_in_evaluation
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize(("signalled_at", "reshard"), [(1, "true"), (2, "false")])
def test_a_stop_signal_during_an_evaluation_stops_every_rank_after_it(
    tmp_path: Path, signalled_at: int, reshard: str
) -> None:
    """SIGTERM to rank 1 during step 2's held-out evaluation (2 batches per rank) was acted on only after step 3, by
    when a long evaluation and another step could have outlasted the grace period. In its first batch: the ranks
    agree after it, abandon the evaluation, save step 2 with the evaluation pending and exit 143, and the resumed
    run makes it. In its last batch: the evaluation is kept, and step 2 saved without one pending. With
    dist.reshard_after_forward off the evaluation left parameters unsharded, and the save failed (KeyError)."""
    out = tmp_path / "run"
    sets = [f'output.dir="{out}"', "train.steps=4", "train.eval_every=2", "checkpoint.every=0"]
    sets += ["train.eval_before=false", "train.eval_after=false", 'debug.mode="off"']
    sets += [f"dist.reshard_after_forward={reshard}"]
    args = ["--config", str(CONFIG), *[a for x in sets for a in ("--set", x)]]
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d"]
    torchrun += ["--rdzv_endpoint=localhost:0"]
    script = tmp_path / "signalled_in_evaluation.py"
    script.write_text(_EVAL_STOP_RUN)
    stopped = _run_python([*torchrun, str(script), str(signalled_at), *args])
    assert f"exitcode  : {128 + signal.SIGTERM}" in stopped.stdout, stopped.stdout[-4000:]
    assert "SIGTERM received: stopped after step 2/4" in stopped.stdout, stopped.stdout[-4000:]
    abandoned = signalled_at == 1
    assert stopped.stdout.count("held-out forward 2") == (0 if abandoned else 2), stopped.stdout[-4000:]
    assert [r["step"] for r in metrics_records(out, "train")] == [1, 2]
    assert [r["step"] for r in metrics_records(out, "eval")] == ([] if abandoned else [2])
    assert [(r["step"], r["signal"]) for r in metrics_records(out, "stopped")] == [(2, "SIGTERM")]
    progress = json.loads((out / "checkpoints" / "step-00000002" / tc.PROGRESS_FILE).read_text())
    assert progress["eval_pending"] is abandoned
    assert progress["chat_date"] == metrics_records(out, "start")[0]["chat_date"]  # the day chats were rendered
    resumed = _run_python([*torchrun, "-m", "fsdp4bit.train", *args])
    assert resumed.returncode == 0, resumed.stdout[-4000:]
    assert [(r["step"], r["when"]) for r in metrics_records(out, "eval")] == [(2, "step"), (4, "step")]
    assert [r["step"] for r in metrics_records(out, "train")] == [1, 2, 3, 4]


def test_debug_mode_checks_the_base_after_a_final_evaluation_without_resharding(tmp_path: Path) -> None:
    """Under dist.reshard_after_forward=false the held-out evaluation after training left the parameters gathered
    (here bf16 copies under mixed precision), and debug mode's end check read those against the shards' sums it had
    taken before: "frozen base parameters changed" on an unchanged base."""
    sets = [f'output.dir="{tmp_path / "run"}"', "train.steps=1", "checkpoint.every=0", "train.eval_before=false"]
    sets += ["dist.reshard_after_forward=false", 'train.mixed_precision="bfloat16"', 'debug.mode="on"']
    proc = _run_python(["-m", "fsdp4bit.train", "--config", str(CONFIG), *[a for x in sets for a in ("--set", x)]])
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "held-out perplexity: before n/a -> after" in proc.stdout


def test_an_evaluation_checks_between_batches_and_restores_the_mode() -> None:
    """The stop check runs between forwards (one fewer than the batches: a signal in the last one is the loop's to
    see, keeping the finished evaluation), and an evaluation it abandons leaves the model in training mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fsdp4bit.train.evaluate import perplexity
    from fsdp4bit.train.preemption import StopRequested

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
    )
    model = LlamaForCausalLM(config).train()
    ids = torch.randint(0, 97, (5, 8))
    sequences = torch.stack([ids, ids, torch.arange(8).expand(5, -1)], dim=1)
    calls: list[bool] = []
    ppl, _ = perplexity(model, sequences, 2, 0, 1, torch.device("cpu"), lambda: calls.append(model.training))
    assert calls == [False, False] and model.training and math.isfinite(ppl)  # 3 batches

    def stop() -> None:
        raise StopRequested("SIGTERM")

    with pytest.raises(StopRequested, match="SIGTERM received"):
        perplexity(model, sequences, 2, 0, 1, torch.device("cpu"), stop)
    assert model.training


def test_a_stopped_run_exits_with_the_signals_status(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the launcher (torchrun, a scheduler) reads: 128 + the signal's number, as if the signal had killed it."""
    from fsdp4bit.train import cli, loop

    monkeypatch.setattr(cli, "check_inputs", lambda cfg: None)
    monkeypatch.setattr(loop, "run", lambda cfg: {"stopped_by": "SIGUSR1", "step": 3, "checkpoint": "x"})
    assert cli.main(["--config", str(CONFIG)]) == 128 + signal.SIGUSR1
    monkeypatch.setattr(loop, "run", lambda cfg: {"ppl_after": 1.0})
    assert cli.main(["--config", str(CONFIG)]) == 0


def test_adapter_save_interrupted_between_its_renames_keeps_the_old_adapter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """save_adapter deleted the old adapter/ before renaming the new one in: a kill between left no adapter. Now the
    old one is renamed aside first: a failed rename puts it back, and after a kill the next save finishes the swap."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from fsdp4bit.checkpoint import replace_folder
    from fsdp4bit.train.lora import save_adapter

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

    model = get_peft_model(Tiny(), LoraConfig(r=2, target_modules=["proj"]))
    out = tmp_path / "adapter"

    def saved_b(folder: Path = out) -> torch.Tensor:
        (value,) = [v for k, v in load_file(folder / "adapter_model.safetensors").items() if "lora_B" in k]
        return value

    def set_b(value: float) -> None:
        with torch.no_grad():
            model.base_model.model.proj.lora_B.default.weight.fill_(value)

    set_b(1.0)
    save_adapter(model, out)
    set_b(2.0)
    undo = fail_renames(monkeypatch, (".adapter.tmp-",), OSError("killed"))
    with pytest.raises(OSError, match="killed"):
        save_adapter(model, out)
    undo()
    assert torch.equal(saved_b(), torch.ones(4, 2))
    # what a kill between the two renames leaves: the old adapter aside, the new one complete beside it
    (leftover,) = tmp_path.glob(".adapter.tmp-*")  # the failed save's, cleared by the next one
    assert torch.equal(saved_b(leftover), torch.full((4, 2), 2.0))
    os.rename(out, tmp_path / ".adapter.old")
    with pytest.raises(ValueError, match=r"^tmp must be a folder beside .*adapter' \(a rename moves it into place\)"):
        replace_folder(tmp_path / "elsewhere", out)
    set_b(3.0)
    save_adapter(model, out)
    assert torch.equal(saved_b(), torch.full((4, 2), 3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    # a link named as the adapter folder is written through (renaming the link itself left it unrecoverable)
    link = tmp_path / "latest"
    link.symlink_to(out)
    for value in (4.0, 5.0):
        set_b(value)
        save_adapter(model, link)
    assert link.is_symlink() and torch.equal(saved_b(), torch.full((4, 2), 5.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "latest"]


def _metrics_file(path: Path) -> MetricsLog:
    log = MetricsLog(path, True)
    log.reset()
    log.write("start", world_size=1)
    for step in range(1, 5):
        log.write("train", step=step, loss=1.0 / step)
    log.write("eval", when="after", step=4, ppl=2.0, loss=0.7)
    log.write("summary", when="after", steps=4)
    return log


def test_a_pending_evaluation_made_again_is_recorded_once(tmp_path: Path) -> None:
    """A resume makes the evaluation a stop skipped; killed before its next checkpoint, the next resume from the same
    one makes it again, and the record was kept twice. Other steps' evaluations are kept."""
    log = _metrics_file(tmp_path / "metrics.jsonl")
    for step in (2, 4):
        log.write("eval", when="step", step=step, ppl=3.0, loss=1.1)
    log.truncate_after(4)
    assert [r["step"] for r in read_metrics(log.path) if r["event"] == "eval"] == [2, 4]
    log.truncate_after(4, pending_eval=True)
    assert [r["step"] for r in read_metrics(log.path) if r["event"] == "eval"] == [2]


def test_metrics_truncation_skips_a_half_written_last_line(tmp_path: Path) -> None:
    """A run killed (or out of disk space) while appending a record left a partial line, and every resume failed
    with a JSONDecodeError; the partial last line is dropped. A bad line before the last is an error naming it."""
    log = _metrics_file(tmp_path / "metrics.jsonl")
    with log.path.open("a") as fh:
        fh.write('{"event": "train", "step": 5, "lo')
    assert [r.get("step") for r in read_metrics(log.path)] == [None, 1, 2, 3, 4, 4, None]
    log.truncate_after(2)
    assert [(r["event"], r.get("step")) for r in read_metrics(log.path)] == [
        ("start", None),
        ("train", 1),
        ("train", 2),
    ]
    log.write("train", step=3, loss=0.3)
    assert [r.get("step") for r in read_metrics(log.path)] == [None, 1, 2, 3]
    lines = log.path.read_text().splitlines()
    log.path.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not a JSON record"):
        read_metrics(log.path)


def test_metrics_truncation_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run killed while resuming (rewriting metrics.jsonl) left an empty or partial file: the start record, the
    perplexity before and the earlier steps were lost. The file now holds the old records or the new ones."""
    log = _metrics_file(tmp_path / "metrics.jsonl")
    before = log.path.read_text()
    real_write_text = Path.write_text

    def killed_mid_write(self: Path, data: str, *args, **kwargs) -> int:
        real_write_text(self, data[: len(data) // 3], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        log.truncate_after(2)
    monkeypatch.undo()
    assert log.path.read_text() == before
    log.truncate_after(2)
    assert [r.get("step") for r in read_metrics(log.path)] == [None, 1, 2]
    assert not (log.path.parent / f".{log.path.name}.tmp").exists()


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lora_A = torch.nn.Linear(4, 2, bias=False)
        self.base = torch.nn.Linear(4, 4)
        self.base.requires_grad_(False)


def test_pruning_killed_midway_leaves_no_incomplete_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pruning deleted an old checkpoint in place: a run killed mid-way left a folder that still counted as complete
    (progress.json and .metadata present) with shards missing. It is renamed out of the way first, and the next
    start removes the rest."""
    torch.manual_seed(0)
    model = _Tiny()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, load_config(CONFIG).train)
    root = tmp_path / "checkpoints"

    def save(step: int) -> None:
        model.lora_A.weight.grad = torch.full_like(model.lora_A.weight, float(step))
        optimizer.step()
        scheduler.step()
        tc.save_checkpoint(root, tc.Progress(step, step, 1), model, optimizer, scheduler, 2, True)

    save(1)
    save(2)
    real_rmtree = shutil.rmtree

    def killed_mid_delete(path, *args, **kwargs) -> None:
        shards = sorted(Path(path).glob("*.distcp")) if Path(path).is_dir() else []
        if not shards:
            return real_rmtree(path, *args, **kwargs)
        shards[0].unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(tc.shutil, "rmtree", killed_mid_delete)
    with pytest.raises(KeyboardInterrupt):
        save(3)
    monkeypatch.undo()
    assert [step for step, _ in tc.complete_checkpoints(root)] == [2, 3]
    tc.remove_partial(root)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000003"]
    want = model.lora_A.weight.detach().clone()
    with torch.no_grad():
        model.lora_A.weight.zero_()
    progress = tc.load_checkpoint(root / "step-00000003", model, optimizer, scheduler, {})
    assert progress.step == 3 and torch.equal(model.lora_A.weight, want)


def _train_losses(out: Path) -> list[tuple[float, float]]:
    return [(r["loss"], r["grad_norm"]) for r in metrics_records(out, "train")]


def test_token_nll_is_hugging_faces_loss_on_trained_tokens() -> None:
    """The loop's loss against the model's own: ``model(input_ids, labels=labels).loss`` with -100 on prompts is the
    mean over trained next tokens, so token_nll / trained_tokens must equal it (an off-by-one shift would not)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fsdp4bit.train.data import trained_tokens
    from fsdp4bit.train.loss import token_nll

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 97, (3, 12))
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt, then its completion
    labels[1, 3:9] = -100  # a completion's end, a prompt, the next completion
    labels[2, 1:] = -100  # nothing trained after the first token
    batch = torch.stack([ids, labels, torch.arange(12).expand(3, -1)], dim=1)
    with torch.no_grad():
        want = model(input_ids=ids, labels=labels).loss
        got = token_nll(model, batch) / trained_tokens(batch)
    assert trained_tokens(batch) == 7 + 5 + 0
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_a_step_without_trained_tokens_is_skipped(tmp_path: Path) -> None:
    """Every sequence of a step is a long prompt's: the loss was 0/1 = 0 and AdamW still moved the adapters (momentum,
    weight decay). The step is skipped with its loss written as null, like a non-finite one."""
    from fsdp4bit.train.data import RankBatches, build_datasets, trained_tokens
    from fsdp4bit.train.model import load_tokenizer

    data = write_jsonl(
        tmp_path / "long_prompt.jsonl",
        {"prompt": "Say", "completion": " hello there, and welcome."},
        {"prompt": "word " * 1200, "completion": " done."},
    )
    sets = [f'output.dir="{tmp_path / "run"}"', f'data.train_files=["{data}"]', "train.steps=7"]
    sets += ["checkpoint.every=0", "train.eval_before=false", "train.eval_after=false"]
    cfg = load_config(CONFIG, sets)
    train, _ = build_datasets(cfg.data, load_tokenizer(cfg.model))
    batches = RankBatches(train, cfg.train.micro_batch_size, 0, 1, cfg.train.seed)
    trained = [trained_tokens(batches.next()) > 0 for _ in range(7)]
    assert any(trained) and not all(trained)  # (step 7 holds the short example's completion)
    proc = _run_python(["-m", "fsdp4bit.train", "--config", str(CONFIG), *[a for x in sets for a in ("--set", x)]])
    assert proc.returncode == 0, proc.stdout[-4000:]
    records = metrics_records(tmp_path / "run", "train")
    assert [r["skipped"] for r in records] == [not t for t in trained]
    assert [r["loss"] is None for r in records] == [not t for t in trained]
    assert all(math.isfinite(r["loss"]) for r, t in zip(records, trained, strict=True) if t)
    assert "its batches hold no trained token" in proc.stdout


@pytest.mark.parametrize(
    ("family", "apart"),
    [("llama", True), ("gemma2", True), ("opt", False), ("bloom", False), ("xglm", False), ("recurrent_gemma", False)],
)
def test_keeps_packed_segments_apart_tells_models_apart(family: str, apart: bool) -> None:
    """Llama and Gemma-2 build their causal mask from the position ids; OPT and XGLM build it without them, Bloom
    does not read them, and RecurrentGemma's recurrent layers carry state across (a leak of ~1e-1 in the logits,
    XGLM's ~4e-2 at its default init), so their packed examples see each other whatever the positions say."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fsdp4bit.train.model import keeps_packed_segments_apart

    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)
    sizes.update(num_key_value_heads=2, head_dim=16, ffn_dim=128, word_embed_proj_dim=64, n_layer=4, n_head=4)
    config = AutoConfig.for_model(family, vocab_size=300)
    for key, value in sizes.items():
        if hasattr(config, key):
            setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).train()
    assert keeps_packed_segments_apart(model, torch.randint(3, 290, (32,)), torch.device("cpu")) is apart
    assert model.training  # put back as it was


def test_keeps_packed_segments_apart_on_a_model_whose_vocabulary_is_nested() -> None:
    """Gemma-3's causal LM is its image-text model, whose config keeps the vocabulary in ``text_config``: the check
    read ``config.vocab_size`` and raised AttributeError after the model had loaded; it takes training ids now."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fsdp4bit.train.model import keeps_packed_segments_apart

    text = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28)
    config = AutoConfig.for_model(
        "gemma3",
        text_config=dict(text, num_key_value_heads=2, head_dim=8),
        vision_config=dict(vision, patch_size=14),
        mm_tokens_per_image=4,
        image_token_index=299,
        boi_token_index=297,
        eoi_token_index=298,
    )
    assert not hasattr(config, "vocab_size")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert keeps_packed_segments_apart(model, torch.randint(3, 290, (32,)), torch.device("cpu"))


_PROBE_RUN = """
import sys
from fsdp4bit.train import loop
from fsdp4bit.train.config import load_config

def probe(model, tokens, device):
    if sys.argv[2] == "refuse":
        return False
    raise AssertionError("probed a model though no sequence holds a packed boundary")

loop.keeps_packed_segments_apart = probe
loop.run(load_config(sys.argv[1], sys.argv[3:]))
"""


@pytest.mark.parametrize("packing", [True, False])
def test_packed_examples_need_a_model_that_keeps_them_apart(tmp_path: Path, packing: bool) -> None:
    """A model that lets packed examples see each other is refused before training, naming data.packing; unpacked
    examples never ask (each has a sequence of its own, so there is no boundary to keep)."""
    data = _instruction_file(tmp_path / "sft.jsonl")
    sets = [f'output.dir="{tmp_path / "run"}"', f'data.train_files=["{data}"]', "data.eval_files=[]"]
    sets += ["train.steps=1", "checkpoint.every=0", "train.eval_before=false", "train.eval_after=false"]
    sets += [f"data.packing={str(packing).lower()}"]
    proc = _run_python(["-c", _PROBE_RUN, str(CONFIG), "refuse" if packing else "never", *sets])
    if packing:
        assert proc.returncode != 0
        assert (
            "ValueError: data.packing: the llama model does not keep packed examples apart (it ignores" in proc.stdout
        )
        assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before anything was logged
    else:
        assert proc.returncode == 0, proc.stdout[-4000:]
        assert len(metrics_records(tmp_path / "run", "train")) == 1


def _instruction_file(path: Path) -> str:
    """Prompt/completion examples whose prompts differ in length, so packed sequences hold different numbers of
    trained tokens."""
    prompts = [f"Question {i}: what follows the word " + "very " * (i % 9) + "?" for i in range(160)]
    return write_jsonl(
        path, *({"prompt": p, "completion": f" The answer is {i * 7 % 13}."} for i, p in enumerate(prompts))
    )


@pytest.mark.parametrize("data", ["text", "instructions"])
def test_accumulation_over_ranks_matches_one_big_batch(tmp_path: Path, data: str) -> None:
    """2 ranks x 1 sequence x 2 accumulated micro-batches take the same 4 sequences per step as 1 rank with one
    micro-batch of 4 (the data stream is the same), so the logged loss (token mean over the step), the global
    gradient norm and, through clipping to 0.5, the updates must match the big batch's. With instruction data the
    sequences hold different numbers of trained tokens: a mean of the micro-batches' means would differ."""
    sets = []
    if data == "instructions":
        sets += ["--set", f'data.train_files=["{_instruction_file(tmp_path / "sft.jsonl")}"]']
    sets += [
        "--set",
        "train.steps=3",
        "--set",
        "checkpoint.every=0",
        "--set",
        "lora.dropout=0.0",
        "--set",
        "train.max_grad_norm=0.5",
        "--set",
        "train.eval_before=false",
        "--set",
        "train.eval_after=false",
        "--set",
        'debug.mode="off"',
    ]
    torchrun = [
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=localhost:0",
    ]
    runs = {}
    for name, launcher, extra in (
        ("big", [], ["--set", "train.micro_batch_size=4"]),
        ("accum", torchrun, ["--set", "train.micro_batch_size=1", "--set", "train.grad_accum=2"]),
    ):
        out = tmp_path / name
        cmd = [
            *launcher,
            "-m",
            "fsdp4bit.train",
            "--config",
            str(CONFIG),
            "--set",
            f'output.dir="{out}"',
            *sets,
            *extra,
        ]
        proc = _run_python(cmd)
        assert proc.returncode == 0, proc.stdout[-4000:]
        runs[name] = _train_losses(out)
    assert len(runs["big"]) == 3
    for (loss, norm), (want_loss, want_norm) in zip(runs["accum"], runs["big"], strict=True):
        assert loss == pytest.approx(want_loss, rel=1e-5)
        assert norm == pytest.approx(want_norm, rel=1e-5)
        assert norm > 0.5  # clipping acted on every step


_CLIP = """
import json, sys
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from fsdp4bit.train.loop import _grad_norm

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()


def make():
    torch.manual_seed(0)
    # 7 x 5, 3 x 7 and 1 x 3 weights: shards of unequal size, one rank empty for the last
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3), torch.nn.Linear(3, 1))


ref, model = make(), make()
mesh = init_device_mesh("cpu", (world,))
for layer in model:
    fully_shard(layer, mesh=mesh)
fully_shard(model, mesh=mesh)
torch.manual_seed(1)
x = torch.randn(4 * world, 5) * 10
ref(x).pow(2).mean().backward()
model(x[4 * rank : 4 * (rank + 1)]).pow(2).mean().backward()
out = {"norm": _grad_norm(list(model.parameters()), 0.5), "ref_norm": _grad_norm(list(ref.parameters()), 0.5)}
out["diff"] = max(
    float((p.grad.full_tensor() - q.grad).abs().max() / q.grad.abs().max())
    for p, q in zip(model.parameters(), ref.parameters())
)
out["clipped_norm"] = float(torch.cat([q.grad.flatten() for q in ref.parameters()]).norm())
if rank == 0:
    print("RESULT " + json.dumps(out))
dist.destroy_process_group()
"""


def test_clipping_uses_the_global_norm_of_all_shards(tmp_path: Path) -> None:
    """Under FSDP2 on 2 ranks, the logged gradient norm is the unsharded model's, and the clipped gradients are the
    unsharded model's clipped gradients (not each shard clipped by its own norm)."""
    script = tmp_path / "clip.py"
    script.write_text(_CLIP)
    proc = _run_python(
        [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--rdzv_backend=c10d",
            "--rdzv_endpoint=localhost:0",
            str(script),
        ]
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    result = json.loads(line.removeprefix("RESULT "))
    assert result["ref_norm"] > 1  # clipping to 0.5 acts
    assert result["norm"] == pytest.approx(result["ref_norm"], rel=1e-6)
    assert result["clipped_norm"] == pytest.approx(0.5, rel=1e-4)
    assert result["diff"] < 1e-5
