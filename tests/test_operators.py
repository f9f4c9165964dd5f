"""The ``fsdp4bit::`` operators' C++ kernels (``csrc/common/operators.h``), on the CPU and on CUDA.

Once a device type's extension is loaded, ``matmul_4bit`` (with its autograd), ``input_grad_4bit`` and
``dequantize_4bit`` run kernels the extension registers with the dispatcher for that device type: a compiled graph
or a direct ``torch.ops`` call reaches the kernels with no Python on the way. Arguments the fast path does not take go
to the operators' Python bodies, so the errors are those of the Python path, and ``FSDP4BIT_NO_NATIVE=1`` still
selects the reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import fsdp4bit as bnb
from fsdp4bit import functional as F
from fsdp4bit import kernels, ops

fops = torch.ops.fsdp4bit
_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=_DEVICES)
def device(request, monkeypatch) -> str:
    """A device type whose native kernels are built (else a skip)."""
    monkeypatch.delenv("FSDP4BIT_NO_NATIVE", raising=False)
    if kernels.native_for(request.param) is None:
        pytest.skip(f"native {request.param} kernels unavailable")
    return request.param


def _weight(device: str, nested: bool = True, shape: tuple[int, int] = (48, 256)):
    """(packed, the operators' statistics arguments from absmax to shape) of a random NF4 weight."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    packed, state = F.quantize_4bit(w.to(device), quant_type="nf4", compress_statistics=nested)
    absmax, nested_absmax, nested_code, offset = state.absmax_tensors()
    nested_bs = state.state2.blocksize if nested else 256
    return packed.reshape(-1), (absmax, nested_absmax, nested_code, offset, 64, nested_bs, "nf4", list(shape))


def _spy(monkeypatch, module, names: tuple[str, ...], calls: list[str]) -> list[str]:
    """Replace each ``module.<name>`` by a wrapper that appends its name to ``calls``; returns ``calls``."""
    for name in names:
        real = getattr(module, name)

        def spy(*args, _real=real, _name=name):
            calls.append(_name)
            return _real(*args)

        monkeypatch.setattr(module, name, spy)
    return calls


@pytest.fixture
def python_calls(monkeypatch):
    """Counts calls of the operators' Python bodies (each checks its arguments first)."""
    return _spy(monkeypatch, ops, ("check_stats_counts", "_check_grad_out"), [])


def test_kernels_are_registered_with_the_dispatcher(device):
    key, source = device.upper(), f"{device}/operators.cpp"
    for op in ("matmul_4bit", "input_grad_4bit", "dequantize_4bit"):
        table = torch._C._dispatch_dump(f"fsdp4bit::{op}")
        lines = [line for line in table.splitlines() if line.startswith(f"{key}:")]
        assert lines and source in lines[0], table
    table = torch._C._dispatch_dump("fsdp4bit::matmul_4bit")
    assert any(line.startswith(f"Autograd{key}:") and source in line for line in table.splitlines()), table


@pytest.mark.parametrize("nested", [True, False])
def test_operators_run_no_python_and_match_the_eager_path(device, python_calls, nested):
    """Forward (no grad, and recording autograd), backward and dequantize through torch.ops: no Python body runs,
    and the bits are those of the eager path (the same kernels)."""
    packed, stats = _weight(device, nested)
    x = torch.randn(20, 256, generator=torch.Generator().manual_seed(1)).to(device, torch.bfloat16)
    bias = torch.randn(48, generator=torch.Generator().manual_seed(2)).to(device)
    grad = torch.randn(20, 48, generator=torch.Generator().manual_seed(3)).to(device, torch.bfloat16)
    results = []
    for fn in (ops._Matmul4bitFunction.apply, fops.matmul_4bit):
        xa, ba = x.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        out = fn(xa, ba, packed, *stats)
        out.backward(grad)
        with torch.no_grad():
            plain = fn(x, bias, packed, *stats)
        results.append((out.detach(), plain, xa.grad, ba.grad))
    start = len(python_calls)
    W = fops.dequantize_4bit(packed, *stats, torch.bfloat16)
    assert python_calls[:start] == [] and python_calls[start:] == []
    for eager, op in zip(*results, strict=True):
        assert eager.dtype == op.dtype and torch.equal(eager.view(torch.uint8), op.view(torch.uint8))
    assert torch.equal(W, ops.dequantize_4bit(packed, *stats, torch.bfloat16))
    assert results[1][3].dtype == torch.float32


def test_compiled_steps_run_no_python_operator_bodies(device, python_calls):
    """A compiled Linear4bit's forward and backward call the operators, which run their C++ kernels: after the first
    (traced) step, no Python body runs."""
    layer = bnb.nn.Linear4bit(256, 48, quant_type="nf4", compute_dtype=torch.bfloat16).to(device)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(20, 256, device=device, dtype=torch.bfloat16, requires_grad=True)
    grads = [torch.autograd.grad(compiled(x).float().sum(), x)[0] for _ in range(2)]
    start = len(python_calls)
    grads.append(torch.autograd.grad(compiled(x).float().sum(), x)[0])
    assert python_calls[start:] == []
    (eager,) = torch.autograd.grad(layer(x).float().sum(), x)
    for grad in grads:
        torch.testing.assert_close(grad, eager, rtol=1e-2, atol=1e-2)


def test_eager_calls_take_the_operators(device, python_calls, monkeypatch):
    """On a native device an eager Linear4bit forward (without and with autograd), its backward and a functional
    dequantize call the operators, whose C++ kernels check and route them: neither NativeOps' Python checks nor the
    operators' Python bodies run."""
    from fsdp4bit.kernels import _native

    _spy(monkeypatch, _native, ("check_matmul_args", "_check_state"), python_calls)
    layer = bnb.nn.Linear4bit(256, 48, quant_type="nf4", compute_dtype=torch.bfloat16).to(device)
    x = torch.randn(20, 256, device=device, dtype=torch.bfloat16, requires_grad=True)
    with torch.no_grad():
        plain = layer(x)
    out = layer(x)
    assert "CppNode" in out.grad_fn.name() and "Matmul4bitFunction" in out.grad_fn.name()
    out.float().sum().backward()
    W = F.dequantize_4bit(layer.weight, layer.weight.quant_state)
    assert python_calls == []
    assert torch.equal(plain, out.detach()) and x.grad is not None and W.shape == (48, 256)


def test_no_native_sends_the_operators_to_the_reference(device, python_calls, monkeypatch):
    packed, stats = _weight(device)
    x = torch.randn(20, 256, device=device, requires_grad=True)
    fast = fops.matmul_4bit(x, None, packed, *stats)
    assert python_calls == []
    monkeypatch.setenv("FSDP4BIT_NO_NATIVE", "1")
    ref = fops.matmul_4bit(x, None, packed, *stats)
    (grad,) = torch.autograd.grad(ref.sum(), x)
    assert "check_stats_counts" in python_calls and "_check_grad_out" in python_calls
    torch.testing.assert_close(ref, fast, rtol=1e-5, atol=1e-4)
    W = ops.dequantize_4bit(packed, *stats, torch.float32)
    torch.testing.assert_close(grad, W.sum(0).expand_as(x), rtol=1e-5, atol=1e-4)


def _bad_calls(device: str):
    """(name, call) of operator calls with one bad argument each, on ``device``."""
    packed, (absmax, nested_absmax, nested_code, offset, bs, nbs, qt, shape) = _weight(device)
    plain_packed, plain_stats = _weight(device, nested=False)
    stats = (absmax, nested_absmax, nested_code, offset, bs, nbs, qt, shape)
    x = torch.randn(3, 256, device=device)
    g = torch.randn(3, 48, device=device)
    return [
        ("bias shape", lambda: fops.matmul_4bit(x, torch.randn(31, device=device), packed, *stats)),
        ("A dtype", lambda: fops.matmul_4bit(x.double(), None, packed, *stats)),
        ("A features", lambda: fops.matmul_4bit(x[:, :255], None, packed, *stats)),
        ("blocksize counts", lambda: fops.matmul_4bit(x, None, packed, *stats[:4], 128, nbs, qt, shape)),
        ("blocksize", lambda: fops.matmul_4bit(x, None, packed, *stats[:4], 48, nbs, qt, shape)),
        ("nested blocksize", lambda: fops.matmul_4bit(x, None, packed, *stats[:5], 32, qt, shape)),
        ("quant_type", lambda: fops.matmul_4bit(x, None, packed, *stats[:6], "nf5", shape)),
        ("packed dtype", lambda: fops.matmul_4bit(x, None, packed.view(torch.int8), *stats)),
        ("short packed", lambda: fops.matmul_4bit(x, None, packed[:-1], *stats)),
        ("shape", lambda: fops.matmul_4bit(x, None, packed, *stats[:7], [48, 256, 1])),
        ("nested without offset", lambda: fops.matmul_4bit(x, None, packed, *stats[:3], None, *stats[4:])),
        ("absmax dtype", lambda: fops.matmul_4bit(x, None, plain_packed, plain_stats[0].half(), *plain_stats[1:])),
        ("dequantize dtype", lambda: fops.dequantize_4bit(packed, *stats, torch.int32)),
        ("dequantize shape", lambda: fops.dequantize_4bit(packed, *stats[:7], [48, -256], torch.float32)),
        ("grad_out features", lambda: fops.input_grad_4bit(g[:, :47], packed, *stats)),
        ("input_grad counts", lambda: fops.input_grad_4bit(g, packed, *stats[:4], 128, nbs, qt, shape)),
        ("grad_out dtype", lambda: fops.input_grad_4bit(g.double(), packed, *stats)),
        ("bias device", lambda: fops.matmul_4bit(x, torch.randn(48, device="meta"), packed, *stats)),
        ("A device", lambda: fops.matmul_4bit(x.to("meta"), None, packed, *stats)),
        ("absmax device", lambda: fops.matmul_4bit(x, None, packed, absmax.to("meta"), *stats[1:])),
        ("0-dim A", lambda: fops.matmul_4bit(x[0, 0], None, packed, *stats)),
    ]


def _error(call) -> str:
    with pytest.raises(Exception) as info:
        call()
    return f"{type(info.value).__name__}: {info.value}"


def test_bad_arguments_raise_the_errors_of_the_python_bodies(device, monkeypatch):
    """The C++ kernels hand every argument they do not take to the Python bodies: the errors are those of the
    Python path (FSDP4BIT_NO_NATIVE=1: the kernels defer every call to the bodies, which run the reference)."""
    native = [_error(call) for _, call in _bad_calls(device)]
    monkeypatch.setenv("FSDP4BIT_NO_NATIVE", "1")
    python = [_error(call) for _, call in _bad_calls(device)]
    for (name, _), on_native, on_python in zip(_bad_calls(device), native, python, strict=True):
        assert on_native == on_python, name


@pytest.mark.parametrize("rows", [0, 1, 8, 9, 16, 17])
def test_every_route_through_the_autograd_kernel(device, rows):
    """No rows (an empty product), the gemv rows (1 to 8 on CUDA, 1 to 16 on the CPU) and dequantize + a GEMM (more
    rows, at this size) go through the C++ autograd kernel with the Python Function's results."""
    shape = (48, 256)
    packed, stats = _weight(device, nested=False, shape=shape)
    x = torch.randn(rows, shape[1], device=device, dtype=torch.bfloat16)
    bias = torch.randn(shape[0], device=device)
    grad = torch.randn(rows, shape[0], device=device, dtype=torch.bfloat16)
    results = []
    for fn in (ops._Matmul4bitFunction.apply, fops.matmul_4bit):
        xa, ba = x.clone().requires_grad_(True), bias.clone().requires_grad_(True)
        out = fn(xa, ba, packed, *stats)
        out.backward(grad)
        results.append((out.detach(), xa.grad, ba.grad))
    for eager, op in zip(*results, strict=True):
        assert eager.shape == op.shape and eager.dtype == op.dtype and torch.equal(eager, op)


def test_create_graph_keeps_the_input_gradient_differentiable(device):
    packed, stats = _weight(device)
    x = torch.randn(20, 256, device=device, requires_grad=True)
    g = torch.randn(20, 48, device=device, requires_grad=True)
    (grad_x,) = torch.autograd.grad(fops.matmul_4bit(x, None, packed, *stats), x, g, create_graph=True)
    assert grad_x.grad_fn is not None
    (grad_g,) = torch.autograd.grad(grad_x.sum(), g)
    W = ops.dequantize_4bit(packed, *stats, torch.float32)
    torch.testing.assert_close(grad_g, W.sum(1).expand_as(g), rtol=1e-5, atol=1e-4)


def test_random_calls_match_the_python_function_and_the_reference(device, monkeypatch):
    """Random weights (NF4 and FP4, blocksizes 32-128, numel not a multiple of the blocksize, plain and double-quantized
    statistics), rows (0 to 40, 2-D and 3-D A), dtypes and biases through the C++ autograd kernel: its output and its
    input and bias gradients equal the Python Function's on the same kernels bit for bit, and the reference path's
    (FSDP4BIT_NO_NATIVE=1, every call deferred to the Python bodies) within the dtype's rounding."""
    gen = torch.Generator().manual_seed(30)

    def pick(options):
        return options[int(torch.randint(len(options), (), generator=gen))]

    for _ in range(48):
        N, K = int(torch.randint(1, 70, (), generator=gen)), int(torch.randint(1, 200, (), generator=gen))
        quant_type, blocksize, nested = pick(["nf4", "fp4"]), pick([32, 64, 128]), pick([True, False])
        dtype, rows = pick([torch.float32, torch.bfloat16, torch.float16]), int(torch.randint(0, 21, (), generator=gen))
        lead = pick([(rows,), (2, rows)])
        bias_dtype = pick([None, dtype, torch.float32])
        w = torch.randn(N, K, generator=gen).to(device)
        packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
        nested_bs = state.state2.blocksize if nested else 256
        stats = (*state.absmax_tensors(), blocksize, nested_bs, quant_type, [N, K])
        x = torch.randn(*lead, K, generator=gen).to(device, dtype)
        bias = None if bias_dtype is None else torch.randn(N, generator=gen).to(device, bias_dtype)
        grad = torch.randn(*lead, N, generator=gen).to(device, dtype)
        case = (N, K, quant_type, blocksize, nested, dtype, lead, bias_dtype)
        results = []
        for fn, no_native in ((fops.matmul_4bit, "0"), (ops._Matmul4bitFunction.apply, "0"), (fops.matmul_4bit, "1")):
            monkeypatch.setenv("FSDP4BIT_NO_NATIVE", no_native)
            xa = x.clone().requires_grad_(True)
            ba = None if bias is None else bias.clone().requires_grad_(True)
            out = fn(xa, ba, packed.reshape(-1), *stats)
            out.backward(grad)
            results.append((out.detach(), xa.grad, None if ba is None else ba.grad))
        node, function, reference = results
        for got, want in zip(node, function, strict=True):
            assert (got is None) == (want is None), case
            if got is not None:
                assert got.dtype == want.dtype and torch.equal(got.view(torch.uint8), want.view(torch.uint8)), case
        for got, want in zip(node, reference, strict=True):
            if got is not None:
                scale = want.abs().max().item() if want.numel() else 0.0
                torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * scale, msg=str(case))


