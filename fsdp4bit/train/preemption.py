"""Stop signals (a scheduler's preemption notice, ``kill``): the training loop saves a checkpoint after the step in
flight and exits, where the default action would kill the run and lose every step since its last checkpoint."""

from __future__ import annotations

import signal
import threading
import warnings
from types import FrameType, TracebackType

import torch
import torch.distributed as dist

# The signals a run may take as "checkpoint, then stop". SIGINT is accepted for those who want Ctrl-C to save too;
# by default it stops at once (KeyboardInterrupt), as an interactive user expects.
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGINT")


def check_signal_names(names: object, what: str) -> list[str]:
    """``names`` as a list of :data:`STOP_SIGNALS` names (TypeError for a non-list, ValueError naming ``what`` and
    the accepted names for another entry)."""
    if not isinstance(names, (list, tuple)):
        raise TypeError(f"{what} must be a list of signal names, got {type(names).__name__} {names!r}")
    bad = [n for n in names if n not in STOP_SIGNALS]
    if bad:
        raise ValueError(f"{what} entries must be among {list(STOP_SIGNALS)}, got {bad[0]!r}")
    return list(names)


class StopSignals:
    """While entered, each named signal only records that a stop was asked (:attr:`requested`, the first one's
    name); a repeated signal changes nothing (torchrun forwards its own SIGTERM to workers that got one already).
    The previous handlers come back on exit. Outside the main thread Python cannot take signals: it warns and
    leaves the default actions."""

    def __init__(self, names: list[str] | tuple[str, ...]) -> None:
        self.names = list(dict.fromkeys(check_signal_names(names, "names")))
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is None:
            self.requested = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if self.names and threading.current_thread() is not threading.main_thread():
            warnings.warn(
                "fsdp4bit.train: not in the main thread, so stop signals keep their default action (no checkpoint "
                "on " + ", ".join(self.names) + ")",
                stacklevel=2,
            )
            return self
        for name in self.names:
            number = signal.Signals[name]
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


class StopRequested(Exception):
    """Raised where every rank agreed to stop inside a longer collective phase (a held-out evaluation): the loop
    abandons the phase, saves the last finished step and stops on :attr:`signal_name`."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(f"{signal_name} received")
        self.signal_name = signal_name


def _reduce_with_stop_flags(values: list[torch.Tensor], requested: str | None, device: torch.device) -> list[float]:
    """``values`` (scalars) summed over ranks, followed by one count per :data:`STOP_SIGNALS` name of the ranks that
    saw it: a single all-reduce (collective)."""
    flags = torch.tensor([float(requested == name) for name in STOP_SIGNALS], device=device)
    packed = torch.cat([*(v.reshape(1).float() for v in values), flags])
    if dist.is_initialized():
        dist.all_reduce(packed)
    return packed.tolist()


def _agreed(counts: list[float]) -> str | None:
    """The stop signal any rank saw (the first of :data:`STOP_SIGNALS` where ranks saw different ones)."""
    return next((name for name, count in zip(STOP_SIGNALS, counts, strict=True) if count > 0), None)


def reduce_loss_and_stop(loss_sum: torch.Tensor, requested: str | None) -> tuple[float, str | None]:
    """(the loss summed over ranks, the stop signal agreed by every rank) in one all-reduce: a signal seen by any rank
    stops all of them after the same step (the first of :data:`STOP_SIGNALS` where ranks saw different ones)."""
    loss, *seen = _reduce_with_stop_flags([loss_sum], requested, loss_sum.device)
    return loss, _agreed(seen)


def agree_stop(requested: str | None, device: torch.device) -> str | None:
    """The stop signal any rank has seen, agreed by all (collective; ``requested`` where there is no process group)."""
    return _agreed(_reduce_with_stop_flags([], requested, device))


def exit_code(name: str) -> int:
    """The status a shell gives a process killed by signal ``name`` (128 + its number): what a scheduler or
    torchrun reads as "stopped by that signal"."""
    return 128 + int(signal.Signals[check_signal_names([name], "name")[0]])
