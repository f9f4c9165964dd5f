"""How ATen ops act on a Params4bit: an op table built with ``@implements`` (torchao's NF4Tensor model).

View-like ops (split, slice, view, as_strided, detach) and the allocation ops FSDP2 and DTensor use
(new_zeros, new_empty, copy_, clone, _to_copy) return a Params4bit that keeps the quantization
metadata; a slice of a quantized weight keeps the statistics of the blocks that start inside it
(see ``sharding.owned_blocks``). Dtype conversions never touch packed bytes. In-place arithmetic is a LoRA merge
or refused; any other op that would write into quantized words is refused (``refuse_word_writes``), and so is one
that would read them as numbers (``refuse_word_reads``: arithmetic, comparisons, reductions, products);
``torch.equal`` compares quantized words bit for bit. Every other op runs on the inner tensor and returns plain
tensors.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_map

from .quant_state import QuantState

aten = torch.ops.aten
TENSOR_OPS: dict[Any, Callable] = {}


def implements(ops: list) -> Callable:
    """Register the decorated handler for each ATen overload in ``ops``."""

    def decorator(handler: Callable) -> Callable:
        for op in ops:
            TENSOR_OPS[op] = handler
        return handler

    return decorator


def plain(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor holding ``t``'s values (the inner tensor of a Params4bit, else ``t`` detached)."""
    inner = getattr(t, "_data", None)
    return inner if isinstance(inner, torch.Tensor) else t.detach()


def unwrap_call(func, args: tuple, kwargs: dict) -> Any:
    """Run ``func`` on inner tensors: results are plain tensors.

    Flat positional arguments (``weight.t()``, ``numel``, most ops) skip the pytree walk, which cost about half of
    such a call's Python time; lists, tuples and keyword arguments take it.
    """

    def unwrap(x):
        return plain(x) if _is_params4bit(x) else x

    if not kwargs and not any(isinstance(a, (list, tuple, dict)) for a in args):
        return func(*[unwrap(a) for a in args])
    return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))


_PARAMS4BIT: list[type] = []  # nn.Params4bit, imported on first use (nn imports this module)


# A Params4bit's format attributes: what a copy of its words or a wrapper over them must take along
FORMAT_ATTRS = ("blocksize", "compress_statistics", "quant_type", "quant_storage", "bnb_quantized")


