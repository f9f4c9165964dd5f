"""The 4-bit and 8-bit code tables, built exactly as bitsandbytes builds them (same float32 values)."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Sequence

import torch

QUANT_TYPES = ("fp4", "nf4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
STORAGE_DTYPES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
NESTED_BLOCKSIZE = 256

# NF4: quantiles of N(0, 1) normalised to [-1, 1] (QLoRA), index order = value order.
_NF4 = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# FP4 (1 sign, 2 exponent, 1 mantissa bit, bias 2) in bit-pattern order, divided by its largest magnitude.
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


@functools.cache
def _code_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32)
    data = torch.tensor(_FP4_RAW, dtype=torch.float32)
    return data.div_(data.abs().max())


@functools.cache
def _on_device(kind: str, device: torch.device) -> torch.Tensor:
    """One cached copy per device, so hot paths never do a (synchronizing) host-to-device copy."""
    return (_dynamic_map_cpu() if kind == "dynamic" else _code_cpu(kind)).to(device)


def _device_or_cpu(device: torch.device | str | int | None) -> torch.device:
    """``device`` as a torch.device, the CPU for None (not for any falsy value: 0 is the first accelerator)."""
    return torch.device("cpu" if device is None else device)


def shared_4bit_code(quant_type: str, device: torch.device | str) -> torch.Tensor:
    """The cached code table of ``quant_type`` on ``device``, not copied: for kernels to read, never to hand out."""
    check_quant_type(quant_type)
    return _on_device(quant_type, torch.device(device))


def get_4bit_code(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """A fresh float32 tensor of the 16 code values of ``quant_type`` (index = 4-bit code)."""
    check_quant_type(quant_type)
    return _on_device(quant_type, _device_or_cpu(device)).clone()


@functools.cache
def quantize_bounds(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints between sorted code values, sort order): bucketize against them picks the nearest code."""
    code = _code_cpu(quant_type)
    order = torch.argsort(code)
    mids = (code[order[:-1]] + code[order[1:]]) / 2
    return mids, order


@functools.cache
def _dynamic_map_cpu() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True, 7, 8)), used for double quant."""
    data: list[float] = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    data += [0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def shared_dynamic_map(device: torch.device | str) -> torch.Tensor:
    """The cached dynamic map on ``device``, not copied: for kernels to read, never to hand out."""
    return _on_device("dynamic", torch.device(device))


def get_dynamic_map(device: torch.device | str | None = None) -> torch.Tensor:
    """A fresh float32 copy of the 256-entry dynamic map."""
    return _on_device("dynamic", _device_or_cpu(device)).clone()


def check_quant_type(quant_type: object) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def check_blocksize(blocksize: object, name: str = "blocksize") -> None:
    """An int (a SymInt under tracing) of BLOCKSIZES: TypeError for any other type (64.0, "64", True), else ValueError."""
    if type(blocksize) is int and blocksize in BLOCKSIZES:
        return
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, torch.SymInt)):
        raise TypeError(f"{name} must be an int, one of {BLOCKSIZES}, got {type(blocksize).__name__} {blocksize!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"{name} must be one of {BLOCKSIZES}, got {blocksize!r}")


def as_blocksize(blocksize: object, name: str = "blocksize") -> int:
    """``blocksize`` as a Python int after :func:`check_blocksize`; any integral number (a NumPy int too) is taken,
    so states and their JSON hold plain ints."""
    if isinstance(blocksize, numbers.Integral) and not isinstance(blocksize, bool) and type(blocksize) is not int:
        blocksize = int(blocksize)
    check_blocksize(blocksize, name)
    return blocksize


def check_quant_storage(quant_storage: object) -> None:
    if not isinstance(quant_storage, torch.dtype):
        raise TypeError(
            f"quant_storage must be a torch.dtype, one of {STORAGE_DTYPES}, got {type(quant_storage).__name__} {quant_storage!r}"
        )
    if quant_storage not in STORAGE_DTYPES:
        raise ValueError(f"quant_storage must be one of {STORAGE_DTYPES}, got {quant_storage}")


# The largest 8-bit blockwise blocksize: block counts (n + blocksize - 1) / blocksize stay far from int64 overflow
MAX_BLOCKWISE_BLOCKSIZE = 2**31 - 1


def check_blockwise_blocksize(blocksize: object) -> None:
    """An 8-bit blockwise blocksize: a positive int up to MAX_BLOCKWISE_BLOCKSIZE (SymInts pass under tracing)."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, torch.SymInt)):
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    if isinstance(blocksize, int) and not 1 <= blocksize <= MAX_BLOCKWISE_BLOCKSIZE:
        raise ValueError(f"blocksize must be a positive int up to 2**31 - 1, got {blocksize!r}")


def check_blockwise_code(code: object, name: str = "code") -> None:
    """An 8-bit blockwise code table: a 1-D floating-point tensor."""
    if not isinstance(code, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor (a 1-D float table, e.g. get_dynamic_map()), got {type(code).__name__}"
        )
    if code.dim() != 1 or not code.is_floating_point():
        raise ValueError(
            f"{name} must be a 1-D floating-point table, got a {code.dtype} tensor of shape {tuple(code.shape)}"
        )


def check_flag(value: object, name: str) -> None:
    """``value`` is a bool (a string such as "no" would be taken as true)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} {value!r}")


def check_float_dtype(dtype: object, name: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be one of {FLOAT_DTYPES}, got {dtype}")


def check_shape(shape: Sequence[int]) -> int:
    """The number of values of ``shape``, a sequence of non-negative ints (ValueError if it is not one)."""
    if not all(isinstance(s, (int, torch.SymInt)) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ValueError(f"shape must be a sequence of non-negative ints, got {list(shape)}")
    return math.prod(shape)


def check_stats_counts(
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    shape: Sequence[int],
    blocksize: int,
    nested_blocksize: int,
) -> None:
    """absmax holds exactly ceil(numel / blocksize) entries and a nested absmax exactly ceil(blocks / nested_blocksize),
    both blocksizes of BLOCKSIZES (else ValueError / TypeError naming them); the passing case tests the least."""
    numel = math.prod(shape)
    if type(blocksize) is int and blocksize in BLOCKSIZES and absmax.numel() == -(-numel // blocksize):
        if nested_absmax is None:
            return
        nblocks = -(-numel // blocksize)
        if (
            type(nested_blocksize) is int
            and nested_blocksize in BLOCKSIZES
            and nested_absmax.numel() == -(-nblocks // nested_blocksize)
        ):
            return
    check_blocksize(blocksize)
    check_shape(shape)
    nblocks = -(-numel // blocksize)
    if absmax.numel() != nblocks:
        raise ValueError(
            f"absmax has {absmax.numel()} entries but shape {tuple(shape)} with blocksize {blocksize} needs {nblocks}"
        )
    if nested_absmax is not None:
        check_blocksize(nested_blocksize, "nested_blocksize")
        need = -(-nblocks // nested_blocksize)
        if nested_absmax.numel() != need:
            raise ValueError(
                f"nested_absmax has {nested_absmax.numel()} entries but {nblocks} absmax entries with nested_blocksize "
                f"{nested_blocksize} need {need}"
            )
