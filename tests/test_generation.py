"""Hugging Face generation with a 4-bit model (CPU): a tiny random Llama whose linears, lm_head excepted, are
Linear4bit, against the same model with each weight replaced by its dequantized float64 copy."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import fsdp4bit as bnb
from fsdp4bit import functional as F

transformers = pytest.importorskip("transformers")


def tiny_llama(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    with torch.no_grad():  # larger weights: logits with margins, so greedy tokens are stable under rounding
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(8)
    return model


def quantized(model: nn.Module, quant_type: str, quant_storage: torch.dtype) -> nn.Module:
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and name != "lm_head":
            layer = bnb.nn.Linear4bit(
                module.in_features, module.out_features, bias=False, quant_type=quant_type, quant_storage=quant_storage
            )
            layer.weight = bnb.nn.Params4bit(module.weight.data, quant_type=quant_type, quant_storage=quant_storage)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)
    return model.to("cpu")  # quantizes every Linear4bit


def dequantized(model: nn.Module) -> nn.Module:
    """The 4-bit model with every Linear4bit replaced by an nn.Linear holding its dequantized weight, in float64."""
    ref = copy.deepcopy(model)
    for name, module in list(ref.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            linear = nn.Linear(module.in_features, module.out_features, bias=False)
            linear.weight = nn.Parameter(F.dequantize_4bit(module.weight, module.weight.quant_state), False)
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, linear)
    return ref.to(torch.float64)


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(3, 128, (3, 9))
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 3, 6)):
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    return ids, mask


@pytest.mark.parametrize(("quant_type", "quant_storage"), [("nf4", torch.uint8), ("fp4", torch.bfloat16)])
def test_batched_generation_matches_the_dequantized_float64_model(quant_type, quant_storage):
    model = quantized(tiny_llama(), quant_type, quant_storage)
    ref = dequantized(model)
    ids, mask = left_padded_batch()
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        ref_logits = ref(ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(logits[valid].double(), ref_logits[valid], rtol=0, atol=1e-4)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    tokens = model.generate(ids, **kwargs)  # prefill of 27 rows (dequantize + matmul), then 3-row gemv steps
    assert torch.equal(tokens, ref.generate(ids, **kwargs))
    assert torch.equal(tokens, model.generate(ids, use_cache=False, **kwargs))
    for row, pad in enumerate((0, 3, 6)):  # each prompt alone (1-row gemv steps) gives its row's tokens
        alone = model.generate(ids[row : row + 1, pad:], max_new_tokens=8, do_sample=False)[0]
        assert torch.equal(alone, tokens[row, pad : pad + len(alone)])  # the batch pads a row ended by EOS
        assert (tokens[row, pad + len(alone) :] == 0).all()
    with torch.inference_mode():
        assert torch.equal(model.generate(ids, **kwargs), tokens)
    torch.manual_seed(5)
    sampled = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True)
    torch.manual_seed(5)
    assert torch.equal(sampled, ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True))


def test_moving_a_4bit_weight_to_meta_leaves_the_source_intact():
    """``weight.to("meta")`` (accelerate's offloading hooks make one of each weight) moved the statistics shared with
    the source to meta in place: the model then failed with "absmax is on meta, packed on cpu"."""
    model = quantized(tiny_llama(), "nf4", torch.uint8)
    ids, mask = left_padded_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    tokens = model.generate(ids, **kwargs)
    weight = model.model.layers[0].self_attn.q_proj.weight
    absmax = weight.quant_state.absmax.clone()
    on_meta = weight.to("meta")
    assert on_meta.is_meta and on_meta.quant_state.absmax.is_meta
    assert on_meta.quant_state.shape == weight.quant_state.shape
    assert torch.equal(weight.quant_state.absmax, absmax)
    assert torch.equal(model.generate(ids, **kwargs), tokens)


def test_accelerate_offloading_names_the_missing_quant_state():
    """accelerate's offloading rebuilds each weight from its words alone (the statistics stay behind in its weights
    map): the error said the weight was never quantized and to call .to(device), which the user had done."""
    accelerate = pytest.importorskip("accelerate")
    model = accelerate.cpu_offload(quantized(tiny_llama(), "nf4", torch.uint8), execution_device=torch.device("cpu"))
    ids, mask = left_padded_batch()
    with pytest.raises(RuntimeError, match=r"packed 4-bit words without their quant state .*accelerate's offloading"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False)


def test_a_float64_input_names_compute_dtype():
    """``model.double()`` on a 4-bit model: a float64 input to a layer without compute_dtype raised matmul's
    "A.dtype must be one of ..." (an argument the caller never named); it names x and compute_dtype, and with a
    compute_dtype the layer returns float64."""
    layer = bnb.nn.Linear4bit(64, 32, quant_type="nf4").to("cpu")
    x = torch.randn(2, 64, dtype=torch.float64)
    message = (
        "x is torch.float64 and this Linear4bit has no compute_dtype: it computes in one of (torch.float16, "
        "torch.bfloat16, torch.float32); set the layer's compute_dtype (e.g. torch.float32) or cast x"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        layer(x)
    layer.compute_dtype = torch.float32
    assert layer(x).dtype == torch.float64
