"""Multi-process FSDP2 checks of feature combinations a QLoRA run puts together (mixed precision x storage x
quant type x double quant, activation checkpointing, reshard_after_forward, gradient accumulation without sync,
torch.compile, CPU offload, a 4-bit layer's bias, checkpoints across world sizes), on uneven shapes: 4-bit layers
of 23x37 and 37x23 (851 values, 14 blocks of 64) whose shards split inside quantization blocks at world sizes 2
and 3. ``torchrun --nproc_per_node=N combinations_worker.py SCENARIO [ARGS]``; several cases per launch.

Every rank runs the same batch, so the sharded model must compute what the unsharded one computes on it: outputs
equal, adapter gradients equal up to the reduction's rounding (a mean of W equal float32 values), 4-bit words and
statistics bit for bit.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy
from worker import LoRALinear, main  # the sharding worker's adapter layout and scenario runner (same folder)

import fsdp4bit as bnb
from fsdp4bit import checkpoint, sharding
from fsdp4bit.sharding import shard_model

DEVICE = torch.device(os.environ.get("FSDP4BIT_TEST_DEVICE", "cpu"))
STORAGES = {"uint8": torch.uint8, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
PARAM_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DIM, HIDDEN = 37, 23


class Block(nn.Module):
    def __init__(self, storage: torch.dtype, quant_type: str, dq: bool) -> None:
        super().__init__()
        self.up = LoRALinear(four_bit(DIM, HIDDEN, storage, quant_type, dq))
        self.down = LoRALinear(four_bit(HIDDEN, DIM, storage, quant_type, dq))

    def forward(self, x):
        return x + self.down(nn.functional.gelu(self.up(x)))


class Checkpointed(nn.Module):
    """A block whose forward is recomputed in the backward (torch.utils.checkpoint)."""

    def __init__(self, block: nn.Module, reentrant: bool) -> None:
        super().__init__()
        self.block, self.reentrant = block, reentrant

    def forward(self, x):
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=self.reentrant)


def four_bit(in_f: int, out_f: int, storage: torch.dtype, quant_type: str, dq: bool) -> nn.Module:
    layer = bnb.nn.Linear4bit(
        in_f, out_f, bias=True, quant_type=quant_type, compress_statistics=dq, quant_storage=storage
    )
    layer.bias.requires_grad_(False)
    return layer


def make_model(storage: torch.dtype, quant_type: str, dq: bool, seed: int = 0, depth: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(*[Block(storage, quant_type, dq) for _ in range(depth)])
    return model.to(DEVICE)  # quantizes every 4-bit weight


def batch(seed: int = 1, rows: int = 5) -> torch.Tensor:
    """The same input on every rank (so the sharded model must compute the unsharded one's values)."""
    return torch.randn(rows, DIM, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def plain_bytes(w) -> torch.Tensor:
    return sharding.plain(w).reshape(-1).view(torch.uint8)


def record_gathered(model: nn.Module) -> tuple[list, list]:
    """Forward pre-hooks on every 4-bit layer that record the weight it computes with: (bytes, absmax bytes)."""
    seen: list = []

    def hook(module, args):
        w = module.weight
        seen.append((plain_bytes(w).clone(), w.quant_state.absmax.reshape(-1).view(torch.uint8).clone()))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    return seen, handles


def adapter_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} got no gradient"
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            out[name.replace("._checkpoint_wrapped_module", "").replace(".block.", ".")] = g.float().cpu()
    return out


def compare(case: str, got: torch.Tensor, expected: torch.Tensor, rtol: float = 0.0, atol: float = 0.0) -> None:
    got, expected = got.float().cpu(), expected.float().cpu()
    assert got.shape == expected.shape, f"{case}: shape {tuple(got.shape)} vs {tuple(expected.shape)}"
    if not torch.allclose(got, expected, rtol=rtol, atol=atol):
        diff = (got - expected).abs().max().item()
        raise AssertionError(f"{case}: differs from the unsharded model by {diff} (rtol {rtol}, atol {atol})")


def float64_reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The unsharded model's function in float64, from dequantized weights (independent of the 4-bit matmul)."""

    def linear(m, h):
        if isinstance(m, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(m.weight, m.weight.quant_state).float()
            return nn.functional.linear(h, w.double(), m.bias.double())
        return nn.functional.linear(h, m.weight.double())

    def lora(m, h):
        return linear(m.base, h) + linear(m.lora_b, linear(m.lora_a, h))

    h = x.double()
    for block in model:
        h = h + lora(block.down, nn.functional.gelu(lora(block.up, h)))
    return h


def run_step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward and backward of a loss on the output; returns the output."""
    out = model(x)
    (out.float() ** 2).mean().backward()
    return out.detach()


def scenario_matrix() -> dict:
    """Mixed precision (None / bf16 / fp16 params, fp32 reduction) x every quant_storage x nf4/fp4 x double quant,
    reshard_after_forward alternating: forward outputs and adapter gradients equal the unsharded model's, and every
    gathered 4-bit weight holds the unsharded one's bytes and statistics."""
    cases = 0
    x = batch()
    for pname, pdtype in PARAM_DTYPES.items():
        for sname, storage in STORAGES.items():
            for quant_type in ("nf4", "fp4"):
                for dq in (True, False):
                    case = f"{pname}-{sname}-{quant_type}-dq{int(dq)}"
                    reshard = cases % 2 == 0
                    model = make_model(storage, quant_type, dq, seed=cases)
                    ref = copy.deepcopy(model)
                    if pdtype is not None:
                        ref = ref.to(pdtype)
                    mp = MixedPrecisionPolicy(param_dtype=pdtype, reduce_dtype=torch.float32)
                    shard_model(model, block_types=(Block,), mp_policy=mp, reshard_after_forward=reshard)
                    seen, handles = record_gathered(model)
                    ref_seen, ref_handles = record_gathered(ref)
                    xin = x if pdtype is None else x.to(pdtype)
                    out = run_step(model, x)
                    ref_out = run_step(ref, xin)
                    for h in handles + ref_handles:
                        h.remove()
                    assert out.dtype == ref_out.dtype, f"{case}: output dtype {out.dtype} vs {ref_out.dtype}"
                    compare(f"{case} output", out, ref_out)
                    assert len(seen) == len(ref_seen) == 4, (case, len(seen), len(ref_seen))
                    for (words, absmax), (ref_words, ref_absmax) in zip(seen, ref_seen, strict=True):
                        assert torch.equal(words, ref_words), f"{case}: gathered words differ"
                        assert torch.equal(absmax, ref_absmax), f"{case}: gathered absmax differs"
                    grads, ref_grads = adapter_grads(model), adapter_grads(ref)
                    assert set(grads) == set(ref_grads), set(grads) ^ set(ref_grads)
                    for k in grads:
                        compare(f"{case} grad {k}", grads[k], ref_grads[k], rtol=1e-6, atol=1e-9)
                    if pdtype is None:
                        compare(f"{case} vs float64", out, float64_reference(ref, x), rtol=1e-5, atol=1e-5)
                    cases += 1
    return {"cases": cases}


def wrap_blocks(model: nn.Module, wrap: str) -> tuple[type, ...]:
    """Activation checkpointing around each block (``wrap``: none, ckpt, reentrant, wrapper, wrapper_reentrant);
    returns the block types to shard (the checkpoint wrapper itself, as torchtitan shards it)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, CheckpointWrapper

    if wrap == "none":
        return (Block,)
    for i, block in enumerate(model):
        if wrap in ("ckpt", "reentrant"):
            model[i] = Checkpointed(block, reentrant=wrap == "reentrant")
        else:
            impl = CheckpointImpl.REENTRANT if wrap == "wrapper_reentrant" else CheckpointImpl.NO_REENTRANT
            model[i] = CheckpointWrapper(block, checkpoint_impl=impl)
    return (Checkpointed,) if wrap in ("ckpt", "reentrant") else (CheckpointWrapper,)


def scenario_features(*selected: str) -> dict:
    """Activation checkpointing (torch.utils.checkpoint with and without reentrant, torch's checkpoint_wrapper) x
    reshard_after_forward x mixed precision, with gradient accumulation over two micro-batches without gradient
    sync, torch.compile'd blocks and CPU offload: outputs and accumulated adapter gradients equal the unsharded
    model's."""
    cases = []
    combos = [
        (wrap, reshard, pname, extra)
        for wrap in ("none", "ckpt", "reentrant", "wrapper", "wrapper_reentrant")
        for reshard in (True, False)
        for pname in ("none", "bf16")
        for extra in ("", "accum")
    ] + [
        ("none", True, "none", "compile"),
        ("ckpt", False, "bf16", "compile"),
        ("none", True, "none", "offload"),
        ("wrapper", True, "bf16", "offload_accum"),
        ("ckpt", True, "bf16", "accum_keep"),
        ("none", False, "fp16", "accum_keep"),
        ("none", True, "none", "eval_first"),
        ("wrapper", False, "bf16", "eval_first"),
        ("none", True, "none", "inference"),
        ("none", False, "bf16", "inference"),
        ("wrapper", True, "fp16", "inference"),
        ("ckpt", False, "none", "bf16_model"),
        ("none", True, "bf16", "accum_inference"),
        ("wrapper", False, "none", "accum_inference"),
        ("none", True, "none", "bf16_model"),
    ]
    for n, (wrap, reshard, pname, extra) in enumerate(combos):
        case = f"{wrap}-reshard{int(reshard)}-{pname}-{extra or 'plain'}"
        if selected and not any(s in case for s in selected):
            continue
        pdtype = PARAM_DTYPES[pname]
        storage = list(STORAGES.values())[n % 4]
        model = make_model(storage, ("nf4", "fp4")[n % 2], n % 3 != 0, seed=n)
        if extra == "bf16_model":  # the whole model in bf16 (adapters, biases, inputs), no mixed precision policy
            model = model.to(torch.bfloat16)
        ref = copy.deepcopy(model)
        if pdtype is not None:
            ref = ref.to(pdtype)
        block_types = wrap_blocks(model, wrap)
        mp = MixedPrecisionPolicy(param_dtype=pdtype, reduce_dtype=torch.float32)
        if "compile" in extra:
            for block in model:
                block.compile(backend="aot_eager")
        shard_model(
            model, block_types=block_types, mp_policy=mp, reshard_after_forward=reshard, cpu_offload="offload" in extra
        )
        micro = [batch(seed=1), batch(seed=2)] if "accum" in extra else [batch(seed=1)]
        if extra in ("eval_first", "inference"):  # evaluation before training / inference alone
            x = batch(seed=3)
            with torch.no_grad() if extra == "eval_first" else torch.inference_mode():
                for _ in range(2):
                    compare(f"{case} evaluation", model(x), ref(x if pdtype is None else x.to(pdtype)))
            if extra == "inference":  # (FSDP2 cannot train after gathering under inference_mode, plain weights alike)
                cases.append(case)
                continue
        for i, x in enumerate(micro):
            if "accum" in extra:
                model.set_requires_gradient_sync(i == len(micro) - 1)
            if extra == "accum_keep":  # keep the gathered weights between micro-batches (no re-gather)
                model.set_reshard_after_backward(i == len(micro) - 1)
            if extra == "bf16_model":
                x = x.to(torch.bfloat16)
            x = x.requires_grad_(wrap.endswith("reentrant"))  # reentrant checkpointing needs an input with grad
            if extra == "accum_inference" and i == 1:  # an evaluation under inference_mode between micro-batches
                with torch.inference_mode():
                    compare(f"{case} evaluation", model(x), ref(x if pdtype is None else x.to(pdtype)))
            out = run_step(model, x)
            xin = x.detach() if pdtype is None else x.detach().to(pdtype)
            ref_out = run_step(ref, xin)
            compare(f"{case} output {i}", out, ref_out)
        grads, ref_grads = adapter_grads(model), adapter_grads(ref)
        assert set(grads) == set(ref_grads), (case, set(grads) ^ set(ref_grads))
        tol = 1e-6 if pdtype is None and extra != "bf16_model" else 1e-2
        for k in grads:
            compare(f"{case} grad {k}", grads[k], ref_grads[k], rtol=tol, atol=tol * 1e-3)
        cases.append(case)
    return {"cases": cases}


def checkpoint_cases() -> list[tuple[str, torch.dtype, str, bool, str, bool]]:
    """(name, storage, quant type, double quant, param dtype, reshard_after_forward) of the checkpoint scenarios."""
    cases = []
    for n, (sname, storage) in enumerate(STORAGES.items()):
        for quant_type in ("nf4", "fp4"):
            dq = (n + (quant_type == "fp4")) % 2 == 0
            pname = ("none", "bf16", "fp16")[(2 * n + (quant_type == "fp4")) % 3]
            reshard = quant_type == "nf4"
            cases.append(
                (f"{sname}-{quant_type}-dq{int(dq)}-{pname}-r{int(reshard)}", storage, quant_type, dq, pname, reshard)
            )
    return cases


def build_sharded(storage, quant_type, dq, pname, reshard, seed, shard=True) -> nn.Module:
    """A model of the checkpoint cases (float16 storage: with CPU offload), sharded unless ``shard`` is False."""
    model = make_model(storage, quant_type, dq, seed=seed)
    for m in model.modules():  # a trainable bias on the first 4-bit layer of each block
        if isinstance(m, Block):
            m.up.base.bias.requires_grad_(True)
    if shard:
        mp = MixedPrecisionPolicy(param_dtype=PARAM_DTYPES[pname], reduce_dtype=torch.float32)
        offload = storage == torch.float16
        shard_model(model, block_types=(Block,), mp_policy=mp, reshard_after_forward=reshard, cpu_offload=offload)
    return model


def scenario_save(path: str) -> dict:
    """Per case: a sharded model trained two AdamW steps (adapters and a bias move), then saved with
    fsdp4bit.checkpoint and as a full state dict; rank 0 keeps the full state and an output to compare loads with."""
    for name, storage, quant_type, dq, pname, reshard in checkpoint_cases():
        model = build_sharded(storage, quant_type, dq, pname, reshard, seed=3)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for step in range(2):
            run_step(model, batch(seed=10 + step))
            opt.step()
            opt.zero_grad()
        model(batch(seed=12))  # with reshard_after_forward=False the weights stay unsharded: save reshards them
        checkpoint.save(model, os.path.join(path, name))
        full = checkpoint.full_state_dict(model)
        out = model(batch(seed=5)).detach().cpu()
        if dist.get_rank() == 0:
            torch.save({"full": full, "out": out}, os.path.join(path, f"{name}.pt"))
    dist.barrier()
    return {"saved": len(checkpoint_cases())}


def scenario_load(path: str, ways: str = "dcp,dsd_full,unsharded") -> dict:
    """Per case, on this world size, into a sharded model of other weights that has gathered them once (a forward;
    with reshard_after_forward=False its weights are still unsharded then): fsdp4bit.checkpoint.load, torch's
    set_model_state_dict of the full state dict, and (``sharded_sd`` in ``ways``) load_state_dict of another sharded
    model's state dict; at world size 1 also into an unsharded model (``unsharded``). Every way gives the saved
    bytes, statistics and outputs exactly."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    world = dist.get_world_size()
    for name, storage, quant_type, dq, pname, reshard in checkpoint_cases():
        saved = torch.load(os.path.join(path, f"{name}.pt"), weights_only=False)
        x, pdtype = batch(seed=5), PARAM_DTYPES[pname]
        source = None
        selected = ways.split(",")
        if "unsharded" in selected:
            selected.remove("unsharded")
            selected += ["dcp_unsharded", "full_unsharded"] if world == 1 else []
        if "sharded_sd" in selected and "dcp" not in selected:
            selected.insert(0, "dcp")  # the source of the sharded state dict
        for way in selected:
            shard = not way.endswith("unsharded")
            model = build_sharded(storage, quant_type, dq, pname, not reshard, seed=77, shard=shard)
            if not shard and pdtype is not None:
                model = model.to(pdtype)
            if way == "dsd_full":
                run_step(model, x)  # torch's own FSDP2 needs resharded weights here (the backward reshards them)
            else:
                model(x if shard or pdtype is None else x.to(pdtype))  # the load must renew what the gather keeps
            if way.startswith("dcp"):
                checkpoint.load(model, os.path.join(path, name))
            elif way == "dsd_full":
                set_model_state_dict(model, dict(saved["full"]), options=StateDictOptions(full_state_dict=True))
            elif way == "sharded_sd":
                model.load_state_dict(source.state_dict())
            else:
                model.load_state_dict(saved["full"])
            if way == "dcp":
                source = model
            full = checkpoint.full_state_dict(model)
            assert set(full) == set(saved["full"]), (name, way, set(full) ^ set(saved["full"]))
            for k, v in saved["full"].items():
                if not shard and pdtype is not None and ("lora" in k or k.endswith(".bias")):
                    v = v.to(pdtype)  # the unsharded model computes in param_dtype
                assert torch.equal(plain_bytes(full[k]), plain_bytes(v)), f"{name} {way}: {k} differs after load"
            out = model(x if shard or pdtype is None else x.to(pdtype)).detach().cpu()
            compare(f"{name} {way} output", out, saved["out"])
    return {"loaded": len(checkpoint_cases())}


def scenario_tiny(path: str) -> dict:
    """4-bit layers so small that some ranks hold no packed words or no statistics (1x1 in float32 storage is one
    word), in every storage, under mixed precision: forward, adapter gradients, and a checkpoint save + load at this
    world size give the unsharded model's values and bytes."""
    cases = 0
    for sname, storage in STORAGES.items():
        for out_f, in_f in ((1, 1), (2, 3), (3, 1), (1, 130)):
            pdtype = (None, torch.bfloat16)[cases % 2]
            torch.manual_seed(cases)
            model = nn.Sequential(
                LoRALinear(four_bit(in_f, out_f, storage, ("nf4", "fp4")[cases % 2], cases % 3 == 0), rank=1),
                LoRALinear(four_bit(out_f, 5, storage, "nf4", True), rank=1),
            ).to(DEVICE)
            ref = copy.deepcopy(model)
            ref_full = checkpoint.full_state_dict(ref)
            if pdtype is not None:
                ref = ref.to(pdtype)
            mp = MixedPrecisionPolicy(param_dtype=pdtype, reduce_dtype=torch.float32)
            shard_model(model, block_types=(LoRALinear,), mp_policy=mp, reshard_after_forward=cases % 3 != 1)
            x = torch.randn(4, in_f, generator=torch.Generator().manual_seed(cases)).to(DEVICE)
            case = f"{sname}-{out_f}x{in_f}"
            compare(f"{case} output", run_step(model, x), run_step(ref, x if pdtype is None else x.to(pdtype)))
            grads, ref_grads = adapter_grads(model), adapter_grads(ref)
            for k in grads:
                compare(f"{case} grad {k}", grads[k], ref_grads[k], rtol=1e-6, atol=1e-9)
            target = os.path.join(path, f"tiny-{case}")
            checkpoint.save(model, target)
            loaded = shard_model(scrambled_copy(model), block_types=(LoRALinear,))
            checkpoint.load(loaded, target)
            full = checkpoint.full_state_dict(loaded)
            for k, v in ref_full.items():
                if "lora" not in k:
                    assert torch.equal(plain_bytes(full[k]), plain_bytes(v)), f"{case}: {k} differs after load"
            cases += 1
    return {"cases": cases}


def scenario_mixed() -> dict:
    """One FSDP group holding 4-bit layers of different storages, quant types, double quant and blocksizes, one
    without a bias, next to float layers (one all-gather of mixed dtypes): outputs, gradients and gathered bytes equal
    the unsharded model's, under each mixed precision."""
    cases = 0
    for pname, pdtype in PARAM_DTYPES.items():
        torch.manual_seed(cases)
        layers = [
            four_bit(DIM, HIDDEN, torch.uint8, "nf4", True),
            four_bit(HIDDEN, 19, torch.float32, "fp4", False),
            nn.Linear(19, 19),
            four_bit(19, DIM, torch.bfloat16, "nf4", False),
            four_bit(DIM, 11, torch.float16, "fp4", True),
        ]
        layers[3] = bnb.nn.Linear4bit(19, DIM, bias=False, quant_type="nf4", quant_storage=torch.bfloat16)
        layers[3].weight = bnb.nn.Params4bit(
            layers[3].weight.data, requires_grad=False, quant_type="nf4", quant_storage=torch.bfloat16, blocksize=32
        )
        model = nn.Sequential(
            nn.Sequential(*[LoRALinear(m) if isinstance(m, bnb.nn.Linear4bit) else m for m in layers])
        )
        model = model.to(DEVICE)
        ref = copy.deepcopy(model)
        if pdtype is not None:
            ref = ref.to(pdtype)
        mp = MixedPrecisionPolicy(param_dtype=pdtype, reduce_dtype=torch.float32)
        shard_model(model, block_types=(nn.Sequential,), mp_policy=mp, reshard_after_forward=cases != 1)
        seen, handles = record_gathered(model)
        ref_seen, ref_handles = record_gathered(ref)
        x = batch(seed=cases)
        case = f"mixed-{pname}"
        compare(f"{case} output", run_step(model, x), run_step(ref, x if pdtype is None else x.to(pdtype)))
        for h in handles + ref_handles:
            h.remove()
        for (words, absmax), (ref_words, ref_absmax) in zip(seen, ref_seen, strict=True):
            assert torch.equal(words, ref_words) and torch.equal(absmax, ref_absmax), f"{case}: gathered bytes differ"
        grads, ref_grads = adapter_grads(model), adapter_grads(ref)
        assert set(grads) == set(ref_grads), set(grads) ^ set(ref_grads)
        for k in grads:
            compare(f"{case} grad {k}", grads[k], ref_grads[k], rtol=1e-6, atol=1e-9)
        cases += 1
    return {"cases": cases}


def scrambled_copy(like: nn.Module) -> nn.Module:
    """A model of ``like``'s layout (LoRALinear layers of rank 1) with other, random packed words."""
    torch.manual_seed(1234)
    layers = [m for m in like.modules() if isinstance(m, LoRALinear)]
    model = nn.Sequential(
        *[
            LoRALinear(
                four_bit(
                    m.base.in_features,
                    m.base.out_features,
                    m.base.weight.dtype,
                    m.base.quant_type,
                    m.base.compress_statistics,
                ),
                rank=1,
            )
            for m in layers
        ]
    ).to(DEVICE)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            words = plain_bytes(m.weight)
            words.copy_(torch.randint(0, 256, words.shape, dtype=torch.uint8))
    return model


def scenario_three(path: str) -> dict:
    """``matrix``, ``tiny``, ``mixed`` and the inference and bf16-model cases of ``features`` in one launch (at 3
    ranks the statistics of these shapes are gathered into a copy, refilled in place at every later gather)."""
    return {
        "matrix": scenario_matrix()["cases"],
        "tiny": scenario_tiny(path)["cases"],
        "features": scenario_features("inference", "bf16_model")["cases"],
        "mixed": scenario_mixed()["cases"],
    }


if __name__ == "__main__":
    sys.exit(main(globals()))
