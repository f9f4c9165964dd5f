"""FSDP2 for 4-bit weights: shard the packed bytes *and* their statistics, all-gather bytes only.

FSDP2 shards a Params4bit along its packed words (dim 0, ``torch.chunk`` sizes, last shards padded).
Each shard keeps the absmax of the quantization blocks whose first value lies in its words
("block ownership"), so statistics are sharded with the data and every block is owned exactly once.
The code tables, the nested (double-quant) absmax and the offset are a few KB per weight and are
replicated. The all-gather moves packed words (any storage dtype, viewed as bytes, never cast) and
the owned absmax; the post-hook reassembles a full Params4bit that Linear4bit uses directly.

We implement FSDP2's 1-argument ``fsdp_pre_all_gather(mesh)`` form: the 5-argument form asserts that
*every* all-gather input has the padded shard size of the parameter on unevenly sharded ranks, which
rules out a second input (the statistics). Every rank pads its inputs to the same sizes itself.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .quant_state import QuantState
from .tensor_ops import plain


def owned_blocks(start: int, stop: int, itemsize: int, blocksize: int, nblocks: int) -> tuple[int, int]:
    """Quant blocks whose first value lies in packed words [start, stop): each shard keeps exactly these stats."""
    per_word = 2 * itemsize

    def first_block_at(word: int) -> int:
        return min(-(-word * per_word // blocksize), nblocks)

    return first_block_at(start), first_block_at(stop)


def total_words(state: QuantState, itemsize: int) -> int:
    """Packed words (storage elements) of the whole weight described by ``state``."""
    return -(-((state.numel + 1) // 2) // itemsize)


@functools.lru_cache(maxsize=1024)
def shard_layout(words: int, world: int, itemsize: int, blocksize: int, nblocks: int) -> tuple:
    """Per-rank (word range, owned block range) under FSDP2's chunking, and the padded sizes every rank uses."""
    chunk = -(-words // world)
    rows = [(min(r * chunk, words), min((r + 1) * chunk, words)) for r in range(world)]
    blocks = [owned_blocks(lo, hi, itemsize, blocksize, nblocks) for lo, hi in rows]
    max_blocks = max(hi - lo for lo, hi in blocks)
    return chunk, tuple(rows), tuple(blocks), max_blocks


_NOT_QUANTIZED = "fully_shard needs quantized Params4bit weights: call .to(device) on the module first"


def _layout_of(param, world: int) -> tuple:
    state = param.quant_state
    if state is None:  # torch's fully_shard (e.g. through accelerate) does not check what shard_model checks
        raise RuntimeError(_NOT_QUANTIZED)
    itemsize = param.dtype.itemsize
    nblocks = -(-state.numel // state.blocksize)
    return shard_layout(total_words(state, itemsize), world, itemsize, state.blocksize, nblocks)


def _padded_owned_absmax(param, world: int, rank: int, layout: tuple | None = None) -> torch.Tensor:
    """This rank's owned absmax, checked against the block layout and zero-padded to the largest owned count."""
    state = param.quant_state
    if state is None:
        raise RuntimeError(_NOT_QUANTIZED)
    _, _, blocks, max_blocks = layout if layout is not None else _layout_of(param, world)
    lo, hi = blocks[rank]
    if state.absmax.numel() != hi - lo:
        raise RuntimeError(
            f"shard {rank}/{world} holds {state.absmax.numel()} absmax entries but owns blocks [{lo}, {hi})"
        )
    absmax = state.absmax.reshape(-1)
    if absmax.numel() < max_blocks:
        absmax = torch.cat([absmax, absmax.new_zeros(max_blocks - absmax.numel())])
    return absmax


class _GatherInputs:
    """A shard's all-gather inputs, kept on the shard while the words, statistics and mesh they come from are the
    same objects at the same versions. A frozen weight is gathered with the same inputs twice per step, and
    building them (statistics slice, layout, padding, the mesh's rank) costs more host time than launching the
    all-gather; any in-place write (a checkpoint load) bumps a version and rebuilds them."""

    __slots__ = ("mesh", "objects", "versions", "inputs", "metadata")

    def __init__(self, mesh, objects: tuple, versions: tuple, inputs: tuple, metadata: Any) -> None:
        self.mesh, self.objects, self.versions, self.inputs, self.metadata = mesh, objects, versions, inputs, metadata

    def matches(self, mesh, objects: tuple, versions: tuple) -> bool:
        return all(map(operator.is_, objects, self.objects)) and versions == self.versions and mesh == self.mesh


def _input_key(param, mesh) -> tuple | None:
    """(mesh, objects, versions) the all-gather inputs of ``param`` depend on; None where versions are not
    tracked (inference tensors)."""
    data = plain(param)
    state = param._storage_meta.quant_state
    if state is None or torch.is_inference(data) or torch.is_inference(state.absmax):
        return None
    return mesh, (data, state, state.absmax), (data._version, state.absmax._version, param.row_start)


def pre_all_gather(param, mesh) -> tuple[tuple[torch.Tensor, ...], Any]:
    """All-gather inputs of this rank's shard: (packed words padded to the chunk size, owned absmax padded);
    the metadata carries the world size and the shard layout to the post-hook."""
    key = _input_key(param, mesh)
    cached = getattr(param, "_gather_inputs", None)
    if key is not None and cached is not None and cached.matches(*key):
        return cached.inputs, cached.metadata
    world, rank = mesh.size(), mesh.get_local_rank()
    layout = _layout_of(param, world)
    absmax = _padded_owned_absmax(param, world, rank, layout)
    chunk = layout[0]
    words = plain(param).reshape(-1)
    if words.numel() < chunk:
        words = torch.cat([words, words.new_zeros(chunk - words.numel())])
    inputs, metadata = (words, absmax), (world, layout)
    if key is not None:
        param._gather_inputs = _GatherInputs(*key, inputs, metadata)
    return inputs, metadata


@functools.lru_cache(maxsize=1024)
def _gather_index(blocks: tuple, max_blocks: int, device: torch.device) -> torch.Tensor | None:
    """Positions of the owned absmax entries inside the padded all-gather output, in block order; None where they
    are its first entries already (every rank but the last owns ``max_blocks`` blocks, as in any weight whose
    shards split at block boundaries), so the gathered absmax is used in place."""
    index = [r * max_blocks + i for r, (lo, hi) in enumerate(blocks) for i in range(hi - lo)]
    if index == list(range(len(index))):
        return None
    return torch.tensor(index, dtype=torch.long, device=device)


def _absmax_in_order(gathered: torch.Tensor, blocks: tuple, max_blocks: int) -> tuple[torch.Tensor, bool]:
    """Every rank's owned absmax in block order, from the padded all-gather output, and whether it is a view of
    ``gathered`` (its first entries) rather than a copy."""
    index = _gather_index(blocks, max_blocks, gathered.device)
    if index is None:
        return gathered[: sum(hi - lo for lo, hi in blocks)], True
    return torch.index_select(gathered, 0, index), False


def _state_on(state: QuantState, device: torch.device) -> QuantState:
    """``state`` itself when it already lives on ``device``, else a copy there (CPU-offloaded shards)."""
    from .tensor_ops import copy_state

    return state if state.absmax.device == device else copy_state(state, device)


def _keeping_version(t: torch.Tensor):
    """A context that keeps ``t``'s version counter through an in-place write (none to keep for an inference
    tensor)."""
    if torch.is_inference(t):
        return contextlib.nullcontext()
    return torch.autograd._unsafe_preserve_version_counter(t)


def post_all_gather(param, outputs: Sequence[torch.Tensor], metadata: Any, param_dtype, *, out=None):
    """Rebuild the full Params4bit from gathered words and absmax (refill ``out`` in place after the first time)."""
    world, (chunk, rows, blocks, max_blocks) = metadata
    total = rows[-1][1]
    device = outputs[0].device
    if out is not None:  # a load since the first gather may have changed the shard's weight dtype
        out.quant_state.dtype = param.quant_state.dtype
    if len(outputs) == 1:
        # World size 1: FSDP2 passes the packed words alone; this shard already owns every block.
        if out is not None:
            return None
        return type(param).wrap(outputs[0][:total].view(total, 1), param, _state_on(param.quant_state, device), 0), ()
    words_out, absmax_out = outputs
    if out is not None:
        index = _gather_index(blocks, max_blocks, absmax_out.device)
        if index is not None:
            target = out.quant_state.absmax
            # A refill after resharding: autograd saved this tensor in the forward, keep its version (an inference
            # tensor, from a first gather under torch.inference_mode, has none)
            with torch.no_grad(), _keeping_version(target):
                torch.index_select(absmax_out, 0, index, out=target)
        return None
    # ``param`` is the resident shard: with CPU offload its state is on the host, the gathered data is not.
    state = _state_on(param.quant_state, device)
    # A view is refilled by FSDP2 itself at every gather, as the words are; a copy is a tensor of its own that
    # FSDP2 frees and reallocates with the unsharded weight, and the branch above refills.
    absmax, is_view = _absmax_in_order(absmax_out, blocks, max_blocks)
    full_state = QuantState(
        absmax, state.shape, state.code, state.blocksize, state.quant_type, state.dtype, state.offset, state.state2
    )
    data = words_out[:total].view(total, 1)
    return type(param).wrap(data, param, quant_state=full_state, row_start=0), (() if is_view else (absmax,))


@functools.cache
def fsdp_supports_integer_params() -> bool:
    """Whether this torch's FSDP2 can shard a non-float parameter (uint8 quant_storage).

    torch 2.11's ``FSDPParam`` wraps each shard as ``nn.Parameter(dtensor)`` with the default
    ``requires_grad=True``, which integer tensors refuse; newer releases pass the parameter's own flag.
    """
    import inspect

    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    return "requires_grad=param.requires_grad" in inspect.getsource(FSDPParam._init_sharded_param)


def _is_4bit(module: nn.Module) -> bool:
    from .nn import Params4bit

    return isinstance(getattr(module, "weight", None), Params4bit)


def _mesh_device_type(mesh: Any) -> str:
    """The device type fully_shard puts parameters on: the mesh's, else the current accelerator's, else the CPU."""
    if mesh is not None:
        return mesh.device_type
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    return "cpu" if accelerator is None else accelerator.type


def check_shardable(module: nn.Module, device_type: str | None = None) -> None:
    """Raise ValueError for a 4-bit weight in ``module`` that FSDP2 cannot shard: not quantized yet, requiring grad,
    on another device type than ``device_type`` (FSDP2 would move it as a new Parameter that requires grad), or of
    integer storage on a torch whose FSDP2 refuses integer parameters."""
    from .nn import Params4bit

    for name, param in module.named_parameters():
        if not isinstance(param, Params4bit):
            continue
        if param.quant_state is None:
            raise ValueError(f"{name} is a Params4bit that is not quantized yet: call .to(device) before sharding it")
        if param.requires_grad:
            raise ValueError(
                f"{name} is a Params4bit that requires grad: a 4-bit weight is frozen (no gradient reaches its words; "
                "train adapters such as LoRA on top of it): call requires_grad_(False) on it before sharding"
            )
        if not param.dtype.is_floating_point and not fsdp_supports_integer_params():
            raise ValueError(
                f"{name} has quant_storage={param.dtype}, but this torch ({torch.__version__}) FSDP2 cannot shard "
                "integer parameters (it marks every shard requires_grad=True). Use quant_storage=torch.bfloat16 "
                "(the packed bytes are identical) or torch >= 2.13."
            )
        if device_type is not None and param.device.type not in (device_type, "meta"):
            raise ValueError(
                f"{name} is a 4-bit weight on {param.device}, and fully_shard puts parameters on {device_type}: move "
                f"the model there first (model.to({device_type!r})), as FSDP2's own move would make it require grad"
            )


def units_bottom_up(model: nn.Module, is_unit: Callable[[nn.Module], bool]) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every module below ``model`` that ``is_unit`` selects, each after the units
    nested in it: the order ``fully_shard`` needs (FSDP2 gives a module the parameters no inner unit holds, so an
    outer unit sharded first would take its inner units' parameters too)."""
    units: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()

    def visit(name: str, module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)
        if module is not model and is_unit(module):
            units.append((name, module))

    visit("", model)
    return units


def _parameter_holders(model: nn.Module, units: list[nn.Module]) -> tuple[list[set[int]], dict[int, int]]:
    """For each parameter held by more than one node, the nodes holding it (a unit's index in ``units``, -1 for the
    root: the innermost node around each module that registers it), and each unit's enclosing node."""
    index = {id(unit): i for i, unit in enumerate(units)}
    holders: dict[int, set[int]] = {}
    enclosing: dict[int, int] = {}

    def visit(module: nn.Module, node: int) -> None:
        inner = index.get(id(module), node)
        if inner != node:
            enclosing[inner] = node
        for param in module._parameters.values():
            if param is not None:
                holders.setdefault(id(param), set()).add(inner)
        for child in module.children():
            visit(child, inner)

    visit(model, -1)
    return [held for held in holders.values() if len(held) > 1], enclosing


def _encloses(outer: int, node: int, enclosing: dict[int, int]) -> bool:
    """Whether node ``outer`` (-1: the root) lies around unit ``node``."""
    while node != -1:
        node = enclosing[node]
        if node == outer:
            return True
    return False


def shard_groups(model: nn.Module, units: list[nn.Module]) -> list[list[nn.Module]]:
    """The ``fully_shard`` calls for ``units`` (bottom-up order), the root's left out. FSDP2 refuses a parameter in
    two groups, so a unit sharing one with a module around it is left to that module's group, and units sharing one
    with each other are sharded together; a group comes before every unit around one of its members (an outer unit
    sharded first would take the member's parameters), otherwise in the order of its last member."""
    units = list(units)
    while True:
        shared, enclosing = _parameter_holders(model, units)
        inner = {n for held in shared for n in held for o in held if n != -1 and _encloses(o, n, enclosing)}
        if not inner:
            break
        units = [unit for i, unit in enumerate(units) if i not in inner]
    group_of = list(range(len(units)))

    def root(i: int) -> int:
        while group_of[i] != i:
            i = group_of[i]
        return i

    for held in shared:
        first, *rest = sorted(held)
        for other in rest:
            group_of[root(other)] = root(first)
    members: dict[int, list[int]] = {}
    for i in range(len(units)):
        members.setdefault(root(i), []).append(i)
    return [[units[i] for i in members[g]] for g in _inner_groups_first(members, root, enclosing)]


def _inner_groups_first(
    members: dict[int, list[int]], group: Callable[[int], int], enclosing: dict[int, int]
) -> list[int]:
    """The groups (``members``: group -> unit indices) ordered so that each comes before the groups of the units
    around its members, ties broken by the last member's index (ValueError where units tied across nesting levels
    make that impossible)."""
    after: dict[int, set[int]] = {g: set() for g in members}  # g -> groups that must come after g
    for g, indices in members.items():
        for i in indices:
            node = enclosing.get(i, -1)
            while node != -1:
                if group(node) != g:
                    after[g].add(group(node))
                node = enclosing.get(node, -1)
    waiting = {g: sum(g in later for later in after.values()) for g in members}
    order: list[int] = []
    ready = [g for g in members if waiting[g] == 0]
    while ready:
        g = min(ready, key=lambda h: members[h][-1])
        ready.remove(g)
        order.append(g)
        for later in after[g]:
            waiting[later] -= 1
            if waiting[later] == 0:
                ready.append(later)
    if len(order) != len(members):
        raise ValueError(
            "blocks share parameters across nesting levels in a cycle (a block tied to one inside another block tied "
            "to one inside the first): no order of fully_shard calls gives each parameter one group; pass "
            "block_types without the nested type"
        )
    return order


def fsdp_unit(group: list[nn.Module]) -> nn.Module | list[nn.Module]:
    """What ``fully_shard`` takes for a group of :func:`shard_groups`: its module, or the modules sharing
    parameters as a list (one FSDP group)."""
    return group[0] if len(group) == 1 else group


def _fsdp_options(mesh, mp_policy, reshard_after_forward: bool, cpu_offload: bool) -> dict[str, Any]:
    """``fully_shard`` keyword arguments for these settings."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    options: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
    if mesh is not None:
        options["mesh"] = mesh
    options["mp_policy"] = mp_policy if mp_policy is not None else MixedPrecisionPolicy()
    if cpu_offload:
        # pinned host memory needs an accelerator: without one (a CPU mesh, gloo) torch's default pin_memory=True
        # fails in fully_shard with "Cannot access accelerator device when none is available"
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.accelerator.is_available())
    return options


def _check_shard_args(model: object, mesh: object, mp_policy: object) -> None:
    """TypeError for a model, mesh or policy that fully_shard would fail on later with an AttributeError."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if mesh is not None and not isinstance(mesh, DeviceMesh):
        raise TypeError(
            f"mesh must be a torch.distributed.device_mesh.DeviceMesh or None (the default: every rank), got "
            f"{type(mesh).__name__}"
        )
    if mp_policy is not None and not isinstance(mp_policy, MixedPrecisionPolicy):
        raise TypeError(
            f"mp_policy must be a torch.distributed.fsdp.MixedPrecisionPolicy or None, got {type(mp_policy).__name__} "
            f"{mp_policy!r}"
        )


def as_block_types(block_types: object) -> tuple[type, ...] | None:
    """``block_types`` as a tuple of module classes (a list or a single class is taken too), or None."""
    if block_types is None:
        return None
    types = (block_types,) if isinstance(block_types, type) else block_types
    if not isinstance(types, (tuple, list)) or not all(isinstance(t, type) for t in types):
        raise TypeError(f"block_types must be a tuple of torch.nn.Module classes or None, got {block_types!r}")
    return tuple(types)


def shard_module(
    module: nn.Module | list[nn.Module],
    *,
    mesh=None,
    mp_policy=None,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
) -> nn.Module | list[nn.Module]:
    """``fully_shard`` one module (a block, or the root once its blocks are sharded), or a list of modules sharing
    parameters as one group, after ``check_shardable``; lets a loader shard each block as soon as it is loaded."""
    from torch.distributed.fsdp import fully_shard

    for one in module if isinstance(module, list) else [module]:
        _check_shard_args(one, mesh, mp_policy)
        check_shardable(one, _mesh_device_type(mesh))
    fully_shard(module, **_fsdp_options(mesh, mp_policy, reshard_after_forward, cpu_offload))
    return module


def shard_model(
    model: nn.Module,
    *,
    mesh=None,
    block_types: tuple[type[nn.Module], ...] | None = None,
    mp_policy=None,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
) -> nn.Module:
    """Apply FSDP2 the usual way: ``fully_shard`` each block (given types, or every module holding 4-bit
    weights when none are given; nested blocks inner first; blocks tied by a shared parameter together), then the
    root. 4-bit weights must be quantized (``.to(device)``) first; every weight is checked before anything is
    sharded."""
    from torch.distributed.fsdp import fully_shard

    _check_shard_args(model, mesh, mp_policy)
    block_types = as_block_types(block_types)
    check_shardable(model, _mesh_device_type(mesh))
    is_unit = _is_4bit if block_types is None else (lambda m: isinstance(m, block_types))
    groups = shard_groups(model, [m for _, m in units_bottom_up(model, is_unit)])
    options = _fsdp_options(mesh, mp_policy, reshard_after_forward, cpu_offload)
    for group in [*groups, [model]]:
        fully_shard(fsdp_unit(group), **options)
    return model


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def is_sharded(weight: Any) -> bool:
    """True for an FSDP2-sharded 4-bit weight (a DTensor whose local shard is a quantized Params4bit)."""
    return _is_dtensor(weight) and getattr(weight._local_tensor, "quant_state", None) is not None


def as_like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``value`` laid out like ``target``: a whole plain tensor is distributed when the target is a DTensor."""
    if _is_dtensor(target) and not _is_dtensor(value):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(target.device), target.device_mesh, target.placements)
    return value


def shard_dim(weight) -> int:
    """The mesh dimension a sharded weight is split over (HSDP's 2-D meshes replicate it over the other one)."""
    dims = [i for i, placement in enumerate(weight.placements) if placement.is_shard()]
    if len(dims) != 1:
        raise ValueError(
            f"a sharded 4-bit weight must be split over exactly one mesh dimension, got {weight.placements}"
        )
    return dims[0]


def gather_quant_state(weight) -> QuantState:
    """The whole QuantState of a sharded weight, all-gathering the owned absmax of every shard (one small collective)."""
    import torch.distributed as dist

    local, mesh, dim = weight._local_tensor, weight.device_mesh, shard_dim(weight)
    world = mesh.size(dim)
    absmax = _padded_owned_absmax(local, world, mesh.get_local_rank(dim))
    gathered = absmax.new_empty(world * absmax.numel())
    dist.all_gather_into_tensor(gathered, absmax, group=mesh.get_group(dim))
    _, _, blocks, max_blocks = _layout_of(local, world)
    state = local.quant_state
    full, is_view = _absmax_in_order(gathered, blocks, max_blocks)
    if is_view and full.numel() != gathered.numel():
        full = full.clone()  # a state dict entry of its own size (torch.save writes a view's whole storage)
    return QuantState(
        full, state.shape, state.code, state.blocksize, state.quant_type, state.dtype, state.offset, state.state2
    )


def sharded_state_dict_entries(weight) -> tuple[torch.Tensor, QuantState]:
    """For an FSDP-sharded 4-bit weight: (packed words as a DTensor over plain bytes, the whole QuantState).

    DCP saves and reshards the packed words like any Shard(0) tensor; the statistics are small and saved
    whole (replicated), so a checkpoint loads on any world size.
    """
    from torch.distributed.tensor import DTensor

    local = weight._local_tensor
    packed = DTensor.from_local(
        plain(local), weight.device_mesh, weight.placements, run_check=False, shape=weight.shape, stride=weight.stride()
    )
    return packed, gather_quant_state(weight)


def _words_in(packed: torch.Tensor, nbytes: int, dtype: torch.dtype, words: tuple[int, int]) -> torch.Tensor:
    """Words ``words`` (a [lo, hi) range) of ``dtype`` holding the ``nbytes`` packed bytes of ``packed`` (any storage
    dtype: the same bytes), zero past them as quantize_4bit pads them (ValueError for another byte count)."""
    raw = packed.reshape(-1).view(torch.uint8)
    if not nbytes <= raw.numel() < nbytes + packed.element_size():
        raise ValueError(
            f"packed weight has {raw.numel()} bytes ({packed.numel()} {packed.dtype} words), a weight of "
            f"{2 * nbytes - 1}-{2 * nbytes} values needs {nbytes} (padded to whole words)"
        )
    lo, hi = words[0] * dtype.itemsize, words[1] * dtype.itemsize
    out = torch.zeros(hi - lo, dtype=torch.uint8, device=packed.device)
    taken = raw[lo : min(hi, nbytes)]
    out[: taken.numel()] = taken
    return out.view(dtype)


def load_sharded_entries(weight, packed: torch.Tensor, full_state: QuantState) -> None:
    """Copy a checkpoint's packed words (DTensor or the whole plain tensor) and whole statistics into a shard."""
    local = weight._local_tensor
    mesh, dim = weight.device_mesh, shard_dim(weight)
    world, rank = mesh.size(dim), mesh.get_local_rank(dim)
    state = local.quant_state
    layout = (tuple(full_state.shape), full_state.quant_type, full_state.blocksize, full_state.nested)
    if layout != (tuple(state.shape), state.quant_type, state.blocksize, state.nested):
        raise ValueError(
            f"checkpoint holds a {full_state.quant_type} weight of shape {tuple(full_state.shape)} (blocksize "
            f"{full_state.blocksize}, nested {full_state.nested}), the model a {state.quant_type} weight of shape "
            f"{tuple(state.shape)} (blocksize {state.blocksize}, nested {state.nested})"
        )
    _, rows, blocks, _ = _layout_of(local, world)
    target = plain(local)
    if _is_dtensor(packed) and packed.dtype != target.dtype:
        # another quant_storage shards the same bytes at other word boundaries: gather them (every rank loads the
        # same entries with the same dtypes, so every rank takes this collective) and take this rank's bytes
        packed = packed.full_tensor()
    with torch.no_grad():
        if _is_dtensor(packed):
            source = packed.to_local()
            if plain(source).untyped_storage().data_ptr() != target.untyped_storage().data_ptr():
                target.copy_(plain(source).view(target.shape))
        else:
            words = _words_in(plain(packed), (full_state.numel + 1) // 2, target.dtype, rows[rank])
            target.copy_(words.view(target.shape))
        lo, hi = blocks[rank]
        # the checkpoint's weight dtype (dequantize's default output), as load_state_dict takes it
        state.dtype = full_state.dtype
        state.absmax.copy_(full_state.absmax[lo:hi].to(state.absmax.device))
        if state.nested:
            state.offset.copy_(full_state.offset)
            state.state2.absmax.copy_(full_state.state2.absmax)
            state.state2.code.copy_(full_state.state2.code)