@pytest.mark.parametrize("rows", [1, 20])
def test_forward_mode_tangents_reach_the_output(device, rows):
    """Forward-mode AD (a dual A or bias, torch.func.jvp) gives the output the tangent tA @ W.T + t_bias, against
    float64: the kernels have no forward derivative and dropped it (a None tangent) or refused it."""
    gen = torch.Generator().manual_seed(31)
    packed, state = F.quantize_4bit(torch.randn(24, 64, generator=gen).to(device), quant_type="fp4", blocksize=32)
    W = F.dequantize_4bit(packed, state).double()
    x, t = (torch.randn(rows, 64, generator=gen).to(device) for _ in range(2))
    bias, t_bias = (torch.randn(24, generator=gen).to(device) for _ in range(2))
    want = t.double() @ W.T
    with fwAD.dual_level():
        for requires_grad in (False, True):
            dual = fwAD.make_dual(x.clone().requires_grad_(requires_grad), t)
            for out in (bnb.matmul_4bit(dual, packed.t(), state), F.gemv_4bit(dual, packed.t(), state=state)):
                tangent = fwAD.unpack_dual(out).tangent
                assert tangent is not None
                torch.testing.assert_close(tangent.double(), want, rtol=1e-5, atol=1e-5)
        out = bnb.matmul_4bit(x, packed.t(), state, bias=fwAD.make_dual(bias, t_bias))
        assert torch.equal(fwAD.unpack_dual(out).tangent, t_bias.expand(rows, 24))
    _, tangent = torch.func.jvp(lambda a: bnb.matmul_4bit(a, packed.t(), state), (x,), (t,))
    torch.testing.assert_close(tangent.double(), want, rtol=1e-5, atol=1e-5)
    if kernels.native_for(device) is not None:  # the operator itself says so instead of dropping the tangent
        args = (packed, *state.absmax_tensors(), 32, 256, "fp4", [24, 64])
        with fwAD.dual_level(), pytest.raises(RuntimeError, match="has no forward-mode derivative, and an input"):
            torch.ops.fsdp4bit.matmul_4bit(fwAD.make_dual(x, t), None, *args)


