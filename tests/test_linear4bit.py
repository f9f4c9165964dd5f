"""The behaviour spec (bitsandbytes' test_linear4bit.py, as designed in shared/seed), run against fsdp4bit.

Every case runs on CPU (no CPU skips) and on CUDA where a GPU exists.
"""

from __future__ import annotations

import copy
import os
import pickle
from tempfile import TemporaryDirectory

import pytest
import torch
from helpers import (
    STORAGE,
    TRUE_FALSE,
    describe_dtype,
    get_available_devices,
    id_formatter,
    skip_if_no_device,
    torch_load_from_buffer,
    torch_save_to_buffer,
)

import fsdp4bit as bnb


@pytest.mark.parametrize("device", get_available_devices())
@pytest.mark.parametrize("quant_storage", ["uint8", "float16", "bfloat16", "float32"])
@pytest.mark.parametrize("original_dtype", [torch.float16, torch.bfloat16], ids=describe_dtype)
@pytest.mark.parametrize("bias", TRUE_FALSE, ids=id_formatter("bias"))
@pytest.mark.parametrize("compress_statistics", TRUE_FALSE, ids=id_formatter("compress_statistics"))
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("save_before_forward", TRUE_FALSE, ids=id_formatter("save_before_forward"))
def test_linear_serialization(
    device, quant_type, original_dtype, compress_statistics, bias, quant_storage, save_before_forward
):
    skip_if_no_device(device)
    layer_shape = (300, 400)
    linear = torch.nn.Linear(*layer_shape, dtype=original_dtype, device="cpu")

    def make(storage=None):
        kwargs = {} if storage is None else {"quant_storage": storage}
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=bias,
            compute_dtype=None,
            compress_statistics=compress_statistics,
            quant_type=quant_type,
            device="meta",
            **kwargs,
        )
        return layer

    linear_q = make()
    linear_q.weight = bnb.nn.Params4bit(data=linear.weight, quant_type=quant_type, requires_grad=False)
    if bias:
        linear_q.bias = torch.nn.Parameter(linear.bias)
    linear_q = linear_q.to(device)

    # rebuild a second layer from the first one's state dict
    sd = linear_q.state_dict()
    bias_data2 = sd.pop("bias", None)
    weight_data2 = sd.pop("weight")
    weight2 = bnb.nn.Params4bit.from_prequantized(quantized_stats=sd, data=weight_data2, device=device)
    linear_q2 = make()
    linear_q2.weight = weight2
    if bias:
        linear_q2.bias = torch.nn.Parameter(bias_data2)
    linear_q2 = linear_q2.to(device)

    # a third layer storing the same bytes in another dtype
    linear_qs = make(STORAGE[quant_storage])
    linear_qs.weight = bnb.nn.Params4bit(
        data=linear.weight, requires_grad=False, quant_type=quant_type, quant_storage=STORAGE[quant_storage]
    )
    if bias:
        linear_qs.bias = torch.nn.Parameter(linear.bias)
    linear_qs = linear_qs.to(device)

    a, b = linear_q.weight, linear_q2.weight
    assert a.device == b.device
    assert a.dtype == b.dtype
    assert torch.equal(a, b)

    q0, q1 = a.quant_state, b.quant_state
    for attr in ("code", "dtype", "blocksize", "absmax"):
        c, d = getattr(q0, attr), getattr(q1, attr)
        if isinstance(c, torch.Tensor):
            assert torch.equal(c, d)
        else:
            assert c == d, f"{c} != {d}"
    if q0.state2 is not None:
        for attr in ("code", "dtype", "blocksize", "absmax"):
            c, d = getattr(q0.state2, attr), getattr(q1.state2, attr)
            if isinstance(c, torch.Tensor):
                assert torch.equal(c, d)
            else:
                assert c == d, f"{c} != {d}"

    if bias:
        a, b = linear_q.bias, linear_q2.bias
        assert a.device == b.device
        assert a.dtype == b.dtype
        assert torch.equal(a, b)

    if save_before_forward:
        bytes_4bit = torch_save_to_buffer(linear_q)

    x = torch.rand(42, layer_shape[0], device=device)
    a = linear_q(x)
    b = linear_q2(x)
    c = linear_qs(x)
    assert a.device == b.device == c.device
    assert a.dtype == b.dtype == c.dtype
    assert torch.equal(a, b)
    assert torch.equal(a, c)

    if not save_before_forward:
        bytes_4bit = torch_save_to_buffer(linear_q)
    linear_q3 = torch_load_from_buffer(bytes_4bit)

    if device != "cpu":
        linear_q2.to("cpu")
        linear_q2.to(device)
    d = linear_qs(x)
    assert c.dtype == d.dtype
    assert c.device == d.device
    assert torch.equal(c, d)

    d = linear_q3(x)
    assert c.dtype == d.dtype
    assert c.device == d.device
    assert torch.equal(c, d)

    with TemporaryDirectory() as tmpdir:
        state_path_4bit = os.path.join(tmpdir, "state_4bit.pth")
        state_path = os.path.join(tmpdir, "state.pth")
        torch.save(linear.state_dict(), state_path)
        torch.save(linear_q.state_dict(), state_path_4bit)
        size_orig, size_4 = os.path.getsize(state_path), os.path.getsize(state_path_4bit)
        target_compression = 0.143 if original_dtype == torch.float32 else 0.29
        assert size_4 / size_orig < target_compression, (
            f"quantized_size {size_4:,} is larger on disk than {target_compression:.2%} of original size {size_orig:,}"
        )


