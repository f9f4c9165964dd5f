"""The short host path of a 4-bit linear call: same bits and same errors as the long one.

``Linear4bit`` skips work that an earlier step of the same call already did: ``Params4bit.quant_state``
returns the state itself without slicing when the tensor holds the words it describes, and remembers the
last slice otherwise; the eager matmul's backward dequantizes with the kernels (and the state) its forward
checked; an ``nn.Parameter`` bias no longer sends the call through the custom-op dispatcher. Each shortcut
must give exactly what the long path gives, and bad input must still raise what it raised.
"""

from __future__ import annotations

import pytest
import torch

import fsdp4bit as bnb
from fsdp4bit import functional as F
from fsdp4bit import kernels, ops
from fsdp4bit.kernels import _native
from fsdp4bit.tensor_ops import slice_state

_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def _quantized(device: str, out_f: int = 48, in_f: int = 256, storage: torch.dtype = torch.uint8, nested: bool = True):
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0)) * 0.1
    return bnb.nn.Params4bit(w, quant_type="nf4", compress_statistics=nested, quant_storage=storage).to(device)


# ------------------------------------------------------------------------------------------- quant_state
def _fresh_slice(shard):
    """What slice_state gives for the shard's words now."""
    meta = shard._storage_meta
    lo = shard.row_start
    return slice_state(meta.quant_state, meta.state_rows, (lo, lo + shard.numel()), shard.dtype.itemsize)


def test_whole_weight_returns_its_state_object():
    param = _quantized("cpu", storage=torch.bfloat16)
    state = param.quant_state
    assert param.quant_state is state is param._storage_meta.quant_state


def test_shard_slice_is_remembered_and_equals_a_fresh_slice():
    param = _quantized("cpu")
    shard = torch.chunk(param, 4, dim=0)[1]
    first = shard.quant_state
    assert first is not param.quant_state
    assert shard.quant_state is first, "an unchanged shard returns the same object"
    fresh = _fresh_slice(shard)
    assert fresh == first and fresh is not first


def test_shard_slice_follows_row_start_and_reassigned_state():
    param = _quantized("cpu")
    shard = torch.chunk(param, 4, dim=0)[1]
    first = shard.quant_state
    shard.set_row_start(shard.row_start + 1)
    moved = shard.quant_state
    assert moved is not first and moved == _fresh_slice(shard)
    assert shard.quant_state is moved
    piece = shard[:5]  # a view sharing the shard's metadata, other words: its own slice
    assert piece.quant_state == _fresh_slice(piece) and piece.quant_state.absmax.numel() == 0
    full = param.quant_state
    other = F.QuantState(
        full.absmax.clone(),
        full.shape,
        full.code,
        full.blocksize,
        full.quant_type,
        full.dtype,
        full.offset,
        full.state2,
    )
    shard._storage_meta.quant_state = other
    after = shard.quant_state
    assert after is not moved and after == _fresh_slice(shard)
    assert after.absmax.untyped_storage().data_ptr() == other.absmax.untyped_storage().data_ptr()
    shard.quant_state = full  # the setter: the shard's own words now are the state's words
    assert shard.quant_state is full


def test_shard_slice_follows_changed_fields():
    """A field of the source state reassigned (QuantState.to does that), or of a handed-out slice: a fresh slice."""
    param = _quantized("cpu")
    shard = torch.chunk(param, 4, dim=0)[2]
    state = shard._storage_meta.quant_state
    first = shard.quant_state
    state.absmax = state.absmax.clone()
    second = shard.quant_state
    assert (
        second is not first and second.absmax.untyped_storage().data_ptr() == state.absmax.untyped_storage().data_ptr()
    )
    second.code = second.code.clone()
    third = shard.quant_state
    assert third is not second and third.code is state.code
    third.offset = None
    assert shard.quant_state is not third and shard.quant_state.offset is state.offset