@pytest.mark.parametrize("rows", [1, 20])
def test_torch_func_transforms_run_through_a_4bit_matmul(device, rows):
    """torch.func's grad, vmap(grad), jacrev and hessian through matmul_4bit and F.gemv_4bit give the float64
    derivatives of A @ W.T + bias; the operator's C++ autograd node raised "cannot use C++
    torch::autograd::Function with functorch transforms"."""
    gen = torch.Generator().manual_seed(37)
    packed, state = F.quantize_4bit(torch.randn(24, 64, generator=gen).to(device), quant_type="nf4", blocksize=64)
    W = F.dequantize_4bit(packed, state).double()
    x = torch.randn(rows, 64, generator=gen).to(device)
    bias = torch.randn(24, generator=gen).to(device)
    tol = {"rtol": 1e-4, "atol": 1e-4}

    for product in (
        lambda a: bnb.matmul_4bit(a, packed.t(), state, bias=bias),
        lambda a: F.gemv_4bit(a, packed.t(), state=state) + bias,
    ):

        def loss(a, product=product):
            return product(a).pow(2).sum()

        want = 2 * (x.double() @ W.T + bias.double()) @ W  # d loss / d x, row by row
        torch.testing.assert_close(torch.func.grad(loss)(x).double(), want, **tol)
        per_row = torch.func.vmap(torch.func.grad(lambda a: loss(a.unsqueeze(0))))(x)
        torch.testing.assert_close(per_row.double(), want, **tol)
        torch.testing.assert_close(torch.func.jacrev(product)(x[0]).double(), W, **tol)
        torch.testing.assert_close(torch.func.hessian(loss)(x[0]).double(), 2 * W.T @ W, rtol=1e-4, atol=1e-3)


