"""The ``fsdp4bit::`` custom operators: one entry point per 4-bit primitive, opaque to torch.compile.

Each op runs the native kernel for the tensor's device when one is built (``fsdp4bit.kernels``) and the
plain-PyTorch reference otherwise. Fake implementations give shapes and dtypes only, so
``torch.compile(fullgraph=True)`` and CUDA graphs trace through without breaks.

The module-level functions (``quantize_4bit``, ``matmul_4bit``, ...) are what the library calls. In plain
eager mode on plain tensors they run the op's implementation directly: the custom-op dispatcher costs tens
of microseconds of Python per call, which a GPU waits through whenever it is not already busy. Under
torch.compile, a dispatch mode (FakeTensor, tracing), a functorch transform, for tensor subclasses, and
whenever autograd must record the op, they call the ``torch.ops.fsdp4bit`` operator as before.

Once a device type's native extension is loaded (CPU or CUDA), ``matmul_4bit``, ``input_grad_4bit`` and
``dequantize_4bit`` run kernels the extension registers with the dispatcher in C++ for that device type
(``csrc/common/operators.h``; ``matmul_4bit``'s autograd too), so a compiled graph reaches the kernels with no Python
layer. They defer to the Python bodies below for any argument their fast path does not take, so every path raises
the same errors. There, the eager ``matmul_4bit`` and ``dequantize_4bit`` call the operator itself: through the
dispatcher to those kernels costs less host time than the Python path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.autograd import forward_ad

from . import kernels, reference
from .codebooks import (
    check_blockwise_blocksize,
    check_float_dtype,
    check_quant_type,
    check_shape,
    check_stats_counts,
    get_4bit_code,
)
from .kernels._native import _check_state, _flat_bytes, check_matmul_args, check_quantize_args

_LIB = "fsdp4bit"


# -- argument checks ------------------------------------------------------------------------------------------------
# Every path checks the same things with the same messages: exact statistics counts (check_stats_counts), then the
# native kernels' checks (check_quantize_args, check_matmul_args, _check_state in kernels/_native.py). NativeOps runs them on the
# native path; the reference and the fake implementations (meta tensors, torch.compile) run all of them, so a meta
# tensor among CPU tensors raises as it does on the native path. The counts run in the operators' bodies; the
# library's eager calls pass states that QuantState.check passed (one attribute read per call on the hot path).


def _check_dequantize(
    packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape, dtype
) -> None:
    """Every check of :func:`dequantize_4bit`'s arguments: the counts (first, as in the operator's body), then
    ``NativeOps.dequantize_4bit``'s."""
    check_stats_counts(absmax, nested_absmax, shape, blocksize, nested_blocksize)
    check_quant_type(quant_type)
    check_float_dtype(dtype, "dtype")
    numel = check_shape(shape)
    _check_state(_flat_bytes(packed), absmax, nested_absmax, nested_code, offset, numel, blocksize, nested_blocksize)


def check_rows(A: torch.Tensor) -> None:
    """A 0-dim A raises ValueError (a matmul's A ends in its input features)."""
    if A.dim() == 0:
        raise ValueError("A must have at least one dimension (its last holds the input features), got a 0-dim tensor")


def _check_counts(stats: Sequence[Any]) -> None:
    """check_stats_counts of ``stats``, an operator's arguments from absmax to shape."""
    absmax, nested_absmax, _, _, blocksize, nested_blocksize, _, shape = stats
    check_stats_counts(absmax, nested_absmax, shape, blocksize, nested_blocksize)


def _check_matmul(A: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor, *stats: Any) -> None:
    """Every check of :func:`matmul_4bit`'s (and :func:`gemv_4bit`'s) arguments: the counts (first, as in the
    operators' bodies), ``check_matmul_args`` (the native path's), then a bias on A's device (which the native extension checks
    itself); ``stats`` run from absmax to shape."""
    check_rows(A)
    _check_counts(stats)
    check_matmul_args(A, packed, bias, *stats)
    check_shape(stats[-1])
    if bias is not None and bias.device != A.device:
        raise ValueError(f"bias is on {bias.device}, A on {A.device}")


def _check_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> None:
    """What 8-bit blockwise quantization needs on every path: a positive int blocksize and the code on A's device
    (the native kernels check the same, and more: the reference takes any code table)."""
    check_blockwise_blocksize(blocksize)
    if code.device != A.device:
        raise ValueError(f"code is on {code.device}, A on {A.device}")


