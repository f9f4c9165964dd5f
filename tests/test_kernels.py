"""Native kernels (fsdp4bit.kernels) against the plain-PyTorch reference (fsdp4bit.reference).

quantize / dequantize must match the reference bit for bit (bytes, absmax bits, output bits); gemv is
checked against a float64 product with the dequantized float32 weight. CPU tests skip, with the reason
shown, when the native CPU build is unavailable; CUDA tests run only where a GPU is present.
"""

from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path

import pytest
import torch

from fsdp4bit import kernels, reference
from fsdp4bit.codebooks import BLOCKSIZES, get_4bit_code, get_dynamic_map, quantize_bounds, shared_4bit_code

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
QUANT_TYPES = ("nf4", "fp4")
ODD_SIZES = (1, 3, 63, 65, 4097)
BITS = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}
GEMV_RTOL = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-5}

_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=_DEVICES)
def native(request, monkeypatch):
    """(native ops, device) or a skip saying why the native path is missing."""
    monkeypatch.delenv("FSDP4BIT_NO_NATIVE", raising=False)
    device = request.param
    ops = kernels.native_for(device)
    if ops is None:
        pytest.skip(f"native {device} kernels unavailable (backend: reference); see the build warning")
    return ops, torch.device(device)


@pytest.fixture
def cuda_native(native):
    """`native` for the CUDA-only kernel paths: its CPU instances skip (the CPU kernel covers those shapes in
    test_gemv; a torch.device never equals the string "cuda", so this compares its type)."""
    ops, device = native
    if device.type != "cuda":
        pytest.skip("a CUDA-only kernel path (the CPU kernel covers these shapes in test_gemv)")
    return ops, device


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _adversarial(n: int, blocksize: int, qt: str, seed: int) -> list[torch.Tensor]:
    """float32 inputs built to hit every edge of the reference's arithmetic."""
    g = _gen(seed)
    mids, _ = quantize_bounds(qt)
    cases = [torch.randn(n, generator=g), torch.zeros(n), torch.full((n,), -3.25)]
    # values exactly on midpoints x absmax (scale 2: exact products) and next to them (scale 3: rounded)
    for scale in (2.0, 3.0):
        x = mids[torch.randint(0, 15, (n,), generator=g)] * scale
        x[::blocksize] = scale  # each full block's absmax is the scale
        nudge = torch.randint(-1, 2, (n,), generator=g).float()
        cases.append(torch.where(nudge == 0, x, torch.nextafter(x, x + nudge)))
    special = torch.randn(n, generator=g)
    special[torch.rand(n, generator=g) < 0.05] = float("nan")
    special[torch.rand(n, generator=g) < 0.05] = float("inf")
    special[torch.rand(n, generator=g) < 0.05] = -float("inf")
    zero_block = torch.randn(n, generator=g)
    zero_block[: min(n, blocksize)] = 0.0
    cases += [
        special,
        zero_block,
        torch.randn(n, generator=g) * 3e38,
        torch.randn(n, generator=g) * 1e-40,  # subnormal
        torch.randn(n, generator=g).clamp(-1e-38, 1e-38),
    ]
    return cases


def _same_float_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality, any NaN matching any NaN (payloads are not part of the format)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    na, nb = a.isnan(), b.isnan()
    if not torch.equal(na, nb):
        return False
    ia, ib = a.view(BITS[a.dtype]), b.view(BITS[b.dtype])
    return torch.equal(ia[~na], ib[~nb])


def _assert_same_double_quant(packed: torch.Tensor, state, ref_packed: torch.Tensor, ref_state) -> None:
    """A double-quantized 4-bit result has the reference's packed bytes, absmax codes, offset and nested absmax
    (bits; the reference may be on another device)."""
    assert torch.equal(packed.cpu(), ref_packed.cpu()) and torch.equal(state.absmax.cpu(), ref_state.absmax.cpu())
    assert _same_float_bits(state.offset.cpu(), ref_state.offset.cpu())
    assert _same_float_bits(state.state2.absmax.cpu(), ref_state.state2.absmax.cpu())


