"""Python face of the native extensions: argument preparation, validation and fallbacks.

`NativeOps` has exactly the methods ``fsdp4bit.ops`` calls. The code tables go to the kernels as the
exact float32 tensors ``fsdp4bit.codebooks`` builds (midpoints, FP4 argsort order, code values), so the
native path and the reference can never disagree on a constant.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch

from ..codebooks import (
    BLOCKSIZES,
    QUANT_TYPES,
    check_blocksize,
    check_blockwise_blocksize,
    check_float_dtype,
    check_quant_type,
    get_4bit_code,
    quantize_bounds,
    shared_4bit_code,
)

# Each extension routes a matmul itself (its matmul_4bit_forward): on the CPU the fused gemv up to 16 rows, then
# dequantize + F.linear; on CUDA the gemv up to 8 rows, then the fused 4-bit GEMM where it applies, else dequantize +
# cuBLAS.
_GEMM_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}

# The Python implementations of the fsdp4bit:: operators whose kernels each extension registers with the dispatcher
# (csrc/common/operators.h), filled by fsdp4bit.ops: the C++ kernels run them for arguments their fast path does not
# take (so every path raises the same errors) and under FSDP4BIT_NO_NATIVE.
OPERATOR_IMPLS: dict[str, Callable[..., torch.Tensor]] = {}


@functools.cache
def _tables(quant_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(midpoints float32 [15], bucket -> code uint8 [16], code values float32 [16]), all on the CPU."""
    mids, order = quantize_bounds(quant_type)
    enc = order.to(torch.uint8) if quant_type != "nf4" else torch.arange(16, dtype=torch.uint8)
    return mids.contiguous(), enc.contiguous(), get_4bit_code(quant_type, "cpu").contiguous()


def _flat_bytes(packed: torch.Tensor) -> torch.Tensor:
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must be a uint8 tensor, got {packed.dtype}")
    return packed if packed.dim() == 1 and packed.is_contiguous() else packed.reshape(-1).contiguous()