def _check_grad_out(grad_out: torch.Tensor, shape: Sequence[int]) -> None:
    if grad_out.dim() == 0 or len(shape) != 2 or grad_out.shape[-1] != shape[0]:
        raise ValueError(
            f"grad_out must end in N = {shape[0]} features for a weight of shape {tuple(shape)}, got shape "
            f"{tuple(grad_out.shape)}"
        )


_PLAIN = (torch.Tensor,)
# nn.Parameter adds no dispatch behaviour (no __torch_dispatch__, __torch_function__ disabled): FSDP2's
# unsharded parameters, e.g. a bias, are of this type.
_PLAIN_OR_PARAMETER = (torch.Tensor, torch.nn.Parameter)


def _eager_direct(*tensors: torch.Tensor | None, plain: tuple[type, ...] = _PLAIN) -> bool:
    """True when a call may skip the custom-op dispatcher: eager mode, plain tensors, no mode or transform."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    if torch._C._functorch.maybe_current_level() is not None:
        return False
    for t in tensors:
        if t is not None and type(t) not in plain:
            return False
    return True


def _has_operator_kernels(t: object) -> bool:
    """True when an eager call on ``t``'s device reaches the operators' C++ kernels (the device's native extension is
    loaded: it registered them) and should call the operator itself: the kernels check the arguments and route the
    call faster than the Python path does (a few us less host time per call), and defer anything they do not take
    to the Python bodies. Never while compiling (the trace records the operator as before)."""
    return (
        isinstance(t, torch.Tensor) and not torch.compiler.is_compiling() and kernels.native_for(t.device) is not None
    )


Quantized = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _quantize_4bit_impl(A: torch.Tensor, blocksize: int, quant_type: str) -> Quantized:
    native = kernels.native_for(A.device)
    if native is not None:
        return native.quantize_4bit(A.contiguous(), blocksize, quant_type)
    check_quantize_args(A, blocksize, quant_type)
    return (*reference.quantize_4bit(A, blocksize, quant_type), get_4bit_code(quant_type, A.device))


def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str) -> Quantized:
    """Flatten ``A`` and quantize it: (packed uint8 [ceil(n/2)], float32 absmax [ceil(n/blocksize)], a fresh
    copy of the 16-entry code on A's device: the QuantState's own table, written by the CUDA kernel itself
    so no copy kernel runs)."""
    if _eager_direct(A):
        return _quantize_4bit_impl(A, blocksize, quant_type)
    return _quantize_4bit_op(A, blocksize, quant_type)


@torch.library.custom_op(f"{_LIB}::quantize_4bit", mutates_args=())
def _quantize_4bit_op(A: torch.Tensor, blocksize: int, quant_type: str) -> Quantized:
    """Flatten ``A`` and quantize it: (packed uint8, float32 absmax, code copy); see :func:`quantize_4bit`."""
    return _quantize_4bit_impl(A, blocksize, quant_type)


@_quantize_4bit_op.register_fake
def _(A: torch.Tensor, blocksize: int, quant_type: str) -> Quantized:
    check_quantize_args(A, blocksize, quant_type)
    n = A.numel()
    return (
        A.new_empty((n + 1) // 2, dtype=torch.uint8),
        A.new_empty(math.ceil(n / blocksize), dtype=torch.float32),
        A.new_empty(16, dtype=torch.float32),
    )


def _blockwise_native(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    """The native kernels when they can quantize ``A`` against ``code`` (256 float32 entries, same device)."""
    if code.dtype != torch.float32 or code.numel() != 256 or code.device != A.device:
        return None
    return kernels.native_for(A.device)


def _quantize_blockwise_impl(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    native = _blockwise_native(A, code, blocksize)
    if native is not None:
        return native.quantize_blockwise(A.reshape(-1).float(), code, blocksize)
    _check_blockwise(A, code, blocksize)
    return reference.quantize_blockwise(A, code, blocksize)


def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of flat ``A`` against the sorted 256-entry ``code`` (double quant of the absmax)."""
    if _eager_direct(A, code):
        return _quantize_blockwise_impl(A, code, blocksize)
    return _quantize_blockwise_op(A, code, blocksize)