class _LoraLinear4bit(torch.nn.Module):
    """A 4-bit linear layer plus a rank-4 adapter: base(x) + up(down(x))."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.base = bnb.nn.Linear4bit(64, 32, bias=True, compute_dtype=torch.float32, quant_type="nf4").to(device)
        self.down = torch.nn.Linear(64, 4, bias=False, device=device)
        self.up = torch.nn.Linear(4, 32, bias=False, device=device)
        torch.nn.init.normal_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


def test_per_sample_adapter_gradients_through_a_4bit_layer(device):
    """Per-sample gradients of a LoRA adapter on a 4-bit layer (torch.func.vmap(grad) over functional_call, as
    differentially private finetuning computes them) equal each sample's own backward."""
    torch.manual_seed(41)
    model = _LoraLinear4bit(device)
    adapter = {k: v.detach() for k, v in model.named_parameters() if not k.startswith("base")}

    def loss(params, x):
        return torch.func.functional_call(model, params, (x,)).pow(2).mean()

    x = torch.randn(5, 3, 64, device=device)
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(adapter, x)
    for i in range(x.shape[0]):
        params = {k: v.clone().requires_grad_(True) for k, v in adapter.items()}
        loss(params, x[i]).backward()
        for name, p in params.items():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("lead", [(0,), (2, 0)])
def test_gemv_of_no_rows_is_an_empty_product(device, lead):
    """F.gemv_4bit of an A with no rows returns the empty product, as bnb.matmul_4bit does (it raised "A must not be
    empty"), also into ``out=``."""
    packed, state = F.quantize_4bit(torch.randn(24, 64).to(device), quant_type="nf4")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(*lead, 64, device=device, dtype=dtype)
        out = F.gemv_4bit(x, packed.t(), state=state)
        assert out.shape == (*lead, 24) and out.dtype == dtype
        assert out.shape == bnb.matmul_4bit(x, packed.t(), state).shape
        buf = torch.empty(*lead, 24, device=device, dtype=dtype)
        assert F.gemv_4bit(x, packed.t(), state=state, out=buf) is buf
