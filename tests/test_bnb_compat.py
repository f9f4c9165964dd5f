"""Code written for bitsandbytes' 4-bit API runs unchanged: the behaviours an import swap must keep (each found
by comparing the two libraries call by call)."""

from __future__ import annotations

import json
import weakref

import numpy as np
import pytest
import torch

import fsdp4bit
import fsdp4bit.functional as F
from fsdp4bit.nn import Linear4bit, Params4bit
from fsdp4bit.quant_state import QuantState

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _layer(device: str, dtype: torch.dtype, inference: bool) -> Linear4bit:
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96, dtype=dtype)
    layer = Linear4bit(256, 96, compute_dtype=dtype, quant_type="nf4")
    layer.load_state_dict(lin.state_dict())
    if inference:
        with torch.inference_mode():
            return layer.to(device)
    return layer.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_weight_quantized_in_inference_mode_trains_adapters(device, dtype):
    """A model loaded under torch.inference_mode() still runs forward and backward (bias and input gradients) with
    the same bits as one quantized normally: the frozen weight is not a saved tensor of the autograd graph."""
    ref, inf = _layer(device, dtype, False), _layer(device, dtype, True)
    assert inf.weight.is_inference()
    torch.manual_seed(1)
    for rows in (1, 3, 40):
        x = torch.randn(rows, 256, device=device, dtype=dtype)
        out_ref, out_inf = ref(x), inf(x)  # bias requires grad, x does not
        assert out_inf.requires_grad and torch.equal(out_inf, out_ref)
        g = torch.randn_like(out_ref)
        out_ref.backward(g)
        out_inf.backward(g)
        assert torch.equal(inf.bias.grad, ref.bias.grad)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref(xa).backward(g)
        inf(xb).backward(g)
        assert torch.equal(xb.grad, xa.grad)
        ref.bias.grad = inf.bias.grad = None


@pytest.mark.parametrize("storage", [torch.uint8, torch.float16], ids=str)  # NumPy has no bfloat16
def test_packed_weight_converts_to_numpy_and_lists(storage):
    layer = Linear4bit(128, 64, quant_type="nf4", quant_storage=storage).to("cpu")
    w = layer.weight
    raw = F.packed_bytes(w)
    for arr in (w.numpy(), w.data.cpu().numpy(), w.detach().numpy(), np.asarray(w)):
        assert arr.shape == tuple(w.shape)
        assert torch.equal(torch.from_numpy(arr.copy()).reshape(-1).view(torch.uint8), raw)
    if storage == torch.uint8:  # (float words may hold NaN patterns, which no list comparison keeps)
        assert torch.equal(torch.tensor(w.tolist(), dtype=storage).reshape(-1), raw)
    assert np.array_equal(w.reshape(-1)[:4].numpy().view(np.uint8), w.numpy().reshape(-1)[:4].view(np.uint8))


def test_state_views_on_the_weight_and_the_layer():
    layer = Linear4bit(128, 64, quant_type="nf4", compress_statistics=True)
    assert layer.quant_state is None and layer.weight.offset is None and layer.weight.nested_blocksize is None
    layer = layer.to("cpu")
    w, qs = layer.weight, layer.weight.quant_state
    assert layer.quant_state is qs
    assert w.offset is qs.offset and w.nested_offset is qs.offset and w.state2 is qs.state2
    assert (w.nested_blocksize, w.nested_dtype) == (256, torch.float32)
    plain = Linear4bit(128, 64, quant_type="nf4", compress_statistics=False).to("cpu")
    assert plain.weight.offset is None and plain.weight.state2 is None and plain.weight.nested_dtype is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_blockwise_round_trip_keeps_the_dtype(dtype):
    torch.manual_seed(0)
    A = torch.randn(8, 1000, dtype=dtype)
    q, state = F.quantize_blockwise(A, blocksize=256)
    assert q.dtype == torch.uint8 and q.shape == A.shape and state.dtype == dtype
    back = F.dequantize_blockwise(q, state)
    assert back.dtype == dtype and back.shape == A.shape
    blocks = torch.nn.functional.pad(A.float().reshape(-1), (0, 1024 * 8 - A.numel())).reshape(-1, 256)
    expect = (state.code[q.reshape(-1).long()] * state.absmax.repeat_interleave(256)[: A.numel()]).to(dtype)
    assert torch.equal(back.reshape(-1), expect)
    assert torch.equal(state.absmax, blocks.abs().amax(1)[: state.absmax.numel()])
    # without a state: absmax (and the default dynamic code), as bitsandbytes takes them, to float32
    no_state = F.dequantize_blockwise(q, absmax=state.absmax, blocksize=256)
    assert no_state.dtype == torch.float32
    assert torch.equal(
        no_state.reshape(-1), state.code[q.reshape(-1).long()] * state.absmax.repeat_interleave(256)[: A.numel()]
    )


