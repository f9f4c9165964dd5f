"""Multi-process FSDP2 checks, one scenario per run: ``torchrun --nproc_per_node=N worker.py SCENARIO [ARGS]``.

Each scenario asserts and exits non-zero on failure; rank 0 prints one JSON line of measurements.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy

import fsdp4bit as bnb
from fsdp4bit import sharding
from fsdp4bit.sharding import shard_model
from fsdp4bit.train.distributed import teardown

DEVICE = torch.device(os.environ.get("FSDP4BIT_TEST_DEVICE", "cpu"))
STORAGES = {"uint8": torch.uint8, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def special_words(dtype: torch.dtype) -> torch.Tensor:
    """Every NaN and Inf bit pattern of ``dtype`` (for 16-bit types), as raw bytes; a sample for float32."""
    if dtype in (torch.float16, torch.bfloat16):
        exp_bits = 0x7C00 if dtype == torch.float16 else 0x7F80
        words = torch.arange(0, 1 << 16, dtype=torch.int32)
        special = words[(words & exp_bits) == exp_bits].to(torch.int16)
        return special.view(torch.uint8)
    if dtype == torch.float32:
        mant = torch.randint(0, 1 << 23, (4096,), generator=torch.Generator().manual_seed(1), dtype=torch.int64)
        sign = torch.randint(0, 2, (4096,), generator=torch.Generator().manual_seed(2), dtype=torch.int64) << 31
        words = (sign | (0xFF << 23) | mant) & 0xFFFFFFFF
        words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
        return words.view(torch.uint8)
    return torch.arange(256, dtype=torch.int32).to(torch.uint8)


def make_layer(
    out_f: int,
    in_f: int,
    storage: torch.dtype,
    quant_type: str,
    dq: bool,
    blocksize: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
):
    torch.manual_seed(seed)
    layer = bnb.nn.Linear4bit(
        in_f, out_f, bias=True, quant_type=quant_type, compress_statistics=dq, quant_storage=storage
    )
    layer.weight = bnb.nn.Params4bit(
        layer.weight.data.to(dtype),
        quant_type=quant_type,
        compress_statistics=dq,
        quant_storage=storage,
        blocksize=blocksize,
    )
    return layer.to(DEVICE)


def scenario_bytes() -> dict:
    """Random packed bytes with every NaN/Inf pattern survive shard -> all-gather bit-exactly, every storage dtype,
    for shards that split inside a quantization block (97x131) and at block boundaries (96x256); a second gather
    after in-place writes to every shard carries the new bytes."""
    world = dist.get_world_size()
    report = {}
    for name, storage in STORAGES.items():
        if storage == torch.uint8 and not sharding.fsdp_supports_integer_params():
            report[f"{name}-skipped"] = "this torch's FSDP2 cannot shard integer parameters"
            continue
        for (out_f, in_f), suffix in (((97, 131), ""), ((96, 256), "-aligned")):
            for quant_type, dq, blocksize in (("nf4", True, 64), ("fp4", False, 32), ("nf4", False, 4096)):
                layer = make_layer(out_f, in_f, storage, quant_type, dq, blocksize, seed=3)
                w = layer.weight
                raw = plain_bytes(w)
                special = special_words(storage)
                gen = torch.Generator().manual_seed(7)
                raw.copy_(torch.randint(0, 256, raw.shape, generator=gen, dtype=torch.uint8))
                n = min(special.numel(), raw.numel()) // storage.itemsize * storage.itemsize
                raw[:n] = special[:n]
                expected_bytes = raw.clone()
                expected_state = copy.deepcopy(w.quant_state)
                ref = copy.deepcopy(layer)
                shard_model(layer)
                local = layer.weight._local_tensor
                inputs, _ = local.fsdp_pre_all_gather(layer.weight.device_mesh)
                words = sharding.total_words(expected_state, storage.itemsize)
                nblocks = expected_state.absmax.numel()
                assert local.numel() <= -(-words // world), "each rank holds at most 1/W of the packed words"
                assert local.quant_state.absmax.numel() <= -(-nblocks // world) + 1, "and about 1/W of the statistics"
                sent = sum(t.numel() * t.element_size() for t in inputs)
                layer.unshard()
                full = layer.weight
                assert isinstance(full, bnb.nn.Params4bit), type(full)
                assert torch.equal(plain_bytes(full), expected_bytes), f"bytes changed ({name}, {quant_type})"
                assert full.quant_state == expected_state, f"quant state changed ({name}, {quant_type})"
                x = torch.randn(5, in_f, device=DEVICE)
                layer.reshard()
                if storage == torch.uint8:
                    assert torch.equal(layer(x), ref(x)), "forward differs from the unsharded layer"
                check_refill(layer, seed=11)
                report[f"{name}-{quant_type}-dq{int(dq)}-bs{blocksize}{suffix}"] = {
                    "allgather_bytes_per_param": sent * world / (out_f * in_f),
                    "local_absmax": local.quant_state.absmax.numel(),
                }
    return report


def check_refill(layer: nn.Module, seed: int) -> None:
    """Rewrite this rank's shard (words and absmax bytes) in place, unshard again: the full weight must hold every
    rank's new bytes in rank order (FSDP2 refills the gathered weight in place after the first gather)."""
    local = layer.weight._local_tensor  # FSDP2 may have replaced the shard's local tensor at the first gather
    gen = torch.Generator().manual_seed(seed + dist.get_rank())
    words = plain_bytes(local)
    absmax = local.quant_state.absmax.reshape(-1).view(torch.uint8)
    for t in (words, absmax):
        t.copy_(torch.randint(0, 256, t.shape, generator=gen, dtype=torch.uint8))
    pieces = [None] * dist.get_world_size()
    dist.all_gather_object(pieces, (words.cpu(), absmax.cpu()))
    layer.unshard()
    full = layer.weight
    assert torch.equal(plain_bytes(full).cpu(), torch.cat([p[0] for p in pieces])), "refilled words differ"
    got = full.quant_state.absmax.reshape(-1).view(torch.uint8).cpu()
    assert torch.equal(got, torch.cat([p[1] for p in pieces])), "refilled absmax differs"
    layer.reshard()


