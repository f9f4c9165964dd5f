"""Bad input raises a ValueError or TypeError that names the argument and what it accepts, on every path.

The native kernels, the plain-PyTorch reference (``FSDP4BIT_NO_NATIVE=1``) and the fake implementations that meta
tensors and torch.compile run must check the same things with the same messages: never a silent wrong answer,
uninitialized memory, a half-loaded module or an error from deep inside torch. Each message is asserted exactly.
"""

from __future__ import annotations

import copy
import os
import re

import pytest
import torch

import fsdp4bit as bnb
from fsdp4bit import checkpoint, kernels, loading
from fsdp4bit import functional as F
from fsdp4bit.nn import Linear4bit, Params4bit
from fsdp4bit.quant_state import QuantState

BLOCKSIZES = "(32, 64, 128, 256, 512, 1024, 2048, 4096)"
FLOATS = "(torch.float16, torch.bfloat16, torch.float32)"
NO_ROWS = "A must have at least one dimension (its last holds the input features), got a 0-dim tensor"
FROZEN = (
    "requires_grad must be False: a Params4bit is a frozen 4-bit weight (train adapters such as LoRA on top of it), "
    "got True"
)
fops = torch.ops.fsdp4bit


def raises(exc: type[Exception], message: str, whole: bool = True):
    """pytest.raises for exactly ``message`` (or, with ``whole=False``, a message that contains it)."""
    pattern = re.escape(message)
    return pytest.raises(exc, match=f"^{pattern}$" if whole else pattern)


@pytest.fixture(params=["native", "reference"])
def path(request, monkeypatch):
    """Each test runs on the native CPU kernels and on the reference (FSDP4BIT_NO_NATIVE=1)."""
    if request.param == "native":
        monkeypatch.delenv("FSDP4BIT_NO_NATIVE", raising=False)
        if kernels.native_for("cpu") is None:
            pytest.skip("native CPU kernels unavailable")
    else:
        monkeypatch.setenv("FSDP4BIT_NO_NATIVE", "1")
    return request.param


def _weight(nested: bool = False, shape: tuple[int, ...] = (32, 64)):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return (w, *F.quantize_4bit(w, quant_type="nf4", compress_statistics=nested))


def _x(rows: int = 2) -> torch.Tensor:
    return torch.randn(rows, 64, generator=torch.Generator().manual_seed(1))


