"""Per-block ``torch.compile`` (``module.compile()``, as the trainer's ``model.compile`` does) of modules holding 4-bit
weights: one traced frame for every block, no graph break, no recompilation per weight."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.utils
from helpers import get_available_devices, skip_if_no_device
from torch import nn

import fsdp4bit as bnb


class Block(nn.Module):
    """Two 4-bit projections with a residual, the shape of a decoder block's MLP."""

    def __init__(self, storage: torch.dtype) -> None:
        super().__init__()
        kwargs = dict(bias=False, quant_type="nf4", quant_storage=storage, compute_dtype=torch.bfloat16)
        self.up = bnb.nn.Linear4bit(64, 128, **kwargs)
        self.down = bnb.nn.Linear4bit(128, 64, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


@pytest.mark.parametrize("device", get_available_devices())
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_compiled_blocks_trace_once_without_graph_breaks(device, storage):
    """Calling a compiled block reads each weight's statistics (the subclass's inner tensors) outside the graph;
    those reads used to be traced as frames of their own, with a graph break at ``storage_offset()`` and a
    recompilation for every weight (which ran past dynamo's cache limit in deep models)."""
    skip_if_no_device(device)
    torch.manual_seed(0)
    blocks = nn.ModuleList([Block(storage).to(device) for _ in range(3)])
    x = torch.randn(4, 64, dtype=torch.bfloat16, device=device, requires_grad=True)
    y_eager = x
    for block in blocks:
        y_eager = block(y_eager)
    (grad_eager,) = torch.autograd.grad(y_eager.float().pow(2).sum(), x)

    torch.compiler.reset()
    torch._dynamo.utils.counters.clear()
    for block in blocks:
        block.compile()
    for _ in range(2):
        y = x
        for block in blocks:
            y = block(y)
        (grad,) = torch.autograd.grad(y.float().pow(2).sum(), x)
    counters = torch._dynamo.utils.counters
    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])
    assert counters["frames"]["total"] == 1, dict(counters["frames"])
    torch.testing.assert_close(y, y_eager, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(grad, grad_eager, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("device", get_available_devices())
def test_compiled_blocks_follow_a_changed_quant_state(device):
    """The statistics a compiled call passes to its graph are the weight's current ones: after the state's absmax is
    replaced (a new tensor on the QuantState), and after a new QuantState is set on the weight, the compiled block
    computes what the eager block computes (dynamo recompiles for each change: its guards see the state change)."""
    skip_if_no_device(device)
    torch.manual_seed(0)
    block = Block(torch.bfloat16).to(device)
    x = torch.randn(4, 64, dtype=torch.bfloat16, device=device)
    torch.compiler.reset()
    torch._dynamo.utils.counters.clear()
    block.compile()  # block(x) runs compiled, block.forward(x) eagerly
    with torch.no_grad():
        block(x)
        state = block.up.weight.quant_state
        state.absmax = state.absmax * 2  # a nested absmax (uint8 codes): other codes, same shape
        assert torch.equal(block(x), block.forward(x))
        other = bnb.nn.Linear4bit(64, 128, bias=False, quant_type="nf4", quant_storage=torch.bfloat16).to(device)
        block.up.weight.quant_state = other.weight.quant_state
        assert torch.equal(block(x), block.forward(x))
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
