"""Public 4-bit functional API, named and shaped as bitsandbytes.functional's 4-bit subset."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import ops, reference
from .codebooks import (
    NESTED_BLOCKSIZE,
    STORAGE_DTYPES,
    as_blocksize,
    check_blocksize,
    check_blockwise_blocksize,
    check_blockwise_code,
    check_flag,
    check_float_dtype,
    check_quant_storage,
    check_quant_type,
    get_4bit_code,
    get_dynamic_map,
    shared_dynamic_map,
)
from .quant_state import QuantState, pack_dict_to_tensor, unpack_tensor_to_dict
from .tensor_ops import plain

__all__ = [
    "QuantState",
    "quantize_4bit",
    "dequantize_4bit",
    "quantize_nf4",
    "quantize_fp4",
    "dequantize_nf4",
    "dequantize_fp4",
    "gemv_4bit",
    "quantize_blockwise",
    "dequantize_blockwise",
    "get_4bit_type",
    "packed_bytes",
    "pack_dict_to_tensor",
    "unpack_tensor_to_dict",
]


def get_4bit_type(typename: str, device: torch.device | str | None = None, blocksize: int = 64) -> torch.Tensor:
    """The 16-entry float32 code table of ``typename`` ("nf4" or "fp4")."""
    return get_4bit_code(typename, device)


def packed_bytes(packed: torch.Tensor) -> torch.Tensor:
    """Flat uint8 view of packed 4-bit data in any storage dtype (a view: bytes are never converted)."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed weight must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype not in STORAGE_DTYPES:
        raise TypeError(f"packed weight dtype must be one of {STORAGE_DTYPES}, got {packed.dtype}")
    flat = plain(packed)
    flat = flat.reshape(-1) if flat.is_contiguous() else flat.contiguous().reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def _check_input(A: object, name: str = "A", empty_ok: bool = False) -> torch.Tensor:
    """``A`` as a float16/bfloat16/float32 tensor (TypeError if not); empty only with ``empty_ok`` (a matmul's A of
    no rows: an empty product), else ValueError."""
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(A).__name__}")
    if not A.is_floating_point():
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {A.dtype}")
    check_float_dtype(A.dtype, f"{name}.dtype")
    if A.numel() == 0 and not empty_ok:
        raise ValueError(f"{name} must not be empty (shape {tuple(A.shape)})")
    return A