def _param(device, quant_type, blocksize, compress_statistics):
    return bnb.nn.Params4bit(
        data=torch.randn(300, 400),
        quant_type=quant_type,
        blocksize=blocksize,
        compress_statistics=compress_statistics,
        requires_grad=False,
    ).to(device)


@pytest.mark.parametrize("device", get_available_devices())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("compress_statistics", TRUE_FALSE, ids=id_formatter("compress_statistics"))
def test_copy_param(device, quant_type, blocksize, compress_statistics):
    skip_if_no_device(device)
    param = _param(device, quant_type, blocksize, compress_statistics)
    shallow_copy_param = copy.copy(param)
    assert param.quant_state is shallow_copy_param.quant_state
    assert param.data.data_ptr() == shallow_copy_param.data.data_ptr()


@pytest.mark.parametrize("device", get_available_devices())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_params4bit_torch_chunk_split(device, quant_type):
    """torch.chunk / torch.split keep the Params4bit subclass and its metadata (what FSDP2 relies on)."""
    skip_if_no_device(device)
    original_tensor = torch.randn(8, 4, dtype=torch.float16, device="cpu")
    params4bit = bnb.nn.Params4bit(data=original_tensor, quant_type=quant_type, requires_grad=False)
    if device != "cpu":
        params4bit = params4bit.to(device)

    chunks = torch.chunk(params4bit, 2, dim=0)
    assert isinstance(chunks, tuple)
    for chunk in chunks:
        assert isinstance(chunk, bnb.nn.Params4bit)
        assert hasattr(chunk, "quant_type")
        assert chunk.quant_type == params4bit.quant_type

    splits = torch.split(params4bit, 2, dim=0)
    assert isinstance(splits, tuple)
    assert len(splits) > 0
    for split in splits:
        assert isinstance(split, bnb.nn.Params4bit)
        assert hasattr(split, "quant_type")
        assert split.quant_type == params4bit.quant_type


@pytest.mark.parametrize("device", get_available_devices())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize(
    "quant_storage", [torch.uint8, torch.float16, torch.bfloat16, torch.float32], ids=describe_dtype
)
def test_quant_storage_shard_roundtrip(device, quant_type, quant_storage):
    """Packed weights survive FSDP's flatten → chunk → concatenate pattern byte for byte."""
    skip_if_no_device(device)
    M, K = 256, 128
    A = torch.randn(1, K, dtype=torch.float16, device=device)
    B = torch.randn(M, K, dtype=torch.float16, device=device)
    qB, state = bnb.functional.quantize_4bit(B, quant_type=quant_type, quant_storage=quant_storage)
    ref = bnb.functional.gemv_4bit(A, qB.t(), state=state)

    flat = qB.flatten()
    shards = flat.chunk(4)
    reassembled = torch.cat(shards).reshape(qB.shape)
    assert reassembled.dtype == qB.dtype
    assert torch.equal(reassembled.view(torch.uint8), qB.view(torch.uint8)), "Bytes changed after shard roundtrip"

    out = bnb.functional.gemv_4bit(A, reassembled.t(), state=state)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("device", get_available_devices())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("compress_statistics", TRUE_FALSE, ids=id_formatter("compress_statistics"))
