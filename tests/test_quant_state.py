"""QuantState as a user's object: bitsandbytes' dict format both ways, copies, moves, malformed dicts."""

from __future__ import annotations

import copy
import io
import json
import pickle
import re

import numpy as np
import pytest
import torch

import fsdp4bit.functional as F
from fsdp4bit.codebooks import BLOCKSIZES, get_4bit_code, get_dynamic_map
from fsdp4bit.quant_state import QuantState, pack_dict_to_tensor, unpack_tensor_to_dict

BLOB = "quant_state.bitsandbytes__nf4"


def raises(exc: type[Exception], message: str):
    """pytest.raises for exactly ``message``."""
    return pytest.raises(exc, match=f"^{re.escape(message)}$")


def _state(nested: bool = True, shape: tuple[int, ...] = (300 * 64 + 5,), blocksize: int = 64, quant_type="nf4"):
    """A quantized weight's QuantState (300 blocks + a short one: two nested blocks)."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)[1]


def _with_json(d: dict, **fields) -> dict:
    """``d`` (packed) with its JSON blob's ``fields`` replaced."""
    meta = {**unpack_tensor_to_dict(d[BLOB]), **fields}
    return {**d, BLOB: pack_dict_to_tensor(meta)}


def _bits(state: QuantState) -> list[bytes]:
    """Every tensor of ``state`` (nested ones too) as raw bytes, and its packed JSON."""
    d = state.as_dict(packed=True)
    return [bytes(d[k].contiguous().view(torch.uint8).tolist()) for k in sorted(d)]


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("shape", [(7,), (3, 5, 33), (1000 * 3 + 1,)])
@pytest.mark.parametrize("nested", [False, True])
def test_dict_copies_and_saves_keep_every_bit(blocksize, shape, nested):
    state = _state(nested, shape, blocksize, "fp4" if blocksize % 128 else "nf4")
    copies = [
        QuantState.from_dict(state.as_dict(packed=True), "cpu"),
        QuantState.from_dict(state.as_dict(), None),
        copy.deepcopy(state),
        pickle.loads(pickle.dumps(state)),
    ]
    buffer = io.BytesIO()
    torch.save(state.as_dict(packed=True), buffer)
    buffer.seek(0)
    copies.append(QuantState.from_dict(torch.load(buffer, weights_only=True), "cpu"))
    for other in copies:
        assert other == state and _bits(other) == _bits(state)
        assert other.nested == nested and other.shape == torch.Size(shape)
    absmax, shape_, dtype, blocksize_, compressed, quant_type = state  # bitsandbytes' legacy list layout
    assert (shape_, dtype, blocksize_, quant_type) == (torch.Size(shape), torch.float32, blocksize, state.quant_type)
    assert absmax is state.absmax and (compressed is None) == (not nested)


# ------------------------------------------------------------------------------ malformed dicts
def test_packed_json_must_be_a_1d_uint8_tensor():
    d = _state().as_dict(packed=True)
    for blob in (d[BLOB].view(1, -1), torch.tensor(5, dtype=torch.uint8), d[BLOB].long()):
        message = (
            f"{BLOB!r} must be a 1-D uint8 tensor of UTF-8 JSON, got a {blob.dtype} tensor of shape {tuple(blob.shape)}"
        )
        with raises(ValueError, message):
            QuantState.from_dict({**d, BLOB: blob}, "cpu")


def test_unexpected_json_fields_raise():
    d = _state().as_dict(packed=True)
    accepted = "['blocksize', 'dtype', 'nested_blocksize', 'nested_dtype', 'nested_offset', 'quant_type', 'shape']"
    for field in ("foo", "absmax"):
        with raises(ValueError, f"{BLOB!r} holds unexpected JSON fields [{field!r}]; accepted: {accepted}"):
            QuantState.from_dict(_with_json(d, **{field: 1}), "cpu")


def test_partial_nested_entries_name_what_is_missing():
    """A state that lost part of its double quant raises (it loaded as a plain state with uint8 codes as absmax)."""
    d = _state(nested=True).as_dict(packed=True)
    meta = unpack_tensor_to_dict(d[BLOB])
    del meta["nested_offset"]
    partial = {k: v for k, v in d.items() if k != "nested_absmax"}
    with raises(ValueError, "double-quantized state is missing 'nested_offset'"):
        QuantState.from_dict({**partial, BLOB: pack_dict_to_tensor(meta)}, "cpu")
    plain = _state(nested=False).as_dict(packed=True)
    with raises(ValueError, "double-quantized state is missing 'nested_blocksize'"):
        QuantState.from_dict({**plain, "nested_quant_map": get_dynamic_map()}, "cpu")


def test_absmax_dtypes_are_checked_when_loading():
    plain, nested = _state(nested=False).as_dict(), _state(nested=True).as_dict()
    for dtype in (torch.float16, torch.uint8):
        with raises(ValueError, f"absmax must be float32 without double quantization, got {dtype}"):
            QuantState.from_dict({**plain, "absmax": plain["absmax"].to(dtype)}, "cpu")
        with raises(ValueError, f"nested_absmax must be float32, got {dtype}"):
            QuantState.from_dict({**nested, "nested_absmax": nested["nested_absmax"].to(dtype)}, "cpu")