def test_broken_state_still_raises_on_access():
    """A state without a shape raises on access, for the whole weight too (no shortcut around the block count), with
    a TypeError naming the field (it was an AttributeError about a missing ``numel``, read as "not quantized")."""
    param = _quantized("cpu", nested=False)
    param._storage_meta.quant_state = F.QuantState(param.quant_state.absmax)
    message = "QuantState.shape must be a sequence of non-negative ints, got None"
    with pytest.raises(TypeError, match=message):
        _ = param.quant_state
    layer = bnb.nn.Linear4bit(256, 48, bias=False, quant_type="nf4")
    layer.weight = param
    with pytest.raises(TypeError, match=message):
        layer(torch.randn(2, 256))


def test_state_is_checked_once_until_a_field_changes(monkeypatch):
    """The hot path reads one flag: QuantState.check runs on first use and again only after a field (of the state
    or of its nested state) is assigned."""
    param = _quantized("cpu")
    state = param.quant_state
    x = torch.randn(2, 256)
    bnb.matmul_4bit(x, param, state)
    checks = _recording(monkeypatch, F.QuantState, "check")
    for _ in range(3):
        bnb.matmul_4bit(x, param, state)
    assert checks == []
    state.blocksize = 64
    bnb.matmul_4bit(x, param, state)
    state.state2.blocksize = 256
    bnb.matmul_4bit(x, param, state)
    bnb.matmul_4bit(x, param, state)
    assert len(checks) == 2


# ------------------------------------------------------------------------------------------- matmul bits
def _reference(x, param, bias, grad):
    """Explicit dequantize + F.linear, and the gradients the formula gives (W in the gradient's dtype)."""
    state = param.quant_state
    absmax, nested_absmax, nested_code, offset = state.absmax_tensors()
    packed = F.packed_bytes(param)
    meta = (state.blocksize, state.state2.blocksize if state.nested else 256, state.quant_type, list(state.shape))

    def weight(dtype):
        return ops.dequantize_4bit(packed, absmax, nested_absmax, nested_code, offset, *meta, dtype)

    out = torch.nn.functional.linear(x, weight(x.dtype), None if bias is None else bias.to(x.dtype))
    grad_x = grad @ weight(grad.dtype)
    grad_bias = None if bias is None else grad.reshape(-1, grad.shape[-1]).sum(0).to(bias.dtype)
    return out, grad_x, grad_bias


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("shape", [(33, 256), (3, 11, 256), (1, 256), (4, 256)], ids=str)
@pytest.mark.parametrize("bias", ["none", "frozen", "trained"])
@pytest.mark.parametrize("nested", [True, False])
def test_linear4bit_bits_match_op_and_formula(device, shape, bias, nested):
    """Linear4bit forward (with and without grad) and backward equal the dispatcher op bit for bit, and the
    explicit dequantize + linear formula where the dequantize path runs (more than 16 rows)."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(1)
    layer = bnb.nn.Linear4bit(
        256,
        48,
        bias=bias != "none",
        quant_type="nf4",
        compute_dtype=dtype,
        compress_statistics=nested,
        quant_storage=torch.bfloat16,
    )
    layer.weight = _quantized(device, storage=torch.bfloat16, nested=nested)
    if layer.bias is not None:
        layer.bias = torch.nn.Parameter(torch.randn(48, generator=gen).to(device), requires_grad=bias == "trained")
    x = torch.randn(*shape, generator=gen).to(device, dtype)
    grad = torch.randn(*shape[:-1], 48, generator=gen).to(device, dtype)
    state = layer.weight.quant_state
    absmax, nested_absmax, nested_code, offset = state.absmax_tensors()
    op_args = (
        F.packed_bytes(layer.weight),
        absmax,
        nested_absmax,
        nested_code,
        offset,
        state.blocksize,
        state.state2.blocksize if nested else 256,
        "nf4",
        list(state.shape),
    )

    with torch.no_grad():
        no_grad_out = layer(x)
    xa = x.clone().requires_grad_(True)
    out = layer(xa)
    # eager calls skip the dispatcher: with native kernels one C++ autograd node, else the Python autograd.Function
    node = out.grad_fn.name()
    assert (
        ("CppNode" in node and "Matmul4bitFunction" in node)
        if kernels.native_for(device) is not None
        else node == "_Matmul4bitFunctionBackward"
    ), node
    out.backward(grad)
    xo = x.clone().requires_grad_(True)
    bias_op = None if layer.bias is None else layer.bias.detach().clone().requires_grad_(bias == "trained")
    op_out = torch.ops.fsdp4bit.matmul_4bit(xo, bias_op, *op_args)
    op_out.backward(grad)

    assert _same_bits(no_grad_out, op_out.detach()) and _same_bits(out.detach(), op_out.detach())
    assert _same_bits(xa.grad, xo.grad)
    if bias == "trained":
        assert _same_bits(layer.bias.grad, bias_op.grad)
    if x.numel() // x.shape[-1] > 16:
        ref_out, ref_grad_x, ref_grad_bias = _reference(x, layer.weight, layer.bias, grad)
        assert _same_bits(out.detach(), ref_out) and _same_bits(xa.grad, ref_grad_x)
        if bias == "trained":
            assert _same_bits(layer.bias.grad, ref_grad_bias)


def _recording(monkeypatch, obj, name: str) -> list:
    """Replace ``obj.name`` by a wrapper that records each call's keyword arguments."""
    calls = []
    real = getattr(obj, name)

    def wrapper(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapper)
    return calls


