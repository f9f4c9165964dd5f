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


def test_safetensors_reader_refuses_a_tensor_in_two_files(tmp_path):
    """Two files holding one key (a stale shard beside a new one): which value the model should get is unknown, so
    the reader refuses instead of silently taking the last file's."""
    from safetensors.torch import save_file

    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": torch.ones(3)}, first)
    save_file({"w": torch.full((3,), 2.0), "b": torch.zeros(2)}, second)
    with pytest.raises(ValueError) as err:
        loading.safetensors_reader([first, second])
    assert str(err.value) == f"checkpoint tensor 'w' is in two files: {first} and {second}"
    with pytest.raises(TypeError, match=r"paths must be a path \(str or os.PathLike\) or an iterable of paths, got 3"):
        loading.safetensors_reader(3)


def test_safetensors_reader_takes_a_sharded_checkpoint_by_index_or_folder(tmp_path):
    """A Hugging Face checkpoint sharded over several files is read through its index json or its folder: the same
    keys and bytes as the files listed one by one (the index or the folder itself is no safetensors file)."""
    import json

    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(3)
    tensors = {f"layer{i}.weight": torch.randn(4, 5, generator=gen).to(torch.bfloat16) for i in range(4)}
    files = {}
    for i, key in enumerate(sorted(tensors)):
        name = f"model-0000{i % 2 + 1}-of-00002.safetensors"
        files.setdefault(name, {})[key] = tensors[key]
    for name, part in files.items():
        save_file(part, tmp_path / name)
    weight_map = {key: name for name, part in files.items() for key in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for source in (tmp_path / "model.safetensors.index.json", tmp_path, str(tmp_path)):
        read, keys = loading.safetensors_reader(source)
        assert keys == set(tensors)
        for key, value in tensors.items():
            got = read(key)
            assert got.dtype == value.dtype and torch.equal(got.view(torch.int16), value.view(torch.int16)), key
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        loading.safetensors_reader(tmp_path / "empty")
    assert str(err.value) == f"no model.safetensors or model.safetensors.index.json in {tmp_path / 'empty'}"


def test_a_4bit_checkpoint_of_another_format_sets_the_layers_attributes():
    """A bitsandbytes-format weight is taken as it is (FP4 without double quant, uint8 words, into a layer built as
    NF4 with double quant in bf16 storage): its bytes, and the layer's quant_type, compress_statistics and
    quant_storage describe it, as after Linear4bit's load_state_dict."""
    from fsdp4bit.functional import packed_bytes

    torch.manual_seed(4)
    source = Linear4bit(96, 64, bias=True, quant_type="fp4", compress_statistics=False).to("cpu")
    state = {"proj." + k: v for k, v in source.state_dict().items()}
    model = _Storage(torch.bfloat16)
    model.proj.bias = nn.Parameter(torch.empty(64, device="meta"))
    loading.materialize(model, "", state.__getitem__, set(state), torch.device("cpu"))
    layer = model.proj
    assert torch.equal(packed_bytes(layer.weight), packed_bytes(source.weight))
    assert layer.weight.quant_state == source.weight.quant_state
    assert torch.equal(layer.bias, source.bias)
    assert (layer.quant_type, layer.compress_statistics, layer.quant_storage) == ("fp4", False, torch.uint8)


def test_a_meta_buffer_takes_its_template_dtype():
    """A persistent buffer built on meta loads in its own dtype, as load_state_dict copies into it (a bf16 checkpoint
    entry does not turn a float32 buffer into bf16)."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("scale", torch.empty(5, device="meta"))

    value = torch.tensor([1.0, 0.5, 3.0, -2.0, 1.5], dtype=torch.bfloat16)
    model = Scaled()
    loading.materialize(model, "", {"scale": value}.__getitem__, {"scale"}, torch.device("cpu"))
    assert model.scale.dtype == torch.float32 and torch.equal(model.scale, value.double().float())


def test_load_sharded_checks_its_arguments():
    """Arguments that failed later with unrelated messages (a dtype taken as a device string, isinstance on a list)
    are refused up front, naming the argument; a list of block types is taken, as in shard_model."""
    state, ref = _checkpoint()

    def fresh() -> _TinyLM:
        with torch.device("meta"):
            model = _TinyLM()
        model.inv_freq = ref.inv_freq.clone()
        return model

    load = dict(device="cpu", shard=lambda module: None)
    model = loading.load_sharded(fresh(), state.__getitem__, set(state), block_types=[_Block], **load)
    ids = torch.randint(0, 32, (2, 5))
    assert torch.equal(model(ids), ref(ids))
    cases = [
        (
            dict(block_types=(_Block,), dtype="bfloat16"),
            ValueError,
            "dtype must be one of (torch.float16, torch.bfloat16, torch.float32), got bfloat16",
        ),
        (
            dict(block_types=None),
            TypeError,
            "block_types must be a tuple of torch.nn.Module classes, got None",
        ),
        (
            dict(block_types=(_Block,), read=state),
            TypeError,
            "read must be a callable key -> torch.Tensor (e.g. safetensors_reader's), got OrderedDict",
        ),
        (
            dict(block_types=(_Block,), read=lambda key: state[key].numpy() if key == "embed.weight" else state[key]),
            TypeError,
            "read('embed.weight') must return a torch.Tensor, got ndarray",
        ),
    ]
    for kwargs, kind, message in cases:
        read = kwargs.pop("read", state.__getitem__)
        with pytest.raises(kind) as err:
            loading.load_sharded(fresh(), read, set(state), **kwargs, **load)
        assert str(err.value) == message


def test_an_invalid_4bit_entry_names_its_checkpoint_key():
    """A bitsandbytes-format weight with a statistic missing or of another size says which weight it is (a model
    has hundreds), and the layer stays on meta."""
    torch.manual_seed(2)
    source = Linear4bit(96, 64, bias=False, quant_type="nf4").to("cpu")
    state = {"proj." + k: v for k, v in source.state_dict().items()}
    del state["proj.weight.quant_map"]
    model = _Storage(torch.uint8)
    with pytest.raises(ValueError) as err:
        loading.materialize(model, "", state.__getitem__, set(state), torch.device("cpu"))
    assert str(err.value) == (
        "checkpoint tensor 'proj.weight' is not a valid 4-bit weight: quant state is missing tensors ['quant_map']"
    )
    assert model.proj.weight.is_meta


def test_hf_tied_model_built_under_init_empty_weights_loads_tied():
    """accelerate.init_empty_weights (which the buffer error recommends) re-registers every parameter, so a tied
    transformers model comes out untied and its lm_head.weight, absent from a tied checkpoint, failed to load:
    load_sharded ties it as from_pretrained does, and the model computes what the source model computes."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )

    def to_4bit(model: nn.Module) -> None:
        for name, module in list(model.named_modules()):
            if type(module) is nn.Linear and name != "lm_head":
                parent, _, child = name.rpartition(".")
                device = module.weight.device
                layer = Linear4bit(module.in_features, module.out_features, bias=False, quant_type="nf4", device=device)
                if device.type != "meta":
                    layer.weight.data = module.weight.data.clone()
                setattr(model.get_submodule(parent), child, layer)

    torch.manual_seed(0)
    ref = LlamaForCausalLM(config)
    to_4bit(ref)
    ref = ref.to("cpu")
    state = {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}  # saved tied: one name
    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(config)
    to_4bit(model)
    loading.load_sharded(
        model, state.__getitem__, set(state), block_types=(LlamaDecoderLayer,), device="cpu", shard=lambda m: None
    )
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model(ids).logits, ref(ids).logits)