def plain_bytes(w) -> torch.Tensor:
    return sharding.plain(w).reshape(-1).view(torch.uint8)


class LoRALinear(nn.Module):
    """A frozen 4-bit base plus a trainable low-rank update, in one module (as peft builds it)."""

    def __init__(self, base: nn.Module, rank: int = 4) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Linear(base.in_features, rank, bias=False)
        self.lora_b = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.lora_b.weight, std=0.02)

    def forward(self, x):
        return self.base(x) + self.lora_b(self.lora_a(x))


def make_model(storage: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    dims = [(67, 45), (45, 29), (29, 3)]
    layers = []
    for i, (i_f, o_f) in enumerate(dims):
        base = make_layer(o_f, i_f, storage, "nf4" if i % 2 == 0 else "fp4", i != 1, 64, seed + i)
        base.bias.requires_grad_(False)
        layers.append(LoRALinear(base).to(DEVICE))
        if i < len(dims) - 1:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


def train(model: nn.Module, batches, steps: int, ckpt: bool = False) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(steps):
        x, y = batches[step % len(batches)]
        if ckpt:
            out = torch.utils.checkpoint.checkpoint(model, x, use_reentrant=False)
        else:
            out = model(x)
        loss = nn.functional.mse_loss(out.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def mesh_for(layout: str):
    """None (fully_shard's default 1-D mesh over every rank) for "fsdp"; for "hsdp" a 2-D mesh that replicates
    over 2 groups and shards within each."""
    if layout == "fsdp":
        return None
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    assert layout == "hsdp" and world % 2 == 0, (layout, world)
    return init_device_mesh(DEVICE.type, (2, world // 2), mesh_dim_names=("replicate", "shard"))


def scenario_train(storage_name: str, precision: str, reshard: str, ckpt: str, layout: str = "fsdp") -> dict:
    """N AdamW steps of 4-bit base + LoRA under FSDP2 (or HSDP) match a single-process run on the whole batch."""
    rank, world = dist.get_rank(), dist.get_world_size()
    storage = STORAGES[storage_name]
    steps, per_rank = 6, 4
    gen = torch.Generator().manual_seed(11)
    data = [
        (
            torch.randn(per_rank * world, 67, generator=gen).to(DEVICE),
            torch.randn(per_rank * world, 3, generator=gen).to(DEVICE),
        )
        for _ in range(3)
    ]
    ref_model = make_model(storage)
    model = make_model(storage)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else None
    if mp is not None:
        ref_model = ref_model.to(torch.bfloat16)
    shard_model(
        model,
        mesh=mesh_for(layout),
        block_types=(LoRALinear,),
        mp_policy=mp,
        reshard_after_forward=reshard != "noreshard",
        cpu_offload=reshard == "offload",
    )
    local = [(x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]) for x, y in data]
    losses = train(model, local, steps, ckpt == "ckpt")
    losses_t = torch.tensor(losses, device=DEVICE)
    dist.all_reduce(losses_t)
    losses_avg = (losses_t / world).tolist()
    ref_batches = [(x.to(torch.bfloat16) if mp else x, y) for x, y in data]
    ref_losses = train(ref_model, ref_batches, steps, ckpt == "ckpt")
    tol = 1e-5 if precision == "fp32" else 2e-2
    for a, b in zip(losses_avg, ref_losses, strict=True):
        assert abs(a - b) <= tol * max(1.0, abs(b)), f"loss {a} vs single-process {b} ({losses_avg} vs {ref_losses})"
    sd = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    ref_sd = ref_model.state_dict()
    for k, v in ref_sd.items():
        if "lora" in k:
            torch.testing.assert_close(sd[k].float().cpu(), v.float().cpu(), rtol=tol * 10, atol=tol * 10)
        elif v.dtype == torch.uint8 or "weight." in k or k.endswith("base.weight"):
            assert torch.equal(
                sharding.plain(sd[k]).cpu().reshape(-1).view(torch.uint8),
                sharding.plain(v).cpu().reshape(-1).view(torch.uint8),
            ), f"{k} changed"
    return {"losses": losses_avg, "reference": ref_losses}


def scenario_dcp_save(path: str, storage_name: str, layout: str = "fsdp") -> dict:
    from fsdp4bit import checkpoint

    model = make_model(STORAGES[storage_name], seed=5)
    shard_model(model, mesh=mesh_for(layout), block_types=(LoRALinear,))
    checkpoint.save(model, path)
    full = checkpoint.full_state_dict(model)
    out = model(checkpoint_input())
    if dist.get_rank() == 0:
        torch.save(full, os.path.join(path, "reference_full.pt"))
        torch.save(out.detach().cpu(), os.path.join(path, "reference_out.pt"))
    return {"saved": path}


def checkpoint_input() -> torch.Tensor:
    """The input the checkpoint scenarios compare outputs on (the same on every rank and world size)."""
    return torch.randn(3, 67, generator=torch.Generator().manual_seed(11)).to(DEVICE)


def scenario_dcp_load(path: str, storage_name: str, layout: str = "fsdp") -> dict:
    from fsdp4bit import checkpoint

    model = make_model(STORAGES[storage_name], seed=99)  # different weights: all must come from the checkpoint
    shard_model(model, mesh=mesh_for(layout), block_types=(LoRALinear,))
    x = checkpoint_input()
    model(x)  # gathers the old bytes first: the load must also renew what the gather hook keeps
    checkpoint.load(model, path)
    full = checkpoint.full_state_dict(model)
    if dist.get_rank() == 0:
        ref = torch.load(os.path.join(path, "reference_full.pt"), weights_only=False)
        assert set(ref) == set(full), set(ref) ^ set(full)
        for k in ref:
            assert torch.equal(
                sharding.plain(full[k]).reshape(-1).view(torch.uint8),
                sharding.plain(ref[k]).reshape(-1).view(torch.uint8),
            ), f"{k} differs after reload"
    out = model(x).detach().cpu()
    ref_out = torch.load(os.path.join(path, "reference_out.pt"))
    assert torch.equal(out, ref_out), f"the reloaded model computes something else: {(out - ref_out).abs().max()}"
    return {"loaded": path}


def scenario_dsd(path: str, storage_name: str, layout: str = "fsdp") -> dict:
    """torch's state-dict API (DSD: accelerate's FSDP2 save/load, torchtitan) round-trips a sharded 4-bit model:
    sharded through DCP files, full on every rank, and full on rank 0 broadcast to the others."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    from fsdp4bit import checkpoint

    storage = STORAGES[storage_name]
    rank = dist.get_rank()
    x = torch.randn(5, 67, generator=torch.Generator().manual_seed(3)).to(DEVICE)

    def sharded(seed: int) -> nn.Module:
        return shard_model(make_model(storage, seed=seed), mesh=mesh_for(layout), block_types=(LoRALinear,))

    source = sharded(5)
    expected = source(x)
    reference = {k: plain_bytes(v).cpu() for k, v in checkpoint.full_state_dict(source).items()}
    options = {
        "sharded": (StateDictOptions(), StateDictOptions()),
        "full": (StateDictOptions(full_state_dict=True), StateDictOptions(full_state_dict=True)),
        "full_rank0": (
            StateDictOptions(full_state_dict=True, cpu_offload=True),
            StateDictOptions(full_state_dict=True, broadcast_from_rank0=True),
        ),
    }
    for name, (get_options, set_options) in options.items():
        state = get_model_state_dict(source, options=get_options)
        if name == "full_rank0" and rank != 0:
            assert state == {}, f"rank {rank} got a rank-0-only state dict with {len(state)} keys"
        else:
            assert set(state) == set(reference), set(state) ^ set(reference)
        target = scrambled(sharded(5))  # the same layout (DCP loads into it), every value overwritten
        target(x)  # gathers the scrambled bytes first: the load must also renew what the gather hook keeps
        if name == "sharded":
            dcp.save(state, checkpoint_id=os.path.join(path, name))
            state = get_model_state_dict(target, options=get_options)
            dcp.load(state, checkpoint_id=os.path.join(path, name))
        result = set_model_state_dict(target, state, options=set_options)
        assert not result.missing_keys and not result.unexpected_keys, (name, result)
        assert torch.equal(target(x), expected), f"{name}: the reloaded model computes something else"
        loaded = checkpoint.full_state_dict(target)
        for k, v in reference.items():
            assert torch.equal(plain_bytes(loaded[k]).cpu(), v), f"{name}: {k} differs after the round trip"
    return {"cases": list(options)}


def scrambled(model: nn.Module, seed: int = 1234) -> nn.Module:
    """``model`` with random packed words, statistics and LoRA weights: what a load must overwrite. The JSON
    metadata (shapes, nested offset) stays: a DCP load reads into entries of the model's own sizes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                local = getattr(module.weight, "_local_tensor", module.weight)
                words = plain_bytes(local)
                words.copy_(torch.randint(0, 256, words.shape, generator=gen, dtype=torch.uint8))
                state = local.quant_state
                tables = [state.absmax] + ([state.state2.absmax] if state.nested else [])
                for t in tables:
                    t.copy_(torch.randint(0, 256, t.shape, generator=gen).to(t.dtype))
            elif isinstance(module, nn.Linear):
                weight = getattr(module.weight, "_local_tensor", module.weight)
                weight.copy_(torch.randn(weight.shape, generator=gen))
    return model


def scenario_gather_cache(storage_name: str) -> dict:
    """The all-gather inputs the pre-hook keeps between gathers follow in-place writes to a shard's words and
    statistics: after a forward, an in-place rewrite of every shard, then a forward that must see the new bytes
    (the same output as with nothing kept)."""
    model = shard_model(make_model(STORAGES[storage_name], seed=2), mesh=mesh_for("fsdp"), block_types=(LoRALinear,))
    x = checkpoint_input()
    model(x)
    kept = [m.weight._local_tensor for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert all(getattr(t, "_gather_inputs", None) is not None for t in kept), "the pre-hook kept no inputs"
    scrambled(model, seed=77)
    got = model(x)
    for t in kept:
        del t._gather_inputs
    torch.testing.assert_close(got, model(x), rtol=0, atol=0, equal_nan=True)
    return {"shards": len(kept)}


class Block(nn.Module):
    """A residual block with one 4-bit projection (the unit ``load_sharded`` materializes and shards)."""

    def __init__(self, dim: int, storage: torch.dtype) -> None:
        super().__init__()
        self.fc = bnb.nn.Linear4bit(dim, dim, quant_type="nf4", quant_storage=storage)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        return self.norm(x + self.fc(x))


def block_model(storage: torch.dtype, device: str, dim: int = 40, depth: int = 3) -> nn.Module:
    with torch.device(device):
        return nn.Sequential(*[Block(dim, storage) for _ in range(depth)], nn.Linear(dim, 5))


def scenario_load_meta(path: str, kind: str) -> dict:
    """A meta-device model is built block by block from a float or bitsandbytes-format safetensors file,
    sharded as it loads, and computes what the whole single-process model computes. ``nested``: a float file
    with units nested in units (each Block and the Linear4bit inside it), for ``load_sharded`` and
    ``shard_model`` alike; ``tied``: two blocks sharing their 4-bit weight (one group)."""
    import resource

    from safetensors.torch import save_file

    from fsdp4bit.loading import load_sharded, safetensors_reader

    storage = torch.bfloat16

    def build(device: str) -> nn.Module:
        model = block_model(storage, device)
        if kind == "tied":  # the third block's 4-bit weight is the first's (saved once, as save_pretrained does)
            model[2].fc.weight = model[0].fc.weight
        return model

    if dist.get_rank() == 0:
        torch.manual_seed(0)
        source = build("cpu")
        if kind == "bnb":
            source = source.to("cpu")
        entries = {k: sharding.plain(v).contiguous() for k, v in source.state_dict().items()}
        save_file({k: v for k, v in entries.items() if not (kind == "tied" and k == "2.fc.weight")}, path)
    dist.barrier()
    read, keys = safetensors_reader(path)
    block_types = (Block, bnb.nn.Linear4bit) if kind == "nested" else (Block,)
    model = build("meta")
    load_sharded(model, read, keys, block_types=block_types, device=DEVICE)
    ref = build("cpu")
    ref.load_state_dict({k: read(k) for k in keys}, strict=kind != "tied")
    ref = ref.to(DEVICE)
    x = torch.randn(4, 40, device=DEVICE)
    assert torch.equal(model(x), ref(x)), "sharded model built from the checkpoint differs"
    if kind == "nested":
        loaded = block_model(storage, "cpu")
        loaded.load_state_dict({k: read(k) for k in keys})
        sharded = shard_model(loaded.to(DEVICE), block_types=block_types)
        assert torch.equal(sharded(x), ref(x)), "shard_model with nested block types differs"
    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


class Outer(nn.Module):
    """A block around a block (nested block types)."""

    def __init__(self, dim: int, storage: torch.dtype) -> None:
        super().__init__()
        self.inner = Block(dim, storage)
        self.fc = bnb.nn.Linear4bit(dim, dim, quant_type="nf4", quant_storage=storage)

    def forward(self, x):
        return self.fc(self.inner(x))


def tied_models() -> list[tuple[str, nn.Module, tuple | None]]:
    """Models whose 4-bit weights are shared between modules, with the block types to shard them by: two layers of
    two blocks (units of their own by default), a block's layer with one of the root's, and a block inside another
    block with a third block (their group must be sharded before the outer block)."""
    across = block_model(torch.bfloat16, "cpu", depth=2)
    across[1].fc.weight = across[0].fc.weight
    with_root = nn.Sequential(Block(40, torch.bfloat16), bnb.nn.Linear4bit(40, 40, quant_storage=torch.bfloat16))
    with_root[1].weight = with_root[0].fc.weight
    nested = nn.Sequential(Outer(40, torch.bfloat16), Block(40, torch.bfloat16))
    nested[1].fc.weight = nested[0].inner.fc.weight
    return [
        ("across blocks", across.to(DEVICE), None),
        ("block and root", copy.deepcopy(with_root).to(DEVICE), (Block,)),
        ("block and root, default units", with_root.to(DEVICE), None),
        ("nested blocks", nested.to(DEVICE), (Outer, Block)),
    ]


def scenario_robustness() -> dict:
    """What fails fails on every rank, and what may load loads: a sharded load_state_dict from another quant_storage
    (the same bytes at other word boundaries) is bit-exact; a checkpoint save whose rank-0-only steps fail raises on
    every rank instead of leaving the others in a collective; a 4-bit weight shared by two modules shards (in one
    group); torch's own fully_shard of a weight not quantized yet raises the library's message at the first
    forward."""
    from torch.distributed.fsdp import fully_shard

    from fsdp4bit import checkpoint

    def model(storage: torch.dtype, seed: int, dtype: torch.dtype = torch.float32) -> nn.Module:
        return nn.Sequential(
            make_layer(7, 13, storage, "nf4", True, 64, seed, dtype),
            make_layer(5, 7, storage, "fp4", False, 32, seed + 1, dtype),
        )

    x = torch.randn(3, 13, device=DEVICE)
    pairs = [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)]
    for source_storage, target_storage in pairs:
        source = shard_model(model(source_storage, 1, torch.bfloat16))
        target = shard_model(model(target_storage, 5))
        target(x)  # FSDP2 refills the unsharded weight of this first gather at later ones
        target.load_state_dict(source.state_dict())
        seen = []
        hook = target[0].register_forward_pre_hook(lambda m, args, seen=seen: seen.append(m.weight.quant_state.dtype))
        assert torch.equal(target(x), source(x)), f"{source_storage} -> {target_storage}: outputs differ"
        hook.remove()
        assert seen == [torch.bfloat16], f"the gathered weight's state kept dtype {seen} after the load"
        saved, loaded = checkpoint.full_state_dict(source), checkpoint.full_state_dict(target)
        for key, values in (("0.weight", 7 * 13), ("1.weight", 5 * 7)):
            full = saved[key], loaded[key]
            assert torch.equal(*(w.reshape(-1).view(torch.uint8)[: (values + 1) // 2] for w in full)), key
        for key in ("0.weight.quant_state.bitsandbytes__nf4", "1.weight.quant_state.bitsandbytes__fp4"):
            assert torch.equal(saved[key], loaded[key]), f"{key}: the loaded JSON (weight dtype...) differs"

    blocker = f"/tmp/fsdp4bit_robustness_{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}"
    if dist.get_rank() == 0:
        with open(blocker, "w") as f:
            f.write("a file, not a folder")
    dist.barrier()
    try:
        checkpoint.save(shard_model(model(torch.float32, 9)), f"{blocker}/sub/ckpt")
    except (OSError, RuntimeError) as err:
        raised = type(err).__name__
    else:
        raise AssertionError("a save under a file did not raise")
    dist.barrier()
    if dist.get_rank() == 0:
        os.remove(blocker)

    for name, tied, block_types in tied_models():
        x = torch.randn(3, 40, device=DEVICE)
        expected = tied(x)
        sharded = shard_model(tied, block_types=block_types)
        assert torch.equal(sharded(x), expected), f"{name}: a tied 4-bit weight's outputs differ after sharding"

    if DEVICE.type == "cpu":  # (on an accelerator fully_shard moves the weight there, which quantizes it)
        layer = bnb.nn.Linear4bit(13, 7, quant_type="nf4", quant_storage=torch.bfloat16)
        fully_shard(layer)
        try:
            layer(x)
        except RuntimeError as err:
            assert "fully_shard needs quantized Params4bit weights" in str(err), err
        else:
            raise AssertionError("a forward of an unquantized sharded weight did not raise")
    return {"save_raised": raised}


def main(scenarios: dict | None = None) -> int:
    """Run the scenario named on the command line (a ``scenario_<name>`` function of ``scenarios``, by default this
    module's) with the arguments after it; rank 0 prints its report as one ``REPORT`` json line."""
    if DEVICE.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if DEVICE.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=90))
    scenario, *args = sys.argv[1:]
    report = (scenarios or globals())[f"scenario_{scenario}"](*args)
    if dist.get_rank() == 0:
        print("REPORT " + json.dumps({"scenario": scenario, "world": dist.get_world_size(), **report}))
    teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