def check_out(out: object, shape: Sequence[int], dtype: torch.dtype, device: torch.device, name: str = "out") -> None:
    """``out`` (an ``out=`` or ``absmax=`` argument) must take a result of exactly this shape, dtype and device:
    no silent cast or broadcast (TypeError for the type or dtype, ValueError for the shape or device)."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(out).__name__}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {out.dtype}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(out.shape)}")
    if out.device != device:
        raise ValueError(f"{name} is on {out.device}, the result on {device}")


def quantize_blockwise(
    A: torch.Tensor,
    code: torch.Tensor | None = None,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int = 4096,
    nested: bool = False,
) -> tuple[torch.Tensor, QuantState]:
    """8-bit blockwise quantization against ``code`` (default: the dynamic map), bitsandbytes' signature: returns
    (uint8 codes of A's shape, QuantState). ``nested`` quantizes the absmax again, relative to its mean. The
    statistics never require grad."""
    _check_input(A)
    A = A.detach()
    check_flag(nested, "nested")
    if code is None:
        code = get_dynamic_map(A.device)
    check_blockwise_code(code)
    q, amax = ops.quantize_blockwise(A.reshape(-1), code, blocksize)
    if nested:
        offset = reference.absmax_mean(amax)
        qabsmax, state2 = quantize_blockwise(amax - offset, blocksize=blocksize)
        state = QuantState(absmax=qabsmax, code=code, blocksize=blocksize, dtype=A.dtype, offset=offset, state2=state2)
    else:
        state = QuantState(absmax=amax, code=code, blocksize=blocksize, dtype=A.dtype)
    q = q.view(A.shape)
    if out is not None:
        check_out(out, A.shape, torch.uint8, A.device)
        q = out.copy_(q)
    if absmax is not None:
        check_out(absmax, state.absmax.shape, state.absmax.dtype, A.device, "absmax")
        state.absmax = absmax.copy_(state.absmax)
    return q, state


def dequantize_blockwise(
    A: torch.Tensor,
    quant_state: QuantState | None = None,
    absmax: torch.Tensor | None = None,
    code: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int = 4096,
    nested: bool = False,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise` in ``quant_state.dtype``; without a state, from ``absmax`` (and
    ``code``, ``blocksize``) to float32, as bitsandbytes. ``nested`` is implied by the state, as there."""
    if quant_state is None:
        if absmax is None:
            raise ValueError("dequantize_blockwise needs quant_state or absmax")
        if not isinstance(absmax, torch.Tensor):
            raise TypeError(f"absmax must be a torch.Tensor or None, got {type(absmax).__name__}")
        if code is None:
            code = get_dynamic_map(absmax.device)
        quant_state = QuantState(absmax=absmax, code=code, blocksize=blocksize, dtype=torch.float32)
    if not isinstance(A, torch.Tensor) or A.dtype != torch.uint8:
        raise TypeError(f"A must be a uint8 tensor of codes, got {A.dtype if isinstance(A, torch.Tensor) else type(A)}")
    blocksize = quant_state.blocksize
    check_blockwise_blocksize(blocksize)
    check_blockwise_code(quant_state.code, "quant_state.code")
    if quant_state.code.numel() != 256:
        raise ValueError(
            f"quant_state.code must have 256 entries (an 8-bit blockwise state), got {quant_state.code.numel()}"
        )
    nblocks = -(-A.numel() // blocksize)
    if quant_state.absmax.numel() != nblocks:
        raise ValueError(
            f"quant_state.absmax has {quant_state.absmax.numel()} entries but {A.numel()} values with blocksize "
            f"{blocksize} need {nblocks}"
        )
    dtype = torch.float32 if quant_state.dtype is None else quant_state.dtype
    check_float_dtype(dtype, "quant_state.dtype")
    amax = quant_state.absmax
    if quant_state.state2 is not None:
        amax = dequantize_blockwise(amax, quant_state.state2).float() + quant_state.offset
    values = reference.dequantize_blockwise(A, amax, quant_state.code, blocksize).view(A.shape).to(dtype)
    if out is None:
        return values
    check_out(out, A.shape, dtype, A.device)
    return out.copy_(values)


def quantize_4bit(
    A: torch.Tensor,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int | None = None,
    compress_statistics: bool = False,
    quant_type: str = "fp4",
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``A`` blockwise to 4 bits: returns (packed [(ceil(n/2)/itemsize), 1] in quant_storage, QuantState).
    The statistics never require grad (``A`` is read detached, as a frozen weight's values)."""
    _check_input(A)
    A = A.detach()
    check_flag(compress_statistics, "compress_statistics")
    blocksize = as_blocksize(64 if blocksize is None else blocksize)
    check_quant_type(quant_type)
    check_quant_storage(quant_storage)
    if out is not None:
        check_out(out, (-(-((A.numel() + 1) // 2) // quant_storage.itemsize), 1), quant_storage, A.device)
    if absmax is not None:
        absmax_dtype = torch.uint8 if compress_statistics else torch.float32
        check_out(absmax, (-(-A.numel() // blocksize),), absmax_dtype, A.device, "absmax")
    packed, stats, code = ops.quantize_4bit(A, blocksize, quant_type)
    itemsize = quant_storage.itemsize
    if packed.numel() % itemsize:
        packed = torch.nn.functional.pad(packed, (0, itemsize - packed.numel() % itemsize))
    packed = packed.view(quant_storage).unsqueeze(1)
    if compress_statistics:
        # offset = the mean of stats (reference.absmax_mean: the same bits on every device), then
        # quantize_blockwise(stats - offset, dynamic map, 256): one fused op; the
        # state owns the fresh copy of the map it returns (the cached map is never handed out)
        offset, qabsmax, nested_absmax, nested_code = ops.double_quant(
            stats, shared_dynamic_map(A.device), NESTED_BLOCKSIZE
        )
        state2 = QuantState(absmax=nested_absmax, code=nested_code, blocksize=NESTED_BLOCKSIZE, dtype=stats.dtype)
        state = QuantState(qabsmax, A.shape, code, blocksize, quant_type, A.dtype, offset, state2)
    else:
        state = QuantState(stats, A.shape, code, blocksize, quant_type, A.dtype)
    if out is not None:
        out = out.copy_(packed)
    if absmax is not None:
        state.absmax = absmax.copy_(state.absmax)
    return (out if out is not None else packed), state


def quantize_nf4(
    A: torch.Tensor,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int | None = None,
    compress_statistics: bool = False,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """:func:`quantize_4bit` with quant_type="nf4" (bitsandbytes' positional order)."""
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "nf4", quant_storage)


def quantize_fp4(
    A: torch.Tensor,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int | None = None,
    compress_statistics: bool = False,
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """:func:`quantize_4bit` with quant_type="fp4" (bitsandbytes' positional order)."""
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "fp4", quant_storage)


def as_quant_state(state: object, name: str = "quant_state") -> QuantState:
    """``state`` as our QuantState; a bitsandbytes QuantState (or anything with ``as_dict``) is converted."""
    if isinstance(state, QuantState):
        return state
    if hasattr(state, "as_dict") and hasattr(state, "absmax"):
        return QuantState.from_dict(state.as_dict(packed=True), device=state.absmax.device)
    raise TypeError(f"{name} must be a QuantState, got {type(state).__name__}")


def check_packed_matches(packed: torch.Tensor, quant_state: QuantState, name: str = "A") -> torch.Tensor:
    """Flat uint8 bytes of ``packed`` after checking their count against ``quant_state`` (ValueError if not)."""
    data = packed_bytes(packed)
    need = (quant_state.numel + 1) // 2
    itemsize = packed.dtype.itemsize
    if data.numel() != need and data.numel() != -(-need // itemsize) * itemsize:
        raise ValueError(
            f"{name} holds {data.numel()} packed bytes but quant_state (shape {tuple(quant_state.shape)}) needs {need}"
        )
    return data


def dequantize_4bit(
    A: torch.Tensor,
    quant_state: QuantState | None = None,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int | None = None,
    quant_type: str = "fp4",
) -> torch.Tensor:
    """Dequantize packed 4-bit ``A`` to the original shape and dtype (a [1, n] transposed view gives the transpose back)."""
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError("dequantize_4bit needs quant_state, or both absmax and out")
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
        if not isinstance(absmax, torch.Tensor):
            raise TypeError(f"absmax must be a torch.Tensor or None, got {type(absmax).__name__}")
        blocksize = as_blocksize(64 if blocksize is None else blocksize)
        check_float_dtype(out.dtype, "out.dtype")
        quant_state = QuantState(absmax, out.shape, None, blocksize, quant_type, out.dtype)
    quant_state = as_quant_state(quant_state)
    check_blocksize(quant_state.blocksize, "quant_state.blocksize")
    check_quant_type(quant_state.quant_type)
    check_float_dtype(quant_state.dtype, "quant_state.dtype")
    data = check_packed_matches(A, quant_state)
    if out is not None:
        check_out(out, quant_state.shape, quant_state.dtype, A.device)
    absmax_t, nested_absmax, nested_code, offset = quant_state.absmax_tensors()
    result = ops.dequantize_4bit(
        data,
        absmax_t,
        nested_absmax,
        nested_code,
        offset,
        quant_state.blocksize,
        quant_state.state2.blocksize if quant_state.nested else NESTED_BLOCKSIZE,
        quant_state.quant_type,
        list(quant_state.shape),
        quant_state.dtype,
    )
    if out is not None:
        result = out.copy_(result)
    if A.dim() == 2 and A.shape[0] == 1 and A.shape[1] > 1 and result.dim() == 2:
        return result.t()
    return result


def dequantize_nf4(
    A: torch.Tensor,
    quant_state: QuantState | None = None,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int | None = None,
) -> torch.Tensor:
    """:func:`dequantize_4bit` with quant_type="nf4" (bitsandbytes' positional order)."""
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "nf4")


def dequantize_fp4(
    A: torch.Tensor,
    quant_state: QuantState | None = None,
    absmax: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    blocksize: int | None = None,
) -> torch.Tensor:
    """:func:`dequantize_4bit` with quant_type="fp4" (bitsandbytes' positional order)."""
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "fp4")


def gemv_4bit(
    A: torch.Tensor,
    B: torch.Tensor,
    out: torch.Tensor | None = None,
    transposed_A: bool = False,
    transposed_B: bool = False,
    state: QuantState | None = None,
) -> torch.Tensor:
    """``A @ W.T`` where W is the 4-bit weight ``B`` (packed, either orientation) described by ``state``; A of no
    rows gives an empty product, as in :func:`fsdp4bit.matmul_4bit`."""
    if state is None:
        raise ValueError("gemv_4bit needs state=, the QuantState returned by quantize_4bit")
    state = as_quant_state(state, "state")
    _check_input(A, empty_ok=True)
    data = check_packed_matches(B, state, "B")
    if len(state.shape) != 2:
        raise ValueError(f"gemv_4bit needs a 2-D weight, quant_state.shape is {tuple(state.shape)}")
    ops.check_rows(A)
    if A.shape[-1] != state.shape[1]:
        raise ValueError(
            f"A has {A.shape[-1]} features in its last dim but the 4-bit weight has shape {tuple(state.shape)} "
            f"(needs {state.shape[1]})"
        )
    if out is not None:
        check_out(out, (*A.shape[:-1], state.shape[0]), A.dtype, A.device)
    absmax_t, nested_absmax, nested_code, offset = state.absmax_tensors()
    stats = (
        absmax_t,
        nested_absmax,
        nested_code,
        offset,
        state.blocksize,
        state.state2.blocksize if state.nested else NESTED_BLOCKSIZE,
        state.quant_type,
        list(state.shape),
    )
    if (torch.is_grad_enabled() and A.requires_grad) or ops.needs_decomposition(A):  # through the differentiable op
        result = ops.matmul_4bit(A, None, data, *stats)
    else:
        result = ops.gemv_4bit(A, data, *stats)
    return out.copy_(result) if out is not None else result