@torch.library.custom_op(f"{_LIB}::quantize_blockwise", mutates_args=())
def _quantize_blockwise_op(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of flat ``A`` against ``code`` (double quant of the absmax)."""
    return _quantize_blockwise_impl(A, code, blocksize)


@_quantize_blockwise_op.register_fake
def _(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    _check_blockwise(A, code, blocksize)
    n = A.numel()
    return A.new_empty(n, dtype=torch.uint8), A.new_empty(math.ceil(n / blocksize), dtype=torch.float32)


DoubleQuant = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _double_quant_impl(absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> DoubleQuant:
    native = _blockwise_native(absmax, code, blocksize) if absmax.dtype == torch.float32 else None
    if native is not None:  # the extension's offset has reference.absmax_mean's bits
        return native.double_quant(absmax, code, blocksize)
    _check_blockwise(absmax, code, blocksize)
    offset = reference.absmax_mean(absmax)
    return (offset, *reference.quantize_blockwise(absmax - offset, code, blocksize), code.clone())


def double_quant(absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> DoubleQuant:
    """bitsandbytes' double quantization of a float32 absmax: (offset, uint8 codes, float32 nested absmax,
    a fresh copy of ``code`` for the nested QuantState to own).

    offset = ``reference.absmax_mean(absmax)`` (0-dim float32, the same bits on every device), then 8-bit
    blockwise quantization of ``absmax - offset`` against ``code``, exactly
    ``reference.quantize_blockwise(absmax - offset, code, blocksize)``. The native path
    fuses the subtraction and quantization into one kernel (the unfused path is ~25 small ops), which also
    writes the copy of ``code``.
    """
    if _eager_direct(absmax, code):
        return _double_quant_impl(absmax, code, blocksize)
    return _double_quant_op(absmax, code, blocksize)


@torch.library.custom_op(f"{_LIB}::double_quant", mutates_args=())
def _double_quant_op(absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> DoubleQuant:
    """(offset, uint8 codes, float32 nested absmax, code copy) of a float32 absmax; see :func:`double_quant`."""
    return _double_quant_impl(absmax, code, blocksize)


@_double_quant_op.register_fake
def _(absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> DoubleQuant:
    _check_blockwise(absmax, code, blocksize)
    n = absmax.numel()
    return (
        absmax.new_empty((), dtype=torch.float32),
        absmax.new_empty(n, dtype=torch.uint8),
        absmax.new_empty(math.ceil(n / blocksize), dtype=torch.float32),
        torch.empty_like(code),
    )


def _dequantize_4bit_impl(packed, *args) -> torch.Tensor:
    return _dequantize_4bit_with(kernels.native_for(packed.device), packed, *args)


def _dequantize_4bit_with(
    native, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape, dtype
) -> torch.Tensor:
    """:func:`dequantize_4bit` on ``native`` (``kernels.native_for(packed.device)``), the reference if None."""
    args = (packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape, dtype)
    if native is not None:
        return native.dequantize_4bit(*args)
    _check_dequantize(*args)
    scale = reference.absmax_float32(absmax, nested_absmax, nested_code, offset, nested_blocksize)
    return reference.dequantize_4bit(packed, scale, blocksize, quant_type, math.prod(shape), dtype).view(shape)


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    nested_blocksize: int,
    quant_type: str,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Dequantize packed uint8 bytes to a ``shape`` tensor of ``dtype`` (absmax double-quantized when nested_absmax is given)."""
    args = (packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape, dtype)
    if _has_operator_kernels(packed):
        return _DEQUANTIZE_4BIT(*args)
    if _eager_direct(packed, absmax, nested_absmax, nested_code, offset):
        return _dequantize_4bit_impl(*args)
    return _dequantize_4bit_op(*args)