def test_deepcopy_param(device, quant_type, blocksize, compress_statistics):
    skip_if_no_device(device)
    param = _param(device, quant_type, blocksize, compress_statistics)
    dict_keys_before = set(param.__dict__.keys())
    copy_param = copy.deepcopy(param)
    dict_keys_after = set(param.__dict__.keys())
    dict_keys_copy = set(copy_param.__dict__.keys())

    assert param.quant_state is not copy_param.quant_state
    assert param.data.data_ptr() != copy_param.data.data_ptr()
    assert dict_keys_before == dict_keys_after
    assert dict_keys_before == dict_keys_copy


@pytest.mark.parametrize("device", get_available_devices())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128])
@pytest.mark.parametrize("compress_statistics", TRUE_FALSE, ids=id_formatter("compress_statistics"))
def test_params4bit_real_serialization(device, quant_type, blocksize, compress_statistics):
    skip_if_no_device(device)
    original_param = bnb.nn.Params4bit(
        data=torch.randn(300, 400),
        quant_type=quant_type,
        blocksize=blocksize,
        compress_statistics=compress_statistics,
    )
    dict_keys_before = set(original_param.__dict__.keys())
    original_param.to(device)  # quantizes in place
    assert original_param.quant_state is not None

    deserialized_param = pickle.loads(pickle.dumps(original_param))
    dict_keys_after = set(original_param.__dict__.keys())
    dict_keys_deserialized = set(deserialized_param.__dict__.keys())

    assert torch.equal(original_param.data, deserialized_param.data)
    assert original_param.requires_grad == deserialized_param.requires_grad is False
    assert original_param.quant_type == deserialized_param.quant_type
    assert original_param.blocksize == deserialized_param.blocksize
    assert original_param.compress_statistics == deserialized_param.compress_statistics
    assert original_param.quant_state == deserialized_param.quant_state
    assert dict_keys_before == dict_keys_after
    assert dict_keys_before == dict_keys_deserialized


@pytest.mark.slow
@pytest.mark.parametrize("device", get_available_devices())
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float32], ids=describe_dtype)
@pytest.mark.parametrize("compress_statistics", TRUE_FALSE, ids=id_formatter("compress_statistics"))
@pytest.mark.parametrize("bias", TRUE_FALSE, ids=id_formatter("bias"))
@pytest.mark.parametrize("fullgraph", TRUE_FALSE, ids=id_formatter("fullgraph"))
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"], ids=id_formatter("mode"))
def test_linear4bit_torch_compile(device, quant_type, compute_dtype, compress_statistics, bias, fullgraph, mode):
    skip_if_no_device(device)
    dim, batch_size = 256, 16
    torch.compiler.reset()
    net = torch.nn.Sequential(
        *[
            bnb.nn.Linear4bit(
                dim,
                dim,
                bias=bias,
                compute_dtype=compute_dtype,
                compress_statistics=compress_statistics,
                quant_type=quant_type,
            )
            for _ in range(4)
        ]
    ).to(device)
    x = torch.randn(batch_size, dim, dtype=compute_dtype, device=device)

    with torch.no_grad():
        ref_output = net(x)
    compiled_net = torch.compile(net, fullgraph=fullgraph, mode=mode, backend="inductor")
    with torch.no_grad():
        compiled_output = compiled_net(x)

    assert compiled_output.shape == ref_output.shape
    assert compiled_output.device == ref_output.device
    assert compiled_output.dtype == ref_output.dtype
    torch.testing.assert_close(compiled_output, ref_output)

    x.requires_grad_(True)
    net(x).sum().backward()
    grad_ref = x.grad.clone()
    x.grad = None
    compiled_net(x).sum().backward()
    grad_compiled = x.grad.clone()
    torch.testing.assert_close(grad_compiled, grad_ref)
