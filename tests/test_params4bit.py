"""A Params4bit's packed words change only through what keeps them consistent with their statistics.

Whatever writes into a quantized weight (``.data =``, in-place ops, ``copy_``, ``load_state_dict``, shared memory)
either keeps words and statistics together or raises: never a silent rewrite of the 4-bit words as numbers, and
never two layers sharing words one of them may change.
"""

from __future__ import annotations

import re

import pytest
import torch
from helpers import get_available_devices, skip_if_no_device

import fsdp4bit.functional as F
from fsdp4bit.nn import Linear4bit, Params4bit
from fsdp4bit.tensor_ops import plain

STORAGES = [torch.uint8, torch.float16, torch.bfloat16, torch.float32]


def _quantized(
    quant_storage: torch.dtype = torch.uint8, seed: int = 0, bias: bool = True, device: str = "cpu"
) -> Linear4bit:
    torch.manual_seed(seed)
    return Linear4bit(64, 8, bias=bias, quant_type="nf4", quant_storage=quant_storage).to(device)


def _words(layer: Linear4bit) -> torch.Tensor:
    return plain(layer.weight).reshape(-1).view(torch.uint8).clone()


def _values(layer: Linear4bit) -> torch.Tensor:
    return F.dequantize_4bit(layer.weight, layer.weight.quant_state)


@pytest.mark.parametrize("quant_storage", STORAGES)
@pytest.mark.parametrize(
    "op",
    [
        lambda w: w.data.zero_(),
        lambda w: w.data.fill_(1.0),
        lambda w: w.data.clamp_(0, 3),
        lambda w: w.data.abs_(),
        lambda w: w.data.masked_fill_(torch.ones(w.shape, dtype=torch.bool, device=w.device), 1.0),
        lambda w: torch.nn.init.normal_(w),
        lambda w: torch.nn.init.uniform_(w),
        lambda w: torch.add(w, 1, out=w),
        lambda w: w.data.copy_(torch.randn(w.shape, dtype=torch.float64, device=w.device)),
        lambda w: w.data.mul_(2),
    ],
    ids=["zero_", "fill_", "clamp_", "abs_", "masked_fill_", "normal_", "uniform_", "out=", "copy_float", "mul_"],
)
@pytest.mark.parametrize("device", get_available_devices())
def test_writes_into_quantized_words_raise(device, quant_storage, op):
    skip_if_no_device(device)
    layer = _quantized(quant_storage, device=device)
    words = _words(layer)
    with torch.no_grad(), pytest.raises(TypeError, match="quantized Params4bit"):
        op(layer.weight)
    assert torch.equal(_words(layer), words)


@pytest.mark.parametrize("quant_storage", STORAGES)
@pytest.mark.parametrize("device", get_available_devices())
def test_reads_of_quantized_words_as_numbers_raise(device, quant_storage):
    """Arithmetic, comparisons, reductions and products on a quantized weight would compute on its packed words:
    ValueError naming the op (peft's safe_merge saw NaN in float-stored words; DoRA's ``weight.data + delta`` mixed
    words and values), also under operator syntax; torch.equal compares words bit for bit."""
    skip_if_no_device(device)
    layer = _quantized(quant_storage, device=device)
    w, delta = layer.weight, torch.randn(8, 64, device=device)
    ops = {
        "add": lambda: w.data + delta,
        "mul": lambda: w * 2,
        "sum": lambda: w.sum(),
        "linalg_vector_norm": lambda: w.norm(),
        "allclose": lambda: torch.allclose(w, w),
    }
    if quant_storage.is_floating_point:
        ops.update({"abs": lambda: torch.isfinite(w), "mm": lambda: torch.ones(2, 1, dtype=w.dtype, device=device) @ w})
    for name, op in ops.items():
        with pytest.raises(
            ValueError, match=rf"^aten\.{name} \(run by this call\) would read the packed 4-bit words of a quantized"
        ):
            op()
    if quant_storage == torch.bfloat16:
        plain(w).view(-1)[0] = float("nan")  # a word that reads as NaN: as numbers it differs from itself
    assert torch.equal(w, w.clone())
    assert not torch.equal(w, _quantized(quant_storage, seed=1, device=device).weight)