def _dequantize_4bit_body(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    nested_blocksize: int,
    quant_type: str,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Dequantize packed uint8 bytes to a ``shape`` tensor of ``dtype``; see :func:`dequantize_4bit`."""
    check_stats_counts(absmax, nested_absmax, shape, blocksize, nested_blocksize)
    return _dequantize_4bit_impl(
        packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape, dtype
    )


_dequantize_4bit_op = torch.library.custom_op(f"{_LIB}::dequantize_4bit", mutates_args=())(_dequantize_4bit_body)
_DEQUANTIZE_4BIT = _dequantize_4bit_op._opoverload


@_dequantize_4bit_op.register_fake
def _(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape, dtype):
    _check_dequantize(
        packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape, dtype
    )
    return packed.new_empty(shape, dtype=dtype)


def _gemv_4bit_impl(A, *args) -> torch.Tensor:
    return _gemv_4bit_with(kernels.native_for(A.device), A, *args)


def _gemv_4bit_with(native, A, packed, *stats, bias=None) -> torch.Tensor:
    """:func:`gemv_4bit` (plus ``bias``, of A's dtype) on ``native`` (``kernels.native_for(A.device)``), the
    reference if None; ``stats`` are gemv_4bit's arguments from absmax to shape."""
    if native is not None:
        check_rows(A)  # before NativeOps indexes A's last dimension
        return native.gemv_4bit(A, packed, *stats, bias)
    _check_matmul(A, bias, packed, *stats)
    absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape = stats
    scale = reference.absmax_float32(absmax, nested_absmax, nested_code, offset, nested_blocksize)
    weight = reference.dequantize_4bit(packed, scale, blocksize, quant_type, math.prod(shape), A.dtype)
    return torch.nn.functional.linear(A, weight.view(shape), bias)


def gemv_4bit(
    A: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    nested_blocksize: int,
    quant_type: str,
    shape: Sequence[int],
) -> torch.Tensor:
    """``A @ W.T`` for a 4-bit weight W of ``shape`` (N, K) and few rows of A; output in A's dtype."""
    args = (A, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape)
    if _eager_direct(A, packed, absmax, nested_absmax, nested_code, offset):
        return _gemv_4bit_impl(*args)
    return _gemv_4bit_op(*args)


@torch.library.custom_op(f"{_LIB}::gemv_4bit", mutates_args=())
def _gemv_4bit_op(
    A: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    nested_blocksize: int,
    quant_type: str,
    shape: Sequence[int],
) -> torch.Tensor:
    """``A @ W.T`` for a 4-bit weight W of ``shape`` (N, K); see :func:`gemv_4bit`."""
    check_stats_counts(absmax, nested_absmax, shape, blocksize, nested_blocksize)
    return _gemv_4bit_impl(
        A, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape
    )


@_gemv_4bit_op.register_fake
def _(A, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape):
    _check_matmul(
        A, None, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape
    )
    return A.new_empty((*A.shape[:-1], shape[0]))


def _matmul_4bit_impl(*args) -> torch.Tensor:
    return _matmul_4bit_run(*args)[0]


def _matmul_4bit_run(
    A, bias, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape
) -> tuple[torch.Tensor, kernels.NativeOps | None]:
    """(:func:`matmul_4bit`'s output, the native kernels that ran it and so checked the state, or None). The native
    kernels route every row count themselves (:meth:`~fsdp4bit.kernels.NativeOps.gemv_4bit`); the reference
    dequantizes and calls F.linear."""
    stats = (absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape)
    if bias is not None and bias.dtype != A.dtype:
        bias = bias.to(A.dtype)
    native = kernels.native_for(A.device)
    return _gemv_4bit_with(native, A, packed, *stats, bias=bias), native


def _needs_grad(A: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (A.requires_grad or (bias is not None and bias.requires_grad))


def has_tangent(*tensors: torch.Tensor | None) -> bool:
    """True when forward-mode AD is on and one of ``tensors`` carries a tangent: the kernels and the autograd node
    have no forward derivative (the kernels would drop the tangent)."""
    if forward_ad._current_level < 0:
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def needs_decomposition(*tensors: torch.Tensor | None) -> bool:
    """True where matmul_4bit's own autograd cannot serve the call: an input with a forward-mode tangent, or a
    torch.func transform (grad, vmap, jacrev, hessian...), which C++ autograd nodes do not run under."""
    # _are_functorch_transforms_active, not peek_interpreter_stack: dynamo folds it to a constant while it traces a
    # transform (torch.compile(torch.func.grad(f))), where the operator would meet GradTrackingTensors
    if torch._C._are_functorch_transforms_active():
        return True
    return has_tangent(*tensors)


def _matmul_4bit_decomposed(
    A: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor, *stats: Any
) -> torch.Tensor:
    """:func:`matmul_4bit` as W dequantized in A's dtype and F.linear, ops that forward-mode AD and torch.func
    transforms differentiate and batch; ``stats`` run from absmax to shape."""
    _check_matmul(A, bias, packed, *stats)
    W = dequantize_4bit(packed, *stats, A.dtype)
    return torch.nn.functional.linear(A, W, None if bias is None else bias.to(A.dtype))


def matmul_4bit(
    A: torch.Tensor,
    bias: torch.Tensor | None,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    nested_blocksize: int,
    quant_type: str,
    shape: Sequence[int],
) -> torch.Tensor:
    """``A @ W.T + bias`` in A's dtype: gemv for a few rows, the fused 4-bit GEMM where it is faster (CUDA sm_90a,
    9 to 1536 rows, large weights), else dequantize + one matmul.

    One opaque op (with its own autograd) so eager and compiled runs round identically. Where the device's native
    extension is loaded, an eager call goes straight to the operator, whose C++ kernels (the autograd node when a
    gradient is needed) check and route it; on the reference path an eager call runs the implementation without the
    dispatcher, through ``_Matmul4bitFunction`` when a gradient is needed.
    """
    args = (A, bias, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape)
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if needs_decomposition(A, bias):
        return _matmul_4bit_decomposed(*args)
    if _has_operator_kernels(A):
        return _MATMUL_4BIT(*args)
    if _eager_direct(A, bias, packed, absmax, nested_absmax, nested_code, offset, plain=_PLAIN_OR_PARAMETER):
        if not _needs_grad(A, bias):
            return _matmul_4bit_impl(*args)
        return _Matmul4bitFunction.apply(*args)
    return _matmul_4bit_op(*args)


def _matmul_4bit_body(
    A: torch.Tensor,
    bias: torch.Tensor | None,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    nested_blocksize: int,
    quant_type: str,
    shape: Sequence[int],
) -> torch.Tensor:
    """``A @ W.T + bias`` in A's dtype; see :func:`matmul_4bit`."""
    check_stats_counts(absmax, nested_absmax, shape, blocksize, nested_blocksize)
    return _matmul_4bit_impl(
        A, bias, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape
    )


_matmul_4bit_op = torch.library.custom_op(f"{_LIB}::matmul_4bit", mutates_args=())(_matmul_4bit_body)
_MATMUL_4BIT = _matmul_4bit_op._opoverload


@_matmul_4bit_op.register_fake
def _(A, bias, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape):
    _check_matmul(
        A, bias, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape
    )
    return A.new_empty((*A.shape[:-1], shape[0]))


def _matmul_setup_context(ctx, inputs, output, on_ctx: bool = False):
    """What the backward needs. W only for A's gradient (a bias-only gradient needs grad_out alone); the eager
    Function keeps it as a plain attribute (``on_ctx``), as bitsandbytes does: a frozen weight needs no saved-tensor
    version check, hooks such as ``save_on_cpu`` should not copy it, and a weight quantized under
    ``torch.inference_mode()`` (inference tensors, which ``save_for_backward`` refuses) still trains adapters."""
    A, bias, packed, absmax, nested_absmax, nested_code, offset, *meta = inputs
    ctx.meta = meta
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.native = None
    weight = (packed, absmax, nested_absmax, nested_code, offset) if ctx.needs_input_grad[0] else (None,) * 5
    if on_ctx:
        ctx.weight = weight
    else:
        ctx.save_for_backward(*weight)


def _backward_weight(ctx, grad_out, packed, absmax, nested_absmax, nested_code, offset) -> torch.Tensor:
    """W in grad_out's dtype. When the forward ran on native kernels (which checked this very state) and the
    same kernels serve now, in eager mode, their extension call runs directly; else :func:`dequantize_4bit`."""
    native = ctx.native
    if (
        native is not None
        and _eager_direct(grad_out, packed, absmax, nested_absmax, nested_code, offset)
        and kernels.native_for(packed.device) is native
    ):
        return native.dequantize_4bit(
            packed, absmax, nested_absmax, nested_code, offset, *ctx.meta, grad_out.dtype, state_checked=True
        )
    return dequantize_4bit(packed, absmax, nested_absmax, nested_code, offset, *ctx.meta, grad_out.dtype)


def _input_grad(ctx, grad_out, packed, absmax, nested_absmax, nested_code, offset) -> torch.Tensor:
    """``grad_out @ W``: in eager mode on the native kernels that ran the forward, the extension's route (on CUDA the
    transposed fused GEMM where it applies), else ``grad_out`` times the dequantized W; traced (torch.compile), the
    input_grad_4bit operator."""
    stats = (absmax, nested_absmax, nested_code, offset, *ctx.meta)
    if torch.is_grad_enabled():  # backward(create_graph=True): grad_A must stay differentiable in grad_out
        return grad_out @ _backward_weight(ctx, grad_out, packed, absmax, nested_absmax, nested_code, offset)
    native = ctx.native
    direct = _eager_direct(grad_out, packed, absmax, nested_absmax, nested_code, offset)
    if native is None and not direct:
        return _input_grad_4bit_op(grad_out, packed, *stats)
    if native is not None and direct and kernels.native_for(packed.device) is native:
        return native.input_grad_4bit(grad_out, packed, *stats)
    return grad_out @ _backward_weight(ctx, grad_out, packed, absmax, nested_absmax, nested_code, offset)


# matmul_4bit's input gradient under tracing (torch.compile): the transposed fused GEMM where it applies, else
# grad_out @ the dequantized W. Defined from its schema (the arguments of gemv_4bit, grad_out first).
torch.library.define(
    f"{_LIB}::input_grad_4bit",
    "(Tensor grad_out, Tensor packed, Tensor absmax, Tensor? nested_absmax, Tensor? nested_code, Tensor? offset, "
    "int blocksize, int nested_blocksize, str quant_type, int[] shape) -> Tensor",
)


def _input_grad_4bit_body(grad_out: torch.Tensor, packed: torch.Tensor, *stats: Any) -> torch.Tensor:
    """``grad_out @ W``; see the input_grad_4bit operator."""
    _check_grad_out(grad_out, stats[-1])
    _check_dequantize(packed, *stats, grad_out.dtype)
    native = kernels.native_for(grad_out.device)
    if native is not None:
        return native.input_grad_4bit(grad_out, packed, *stats)
    return grad_out @ _dequantize_4bit_impl(packed, *stats, grad_out.dtype)


torch.library.impl(f"{_LIB}::input_grad_4bit", "default", func=_input_grad_4bit_body)


@torch.library.register_fake(f"{_LIB}::input_grad_4bit")
def _(grad_out: torch.Tensor, packed: torch.Tensor, *stats: Any) -> torch.Tensor:
    _check_grad_out(grad_out, stats[-1])
    _check_dequantize(packed, *stats, grad_out.dtype)
    return grad_out.new_empty((*grad_out.shape[:-1], stats[-1][1]))


_input_grad_4bit_op = getattr(torch.ops, _LIB).input_grad_4bit


def _matmul_backward(ctx, grad_out):
    weight = getattr(ctx, "weight", None)
    packed, absmax, nested_absmax, nested_code, offset = ctx.saved_tensors if weight is None else weight
    grad_A = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_A = _input_grad(ctx, grad_out, packed, absmax, nested_absmax, nested_code, offset)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[1]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_A, grad_bias, None, None, None, None, None, None, None, None, None


_matmul_4bit_op.register_autograd(_matmul_backward, setup_context=_matmul_setup_context)


class _Matmul4bitFunction(torch.autograd.Function):
    """Eager autograd of matmul_4bit: the operator's own forward, context and backward, as a plain
    autograd.Function (the custom op's autograd wrapper costs a few hundred microseconds of host time)."""

    @staticmethod
    def forward(ctx, *inputs):
        out, native = _matmul_4bit_run(*inputs)
        _matmul_setup_context(ctx, inputs, out, on_ctx=True)
        ctx.native = native
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _matmul_backward(ctx, grad_out)


# Each native extension registers these operators' kernels for its device type with the dispatcher in C++
# (csrc/common/operators.h: no Python between a compiled graph and the kernels); they defer to these bodies for
# arguments their fast path does not take, and under FSDP4BIT_NO_NATIVE.
kernels.OPERATOR_IMPLS.update(
    matmul_4bit=_matmul_4bit_body, input_grad_4bit=_input_grad_4bit_body, dequantize_4bit=_dequantize_4bit_body
)