def copy_format(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Give Params4bit ``dst`` the format attributes of ``src`` (whose words it now holds)."""
    for name in FORMAT_ATTRS:
        setattr(dst, name, getattr(src, name))


def _is_params4bit(x: Any) -> bool:
    if not _PARAMS4BIT:
        from .nn import Params4bit

        _PARAMS4BIT.append(Params4bit)
    return isinstance(x, _PARAMS4BIT[0])


def copy_state(state: QuantState | None, device: torch.device | None = None) -> QuantState | None:
    """A QuantState with its own copies of absmax and offset (code tables and nested state are shared)."""
    if state is None:
        return None
    return QuantState(
        state.absmax.to(device or state.absmax.device, copy=True),
        state.shape,
        state.code if device is None else state.code.to(device),
        state.blocksize,
        state.quant_type,
        state.dtype,
        None if state.offset is None else state.offset.to(device or state.offset.device, copy=True),
        state.state2 if device is None or state.state2 is None else _moved_nested(state.state2, device),
    )


def _moved_nested(state2: QuantState, device: torch.device) -> QuantState:
    return QuantState(
        state2.absmax.to(device), code=state2.code.to(device), blocksize=state2.blocksize, dtype=state2.dtype
    )


def slice_state(state: QuantState, state_rows: tuple[int, int], rows: tuple[int, int], itemsize: int) -> QuantState:
    """The statistics of global words ``rows`` given ``state`` for words ``state_rows`` (same object if equal)."""
    nblocks = -(-state.numel // state.blocksize)  # first: a state without a valid shape raises for any rows
    if rows == state_rows:  # the same words own the same blocks
        return state
    from .sharding import owned_blocks

    first, last = owned_blocks(*state_rows, itemsize, state.blocksize, nblocks)
    lo, hi = owned_blocks(*rows, itemsize, state.blocksize, nblocks)
    if (lo, hi) == (first, last):
        return state
    return QuantState(
        state.absmax[lo - first : hi - first],
        state.shape,
        state.code,
        state.blocksize,
        state.quant_type,
        state.dtype,
        state.offset,
        state.state2,
    )


# Everything a QuantState holds: what slice_state reads of a state and sets on a slice.
_fields = operator.attrgetter(
    "absmax", "shape", "code", "blocksize", "quant_type", "dtype", "offset", "state2", "nested"
)


def _same_objects(a: tuple, b: tuple) -> bool:
    for x, y in zip(a, b, strict=True):
        if x is not y:
            return False
    return True


class SliceCache:
    """One remembered :func:`slice_state` result: hit only while the state, the rows and every field of the
    state and of the slice are the very objects they were, so a hit returns what a fresh call would."""

    __slots__ = ("entry",)

    def __init__(self) -> None:
        self.entry: tuple | None = None

    def get(self, state: QuantState, state_rows: tuple[int, int], rows: tuple[int, int], itemsize: int) -> QuantState:
        entry = self.entry
        if entry is not None:
            key, source, out, out_fields = entry
            if (
                key[0] is state
                and key[1:] == (state_rows, rows, itemsize)
                and _same_objects(source, _fields(state))
                and _same_objects(out_fields, _fields(out))
            ):
                return out
        out = slice_state(state, state_rows, rows, itemsize)
        self.entry = ((state, state_rows, rows, itemsize), _fields(state), out, _fields(out))
        return out

    def clear(self) -> None:
        self.entry = None


def wrap_view(src, piece: torch.Tensor):
    """Wrap ``piece``, a view into ``src``'s storage, as a Params4bit sharing ``src``'s quantization metadata."""
    inner = plain(src)
    if piece.dtype != inner.dtype:
        return piece
    if piece.numel() and not torch._C._is_alias_of(piece, inner):  # storage identity; fake tensors have no data_ptr
        return piece
    return type(src).view_of(piece, src)


@implements(
    [
        aten.detach.default,
        aten.alias.default,
        aten.split.Tensor,
        aten.split_with_sizes.default,
        aten.chunk.default,
        aten.slice.Tensor,
        aten.narrow.default,
        aten.view.default,
        aten._unsafe_view.default,
        aten.as_strided.default,
        aten.unsqueeze.default,
        aten.squeeze.dim,
    ]
)
def _view_like(func, args, kwargs):
    src = args[0]
    out = unwrap_call(func, args, kwargs)
    if isinstance(out, (tuple, list)):
        return [wrap_view(src, t) for t in out]
    return wrap_view(src, out)


@implements(
    [
        aten.new_zeros.default,
        aten.new_empty.default,
        aten.new_ones.default,
        aten.new_full.default,
        aten.empty_like.default,
        aten.zeros_like.default,
    ]
)
def _new_like(func, args, kwargs):
    src = args[0]
    out = unwrap_call(func, args, kwargs)
    if out.dtype != src.dtype:
        return out
    # Fresh statistics storage: a shard must not keep the whole weight's absmax alive.
    return type(src).wrap(out, src, quant_state=copy_state(src.quant_state), row_start=src.row_start)


@implements([aten.clone.default, aten._pin_memory.default, aten.pin_memory.default])
def _clone(func, args, kwargs):
    src = args[0]
    out = unwrap_call(func, args, kwargs)
    return type(src).wrap(out, src, quant_state=copy_state(src.quant_state), row_start=src.row_start)


@implements([aten._to_copy.default])
def _to_copy(func, args, kwargs):
    """Device moves keep the metadata; a quantized weight ignores any requested dtype (bytes are never cast)."""
    src = args[0]
    kwargs = dict(kwargs)
    if src.bnb_quantized:
        kwargs.pop("dtype", None)
    out = unwrap_call(func, args, kwargs)
    state = copy_state(src.quant_state, out.device) if src.quant_state is not None else None
    if not src.bnb_quantized and out.dtype != src.dtype:
        return type(src).wrap(out, src, quant_state=None, row_start=0)
    return type(src).wrap(out, src, quant_state=state, row_start=src.row_start)


def refuse_word_writes(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> None:
    """An op without a handler here that writes into a quantized Params4bit (``zero_``, ``fill_``, ``normal_``, the
    masked and index fills, clamps, ``out=``...) would treat its packed 4-bit words as numbers and corrupt them
    silently: TypeError. A weight not quantized yet holds float values, and one on the meta device no values: they
    take any op."""
    for i, arg in enumerate(func._schema.arguments):
        info = arg.alias_info
        if info is None or not info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        if _quantized_words_in((value,), {}):
            raise TypeError(
                f"{func.overloadpacket.__name__} would write into the packed 4-bit words of a quantized Params4bit "
                "as if they were numbers, which corrupts them: dequantize (fsdp4bit.functional.dequantize_4bit), "
                "change the values and quantize again, or change the float values before the weight's first "
                ".to(device) quantizes them"
            )


def _quantized_words_in(args: tuple, kwargs: dict) -> bool:
    """Whether an argument (or a list's item) is a quantized Params4bit holding words (not on the meta device)."""
    for value in (*args, *kwargs.values()):
        for v in value if isinstance(value, (list, tuple)) else (value,):
            if _is_params4bit(v) and v.bnb_quantized and not v.is_meta:
                return True
    return False


# ops that read their inputs as numbers: arithmetic, comparisons, math functions (pointwise), reductions, and these
_UNTAGGED_READS = (
    aten.mm,
    aten.addmm,
    aten.bmm,
    aten.baddbmm,
    aten.mv,
    aten.addmv,
    aten.dot,
    aten.vdot,
    aten.addr,
    aten.allclose,
    aten.isclose,
)
_BIT_OPS = (
    aten.bitwise_and,
    aten.bitwise_or,
    aten.bitwise_xor,
    aten.bitwise_not,
    aten.bitwise_left_shift,
    aten.bitwise_right_shift,
)
_READS_VALUES: dict[Any, bool] = {}


def _reads_values(func: torch._ops.OpOverload) -> bool:
    if func not in _READS_VALUES:
        tagged = torch.Tag.pointwise in func.tags or torch.Tag.reduction in func.tags
        packet = func.overloadpacket
        _READS_VALUES[func] = (tagged and packet not in _BIT_OPS) or packet in _UNTAGGED_READS
    return _READS_VALUES[func]


def refuse_word_reads(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> None:
    """An op without a handler here that reads a quantized Params4bit's values as numbers (arithmetic, comparisons,
    ``isfinite``, reductions, matrix products) would compute on its packed 4-bit words and return meaningless numbers
    (peft's ``safe_merge`` saw NaN in them, ``weight.data + delta`` mixed words and values): ValueError (a TypeError
    raised under ``w + x`` becomes Python's "unsupported operand"). Bit operations, and weights not quantized yet or
    on the meta device, are left alone."""
    if _reads_values(func) and _quantized_words_in(args, kwargs):
        raise ValueError(
            f"aten.{func.overloadpacket.__name__} (run by this call) would read the packed 4-bit words of a "
            "quantized Params4bit as numbers, which gives meaningless values: dequantize first "
            "(fsdp4bit.functional.dequantize_4bit(weight.data, weight.quant_state)), or compare words with torch.equal"
        )


@implements([aten.equal.default])
def _equal(func, args, kwargs):
    """torch.equal compares a quantized Params4bit's words bit for bit (as numbers, a word that reads as NaN differs
    from itself); float values as numbers."""
    words = _quantized_words_in(args[:2], {})
    a, b = (plain(x) if _is_params4bit(x) else x for x in args[:2])
    if not words or a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return func(a, b)
    return func(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@implements([aten.copy_.default])
def _copy(func, args, kwargs):
    """Copies between Params4bit keep the words and take the source's statistics; into a quantized weight only words
    of its dtype are copied (a float source would be cast into the words, corrupting them: TypeError), and a plain
    tensor takes quantized words only in their dtype (ValueError)."""
    dst, src = args[0], args[1]
    if not _is_params4bit(dst):  # a plain tensor takes the words as they are, never cast
        if _quantized_words_in((src,), {}) and plain(src).dtype != dst.dtype:
            raise ValueError(
                f"copy_ of a quantized Params4bit's packed words ({plain(src).dtype}) into a {dst.dtype} tensor would "
                "cast them as numbers: copy into a tensor of their dtype, or dequantize first"
            )
        return func(dst, plain(src), *args[2:], **kwargs)
    if dst.bnb_quantized and (not isinstance(src, torch.Tensor) or plain(src).dtype != plain(dst).dtype):
        got = f"a {plain(src).dtype} tensor" if isinstance(src, torch.Tensor) else repr(src)
        raise TypeError(
            f"copy_ into a quantized Params4bit takes only its packed words ({dst.dtype}), got {got}: a cast would "
            "rewrite the 4-bit words as numbers; quantize the values (fsdp4bit.functional.quantize_4bit) and copy "
            "the resulting Params4bit, or load a state dict (one of another quant_storage through load_state_dict or "
            "fsdp4bit.checkpoint.load: torch's set_model_state_dict copies the words as they are)"
        )
    func(plain(dst), plain(src) if isinstance(src, torch.Tensor) else src, *args[2:], **kwargs)
    if _is_params4bit(src) and _is_params4bit(dst) and src.bnb_quantized:
        # The destination's allocation now holds src's words: it takes src's place and statistics.
        state = src.quant_state
        if state is not None and state is not dst.quant_state:
            dst.set_row_start(src.row_start)
            dst.quant_state = copy_state(state)
            copy_format(dst, src)
    return dst


_IN_PLACE_ARITHMETIC = [
    aten.add_.Tensor,
    aten.add_.Scalar,
    aten.sub_.Tensor,
    aten.sub_.Scalar,
    aten.mul_.Tensor,
    aten.mul_.Scalar,
    aten.div_.Tensor,
    aten.div_.Scalar,
    aten.addcmul_.default,
    aten.addcdiv_.default,
    aten.lerp_.Scalar,
    aten.lerp_.Tensor,
]


@implements(_IN_PLACE_ARITHMETIC)
def _in_place_arithmetic(func, args, kwargs):
    """Arithmetic on a quantized weight acts on its values, never on its packed words: ``weight.data += delta`` and
    ``-= delta`` with a float tensor of the weight's shape (how peft merges and unmerges a LoRA adapter) dequantize,
    add in float32 and quantize again in place with the same format (as bitsandbytes' merge does); anything else is
    refused, since run on the words it would corrupt them silently."""
    dst = args[0]
    if not dst.bnb_quantized:  # float values not yet quantized: an ordinary tensor op
        unwrap_call(func, args, kwargs)
        return dst
    state = dst.quant_state
    other = args[1] if len(args) > 1 else None
    merge = (
        func in (aten.add_.Tensor, aten.sub_.Tensor) and isinstance(other, torch.Tensor) and not _is_params4bit(other)
    )
    if merge and not other.is_floating_point():
        # a ValueError: Python turns the TypeError of `weight.data -= delta` into an out-of-place op on the words
        raise ValueError(
            f"a delta merged into a 4-bit weight must be a float tensor, got {other.dtype}: cast to the weight's "
            f"dtype ({dst.dtype}, its quant_storage) it has lost its values (peft's unmerge casts the delta so: build "
            "the layer with a float quant_storage, e.g. torch.bfloat16, to unmerge adapters)"
        )
    if not merge:
        raise TypeError(
            f"{func.overloadpacket.__name__} on a quantized Params4bit would change its packed 4-bit words, not its values; only "
            "weight += delta / weight -= delta with a float tensor of the weight's shape (a LoRA merge) is supported: "
            "dequantize with fsdp4bit.functional.dequantize_4bit for other arithmetic"
        )
    if state is None or not dst.is_full:
        raise ValueError(
            "cannot merge into a shard of a 4-bit weight (FSDP2): each block's scale spans the whole block; merge "
            "on the gathered model (e.g. after fsdp4bit.checkpoint.load at world size 1)"
        )
    if tuple(other.shape) != tuple(state.shape):
        raise ValueError(
            f"a delta merged into a 4-bit weight must have its shape {tuple(state.shape)}, got {tuple(other.shape)}"
        )
    from . import functional as F

    alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
    sign = 1 if func is aten.add_.Tensor else -1
    values = F.dequantize_4bit(dst, state).float() + (sign * alpha) * other.to(dst.device, torch.float32)
    packed, new_state = F.quantize_4bit(
        values.to(state.dtype),
        blocksize=state.blocksize,
        compress_statistics=state.nested,
        quant_type=state.quant_type,
        quant_storage=dst.dtype,
    )
    plain(dst).copy_(packed.view(plain(dst).shape))
    dst.quant_state = new_state
    return dst
