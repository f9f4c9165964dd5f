"""Tracing the 4-bit operators: torch.func transforms under torch.compile, torch.export of a module holding a
Linear4bit, and views of a 4-bit weight under fake tensors (a view compared storages by data_ptr(), which a
FakeTensor refuses: "Cannot access data pointer of Tensor")."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.utils
from helpers import get_available_devices, skip_if_no_device

import fsdp4bit as bnb
import fsdp4bit.functional as F


@pytest.fixture(params=get_available_devices())
def device(request):
    skip_if_no_device(request.param)
    torch.compiler.reset()
    torch._dynamo.utils.counters.clear()
    yield request.param
    torch.compiler.reset()


def _weight(device: str, shape=(24, 64), quant_type="nf4", **kwargs):
    gen = torch.Generator().manual_seed(53)
    packed, state = F.quantize_4bit(torch.randn(*shape, generator=gen).to(device), quant_type=quant_type, **kwargs)
    return packed, state, F.dequantize_4bit(packed, state).double()


def test_compiled_torch_func_transforms_through_a_4bit_matmul(device):
    """torch.compile(torch.func.grad(f)) (and vmap(grad), jacrev, hessian) through matmul_4bit and F.gemv_4bit give
    the float64 derivatives without a graph break: while dynamo traced the transform, the operator met
    GradTrackingTensors and failed ("cannot use C++ torch::autograd::Function with functorch transforms", for gemv
    "must override the setup_context staticmethod"); the decomposition was skipped whenever compiling."""
    packed, state, W = _weight(device)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, 64, generator=gen).to(device)
    bias = torch.randn(24, generator=gen).to(device)
    tol = {"rtol": 1e-4, "atol": 1e-4}
    want = 2 * (x.double() @ W.T + bias.double()) @ W
    for product in (
        lambda a: bnb.matmul_4bit(a, packed.t(), state, bias=bias),
        lambda a: F.gemv_4bit(a, packed.t(), state=state) + bias,
    ):

        def loss(a, product=product):
            return product(a).pow(2).sum()

        torch.compiler.reset()
        got = torch.compile(torch.func.grad(loss), fullgraph=True)(x)
        torch.testing.assert_close(got.double(), want, **tol)
        per_row = torch.compile(torch.func.vmap(torch.func.grad(lambda a: loss(a.unsqueeze(0)))), fullgraph=True)(x)
        torch.testing.assert_close(per_row.double(), want, **tol)
        jac = torch.compile(torch.func.jacrev(product), fullgraph=True)(x[0])
        torch.testing.assert_close(jac.double(), W, **tol)
        hess = torch.compile(torch.func.hessian(loss), fullgraph=True)(x[0])
        torch.testing.assert_close(hess.double(), 2 * W.T @ W, rtol=1e-4, atol=1e-3)
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}


def test_compiled_per_sample_gradients_through_linear4bit(device):
    """Per-sample gradients (vmap(grad) over functional_call, compiled with fullgraph=True) of an adapter whose output
    feeds a Linear4bit, so the gradient flows through the 4-bit matmul's input: each equals that sample's own eager
    backward. Dynamo's trace of the transform failed at the 4-bit operator before."""
    torch.manual_seed(41)
    model = torch.nn.ModuleDict(
        {
            "down": torch.nn.Linear(64, 4, bias=False, device=device),
            "up": torch.nn.Linear(4, 64, bias=False, device=device),
            "base": bnb.nn.Linear4bit(64, 32, bias=True, compute_dtype=torch.float32, quant_type="nf4").to(device),
        }
    )
    torch.nn.init.normal_(model["up"].weight)

    def loss(params, x):
        h = x + torch.func.functional_call(model["up"], {"weight": params["up"]}, (x @ params["down"].T,))
        return model["base"](h).pow(2).mean()

    adapter = {"down": model["down"].weight.detach(), "up": model["up"].weight.detach()}
    x = torch.randn(4, 3, 64, device=device)
    per_sample = torch.compile(torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0)), fullgraph=True)(adapter, x)
    for i in range(x.shape[0]):
        params = {k: v.clone().requires_grad_(True) for k, v in adapter.items()}
        loss(params, x[i]).backward()
        for name, p in params.items():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-4, atol=1e-5)
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}


def test_export_of_a_module_holding_linear4bit(device):
    """torch.export.export (non-strict and strict, a dynamic batch) of a module holding a Linear4bit computes what the
    float64 product of the dequantized weight does, and its graph keeps the fsdp4bit::matmul_4bit operator."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        bnb.nn.Linear4bit(64, 48, bias=True, quant_type="nf4", compute_dtype=torch.bfloat16), torch.nn.ReLU()
    ).to(device)
    W = F.dequantize_4bit(model[0].weight, model[0].weight.quant_state).double()
    x = torch.randn(4, 64, device=device)
    batch = torch.export.Dim("batch")
    for strict in (False, True):
        ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},), strict=strict)
        assert torch.ops.fsdp4bit.matmul_4bit.default in [n.target for n in ep.graph.nodes]
        for rows in (4, 7):
            xr = torch.randn(rows, 64, device=device)
            want = torch.relu(torch.nn.functional.linear(xr.double(), W, model[0].bias.double()))
            torch.testing.assert_close(ep.module()(xr).double(), want, rtol=2e-2, atol=2e-2)


def test_views_of_a_4bit_weight_inside_a_compiled_function(device):
    """``weight.detach()``, ``weight.data`` and a slice of the words, inside a compiled function, give what they give
    eagerly."""
    layer = bnb.nn.Linear4bit(64, 48, bias=False, quant_type="nf4").to(device)
    weight, state = layer.weight, layer.weight.quant_state
    x = torch.randn(3, 64, device=device)
    for fn in (
        lambda a: bnb.matmul_4bit(a, weight.detach().t(), state),
        lambda a: F.dequantize_4bit(weight.data, state),
        lambda a: F.packed_bytes(weight.view(-1)[:8]).to(a.dtype),
    ):
        torch.compiler.reset()
        assert torch.equal(torch.compile(fn, fullgraph=True)(x), fn(x))