@pytest.mark.parametrize("rows", [1, 20])
def test_backward_reuses_the_forward_checks(monkeypatch, rows):
    """The Python autograd.Function (the eager path's node where the C++ one does not serve, e.g. no rows) takes in
    its backward the input-gradient route of the kernels whose forward checked the state, without checking it again;
    the C++ node's backward runs no Python at all."""
    monkeypatch.delenv("FSDP4BIT_NO_NATIVE", raising=False)
    if kernels.native_for("cpu") is None:
        pytest.skip("native CPU kernels unavailable")
    param = _quantized("cpu")
    state = param.quant_state
    op_args = (F.packed_bytes(param), *state.absmax_tensors(), 64, state.state2.blocksize, "nf4", list(state.shape))
    x = torch.randn(rows, 256, requires_grad=True)
    out = ops._Matmul4bitFunction.apply(x, None, *op_args)
    node = bnb.matmul_4bit(x, param, state)
    checks = _recording(monkeypatch, _native, "_check_state")
    input_grads = _recording(monkeypatch, kernels.NativeOps, "input_grad_4bit")
    node.backward(torch.ones_like(node))
    assert checks == [] and input_grads == []
    out.backward(torch.ones_like(out))
    assert checks == [] and input_grads == [{}]


def test_backward_honours_no_native_set_after_the_forward(monkeypatch):
    """FSDP4BIT_NO_NATIVE set between forward and backward: the backward takes the reference path, as before."""
    monkeypatch.delenv("FSDP4BIT_NO_NATIVE", raising=False)
    param = _quantized("cpu")
    x = torch.randn(20, 256, requires_grad=True)
    grad = torch.randn(20, 48)
    out = bnb.matmul_4bit(x, param, param.quant_state)
    monkeypatch.setenv("FSDP4BIT_NO_NATIVE", "1")
    dequantized = _recording(monkeypatch, kernels.NativeOps, "dequantize_4bit")
    out.backward(grad)
    assert dequantized == []
    _, ref_grad_x, _ = _reference(x.detach(), param, None, grad)
    assert _same_bits(x.grad, ref_grad_x)


def test_state_checked_still_checks_dtype():
    native = kernels.native_for("cpu")
    if native is None:
        pytest.skip("native CPU kernels unavailable")
    param = _quantized("cpu", nested=False)
    packed, absmax = F.packed_bytes(param), param.quant_state.absmax
    with pytest.raises(ValueError, match="dtype must be one of"):
        native.dequantize_4bit(
            packed, absmax, None, None, None, 64, 256, "nf4", (48, 256), torch.int8, state_checked=True
        )


def test_backward_with_saved_tensor_hooks_and_checkpoint():
    """Saved-tensor hooks (copies come back) and activation checkpointing give the same gradient bits."""
    param = _quantized("cpu")
    x = torch.randn(20, 256)
    grad = torch.randn(20, 48)

    def grad_of(run):
        xa = x.clone().requires_grad_(True)
        run(xa).backward(grad)
        return xa.grad

    def plain(xa):
        return bnb.matmul_4bit(xa, param, param.quant_state)

    def hooked(xa):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
            return plain(xa)

    def checkpointed(xa):
        return torch.utils.checkpoint.checkpoint(plain, xa, use_reentrant=False)

    expected = grad_of(plain)
    assert _same_bits(grad_of(hooked), expected) and _same_bits(grad_of(checkpointed), expected)


