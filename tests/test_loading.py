"""fsdp4bit.loading on models as transformers builds them: tied embeddings and non-persistent buffers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import assert_same_parameters
from torch import nn

from fsdp4bit import loading
from fsdp4bit.nn import Linear4bit


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = Linear4bit(16, 16, bias=False, quant_type="nf4")


class _TinyLM(nn.Module):
    """Embedding and output head sharing one weight (``tie_word_embeddings``), a rotary-style non-persistent buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.block = _Block()
        self.head = nn.Linear(16, 32, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, 8) / 8), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) * self.inv_freq.repeat(2)
        return self.head(self.block.proj(h))


def _checkpoint() -> tuple[dict[str, torch.Tensor], _TinyLM]:
    torch.manual_seed(0)
    ref = _TinyLM().to("cpu")  # quantizes the block's weight
    state = ref.state_dict()
    del state["head.weight"]  # as save_pretrained writes a tied model: one name only
    return state, ref


def _load(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    return loading.load_sharded(
        model, state.__getitem__, set(state), block_types=(_Block,), device="cpu", shard=lambda module: None
    )


def test_tied_weights_load_once_and_stay_tied():
    state, ref = _checkpoint()
    with torch.device("meta"):
        model = _TinyLM()
    model.inv_freq = ref.inv_freq.clone()  # built with real buffers (init_empty_weights(include_buffers=False))
    _load(model, state)
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.embed.weight, ref.embed.weight)
    ids = torch.randint(0, 32, (2, 5))
    assert torch.equal(model(ids), ref(ids))


def test_meta_buffer_missing_from_the_checkpoint_is_an_error():
    state, _ = _checkpoint()
    with torch.device("meta"):
        model = _TinyLM()
    with pytest.raises(ValueError) as err:
        _load(model, state)
    assert str(err.value) == (
        "non-persistent buffer 'inv_freq' is on the meta device and the checkpoint has no value for it (a "
        "non-persistent buffer such as a rotary table is computed when its module is built, never saved): build the "
        "model with real buffers, e.g. under accelerate.init_empty_weights(include_buffers=False)"
    )


def test_lora_attached_on_meta_loads_block_by_block():
    """peft adapters attached on the meta device: ``load_sharded`` reads the base through peft's ``base_layer``
    names and ``init`` (AdapterInit) gives the adapters peft's own values before each block is sharded, so the model
    equals peft on a loaded model; without ``init`` the first adapter is reported missing."""
    from peft import LoraConfig, get_peft_model

    from fsdp4bit.train.lora import AdapterInit

    state, ref = _checkpoint()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["proj"])
    torch.manual_seed(5)
    want = get_peft_model(ref, config)
    for init in (None, "adapters"):
        with torch.device("meta"):
            model = _TinyLM()
        model.inv_freq = ref.inv_freq.clone()
        torch.manual_seed(5)
        got = get_peft_model(model, config, low_cpu_mem_usage=True)
        sharded: list[nn.Module] = []
        load = dict(block_types=(_Block,), device="cpu", shard=sharded.append)
        if init is None:
            with pytest.raises(KeyError, match="checkpoint has no tensor 'block.proj.lora_A.default.weight'"):
                loading.load_sharded(model, state.__getitem__, set(state), **load)
            assert sharded == []
            continue
        loading.load_sharded(model, state.__getitem__, set(state), init=AdapterInit(), **load)
    assert sharded == [model.block, model]
    assert_same_parameters(got, want)
    ids = torch.randint(0, 32, (2, 5))
    assert torch.equal(got(ids), want(ids))


class _Storage(nn.Module):
    """One meta 4-bit layer of the given quant_storage (NF4, blocksize 64, double-quantized statistics)."""

    def __init__(self, storage: torch.dtype) -> None:
        super().__init__()
        self.proj = Linear4bit(96, 64, bias=False, quant_type="nf4", quant_storage=storage, device="meta")


def test_quantized_bytes_do_not_depend_on_the_storage_dtype():
    """A float32 checkpoint weight is quantized in the dtype its layer was built in (float32 here) whatever the
    layer's quant_storage (the bytes are the same in every storage dtype), and from its ``dtype`` cast when one is
    given (the trainer's ``model.dtype``): the bytes and statistics equal a direct quantization of those values."""
    from fsdp4bit.functional import packed_bytes, quantize_4bit

    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(7)) * 3
    state = {"proj.weight": weight}
    for dtype in (None, torch.bfloat16):
        source = weight if dtype is None else weight.to(dtype)
        packed, want = quantize_4bit(source, blocksize=64, compress_statistics=True, quant_type="nf4")
        for storage in (torch.uint8, torch.bfloat16, torch.float16, torch.float32):
            model = _Storage(storage)
            loading.materialize(model, "", state.__getitem__, set(state), torch.device("cpu"), dtype=dtype)
            got = model.proj.weight
            assert got.dtype == storage
            assert torch.equal(packed_bytes(got), packed_bytes(packed)), (dtype, storage)
            assert got.quant_state == want, (dtype, storage)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc/self/maps")
def test_safetensors_reader_leaves_no_file_mapped(tmp_path):
    """A read tensor holds its file's pages only while it lives: the reader keeps no file open (memory-mapped), so a
    block-by-block load does not keep every page it has read resident (the trainer's loader did, see NOTES)."""
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"a": torch.ones(4096), "b": torch.full((4096,), 2.0)}, path)
    read, keys = loading.safetensors_reader(path)
    assert keys == {"a", "b"}
    total = sum(float(read(key).sum()) for key in sorted(keys))
    assert total == 3 * 4096
    assert str(path) not in Path("/proc/self/maps").read_text()
