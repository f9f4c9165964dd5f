"""The ``fsdp4bit::`` custom operators: one entry point per 4-bit primitive, opaque to torch.compile.

Each op runs the native kernel for the tensor's device when one is built (``fsdp4bit.kernels``) and the
plain-PyTorch reference otherwise. Fake implementations give shapes and dtypes only, so
``torch.compile(fullgraph=True)`` and CUDA graphs trace through without breaks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import kernels, reference

_LIB = "fsdp4bit"
# Row counts up to this take the gemv kernel.
GEMV_MAX_ROWS = 16


@torch.library.custom_op(f"{_LIB}::quantize_4bit", mutates_args=())
def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten ``A`` and quantize it: (packed uint8 [ceil(n/2)], float32 absmax [ceil(n/blocksize)])."""
    native = kernels.native_for(A.device)
    if native is not None:
        return native.quantize_4bit(A.contiguous(), blocksize, quant_type)
    return reference.quantize_4bit(A, blocksize, quant_type)


@quantize_4bit.register_fake
def _(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    n = A.numel()
    return A.new_empty((n + 1) // 2, dtype=torch.uint8), A.new_empty(math.ceil(n / blocksize), dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::quantize_blockwise", mutates_args=())
def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of flat ``A`` against ``code`` (double quant of the absmax)."""
    return reference.quantize_blockwise(A, code, blocksize)


@quantize_blockwise.register_fake
def _(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = A.numel()
    return A.new_empty(n, dtype=torch.uint8), A.new_empty(math.ceil(n / blocksize), dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::dequantize_4bit", mutates_args=())
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
    native = kernels.native_for(packed.device)
    if native is not None:
        return native.dequantize_4bit(
            packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape, dtype
        )
    scale = reference.absmax_float32(absmax, nested_absmax, nested_code, offset, nested_blocksize)
    return reference.dequantize_4bit(packed, scale, blocksize, quant_type, math.prod(shape), dtype).view(shape)


@dequantize_4bit.register_fake
def _(packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


@torch.library.custom_op(f"{_LIB}::gemv_4bit", mutates_args=())
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
    native = kernels.native_for(A.device)
    if native is not None:
        return native.gemv_4bit(
            A, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape
        )
    scale = reference.absmax_float32(absmax, nested_absmax, nested_code, offset, nested_blocksize)
    weight = reference.dequantize_4bit(packed, scale, blocksize, quant_type, math.prod(shape), A.dtype)
    return torch.nn.functional.linear(A, weight.view(shape))


@gemv_4bit.register_fake
def _(A, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape):
    return A.new_empty((*A.shape[:-1], shape[0]))


@torch.library.custom_op(f"{_LIB}::matmul_4bit", mutates_args=())
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
    """``A @ W.T + bias`` in A's dtype: gemv for a few rows, else dequantize + one matmul.

    One opaque op (with its own autograd) so eager and compiled runs round identically.
    """
    stats = (absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape)
    bias = None if bias is None else bias.to(A.dtype)
    if A.numel() // max(A.shape[-1], 1) <= GEMV_MAX_ROWS:
        out = gemv_4bit(A, packed, *stats)
        return out if bias is None else out + bias
    weight = dequantize_4bit(packed, *stats, A.dtype)
    return torch.nn.functional.linear(A, weight, bias)


@matmul_4bit.register_fake
def _(A, bias, packed, absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape):
    return A.new_empty((*A.shape[:-1], shape[0]))


def _matmul_setup_context(ctx, inputs, output):
    A, bias, packed, absmax, nested_absmax, nested_code, offset, *meta = inputs
    ctx.meta = meta
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(packed, absmax, nested_absmax, nested_code, offset)


def _matmul_backward(ctx, grad_out):
    packed, absmax, nested_absmax, nested_code, offset = ctx.saved_tensors
    grad_A = grad_bias = None
    if ctx.needs_input_grad[0]:
        weight = dequantize_4bit(packed, absmax, nested_absmax, nested_code, offset, *ctx.meta, grad_out.dtype)
        grad_A = grad_out @ weight
    if ctx.bias_dtype is not None and ctx.needs_input_grad[1]:
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_A, grad_bias, None, None, None, None, None, None, None, None, None


matmul_4bit.register_autograd(_matmul_backward, setup_context=_matmul_setup_context)