def test_blockwise_nested_out_and_positional_arguments():
    torch.manual_seed(0)
    A = torch.randn(64, 4096) * torch.rand(64, 1) * 10
    out = torch.empty(A.shape, dtype=torch.uint8)
    absmax = torch.empty(64)
    q, state = F.quantize_blockwise(A, None, absmax, out, 4096, False)  # bitsandbytes' positional order
    assert q is out and state.absmax is absmax
    qn, nested = F.quantize_blockwise(A, blocksize=4096, nested=True)
    assert torch.equal(qn, q) and nested.state2 is not None and nested.absmax.dtype == torch.uint8
    amax = F.dequantize_blockwise(nested.absmax, nested.state2) + nested.offset
    assert (amax - absmax).abs().max() <= 0.02 * (absmax - nested.offset).abs().max()
    plain, deq_nested = F.dequantize_blockwise(q, state), F.dequantize_blockwise(qn, nested)
    assert (deq_nested - plain).abs().max() <= 0.02 * A.abs().max()
    dst = torch.empty_like(A)
    assert F.dequantize_blockwise(q, state, out=dst) is dst and torch.equal(dst, plain)
    with pytest.raises(ValueError, match="needs quant_state or absmax"):
        F.dequantize_blockwise(q)
    with pytest.raises(TypeError, match="A must be a uint8 tensor"):
        F.dequantize_blockwise(A, state)
    with pytest.raises(TypeError, match="out must have dtype torch.float32"):
        F.dequantize_blockwise(q, state, out=torch.empty_like(A, dtype=torch.float16))


def test_nf4_and_fp4_helpers_take_bitsandbytes_positional_order():
    torch.manual_seed(0)
    W = torch.randn(64, 256)
    for quantize, dequantize, qt in (
        (F.quantize_nf4, F.dequantize_nf4, "nf4"),
        (F.quantize_fp4, F.dequantize_fp4, "fp4"),
    ):
        packed, state = quantize(W, None, None, 128)
        assert (state.blocksize, state.quant_type) == (128, qt)
        ref_packed, ref_state = F.quantize_4bit(W, blocksize=128, quant_type=qt)
        assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref_state.absmax)
        out = torch.empty_like(W)
        assert dequantize(packed, None, state.absmax, out, 128) is out
        assert torch.equal(out, F.dequantize_4bit(packed, state))


def test_numpy_integer_blocksize_is_a_plain_int():
    W = torch.randn(64, 128)
    packed, state = F.quantize_4bit(W, blocksize=np.int64(128), quant_type="nf4", compress_statistics=True)
    assert type(state.blocksize) is int and state.blocksize == 128
    meta = F.unpack_tensor_to_dict(state.as_dict(packed=True)["quant_state.bitsandbytes__nf4"])
    assert type(meta["blocksize"]) is int and json.loads(json.dumps(meta)) == meta
    p = Params4bit(W, blocksize=np.int32(128), quant_type="nf4").to("cpu")
    assert type(p.blocksize) is int and torch.equal(
        F.packed_bytes(p),
        F.packed_bytes(F.quantize_4bit(W, blocksize=128, quant_type="nf4", compress_statistics=True)[0]),
    )
    with pytest.raises(TypeError, match="blocksize must be an int"):
        F.quantize_4bit(W, blocksize=np.float32(128))


def test_weak_reference_to_the_weight_gives_a_clear_error():
    layer = Linear4bit(128, 64)
    ref = weakref.ref(layer.weight)
    with pytest.raises(RuntimeError, match="holds a weak reference to it"):
        layer.to("cpu")
    assert ref() is layer.weight