def test_entries_of_two_weights_raise():
    d = {"a.weight." + k: v for k, v in _state().as_dict().items()}
    d.update({"b.weight." + k: v for k, v in _state(nested=False).as_dict().items()})
    with raises(
        ValueError,
        "quant-state entry 'quant_type' given twice, as 'a.weight.quant_type' and 'b.weight.quant_type' "
        "(one weight's only)",
    ):
        QuantState.from_dict(d, "cpu")


def test_numpy_numbers_load_as_plain_numbers():
    """bitsandbytes takes them (it stores what it is given); the state and its JSON get plain ints and floats."""
    state = _state()
    d = state.as_dict()
    d.update(
        blocksize=np.int64(64),
        nested_blocksize=np.int32(256),
        shape=(np.int64(300 * 64 + 5),),
        nested_offset=np.float64(state.offset.item()),
    )
    loaded = QuantState.from_dict(d, "cpu")
    assert loaded == state and _bits(loaded) == _bits(state)
    assert type(loaded.blocksize) is int and type(loaded.state2.blocksize) is int and type(loaded.shape[0]) is int


def test_from_dict_without_device_keeps_the_offset_with_the_statistics():
    """device=None leaves the tensors in place; the offset was made on torch's default device (here: meta)."""
    state = _state()
    d = state.as_dict(packed=True)
    with torch.device("meta"):
        loaded = QuantState.from_dict(d, None)
    assert loaded.offset.device == state.absmax.device
    assert loaded == state and _bits(loaded) == _bits(state)


def test_a_quant_map_that_is_not_the_quant_types_table_is_refused():
    """The kernels decode by quant_type, so a saved quant_map of another table (a corrupt or hand-edited checkpoint)
    was ignored silently; bitsandbytes' FP4 table (+0.0 at index 8, fsdp4bit's has -0.0) and a meta one load."""
    for quant_type, other in (("nf4", "fp4"), ("fp4", "nf4")):
        d = _state(quant_type=quant_type).as_dict()
        d["quant_map"] = get_4bit_code(other)
        message = (
            f"quant_map does not hold the {quant_type} code table that quant_type names (the kernels decode by "
            "quant_type): the checkpoint's quant_map or quant_type is corrupt"
        )
        with raises(ValueError, message):
            QuantState.from_dict(d, "cpu")
        d["quant_map"] = get_4bit_code(quant_type)
        d["quant_map"][3] = d["quant_map"][3].nextafter(torch.tensor(2.0))
        with raises(ValueError, message):
            QuantState.from_dict(d, "cpu")
    d = _state(quant_type="fp4").as_dict()
    d["quant_map"] = get_4bit_code("fp4")
    assert d["quant_map"][8].signbit()
    d["quant_map"][8] = 0.0
    assert QuantState.from_dict(d, "cpu").quant_type == "fp4"
    d["quant_map"] = torch.empty(16, device="meta")
    assert QuantState.from_dict(d, None).code.is_meta


def test_shape_that_is_a_generator_is_checked():
    with raises(ValueError, "shape must be a sequence of non-negative ints, got (2, -3)"):
        QuantState(torch.ones(1), shape=(s for s in (2, -3)))
    assert QuantState(torch.ones(1), shape=(s for s in (2, 3))).shape == torch.Size([2, 3])


# ------------------------------------------------------------------------------ moves
def test_to_refuses_a_dtype_and_moves_a_partial_state():
    state = _state()
    before = _bits(state)
    with raises(TypeError, "QuantState.to takes a device (the statistics keep their dtypes), got torch.bfloat16"):
        state.to(torch.bfloat16)
    assert _bits(state) == before
    assert state.to("cpu") is state and _bits(state) == before
    partial = QuantState(torch.ones(3)).to("meta")  # no code table: bitsandbytes' to() raised AttributeError
    assert partial.absmax.is_meta and partial.code is None


def test_code_tables_take_device_zero_as_the_first_accelerator():
    """``device=0`` is cuda:0 (torch's meaning), not the CPU (it was taken as falsy)."""
    for table in (lambda d: get_4bit_code("nf4", d), get_dynamic_map):
        assert table(None).device == torch.device("cpu")
        if torch.cuda.is_available():
            assert table(0).device == torch.device("cuda", 0)
        else:
            with pytest.raises(RuntimeError):
                table(0)


def test_bitsandbytes_states_load_bit_for_bit():
    """Optional interop: a state bitsandbytes made (its packed dict) loads with the same tensors and JSON."""
    bnbF = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(3, 5, 33, generator=torch.Generator().manual_seed(1))
    for nested in (False, True):
        _, theirs = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
        d = theirs.as_dict(packed=True)
        loaded = QuantState.from_dict(dict(d), "cpu")
        mine = loaded.as_dict(packed=True)
        assert sorted(mine) == sorted(d)
        assert all(bytes(mine[k].view(torch.uint8).tolist()) == bytes(d[k].view(torch.uint8).tolist()) for k in d)
        assert json.loads(bytes(mine[BLOB].tolist()))["shape"] == [3, 5, 33]


def test_packed_json_keeps_its_bytes_under_another_default_device():
    """as_dict(packed=True) under ``torch.device("meta")`` (a model built there, then saved) keeps the JSON bytes:
    the blob is made on the CPU whatever the default device."""
    _, state = F.quantize_4bit(torch.randn(8, 64), quant_type="nf4", compress_statistics=True)
    want = state.as_dict(packed=True)["quant_state.bitsandbytes__nf4"]
    with torch.device("meta"):
        blob = state.as_dict(packed=True)["quant_state.bitsandbytes__nf4"]
    assert blob.device.type == "cpu" and torch.equal(blob, want)
