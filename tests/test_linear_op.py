"""lrnnx.ops.linear and lrnnx.layers.linear.Linear: values and gradients equal F.linear's on
every path, the choice of path, and the fallbacks (autocast, float64, torch.func, backend
names)."""

from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _tol import assert_close_rel
from lrnnx.layers.linear import Linear
from lrnnx.ops.linear import cpu as lin_cpu
from lrnnx.ops.linear import linear

HAVE_ONEDNN = lin_cpu._pointwise() is not None and lin_cpu.self_check()
needs_onednn = pytest.mark.skipif(not HAVE_ONEDNN, reason="torch built without oneDNN's linear")


def _inputs(shape, out, bias=True, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen, dtype=dtype)
    w = torch.randn(out, shape[-1], generator=gen, dtype=dtype) / shape[-1] ** 0.5
    b = torch.randn(out, generator=gen, dtype=dtype) if bias else None
    return x, w, b


def _values_and_grads(fn, x, w, b):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w) + ((b,) if b is not None else ())]
    y = fn(leaves[0], leaves[1], leaves[2] if b is not None else None)
    g = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    return (y, *torch.autograd.grad(y, leaves, g))


@needs_onednn
@pytest.mark.parametrize("shape", [(7, 19), (3, 5, 64), (2, 3, 4, 33), (1, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_matches_f_linear(shape, bias):
    x, w, b = _inputs(shape, 23, bias)
    assert lin_cpu.applies(x, w, b, asked=True)
    got = _values_and_grads(lambda *a: linear(*a, backend="cpu"), x, w, b)
    ref = _values_and_grads(F.linear, x.double(), w.double(), None if b is None else b.double())
    assert type(got[0].grad_fn).__name__ == "OneDNNLinearBackward"
    for a, r, name in zip(got, ref, ("y", "dx", "dw", "db")[: len(got)], strict=True):
        # a product over in_features (dy, dx) or over the tokens (dw, db): rounded per term
        assert_close_rel(a, r, dtype=torch.float32, length=max(shape[-1], x.numel()), msg=name)


@needs_onednn
def test_onednn_path_is_taken_when_asked():
    x, w, b = _inputs((4, 8), 3)
    y = linear(x.requires_grad_(), w, b, backend="cpu")
    assert type(y.grad_fn).__name__ == "OneDNNLinearBackward"


@needs_onednn
def test_strided_input():
    """x a transposed view (its rows not contiguous): read through a contiguous copy."""
    x, w, b = _inputs((6, 40, 5), 9)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    got = _values_and_grads(lambda *a: linear(*a, backend="cpu"), xt[:, ::2], w, b)
    ref = _values_and_grads(F.linear, x[:, ::2].double(), w.double(), b.double())
    for a, r in zip(got, ref, strict=True):
        assert_close_rel(a, r, dtype=torch.float32, length=x.numel())


def test_torch_backend_and_env(monkeypatch):
    x, w, b = _inputs((4, 8), 3)
    x.requires_grad_()
    assert type(linear(x, w, b, backend="torch").grad_fn).__name__ == "AddmmBackward0"
    monkeypatch.setenv("LRNNX_BACKEND", "torch")
    assert type(linear(x, w, b).grad_fn).__name__ == "AddmmBackward0"
    monkeypatch.setenv("LRNNX_BACKEND", "triton")  # another op's backend name: torch here
    assert type(linear(x, w, b).grad_fn).__name__ == "AddmmBackward0"


def test_unknown_backend():
    x, w, b = _inputs((4, 8), 3)
    with pytest.raises(ValueError, match="backend: expected one of .* for linear, got 'numba'"):
        linear(x, w, b, backend="numba")


@pytest.mark.parametrize(
    "case",
    ["float64", "bfloat16", "1-D input", "empty", "weight transposed", "in_features differ"],
)
def test_calls_that_keep_f_linear(case):
    x, w, b = _inputs((5, 8), 3)
    if case == "float64":
        x, w, b = x.double(), w.double(), b.double()
    elif case == "bfloat16":
        x, w, b = x.bfloat16(), w.bfloat16(), b.bfloat16()
    elif case == "1-D input":
        x = x[0]
    elif case == "empty":
        x = x[:0]
    elif case == "weight transposed":
        w = w.t().contiguous().t()
    elif case == "in_features differ":
        x = x[:, :5]
    assert not lin_cpu.applies(x, w, b, asked=True)
    if case == "in_features differ":  # torch's own message, as F.linear gives it
        with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
            linear(x, w, b)
    else:
        assert torch.equal(linear(x, w, b), F.linear(x, w, b))


def test_autocast_keeps_f_linear():
    """Under CPU autocast the product is autocast's (bfloat16), as nn.Linear's would be."""
    x, w, b = _inputs((5, 8), 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not lin_cpu.applies(x, w, b, asked=True)
        assert linear(x, w, b, backend="cpu").dtype == torch.bfloat16


@pytest.mark.parametrize(
    "vendor, generic", [("GenuineIntel", False), ("AuthenticAMD", True), ("", False)]
)
def test_vendor_rule(vendor, generic):
    """oneDNN is lrnnx's own pick only where MKL would take its generic path: MKL as torch's
    BLAS on an x86 CPU not made by Intel."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    expected = generic and x86 and torch.backends.mkl.is_available()
    assert lin_cpu.mkl_takes_generic_path(vendor) == expected


def test_default_choice_follows_the_vendor_rule(monkeypatch):
    x, w, b = _inputs((2, 64, 128), 512)  # 2**23 multiply-adds
    monkeypatch.setattr(lin_cpu, "mkl_takes_generic_path", lambda vendor=None: False)
    assert not lin_cpu.applies(x, w, b)
    monkeypatch.setattr(lin_cpu, "mkl_takes_generic_path", lambda vendor=None: True)
    assert lin_cpu.applies(x, w, b) == HAVE_ONEDNN


def test_small_products_keep_f_linear(monkeypatch):
    """Below MIN_MACS multiply-adds (a decoding step, a small head) oneDNN's fixed cost
    outweighs its speed: lrnnx keeps F.linear unless backend="cpu" asks for oneDNN."""
    monkeypatch.setattr(lin_cpu, "mkl_takes_generic_path", lambda vendor=None: True)
    x, w, b = _inputs((2, 64, 128), 512)
    assert x.shape[0] * x.shape[1] * w.numel() == lin_cpu.MIN_MACS
    assert lin_cpu.applies(x, w, b) == HAVE_ONEDNN
    small = x[:, :63]  # one token fewer
    assert not lin_cpu.applies(small, w, b)
    assert lin_cpu.applies(small, w, b, asked=True) == HAVE_ONEDNN
    step = x[:, 0]  # one token per sequence
    assert type(linear(step.requires_grad_(), w, b).grad_fn).__name__ == "AddmmBackward0"


def test_failed_self_check_keeps_f_linear(monkeypatch):
    x, w, b = _inputs((5, 8), 3)
    monkeypatch.setattr(lin_cpu, "self_check", lambda: False)
    assert not lin_cpu.applies(x, w, b, asked=True)
    assert torch.equal(linear(x, w, b, backend="cpu"), F.linear(x, w, b))


def test_self_check_warns_on_a_broken_op(monkeypatch):
    def broken(*args):
        raise RuntimeError("schema changed")

    monkeypatch.setattr(lin_cpu, "_pointwise", lambda: broken)
    lin_cpu.self_check.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="oneDNN linear unavailable.*schema changed"):
            assert lin_cpu.self_check() is False
    finally:
        lin_cpu.self_check.cache_clear()


def test_linear_module_is_nn_linear():
    torch.manual_seed(0)
    ours = Linear(8, 3)
    torch.manual_seed(0)
    theirs = nn.Linear(8, 3)
    assert isinstance(ours, nn.Linear)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)
    x = torch.randn(2, 4, 8)
    assert_close_rel(ours(x), theirs.double()(x.double()), dtype=torch.float32, length=8)


def test_torch_func_grad_through_linear():
    """torch.func transforms fall back to F.linear (an autograd.Function without a vmap rule
    would fail under them)."""
    lin = Linear(6, 4)
    params = dict(lin.named_parameters())
    x = torch.randn(3, 6)

    def loss(p, x):
        return torch.func.functional_call(lin, p, (x,)).square().sum()

    grads = torch.func.grad(loss)(params, x)
    ref = torch.autograd.grad(loss(params, x), list(params.values()))
    for g, r in zip(grads.values(), ref, strict=True):
        assert_close_rel(g, r, length=6)
    per_row = torch.func.vmap(lambda r: lin(r))(x)
    assert_close_rel(per_row, lin(x), length=6)


def test_models_use_it():
    """Every model's dense layers are lrnnx's Linear (so they get the faster GEMM)."""
    from lrnnx.models.registry import build_mixer

    for name in ("mamba", "s4d", "rglru"):
        m = build_mixer(name, d_model=16, d_state=4)
        dense = [mod for mod in m.modules() if type(mod) is nn.Linear]
        assert not dense, (name, dense)


@needs_onednn
@pytest.mark.parametrize("name", ["mamba", "s4d"])
def test_model_on_onednn_matches_f_linear(monkeypatch, name):
    """A model large enough for the oneDNN path (every product >= MIN_MACS) gives F.linear's
    outputs and gradients, to float32 rounding."""
    from lrnnx.models.registry import build_mixer

    torch.manual_seed(0)
    m = build_mixer(name, d_model=128, d_state=16)
    x = torch.randn(2, 256, 128)
    results, calls = [], []
    real = lin_cpu.linear
    monkeypatch.setattr(lin_cpu, "linear", lambda *a: calls.append(1) or real(*a))
    for generic in (True, False):
        monkeypatch.setattr(lin_cpu, "mkl_takes_generic_path", lambda vendor=None, g=generic: g)
        calls.clear()
        m.zero_grad()
        xi = x.clone().requires_grad_()
        y = m(xi)
        y = y[0] if isinstance(y, tuple) else y
        (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        grads = [p.grad.clone() for p in m.parameters() if p.grad is not None]
        results.append((y.detach(), xi.grad, grads))
        assert bool(calls) == generic  # the oneDNN path ran, or did not
    (y1, dx1, g1), (y2, dx2, g2) = results
    assert_close_rel(y1, y2, length=256, msg="y")
    assert_close_rel(dx1, dx2, length=256, msg="dx")
    for a, b in zip(g1, g2, strict=True):
        assert_close_rel(a, b, length=2 * 256, msg="parameter gradient")
