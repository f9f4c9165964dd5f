"""matmul_4bit: ``A @ W.T + bias`` with a frozen 4-bit W, differentiable in A and bias.

The backward re-dequantizes W instead of saving the float weight, so a layer's activation memory is
that of a plain linear layer (the QLoRA recipe). The work is one ``fsdp4bit::matmul_4bit`` op. Under
``torch.autocast`` it runs in the autocast dtype, as ``F.linear`` does, on every path (1 row or many).
"""

from __future__ import annotations

import torch

from . import ops
from .codebooks import NESTED_BLOCKSIZE, check_quant_type
from .functional import as_quant_state, check_out, check_packed_matches
from .quant_state import QuantState


def autocast_on(device_type: str) -> bool:
    """Whether torch.autocast is active for ``device_type`` (False for types without autocast, e.g. meta)."""
    has_autocast = device_type in ("cuda", "cpu") or torch.amp.is_autocast_available(device_type)
    return has_autocast and torch.is_autocast_enabled(device_type)


def matmul_4bit(
    A: torch.Tensor,
    B: torch.Tensor,
    quant_state: QuantState,
    out: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``A @ W.T (+ bias)`` for the packed 4-bit weight ``B`` (W or W.t() layout) described by ``quant_state``."""
    if not isinstance(A, torch.Tensor) or not A.is_floating_point():
        raise TypeError(f"A must be a floating-point tensor, got {getattr(A, 'dtype', type(A).__name__)}")
    if autocast_on(A.device.type):
        with torch.autocast(A.device.type, enabled=False):
            return matmul_4bit(A.to(torch.get_autocast_dtype(A.device.type)), B, quant_state, out, bias)
    quant_state = as_quant_state(quant_state)
    packed = check_packed_matches(B, quant_state, "B")
    shape = list(quant_state.shape)
    ops.check_rows(A)
    if len(shape) != 2:
        raise ValueError(f"matmul_4bit needs a 2-D (out_features, in_features) 4-bit weight, got shape {tuple(shape)}")
    if A.shape[-1] != shape[1]:
        raise ValueError(f"A's last dim is {A.shape[-1]} but the 4-bit weight has shape {tuple(shape)}")
    check_quant_type(quant_state.quant_type)
    if isinstance(bias, torch.Tensor) and not bias.is_floating_point():
        raise TypeError(f"bias must be a floating-point tensor, got {bias.dtype}")
    if out is not None:
        check_out(out, (*A.shape[:-1], shape[0]), A.dtype, A.device)
    absmax, nested_absmax, nested_code, offset = quant_state.absmax_tensors()
    nested_blocksize = quant_state.state2.blocksize if quant_state.nested else NESTED_BLOCKSIZE
    result = ops.matmul_4bit(
        A,
        bias,
        packed,
        absmax,
        nested_absmax,
        nested_code,
        offset,
        quant_state.blocksize,
        nested_blocksize,
        quant_state.quant_type,
        shape,
    )
    return out.copy_(result) if out is not None else result
