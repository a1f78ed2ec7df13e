"""Second derivatives (create_graph=True: gradient penalties, Hessian-vector products) through
every model: exact where the fused backward can give them (S4 and S4D by default, every model
on the reference backend), else a clear error naming the op (never gradients that
second-order autograd silently treats as constants); and the Functions that recompute their
plain formula pass gradgradcheck (lrnnx.core.autograd)."""

from __future__ import annotations

import math

import pytest
import torch

from lrnnx.core.autograd import SecondOrderError
from lrnnx.models.registry import available_models, build_mixer
from lrnnx.ops._numba import HAVE_NUMBA

needs_numba = pytest.mark.skipif(not HAVE_NUMBA, reason="the cpu backends need numba")


def _hvp_and_fd(name: str) -> tuple[float, float]:
    """<v, d/dx |dL/dx|^2> by double backward and by central differences of |dL/dx|^2, for
    L = |model(x)|^2 with a float64 mixer (B=2, L=40, d_model=8, d_state=4)."""
    torch.manual_seed(0)
    model = build_mixer(name, 8, 4).double()
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 40, 8, dtype=torch.float64, generator=gen)
    v = torch.randn(x0.shape, dtype=torch.float64, generator=gen)

    def penalty(x: torch.Tensor, create: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().requires_grad_()
        y = model(x)
        y = y[0] if isinstance(y, tuple) else y
        (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=create)
        return x, gx.pow(2).sum()

    x, s = penalty(x0, True)
    (hv,) = torch.autograd.grad(s, x)
    eps = 1e-5
    fd = (penalty(x0 + eps * v, False)[1] - penalty(x0 - eps * v, False)[1]) / (2 * eps)
    return float((hv * v).sum()), float(fd)


@pytest.mark.parametrize("name", available_models(include_attention=True))
def test_reference_backend_gives_exact_second_derivatives(name, monkeypatch):
    """Attention included: it then runs SDPA's math kernel (the fused CPU kernel's backward
    has no derivative)."""
    monkeypatch.setenv("LRNNX_BACKEND", "reference")
    analytic, fd = _hvp_and_fd(name)
    assert math.isclose(analytic, fd, rel_tol=1e-6), (analytic, fd)


@pytest.mark.parametrize("name", available_models())
def test_default_path_is_exact_or_refuses(name):
    try:
        analytic, fd = _hvp_and_fd(name)
    except SecondOrderError as e:
        assert "create_graph=True" in str(e) and "LRNNX_BACKEND=reference" in str(e)
        assert name not in ("s4", "s4d")  # their fused parts all recompute a plain formula
        return
    assert math.isclose(analytic, fd, rel_tol=1e-6), (analytic, fd)


@needs_numba
def test_cauchy_cpu_second_derivatives():
    from lrnnx.ops import cauchy

    gen = torch.Generator().manual_seed(0)
    v = torch.randn(2, 3, 4, dtype=torch.complex128, generator=gen, requires_grad=True)
    w = torch.complex(-torch.rand(3, 4, dtype=torch.float64, generator=gen) - 0.1,
                      torch.randn(3, 4, dtype=torch.float64, generator=gen)).requires_grad_()  # fmt: skip
    z = torch.exp(-2j * math.pi * torch.arange(5, dtype=torch.float64) / 8)
    a, b = 1 - z, (1 + z) / 2
    fn = lambda v, w: cauchy(v, w, a, b, conj=False, backend="cpu")  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (v, w))


def test_onednn_linear_second_derivatives():
    """The oneDNN dense layer (float32 only) against F.linear: the gradient of a gradient
    penalty with respect to x, W and b."""
    import torch.nn.functional as F

    from lrnnx.ops.linear.cpu import OneDNNLinear

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=gen, requires_grad=True)
    W = torch.randn(3, 4, generator=gen, requires_grad=True)
    bias = torch.randn(3, generator=gen, requires_grad=True)
    results = []
    for fn in (OneDNNLinear.apply, F.linear):
        y = fn(x, W, bias)
        (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(gx.pow(2).sum(), (x, W, bias)))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_s7_forms_second_derivatives():
    from lrnnx.models.ltv.s7 import bilinear_form, quadratic_form

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(4, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    W = torch.randn(5, 3, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradgradcheck(bilinear_form, (a, b, W))
    S0 = torch.randn(5, 3, 3, dtype=torch.float64, generator=gen)
    S = (S0 + S0.transpose(1, 2)).requires_grad_()
    u = a.detach().clone().requires_grad_()
    # S symmetric: perturbations along symmetric directions only (the form reads S as such)
    assert torch.autograd.gradgradcheck(
        lambda u, S: quadratic_form(u, (S + S.transpose(1, 2)) / 2), (u, S)
    )


@needs_numba
def test_first_order_kernels_refuse_create_graph():
    from lrnnx.ops import causal_conv1d, selective_scan_fn

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 12, generator=gen, requires_grad=True)
    y = causal_conv1d(x, torch.randn(4, 3, generator=gen), backend="cpu")
    with pytest.raises(SecondOrderError, match="causal_conv1d"):
        torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    u = torch.randn(1, 4, 12, generator=gen, requires_grad=True)
    out = selective_scan_fn(u, torch.rand(1, 4, 12, generator=gen), -torch.rand(4, 2, generator=gen),
                            torch.randn(1, 1, 2, 12, generator=gen), torch.randn(1, 1, 2, 12, generator=gen),
                            backend="cpu")  # fmt: skip
    with pytest.raises(SecondOrderError, match="selective_scan"):
        torch.autograd.grad(out.pow(2).sum(), u, create_graph=True)
    # without a graph of the gradients the kernels' backward runs as before
    (du,) = torch.autograd.grad(out.pow(2).sum(), u)
    assert du.shape == u.shape and torch.isfinite(du).all()
