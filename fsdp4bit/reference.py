"""Plain-PyTorch 4-bit math: the reference every native kernel is tested against, and the fallback path.

Every function takes and returns plain tensors. The arithmetic follows bitsandbytes' default backend
step by step (float32 scaling by the reciprocal of the block absmax, nearest code by midpoint
bucketing, high nibble = even element), so the bytes it produces are the bytes bitsandbytes produces.
"""

from __future__ import annotations

import math

import torch

from .codebooks import NESTED_BLOCKSIZE, get_4bit_code, quantize_bounds

_TINY = 1e-38


def _blockwise_scaled(a: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split flat float32 ``a`` into blocks; return (values scaled into [-1, 1], per-block absmax)."""
    n = a.numel()
    rem = n % blocksize
    full = n - rem
    blocks = a[:full].reshape(full // blocksize, blocksize)
    absmax = blocks.abs().amax(dim=-1) if full else a.new_empty(0)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=_TINY).view(-1, 1)), -1, 1).reshape(-1)
    if rem:
        # bitsandbytes divides (not multiplies by the reciprocal) in the short last block and stores
        # the clamped absmax there: kept as is so the bytes stay identical.
        tail_max = a[full:].abs().max().clamp(min=_TINY)
        absmax = torch.cat([absmax, tail_max.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(a[full:] / tail_max, -1, 1)])
    return scaled, absmax


def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``A`` (any shape, flattened) to (packed uint8 of ceil(n/2) bytes, float32 absmax per block)."""
    scaled, absmax = _blockwise_scaled(A.reshape(-1).float(), blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    mids, order = quantize_bounds(quant_type)
    q = torch.bucketize(scaled, mids.to(scaled.device), out_int32=True)
    if quant_type != "nf4":
        q = order.to(q.device)[q]
    q8 = q.to(torch.uint8)
    return (q8[0::2] << 4) | q8[1::2], absmax


def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization of flat ``A`` against a sorted 256-entry ``code`` (used for double quant)."""
    scaled, absmax = _blockwise_scaled(A.reshape(-1).float(), blocksize)
    mids = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, mids, out_int32=True).to(torch.uint8), absmax


def absmax_mean(absmax: torch.Tensor) -> torch.Tensor:
    """Double quant's offset: the mean of ``absmax`` as a float32 0-dim tensor, the same bits on every device.

    The sum is the pairwise float64 tree over the values zero-padded to a power of two (element i of each
    level is x[2i] + x[2i + 1]); the offset is float32((sum + 0.0) / n), the + 0.0 making a zero sum +0.0
    however far it was padded. torch's own float32 mean differs between CPU and CUDA in the last bit for most
    large weights (NOTES.md), which made a double-quantized state depend on the device it was quantized on.
    """
    x = absmax.reshape(-1).to(torch.float64)
    n = x.numel()
    if n == 0:
        return torch.full((), float("nan"), dtype=torch.float32, device=absmax.device)
    x = torch.nn.functional.pad(x, (0, (1 << (n - 1).bit_length()) - n))
    while x.numel() > 1:
        x = x[0::2] + x[1::2]
    return ((x[0] + 0.0) / n).to(torch.float32)


def dequantize_blockwise(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`, in float32: code[q] * absmax[block]."""
    vals = code[q.reshape(-1).long()]
    # a blocksize past the value count means one block: repeating it blocksize times would allocate for nothing
    return vals * absmax.repeat_interleave(min(blocksize, max(vals.numel(), 1)))[: vals.numel()]


def absmax_float32(
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    nested_blocksize: int = NESTED_BLOCKSIZE,
) -> torch.Tensor:
    """The per-block float32 absmax, undoing double quantization where the state has it."""
    if nested_absmax is None:
        return absmax
    return dequantize_blockwise(absmax, nested_absmax, nested_code, nested_blocksize) + offset


def _pair_table(quant_type: str, device: torch.device) -> torch.Tensor:
    """(256, 2) float32: the two code values each packed byte holds (high nibble first)."""
    code = get_4bit_code(quant_type, device)
    byte = torch.arange(256, device=device)
    return torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1)


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    blocksize: int,
    quant_type: str,
    numel: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Flat tensor of ``numel`` values in ``dtype``: code[nibble] * absmax[block], in float32, then cast once."""
    vals = _pair_table(quant_type, packed.device)[packed.reshape(-1).long()].reshape(-1)[:numel]
    nblocks = math.ceil(numel / blocksize)
    full = (numel // blocksize) * blocksize
    out = torch.empty(numel, dtype=torch.float32, device=packed.device)
    out[:full] = (vals[:full].view(-1, blocksize) * absmax[: full // blocksize].view(-1, 1)).reshape(-1)
    if full < numel:
        out[full:] = vals[full:] * absmax[nblocks - 1]
    return out.to(dtype)