def _layer(out_features: int = 32, in_features: int = 64, bias: bool = True, **kwargs) -> Linear4bit:
    torch.manual_seed(2)
    return Linear4bit(in_features, out_features, bias=bias, quant_type="nf4", **kwargs).to("cpu")


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _unchanged(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = module.state_dict()
    return set(after) == set(before) and all(
        after[k].dtype == before[k].dtype
        and after[k].shape == before[k].shape
        and torch.equal(after[k].reshape(-1).view(torch.uint8), before[k].reshape(-1).view(torch.uint8))
        for k in before
    )


# ------------------------------------------------------------------------------ meta tensors among CPU tensors
def test_ops_with_a_meta_tensor_among_cpu_tensors_raise_the_device_mismatch(path):
    """One meta argument sends torch.ops.fsdp4bit.* to the fake implementation, which returned uninitialized memory."""
    _, packed, state = _weight()
    _, packed_n, state_n = _weight(nested=True)
    flat, absmax, x = packed.reshape(-1), state.absmax, _x()
    plain = (None, None, None, 64, 256, "nf4", [32, 64])
    with raises(ValueError, "absmax is on meta, packed on cpu"):
        fops.dequantize_4bit(flat, absmax.to("meta"), *plain, torch.float32)
    with raises(ValueError, "absmax is on meta, packed on cpu"):
        fops.gemv_4bit(x[:1], flat, absmax.to("meta"), *plain)
    with raises(ValueError, "absmax is on cpu, packed on meta"):
        fops.gemv_4bit(x[:1], flat.to("meta"), absmax, *plain)
    with raises(ValueError, "A is on meta, packed on cpu"):
        fops.matmul_4bit(x.to("meta"), None, flat, absmax, *plain)
    with raises(ValueError, "bias is on meta, A on cpu"):
        fops.matmul_4bit(x, torch.zeros(32, device="meta"), flat, absmax, *plain)
    nested = (state_n.state2.absmax, state_n.state2.code, state_n.offset.to("meta"), 64, 256, "nf4", [32, 64])
    with raises(ValueError, "offset is on meta, packed on cpu"):
        fops.matmul_4bit(x, None, packed_n.reshape(-1), state_n.absmax, *nested)


def test_public_api_with_a_meta_tensor_among_cpu_tensors_raises_the_device_mismatch(path):
    _, packed, state = _weight()
    x = _x()
    with raises(ValueError, "absmax is on cpu, packed on meta"):
        F.dequantize_4bit(packed.to("meta"), state)
    with raises(ValueError, "A is on meta, packed on cpu"):
        F.gemv_4bit(x[:1].to("meta"), packed, state=state)
    with raises(ValueError, "A is on meta, packed on cpu"):
        bnb.matmul_4bit(x.to("meta"), packed, state)
    with raises(ValueError, "A is on meta, packed on cpu"):
        _layer()(x.to("meta"))
    # all on meta is fine: shapes and dtypes only
    meta_state = copy.deepcopy(state).to("meta")
    assert bnb.matmul_4bit(x.to("meta"), packed.to("meta"), meta_state).shape == (2, 32)


# ------------------------------------------------------------------------------ the bias, and one set of checks on every path
@pytest.mark.parametrize("shape", [(31,), (1,), (2, 32)])
def test_bias_must_have_the_output_features(path, shape):
    _, packed, state = _weight()
    message = f"bias must have shape (32,), got {shape}"
    for rows in (2, 40):  # the gemv and the dequantize + matmul routes
        with raises(ValueError, message):
            bnb.matmul_4bit(_x(rows), packed, state, bias=torch.randn(shape))
    layer = _layer()
    layer.bias.data = torch.randn(shape)
    with raises(ValueError, message):
        layer(_x())


def test_bias_must_be_a_tensor(path):
    _, packed, state = _weight()
    with raises(TypeError, "bias must be a torch.Tensor or None, got list"):
        bnb.matmul_4bit(_x(), packed, state, bias=[0.0] * 32)


def test_state_checks_are_the_same_on_every_path(path):
    w, packed, state = _weight()
    _, packed_n, state_n = _weight(nested=True)
    x = _x()
    s = copy.deepcopy(state_n)
    s.nested = False
    with raises(ValueError, "QuantState.nested is False but the state has a nested state2 (double quantization)"):
        F.dequantize_4bit(packed_n, s)
    for dtype in (torch.float16, torch.int32):
        s = copy.deepcopy(state)
        s.absmax = s.absmax.to(dtype)
        with raises(TypeError, f"absmax must be float32 without double quantization, got {dtype}"):
            F.dequantize_4bit(packed, s)
        with raises(TypeError, f"absmax must be float32 without double quantization, got {dtype}"):
            bnb.matmul_4bit(x, packed, s)
    s = copy.deepcopy(state)
    s.absmax = s.absmax.view(4, 8)
    with raises(ValueError, "absmax must be 1-D with at least 32 entries, got shape (4, 8)"):
        F.dequantize_4bit(packed, s)
    with raises(ValueError, f"A.dtype must be one of {FLOATS}, got torch.float64"):
        bnb.matmul_4bit(x.double(), packed, state)
    for A in (w, w.to("meta")):
        with raises(ValueError, f"blocksize must be one of {BLOCKSIZES}, got 48"):
            fops.quantize_4bit(A, 48, "nf4")
    with raises(ValueError, f"A.dtype must be one of {FLOATS}, got torch.int32"):
        fops.quantize_4bit(w.int(), 64, "nf4")
    flat, plain = packed.reshape(-1), (state.absmax, None, None, None, 64, 256, "nf4", [32, 64])
    with raises(TypeError, "packed must be a uint8 tensor, got torch.int8"):
        fops.dequantize_4bit(flat.to(torch.int8), *plain, torch.float32)
    with raises(ValueError, f"dtype must be one of {FLOATS}, got torch.int32"):
        fops.dequantize_4bit(flat, *plain, torch.int32)
    with raises(ValueError, "bias must have shape (32,), got (31,)"):
        fops.matmul_4bit(x, torch.randn(31), flat, *plain)


# ------------------------------------------------------------------------------ blocksizes against the statistics
def test_blocksizes_must_match_the_absmax_counts(path):
    w, packed, state = _weight()
    x = _x()
    s = copy.deepcopy(state)
    s.blocksize = 128
    message = "absmax has 32 entries but shape (32, 64) with blocksize 128 needs 16"
    with raises(ValueError, message):
        F.dequantize_4bit(packed, s)
    with raises(ValueError, message):
        F.gemv_4bit(x[:1], packed, state=s)
    with raises(ValueError, message):
        bnb.matmul_4bit(x, packed, s)
    s = copy.deepcopy(state)
    s.absmax = torch.cat([s.absmax, s.absmax])
    with raises(ValueError, "absmax has 64 entries but shape (32, 64) with blocksize 64 needs 32"):
        F.dequantize_4bit(packed, s)
    with raises(ValueError, "absmax has 64 entries but shape (32, 64) with blocksize 64 needs 32"):
        fops.dequantize_4bit(packed.reshape(-1), s.absmax, None, None, None, 64, 256, "nf4", [32, 64], torch.float32)
    with raises(ValueError, "absmax has 64 entries but shape (32, 64) with blocksize 64 needs 32"):
        fops.input_grad_4bit(
            torch.randn(2, 32), packed.reshape(-1), s.absmax, None, None, None, 64, 256, "nf4", [32, 64]
        )
    big = torch.randn(300 * 64, generator=torch.Generator().manual_seed(3))  # 300 blocks: 2 nested blocks
    packed_b, state_b = F.quantize_4bit(big, quant_type="nf4", compress_statistics=True)
    s = copy.deepcopy(state_b)
    s.state2.blocksize = 512
    with raises(ValueError, "nested_absmax has 2 entries but 300 absmax entries with nested_blocksize 512 need 1"):
        F.dequantize_4bit(packed_b, s)
    s.state2.blocksize = 0
    with raises(ValueError, f"nested_blocksize must be one of {BLOCKSIZES}, got 0"):
        F.dequantize_4bit(packed_b, s)


@pytest.mark.parametrize("value", [150, 0, -1, "256"])
def test_from_dict_checks_nested_blocksize(value):
    big = torch.randn(300 * 64, generator=torch.Generator().manual_seed(3))
    _, state = F.quantize_4bit(big, quant_type="nf4", compress_statistics=True)
    d = state.as_dict()
    d["nested_blocksize"] = value
    if isinstance(value, str):
        expected = raises(TypeError, f"nested_blocksize must be an int, one of {BLOCKSIZES}, got str '256'")
    else:
        expected = raises(ValueError, f"nested_blocksize must be one of {BLOCKSIZES}, got {value}")
    with expected:
        QuantState.from_dict(d, "cpu")


# ------------------------------------------------------------------------------ loading a state dict
def test_load_state_dict_checks_shapes_before_changing_anything():
    layer = _layer()
    before = _snapshot(layer)
    with raises(
        RuntimeError,
        "size mismatch for weight: the checkpoint holds a 4-bit weight of shape (16, 64), the shape "
        "in current model is (32, 64).",
        whole=False,
    ):
        layer.load_state_dict(_snapshot(_layer(out_features=16)))
    assert _unchanged(layer, before) and layer.weight.quant_state.shape == (32, 64)
    with raises(
        RuntimeError,
        "size mismatch for weight: the checkpoint holds a 4-bit weight of shape (32, 32), the shape "
        "in current model is (32, 64).",
        whole=False,
    ):
        _layer(bias=False).load_state_dict(_snapshot(_layer(in_features=32, bias=False)))
    for bias in (torch.randn(31), torch.randn(1), torch.randn(2, 32)):
        state = {**_snapshot(_layer(out_features=32)), "bias": bias}
        with raises(
            RuntimeError,
            f"size mismatch for bias: copying a param with shape {bias.shape} from checkpoint, the "
            "shape in current model is torch.Size([32]).",
            whole=False,
        ):
            layer.load_state_dict(state)
        assert _unchanged(layer, before)


def test_load_state_dict_reports_unexpected_keys_like_nn_linear():
    state = {**_snapshot(_layer()), "extra": torch.ones(1)}
    with raises(RuntimeError, 'Unexpected key(s) in state_dict: "extra".', whole=False):
        _layer().load_state_dict(state)
    assert _layer().load_state_dict(state, strict=False).unexpected_keys == ["extra"]


def test_plain_weight_is_never_cast_into_packed_bytes():
    layer = _layer()
    before = _snapshot(layer)
    message = (
        "while loading weight: the layer's weight is quantized (nf4 words of shape (1024, 1) in torch.uint8) and the "
        "checkpoint holds a torch.float32 tensor of shape {} without quant-state entries (weight.absmax, "
        "weight.quant_state.bitsandbytes__*): load a float checkpoint before quantizing the layer (.to(device)), or a "
        "4-bit one with its statistics"
    )
    for weight in (torch.full((1024, 1), 300.7), torch.randn(32, 64)):
        with raises(RuntimeError, message.format(tuple(weight.shape)), whole=False):
            layer.load_state_dict({"weight": weight, "bias": torch.zeros(32)})
        assert _unchanged(layer, before)
    layer.load_state_dict({"weight": before["weight"], "bias": torch.zeros(32)})  # its own packed words still load
    assert torch.equal(layer.bias.detach(), torch.zeros(32))


def test_checkpoint_load_of_another_shape_with_the_same_bytes_raises(tmp_path):
    source = _layer(out_features=16, bias=False)  # 16 x 64 = 32 x 32 values: the same bytes and absmax count
    checkpoint.save(source, tmp_path / "ckpt")
    target = _layer(out_features=32, in_features=32, bias=False)
    before = _snapshot(target)
    with raises(
        ValueError,
        "checkpoint entry 'weight.quant_state.bitsandbytes__nf4' describes a 4-bit weight with shape "
        "[16, 64], the model's has [32, 32]",
    ):
        checkpoint.load(target, tmp_path / "ckpt")
    assert _unchanged(target, before)
    with raises(
        ValueError,
        "checkpoint entry 'weight.quant_state.bitsandbytes__nf4' describes a 4-bit weight with shape "
        "[16, 64], the model's has [32, 64]",
    ):
        checkpoint.load(_layer(bias=False), tmp_path / "ckpt")
    checkpoint.save(_layer(out_features=16, bias=False, quant_storage=torch.float16), tmp_path / "ckpt16")
    with raises(ValueError, "checkpoint entry 'weight' has shape (256, 1), the model's has (512, 1)"):
        checkpoint.load(_layer(out_features=16, bias=False), tmp_path / "ckpt16")


# ------------------------------------------------------------------------------ loading.materialize / load_sharded
def _meta_model(bias: bool = True) -> torch.nn.Module:
    return torch.nn.Sequential(
        Linear4bit(64, 32, bias=bias, quant_type="nf4", device="meta"), torch.nn.LayerNorm(32, device="meta")
    )


@pytest.mark.parametrize(
    "tensors,message",
    [
        (
            {"0.weight": torch.randn(16, 64)},
            "checkpoint tensor '0.weight' has shape (16, 64), the model's has (32, 64)",
        ),
        ({"0.bias": torch.zeros(7)}, "checkpoint tensor '0.bias' has shape (7,), the model's has (32,)"),
        ({"1.weight": torch.ones(10)}, "checkpoint tensor '1.weight' has shape (10,), the model's has (32,)"),
    ],
)
def test_materialize_rejects_other_shapes(tensors, message):
    good = {
        "0.weight": torch.randn(32, 64),
        "0.bias": torch.zeros(32),
        "1.weight": torch.ones(32),
        "1.bias": torch.zeros(32),
    }
    good.update(tensors)
    model = _meta_model()
    with raises(ValueError, message):
        loading.materialize(model, "", good.__getitem__, set(good), torch.device("cpu"))
    if "0." in message:  # the layer is left as it was
        assert model[0].weight.is_meta and model[0].bias.is_meta


def test_materialize_rejects_a_4bit_weight_of_another_shape():
    state = {"0." + k: v for k, v in _snapshot(_layer(out_features=16, bias=False)).items()}
    model = _meta_model(bias=False)
    with raises(
        ValueError, "checkpoint tensor '0.weight' is a 4-bit weight of shape (16, 64), the model's has (32, 64)"
    ):
        loading.materialize(model, "", state.__getitem__, set(state), torch.device("cpu"))
    assert model[0].weight.is_meta


def test_load_sharded_refuses_a_model_not_on_meta():
    model = torch.nn.Sequential(Linear4bit(64, 32, quant_type="nf4"))
    with raises(
        ValueError,
        "load_sharded loads the meta tensors of a model built on the meta device, but none of its 2 parameters is "
        "on meta: build it under torch.device('meta'), or load a materialized model with load_state_dict",
    ):
        loading.load_sharded(
            model, {}.__getitem__, set(), block_types=(Linear4bit,), device="cpu", shard=lambda module: None
        )


# ------------------------------------------------------------------------------ out= and absmax=
def test_out_and_absmax_arguments_are_checked(path):
    w, packed, state = _weight()
    x = _x()
    cases = [
        (
            lambda: F.quantize_4bit(w, out=torch.empty(1024, 1)),
            TypeError,
            "out must have dtype torch.uint8, got torch.float32",
        ),
        (
            lambda: F.quantize_4bit(w, out=torch.empty(1024, 8, dtype=torch.uint8)),
            ValueError,
            "out must have shape (1024, 1), got (1024, 8)",
        ),
        (lambda: F.quantize_4bit(w, out=[0] * 1024), TypeError, "out must be a torch.Tensor or None, got list"),
        (lambda: F.quantize_4bit(w, absmax=torch.empty(1)), ValueError, "absmax must have shape (32,), got (1,)"),
        (
            lambda: F.quantize_4bit(w, absmax=torch.empty(32, dtype=torch.int32)),
            TypeError,
            "absmax must have dtype torch.float32, got torch.int32",
        ),
        (
            lambda: F.quantize_4bit(w, absmax=torch.empty(32), compress_statistics=True),
            TypeError,
            "absmax must have dtype torch.uint8, got torch.float32",
        ),
        (
            lambda: F.dequantize_4bit(packed, state, out=torch.empty(2048)),
            ValueError,
            "out must have shape (32, 64), got (2048,)",
        ),
        (
            lambda: F.dequantize_4bit(packed, state, out=torch.empty(32, 64, dtype=torch.float16)),
            TypeError,
            "out must have dtype torch.float32, got torch.float16",
        ),
        (
            lambda: F.dequantize_4bit(packed, state, out=torch.empty(32, 64, device="meta")),
            ValueError,
            "out is on meta, the result on cpu",
        ),
        (
            lambda: F.gemv_4bit(x[:1], packed, state=state, out=torch.empty(5, 32)),
            ValueError,
            "out must have shape (1, 32), got (5, 32)",
        ),
        (
            lambda: F.gemv_4bit(x[:1], packed, state=state, out=torch.empty(1, 32, dtype=torch.int32)),
            TypeError,
            "out must have dtype torch.float32, got torch.int32",
        ),
        (
            lambda: bnb.matmul_4bit(x, packed, state, out=torch.empty(9, 2, 32)),
            ValueError,
            "out must have shape (2, 32), got (9, 2, 32)",
        ),
        (
            lambda: bnb.matmul_4bit(x, packed, state, out=torch.empty(2, 32, dtype=torch.int32)),
            TypeError,
            "out must have dtype torch.float32, got torch.int32",
        ),
    ]
    for call, exc, message in cases:
        with raises(exc, message):
            call()
    out = torch.empty(2, 32)
    assert bnb.matmul_4bit(x, packed, state, out=out) is out and torch.equal(out, bnb.matmul_4bit(x, packed, state))
    absmax = torch.empty(32)
    q, s = F.quantize_4bit(w, absmax=absmax, out=torch.empty(1024, 1, dtype=torch.uint8), quant_type="nf4")
    assert s.absmax is absmax and torch.equal(q, packed) and torch.equal(absmax, state.absmax)


# ------------------------------------------------------------------------------ blocksize is an int
def test_blocksize_must_be_an_int():
    w, _, state = _weight()
    message = f"blocksize must be an int, one of {BLOCKSIZES}, got float 64.0"
    with raises(TypeError, message):
        F.quantize_4bit(w, blocksize=64.0)
    with raises(TypeError, message):
        Params4bit(w, blocksize=64.0)
    with raises(TypeError, "blocksize must be an int or None, got float 64.0"):
        QuantState(state.absmax, shape=(32, 64), blocksize=64.0)
    d = state.as_dict()
    d["blocksize"] = 64.0
    with raises(TypeError, message):
        QuantState.from_dict(d, "cpu")
    s = copy.deepcopy(state)
    s.blocksize = 64.0
    with raises(TypeError, f"quant_state.blocksize must be an int, one of {BLOCKSIZES}, got float 64.0"):
        F.dequantize_4bit(torch.zeros(1024, 1, dtype=torch.uint8), s)


# ------------------------------------------------------------------------------ 0-dim A, requires_grad, input dtypes, checkpoint paths, argument names, malformed states
def test_zero_dim_input_raises(path):
    _, packed, state = _weight()
    A = torch.tensor(1.0)
    for call in (
        lambda: F.gemv_4bit(A, packed, state=state),
        lambda: bnb.matmul_4bit(A, packed, state),
        lambda: _layer()(A),
        lambda: fops.gemv_4bit(A, packed.reshape(-1), state.absmax, None, None, None, 64, 256, "nf4", [32, 64]),
    ):
        with raises(ValueError, NO_ROWS):
            call()


def test_requires_grad_is_refused_up_front_and_gemv_is_differentiable(path):
    w, packed, state = _weight()
    with raises(ValueError, FROZEN):
        Params4bit(w, requires_grad=True)
    with raises(ValueError, FROZEN):
        Params4bit.from_prequantized(packed, state.as_dict(packed=True), requires_grad=True)
    x = _x(1).requires_grad_(True)
    out = F.gemv_4bit(x, packed, state=state)
    out.backward(torch.ones_like(out))
    xm = x.detach().clone().requires_grad_(True)
    ref = bnb.matmul_4bit(xm, packed, state)
    ref.backward(torch.ones_like(ref))
    with torch.no_grad():
        assert torch.equal(F.gemv_4bit(x, packed, state=state), out.detach())
    assert torch.equal(out.detach(), ref.detach()) and torch.equal(x.grad, xm.grad)


def test_linear4bit_input_must_be_a_float_tensor():
    """The same TypeError with or without a compute_dtype (without one an integer x was told to set it)."""
    for compute_dtype in (torch.float16, None):
        with raises(TypeError, "x must be a floating-point tensor, got torch.int64"):
            _layer(compute_dtype=compute_dtype)(torch.randint(-3, 3, (2, 64)))
    layer = _layer(compute_dtype=torch.float16)
    with raises(TypeError, "x must be a torch.Tensor, got list"):
        layer(_x().tolist())


def test_checkpoint_save_and_load_arguments(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    with raises(
        ValueError,
        f"path {str(target)!r} exists and is not a folder: save writes a checkpoint folder and would replace it",
    ):
        checkpoint.save(_layer(), target)
    assert target.read_text() == "keep me" and sorted(os.listdir(tmp_path)) == ["file.txt"]
    for call in (
        lambda: checkpoint.save("model", tmp_path / "ckpt"),
        lambda: checkpoint.load("model", tmp_path),
        lambda: checkpoint.full_state_dict("model"),
    ):
        with raises(TypeError, "model must be a torch.nn.Module, got str"):
            call()


def test_messages_name_the_argument_the_caller_passed():
    _, packed, state = _weight()
    with raises(ValueError, f"out.dtype must be one of {FLOATS}, got torch.int32"):
        F.dequantize_4bit(packed, absmax=state.absmax, out=torch.empty(32, 64, dtype=torch.int32), quant_type="nf4")
    with raises(ValueError, f"blocksize must be one of {BLOCKSIZES}, got 48"):
        F.dequantize_4bit(packed, absmax=state.absmax, out=torch.empty(32, 64), blocksize=48)
    with raises(TypeError, "data must be float16, bfloat16 or float32, got torch.int64"):
        Params4bit(torch.randint(0, 5, (4, 64))).to("cpu")
    with raises(ValueError, f"dtype must be one of {FLOATS}, got torch.int32"):
        Params4bit(torch.randn(4, 64)).to("cpu", dtype=torch.int32)
    with raises(ValueError, "input_features must be at least 1 (a 4-bit weight cannot be empty), got 0"):
        Linear4bit(0, 32)
    with raises(ValueError, "output_features must be at least 1 (a 4-bit weight cannot be empty), got 0"):
        Linear4bit(64, 0)
    with raises(TypeError, "input_features must be an int, got float 64.0"):
        Linear4bit(64.0, 32)


def test_malformed_quant_state_fields_raise_clearly():
    _, packed, state = _weight()
    _, packed_n, state_n = _weight(nested=True)
    with raises(TypeError, "shape must be a sequence of non-negative ints, got 5"):
        QuantState(torch.ones(1), shape=5)
    with raises(ValueError, "quant_type must be one of ('fp4', 'nf4'), got 'int4'"):
        QuantState(torch.ones(1), shape=(4, 64), quant_type="int4")
    with raises(TypeError, "qs_dict must be a dict of quant-state entries, got list"):
        QuantState.from_dict([1, 2], "cpu")
    with raises(TypeError, "quantized_stats must be a dict of the weight's quant-state entries, got QuantState"):
        Params4bit.from_prequantized(packed, state)
    d = state_n.as_dict()
    d["nested_offset"] = "abc"
    with raises(ValueError, "nested_offset must be a number, got 'abc'"):
        QuantState.from_dict(d, "cpu")
    s = copy.deepcopy(state)
    s.absmax = s.absmax.tolist()
    with raises(TypeError, "QuantState.absmax must be a torch.Tensor, got list"):
        F.dequantize_4bit(packed, s)
    s = copy.deepcopy(state_n)
    s.state2 = None
    with raises(
        TypeError, "a nested QuantState needs a QuantState state2 and a tensor offset, got NoneType and Tensor"
    ):
        F.dequantize_4bit(packed_n, s)
    s = copy.deepcopy(state)
    s.shape = None
    with raises(TypeError, "QuantState.shape must be a sequence of non-negative ints, got None"):
        F.dequantize_4bit(packed, s)
    s.shape = (32, 64)  # a plain tuple is a shape too
    assert torch.equal(F.dequantize_4bit(packed, s), F.dequantize_4bit(packed, state))


def test_statistics_of_a_weight_that_requires_grad_are_plain(path):
    """A Parameter (or any tensor requiring grad) quantizes as its values: no autograd history in the state."""
    for A in (torch.nn.Parameter(torch.randn(32, 64)), torch.randn(32, 64, requires_grad=True)):
        packed, state = F.quantize_4bit(A, quant_type="nf4", compress_statistics=True)
        tensors = (packed, state.absmax, state.code, state.offset, state.state2.absmax, state.state2.code)
        assert not any(t.requires_grad for t in tensors)
        assert not F.dequantize_4bit(packed, state).requires_grad
        copy.deepcopy(state)
        q, bstate = F.quantize_blockwise(A)
        assert not q.requires_grad and not bstate.absmax.requires_grad


def test_blockwise_arguments_are_checked(path):
    x = torch.linspace(-1, 1, 100)
    with raises(ValueError, f"blocksize must be a positive int up to 2**31 - 1, got {2**63 - 1}"):
        F.quantize_blockwise(x, blocksize=2**63 - 1)
    with raises(TypeError, "code must be a torch.Tensor (a 1-D float table, e.g. get_dynamic_map()), got list"):
        F.quantize_blockwise(x, code=[0.0] * 256)
    with raises(ValueError, "code must be a 1-D floating-point table, got a torch.float32 tensor of shape (16, 16)"):
        F.quantize_blockwise(x, code=F.get_dynamic_map().view(16, 16))
    q, _ = F.quantize_blockwise(x, blocksize=64)
    with raises(ValueError, "quant_state.code must have 256 entries (an 8-bit blockwise state), got 16"):
        F.dequantize_blockwise(q, F.quantize_4bit(x)[1])
    # one block: the reference repeats the one absmax per value, not per blocksize
    values = F.dequantize_blockwise(q, absmax=torch.ones(1), blocksize=2**30)
    assert torch.equal(values, F.get_dynamic_map()[q.long()])


def test_matmul_state_fields_are_checked_before_the_operator(path):
    _, packed, state = _weight()
    s = copy.deepcopy(state)
    s.quant_type = None
    with raises(ValueError, "quant_type must be one of ('fp4', 'nf4'), got None"):
        bnb.matmul_4bit(_x(4), packed, s)
    packed3, state3 = F.quantize_4bit(torch.randn(2, 32, 64))
    with raises(ValueError, "matmul_4bit needs a 2-D (out_features, in_features) 4-bit weight, got shape (2, 32, 64)"):
        bnb.matmul_4bit(_x(4), packed3, state3)
    with raises(TypeError, "bias must be a floating-point tensor, got torch.int64"):
        bnb.matmul_4bit(_x(4), packed, state, bias=torch.zeros(32, dtype=torch.int64))


@pytest.mark.parametrize("key", ["dtype", "nested_dtype"])
def test_from_dict_checks_dtype_names(key):
    from fsdp4bit.quant_state import pack_dict_to_tensor, unpack_tensor_to_dict

    _, _, state = _weight(nested=True)
    d = state.as_dict(packed=True)
    blob = "quant_state.bitsandbytes__nf4"
    meta = unpack_tensor_to_dict(d[blob])
    meta[key] = ["float32"]
    label = "quant-state dtype" if key == "dtype" else "nested_dtype"
    with raises(ValueError, f"{label} must be one of ['bfloat16', 'float16', 'float32'], got ['float32']"):
        QuantState.from_dict({**d, blob: pack_dict_to_tensor(meta)}, "cpu")
    d["quant_map"] = d["quant_map"].long()
    with raises(ValueError, "quant_map must be a float32 table of 16 entries, got torch.int64 with 16"):
        QuantState.from_dict(d, "cpu")
