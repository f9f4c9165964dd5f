"""Params4bit and Linear4bit: bitsandbytes' 4-bit module API, built to survive FSDP2, pickling and dtype casts."""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _EXTRA_STATE_KEY_SUFFIX

from . import functional as F
from .autograd import autocast_on, matmul_4bit
from .codebooks import (
    FLOAT_DTYPES,
    as_blocksize,
    check_flag,
    check_float_dtype,
    check_quant_storage,
    check_quant_type,
)
from .dsd import KeyPaths, statistics_on_every_rank
from .quant_state import PACKED_KEY_PREFIX, QuantState
from .sharding import as_like, is_sharded, load_sharded_entries, sharded_state_dict_entries
from .tensor_ops import (
    FORMAT_ATTRS,
    TENSOR_OPS,
    SliceCache,
    copy_format,
    copy_state,
    plain,
    refuse_word_reads,
    refuse_word_writes,
    slice_state,
    unwrap_call,
)

__all__ = ["Params4bit", "Linear4bit", "LinearNF4", "LinearFP4"]

_QS_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def _check_frozen(requires_grad: object) -> None:
    if requires_grad:
        raise ValueError(
            f"requires_grad must be False: a Params4bit is a frozen 4-bit weight (train adapters such as LoRA on top "
            f"of it), got {requires_grad!r}"
        )


class _StorageMeta:
    """Quantization metadata shared by every view of one packed allocation.

    ``quant_state`` describes the global packed words ``state_rows``; ``row0`` is the global word index
    of storage element ``offset0``. A view's own state is derived from these (see Params4bit.quant_state);
    ``sliced`` remembers the last state derived for other words than ``state_rows``.
    """

    __slots__ = ("quant_state", "row0", "offset0", "state_rows", "sliced")

    def __init__(self, quant_state: QuantState | None, row0: int, offset0: int, words: int) -> None:
        self.quant_state = quant_state
        self.row0 = row0
        self.offset0 = offset0
        self.state_rows = (row0, row0 + words)
        self.sliced = SliceCache()


# The names ``Params4bit.__tensor_flatten__`` gives its statistics tensors (after ``_data``), in QuantState order:
# absmax, code, then the nested state's absmax and code and the offset.
_INNER_STATS = ("_qs_absmax", "_qs_code", "_qs_nested_absmax", "_qs_nested_code", "_qs_offset")
# What a copy of a Params4bit does not take from the original's __dict__ (its own data, metadata and statistics).
_NOT_COPIED = frozenset(("_data", "_storage_meta", *_INNER_STATS))


def _own_copy(key: str, value: Any, device: torch.device) -> Any:
    """A statistics entry the loading layer owns: tensors copied to ``device``; the packed JSON entry (decoded on the
    host, never kept) as it is."""
    if not isinstance(value, torch.Tensor) or key.split(".")[-1] not in _QS_SUFFIXES:
        return value
    return plain(value).to(device, copy=True)


def _rebuild_params4bit(
    data: torch.Tensor, requires_grad: bool, attrs: dict[str, Any], quant_state: QuantState | None, row_start: int
) -> Params4bit:
    param = Params4bit._new(data, requires_grad, quant_state)
    param.__dict__.update(attrs)
    param.set_row_start(row_start)
    return param


