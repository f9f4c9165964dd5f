"""The trainer's model loading (``fsdp4bit.train.model`` / ``lora``), in process on CPU with the embedded model.

The trainer builds the model on the meta device, attaches LoRA there, and loads, initialises and shards one
decoder block at a time. These tests check that contract (each block is handed over complete, before any later
block is read) and that the result is the model the straightforward way builds: the same 4-bit bytes and
statistics, the same adapter values (peft's own initialisation, same seed) and the same logits.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from helpers import assert_same_parameters
from torch import nn

from fsdp4bit.nn import Linear4bit
from fsdp4bit.train.config import load_config
from fsdp4bit.train.lora import AdapterInit, attach_lora, is_adapter
from fsdp4bit.train.model import build_model, decoder_blocks, load_blocks, resolve_model_path

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cfg():
    return load_config(REPO / "configs" / "cpu_tiny.toml")


def _meta(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.is_meta]


def test_blocks_are_finished_as_they_load(cfg) -> None:
    model = build_model(cfg.model)
    attach_lora(model, cfg.lora, seed=0)
    init_adapters = AdapterInit()
    blocks = [block for _, block in decoder_blocks(model)]
    assert len(blocks) == 4 and all(_meta(b) for b in blocks)
    seen: list[nn.Module] = []

    def finish(module: nn.Module) -> None:
        if module is not model:
            index = len(seen)
            assert module is blocks[index]
            # the block is complete but for its adapters, which finish initialises; later blocks are unread
            assert _meta(module) and all(is_adapter(n) for n in _meta(module))
            assert all(p.is_meta for later in blocks[index + 1 :] for p in later.parameters())
        else:
            assert len(seen) == 4
        assert init_adapters(module) == (7 if module is not model else 0)
        assert not _meta(module)
        seen.append(module)

    load_blocks(model, cfg.model, CPU, finish)
    assert seen == [*blocks, model]


def test_meta_load_builds_the_same_model_as_loading_first(cfg) -> None:
    """Meta-device adapters initialised block by block equal peft's adapters on a loaded base, bit for bit."""
    direct = build_model(cfg.model)
    load_blocks(direct, cfg.model, CPU, lambda module: None)
    direct_peft = attach_lora(direct, cfg.lora, seed=3)
    assert not _meta(direct_peft)

    meta = build_model(cfg.model)
    meta_peft = attach_lora(meta, cfg.lora, seed=3)
    init_adapters = AdapterInit()

    def finish(module: nn.Module) -> None:
        torch.rand(7)  # other draws between blocks (dropout, data order) must not change the adapters
        init_adapters(module)

    load_blocks(meta, cfg.model, CPU, finish)

    assert_same_parameters(meta_peft, direct_peft)
    for (name, m), (_, ref) in zip(meta.named_modules(), direct.named_modules(), strict=True):
        if isinstance(m, Linear4bit):
            got_state, want_state = (
                m.weight.quant_state.as_dict(packed=True),
                ref.weight.quant_state.as_dict(packed=True),
            )
            assert got_state.keys() == want_state.keys(), name
            for key in got_state:
                assert torch.equal(got_state[key], want_state[key]), (name, key)
    assert any(is_adapter(n) and "lora_A" in n and v.abs().sum() > 0 for n, v in meta_peft.named_parameters())
    ids = torch.arange(100, 164).view(1, 64)
    with torch.no_grad():
        torch.testing.assert_close(meta_peft(ids).logits, direct_peft(ids).logits, rtol=0, atol=0)


def test_a_tensor_missing_from_a_block_fails_before_that_block_is_finished(cfg, tmp_path) -> None:
    """A block the checkpoint cannot fill is reported by name before it is handed over (sharded)."""
    from safetensors.torch import load_file, save_file

    source = resolve_model_path(cfg.model)
    tensors = {
        k: v
        for k, v in load_file(source / "model.safetensors").items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < 4
    }
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(source / "config.json", tmp_path / "config.json")
    model_cfg = dataclasses.replace(cfg.model, path=str(tmp_path))
    model = build_model(model_cfg)
    finished: list[nn.Module] = []
    with pytest.raises(
        ValueError, match=r"no tensor in the checkpoint for \['model\.layers\.1\.mlp\.down_proj\.weight'\]"
    ):
        load_blocks(model, model_cfg, CPU, finished.append)
    assert finished == [decoder_blocks(model)[0][1]]


def test_untied_embeddings_load_as_units_of_their_own(cfg, tmp_path) -> None:
    """With untied embeddings the input and output tables are each loaded and handed over (sharded) on their own,
    after the blocks and before the root, so no unit holds both vocabulary-sized tables; their values are the
    checkpoint's (two tensors, not one tied parameter)."""
    import json

    from safetensors.torch import load_file, save_file

    source = resolve_model_path(cfg.model)
    tensors = {
        k: v
        for k, v in load_file(source / "model.safetensors").items()
        if not k.startswith("model.layers.") or int(k.split(".")[2]) < 4
    }
    tensors["lm_head.weight"] = torch.randn(tensors["model.embed_tokens.weight"].shape).to(torch.bfloat16)
    save_file(tensors, tmp_path / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    model_cfg = dataclasses.replace(cfg.model, path=str(tmp_path))
    model = build_model(model_cfg)
    attach_lora(model, cfg.lora, seed=0)
    init_adapters = AdapterInit()
    blocks = [block for _, block in decoder_blocks(model)]
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    seen: list[nn.Module] = []

    def finish(module: nn.Module) -> None:
        if module is embed:
            assert head.weight.is_meta, "the output table is read after the input table is handed over"
        if module is model:
            assert not embed.weight.is_meta and not head.weight.is_meta
        init_adapters(module)
        assert not _meta(module)
        seen.append(module)

    load_blocks(model, model_cfg, CPU, finish)
    assert seen == [*blocks, embed, head, model]
    assert embed.weight is not head.weight
    dtype = embed.weight.dtype
    assert torch.equal(embed.weight, tensors["model.embed_tokens.weight"].to(dtype))
    assert torch.equal(head.weight, tensors["lm_head.weight"].to(dtype))


def test_replaced_linears_keep_the_models_bias_dtype() -> None:
    """A bf16 model's biases stay bf16 in its Linear4bit (FSDP2 needs one dtype for a unit's trainable parameters,
    and the loader casts each value to its template's dtype)."""
    from fsdp4bit.train.config import ModelConfig
    from fsdp4bit.train.model import replace_linears

    with torch.device("meta"):
        model = nn.Sequential(
            nn.Linear(8, 16, dtype=torch.bfloat16), nn.Linear(16, 4, bias=False, dtype=torch.bfloat16)
        )
    assert replace_linears(model, ModelConfig()) == 2
    assert isinstance(model[0], Linear4bit) and model[0].bias.dtype == torch.bfloat16 and model[0].bias.is_meta
    assert model[1].bias is None