def test_state_dict_helpers_under_bitsandbytes_names():
    layer = Linear4bit(128, 64, quant_type="nf4").to("cpu")
    sd = layer.state_dict()
    blob = sd["weight.quant_state.bitsandbytes__nf4"]
    meta = F.unpack_tensor_to_dict(blob)
    assert torch.equal(F.pack_dict_to_tensor(meta), blob)
    keys = {k.removeprefix("weight.") for k in sd if k.startswith("weight.") and k != "weight"}
    keys = {k.split(".", 1)[0] for k in keys} | set(meta)
    assert keys <= set(QuantState.valid_qs_keys)
    assert fsdp4bit.functional.QuantState is QuantState


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_lora_merge_requantizes_in_place(device, storage):
    """peft's merge (``weight.data += delta``) and unmerge (``-= delta``) act on the weight's values: dequantize,
    add, quantize again in the same format, as bitsandbytes' merge does."""
    torch.manual_seed(0)
    layer = Linear4bit(128, 64, bias=False, quant_type="nf4", quant_storage=storage).to(device)
    w = layer.weight
    before = F.dequantize_4bit(w, w.quant_state)
    delta = 0.01 * torch.randn(64, 128, device=device)
    expect_packed, expect_state = F.quantize_4bit(
        before.float() + delta, blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=storage
    )
    w.data += delta
    assert torch.equal(F.packed_bytes(w), F.packed_bytes(expect_packed))
    assert torch.equal(w.quant_state.absmax, expect_state.absmax) and w.quant_state.nested
    assert torch.equal(F.dequantize_4bit(w, w.quant_state), F.dequantize_4bit(expect_packed, expect_state))
    assert layer.quant_state is w.quant_state
    # unmerge: back to the original values within two half NF4 steps (a step is at most 1 - 0.723 of a block's
    # absmax, which the merged weight's can exceed by max |delta|)
    w.data -= delta
    bound = 0.28 * (before.abs().max() + delta.abs().max())
    assert (F.dequantize_4bit(w, w.quant_state) - before).abs().max() <= bound


def test_other_arithmetic_on_packed_words_is_refused():
    layer = Linear4bit(128, 64, quant_type="nf4", quant_storage=torch.bfloat16)
    layer.weight.data.mul_(0.5)  # float values before quantization: an ordinary in-place op
    layer = layer.to("cpu")
    w = layer.weight
    words = F.packed_bytes(w).clone()
    with pytest.raises(TypeError, match="mul_ on a quantized Params4bit would change its packed 4-bit words"):
        w.data.mul_(0.5)
    with pytest.raises(TypeError, match="add_ on a quantized Params4bit"):
        w.data.add_(1.0)
    with pytest.raises(ValueError, match=r"must have its shape \(64, 128\), got \(64, 1\)"):
        w.data += torch.ones(64, 1)
    assert torch.equal(F.packed_bytes(w), words)


def test_peft_merge_and_unload_keeps_a_4bit_layer():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = torch.nn.Sequential(Linear4bit(64, 32, quant_type="nf4"), torch.nn.ReLU()).to("cpu")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(5, 64)
    with torch.no_grad():
        adapted = lora(x)
        merged = lora.merge_and_unload()
        out = merged(x)
    assert isinstance(merged[0], Linear4bit)
    # the adapted function, to within the 4-bit rounding of the merged weights
    assert (out - adapted).abs().max() <= 0.1 * adapted.abs().max()


@pytest.mark.parametrize("rows", [1, 3, 40], ids=lambda r: f"rows={r}")
@pytest.mark.parametrize("device", DEVICES)
def test_autocast_sets_the_base_matmul_dtype_on_every_path(device, rows):
    """Under torch.autocast a layer without compute_dtype multiplies in the autocast dtype, as bitsandbytes' does
    through F.linear, whatever path the row count takes (it used to depend on it); an explicit compute_dtype wins.
    The layer returns the input's dtype (bitsandbytes' rule); matmul_4bit returns autocast's (F.linear's)."""
    torch.manual_seed(0)
    layers = {}
    for name, dtype in (("auto", None), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        layers[name] = Linear4bit(256, 96, compute_dtype=dtype, quant_type="nf4")
        layers[name].load_state_dict(layers["auto"].state_dict())
        layers[name] = layers[name].to(device)
    x = torch.randn(rows, 256, device=device)
    x_auto, x_bf16 = x.clone().requires_grad_(), x.clone().requires_grad_()
    plain = layers["auto"](x)
    bf16 = layers["bf16"](x_bf16)
    bf16.sum().backward()
    with torch.autocast(device, dtype=torch.bfloat16):
        auto = layers["auto"](x_auto)
        fp32 = layers["fp32"](x)
        weight = layers["auto"].weight
        direct = fsdp4bit.matmul_4bit(x, weight.t(), weight.quant_state)
    auto.sum().backward()
    assert auto.dtype == fp32.dtype == torch.float32
    assert torch.equal(auto, bf16), "autocast did not give the bf16 compute_dtype result"
    assert torch.equal(fp32, plain), "an explicit float32 compute_dtype was overridden by autocast"
    assert torch.equal(x_auto.grad, x_bf16.grad)
    assert direct.dtype == torch.bfloat16
    assert torch.equal(direct, fsdp4bit.matmul_4bit(x.to(torch.bfloat16), weight.t(), weight.quant_state))
