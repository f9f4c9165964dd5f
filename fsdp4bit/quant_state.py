"""QuantState: everything needed to undo 4-bit quantization, with bitsandbytes' state-dict format."""

from __future__ import annotations

import json
import numbers
from collections.abc import Iterator
from typing import Any

import torch

from .codebooks import (
    NESTED_BLOCKSIZE,
    QUANT_TYPES,
    as_blocksize,
    check_quant_type,
    check_stats_counts,
    get_4bit_code,
)

PACKED_KEY_PREFIX = "quant_state.bitsandbytes__"
_TENSOR_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_JSON_KEYS = ("quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset")
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _same_bits(a: Any, b: Any) -> bool:
    """Tensors equal bit for bit (so NaN statistics compare equal to themselves), anything else by ==."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        return torch.equal(
            a.detach().cpu().reshape(-1).view(torch.uint8), b.detach().cpu().reshape(-1).view(torch.uint8)
        )
    return a == b


def pack_dict_to_tensor(values: dict[str, Any]) -> torch.Tensor:
    """JSON-encode non-tensor state into a uint8 tensor (how bitsandbytes keeps it safetensors-friendly), on the CPU
    whatever the default device (under ``torch.device("meta")`` the bytes were lost)."""
    return torch.tensor(list(json.dumps(values).encode("utf-8")), dtype=torch.uint8, device="cpu")


def unpack_tensor_to_dict(tensor: torch.Tensor, key: str = "quant_state") -> dict[str, Any]:
    """Decode :func:`pack_dict_to_tensor`; a broken blob raises ValueError naming ``key``."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{key!r} must be a 1-D uint8 tensor of UTF-8 JSON, got {type(tensor).__name__}")
    if tensor.dtype != torch.uint8 or tensor.dim() != 1:
        # tolist() of a 0-D tensor is one int (bytes(n) is n zero bytes) and of a 2-D one a list of lists
        raise ValueError(
            f"{key!r} must be a 1-D uint8 tensor of UTF-8 JSON, got a {tensor.dtype} tensor of shape {tuple(tensor.shape)}"
        )
    try:
        values = json.loads(bytes(tensor.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{key!r} does not hold valid UTF-8 JSON quant-state metadata: {err}") from err
    if not isinstance(values, dict):
        raise ValueError(f"{key!r} must decode to a JSON object, got {type(values).__name__}")
    return values


def _as_size(shape: Any, name: str) -> torch.Size:
    """``shape`` as a torch.Size of non-negative ints (TypeError / ValueError naming ``name`` if it is not one)."""
    if isinstance(shape, Iterator):  # read once: a generator checked after torch.Size consumed it passed anything
        shape = tuple(shape)
    try:
        size = torch.Size(shape)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of non-negative ints, got {shape!r}") from None
    if any(isinstance(s, bool) or s < 0 for s in shape):
        raise ValueError(f"{name} must be a sequence of non-negative ints, got {shape!r}")
    return size


def _strip_prefixes(qs_dict: dict[str, Any]) -> dict[str, Any]:
    """Entries by their last dotted name ("weight.absmax" -> "absmax"); one name twice (two weights' entries) raises."""
    stripped: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for key, value in qs_dict.items():
        name = key.split(".")[-1]
        if name in seen:
            raise ValueError(
                f"quant-state entry {name!r} given twice, as {seen[name]!r} and {key!r} (one weight's only)"
            )
        seen[name], stripped[name] = key, value
    return stripped


def _json_shape(shape: Any) -> torch.Size:
    """A state dict's shape entry (a list or tuple of non-negative ints, NumPy ints too) as a torch.Size of ints."""
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise ValueError(f"quant-state shape must be a list of non-negative ints, got {shape!r}")
    return torch.Size([int(s) for s in shape])


def _check_absmax_dtypes(absmax: torch.Tensor, nested_absmax: torch.Tensor | None) -> None:
    """bitsandbytes' statistics dtypes: float32 absmax, or uint8 codes with a float32 nested absmax (ValueError)."""
    if nested_absmax is None:
        if absmax.dtype != torch.float32:
            raise ValueError(f"absmax must be float32 without double quantization, got {absmax.dtype}")
        return
    if absmax.dtype != torch.uint8:
        raise ValueError(f"double-quantized absmax must be uint8, got {absmax.dtype}")
    if nested_absmax.dtype != torch.float32:
        raise ValueError(f"nested_absmax must be float32, got {nested_absmax.dtype}")


def _check_quant_map(quant_map: torch.Tensor, quant_type: str) -> None:
    """A saved quant_map must hold ``quant_type``'s code values (either sign of zero): the kernels decode by the
    quant type, so another table (a corrupt or hand-edited checkpoint) would be ignored silently."""
    if quant_map.is_meta:
        return
    if not torch.equal(quant_map.detach().cpu(), get_4bit_code(quant_type)):
        raise ValueError(
            f"quant_map does not hold the {quant_type} code table that quant_type names (the kernels decode by "
            "quant_type): the checkpoint's quant_map or quant_type is corrupt"
        )


def _moved(value: Any, device: torch.device | str) -> Any:
    """``value`` on ``device`` if it is a tensor; a field not set (None) stays None."""
    return value.to(device) if isinstance(value, torch.Tensor) else value


class QuantState:
    """Statistics and metadata of one 4-bit tensor: per-block absmax (double-quantized when ``state2`` is set),
    code table, original shape and dtype, blocksize and quant type."""

    valid_quant_types = QUANT_TYPES
    valid_qs_type_keys = [f"bitsandbytes__{t}" for t in QUANT_TYPES]
    valid_qs_keys = [
        "absmax",
        "quant_map",
        "nested_absmax",
        "nested_quant_map",
        "quant_state",
        "quant_type",
        "blocksize",
        "dtype",
        "shape",
        "nested_blocksize",
        "nested_dtype",
        "nested_offset",
    ]
    _checked = False  # True once check() passed; any assignment to a field clears it (also on older pickles)

    def __init__(
        self,
        absmax: torch.Tensor,
        shape: torch.Size | tuple[int, ...] | None = None,
        code: torch.Tensor | None = None,
        blocksize: int | None = None,
        quant_type: str | None = None,
        dtype: torch.dtype | None = None,
        offset: torch.Tensor | None = None,
        state2: QuantState | None = None,
    ) -> None:
        if blocksize is not None and (isinstance(blocksize, bool) or not isinstance(blocksize, numbers.Integral)):
            raise TypeError(f"blocksize must be an int or None, got {type(blocksize).__name__} {blocksize!r}")
        blocksize = None if blocksize is None else int(blocksize)
        if quant_type is not None:
            check_quant_type(quant_type)
        self.__dict__.update(
            absmax=absmax,
            shape=_as_size(shape, "shape") if shape is not None else None,
            code=code,
            dtype=dtype,
            blocksize=blocksize,
            quant_type=quant_type,
            offset=offset,
            state2=state2,
            nested=state2 is not None,
        )

    def __setattr__(self, name: str, value: Any) -> None:
        """Any assignment makes the next computation check the state again (see :meth:`check`)."""
        self.__dict__[name] = value
        self.__dict__["_checked"] = False

    def __getattr__(self, name: str) -> Any:
        # FSDP and DCP resolve the dotted key "weight.quant_state.bitsandbytes__nf4" with getattr.
        if name.startswith("bitsandbytes__") and name.removeprefix("bitsandbytes__") in QUANT_TYPES:
            packed = self.as_dict(packed=True)
            key = "quant_state." + name
            if key in packed:
                return packed[key]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __getitem__(self, idx: int) -> Any:
        """The legacy list layout [absmax, shape, dtype, blocksize, [offset, state2] | None, quant_type]."""
        nested = [self.offset, self.state2] if self.nested else None
        return [self.absmax, self.shape, self.dtype, self.blocksize, nested, self.quant_type][idx]

    @property
    def numel(self) -> int:
        """Number of values the state describes (elements of the original tensor)."""
        try:
            return self.shape.numel()
        except AttributeError:  # a tuple or list assigned as the shape, or a malformed one
            return _as_size(self.shape, "QuantState.shape").numel()

    def check(self) -> None:
        """Check that the fields agree: tensors where tensors belong, ``nested`` against ``state2``, exactly
        ceil(numel / blocksize) absmax entries and ceil(blocks / nested_blocksize) nested ones, blocksizes of the
        accepted values (ValueError / TypeError naming the field). Passing is remembered until a field of this state
        or of its state2 is assigned, so a computation pays one attribute read (:meth:`absmax_tensors`)."""
        absmax, state2 = self.absmax, self.state2
        if not isinstance(absmax, torch.Tensor):
            raise TypeError(f"QuantState.absmax must be a torch.Tensor, got {type(absmax).__name__}")
        shape = _as_size(self.shape, "QuantState.shape")
        if not self.nested:
            if state2 is not None:
                raise ValueError("QuantState.nested is False but the state has a nested state2 (double quantization)")
            check_stats_counts(absmax, None, shape, self.blocksize, NESTED_BLOCKSIZE)
        else:
            if not isinstance(state2, QuantState) or not isinstance(self.offset, torch.Tensor):
                raise TypeError(
                    "a nested QuantState needs a QuantState state2 and a tensor offset, got "
                    f"{type(state2).__name__} and {type(self.offset).__name__}"
                )
            if not isinstance(state2.absmax, torch.Tensor) or not isinstance(state2.code, torch.Tensor):
                raise TypeError(
                    "QuantState.state2 needs tensors absmax and code, got "
                    f"{type(state2.absmax).__name__} and {type(state2.code).__name__}"
                )
            check_stats_counts(absmax, state2.absmax, shape, self.blocksize, state2.blocksize)
        if not torch.compiler.is_compiling():  # traced code must not mutate the state
            self.__dict__["_checked"] = True
            if state2 is not None:
                state2.__dict__["_checked"] = True

    def absmax_tensors(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(absmax, nested_absmax, nested_code, offset) as the ``fsdp4bit::`` ops take them, after :meth:`check`
        (once per change of the state)."""
        state2 = self.state2
        if not (self._checked and (state2 is None or state2._checked)):
            self.check()
        if self.nested:
            return self.absmax, state2.absmax, state2.code, self.offset
        return self.absmax, None, None, None

    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device: torch.device | str | None) -> QuantState:
        """Rebuild from a (possibly prefixed) state-dict slice in bitsandbytes' format; bad input raises ValueError.
        ``device=None`` leaves the tensors where they are (the offset goes to the absmax's device)."""
        if not isinstance(qs_dict, dict):
            raise TypeError(f"qs_dict must be a dict of quant-state entries, got {type(qs_dict).__name__}")
        qs_dict = dict(qs_dict)
        packed_keys = [k for k, v in qs_dict.items() if "quant_state." in k or k.startswith("quant_state")]
        meta: dict[str, Any] = {}
        if packed_keys:
            if len(packed_keys) != 1 or packed_keys[0].split(".")[-1] not in cls.valid_qs_type_keys:
                raise ValueError(
                    f"expected exactly one packed quant-state key ending in one of {cls.valid_qs_type_keys}, got {packed_keys}"
                )
            key = packed_keys[0]
            meta = unpack_tensor_to_dict(qs_dict.pop(key), key)
            suffix = key.split("__")[-1]
            if meta.get("quant_type") != suffix:
                raise ValueError(f"{key!r} names quant_type {suffix!r} but its JSON says {meta.get('quant_type')!r}")
            extra = sorted(set(meta) - set(_JSON_KEYS))
            if extra:
                raise ValueError(f"{key!r} holds unexpected JSON fields {extra}; accepted: {sorted(_JSON_KEYS)}")
        stripped = _strip_prefixes(qs_dict)
        unknown = sorted(set(stripped) - set(_TENSOR_KEYS) - set(_JSON_KEYS))
        if unknown:
            raise ValueError(f"unexpected quant-state keys {unknown}; accepted: {sorted(_TENSOR_KEYS + _JSON_KEYS)}")
        meta.update({k: v for k, v in stripped.items() if k in _JSON_KEYS})
        tensors = {k: v for k, v in stripped.items() if k in _TENSOR_KEYS}
        required = ["absmax", "quant_map"]
        for key in ("quant_type", "blocksize", "dtype", "shape"):
            if key not in meta:
                raise ValueError(f"quant state is missing {key!r} (no packed 'quant_state.bitsandbytes__*' entry?)")
        # any nested entry makes the state double-quantized, so a partial one names what it lacks
        nested = any(k.startswith("nested_") for k in (*tensors, *meta))
        if nested:
            required += ["nested_absmax", "nested_quant_map"]
            for key in ("nested_blocksize", "nested_dtype", "nested_offset"):
                if key not in meta:
                    raise ValueError(f"double-quantized state is missing {key!r}")
        missing = [k for k in required if k not in tensors]
        if missing:
            raise ValueError(f"quant state is missing tensors {missing}")
        for k, v in tensors.items():
            if not isinstance(v, torch.Tensor):
                raise ValueError(f"quant-state entry {k!r} must be a tensor, got {type(v).__name__}")
        check_quant_type(meta["quant_type"])
        blocksize = as_blocksize(meta["blocksize"])
        if not isinstance(meta["dtype"], str) or meta["dtype"] not in _DTYPES:
            raise ValueError(f"quant-state dtype must be one of {sorted(_DTYPES)}, got {meta['dtype']!r}")
        shape = _json_shape(meta["shape"])
        nested_blocksize = as_blocksize(meta["nested_blocksize"], "nested_blocksize") if nested else None
        nested_absmax = tensors["nested_absmax"] if nested else None
        check_stats_counts(tensors["absmax"], nested_absmax, shape, blocksize, nested_blocksize)
        for key, entries in (("quant_map", 16), ("nested_quant_map", 256)):
            table = tensors.get(key)
            if table is not None and (table.numel() != entries or table.dtype != torch.float32):
                raise ValueError(
                    f"{key} must be a float32 table of {entries} entries, got {table.dtype} with {table.numel()}"
                )
        _check_quant_map(tensors["quant_map"], meta["quant_type"])
        _check_absmax_dtypes(tensors["absmax"], nested_absmax)
        state2 = offset = None
        if nested:
            if not isinstance(meta["nested_dtype"], str) or meta["nested_dtype"] not in _DTYPES:
                raise ValueError(f"nested_dtype must be one of {sorted(_DTYPES)}, got {meta['nested_dtype']!r}")
            nested_offset = meta["nested_offset"]
            if isinstance(nested_offset, bool) or not isinstance(nested_offset, numbers.Real):
                raise ValueError(f"nested_offset must be a number, got {nested_offset!r}")
            offset_device = tensors["absmax"].device if device is None else device
            offset = torch.tensor(float(nested_offset), dtype=torch.float32, device=offset_device)
            state2 = cls(
                absmax=tensors["nested_absmax"].to(device),
                code=tensors["nested_quant_map"].to(device),
                blocksize=nested_blocksize,
                dtype=_DTYPES[meta["nested_dtype"]],
            )
        return cls(
            absmax=tensors["absmax"].to(device),
            shape=shape,
            code=tensors["quant_map"].to(device),
            blocksize=blocksize,
            quant_type=meta["quant_type"],
            dtype=_DTYPES[meta["dtype"]],
            offset=offset,
            state2=state2,
        )

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """Tensors and metadata under bitsandbytes' keys; ``packed=True`` folds the metadata into one uint8 JSON tensor."""
        qs = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            qs.update(
                {
                    "nested_absmax": self.state2.absmax,
                    "nested_blocksize": self.state2.blocksize,
                    "nested_quant_map": self.state2.code.clone(),
                    "nested_dtype": _dtype_name(self.state2.dtype),
                    "nested_offset": self.offset.item(),
                }
            )
        if not packed or self.quant_type is None:
            return qs
        out = {k: v for k, v in qs.items() if isinstance(v, torch.Tensor)}
        out[PACKED_KEY_PREFIX + self.quant_type] = pack_dict_to_tensor(
            {k: v for k, v in qs.items() if not isinstance(v, torch.Tensor)}
        )
        return out

    def to(self, device: torch.device | str) -> QuantState:
        """Move every tensor to ``device`` in place (bitsandbytes semantics) and return self; a dtype is refused, since
        casting would turn the uint8 nested codes into floats and round the float32 code tables."""
        if isinstance(device, torch.dtype):
            raise TypeError(f"QuantState.to takes a device (the statistics keep their dtypes), got {device}")
        self.code = _moved(self.code, device)
        self.absmax = _moved(self.absmax, device)
        if self.nested:
            self.offset = _moved(self.offset, device)
            self.state2.absmax = _moved(self.state2.absmax, device)
            self.state2.code = _moved(self.state2.code, device)
        return self

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantState):
            return NotImplemented
        fields = ("absmax", "shape", "code", "dtype", "blocksize", "quant_type", "offset")
        return all(_same_bits(getattr(self, f), getattr(other, f)) for f in fields) and self.state2 == other.state2

    __hash__ = None  # mutable value object

    def __repr__(self) -> str:
        nested = f", nested(blocksize={self.state2.blocksize})" if self.nested else ""
        return (
            f"QuantState({self.quant_type}, shape={tuple(self.shape) if self.shape is not None else None}, "
            f"dtype={self.dtype}, blocksize={self.blocksize}{nested})"
        )
