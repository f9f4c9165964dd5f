"""fsdp4bit's core beyond the spec: values against float64, autograd, bytes that must never change, errors."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import fsdp4bit as bnb
from fsdp4bit import functional as F
from fsdp4bit.codebooks import get_4bit_code

STORAGES = [torch.uint8, torch.float16, torch.bfloat16, torch.float32]


def dequant_f64(packed: torch.Tensor, state) -> torch.Tensor:
    """Independent float64 dequantization: code[nibble] * absmax[block] (absmax undone from double quant)."""
    raw = packed.reshape(-1).view(torch.uint8).long()
    nib = torch.stack([raw >> 4, raw & 15], 1).reshape(-1)[: state.shape.numel()]
    absmax = state.absmax.double()
    if state.nested:
        # the format defines the block scale as float32: code2[q] * nested_absmax, then + offset
        nested = state.state2.absmax.repeat_interleave(state.state2.blocksize)[: state.absmax.numel()]
        absmax = ((state.state2.code[state.absmax.long()] * nested) + state.offset).double()
    scale = absmax.repeat_interleave(state.blocksize)[: nib.numel()]
    return (get_4bit_code(state.quant_type).double()[nib] * scale).reshape(state.shape)


@pytest.mark.parametrize("quant_type,expected", [("nf4", 0.092), ("fp4", 0.122)])
def test_roundtrip_error_on_gaussian_weights(quant_type, expected):
    torch.manual_seed(0)
    x = torch.randn(1024, 1024)
    q, s = F.quantize_4bit(x, blocksize=64, quant_type=quant_type)
    err = ((F.dequantize_4bit(q, s).double() - x.double()).norm() / x.double().norm()).item()
    assert abs(err - expected) < 0.006, err


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("compress_statistics", [False, True])
@pytest.mark.parametrize("blocksize", [32, 256, 4096])
def test_dequantize_equals_float64_formula(quant_type, dtype, compress_statistics, blocksize):
    x = torch.randn(77, 131, dtype=dtype)
    q, s = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=compress_statistics)
    out = F.dequantize_4bit(q, s)
    assert out.dtype == dtype and out.shape == x.shape
    ref = dequant_f64(q, s)
    # a float32 product of float32 factors is the exact product rounded once, then cast once: bit-exact
    assert torch.equal(out, ref.to(dtype))


@pytest.mark.parametrize("rows", [1, 4, 16, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_and_gradients_against_float64(rows, dtype):
    torch.manual_seed(1)
    x = torch.randn(rows, 96, dtype=dtype, requires_grad=True)
    bias = torch.randn(80, dtype=dtype, requires_grad=True)
    w = torch.randn(80, 96)
    q, s = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    out = bnb.matmul_4bit(x, q.t(), s, bias=bias)
    wq = dequant_f64(q, s)
    ref = x.double() @ wq.T + bias.double()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((out.double() - ref).norm() / ref.norm()).item() < tol
    grad = torch.randn_like(out)
    out.backward(grad)
    gx = grad.double() @ wq
    assert ((x.grad.double() - gx).norm() / gx.norm()).item() < tol
    assert ((bias.grad.double() - grad.double().sum(0)).norm() / grad.double().sum(0).norm()).item() < tol
    with torch.no_grad():
        assert torch.equal(bnb.matmul_4bit(x, q, s, bias=bias), out.detach()), "same result with or without grad"


def _special_bytes(storage: torch.dtype, n: int) -> torch.Tensor:
    """n bytes whose storage words include NaN and Inf bit patterns of ``storage`` (random otherwise)."""
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    if storage in (torch.float16, torch.bfloat16):
        exp = 0x7C00 if storage == torch.float16 else 0x7F80
        words = torch.arange(1 << 16, dtype=torch.int32)
        special = words[(words & exp) == exp].to(torch.int16).view(torch.uint8)
    elif storage == torch.float32:
        special = torch.tensor([0x7FC00001, 0x7F800000, -8388608, 0x7FFFFFFF, -1], dtype=torch.int32).view(torch.uint8)
    else:
        return raw
    k = min(special.numel(), n) // storage.itemsize * storage.itemsize
    raw[:k] = special[:k]
    return raw


@pytest.mark.parametrize("storage", STORAGES, ids=str)
def test_nan_pattern_bytes_survive_every_operation(storage):
    """A float-stored packed weight whose words are NaN/Inf bit patterns comes through casts, copies,
    pickling, state dicts and FSDP-style chunking bit for bit, and computes what uint8 storage computes."""
    layer = bnb.nn.Linear4bit(300, 200, bias=False, quant_type="nf4", quant_storage=storage).to("cpu")
    ref = bnb.nn.Linear4bit(300, 200, bias=False, quant_type="nf4").to("cpu")
    raw = _special_bytes(storage, 30000)
    layer.weight._data.view(-1).view(torch.uint8).copy_(raw)
    ref.weight._data.view(-1).copy_(raw)
    ref.weight.quant_state = layer.weight.quant_state

    def bytes_of(t):
        return F.packed_bytes(t)

    x = torch.randn(5, 300)
    expected = ref(x)
    for step in ("half", "bfloat16", "float", "to_f16", "param_to", "deepcopy", "copy", "pickle", "save", "state"):
        if step in ("half", "bfloat16", "float"):
            layer = getattr(layer, step)()
        elif step == "to_f16":
            layer = layer.to(torch.float16)
        elif step == "param_to":
            layer.weight = layer.weight.to(torch.bfloat16)
        elif step == "deepcopy":
            layer = copy.deepcopy(layer)
        elif step == "copy":
            layer.weight = copy.copy(layer.weight)
        elif step == "pickle":
            layer = pickle.loads(pickle.dumps(layer))
        elif step == "save":
            buf = io.BytesIO()
            torch.save(layer, buf)
            layer = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
        else:
            fresh = bnb.nn.Linear4bit(300, 200, bias=False, quant_type="nf4", quant_storage=storage, device="meta")
            fresh.load_state_dict(layer.state_dict())
            layer = fresh
        assert layer.weight.dtype == storage, step
        assert torch.equal(bytes_of(layer.weight), raw), f"bytes changed by {step}"
        assert torch.equal(layer.float()(x), expected), f"output changed by {step}"
    pieces = torch.chunk(layer.weight, 3)
    assert torch.equal(torch.cat([bytes_of(p) for p in pieces]), raw)


def test_nan_and_inf_weights_propagate_like_bitsandbytes():
    w = torch.randn(4, 64)
    w[1, 5] = float("nan")
    w[2, 7] = float("inf")
    q, s = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    out = F.dequantize_4bit(q, s)
    assert torch.isnan(out[1]).all(), "a NaN makes its block's absmax NaN: the whole block is NaN"
    assert torch.isinf(out[2, 7]), "an Inf scales to the top code and dequantizes to Inf"
    assert torch.isnan(out[2, torch.arange(64) != 7]).all(), "the block's other values become 0 * Inf = NaN"
    assert torch.isfinite(out[[0, 3]]).all()


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: F.quantize_4bit(torch.randn(8), quant_type="int4"), ValueError, "quant_type must be one of"),
        (lambda: F.quantize_4bit(torch.randn(8), blocksize=100), ValueError, "blocksize must be one of"),
        (lambda: F.quantize_4bit(torch.arange(8)), TypeError, "A must be float16, bfloat16 or float32"),
        (lambda: F.quantize_4bit(torch.randn(8, dtype=torch.float64)), ValueError, "A.dtype must be one of"),
        (lambda: F.quantize_4bit(torch.randn(0)), ValueError, "A must not be empty"),
        (
            lambda: F.quantize_4bit(torch.randn(8), quant_storage="uint8"),
            TypeError,
            "quant_storage must be a torch.dtype",
        ),
        (
            lambda: F.quantize_4bit(torch.randn(8), quant_storage=torch.int32),
            ValueError,
            "quant_storage must be one of",
        ),
        (lambda: bnb.nn.Params4bit(torch.randn(4), quant_type="nf5"), ValueError, "quant_type must be one of"),
        (lambda: bnb.nn.Linear4bit(4, 4, compute_dtype=torch.int8), ValueError, "compute_dtype must be"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_mismatched_packed_and_shapes_raise():
    q, s = F.quantize_4bit(torch.randn(64, 32), quant_type="nf4")
    with pytest.raises(ValueError, match="packed bytes but quant_state"):
        F.dequantize_4bit(q[:-1], s)
    with pytest.raises(ValueError, match="features in its last dim"):
        F.gemv_4bit(torch.randn(1, 31), q.t(), state=s)
    with pytest.raises(ValueError, match="needs state="):
        F.gemv_4bit(torch.randn(1, 32), q.t())
    with pytest.raises(RuntimeError, match="not quantized"):
        bnb.nn.Linear4bit(4, 4)(torch.randn(1, 4))


def _stats():
    layer = bnb.nn.Linear4bit(32, 16, quant_type="nf4", compress_statistics=True).to("cpu")
    sd = layer.state_dict()
    return sd.pop("weight"), {k: v for k, v in sd.items() if k != "bias"}


def test_from_prequantized_rejects_missing_extra_and_corrupt_keys():
    data, stats = _stats()
    missing = {k: v for k, v in stats.items() if not k.endswith("nested_absmax")}
    with pytest.raises(ValueError, match="nested_absmax"):
        bnb.nn.Params4bit.from_prequantized(data, missing)
    with pytest.raises(ValueError, match="unexpected quant-state keys"):
        bnb.nn.Params4bit.from_prequantized(data, {**stats, "weight.bogus": torch.zeros(1)})
    broken = dict(stats)
    broken["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(ValueError, match="valid UTF-8 JSON"):
        bnb.nn.Params4bit.from_prequantized(data, broken)
    short = dict(stats)
    short["weight.absmax"] = stats["weight.absmax"][:-1]
    with pytest.raises(ValueError, match="absmax has"):
        bnb.nn.Params4bit.from_prequantized(data, short)
    with pytest.raises(ValueError, match="packed bytes but quant_state"):
        bnb.nn.Params4bit.from_prequantized(data[:-2], stats)


def test_load_state_dict_reports_bad_checkpoints():
    data, stats = _stats()
    layer = bnb.nn.Linear4bit(32, 16, quant_type="nf4", device="meta")
    broken = {"weight": data, "bias": torch.zeros(16), **stats}
    broken["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"[]"), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="JSON object"):
        layer.load_state_dict(broken)
    with pytest.raises(RuntimeError, match="Missing key"):
        layer.load_state_dict({k: v for k, v in {"weight": data, **stats}.items()})
    good = {"weight": data, "bias": torch.zeros(16), **stats}
    layer.load_state_dict(good)
    assert layer.weight.quant_state is not None and layer(torch.randn(2, 32)).shape == (2, 16)


def test_float_checkpoint_loads_then_quantizes():
    """bitsandbytes' recipe: load a float state dict into Linear4bit, then .to(device) quantizes it."""
    lin = torch.nn.Linear(64, 48)
    layer = bnb.nn.Linear4bit(64, 48, quant_type="nf4")
    layer.load_state_dict(lin.state_dict())
    layer = layer.to("cpu")
    x = torch.randn(3, 64)
    rel = ((layer(x) - lin(x)).norm() / lin(x).norm()).item()
    assert rel < 0.15


def test_absmax_mean_is_the_rounded_pairwise_float64_mean():
    """reference.absmax_mean: within one float32 ulp of the exact mean, exact where the mean is representable,
    NaN for no values or a NaN value, +0.0 for zeros of either sign."""
    from fractions import Fraction

    from fsdp4bit import reference

    for n in (1, 5, 1000, 4097):
        a = torch.rand(n, generator=torch.Generator().manual_seed(n)) * 3
        exact = sum(Fraction(v) for v in a.double().tolist()) / n
        got = reference.absmax_mean(a)
        assert got.dtype == torch.float32 and got.shape == ()
        ulp = abs(Fraction(torch.nextafter(got, torch.tensor(float("inf"))).item()) - Fraction(got.item()))
        assert abs(Fraction(got.item()) - exact) <= ulp
    assert reference.absmax_mean(torch.full((777,), 0.1875)).item() == 0.1875
    assert torch.isnan(reference.absmax_mean(torch.zeros(0)))
    assert torch.isnan(reference.absmax_mean(torch.tensor([1.0, float("nan"), 2.0])))
    z = reference.absmax_mean(-torch.zeros(64))
    assert z.item() == 0.0 and not torch.signbit(z)