def test_reference_path_forward_and_backward(monkeypatch):
    """With FSDP4BIT_NO_NATIVE=1 throughout, the eager autograd path runs the reference and matches the op."""
    monkeypatch.setenv("FSDP4BIT_NO_NATIVE", "1")
    param = _quantized("cpu")
    state = param.quant_state
    absmax, nested_absmax, nested_code, offset = state.absmax_tensors()
    args = (F.packed_bytes(param), absmax, nested_absmax, nested_code, offset, 64, 256, "nf4", list(state.shape))
    x = torch.randn(20, 256)
    grads = []
    for fn in (ops.matmul_4bit, torch.ops.fsdp4bit.matmul_4bit):
        xa = x.clone().requires_grad_(True)
        out = fn(xa, None, *args)
        out.backward(torch.ones_like(out))
        grads.append((out.detach(), xa.grad))
    assert all(_same_bits(a, b) for a, b in zip(*grads, strict=True))


# ------------------------------------------------------------------------------------------- errors
def test_bad_inputs_still_raise():
    param = _quantized("cpu", nested=False)
    state = param.quant_state
    with pytest.raises(ValueError, match="A's last dim is 255"):
        bnb.matmul_4bit(torch.randn(2, 255), param, state)
    with pytest.raises(TypeError, match="A must be a floating-point tensor"):
        bnb.matmul_4bit(torch.ones(2, 256, dtype=torch.int32), param, state)
    with pytest.raises(ValueError, match="packed bytes but quant_state"):
        bnb.matmul_4bit(torch.randn(2, 256), param[:-1], state)
    native = kernels.native_for("cpu")
    if native is None:
        return
    packed = F.packed_bytes(param)
    meta = (64, 256, "nf4")
    with pytest.raises(ValueError, match="A.dtype"):
        native.gemv_4bit(
            torch.ones(1, 256, dtype=torch.float64), packed, state.absmax, None, None, None, *meta, (48, 256)
        )
    with pytest.raises(ValueError, match="K = 256"):
        native.gemv_4bit(torch.randn(1, 255), packed, state.absmax, None, None, None, *meta, (48, 256))
    with pytest.raises(ValueError, match="absmax is on meta"):
        native.gemv_4bit(torch.randn(1, 256), packed, state.absmax.to("meta"), None, None, None, *meta, (48, 256))
    with pytest.raises(ValueError, match="A is on meta"):
        native.gemv_4bit(torch.randn(1, 256, device="meta"), packed, state.absmax, None, None, None, *meta, (48, 256))
    # no input features: a product of zeros, as on CUDA and the reference path (F.linear)
    out = native.gemv_4bit(torch.randn(1, 0), packed, state.absmax, None, None, None, *meta, (48, 0))
    assert torch.equal(out, torch.zeros(1, 48))
    code, offset = torch.zeros(256), torch.zeros(())
    with pytest.raises(ValueError, match="nested_absmax needs nested_code and offset"):
        native.dequantize_4bit(packed, state.absmax, state.absmax, None, None, *meta, (48, 256), torch.float32)
    with pytest.raises(TypeError, match="absmax must be uint8"):
        native.dequantize_4bit(packed, state.absmax, state.absmax, code, offset, *meta, (48, 256), torch.float32)


def test_native_for_accepts_devices_and_strings(monkeypatch):
    monkeypatch.delenv("FSDP4BIT_NO_NATIVE", raising=False)
    assert kernels.native_for(torch.device("cpu")) is kernels.native_for("cpu")
    assert kernels.native_for("meta") is None and kernels.native_for(torch.device("meta")) is None
    with pytest.raises(RuntimeError):
        kernels.native_for("no-such-device")
    monkeypatch.setenv("FSDP4BIT_NO_NATIVE", "0")
    assert kernels.native_for(torch.device("cpu")) is kernels.native_for("cpu")
    monkeypatch.setenv("FSDP4BIT_NO_NATIVE", "1")
    assert kernels.native_for(torch.device("cpu")) is None
