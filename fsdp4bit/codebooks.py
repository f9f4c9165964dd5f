"""The 4-bit and 8-bit code tables, built exactly as bitsandbytes builds them (same float32 values)."""

from __future__ import annotations

import functools

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


def shared_4bit_code(quant_type: str, device: torch.device | str) -> torch.Tensor:
    """The cached code table of ``quant_type`` on ``device``, not copied: for kernels to read, never to hand out."""
    check_quant_type(quant_type)
    return _on_device(quant_type, torch.device(device))


def get_4bit_code(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """A fresh float32 tensor of the 16 code values of ``quant_type`` (index = 4-bit code)."""
    check_quant_type(quant_type)
    return _on_device(quant_type, torch.device(device or "cpu")).clone()


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
    return _on_device("dynamic", torch.device(device or "cpu")).clone()


def check_quant_type(quant_type: object) -> None:
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def check_blocksize(blocksize: object, name: str = "blocksize") -> None:
    if isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        raise ValueError(f"{name} must be one of {BLOCKSIZES}, got {blocksize!r}")


def check_quant_storage(quant_storage: object) -> None:
    if not isinstance(quant_storage, torch.dtype):
        raise TypeError(
            f"quant_storage must be a torch.dtype, one of {STORAGE_DTYPES}, got {type(quant_storage).__name__} {quant_storage!r}"
        )
    if quant_storage not in STORAGE_DTYPES:
        raise ValueError(f"quant_storage must be one of {STORAGE_DTYPES}, got {quant_storage}")


def check_float_dtype(dtype: object, name: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be one of {FLOAT_DTYPES}, got {dtype}")