def test_plain_tensors_take_quantized_words_only_in_their_dtype():
    """``plain.copy_(weight)`` (a staging copy out of a keep_vars state dict) copies the words bit for bit; into
    another dtype it would cast them as numbers: ValueError (it raised AttributeError)."""
    layer = _quantized(torch.bfloat16)
    staged = torch.empty_like(plain(layer.weight))
    staged.copy_(layer.weight)
    assert torch.equal(staged.view(torch.uint8), _words(layer).view(staged.shape[0], -1))
    with pytest.raises(ValueError, match=r"^copy_ of a quantized Params4bit's packed words \(torch.bfloat16\) into"):
        torch.empty(staged.shape, dtype=torch.float32).copy_(layer.weight)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_reset_parameters_of_a_quantized_layer_keeps_its_words(device):
    """FSDP2's meta-device recipe (to_empty, then reset_parameters on every module) must not write the words."""
    layer = _quantized(torch.bfloat16).to(device)
    words = None if device == "meta" else _words(layer)
    layer.reset_parameters()
    assert layer.bias.abs().max() <= 1 / 8 if device == "cpu" else layer.bias.is_meta
    if words is not None:
        assert torch.equal(_words(layer), words)
    if device == "meta":
        with torch.no_grad():
            torch.nn.init.uniform_(layer.weight)  # no values on the meta device: nothing to corrupt, no refusal


def test_a_weight_not_quantized_yet_takes_any_op():
    layer = Linear4bit(64, 8, quant_type="nf4")
    want = torch.randn(8, 64)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight.add_(want)
    layer.to("cpu")
    expected = F.dequantize_4bit(*F.quantize_4bit(want, quant_type="nf4", compress_statistics=True))
    assert torch.equal(_values(layer), expected)


def test_words_of_the_same_dtype_copy_raw():
    source, target = _quantized(seed=0), _quantized(seed=1)
    with torch.no_grad():
        target.weight.copy_(source.weight)
    assert torch.equal(_words(target), _words(source))
    assert torch.equal(_values(target), _values(source))
    fp4 = Linear4bit(64, 8, quant_type="fp4", compress_statistics=False).to("cpu")
    with torch.no_grad():
        target.weight.copy_(fp4.weight)  # the words bring their statistics and format
    assert (target.weight.quant_type, target.weight.compress_statistics) == ("fp4", False)
    assert torch.equal(_values(target), _values(fp4))


def test_data_of_a_weight_not_quantized_yet_is_what_gets_quantized():
    reference = torch.nn.Linear(96, 10)
    layer = Linear4bit(96, 10, quant_type="nf4")
    layer.weight.data = reference.weight.data.clone()
    layer.to("cpu")
    expected = F.dequantize_4bit(
        *F.quantize_4bit(reference.weight.detach(), quant_type="nf4", compress_statistics=True)
    )
    assert torch.equal(_values(layer), expected)
    with pytest.raises(TypeError, match="must be a floating-point tensor"):
        Linear4bit(96, 10).weight.data = torch.zeros(10, 96, dtype=torch.int32)


def test_data_of_a_quantized_weight_takes_another_params4bit_whole():
    a, b = _quantized(seed=0), _quantized(seed=1)
    a.weight.data = b.weight.data
    assert torch.equal(_words(a), _words(b))
    assert torch.equal(_values(a), _values(b))  # the statistics came with the words


def test_data_of_a_quantized_weight_refuses_a_plain_tensor():
    layer = _quantized()
    words = _words(layer)
    for value in (torch.randn(8, 64), plain(layer.weight).clone()):
        with pytest.raises(TypeError, match="without their statistics"):
            layer.weight.data = value
    with (
        torch.no_grad(),
        pytest.raises(ValueError, match=r"^aten\.mul \(run by this call\) would read the packed 4-bit words"),
    ):
        layer.weight.data *= 2  # __imul__ refuses, Python falls back to weight.data = weight.data * 2
    assert torch.equal(_words(layer), words)


@pytest.mark.parametrize("quant_storage", [torch.bfloat16, torch.float32])
def test_merge_and_unmerge_as_peft_writes_them(quant_storage):
    """peft's generic LoRA layer: ``weight.data += delta``, then ``weight.data -= delta.to(weight.dtype)``."""
    layer = _quantized(quant_storage)
    before = _values(layer)
    delta = 0.01 * torch.randn(8, 64)
    with torch.no_grad():
        layer.weight.data += delta
        merged = _values(layer)
        layer.weight.data -= delta.to(layer.weight.dtype)
    assert (merged - before - delta).abs().max() < 0.1
    assert (_values(layer) - before).abs().max() < 0.1