class Params4bit(nn.Parameter):
    """A frozen weight that holds float values until its first ``.to(device)`` quantizes it in place.

    Once quantized, the tensor *is* the packed bytes (shape ``[ceil(n/2)/itemsize, 1]`` in ``quant_storage``)
    and ``quant_state`` holds the statistics. It is a wrapper tensor subclass (the packed data lives in
    ``_data``) whose ATen op table keeps the metadata through the ops FSDP2, DTensor and pickling apply.
    Packed bytes are only ever viewed, never converted: dtype casts are no-ops on them.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __new__(
        cls,
        data: torch.Tensor | None = None,
        requires_grad: bool = False,
        quant_state: QuantState | None = None,
        blocksize: int | None = None,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        module: nn.Module | None = None,
        bnb_quantized: bool = False,
        **kwargs: Any,
    ) -> Params4bit:
        _check_frozen(requires_grad)
        return cls._new(
            data, False, quant_state, blocksize, compress_statistics, quant_type, quant_storage, module, bnb_quantized
        )

    @classmethod
    def _new(
        cls,
        data: torch.Tensor | None,
        requires_grad: bool,
        quant_state: QuantState | None,
        blocksize: int | None = None,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        module: nn.Module | None = None,
        bnb_quantized: bool = False,
    ) -> Params4bit:
        """The constructor without its requires_grad refusal, for the copies ops and pickling make of a parameter."""
        blocksize = as_blocksize(64 if blocksize is None else blocksize)
        check_quant_type(quant_type)
        check_quant_storage(quant_storage)
        check_flag(compress_statistics, "compress_statistics")
        if data is None:
            data = torch.empty(0)
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"data must be a torch.Tensor, got {type(data).__name__}")
        inner = plain(data)
        self = torch.Tensor._make_wrapper_subclass(
            cls,
            inner.shape,
            strides=inner.stride(),
            dtype=inner.dtype,
            device=inner.device,
            requires_grad=requires_grad,
        )
        self._data = inner
        self._storage_meta = _StorageMeta(quant_state, 0, inner.storage_offset(), inner.numel())
        self.blocksize = blocksize
        self.compress_statistics = compress_statistics
        self.quant_type = quant_type
        self.quant_storage = quant_storage
        self.bnb_quantized = bnb_quantized
        self.module = module
        self._set_inner_stats(self.quant_state)
        return self

    @property
    def row_start(self) -> int:
        """Global index of this tensor's first packed word (0 unless it is a shard of a larger weight)."""
        meta = self._storage_meta
        return meta.row0 + self._data.storage_offset() - meta.offset0

    def set_row_start(self, row_start: int) -> None:
        """Place this tensor at global word ``row_start`` (its state then describes words from there)."""
        meta = self._storage_meta
        shift = row_start - self.row_start
        meta.row0 += shift
        meta.state_rows = (meta.state_rows[0] + shift, meta.state_rows[1] + shift)
        self._set_inner_stats(self.quant_state)

    @property
    def quant_state(self) -> QuantState | None:
        """The statistics of this tensor's words: the shared object for a whole weight, a slice for a shard."""
        meta = self._storage_meta
        state = meta.quant_state
        if state is None or not self.bnb_quantized:
            return state
        lo = self.row_start
        rows = (lo, lo + self._data.numel())
        if rows == meta.state_rows:  # the words the state describes: the state itself, nothing to remember
            return slice_state(state, rows, rows, self.dtype.itemsize)
        return meta.sliced.get(state, meta.state_rows, rows, self.dtype.itemsize)

    @quant_state.setter
    def quant_state(self, value: QuantState | None) -> None:
        meta = self._storage_meta
        meta.quant_state = value
        meta.sliced.clear()  # (a stale entry would never be hit; this frees what it holds)
        lo = self.row_start
        meta.state_rows = (lo, lo + self._data.numel())
        self._set_inner_stats(self.quant_state)

    @classmethod
    def view_of(cls, data: torch.Tensor, like: Params4bit) -> Params4bit:
        """A Params4bit over ``data``, a view into ``like``'s storage, sharing its quantization metadata. A view of a
        normal tensor is a normal tensor under ``torch.inference_mode`` too (autograd then shares its version
        counter, which an inference tensor has none of), so the wrapper is made with inference mode off."""
        if torch.is_inference_mode_enabled() and not torch.is_inference(like):
            grad = torch.is_grad_enabled()  # inference_mode(False) turns grad mode on: keep the caller's
            with torch.inference_mode(False), torch.set_grad_enabled(grad):
                out = cls.wrap(data, like, None, 0)
        else:
            out = cls.wrap(data, like, None, 0)
        out._storage_meta = like._storage_meta
        out._set_inner_stats(out.quant_state)
        return out

    @classmethod
    def wrap(cls, data: torch.Tensor, like: Params4bit, quant_state: QuantState | None, row_start: int) -> Params4bit:
        """A Params4bit over new ``data`` at global word ``row_start`` with ``like``'s attributes."""
        out = cls._new(
            data,
            requires_grad=like.requires_grad,
            quant_state=quant_state,
            module=like.module,
            **{name: getattr(like, name) for name in FORMAT_ATTRS},
        )
        out.set_row_start(row_start)
        return out

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        handler = TENSOR_OPS.get(func)
        if handler is not None:
            return handler(func, args, kwargs or {})
        if func._schema.is_mutable:
            refuse_word_writes(func, args, kwargs or {})
        refuse_word_reads(func, args, kwargs or {})
        return unwrap_call(func, args, kwargs or {})

    # -- torch.compile: the inner tensors are the packed data and the statistics ----------------------

    def __tensor_flatten__(self):
        names = ["_data"]
        state = self.quant_state
        self._set_inner_stats(state)
        state_meta = None
        if state is not None:
            names += _INNER_STATS[:2]
            nested = None
            if state.nested:
                names += _INNER_STATS[2:]
                nested = (state.state2.blocksize, state.state2.dtype)
            state_meta = (tuple(state.shape), state.blocksize, state.quant_type, state.dtype, nested)
        attrs = (
            self.blocksize,
            self.compress_statistics,
            self.quant_type,
            self.quant_storage,
            self.bnb_quantized,
            self.row_start,
            self.requires_grad,
        )
        return names, (attrs, state_meta)

    @staticmethod
    def __tensor_unflatten__(inner: dict, ctx, outer_size, outer_stride) -> Params4bit:
        attrs, state_meta = ctx
        blocksize, compress_statistics, quant_type, quant_storage, bnb_quantized, row_start, requires_grad = attrs
        state = None
        if state_meta is not None:
            shape, qblocksize, qtype, dtype, nested = state_meta
            state2 = offset = None
            if nested is not None:
                state2 = QuantState(
                    inner["_qs_nested_absmax"], code=inner["_qs_nested_code"], blocksize=nested[0], dtype=nested[1]
                )
                offset = inner["_qs_offset"]
            state = QuantState(inner["_qs_absmax"], shape, inner["_qs_code"], qblocksize, qtype, dtype, offset, state2)
        out = Params4bit._new(
            inner["_data"],
            requires_grad,
            state,
            blocksize,
            compress_statistics,
            quant_type,
            quant_storage,
            bnb_quantized=bnb_quantized,
        )
        out.set_row_start(row_start)
        return out

    # The statistics tensors by the names ``__tensor_flatten__`` gives them, as plain attributes: a compiled module's
    # call reads them outside its graph several times (guards, graph inputs), where a property would run Python each
    # time (traced by dynamo as frames of their own, they graph-broke and recompiled for every weight). Set when a
    # Params4bit is made, shares another's metadata (``view_of``) or is quantized; refreshed by every
    # ``__tensor_flatten__`` (which dynamo's guards call before reading them), by the ``quant_state`` setter and by
    # ``set_row_start``; never copied (``_attrs``).
    def _set_inner_stats(self, state: QuantState | None) -> None:
        nested = state.state2 if state is not None and state.nested else None
        values = (
            (None, None) if state is None else (state.absmax, state.code),
            (None, None, None) if nested is None else (nested.absmax, nested.code, state.offset),
        )
        attrs = self.__dict__
        for name, value in zip(_INNER_STATS, values[0] + values[1], strict=True):
            # an unchanged entry is not rewritten: rewriting all of them at every flatten made compiled FSDP steps
            # slower on the GPU (session 29; a dict's writes are visible to dynamo's guards)
            if attrs.get(name, attrs) is not value:
                attrs[name] = value

    def data_ptr(self) -> int:
        return self._data.data_ptr()

    # -- ``param.data = value`` and shared memory: the inner tensors are what hold the values ---------------------

    def _get_data(self) -> Params4bit:
        return torch._C.TensorBase.data.__get__(self, type(self))

    def _set_data(self, value: torch.Tensor) -> None:
        """``param.data = value``: a Params4bit's packed words and statistics, or float values for a weight not
        quantized yet (quantized on its first ``.to(device)``). A quantized weight refuses plain tensors: they would
        replace its words without their statistics. (torch's own setter changes only the wrapper's metadata.)"""
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"data must be a torch.Tensor, got {type(value).__name__}")
        if not isinstance(value, Params4bit):
            if self.bnb_quantized:
                raise TypeError(
                    f"cannot set .data of a quantized Params4bit to a plain {value.dtype} tensor of shape "
                    f"{tuple(value.shape)}: it would replace the packed 4-bit words without their statistics (Python "
                    "ends here too for an in-place op the weight refuses, e.g. weight.data *= x); assign a Params4bit, "
                    "load a state dict, or merge a float delta with weight.data += delta"
                )
            if not value.is_floating_point():
                raise TypeError(
                    f"data of a Params4bit not quantized yet must be a floating-point tensor (the values to quantize), "
                    f"got {value.dtype}"
                )
            value = Params4bit.wrap(value.detach(), self, None, 0)
        torch._C.TensorBase.data.__set__(self, value)
        self._data = value._data
        self._storage_meta = value._storage_meta
        copy_format(self, value)
        self._set_inner_stats(self.quant_state)

    data = property(_get_data, _set_data, doc="The tensor's values without autograd history (see ``_set_data``).")

    def share_memory_(self) -> Params4bit:
        """Move the packed words and the statistics to shared memory (``Module.share_memory``); the wrapper itself
        has no storage of its own to share."""
        self._data.share_memory_()
        state = self.quant_state
        if state is not None:
            for t in (state.absmax, state.code, state.offset):
                if t is not None:
                    t.share_memory_()
            if state.nested:
                state.state2.absmax.share_memory_()
                state.state2.code.share_memory_()
        return self

    def is_shared(self) -> bool:
        return self._data.is_shared()

    def __repr__(self) -> str:
        kind = f"{self.quant_type}, quantized" if self.bnb_quantized else f"{self.quant_type}, not quantized yet"
        return f"Params4bit({kind}, shape={tuple(self.shape)}, dtype={self.dtype}, state={self.quant_state})"

    # -- copying and pickling: same __dict__ keys everywhere ------------------------------------------

    def _attrs(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in _NOT_COPIED}

    def __reduce_ex__(self, protocol: int):
        return (_rebuild_params4bit, (self._data, self.requires_grad, self._attrs(), self.quant_state, self.row_start))

    def __copy__(self) -> Params4bit:
        new = Params4bit.view_of(self._data, self)
        new.__dict__.update(self._attrs())
        return new

    def __deepcopy__(self, memo: dict) -> Params4bit:
        attrs = self._attrs()
        attrs["module"] = None
        state = copy.deepcopy(self.quant_state, memo)
        new = _rebuild_params4bit(self._data.clone(), self.requires_grad, attrs, state, self.row_start)
        memo[id(self)] = new
        return new

    # -- bitsandbytes-compatible views of the quant state (FSDP/DCP resolve "weight.absmax" with getattr) ----

    @property
    def absmax(self) -> torch.Tensor | None:
        return None if self.quant_state is None else self.quant_state.absmax

    @property
    def code(self) -> torch.Tensor | None:
        return None if self.quant_state is None else self.quant_state.code

    quant_map = code

    @property
    def nested_absmax(self) -> torch.Tensor | None:
        qs = self.quant_state
        return qs.state2.absmax if qs is not None and qs.nested else None

    @property
    def nested_quant_map(self) -> torch.Tensor | None:
        qs = self.quant_state
        return qs.state2.code if qs is not None and qs.nested else None

    @property
    def offset(self) -> torch.Tensor | None:
        """Double quant's offset (the mean the nested absmax codes are relative to), or None."""
        return None if self.quant_state is None else self.quant_state.offset

    nested_offset = offset

    @property
    def state2(self) -> QuantState | None:
        """The nested (8-bit) state of the absmax under double quant, or None."""
        return None if self.quant_state is None else self.quant_state.state2

    @property
    def nested_blocksize(self) -> int | None:
        qs = self.quant_state
        return qs.state2.blocksize if qs is not None and qs.nested else None

    @property
    def nested_dtype(self) -> torch.dtype | None:
        qs = self.quant_state
        return qs.state2.dtype if qs is not None and qs.nested else None

    def numpy(self, *, force: bool = False) -> Any:
        """The packed words as a NumPy array of the storage dtype (what ``numpy()`` of bitsandbytes' weight gives)."""
        return self._data.detach().numpy(force=force)

    def tolist(self) -> Any:
        """The packed words as nested Python lists (as ``tolist()`` of a plain tensor of the storage dtype)."""
        return self._data.tolist()

    @property
    def is_full(self) -> bool:
        """True unless this is a slice (an FSDP shard) of a larger quantized weight."""
        if self.quant_state is None:
            return True
        words = -(-((self.quant_state.numel + 1) // 2) // self.dtype.itemsize)
        return self.row_start == 0 and self.numel() == words

    # -- construction from checkpoints -------------------------------------------------------------------

    @classmethod
    def from_prequantized(
        cls,
        data: torch.Tensor,
        quantized_stats: dict[str, Any],
        requires_grad: bool = False,
        device: torch.device | str | None = None,
        module: nn.Module | None = None,
        **kwargs: Any,
    ) -> Params4bit:
        """A quantized Params4bit from packed ``data`` and its state-dict statistics (bitsandbytes keys)."""
        _check_frozen(requires_grad)
        if not isinstance(quantized_stats, dict):
            raise TypeError(
                f"quantized_stats must be a dict of the weight's quant-state entries, got {type(quantized_stats).__name__}"
            )
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"data must be a torch.Tensor of packed 4-bit bytes, got {type(data).__name__}")
        check_quant_storage(data.dtype)
        device = data.device if device is None else torch.device(device)
        if data.is_meta and device.type != "meta":
            raise ValueError(f"data is on the meta device (it holds no values) and cannot be moved to {device}")
        state = QuantState.from_dict(quantized_stats, device=device)
        F.check_packed_matches(data, state, "data")
        return cls(
            data.to(device),
            requires_grad=requires_grad,
            quant_state=state,
            blocksize=state.blocksize,
            compress_statistics=state.nested,
            quant_type=state.quant_type,
            quant_storage=data.dtype,
            module=module,
            bnb_quantized=True,
        )

    # -- device and dtype moves ---------------------------------------------------------------------------

    def _quantize(self, device: torch.device, dtype: torch.dtype | None = None) -> Params4bit:
        """Quantize the float values in place: this very object becomes the packed weight. Values of a quantizable
        dtype are quantized as they are, whatever ``dtype`` a move asks for (bitsandbytes' rule: ``.to(device,
        torch.bfloat16)`` of a float32 weight gives its words and a float32 state); others (float64) in ``dtype``."""
        if dtype is not None:
            check_float_dtype(dtype, "dtype")
            if self._data.dtype in FLOAT_DTYPES:
                dtype = None
        if self._data.is_meta:
            raise ValueError(
                f"data is on the meta device (it holds no values) and cannot be quantized on {device}: give the "
                "weight real values first (load_state_dict, fsdp4bit.loading)"
            )
        weight = self._data.to(device=device, dtype=dtype).contiguous()
        F._check_input(weight, "data")
        packed, state = F.quantize_4bit(
            weight,
            blocksize=self.blocksize,
            compress_statistics=self.compress_statistics,
            quant_type=self.quant_type,
            quant_storage=self.quant_storage,
        )
        quantized = Params4bit.wrap(packed, self, quant_state=state, row_start=0)
        quantized.bnb_quantized = True
        try:
            torch.utils.swap_tensors(self, quantized)
        except RuntimeError as err:
            if "weakref" not in str(err):
                raise
            raise RuntimeError(
                "cannot quantize this Params4bit in place: something holds a weak reference to it (a "
                "torch.utils.weak.WeakIdKeyDictionary, a torch.compile'd graph, ...), and the packed weight replaces "
                "the float one in the same object; quantize the module first (module.to(device)), then compile or "
                "register its weights"
            ) from err
        return self

    def to(self, *args: Any, **kwargs: Any) -> Params4bit:
        """Quantize on the first move to a real device; afterwards move bytes and state, ignoring any dtype."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if not self.bnb_quantized:
            if device is not None and device.type != "meta":
                return self._quantize(device, dtype)
            moved = self._data.to(device=device, dtype=dtype, non_blocking=non_blocking)
            return type(self).wrap(moved, self, None, 0)
        if device is None or device == self.device:
            return self
        moved = self._data.to(device, non_blocking=non_blocking)
        if not self.is_full or device.type == "meta":
            # A shard (e.g. FSDP2 moving a CPU-offloaded shard to the GPU) leaves the source's state where it is; so
            # does a move to meta (accelerate's offloading hooks make one of each weight): statistics moved there in
            # place would leave the source, still holding its words, without values.
            return type(self).wrap(moved, self, copy_state(self.quant_state, moved.device), self.row_start)
        if self.quant_state is not None:
            self.quant_state.to(device)
        return type(self).wrap(moved, self, self.quant_state, self.row_start)

    def cpu(self) -> Params4bit:
        return self.to("cpu")

    def cuda(self, device: Any = None, non_blocking: bool = False) -> Params4bit:
        return self.to("cuda" if device is None else device, non_blocking=non_blocking)

    def half(self) -> Params4bit:
        return self.to(torch.float16)

    def float(self) -> Params4bit:
        return self.to(torch.float32)

    def bfloat16(self) -> Params4bit:
        return self.to(torch.bfloat16)

    def double(self) -> Params4bit:
        return self.to(torch.float64)

    # -- FSDP2 all-gather extension (fsdp4bit.sharding) ------------------------------------------------

    def fsdp_pre_all_gather(self, mesh):
        from .sharding import pre_all_gather

        return pre_all_gather(self, mesh)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        from .sharding import post_all_gather

        return post_all_gather(self, all_gather_outputs, metadata, param_dtype, out=out)


# FSDP2 reads ``inspect.signature(fsdp_pre_all_gather)`` at every all-gather to pick the hook's form; a stored
# signature makes that a lookup instead of ~50 µs of introspection per weight and gather.
Params4bit.fsdp_pre_all_gather.__signature__ = inspect.signature(Params4bit.fsdp_pre_all_gather)


class Linear4bit(nn.Linear):
    """``nn.Linear`` with a frozen 4-bit weight (quantized on the first ``.to(device)``) and a float bias."""

    def __init__(
        self,
        input_features: int,
        output_features: int,
        bias: bool = True,
        compute_dtype: torch.dtype | None = None,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        device: torch.device | str | None = None,
    ) -> None:
        for name, value in (("input_features", input_features), ("output_features", output_features)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
            if value < 1:
                raise ValueError(f"{name} must be at least 1 (a 4-bit weight cannot be empty), got {value}")
        check_quant_type(quant_type)
        check_quant_storage(quant_storage)
        check_flag(compress_statistics, "compress_statistics")
        if compute_dtype is not None and compute_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(
                f"compute_dtype must be None, torch.float16, torch.bfloat16 or torch.float32, got {compute_dtype}"
            )
        super().__init__(input_features, output_features, bias, device)
        self.weight = Params4bit(
            self.weight.data,
            requires_grad=False,
            compress_statistics=compress_statistics,
            quant_type=quant_type,
            quant_storage=quant_storage,
        )
        self.compute_dtype = compute_dtype
        self.compress_statistics = compress_statistics
        self.quant_type = quant_type
        self.quant_storage = quant_storage

    def hold(self, weight: Params4bit) -> None:
        """Take a loaded 4-bit ``weight``; the layer's format attributes then describe it (a checkpoint's format may
        differ from the one the layer was built with)."""
        self.weight = weight
        self.quant_type, self.compress_statistics = weight.quant_type, weight.compress_statistics
        self.quant_storage = weight.quant_storage

    def reset_parameters(self) -> None:
        """nn.Linear's initialization, except of a quantized weight: its words are loaded, not initialized, and keep
        their values (FSDP2's meta-device recipe calls this on every module after ``to_empty``); the bias is reset."""
        weight = getattr(self, "weight", None)
        if not (isinstance(weight, Params4bit) and weight.bnb_quantized):
            super().reset_parameters()
        elif self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)  # nn.Linear's bias bound (the words' shape is not the weight's)
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def quant_state(self) -> QuantState | None:
        """The weight's quant state (bitsandbytes' ``Linear4bit.quant_state``); None before quantization."""
        return getattr(self.weight, "quant_state", None)

    _state_dict_key_paths = KeyPaths()

    def _fqn_modifiers(self) -> dict[str, str]:
        """torch's DSD walks keys by getattr: ``weight.<statistic>`` keys resolve through a KeyPaths (see dsd.py)."""
        return {"weight": "_state_dict_key_paths"}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        state = getattr(weight, "quant_state", None)
        if state is None:
            if getattr(weight, "bnb_quantized", False):
                raise RuntimeError(
                    "Linear4bit weight holds packed 4-bit words without their quant state (absmax...): it was rebuilt "
                    "from its words alone, as accelerate's offloading does (cpu_offload, disk_offload, dispatch_model "
                    "or a device_map placing 4-bit layers on 'cpu'/'disk' next to another execution device), which "
                    "fsdp4bit does not support (nor does bitsandbytes): keep Linear4bit layers on their execution "
                    "device, or load the weight with its statistics (load_state_dict)"
                )
            raise RuntimeError(
                "Linear4bit weight is not quantized: call .to(device) on the module first (it quantizes the weight)"
            )
        try:
            inp_dtype = x.dtype
        except AttributeError:
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}") from None
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {inp_dtype}")
        if self.compute_dtype is not None and inp_dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        elif self.compute_dtype is None and inp_dtype not in FLOAT_DTYPES and not autocast_on(x.device.type):
            raise ValueError(
                f"x is {inp_dtype} and this Linear4bit has no compute_dtype: it computes in one of "
                f"{tuple(FLOAT_DTYPES)}; set the layer's compute_dtype (e.g. torch.float32) or cast x"
            )
        if self.compute_dtype is not None and autocast_on(x.device.type):
            with torch.autocast(x.device.type, enabled=False):  # an explicit compute_dtype wins over autocast
                out = matmul_4bit(x, weight, quant_state=state, bias=self.bias)
        else:  # in the input's dtype, or autocast's (see matmul_4bit)
            out = matmul_4bit(x, weight, quant_state=state, bias=self.bias)
        return out if out.dtype == inp_dtype else out.to(inp_dtype)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        weight = self.weight
        if is_sharded(weight):
            packed, state = sharded_state_dict_entries(weight)
            destination[prefix + "weight"] = packed
            if self.bias is not None:
                destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
            for key, value in state.as_dict(packed=True).items():
                destination[prefix + "weight." + key] = value
            return
        state = getattr(weight, "quant_state", None)
        if not isinstance(weight, Params4bit):
            super()._save_to_state_dict(destination, prefix, keep_vars)
            return
        destination[prefix + "weight"] = weight if keep_vars else plain(weight).detach()
        if state is None:  # not quantized yet: a plain float checkpoint
            if self.bias is not None:
                destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
            return
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        for key, value in state.as_dict(packed=True).items():
            destination[prefix + "weight." + key] = value if keep_vars else value.detach()

    def _bias_errors(self, state_dict: dict, key: str) -> list[str]:
        """What is wrong with the checkpoint's bias (nn.Module's messages), checked before anything is loaded."""
        if self.bias is None or key not in state_dict:
            return []
        value = state_dict[key]
        if not isinstance(value, torch.Tensor):
            return [f"while loading {key}: expected a torch.Tensor, got {type(value).__name__}"]
        if value.shape != self.bias.shape:
            return [
                f"size mismatch for {key}: copying a param with shape {value.shape} from checkpoint, "
                f"the shape in current model is {self.bias.shape}."
            ]
        return []

    def _plain_weight_errors(self, state_dict: dict, key: str) -> list[str]:
        """A weight without quant-state entries fits a quantized layer only as its own packed words (never cast)."""
        weight = self.weight
        if key not in state_dict or getattr(weight, "quant_state", None) is None:
            return []  # not quantized yet: nn.Module loads a float checkpoint, .to(device) quantizes it
        value = state_dict[key]
        if isinstance(value, torch.Tensor) and value.dtype == weight.dtype and value.shape == weight.shape:
            return []
        got = (
            f"a {value.dtype} tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
        )
        return [
            f"while loading {key}: the layer's weight is quantized ({weight.quant_type} words of shape "
            f"{tuple(weight.shape)} in {weight.dtype}) and the checkpoint holds {got} without quant-state entries "
            f"({key}.absmax, {key}.quant_state.bitsandbytes__*): load a float checkpoint before quantizing the layer "
            "(.to(device)), or a 4-bit one with its statistics"
        ]

    def _unexpected_keys(self, state_dict: dict, prefix: str, stat_keys: list[str]) -> list[str]:
        """The keys under ``prefix`` that nn.Module would report as unexpected, the weight's statistics excepted."""
        local = {"weight", *(["bias"] if self.bias is not None else [])}
        local.update(k for k, v in self._buffers.items() if v is not None and k not in self._non_persistent_buffers_set)
        known = {*stat_keys, prefix + _EXTRA_STATE_KEY_SUFFIX}
        out = []
        for key in state_dict:
            if not key.startswith(prefix) or key in known:
                continue
            name = key[len(prefix) :].split(".", 1)
            if (len(name) > 1 and name[0] not in self._modules) or (len(name) == 1 and name[0] not in local):
                out.append(key)
        return out

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # nn.Module's own pre-hooks first (FSDP2's puts a weight left unsharded by a forward back into its shard)
        for hook in self._load_state_dict_pre_hooks.values():
            hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        weight_key, bias_key = prefix + "weight", prefix + "bias"
        qs_keys = [
            k
            for k in state_dict
            if k.startswith(weight_key + ".")
            and (k.split(".")[-1] in _QS_SUFFIXES or k.startswith(weight_key + "." + PACKED_KEY_PREFIX))
        ]
        stats = {k[len(prefix) :]: state_dict[k] for k in qs_keys}
        if weight_key in state_dict and is_sharded(self.weight):
            stats = statistics_on_every_rank(self.weight, stats)
        errors = self._bias_errors(state_dict, bias_key)
        assign = local_metadata.get("assign_to_params_buffers", False)
        if not stats:
            errors += self._plain_weight_errors(state_dict, weight_key)
            if errors:
                error_msgs.extend(errors)
                return
            old, hooks = self.weight, self._load_state_dict_pre_hooks
            self._load_state_dict_pre_hooks = type(hooks)()  # they ran above
            try:
                super()._load_from_state_dict(
                    state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
                )
            finally:
                self._load_state_dict_pre_hooks = hooks
            if isinstance(old, Params4bit) and not isinstance(self.weight, Params4bit):
                # load_state_dict(assign=True) put the checkpoint's tensor in a plain Parameter: it takes the
                # weight's place and format (float values to quantize, or the quantized weight's own words)
                self.weight = Params4bit.wrap(plain(self.weight), old, old.quant_state, old.row_start)
            return
        if weight_key not in state_dict:
            missing_keys.append(weight_key)
        elif strict:
            unexpected_keys.extend(self._unexpected_keys(state_dict, prefix, qs_keys))
        if weight_key in state_dict and is_sharded(self.weight):
            if not errors:  # load_sharded_entries checks everything before it writes into the shard
                errors = self._load_sharded(weight_key, state_dict[weight_key], stats)
        elif weight_key in state_dict:
            weight, weight_errors = self._quantized_from(weight_key, state_dict[weight_key], stats, assign)
            errors += weight_errors
            if not errors:
                self.hold(weight)
        if errors:
            error_msgs.extend(errors)
            return
        self._load_bias(state_dict, bias_key, strict, missing_keys, assign)

    def _load_sharded(self, key: str, packed: torch.Tensor, stats: dict) -> list[str]:
        """A checkpoint's words and whole statistics into this layer's FSDP2 shard; what is wrong, else []."""
        try:
            load_sharded_entries(self.weight, packed, QuantState.from_dict(stats, device=self.weight.device))
        except (ValueError, TypeError) as err:
            return [f"while loading 4-bit weight {key}: {err}"]
        return []

    def _quantized_from(
        self, key: str, data: torch.Tensor, stats: dict, assign: bool
    ) -> tuple[Params4bit | None, list[str]]:
        """(the checkpoint's 4-bit weight for this layer, what is wrong with it): copies, or under ``assign`` the
        checkpoint's tensors where they are, as nn.Module's load and assign do."""
        device = self.weight.device
        if assign or device.type == "meta":
            device = getattr(data, "device", device)
        if not assign:  # the layer's own copies: a later in-place merge into it must not change the source
            data = plain(data).to(device, copy=True) if isinstance(data, torch.Tensor) else data
            stats = {k: _own_copy(k, v, device) for k, v in stats.items()}
        try:
            weight = Params4bit.from_prequantized(data, stats, device=device)
        except (ValueError, TypeError) as err:
            return None, [f"while loading 4-bit weight {key}: {err}"]
        shape, expected = tuple(weight.quant_state.shape), (self.out_features, self.in_features)
        if shape != expected:
            return None, [
                f"size mismatch for {key}: the checkpoint holds a 4-bit weight of shape {shape}, the shape in current "
                f"model is {expected}."
            ]
        return weight, []

    def _load_bias(self, state_dict: dict, key: str, strict: bool, missing_keys: list[str], assign: bool) -> None:
        """The checkpoint's bias into the layer's (checked by ``_bias_errors``): copied, or adopted in the layer's
        dtype under ``assign`` or where the layer's is on the meta device."""
        if self.bias is None:
            return
        if key not in state_dict:
            if strict:
                missing_keys.append(key)
            return
        with torch.no_grad():
            bias = state_dict[key]
            if self.bias.device.type == "meta" or assign:
                bias = bias.to(self.bias.dtype, copy=not assign)
                self.bias = nn.Parameter(bias, requires_grad=self.bias.requires_grad)
            else:
                self.bias.copy_(as_like(bias, self.bias))  # a whole bias into a sharded one is distributed first


class LinearNF4(Linear4bit):
    """Linear4bit with quant_type="nf4"."""

    def __init__(
        self,
        input_features: int,
        output_features: int,
        bias: bool = True,
        compute_dtype=None,
        compress_statistics: bool = True,
        quant_storage: torch.dtype = torch.uint8,
        device=None,
    ) -> None:
        super().__init__(
            input_features, output_features, bias, compute_dtype, compress_statistics, "nf4", quant_storage, device
        )


class LinearFP4(Linear4bit):
    """Linear4bit with quant_type="fp4"."""

    def __init__(
        self,
        input_features: int,
        output_features: int,
        bias: bool = True,
        compute_dtype=None,
        compress_statistics: bool = True,
        quant_storage: torch.dtype = torch.uint8,
        device=None,
    ) -> None:
        super().__init__(
            input_features, output_features, bias, compute_dtype, compress_statistics, "fp4", quant_storage, device
        )
