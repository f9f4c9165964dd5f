"""Native kernels (csrc/), built on first use and looked up per device type.

``native_for(device)`` returns the kernels for a device (an object with ``quantize_4bit``,
``dequantize_4bit`` and ``gemv_4bit``, the signatures ``fsdp4bit.ops`` calls) or None, in which case the
plain-PyTorch reference runs. None comes back for device types with no native build (e.g. ``meta``),
when ``FSDP4BIT_NO_NATIVE=1`` is set, and when the build fails; a failed build warns once per process
and device type, saying why and what to install. ``backend_name(device)`` says which path runs.

On Hopper and later GPUs the 1-token gemv kernels are programmatic dependent launches (each may start while
the kernel before it finishes, and waits for it before reading anything); ``FSDP4BIT_NO_PDL=1`` launches
them plainly (for timing one kernel on its own, or to rule it out when debugging).
"""

from __future__ import annotations

import functools
import os
import threading
import warnings

import torch

from ._build import BuildError, build_cpu, build_cuda
from ._native import OPERATOR_IMPLS, NativeOps

__all__ = ["OPERATOR_IMPLS", "NativeOps", "backend_name", "build_seconds", "native_for", "native_disabled"]

_BUILT: dict[str, NativeOps | None] = {}
_LOCK = threading.Lock()


def native_disabled() -> bool:
    """True when ``FSDP4BIT_NO_NATIVE`` is set to anything but "" or "0": the reference path is forced (the C++
    operators read it the same way, csrc/common/operators.h); "false", "no" or "off" force it too, with a warning."""
    value = os.environ.get("FSDP4BIT_NO_NATIVE", "")
    if value in ("", "0"):
        return False
    if value.strip().lower() in _OFF_WORDS:
        _warn_off_word(value)
    return True


_OFF_WORDS = ("", "0", "false", "no", "off", "n", "f")


@functools.cache
def _warn_off_word(value: str) -> None:
    """Warn once per value: FSDP4BIT_NO_NATIVE="false" reads as set, so it forces the reference path."""
    warnings.warn(
        f"fsdp4bit: FSDP4BIT_NO_NATIVE={value!r} forces the plain-PyTorch reference path (any value but '' or '0' "
        "does); unset it or set it to 0 for the native kernels",
        RuntimeWarning,
        stacklevel=4,
    )


def _short_reason(text: str, limit: int = 2000) -> str:
    """``text`` cut to about ``limit`` characters: its first line and its end, where a failed build's compiler
    errors are (ninja's command lines come first and filled the limit, for CUDA builds before any error)."""
    text = text.strip()
    if len(text) <= limit:
        return text
    first = text.splitlines()[0][:300]
    return f"{first}\n...\n{text[-(limit - len(first)) :]}"


def _build_native(device_type: str) -> NativeOps | None:
    try:
        if device_type == "cpu":
            ext, seconds = build_cpu()
        else:
            if not torch.cuda.is_available():
                return None
            ext, seconds = build_cuda()
        return NativeOps(ext, device_type, seconds)
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the reference, and say why
        reason = str(exc) if isinstance(exc, BuildError) else f"{type(exc).__name__}: {exc}"
        warnings.warn(
            f"fsdp4bit: the native {device_type.upper()} kernels could not be built, so the plain-PyTorch "
            f"reference (correct, slower) will run on {device_type}. Reason: {_short_reason(reason)}",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def native_for(device: torch.device | str) -> NativeOps | None:
    """The native kernels for ``device``'s type, building them on first use; None means: use the reference.

    Called on every op, so a built device type is one dict hit (``_BUILT`` only ever holds "cpu" and "cuda").
    """
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if native_disabled():
        return None
    ops = _BUILT.get(device_type, ...)
    if ops is ...:
        if device_type not in ("cpu", "cuda"):
            return None
        with _LOCK:
            ops = _BUILT.get(device_type, ...)
            if ops is ...:
                ops = _BUILT[device_type] = _build_native(device_type)
    return ops


def backend_name(device: torch.device | str) -> str:
    """ "native-cpu", "native-cuda" or "reference": which path the ops take for ``device``."""
    ops = native_for(device)
    return "reference" if ops is None else f"native-{ops.device_type}"


def build_seconds(device: torch.device | str) -> float | None:
    """Seconds the first ``native_for`` call for this device type spent building or loading, if it ran."""
    ops = _BUILT.get(torch.device(device).type)
    return None if ops is None or ops is ... else ops.build_seconds
