"""lrnnx.ops.cauchy (S4's Cauchy product): every backend against the reference quotients in
float64 (values, gradients of v and w), with and without the conjugate terms, real inputs,
leading dimensions, empty sums, gradcheck of the fused kernels, and the argument checks."""

from __future__ import annotations

import math

import pytest
import torch

from _tol import assert_close_rel
from lrnnx.ops import cauchy
from lrnnx.ops._numba import HAVE_NUMBA

needs_numba = pytest.mark.skipif(not HAVE_NUMBA, reason="the cpu backend needs numba")
BACKENDS = ["torch", pytest.param("cpu", marks=needs_numba)]


def inputs(lead=(2,), H=3, N=5, K=9, dtype=torch.complex128, seed=0):
    """S4's use: poles in the left half-plane, points a = 1 - z, b = (1 + z) / 2 at roots of
    unity z."""
    g = torch.Generator().manual_seed(seed)
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    v = torch.randn(*lead, H, N, generator=g, dtype=dtype)
    w = torch.complex(-torch.rand(H, N, generator=g, dtype=real) - 0.1,
                      torch.randn(H, N, generator=g, dtype=real))  # fmt: skip
    z = torch.exp(-2j * math.pi * torch.arange(K, dtype=torch.float64) / (2 * K - 2)).to(dtype)
    return v, w, 1 - z, (1 + z) / 2


def values_and_grads(backend, v, w, a, b, conj):
    v, w = v.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    out = cauchy(v, w, a, b, conj=conj, backend=backend)
    g = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape).to(out.dtype)
    dv, dw = torch.autograd.grad(out, (v, w), g)
    return out, dv, dw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("conj", [True, False])
@pytest.mark.parametrize("lead", [(), (4,), (2, 3)])
def test_matches_reference(backend, conj, lead):
    args = inputs(lead=lead)
    got = values_and_grads(backend, *args, conj)
    ref = values_and_grads("reference", *args, conj)
    for name, x, y in zip(("out", "dv", "dw"), got, ref, strict=True):
        assert_close_rel(x, y, dtype=torch.float64, length=args[1].shape[1], msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32(backend):
    v, w, a, b = inputs(H=16, N=8, K=257, dtype=torch.complex64)
    got = values_and_grads(backend, v, w, a, b, True)
    ref = values_and_grads("reference", *(t.to(torch.complex128) for t in (v, w, a, b)), True)
    for x, y in zip(got, ref, strict=True):
        assert x.dtype == torch.complex64
        assert_close_rel(x, y, dtype=torch.float32, length=16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_inputs_get_real_gradients(backend):
    v, w, a, b = inputs()
    v, w = v.real.clone().requires_grad_(), w.real.clone().requires_grad_()
    out = cauchy(v, w, a, b, conj=False, backend=backend)
    ref = cauchy(v, w, a, b, conj=False, backend="reference")
    assert out.dtype == torch.complex128
    assert_close_rel(out, ref, dtype=torch.float64)
    dv, dw = torch.autograd.grad(out.abs().sum(), (v, w))
    rv, rw = torch.autograd.grad(ref.abs().sum(), (v, w))
    assert dv.dtype == torch.float64 and dw.dtype == torch.float64
    assert_close_rel(dv, rv, dtype=torch.float64)
    assert_close_rel(dw, rw, dtype=torch.float64)


@pytest.mark.skipif(BACKENDS[1].marks[0].args[0] is not False, reason="numba")
def test_gradcheck_fused():
    v, w, a, b = inputs(lead=(2,), H=2, N=3, K=4)
    v, w = v.requires_grad_(), w.requires_grad_()
    assert torch.autograd.gradcheck(lambda v, w: cauchy(v, w, a, b, backend="cpu"), (v, w))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["conj", "strided"])
def test_gradient_in_any_layout(backend, layout):
    """The fused kernels read the incoming gradient's complex memory: one with a pending
    conjugation (torch's lazy conj bit) or a strided view gives the reference's gradients."""
    v, w, a, b = inputs(lead=(2,), H=3, N=4, K=7)
    g = torch.randn(2, 3, 7, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    if layout == "conj":
        g = torch.view_as_complex(g).conj()
        assert g.is_conj()
    else:
        g = torch.view_as_complex(g.repeat(1, 1, 2, 1))[..., ::2]
        assert not g.is_contiguous()
    got, ref = [], []
    for name, out in (("got", got), ("ref", ref)):
        vv, ww = v.clone().requires_grad_(), w.clone().requires_grad_()
        y = cauchy(vv, ww, a, b, backend=backend if name == "got" else "reference")
        out += torch.autograd.grad(y, (vv, ww), g)
    for x, y in zip(got, ref, strict=True):
        assert_close_rel(x, y, dtype=torch.float64)


@needs_numba
def test_gradient_of_the_points_comes_from_the_torch_backend():
    v, w, a, b = inputs()
    a = a.clone().requires_grad_()
    out = cauchy(v, w, a, b, backend="cpu")
    ref = cauchy(v, w, a, b, backend="reference")
    (da,) = torch.autograd.grad(out.abs().sum(), a)
    (ra,) = torch.autograd.grad(ref.abs().sum(), a)
    assert_close_rel(da, ra, dtype=torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("empty", ["rows", "poles", "points"])
def test_empty(backend, empty):
    lead, N, K = (2,), 5, 9
    if empty == "rows":
        lead = (0,)
    elif empty == "poles":
        N = 0
    else:
        K = 0
    v, w, a, b = inputs(lead=lead, N=N, K=K)
    out = cauchy(v, w, a, b, backend=backend)
    assert out.shape == (*lead, 3, K)
    assert (out == 0).all()


def test_bad_arguments():
    v, w, a, b = inputs()
    with pytest.raises(ValueError, match="w: expected"):
        cauchy(v, w[:, :2], a, b)
    with pytest.raises(ValueError, match="b: expected"):
        cauchy(v, w, a, b[:3])
    with pytest.raises(TypeError, match="v: expected a torch.Tensor"):
        cauchy(v.tolist(), w, a, b)
    with pytest.raises(TypeError, match="a: expected a floating-point or complex"):
        cauchy(v, w, torch.arange(9), b)
    with pytest.raises(ValueError, match="a: expected 1 dimensions"):
        cauchy(v, w, a[None], b)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_elements: expected a positive int"):
            cauchy(v, w, a, b, max_elements=bad)
    for bad in (1.5, "x"):
        with pytest.raises(TypeError, match="max_elements: expected a positive int"):
            cauchy(v, w, a, b, max_elements=bad)