def _assert_quantize_equal(ops, x: torch.Tensor, blocksize: int, qt: str) -> None:
    packed, absmax, code = ops.quantize_4bit(x, blocksize, qt)
    ref_packed, ref_absmax = reference.quantize_4bit(x, blocksize, qt)
    assert code.device == x.device and torch.equal(code.cpu(), get_4bit_code(qt)), "code copy differs"
    assert code.data_ptr() != shared_4bit_code(qt, x.device).data_ptr(), "code must be a fresh tensor"
    assert packed.dtype == torch.uint8 and packed.shape == ((x.numel() + 1) // 2,)
    assert absmax.dtype == torch.float32 and absmax.shape == (math.ceil(x.numel() / blocksize),)
    if not torch.equal(packed, ref_packed):
        bad = (packed != ref_packed).nonzero().flatten()[:8]
        raise AssertionError(
            f"packed bytes differ at {bad.tolist()}: {packed[bad].tolist()} vs {ref_packed[bad].tolist()}"
        )
    assert _same_float_bits(absmax, ref_absmax), "absmax bits differ"


@pytest.mark.parametrize("qt", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_bit_exact(native, qt, blocksize, dtype):
    ops, device = native
    # 20481: two whole 16 KB tiles of a 16-bit input (five of float32) and a partial one, for the CUDA bulk kernel
    for n in ODD_SIZES + (2 * blocksize, 3 * blocksize + 2, 20481):
        for i, x in enumerate(_adversarial(n, blocksize, qt, seed=n + blocksize)):
            try:
                _assert_quantize_equal(ops, x.to(dtype).to(device), blocksize, qt)
            except AssertionError as exc:
                raise AssertionError(f"n={n} case={i}: {exc}") from None


@pytest.mark.parametrize("qt", QUANT_TYPES)
def test_quantize_large_and_unaligned_input(native, qt):
    ops, device = native
    base = torch.randn(70001, generator=_gen(1)).to(device)
    for dtype in DTYPES:
        x = base.to(dtype)
        _assert_quantize_equal(ops, x, 64, qt)
        _assert_quantize_equal(ops, x[1:], 64, qt)  # storage offset: not 16-byte aligned
        _assert_quantize_equal(ops, x[3:].view(-1)[: 4097 * 3].view(4097, 3), 128, qt)


def _state(n: int, blocksize: int, nested: bool, seed: int, device: torch.device):
    """Random packed bytes plus a float32 or double-quantized absmax for n values."""
    g = _gen(seed)
    nblocks = math.ceil(n / blocksize)
    nbytes = (n + 1) // 2
    storage = torch.randint(0, 256, (nbytes + 13,), generator=g, dtype=torch.uint8)
    packed = storage[1 : 1 + nbytes + 5]  # storage offset 1 and < 8 bytes of slack, as FSDP views are
    if not nested:
        absmax = torch.rand(nblocks, generator=g) * 4
        absmax[::7] = 0.0
        return packed.to(device)[: packed.numel()], absmax.to(device), None, None, None
    absmax = torch.randint(0, 256, (nblocks,), generator=g, dtype=torch.uint8)
    nested_absmax = torch.rand(math.ceil(nblocks / 256), generator=g) + 0.5
    offset = torch.tensor(0.0371, dtype=torch.float32)
    code = get_dynamic_map()
    return packed.to(device), absmax.to(device), nested_absmax.to(device), code.to(device), offset.to(device)


def _poison(numel: int, dtype: torch.dtype, device: torch.device) -> None:
    """Leave a freed NaN-filled block of the output's size where the next allocation likely lands."""
    torch.full((numel,), float("nan"), dtype=dtype, device=device)


@pytest.mark.parametrize("qt", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_dequantize_bit_exact(native, qt, blocksize, nested):
    ops, device = native
    for n in ODD_SIZES + (blocksize * 300 + 17,):
        packed, absmax, nabs, ncode, offset = _state(n, blocksize, nested, seed=n * 3 + blocksize, device=device)
        scale = reference.absmax_float32(absmax, nabs, ncode, offset, 256)
        for dtype in DTYPES:
            shape = (n,) if n % 3 else (3, n // 3)
            _poison(n, dtype, device)
            out = ops.dequantize_4bit(packed, absmax, nabs, ncode, offset, blocksize, 256, qt, shape, dtype)
            ref = reference.dequantize_4bit(packed, scale, blocksize, qt, n, dtype).view(shape)
            assert out.shape == tuple(shape) and out.dtype == dtype
            assert _same_float_bits(out, ref), f"n={n} dtype={dtype}: output bits differ"


def test_dequantize_roundtrip_matches_reference_ops(native):
    ops, device = native
    x = torch.randn(4096 + 33, generator=_gen(5)).to(device, torch.bfloat16)
    packed, absmax, _ = ops.quantize_4bit(x, 64, "nf4")
    out = ops.dequantize_4bit(packed, absmax, None, None, None, 64, 256, "nf4", x.shape, torch.bfloat16)
    ref = reference.dequantize_4bit(*reference.quantize_4bit(x, 64, "nf4"), 64, "nf4", x.numel(), torch.bfloat16)
    assert _same_float_bits(out, ref)
    rel = ((out.float() - x.float()).norm() / x.float().norm()).item()
    assert rel < 0.12  # NF4 bs64 on Gaussian data: ~0.09


def _assert_within_gemm_bound(
    out: torch.Tensor, A: torch.Tensor, W32: torch.Tensor, bias: torch.Tensor | None = None
) -> None:
    """Every output of the GEMM within its own bound around A @ W.T (+ bias) in float64, W being the dequantized
    weight in A's dtype (the kernel's operand, as dequantize_4bit gives it): the float32 sum's error (at most
    2^-23 * K * sum |a| |w|, twice the textbook bound for any summation order), the float32 bias add (2^-24) and
    one rounding to A's dtype (half an ulp). At short K, rounding before the bias add too breaks it."""
    K = A.shape[-1]
    W = W32.to(A.dtype).double()
    ref = A.double() @ W.T
    if bias is not None:
        ref = ref + bias.double().cpu()
    acc_err = (A.double().abs() @ W.abs().T) * (K * 2.0**-23) + ref.abs() * 2.0**-24
    u = 2.0**-8 if out.dtype == torch.bfloat16 else 2.0**-11
    bound = u * (ref.abs() + acc_err) + acc_err
    err = (out.double().cpu() - ref).abs()
    bad = err > bound
    assert not bad.any(), f"{int(bad.sum())} outputs out of bound, first at {bad.nonzero()[0].tolist()}"


def _quantized_weight(N, K, blocksize, qt, nested, g):
    """A random (N, K) weight's 4-bit state (packed, absmax, nested absmax, nested code, offset) and its float32
    dequantized values (the reference path's)."""
    W = torch.randn(N, K, generator=g)
    packed, absmax = reference.quantize_4bit(W, blocksize, qt)
    nabs = ncode = offset = None
    if nested:
        offset = absmax.mean()
        ncode = get_dynamic_map()
        absmax, nabs = reference.quantize_blockwise(absmax - offset, ncode, 256)
    scale = reference.absmax_float32(absmax, nabs, ncode, offset, 256)
    W32 = reference.dequantize_4bit(packed, scale, blocksize, qt, N * K, torch.float32).view(N, K)
    return (packed, absmax, nabs, ncode, offset), W32


def _gemv_case(
    ops, device, M_shape, N, K, blocksize, qt, nested, dtype, seed, a_scale=1.0, direct=False, with_bias=False
):
    g = _gen(seed)
    (packed, absmax, nabs, ncode, offset), W32 = _quantized_weight(N, K, blocksize, qt, nested, g)
    A = (torch.randn(*M_shape, K, generator=g) * a_scale).to(dtype)
    # a bias of the outputs' size (so that rounding before adding it would show)
    bias = (torch.randn(N, generator=g) * a_scale * math.sqrt(K)).to(dtype) if with_bias else None
    ref = A.double() @ W32.double().T + (0 if bias is None else bias.double())
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    _poison(math.prod(M_shape) * N, dtype, device)
    if direct:  # the fused GEMM's own entry point, outside fsdp4bit's dispatch rule
        code = get_4bit_code(qt).float().cpu()
        args = (to(A), to(packed), to(absmax), to(nabs), to(ncode), to(offset), blocksize, 256, code, N, K)
        out = ops.ext.gemm_4bit(*args, to(bias))
    else:
        args = (to(A), to(packed), to(absmax), to(nabs), to(ncode), to(offset), blocksize, 256, qt, (N, K))
        out = ops.gemv_4bit(*args, to(bias))
    assert out.shape == (*M_shape, N) and out.dtype == dtype
    assert not out.isnan().any(), "unwritten or NaN output"
    err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
    assert err < GEMV_RTOL[dtype], f"relative error {err:.2e} for {dtype}, M={M_shape} N={N} K={K}"
    if direct:  # the GEMM rounds once from float32 sums (the bias added first): a bound per output too
        _assert_within_gemm_bound(out, A, W32, bias)


def _cuda_gemv_kernel(ops, dtype: torch.dtype, N: int, K: int, blocksize: int, nested: bool, M: int = 1) -> str:
    """The CUDA kernel gemv_4bit takes for this call on the current GPU (the extension's own dispatch rule)."""
    name = str(dtype).removeprefix("torch.")
    return ops.ext.gemv_kernel(name, blocksize, nested, 256, M, N, K, torch.cuda.current_device())


def _gemv_path_cases(ops, device, dtype, cases, kernel: str, seed: int) -> None:
    """Each (N, K, quant_type, nested, blocksize) case takes `kernel` and matches the float64 reference."""
    for i, (N, K, qt, nested, bs) in enumerate(cases):
        assert _cuda_gemv_kernel(ops, dtype, N, K, bs, nested) == kernel, (N, K, bs, nested)
        _gemv_case(ops, device, (1,), N, K, bs, qt, nested, dtype, seed=seed + i)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qt", QUANT_TYPES)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_gemv(native, dtype, qt, nested):
    ops, device = native
    cases = [
        ((1,), 37, 256, 64),
        ((1, 1), 130, 4096, 64),
        ((3,), 64, 96, 32),
        ((2, 2), 33, 160, 128),
        ((5,), 17, 512, 256),
        ((8,), 40, 1024, 4096),
        ((9,), 20, 256, 64),
        ((17,), 11, 64, 32),
        ((1,), 19, 100, 64),
        ((4,), 7, 45, 32),
        ((2,), 9, 77, 32),
        ((3,), 13, 88, 32),
    ]  # the last four: K % 32 != 0 (blocks straddle rows; 45 and 77 start every other row inside a byte)
    for i, (M_shape, N, K, bs) in enumerate(cases):
        _gemv_case(ops, device, M_shape, N, K, bs, qt, nested, dtype, seed=i, with_bias=i % 3 == 0)


def test_gemv_bias_shape(native):
    """A bias that is not (N,) is a ValueError naming the expected shape."""
    ops, device = native
    packed, absmax = reference.quantize_4bit(torch.randn(40, 64, generator=_gen(62)), 64, "nf4")
    A = torch.randn(2, 64, generator=_gen(63)).to(device)
    args = (A, packed.to(device), absmax.to(device), None, None, None, 64, 256, "nf4", (40, 64))
    for bias in (torch.zeros(41, device=device), torch.zeros(1, 40, device=device)):
        with pytest.raises(ValueError, match=r"bias must have shape \(40,\)"):
            ops.gemv_4bit(*args, bias)


def test_matmul_without_rows(native):
    """An A with no rows gives an empty (.., N) product in A's dtype, a float32 bias cast to it (on CUDA through the
    extension's route, which dequantizes for it rather than launch a kernel on nothing), and so does a gradient with
    no rows through the input-gradient route."""
    ops, device = native
    packed, absmax = reference.quantize_4bit(torch.randn(40, 64, generator=_gen(64)), 64, "nf4")
    args = (packed.to(device), absmax.to(device), None, None, None, 64, 256, "nf4", (40, 64))
    for shape in ((0, 64), (2, 0, 64)):
        A = torch.zeros(shape, device=device, dtype=torch.bfloat16)
        out = ops.gemv_4bit(A, *args, torch.zeros(40, device=device))
        assert out.shape == (*shape[:-1], 40) and out.dtype == torch.bfloat16 and out.device == A.device
        grad = ops.input_grad_4bit(torch.zeros((*shape[:-1], 40), device=device, dtype=torch.bfloat16), *args)
        assert grad.shape == shape and grad.dtype == torch.bfloat16 and grad.device == A.device


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_bias_rounds_once(native, dtype):
    """The fused gemv adds the bias to its float32 sums before the one rounding to A's dtype, as F.linear does, on
    every kernel path. Each output is a * s exactly (one weight s per row, a everywhere in A, both 1 + 2^-7, so the
    product 1 + 2^-6 + 2^-14 is exact in every kernel's arithmetic) and the bias is half an ulp at 1: rounded once
    the sum goes up, rounded twice it ties back to even."""
    ops, device = native
    s = 1.0 + 2.0**-7
    b = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    dot = s * s
    # (rows of A, rows of W, K, blocksize): CUDA row (K <= 4096), row_split (K past 4096 in 2 parts; 8192 in 4 of
    # 2 rounds; 300 rows of 4096 in 2 parts), row_stream (K past 32768), pair-table (rows ending inside a block),
    # CUDA-core (2 rows) and tensor-core (4 rows, sm_90) kernels; the CPU kernel for all
    cases = [
        (1, 300, 3072, 64, "nf4"),
        (1, 300, 4096, 64, "nf4"),
        (1, 4805, 4160, 64, "fp4"),
        (1, 300, 8192, 64, "fp4"),
        (1, 300, 33792, 64, "nf4"),
        (1, 300, 4128, 32, "nf4"),
        (1, 300, 4160, 128, "nf4"),
        (2, 300, 4096, 64, "fp4"),
        (4, 300, 4096, 64, "nf4"),
    ]
    kernels_run = set()
    for M, N, K, bs, qt in cases:
        W = torch.zeros(N, K)
        W[torch.arange(N), (torch.arange(N) * 37) % K] = s
        packed, absmax = reference.quantize_4bit(W, bs, qt)
        A = torch.full((M, K), s, dtype=dtype, device=device)
        bias = torch.full((N,), b, dtype=dtype)
        bias[::7] = 0.0
        args = (A, packed.to(device), absmax.to(device), None, None, None, bs, 256, qt, (N, K))
        expected = (torch.full((M, N), dot, dtype=torch.float64) + bias.double()).to(dtype)
        out = ops.gemv_4bit(*args, bias.to(device)).cpu()
        assert torch.equal(out, expected), (M, K, bs, qt, (out != expected).sum().item())
        assert torch.equal(ops.gemv_4bit(*args).cpu(), torch.full((M, N), dot, dtype=torch.float64).to(dtype))
        if device.type == "cuda":
            kernels_run.add(_cuda_gemv_kernel(ops, dtype, N, K, bs, False, M))
    if device.type == "cuda":
        assert {"row", "row_split", "row_stream", "pair_table", "cuda_core"} <= kernels_run, kernels_run


def test_gemv_strided_a(native):
    """A strided or misaligned A (a slice of a larger activation) still takes the fused gemv, on a packed copy:
    the same bits as its contiguous twin."""
    ops, device = native
    packed, absmax = reference.quantize_4bit(torch.randn(96, 256, generator=_gen(60)), 64, "nf4")
    packed, absmax = packed.to(device), absmax.to(device)
    wide = torch.randn(3, 513, generator=_gen(61)).to(device=device, dtype=torch.bfloat16)
    for A in (wide[:, :512:2], wide[:, 1:257]):  # every other column; 2 bytes past an aligned start
        assert not A.is_contiguous() or A.data_ptr() % 16 != 0
        args = (absmax, None, None, None, 64, 256, "nf4", (96, 256))
        assert torch.equal(ops.gemv_4bit(A, packed, *args), ops.gemv_4bit(A.contiguous().clone(), packed, *args))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_tensor_core_path(cuda_native, dtype):
    """4..8 tokens on sm_90 take the tensor-core kernel: more 16-row tiles than CTAs, a partial last k chunk."""
    ops, device = cuda_native
    for i, (M, qt, nested, bs) in enumerate([(4, "nf4", True, 64), (8, "fp4", False, 256), (6, "nf4", True, 4096)]):
        _gemv_case(ops, device, (M,), 4805, 4160, bs, qt, nested, dtype, seed=100 + i)


def _sms() -> int:
    """The current GPU's SM count (the fused kernels' rules depend on it)."""
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def _gemm_min_rows() -> int:
    """Rows of W in 128-row tiles for 3/4 of this GPU's SMs: a layer wide enough for the fused 4-bit GEMM at any
    token count up to 512 with K >= 1024 (up to session 18 the rule also asked for this many tiles)."""
    return 128 * math.ceil(0.75 * _sms())


@pytest.fixture
def hopper_native(cuda_native):
    """`cuda_native` on a compute capability 9.0 GPU, the one the fused 4-bit GEMM is built for (sm_90a)."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the fused 4-bit GEMM runs on compute capability 9.0 only")
    return cuda_native


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemm_path(hopper_native, dtype):
    """9 to 512 rows of fp16/bf16 A against a large W (enough rows and entries) take the fused GEMM: tiles of 32,
    128 and 256 tokens, a partial last tile of W and of tokens (and two tiles of tokens), odd k-step counts, 3-D
    A, FP4 and plain absmax; it matches float64. So do shapes it runs only when called directly, blocks larger
    than a row among them."""
    ops, device = hopper_native
    N = _gemm_min_rows() + 37
    cases = [((9,), 1344, "nf4", True, 64), ((2, 50), 4160, "fp4", False, 128), ((256,), 2048, "nf4", True, 256)]
    cases += [((17,), 2048, "fp4", True, 1024), ((300,), 2752, "nf4", True, 64)]
    for i, (M_shape, K, qt, nested, bs) in enumerate(cases):
        assert ops.gemm_applies(torch.empty(*M_shape, K, dtype=dtype, device=device), bs, (N, K)), (M_shape, K, bs)
        _gemv_case(ops, device, M_shape, N, K, bs, qt, nested, dtype, seed=400 + i)
    # shapes the kernel supports but fsdp4bit leaves to other paths: several partial tiles of tokens, few rows,
    # blocks larger than a row
    for i, (M, N, K, bs, nested) in enumerate(
        [(300, 300, 192, 64, True), (513, 129, 128, 128, True), (1, 7, 64, 64, True), (131, 300, 64, 4096, False)]
    ):
        _gemv_case(ops, device, (M,), N, K, bs, "nf4", nested, dtype, seed=420 + i, direct=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemm_many_tiles(hopper_native, dtype):
    """The fused GEMM's persistent grid: each CTA taking 2 or 3 tiles (300 and 396 tiles on 132 SMs) that start
    mid-way through the stage ring (3 or 7 k steps against 4 stages), a partial last 128-row tile, a last token
    tile of 32 tokens; blocksizes 512 and 2048; and split-K, where the tiles alone leave SMs idle. Outputs leave
    through direct stores (odd N), the tensor store (several tiles per CTA, N % 8 == 0: 396 tiles, and 165 tiles
    whose last 128 rows end 40 rows in, so the second warpgroup's block lies wholly past N) or split-K's sum, each
    with and without a bias. Every output is checked against its own float64 bound; at the short K of the biased
    direct and tensor-store cases (256, 448) the bound is tight enough that rounding before adding the bias fails
    it."""
    ops, device = hopper_native
    # (M, N, K, blocksize, nested, bias); direct stores: N = 9557; tensor store: N = 4200, 4136; the rest split K
    cases = [(800, 9557, 192, 64, True, False), (3000, 4200, 448, 128, False, True), (300, 259, 1536, 512, True, False)]
    cases += [(77, 300, 4096, 2048, True, True), (1100, 4136, 256, 64, True, False), (600, 9557, 256, 64, True, True)]
    # split-K: 65 k steps in unequal parts and an odd N; 4 parts; 2 parts of 8 steps; 32-token tiles in 8 parts
    cases += [(100, 1001, 4160, 64, True, True), (256, 4096, 4096, 64, True, False)]
    cases += [(40, 2000, 1024, 256, False, True), (20, 1000, 4160, 64, True, False)]
    for i, (M, N, K, bs, nested, bias) in enumerate(cases):
        qt = "nf4" if i % 2 else "fp4"
        _gemv_case(ops, device, (M,), N, K, bs, qt, nested, dtype, seed=470 + i, direct=True, with_bias=bias)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemm_trans(hopper_native, dtype):
    """The transposed fused GEMM, G (M, N) @ W (a linear layer's input gradient), against float64 with a bound
    per output: W's rows not filling the last 64-row step (N = 1000, 4104), a partial last 128-column tile (K =
    4160), several token tiles, split-K over W's rows, the tensor store (384 tiles), 32-token tiles, blocks of 64
    to 4096, NF4/FP4, plain and double quant, with and without a bias (one per column of W)."""
    ops, device = hopper_native
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    # (M, N, K, blocksize, quant type, nested, bias)
    cases = [(300, 1000, 4160, 64, "nf4", True, True), (64, 14336, 4096, 64, "nf4", True, False)]
    cases += [(3000, 2048, 4096, 128, "fp4", False, True), (20, 2048, 2048, 256, "nf4", True, False)]
    cases += [(777, 4104, 1024, 4096, "nf4", False, True), (1, 64, 64, 64, "fp4", True, False)]
    cases += [(100, 2048, 4096, 64, "nf4", True, True)]  # 128-token tiles
    cases += [(600, 1000, 8192, 128, "fp4", True, True)]  # a partial last step without split-K (192 tiles)
    for i, (M, N, K, bs, qt, nested, with_bias) in enumerate(cases):
        g = _gen(520 + i)
        state, W32 = _quantized_weight(N, K, bs, qt, nested, g)
        G = torch.randn(M, N, generator=g).to(dtype)
        bias = (torch.randn(K, generator=g) * math.sqrt(N)).to(dtype) if with_bias else None
        _poison(M * K, dtype, device)
        code = get_4bit_code(qt).float().cpu()
        out = ops.ext.gemm_4bit(to(G), *(to(t) for t in state), bs, 256, code, N, K, to(bias), True)
        assert out.shape == (M, K) and out.dtype == dtype and not out.isnan().any(), (M, N, K)
        _assert_within_gemm_bound(out, G, W32.T, bias)
    with pytest.raises(ValueError, match="does not support"):  # G's rows must be 16-byte multiples
        state, _ = _quantized_weight(60, 64, 64, "nf4", False, _gen(530))
        ops.ext.gemm_4bit(
            to(torch.zeros(16, 60, dtype=dtype)), *(to(t) for t in state), 64, 256, code, 60, 64, None, True
        )


def test_matmul_4bit_backward_takes_gemm(hopper_native):
    """The input gradient of matmul_4bit at 24 tokens of a 4096 x 4096 layer runs the transposed fused GEMM (no
    dequantize kernel) and matches float64, eager and compiled (the same bits); a layer whose N is not a multiple
    of 8 dequantizes instead; with create_graph=True the input gradient keeps its graph."""
    import fsdp4bit
    from fsdp4bit.functional import dequantize_4bit, quantize_4bit

    ops, device = hopper_native
    for N, fused in ((4096, True), (_gemm_min_rows() + 5, False)):
        K = 4096
        W = torch.randn(N, K, generator=_gen(540)).to(device=device, dtype=torch.bfloat16)
        packed, state = quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
        Wd = dequantize_4bit(packed, state).double()
        A = torch.randn(2, 12, K, generator=_gen(541)).to(device=device, dtype=torch.bfloat16).requires_grad_()
        grad_out = torch.randn(2, 12, N, generator=_gen(542)).to(device=device, dtype=torch.bfloat16)
        assert ops.gemm_applies(grad_out, 64, (N, K), trans=True) == fused
        out = fsdp4bit.matmul_4bit(A, packed, state)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            out.backward(grad_out)
            torch.cuda.synchronize()
        names = [e.name for e in prof.events()]
        assert any("gemm_4bit_kernel" in n for n in names) == fused, N
        assert any("dequantize" in n for n in names) != fused, N
        grad_ref = grad_out.double() @ Wd
        err = ((A.grad.double() - grad_ref).norm() / grad_ref.norm()).item()
        assert A.grad.shape == A.shape and err < GEMV_RTOL[torch.bfloat16], err
        # compiled (fullgraph), the backward's input_grad_4bit operator runs the same kernels: the eager bits
        x = A.detach().requires_grad_()
        compiled = torch.compile(lambda t, p=packed, s=state: fsdp4bit.matmul_4bit(t, p, s), fullgraph=True)
        out = compiled(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            out.backward(grad_out)
            torch.cuda.synchronize()
        assert any("gemm_4bit_kernel" in e.name for e in prof.events()) == fused, N
        assert torch.equal(x.grad, A.grad), N
        # backward(create_graph=True): the input gradient stays differentiable in grad_out (d/dg of g @ W is W)
        g = grad_out.clone().requires_grad_()
        (grad_x,) = torch.autograd.grad(fsdp4bit.matmul_4bit(A, packed, state), A, g, create_graph=True)
        assert grad_x.requires_grad
        h = torch.randn(2, 12, K, generator=_gen(543)).to(device=device, dtype=torch.bfloat16)
        grad_x.backward(h)
        ref = h.double() @ Wd.T
        assert ((g.grad.double() - ref).norm() / ref.norm()).item() < GEMV_RTOL[torch.bfloat16]


@pytest.mark.parametrize("rows", [(4,), (2, 12), (64,), (3, 700)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matmul_autograd_node_matches_the_function(cuda_native, rows, dtype):
    """Eager matmul_4bit recording autograd on CUDA is one C++ autograd node (the operator's AutogradCUDA kernel): its
    output and its input and bias gradients equal those of the Python autograd.Function it replaced
    (ops._Matmul4bitFunction, which the reference path still takes, and which on CUDA calls the extension's same
    forward and input-gradient routes) bit for bit on every route (gemv for 4 rows; on sm_90a the fused GEMM and its
    transposed backward for 24 and 64 rows; dequantize + cuBLAS for 2100), with a float32 bias on 16-bit A and a
    non-contiguous gradient."""
    import fsdp4bit
    from fsdp4bit import ops as fops
    from fsdp4bit.functional import packed_bytes, quantize_4bit

    ops, device = cuda_native
    N = K = 4096
    W = torch.randn(N, K, generator=_gen(560)).to(device=device, dtype=dtype)
    packed, state = quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    op_args = (packed_bytes(packed), *state.absmax_tensors(), 64, state.state2.blocksize, "nf4", [N, K])
    A = torch.randn(*rows, K, generator=_gen(561)).to(device=device, dtype=dtype)
    bias = torch.randn(N, generator=_gen(562)).to(device)
    grad = torch.randn(*rows, 2 * N, generator=_gen(563)).to(device=device, dtype=dtype)[..., ::2]
    assert not grad.is_contiguous()
    results = []
    for run in ("node", "function"):
        a, b = A.clone().requires_grad_(), bias.clone().requires_grad_()
        if run == "node":
            out = fsdp4bit.matmul_4bit(a, packed, state, bias=b)
            node = out.grad_fn.name()
            assert "CppNode" in node and "Matmul4bitFunction" in node, node
        else:
            out = fops._Matmul4bitFunction.apply(a, b, *op_args)
        out.backward(grad)
        results.append((out.detach(), a.grad, b.grad))
    for x, y in zip(*results, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.view(torch.uint8), y.view(torch.uint8))
    assert results[0][2].dtype == torch.float32


def test_gemm_reads_the_kernel_before(hopper_native):
    """The fused GEMM starts while its block-scale kernel runs (a programmatic dependent launch) and reads A then:
    an A that the kernel just before computes is read whole, in a chain of calls whose inputs and outputs feed
    each other."""
    from fsdp4bit.functional import dequantize_4bit, quantize_4bit

    ops, device = hopper_native
    N = K = 4096
    W = torch.randn(N, K, generator=_gen(490)).to(device=device, dtype=torch.bfloat16)
    packed, state = quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    args = (packed, *state.absmax_tensors(), 64, 256, "nf4", (N, K))
    Wd = dequantize_4bit(packed, state).double()
    assert ops.gemm_applies(torch.empty(24, K, dtype=torch.bfloat16, device=device), 64, (N, K))
    x = torch.randn(24, K, generator=_gen(491)).to(device=device, dtype=torch.bfloat16)
    inputs, outputs = [], []
    for i in range(6):
        a = (x * (i + 1) + 0.5).to(torch.bfloat16)  # written by the kernel right before the GEMM's
        out = ops.gemv_4bit(a, *args)
        inputs.append(a)
        outputs.append(out)
        x = out / out.abs().amax()  # the next input comes from this output
    torch.cuda.synchronize()
    for a, out in zip(inputs, outputs, strict=True):
        ref = a.double() @ Wd.T
        assert ((out.double() - ref).norm() / ref.norm()).item() < GEMV_RTOL[torch.bfloat16]


def test_gemm_dispatch(hopper_native):
    """What the fused GEMM leaves to other paths: 8 rows or fewer (gemv); more than 1536 rows, or 513 to 1536 rows
    whose tiles fill their waves of SMs less than 85%, whose tokens fill their 256-token tiles less than 80% (95% past
    768 rows) or whose weight is under 2^24 entries (dequantize + cuBLAS, faster there); up to 512 rows, weights
    under 2^22 entries (2^23 past 32 rows, 2^24 past 128, 2^25 past 256), however many tiles; K % 64 != 0, blocks
    of 32, float32."""
    ops, device = hopper_native
    N = _gemm_min_rows()
    A = lambda rows, K=2048, dtype=torch.bfloat16: torch.empty(rows, K, dtype=dtype, device=device)  # noqa: E731
    assert ops.gemm_applies(A(9), 64, (N, 2048)) and ops.gemm_applies(A(512, 4096), 64, (N, 4096))
    assert not ops.gemm_applies(A(8), 64, (N, 2048))
    # 513 to 1536 rows: 256-token tiles (or split-K parts) filling their waves of SMs to 85%, tokens filling their
    # tiles to 80% (95% past 768 rows), 2^24 entries or more
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wide = (128 * sms, 2048)  # sms tiles of W rows: each token tile fills one wave
    assert ops.gemm_applies(A(1024, 2048), 64, wide) and ops.gemm_applies(A(1536, 2048), 64, wide)
    assert ops.gemm_applies(A(640, 2048), 64, wide) and ops.gemm_applies(A(1000, 2048), 64, wide)
    assert not ops.gemm_applies(A(513, 2048), 64, wide) and not ops.gemm_applies(A(600, 2048), 64, wide)
    assert not ops.gemm_applies(A(800, 2048), 64, wide) and not ops.gemm_applies(A(1300, 2048), 64, wide)
    assert not ops.gemm_applies(A(1537, 2048), 64, wide)
    assert not ops.gemm_applies(A(1024, 512), 64, (128 * sms, 512))  # under 2^24 entries
    assert not ops.gemm_applies(A(1024, 2048), 64, (128 * (sms // 4 + 1), 2048))  # sms + 4 tiles: 2 waves, half full
    assert not ops.gemm_applies(A(1024, 128 * sms), 64, (2048, 128 * sms), trans=True)  # transposed: 512 rows at most
    layers = [(640, 11008, 4096), (768, 14336, 4096), (1024, 14336, 4096), (1024, 5120, 5120), (1536, 5120, 5120)]
    for M, n, K in layers:
        units = math.ceil(M / 256) * math.ceil(n / 128)
        fill = units / (math.ceil(units / sms) * sms)
        assert ops.gemm_applies(A(M, K), 64, (n, K)) == (fill >= 0.85), (M, n, K, fill)
    assert ops.gemm_applies(A(64), 64, (N - 128, 2048))  # fewer tiles than 3/4 of the SMs: taken all the same
    # enough tiles, but too small a weight: 2^23 entries up to 128 rows, 2^24 up to 256, 2^25 past that
    assert not ops.gemm_applies(A(64, 512), 64, (N, 512)) and ops.gemm_applies(A(64, 1024), 64, (N, 1024))
    assert not ops.gemm_applies(A(300, 2048), 64, (N, 2048)) and ops.gemm_applies(A(200, 2048), 64, (N, 2048))
    assert ops.gemm_applies(A(300, 8192), 64, (N // 2, 8192))  # two tiles of tokens fill the GPU with half the rows
    assert not ops.gemm_applies(A(64, 2080), 64, (N, 2080))  # K % 64 != 0
    assert not ops.gemm_applies(A(64), 32, (N, 2048))
    assert not ops.gemm_applies(A(64, dtype=torch.float32), 64, (N, 2048))
    # an empty weight is no GEMM (the extension's own rule too: it once divided by its 0 tiles)
    assert not ops.gemm_applies(A(16, 4096), 64, (0, 4096))
    assert not ops.ext.gemm_4bit_applies("bfloat16", 64, 16, 0, 4096, torch.cuda.current_device())
    # few tiles (K split into up to slots // tiles parts where it is long enough) or not, up to 512 rows the weight's
    # size decides: the layers of session 18's sweep whose work units fill under 3/4 of an H100's SMs, and more
    assert ops.gemm_applies(A(256, 4096), 64, (4096, 4096))  # 32 tiles x 4 parts on an H100
    shapes = [(64, 6144, 4096), (256, 6144, 4096), (64, 11008, 4096), (128, 11008, 4096), (100, 6000, 4096)]
    shapes += [(16, 4096, 14336), (512, 4096, 14336), (128, 2048, 8192), (64, 1024, 16384), (128, 9000, 1024)]
    for M, n, K in shapes:
        assert ops.gemm_applies(A(M, K), 64, (n, K)), (M, n, K)
    assert ops.gemm_applies(A(128, 4096), 64, (4096, 6144), trans=True)  # 48 tiles of the output, 2 parts
    assert ops.gemm_applies(A(256, 4096), 64, (4096, 11008), trans=True)  # 86 tiles of the output, 1 part
    assert not ops.gemm_applies(A(128, 4096), 64, (1024, 4096))  # 2^22 entries: up to 32 rows only
    assert ops.gemm_applies(A(32, 4096), 64, (1024, 4096)) and ops.gemm_applies(A(9, 1024), 64, (4096, 1024))
    assert not ops.gemm_applies(A(33, 4096), 64, (1024, 4096))
    assert not ops.gemm_applies(A(16, 3072), 64, (1024, 3072))  # 3 M entries
    assert not ops.gemm_applies(A(256, 8192), 64, (1024, 8192))  # 2^23 entries past 128 rows
    packed = torch.zeros(N * 96 // 2, dtype=torch.uint8, device=device)
    absmax = torch.ones(N * 96 // 64, device=device)
    with pytest.raises(ValueError, match="does not support"):
        ops.ext.gemm_4bit(A(64, 96), packed, absmax, None, None, None, 64, 256, get_4bit_code("nf4"), N, 96)
    # transposed (input gradients, A of N columns): 2^24 entries up to 256 rows, 2^25 past that; N % 8 == 0
    assert ops.gemm_applies(A(24, 4096), 64, (4096, 4096), trans=True)
    assert not ops.gemm_applies(A(24, 2048), 64, (2048, 4096), trans=True)
    assert not ops.gemm_applies(A(512, 4096), 64, (4096, 4096), trans=True)
    assert ops.gemm_applies(A(512, 14336), 64, (14336, 4096), trans=True)
    assert not ops.gemm_applies(A(24, 4100), 64, (4100, 4096), trans=True)
    assert not ops.gemm_applies(A(24, 4096), 64, (4096 + 64, 4096), trans=True)  # A's columns must be N


def test_gemm_fresh_thread(hopper_native):
    """The fused GEMM from a thread that has made no CUDA call yet (its driver context not current there; the
    tensor-map encoding once failed so in autograd's backward thread) gives the main thread's bits."""
    import threading

    import fsdp4bit
    from fsdp4bit.functional import quantize_4bit

    ops, device = hopper_native
    W = torch.randn(4096, 4096, generator=_gen(550)).to(device=device, dtype=torch.bfloat16)
    packed, state = quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    A = torch.randn(24, 4096, generator=_gen(551)).to(device=device, dtype=torch.bfloat16)
    assert ops.gemm_applies(A, 64, (4096, 4096))
    got = {}
    thread = threading.Thread(target=lambda: got.update(out=fsdp4bit.matmul_4bit(A, packed, state)))
    thread.start()
    thread.join()
    assert "out" in got and torch.equal(got["out"], fsdp4bit.matmul_4bit(A, packed, state))


@pytest.mark.parametrize("tokens", [(2, 12), (4, 256)])
def test_matmul_4bit_takes_gemm(hopper_native, tokens):
    """fsdp4bit.matmul_4bit with 24 tokens (past the gemv's 16), and with 1024 on a layer whose tiles fill whole
    waves of SMs, with a bias runs the fused GEMM kernel and matches dequantize + F.linear."""
    import fsdp4bit
    from fsdp4bit.functional import dequantize_4bit, quantize_4bit

    _, device = hopper_native
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    N, K = (_gemm_min_rows() + 5 if tokens == (2, 12) else 128 * sms), 2048
    W = torch.randn(N, K, generator=_gen(450)).to(device=device, dtype=torch.bfloat16)
    packed, state = quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    A = torch.randn(*tokens, K, generator=_gen(451)).to(device=device, dtype=torch.bfloat16)
    bias = torch.randn(N, generator=_gen(452)).to(device=device, dtype=torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = fsdp4bit.matmul_4bit(A, packed, state, bias=bias)
        torch.cuda.synchronize()
    assert any("gemm_4bit_kernel" in e.name for e in prof.events()), "the fused GEMM did not run"
    Wd = dequantize_4bit(packed, state)
    ref = A.double() @ Wd.double().T + bias.double()
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert out.shape == (*tokens, N) and out.dtype == torch.bfloat16 and err < GEMV_RTOL[torch.bfloat16], err


def test_matmul_4bit_gemm_public(hopper_native):
    """The public matmul_4bit at a GEMM-sized layer: a strided (non-contiguous) A still takes the fused GEMM (on
    a packed copy), its gradient matches float64, and torch.compile(fullgraph=True) with CUDA graphs
    ("reduce-overhead") gives the eager bits on new inputs."""
    import fsdp4bit
    from fsdp4bit.functional import dequantize_4bit, quantize_4bit

    _, device = hopper_native
    N, K = _gemm_min_rows() + 5, 2048
    W = torch.randn(N, K, generator=_gen(480)).to(device=device, dtype=torch.bfloat16)
    packed, state = quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    Wd = dequantize_4bit(packed, state).double()
    wide = torch.randn(40, 2 * K, generator=_gen(481)).to(device=device, dtype=torch.bfloat16)
    A = wide[:, ::2].detach().requires_grad_()
    assert not A.is_contiguous()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out = fsdp4bit.matmul_4bit(A, packed, state)
        torch.cuda.synchronize()
    assert any("gemm_4bit_kernel" in e.name for e in prof.events()), "the fused GEMM did not run"
    ref = A.detach().double() @ Wd.T
    assert ((out.double() - ref).norm() / ref.norm()).item() < GEMV_RTOL[torch.bfloat16]
    grad_out = torch.randn(40, N, generator=_gen(482)).to(device=device, dtype=torch.bfloat16)
    out.backward(grad_out)
    grad_ref = grad_out.double() @ Wd
    assert ((A.grad.double() - grad_ref).norm() / grad_ref.norm()).item() < GEMV_RTOL[torch.bfloat16]

    compiled = torch.compile(lambda x: fsdp4bit.matmul_4bit(x, packed, state), fullgraph=True, mode="reduce-overhead")
    for seed in range(483, 486):
        x = torch.randn(3, 40, K, generator=_gen(seed)).to(device=device, dtype=torch.bfloat16)
        got = compiled(x).clone()
        assert torch.equal(got, fsdp4bit.matmul_4bit(x, packed, state)), seed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_pair_table_path(cuda_native, dtype):
    """1 token of fp16/bf16 that the row kernels do not take (rows ending inside a block, blocks past 1024
    weights) takes the pair-table kernel: more row steps than CTAs with a ragged last step, a
    partial last k-tile, few rows split over k-parts; and a K past its shared memory (CUDA-core fallback)."""
    ops, device = cuda_native
    cases = [(4805, 4160, "nf4", True, 128), (4805, 4160, "fp4", False, 256), (7, 14336, "nf4", True, 4096)]
    cases += [(500, 992, "nf4", True, 64), (33, 4096, "nf4", True, 2048)]
    _gemv_path_cases(ops, device, dtype, cases, "pair_table", seed=200)
    _gemv_path_cases(ops, device, dtype, [(3, 131072, "nf4", True, 64)], "cuda_core", seed=210)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_row_path(cuda_native, dtype):
    """1 token of fp16/bf16 with K up to 4096 and whole blocks of <= 1024 weights per row takes the register row
    kernel (a warp per row, a in registers as scaled half2, D = K / 1024 rounded up chunk rounds), except rows of
    4 rounds with at most 4 per group of 2 warps (the split kernel's): every D, more rows than warps, lanes past K
    in the last round, FP4 and plain absmax, every blocksize it takes, and a at magnitudes far outside half
    precision (the kernel rescales a by a power of two)."""
    ops, device = cuda_native
    many = 32 * _sms() + 1  # rows of 4 rounds: more than 4 per group of 2 warps, else the split kernel takes them
    cases = [(many, 4096, "nf4", True, 64), (many + 4, 3136, "fp4", False, 64), (many + 2, 3584, "nf4", True, 512)]
    cases += [(many, 4096, "fp4", True, 1024), (many + 6, 3104, "nf4", True, 32), (1000, 1024, "nf4", True, 64)]
    cases += [(999, 2048, "fp4", False, 128), (500, 2080, "nf4", True, 32), (3000, 3072, "nf4", True, 256)]
    cases += [(2500, 576, "nf4", True, 64), (17, 96, "fp4", False, 32), (5, 3072, "nf4", True, 32)]
    _gemv_path_cases(ops, device, dtype, cases, "row", seed=300)
    # fp16: |a| up to ~400 keeps the 4096-term outputs (std ~ 64 |a|) inside half precision's range; 300 rows of
    # 3072 take this kernel, of 4096 the split one
    big, small = (1e30, 1e-30) if dtype == torch.bfloat16 else (1e2, 1e-3)
    for i, (mag, K) in enumerate([(big, 3072), (small, 3072), (big, 4096), (small, 4096)]):
        _gemv_case(ops, device, (1,), 300, K, 64, "nf4", True, dtype, seed=310 + i, a_scale=mag)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_row_split_path(cuda_native, dtype):
    """1 token of fp16/bf16 with K in (4096, 32768], or of 4 rounds with at most 4 rows per group of 2 warps, takes
    the split register row kernel: each row's 32-value chunks dealt out to 2, 4 or 8 parts of at most 4 rounds of
    1024 values (parts that end mid-round and start on an odd chunk: 4160 in 65 + 65 chunks, 4128 in 65 + 64, 8256 in
    65, 65, 64, 64, 11008 in 4 x 86, 14336 in 4 x 112), or its whole rounds to parts of at most 2 (14336 in 8 parts:
    2, 2, 2, 2, 2, 2, 1, 1 rounds; 7200 ends one chunk into its last round, 3104 is 64 + 33 chunks), each part's sum
    added in order at the CTA's end. Every part count, rows that do
    not divide evenly among the groups, every blocksize it takes, with and without double quant; 8 parts of a
    K % 1024 == 0 with about as many rows as warps (the streaming kernel took those before); twice the parts,
    of at most 2 rounds, for rows of 7 or 8 rounds (in 4 parts) and 13 to 16 (in 8) while there are at most 8 rows
    per group (7200 and 6176 end one chunk into their last round, 12320 one chunk into its 13th), and the usual
    parts past that; 2 parts of 2 rounds for rows of 4 rounds, up to 32 x SMs of them; a handful of rows. Each row
    order: contiguous shares per CTA (parts of 4 rounds: a row more than the SMs, a few rows per CTA, 3 rows on 2
    CTAs), interleaved groups (parts of 2 rounds) and bands, and the launcher's switch between those two (bands at
    one row per group of a full wave, interleaved one row past it)."""
    ops, device = cuda_native
    cases = [(4805, 8192, "nf4", True, 64), (4500, 5120, "fp4", False, 128), (1400, 32768, "nf4", True, 64)]
    cases += [(4805, 7168, "nf4", True, 256), (2300, 16384, "fp4", False, 128), (1045, 18944, "fp4", False, 64)]
    cases += [(4805, 11008, "nf4", True, 256), (2301, 13824, "nf4", True, 256), (6000, 12800, "nf4", False, 64)]
    cases += [(4805, 4160, "nf4", True, 64), (9000, 4160, "fp4", False, 32), (20000, 8192, "nf4", True, 1024)]
    cases += [(4805, 4128, "nf4", True, 32), (2500, 8256, "fp4", True, 64), (4805, 14336, "nf4", True, 1024)]
    cases += [(16 * _sms() + 1, 17408, "nf4", True, 64), (1024, 7200, "fp4", True, 32), (1500, 6176, "nf4", True, 32)]
    cases += [(8 * 4 * _sms() + 1, 8192, "nf4", True, 64), (8 * 2 * _sms(), 14336, "fp4", False, 64)]
    cases += [(16 * _sms(), 20480, "fp4", True, 128), (16 * _sms() - 50, 24576, "nf4", True, 64)]
    cases += [(_sms() + 1, 26624, "nf4", True, 64), (2 * _sms() + 3, 28672, "fp4", False, 128)]
    cases += [(8 * _sms(), 4096, "nf4", True, 64), (8 * _sms() + 1, 4096, "fp4", True, 64)]
    cases += [(3, 12320, "nf4", True, 32), (130, 11008, "fp4", True, 32), (200, 4160, "fp4", False, 32)]
    cases += [(3, 28672, "nf4", True, 64), (256, 16384, "nf4", True, 128), (128, 8192, "fp4", False, 256)]
    cases += [(32 * _sms(), 4096, "nf4", True, 64), (301, 4096, "fp4", True, 1024), (77, 3584, "nf4", True, 512)]
    cases += [(5, 3104, "nf4", True, 32), (1000, 3136, "fp4", False, 64)]
    _gemv_path_cases(ops, device, dtype, cases, "row_split", seed=340)
    # no rows: the rule still answers (it once sized a grid for them: a division by zero in the process)
    for K in (4096, 8192):
        assert _cuda_gemv_kernel(ops, dtype, 0, K, 64, True) in {"row", "row_stream", "pair_table"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_row_stream_path(cuda_native, dtype):
    """1 token of fp16/bf16 with K past 32768, whole blocks of <= 1024 weights per row, takes the streaming row kernel
    (a in shared memory, each lane's chunks one stream across row ends): rows ending mid-group of chunks (34 and 38
    rounds), lanes past K in the last round, more rows than warps and fewer, every blocksize it takes, with and
    without double quant; blocks past 1024 weights take the pair-table kernel."""
    ops, device = cuda_native
    cases = [(301, 36864, "nf4", True, 1024), (77, 33824, "fp4", False, 32), (130, 37952, "nf4", True, 64)]
    cases += [(16 * _sms() + 7, 33792, "fp4", True, 128), (2 * _sms() - 5, 40960, "nf4", True, 64)]
    _gemv_path_cases(ops, device, dtype, cases, "row_stream", seed=380)
    _gemv_path_cases(ops, device, dtype, [(64, 9216, "nf4", True, 2048)], "pair_table", seed=360)


@pytest.mark.parametrize(
    ("N", "K"),
    [(8192, 4096), (8192, 8192), (130, 32832), (992, 992)],
    ids=["row", "row-split", "row-stream", "pair-table"],
)
def test_gemv_chain_reads_the_kernel_before(cuda_native, N, K):
    """1-token gemvs are programmatic dependent launches on sm_90: each may start while the kernel before it
    runs, so what it reads must still be that kernel's finished output. A chain on one stream where every gemv
    reads the gemv before (an (N, K) weight, then a (K, N) one, alternating), and the last one reads weights
    quantized by the kernels just before it, eagerly and replayed from a CUDA graph with new inputs and new weights
    each time, matches the float64 product of each step's actual input and weight."""
    from fsdp4bit import functional as F

    ops, device = cuda_native
    expected = {4096: "row", 8192: "row_split", 32832: "row_stream", 992: "pair_table"}[K]
    assert _cuda_gemv_kernel(ops, torch.bfloat16, N, K, 64, True) == expected
    g = _gen(330 + K)
    quant = dict(blocksize=64, compress_statistics=True, quant_type="nf4")
    states = [F.quantize_4bit(torch.randn(N, K, generator=g).to(device, torch.bfloat16) / math.sqrt(K), **quant)]
    states.append(F.quantize_4bit(torch.randn(K, N, generator=g).to(device, torch.bfloat16) / math.sqrt(N), **quant))
    dense = [F.dequantize_4bit(p, s).double().cpu() for p, s in states]
    fresh = torch.randn(N, K, generator=g).to(device, torch.bfloat16) / math.sqrt(K)
    a0 = torch.randn(1, K, generator=g).to(device, torch.bfloat16)

    def chain(a: torch.Tensor) -> tuple[list[torch.Tensor], tuple]:
        outs = [a]
        for step in range(12):
            packed, state = states[step % 2]
            outs.append(F.gemv_4bit(outs[-1], packed.t(), state=state))
        packed, state = F.quantize_4bit(fresh, **quant)
        outs.append(F.gemv_4bit(outs[-1], packed.t(), state=state))
        return outs, (packed, state)

    def check(outs: list[torch.Tensor], last: tuple) -> None:
        weights = [*(dense[step % 2] for step in range(12)), F.dequantize_4bit(*last).double().cpu()]
        for step, (a, out, w) in enumerate(zip(outs[:-1], outs[1:], weights, strict=True)):
            ref = a.double().cpu() @ w.T
            err = ((out.double().cpu() - ref).norm() / ref.norm()).item()
            assert err < GEMV_RTOL[torch.bfloat16], f"step {step}: relative error {err:.2e}"

    check(*chain(a0))
    static_a = a0.clone()
    chain(static_a)  # warm-up before capture (allocations, extension state)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs, last = chain(static_a)
    for seed in (1, 2):
        static_a.copy_(torch.randn(1, K, generator=_gen(seed)).to(device, torch.bfloat16))
        fresh.copy_(torch.randn(N, K, generator=_gen(seed + 10)).to(device, torch.bfloat16) / math.sqrt(K))
        graph.replay()
        torch.cuda.synchronize()
        check(outs, last)


def test_double_quant_chain_reads_the_kernel_before(cuda_native):
    """On sm_90 double quant's kernels are programmatic dependent launches: the tree's first level is resident
    and waiting while the 4-bit quantize kernel still runs, and each later kernel waits for the one before. A
    large weight (2058 bulk tiles and a partial one, a tree level of 65 spans) quantized eagerly, then twice
    more replayed from a CUDA graph with new weights, gets the CPU's packed bytes, absmax, offset and nested
    absmax."""
    from fsdp4bit import functional

    _, device = cuda_native
    quant = dict(blocksize=64, quant_type="nf4", compress_statistics=True)
    shape = (4100, 4112)

    def check(packed: torch.Tensor, state, w: torch.Tensor) -> None:
        _assert_same_double_quant(packed, state, *functional.quantize_4bit(w, **quant))

    w = torch.randn(shape, generator=_gen(23)).to(torch.bfloat16)
    static_w = w.to(device)
    check(*functional.quantize_4bit(static_w, **quant), w)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        packed, state = functional.quantize_4bit(static_w, **quant)
    for seed in (1, 2):
        w = (torch.randn(shape, generator=_gen(seed)) * 3 * seed).to(torch.bfloat16)
        static_w.copy_(w.to(device))
        graph.replay()
        torch.cuda.synchronize()
        check(packed, state, w)


def _sass_functions(library: str) -> list[tuple[str, str]]:
    """(mangled name, SASS) of every kernel in a built extension, one entry per compiled architecture (cuobjdump of
    the CUDA toolkit that built it)."""
    from torch.utils import cpp_extension

    tool = Path(cpp_extension.CUDA_HOME or "", "bin", "cuobjdump")
    if not tool.exists():
        pytest.skip(f"no cuobjdump beside the nvcc that built the extension ({tool})")
    sass = subprocess.run([str(tool), "-sass", library], capture_output=True, text=True, check=True).stdout
    parts = re.split(r"^\s*Function : (\S+)\s*$", sass, flags=re.MULTILINE)
    return list(zip(parts[1::2], parts[2::2], strict=True))


def test_pdl_kernels_read_nothing_before_the_wait(cuda_native):
    """A programmatic dependent launch may run while the kernel before it still writes, so nothing it reads from
    global memory may be loaded before griddepcontrol.wait (SASS ACQBULK). The compiler may move a non-coherent
    load (__ldg, SASS LDG...CONSTANT) above the wait, as it did with the split row gemv's scale loads; the
    kernels read what an earlier kernel may write with ld.global.ca instead. Checked in the built extension."""
    ops, _ = cuda_native
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("programmatic dependent launches are compiled in from compute capability 9.0")
    waiting = [(name, body) for name, body in _sass_functions(ops.ext.__file__) if "ACQBULK" in body]
    assert any("gemv_row_kernel" in name for name, _ in waiting), "no row gemv waits: is PDL compiled in?"
    early = {name for name, body in waiting if re.search(r"\bLDG\S*\.CONSTANT\b", body.split("ACQBULK")[0])}
    assert not early, f"non-coherent loads before griddepcontrol.wait in {len(early)} kernels: {sorted(early)[:4]}"


@pytest.mark.parametrize("K", [3072, 4096, 8192])
def test_gemv_row_path_nan_input(cuda_native, K):
    """A NaN in a reaches every output row, as in the float64 reference (the row kernel at 3072, the split kernel at
    4096 and 8192)."""
    ops, device = cuda_native
    W = torch.randn(64, K, generator=_gen(320))
    packed, absmax = reference.quantize_4bit(W, 64, "nf4")
    A = torch.randn(1, K, generator=_gen(321)).to(torch.bfloat16)
    A[0, 1234] = float("nan")
    out = ops.gemv_4bit(A.to(device), packed.to(device), absmax.to(device), None, None, None, 64, 256, "nf4", (64, K))
    assert out.isnan().all()


def test_gemv_every_blocksize(native):
    ops, device = native
    for bs in BLOCKSIZES:
        _gemv_case(ops, device, (1,), 24, 4096, bs, "nf4", True, torch.bfloat16, seed=bs)


def test_ops_dispatch_to_native(native, monkeypatch):
    """fsdp4bit.ops routes to the native kernels and agrees with the forced-reference path."""
    from fsdp4bit import ops as fops

    _, device = native
    assert kernels.backend_name(device) == f"native-{device.type}"
    x = torch.randn(1000, generator=_gen(9)).to(device, torch.float16)
    native_out = fops.quantize_4bit(x, 64, "fp4")
    monkeypatch.setenv("FSDP4BIT_NO_NATIVE", "1")
    assert kernels.native_for(device) is None and kernels.backend_name(device) == "reference"
    ref_out = fops.quantize_4bit(x, 64, "fp4")
    assert torch.equal(native_out[0], ref_out[0]) and _same_float_bits(native_out[1], ref_out[1])


def test_bad_arguments(native):
    ops, device = native
    x = torch.randn(64, device=device)
    with pytest.raises(ValueError, match="blocksize"):
        ops.quantize_4bit(x, 48, "nf4")
    with pytest.raises(ValueError, match="quant_type"):
        ops.quantize_4bit(x, 64, "int4")
    with pytest.raises(ValueError, match="A.dtype"):
        ops.quantize_4bit(x.to(torch.int32), 64, "nf4")
    packed, absmax, _ = ops.quantize_4bit(x, 64, "nf4")
    with pytest.raises(ValueError, match="dtype"):
        ops.dequantize_4bit(packed, absmax, None, None, None, 64, 256, "nf4", (64,), torch.int8)
    with pytest.raises(ValueError, match="packed has"):
        ops.dequantize_4bit(packed[:10], absmax, None, None, None, 64, 256, "nf4", (64,), torch.float32)
    with pytest.raises(ValueError, match="absmax"):
        ops.dequantize_4bit(packed, absmax[:0], None, None, None, 64, 256, "nf4", (64,), torch.float32)
    with pytest.raises(TypeError, match="absmax"):
        ops.dequantize_4bit(packed, absmax.half(), None, None, None, 64, 256, "nf4", (64,), torch.float32)
    with pytest.raises(ValueError, match="K"):
        ops.gemv_4bit(torch.randn(1, 63, device=device), packed, absmax, None, None, None, 64, 256, "nf4", (1, 64))


def test_no_native_env_forces_reference(monkeypatch):
    monkeypatch.setenv("FSDP4BIT_NO_NATIVE", "1")
    for device in _DEVICES + ["meta"]:
        assert kernels.native_for(device) is None
        assert kernels.backend_name(device) == "reference"


def test_meta_has_no_native(monkeypatch):
    monkeypatch.delenv("FSDP4BIT_NO_NATIVE", raising=False)
    assert kernels.native_for("meta") is None


# ------------------------------------------------------------------------------------------- 8-bit blockwise
def _blockwise_inputs(n: int, seed: int) -> list[torch.Tensor]:
    """float32 absmax-like inputs: positive, signed, ties on the dynamic map's midpoints, specials."""
    g = _gen(seed)
    code = get_dynamic_map()
    mids = (code[:-1] + code[1:]) / 2
    on_mid = mids[torch.randint(0, 255, (n,), generator=g)] * 2.0
    on_mid[::256] = 2.0  # each full block's absmax is 2: exact products land on the midpoints
    nudged = torch.nextafter(on_mid, on_mid + torch.randint(-1, 2, (n,), generator=g).float())
    special = torch.rand(n, generator=g)
    special[torch.rand(n, generator=g) < 0.03] = float("nan")
    special[torch.rand(n, generator=g) < 0.03] = float("inf")
    return [
        torch.rand(n, generator=g) * 0.1 + 0.01,
        torch.randn(n, generator=g),
        torch.zeros(n),
        on_mid,
        nudged,
        special,
        torch.randn(n, generator=g) * 3e38,
        torch.randn(n, generator=g) * 1e-40,
    ]


def _offsets(x: torch.Tensor) -> list[torch.Tensor | None]:
    return [None, x.mean(), torch.tensor(0.25), torch.tensor(float("nan"))]


@pytest.mark.parametrize("blocksize", [256, 64, 4096, 7])
def test_quantize_blockwise_bit_exact(native, blocksize):
    """The fused kernel equals reference.quantize_blockwise(A - offset, code, blocksize) bit for bit."""
    ops, device = native
    code = get_dynamic_map().to(device)
    for n in (1, 5, 255, 256, 257, blocksize, 3 * blocksize + 1, 3584 + 77):
        for i, x in enumerate(_blockwise_inputs(n, seed=n + blocksize)):
            for offset in _offsets(x):
                xd = x.to(device)
                od = None if offset is None else offset.to(device)
                q, absmax = ops.quantize_blockwise(xd, code, blocksize, od)
                ref_q, ref_absmax = reference.quantize_blockwise(xd if od is None else xd - od, code, blocksize)
                where = f"n={n} case={i} offset={None if offset is None else offset.item()}"
                assert q.dtype == torch.uint8 and q.shape == (n,), where
                assert torch.equal(q, ref_q), (
                    f"{where}: codes differ at {(q != ref_q).nonzero().flatten()[:8].tolist()}"
                )
                assert _same_float_bits(absmax, ref_absmax), f"{where}: absmax bits differ"


def test_double_quant_matches_unfused_path(native, monkeypatch):
    """ops.double_quant (native) == reference.absmax_mean + reference.quantize_blockwise(absmax - mean, map, 256)."""
    from fsdp4bit import functional
    from fsdp4bit import ops as fops

    _, device = native
    code = get_dynamic_map(device)
    for n in (1, 255, 256, 3584, 917504 // 64 + 13):
        absmax = (torch.rand(n, generator=_gen(n)) * 0.2).to(device)
        offset, q, nested, code_copy = fops.double_quant(absmax, code, 256)
        ref_offset = reference.absmax_mean(absmax)
        ref_q, ref_nested = reference.quantize_blockwise(absmax - ref_offset, code, 256)
        assert offset.shape == () and _same_float_bits(offset, ref_offset)
        assert torch.equal(q, ref_q) and _same_float_bits(nested, ref_nested), f"n={n}"
        assert torch.equal(code_copy, code) and code_copy.data_ptr() != code.data_ptr()
        op_out = torch.ops.fsdp4bit.double_quant(absmax, code, 256)  # the dispatcher path
        assert torch.equal(op_out[1], q) and _same_float_bits(op_out[2], nested) and torch.equal(op_out[3], code)
    w = torch.randn(300, 257, generator=_gen(3)).to(device, torch.bfloat16)
    packed, state = functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    monkeypatch.setenv("FSDP4BIT_NO_NATIVE", "1")
    ref_packed, ref_state = functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    _assert_same_double_quant(packed, state, ref_packed, ref_state)
    assert state.state2.blocksize == ref_state.state2.blocksize and state.state2.dtype == ref_state.state2.dtype


def _mean_cases() -> list[torch.Tensor]:
    """float32 absmax-like vectors for the offset: sizes around the CUDA tree's 16 / 4096-value spans and its
    1024-partial top (4194305 values take two levels), and special values."""
    cases = [torch.rand(n, generator=_gen(n)) * 4 for n in (1, 2, 3, 17, 4096, 4097, 65537, 917517, 4194305)]
    special = torch.rand(5000, generator=_gen(5)) * 1e-3
    special[::7] = 3e38  # the float64 sum exceeds float32's range, the mean does not
    cases += [special, torch.zeros(300), -torch.zeros(4096), torch.full((3000,), 0.1875)]
    cases += [torch.tensor([1.0, float("inf"), 2.0]), torch.tensor([1.0, float("nan")] * 2000)]
    cases.append(torch.rand(10001, generator=_gen(6)) - 0.5)  # not an absmax: signs mix
    return cases


def test_double_quant_offset_has_the_reference_bits(native):
    """The offset is reference.absmax_mean's: the same bits on the CPU and on the GPU, whatever the size."""
    from fsdp4bit import ops as fops

    _, device = native
    code = get_dynamic_map(device)
    for i, a in enumerate(_mean_cases()):
        offset = fops.double_quant(a.to(device), code, 256)[0]
        ref = reference.absmax_mean(a)
        assert offset.shape == () and offset.dtype == torch.float32
        assert _same_float_bits(offset.cpu(), ref), f"case {i} (n={a.numel()}): {offset.item()!r} vs {ref.item()!r}"
    big = (torch.rand(70001, generator=_gen(7)) * 4).to(device)
    offset = fops.double_quant(big[1:], code, 256)[0]  # a view 4 bytes past a 16-byte boundary
    assert _same_float_bits(offset.cpu(), reference.absmax_mean(big[1:].cpu()))
    a = torch.rand(65537, generator=_gen(65537)) * 4
    for bs in (64, 4096):  # the generic nested kernel (blocksizes other than 256)
        offset, q, nested, _ = fops.double_quant(a.to(device), code, bs)
        ref_q, ref_nested = reference.quantize_blockwise(a - reference.absmax_mean(a), code.cpu(), bs)
        assert _same_float_bits(offset.cpu(), reference.absmax_mean(a))
        assert torch.equal(q.cpu(), ref_q) and _same_float_bits(nested.cpu(), ref_nested)


def test_quant_states_own_their_code_tables(native):
    """Each QuantState gets its own code tensors (sharding copies into them in place): never the cached tables."""
    from fsdp4bit import functional

    _, device = native
    w = torch.randn(64, 96, generator=_gen(4)).to(device, torch.bfloat16)
    _, s1 = functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    _, s2 = functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    for s in (s1, s2):
        assert s.code.device == w.device and torch.equal(s.code.cpu(), get_4bit_code("nf4"))
        assert torch.equal(s.state2.code.cpu(), get_dynamic_map())
    s1.code.add_(1.0)
    s1.state2.code.mul_(2.0)
    assert torch.equal(s2.code.cpu(), get_4bit_code("nf4")) and torch.equal(s2.state2.code.cpu(), get_dynamic_map())
    assert torch.equal(shared_4bit_code("nf4", device).cpu(), get_4bit_code("nf4"))
    _, s3 = functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(s3.code.cpu(), get_4bit_code("nf4")) and torch.equal(s3.state2.code.cpu(), get_dynamic_map())


def test_empty_input_still_returns_fresh_code_copies(native):
    """Zero elements launch no kernel, yet every output is there, the code copies fresh and equal to the tables."""
    ops, device = native
    empty = torch.empty(0, device=device, dtype=torch.bfloat16)
    packed, absmax, code = ops.quantize_4bit(empty, 64, "fp4")
    assert packed.shape == (0,) and absmax.shape == (0,)
    assert code.device == empty.device and torch.equal(code.cpu(), get_4bit_code("fp4"))
    assert code.data_ptr() != shared_4bit_code("fp4", device).data_ptr()
    dynamic = get_dynamic_map(device)
    _, q, nested, code2 = ops.double_quant(empty.float(), dynamic, 256)
    assert q.shape == (0,) and nested.shape == (0,)
    assert torch.equal(code2, dynamic) and code2.data_ptr() != dynamic.data_ptr()


def test_quantize_blockwise_bad_arguments(native):
    ops, device = native
    code = get_dynamic_map(device)
    x = torch.rand(300, device=device)
    with pytest.raises(ValueError, match="blocksize"):
        ops.quantize_blockwise(x, code, 0)
    with pytest.raises(TypeError, match="float32"):
        ops.quantize_blockwise(x.half(), code, 256)
    with pytest.raises(ValueError, match="256 entries"):
        ops.quantize_blockwise(x, code[:16], 256)
    with pytest.raises(ValueError, match="offset"):
        ops.quantize_blockwise(x, code, 256, torch.zeros(2, device=device))
    with pytest.raises(ValueError, match="on meta"):
        ops.quantize_blockwise(x, code.to("meta"), 256)


_RAISE_INSIDE_EXTENSION = """
import sys, torch
from fsdp4bit import kernels
from fsdp4bit.codebooks import get_dynamic_map
dev = sys.argv[1]
ext = kernels.native_for(dev).ext
code = get_dynamic_map(dev)
calls = {
    "value": lambda: ext.quantize_blockwise(torch.rand(8, device=dev), code, 0, None),
    "type": lambda: ext.quantize_blockwise(torch.rand(8, device=dev).half(), code, 256, None),
    "check": lambda: ext.quantize_blockwise(torch.rand(8, device=dev), code[:3], 256, None),
}
for name, call in calls.items():
    try:
        call()
    except Exception as exc:
        print(name, type(exc).__name__, str(exc).splitlines()[0][:80], flush=True)
    else:
        print(name, "no exception", flush=True)
"""


def test_error_inside_extension_is_a_python_exception(native):
    """A TORCH_CHECK failing inside the compiled extension arrives as a Python exception, in a child process
    so a crash shows as a failing exit status instead of killing pytest. (It crashed on the GPU image, whose
    CXX links libstdc++ statically, until _build.py kept static archives' symbols local.)"""
    import subprocess
    import sys

    _, device = native
    proc = subprocess.run(
        [sys.executable, "-c", _RAISE_INSIDE_EXTENSION, device.type], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"exit status {proc.returncode}; stdout: {proc.stdout!r} stderr: {proc.stderr[-2000:]}"
    lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    assert lines["value"].startswith("ValueError") and "blocksize" in lines["value"], lines
    assert lines["type"].startswith("TypeError"), lines
    assert lines["check"].startswith("RuntimeError") and "code" in lines["check"], lines


def test_eager_matmul_autograd_matches_operator(native):
    """ops.matmul_4bit's eager autograd.Function gives the operator's output and gradients bit for bit."""
    from fsdp4bit import ops as fops

    _, device = native
    W = torch.randn(48, 256, generator=_gen(11))
    packed, absmax = reference.quantize_4bit(W, 64, "nf4")
    args = (packed.to(device), absmax.to(device), None, None, None, 64, 256, "nf4", [48, 256])
    x = torch.randn(20, 256, generator=_gen(12)).to(device)
    bias = torch.randn(48, generator=_gen(13)).to(device)
    grad = torch.randn(20, 48, generator=_gen(14)).to(device)
    results = []
    for fn in (fops.matmul_4bit, torch.ops.fsdp4bit.matmul_4bit):
        xa, ba = x.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        out = fn(xa, ba, *args)
        out.backward(grad)
        results.append((out.detach(), xa.grad, ba.grad))
    for eager, op in zip(*results, strict=True):
        assert _same_float_bits(eager, op)


def test_stale_build_lock_is_removed(tmp_path):
    """A killed build leaves torch's ``lock`` file in the build folder, and torch's loader would wait on it
    forever; under fsdp4bit's OS lock it is known to be stale and goes, and the lock file itself stays."""
    from fsdp4bit.kernels._build import exclusive_build

    (tmp_path / "lock").write_text("")
    with exclusive_build(tmp_path):
        assert not (tmp_path / "lock").exists()
    assert (tmp_path / "fsdp4bit.flock").exists()


_LOAD_WITH_STALE_LOCK = """
from fsdp4bit.kernels import _build, backend_name
_, _, key = _build.cpu_build()
folder = _build.build_dir("fsdp4bit_cpu", key)
folder.mkdir(parents=True, exist_ok=True)
(folder / "lock").write_text("")
print(backend_name("cpu"))
"""


def test_cpu_extension_loads_despite_stale_build_lock(native):
    """End to end, in a child process with a time limit: the CPU extension loads (or builds) although a
    killed build left torch's lock file in its cache folder (before, every later process hung there)."""
    import subprocess
    import sys

    ops, device = native
    if device.type != "cpu":
        pytest.skip("the CPU extension's cache folder")
    proc = subprocess.run([sys.executable, "-c", _LOAD_WITH_STALE_LOCK], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "native-cpu"