def test_unmerge_of_a_delta_cast_to_uint8_storage_raises():
    layer = _quantized(torch.uint8)
    words = _words(layer)
    with torch.no_grad(), pytest.raises(ValueError, match="has lost its values"):
        layer.weight.data -= (0.01 * torch.randn(8, 64)).to(layer.weight.dtype)
    assert torch.equal(_words(layer), words)


@pytest.mark.parametrize("device", get_available_devices())
def test_load_state_dict_copies_and_assign_adopts(device):
    skip_if_no_device(device)
    source = _quantized(seed=0, device=device)
    x = torch.randn(2, 64, device=device)
    copied, adopted = Linear4bit(64, 8, quant_type="nf4"), Linear4bit(64, 8, quant_type="nf4")
    copied.to(device).load_state_dict(source.state_dict())
    adopted.load_state_dict(source.state_dict(), assign=True)
    assert copied.weight.data_ptr() != source.weight.data_ptr()
    assert copied.weight.absmax.data_ptr() != source.weight.absmax.data_ptr()
    assert copied.bias.data_ptr() != source.bias.data_ptr()
    assert adopted.weight.data_ptr() == source.weight.data_ptr()
    assert torch.equal(copied(x), source(x)) and torch.equal(adopted(x), source(x))
    y = source(x)
    with torch.no_grad():
        copied.weight.data += 0.1 * torch.randn(8, 64, device=device)
    assert torch.equal(source(x), y)


def test_assign_load_of_a_float_checkpoint_keeps_a_params4bit():
    reference = torch.nn.Linear(96, 10)
    layer = Linear4bit(96, 10, quant_type="nf4", device="meta")
    layer.load_state_dict(reference.state_dict(), assign=True)
    assert isinstance(layer.weight, Params4bit) and not layer.weight.bnb_quantized
    layer.to("cpu")
    expected = F.dequantize_4bit(
        *F.quantize_4bit(reference.weight.detach(), quant_type="nf4", compress_statistics=True)
    )
    assert torch.equal(_values(layer), expected)
    x = torch.randn(2, 96)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, expected, reference.bias))


def test_load_of_another_format_updates_the_layer_attributes():
    source = Linear4bit(64, 8, quant_type="fp4", compress_statistics=False, quant_storage=torch.bfloat16).to("cpu")
    target = Linear4bit(64, 8, quant_type="nf4")
    target.load_state_dict(source.state_dict())
    assert (target.quant_type, target.compress_statistics, target.quant_storage) == (
        "fp4",
        False,
        torch.bfloat16,
    )


def test_non_strict_load_without_the_words_still_loads_the_bias():
    source, target = _quantized(seed=0), _quantized(seed=1)
    state = {k: v for k, v in source.state_dict().items() if k != "weight"}
    result = target.load_state_dict(state, strict=False)
    assert result.missing_keys == ["weight"]
    assert torch.equal(target.bias, source.bias)


@pytest.mark.parametrize("quantize", [True, False])
def test_share_memory_moves_words_and_statistics(quantize):
    layer = Linear4bit(64, 8, quant_type="nf4")
    if quantize:
        layer.to("cpu")
    x = torch.randn(2, 64)
    y = layer(x) if quantize else None
    layer.share_memory()
    assert layer.weight.is_shared()
    if quantize:
        state = layer.weight.quant_state
        assert state.absmax.is_shared() and state.state2.absmax.is_shared() and state.offset.is_shared()
        assert torch.equal(layer(x), y)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_compress_statistics_must_be_a_bool(value):
    message = re.escape(f"compress_statistics must be a bool (True or False), got {type(value).__name__} {value!r}")
    with pytest.raises(TypeError, match=f"^{message}$"):
        Linear4bit(64, 8, compress_statistics=value)
    with pytest.raises(TypeError, match=f"^{message}$"):
        Params4bit(torch.randn(8, 64), compress_statistics=value)
    with pytest.raises(TypeError, match=f"^{message}$"):
        F.quantize_4bit(torch.randn(8, 64), compress_statistics=value)