def _opt(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def _check_state(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    numel: int,
    blocksize: int,
    nested_blocksize: int,
) -> None:
    """Python-side checks of a quantized state, so bad input raises here with the argument's name.

    The extensions check again (TORCH_CHECK); these checks name the argument, and they kept bad input from
    ever reaching a TORCH_CHECK while one crashed the process on the GPU image (a statically linked
    libstdc++, fixed in ``_build.py``).
    """
    device = packed.device
    if packed.numel() < (numel + 1) // 2:
        raise ValueError(f"packed has {packed.numel()} bytes, need {(numel + 1) // 2} for {numel} values")
    nblocks = math.ceil(numel / blocksize)
    if absmax.dim() != 1 or absmax.numel() < nblocks:
        raise ValueError(f"absmax must be 1-D with at least {nblocks} entries, got shape {tuple(absmax.shape)}")
    tensors = {"absmax": absmax, "nested_absmax": nested_absmax, "nested_code": nested_code, "offset": offset}
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, packed on {device}")
    if nested_absmax is None:
        if absmax.dtype != torch.float32:
            raise TypeError(f"absmax must be float32 without double quantization, got {absmax.dtype}")
        return
    if nested_code is None or offset is None:
        raise ValueError("nested_absmax needs nested_code and offset")
    if absmax.dtype != torch.uint8:
        raise TypeError(f"absmax must be uint8 with double quantization, got {absmax.dtype}")
    if (
        nested_blocksize < 1
        or nested_absmax.dtype != torch.float32
        or nested_absmax.numel() < math.ceil(nblocks / nested_blocksize)
    ):
        raise ValueError("nested_absmax must be float32 with ceil(blocks / nested_blocksize) entries")
    if nested_code.dtype != torch.float32 or nested_code.numel() != 256:
        raise ValueError("nested_code must be float32 with 256 entries")
    if offset.dtype != torch.float32 or offset.numel() != 1:
        raise ValueError("offset must be a one-element float32 tensor")


def check_quantize_args(A: torch.Tensor, blocksize: int, quant_type: str) -> None:
    """What quantizing ``A`` needs (ValueError / TypeError naming the argument), on every path (fsdp4bit.ops)."""
    check_quant_type(quant_type)
    check_blocksize(blocksize)
    check_float_dtype(A.dtype, "A.dtype")


def check_matmul_args(
    A: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, *stats: Any
) -> tuple[torch.Tensor, int, int]:
    """(flat packed bytes, N, K) after checking a matmul's arguments (ValueError / TypeError naming them), on every
    path (fsdp4bit.ops); ``stats`` are :meth:`NativeOps.gemv_4bit`'s arguments from absmax to shape."""
    absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape = stats
    check_quant_type(quant_type)
    check_blocksize(blocksize)
    check_float_dtype(A.dtype, "A.dtype")
    if len(shape) != 2:
        raise ValueError(f"shape must be (N, K), got {tuple(shape)}")
    N, K = int(shape[0]), int(shape[1])
    if A.shape[-1] != K:
        raise ValueError(f"A's last dimension ({A.shape[-1]}) must equal K = {K}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")
    flat_packed = _flat_bytes(packed)
    _check_state(flat_packed, absmax, nested_absmax, nested_code, offset, N * K, blocksize, nested_blocksize)
    if A.device != flat_packed.device:
        raise ValueError(f"A is on {A.device}, packed on {flat_packed.device}")
    return flat_packed, N, K


class NativeOps:
    """Native kernels of one device type (``"cpu"`` or ``"cuda"``)."""

    def __init__(self, ext: ModuleType, device_type: str, build_seconds: float) -> None:
        self.ext = ext
        self.device_type = device_type
        self.build_seconds = build_seconds
        # the extension's operator kernels: the code tables, and where to defer
        ext.register_operators({q: _tables(q)[2] for q in QUANT_TYPES}, dict(OPERATOR_IMPLS))

    def __repr__(self) -> str:
        return f"NativeOps({self.device_type!r})"

    def quantize_4bit(
        self, A: torch.Tensor, blocksize: int, quant_type: str
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flatten ``A`` and quantize: (packed uint8 [ceil(n/2)], float32 absmax [ceil(n/blocksize)], a fresh
        copy of the 16-entry code on A's device, written by the kernel)."""
        check_quantize_args(A, blocksize, quant_type)
        mids, enc, code = _tables(quant_type)
        return self.ext.quantize_4bit(A.contiguous(), int(blocksize), mids, enc, code)

    def _check_blockwise(self, A: torch.Tensor, code: torch.Tensor, blocksize: int, offset: torch.Tensor | None):
        check_blockwise_blocksize(blocksize)
        if A.dtype != torch.float32:
            raise TypeError(f"A must be float32, got {A.dtype}")
        if code.dtype != torch.float32 or code.numel() != 256:
            raise ValueError(f"code must be float32 with 256 entries, got {code.dtype} with {code.numel()}")
        if offset is not None and (offset.dtype != torch.float32 or offset.numel() != 1):
            raise ValueError("offset must be a one-element float32 tensor")
        for name, t in (("code", code), ("offset", offset)):
            if t is not None and t.device != A.device:
                raise ValueError(f"{name} is on {t.device}, A on {A.device}")

    def quantize_blockwise(
        self, A: torch.Tensor, code: torch.Tensor, blocksize: int, offset: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """8-bit blockwise quantization of flat float32 ``A - offset`` against the sorted 256-entry ``code``.

        Returns (uint8 codes [n], float32 absmax [ceil(n/blocksize)]), bit-exact with
        ``reference.quantize_blockwise(A - offset, code, blocksize)``; the subtraction is fused.
        """
        self._check_blockwise(A, code, blocksize, offset)
        return self.ext.quantize_blockwise(
            A.reshape(-1).contiguous(), code.reshape(-1).contiguous(), blocksize, _opt(offset)
        )

    def double_quant(
        self, absmax: torch.Tensor, code: torch.Tensor, blocksize: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(offset = ``reference.absmax_mean(absmax)``, uint8 codes, float32 nested absmax, a fresh copy of
        ``code``) in one call: see ``ops.double_quant``."""
        self._check_blockwise(absmax, code, blocksize, None)
        return self.ext.double_quant(absmax.reshape(-1).contiguous(), code.reshape(-1).contiguous(), blocksize)

    def dequantize_4bit(
        self,
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
        state_checked: bool = False,
    ) -> torch.Tensor:
        """A ``shape`` tensor of ``dtype``: code[nibble] * absmax[block] in float32, cast once.

        ``state_checked=True`` skips the checks of quant_type, blocksize and the state's tensors, for a state
        that passed them for this shape (in :meth:`dequantize_4bit` or :meth:`gemv_4bit`): the matmul's
        backward, with the state its forward checked. ``dtype`` is always checked; the extension checks
        its arguments in any case (TORCH_CHECK).
        """
        if not state_checked:
            check_quant_type(quant_type)
            check_blocksize(blocksize)
        check_float_dtype(dtype, "dtype")
        numel = math.prod(shape)
        flat_packed = _flat_bytes(packed)
        # the CUDA kernel reads the code from device memory (each lane loads one entry), the CPU one by value
        code = _tables(quant_type)[2] if self.device_type == "cpu" else shared_4bit_code(quant_type, flat_packed.device)
        if not state_checked:
            _check_state(flat_packed, absmax, nested_absmax, nested_code, offset, numel, blocksize, nested_blocksize)
        flat = self.ext.dequantize_4bit(
            flat_packed,
            absmax.contiguous(),
            _opt(nested_absmax),
            _opt(nested_code),
            _opt(offset),
            int(blocksize),
            int(nested_blocksize),
            code,
            numel,
            dtype,
        )
        return flat.view(tuple(shape))

    def gemm_applies(self, A: torch.Tensor, blocksize: int, shape: Sequence[int], trans: bool = False) -> bool:
        """Whether the fused 4-bit GEMM takes ``A @ W.T`` (or, with ``trans``, ``A @ W``: a linear layer's input
        gradient) for W of ``shape`` (N, K) and ``blocksize``: CUDA with an sm_90a build, fp16/bf16 A, 9 to 512
        rows and a large enough weight (2^22 entries up to 32 rows, 2^23 up to 128, 2^24 up to 256, 2^25 up to 512;
        transposed 2^24 up to 256 rows and 2^25 past that, and N % 8 == 0); or, not transposed, 513 to 1536 rows, 2^24
        entries, work units that fill their waves of CTA slots to 85% and rows that fill their 256-row tiles to 80%
        (95% past 768 rows). The extension's rule, which its matmul route asks itself: this is for benchmarks and
        tests that must know the path."""
        if self.device_type != "cuda" or A.dtype not in _GEMM_DTYPES or len(shape) != 2:
            return False
        N, K = int(shape[0]), int(shape[1])
        if N <= 0 or K <= 0 or blocksize not in BLOCKSIZES or blocksize < 64:  # the wgmma k step is 64 wide
            return False
        if A.dim() == 0 or A.shape[-1] != (N if trans else K):
            return False
        rows = A.numel() // A.shape[-1]
        dtype = _GEMM_DTYPES[A.dtype]
        return bool(self.ext.gemm_4bit_applies(dtype, int(blocksize), rows, N, K, A.device.index, bool(trans)))

    def _state_args(self, flat_packed: torch.Tensor, *stats: Any) -> tuple:
        """The extension's matmul arguments from absmax to K (both code tables, CPU and device), for ``stats``,
        :meth:`gemv_4bit`'s arguments from absmax to shape."""
        absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape = stats
        code_cpu, code_dev = _tables(quant_type)[2], shared_4bit_code(quant_type, flat_packed.device)
        opts = (_opt(nested_absmax), _opt(nested_code), _opt(offset))
        nk = (int(shape[0]), int(shape[1]))
        return (absmax.contiguous(), *opts, int(blocksize), int(nested_blocksize), code_cpu, code_dev, *nk)

    def input_grad_4bit(self, grad_out: torch.Tensor, packed: torch.Tensor, *stats: Any) -> torch.Tensor:
        """``grad_out @ W`` for the 4-bit W (the input gradient of ``A @ W.T``), routed by the extension as the
        autograd node's backward is: on CUDA the transposed fused GEMM where :meth:`gemm_applies` takes it with
        ``trans=True``, else grad_out times W dequantized. ``stats`` are :meth:`gemv_4bit`'s arguments from absmax
        to shape, a state the forward checked (the extension checks them again)."""
        flat_packed = _flat_bytes(packed)
        return self.ext.matmul_4bit_input_grad(grad_out, flat_packed, *self._state_args(flat_packed, *stats))

    def gemv_4bit(
        self,
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
        bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``A @ W.T + bias`` for the 4-bit W of ``shape`` (N, K) and a bias (cast to A's dtype) or None; float32
        accumulation, output in A's dtype, the bias added before the one rounding. The extension routes the call
        as the autograd node's forward does: on CUDA the fused gemv for up to 8 rows, the fused GEMM where
        :meth:`gemm_applies`, else dequantize + F.linear; on the CPU the fused gemv for up to 16 rows, else
        dequantize + F.linear."""
        stats = (absmax, nested_absmax, nested_code, offset, blocksize, nested_blocksize, quant_type, shape)
        flat_packed, N, K = check_matmul_args(A, packed, bias, *stats)
        return self.ext.matmul_4bit(A, bias, flat_packed, *self._state_args(flat_packed, *stats))
