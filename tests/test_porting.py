"""A bitsandbytes QLoRA workflow ported by an import swap: layers replaced by hand in a model, moved, adapted with
peft, merged and saved, give what bitsandbytes' code gives (each found by running both libraries on the same
script, ``bench/tmp/review_port/``)."""

from __future__ import annotations

import pytest
import torch

import fsdp4bit
import fsdp4bit.functional as F
from fsdp4bit.nn import Linear4bit, Params4bit
from fsdp4bit.tensor_ops import plain


def _replaced(weight: torch.Tensor, bias: torch.Tensor | None, quant_type: str = "nf4") -> Linear4bit:
    """A float layer replaced by hand, the usual way: a new Linear4bit whose weight is a Params4bit of the values."""
    layer = Linear4bit(weight.shape[1], weight.shape[0], bias=bias is not None, quant_type=quant_type)
    layer.weight = Params4bit(weight.clone(), requires_grad=False, quant_type=quant_type)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.clone())
    return layer


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_move_with_a_dtype_quantizes_the_values_as_they_are(dtype):
    """``model.to(device, dtype)`` quantizes a float32 weight from its float32 values, as bitsandbytes does (it
    ignores the dtype there): the same words and statistics as quantizing those values, a float32 state; only the
    float parameters (the bias) take the dtype. Rounding the values to ``dtype`` first changed ~1% of the codes."""
    torch.manual_seed(0)
    weight, bias = torch.randn(64, 256), torch.randn(64)
    layer = _replaced(weight, bias).to("cpu", dtype)
    packed, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    w = layer.weight
    assert torch.equal(plain(w), packed)
    assert torch.equal(w.quant_state.absmax, state.absmax) and torch.equal(w.quant_state.offset, state.offset)
    assert torch.equal(w.quant_state.state2.absmax, state.state2.absmax)
    assert w.quant_state.dtype == torch.float32 and layer.bias.dtype == dtype
    x = torch.randn(3, 256).to(dtype)
    expected = x.double() @ F.dequantize_4bit(packed, state).double().T + bias.to(dtype).double()
    # the layer's output is rounded to dtype (8 or 11 significant bits): a few of its ulps at the largest output
    assert (layer(x).double() - expected).abs().max() <= 2**-6 * expected.abs().max()


def test_a_move_with_a_dtype_still_quantizes_float64_values_in_that_dtype():
    """float64 values cannot be quantized: the requested dtype is what they are quantized in (they were before)."""
    torch.manual_seed(0)
    weight = torch.randn(16, 64, dtype=torch.float64)
    layer = _replaced(weight, None).to("cpu", torch.float32)
    packed, state = F.quantize_4bit(weight.float(), blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(plain(layer.weight), packed) and layer.weight.quant_state.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype must be one of"):
        Params4bit(weight.float()).to("cpu", torch.int32)


def test_a_move_with_a_dtype_gives_bitsandbytes_words():
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    weight = torch.randn(64, 256)
    ours = _replaced(weight, None).to("cpu", torch.bfloat16)
    theirs = bnb.nn.Linear4bit(256, 64, bias=False, quant_type="nf4")
    theirs.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4")
    theirs = theirs.to("cpu", torch.bfloat16)
    assert torch.equal(plain(ours.weight), theirs.weight.data)
    assert ours.weight.quant_state.dtype == theirs.weight.quant_state.dtype == torch.float32
    assert fsdp4bit.nn.Linear4bit is Linear4bit
