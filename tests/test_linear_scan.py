"""linear_scan: every backend against a float64 loop, gradients by gradcheck."""

import pytest
import torch

from lrnnx.ops import _dispatch, linear_scan
from lrnnx.ops.linear_scan import torch as torch_backend

torch.manual_seed(0)
# GPU backends are exercised in test_cuda.py
BACKENDS = [b for b in _dispatch.backends("linear_scan") if b != "triton"]


def naive(a, b, h0=None, reverse=False):
    a, b = torch.broadcast_tensors(a, b)
    h = torch.zeros_like(b[:, 0]) if h0 is None else h0.clone()
    out = torch.empty_like(b)
    ts = range(b.shape[1] - 1, -1, -1) if reverse else range(b.shape[1])
    for t in ts:
        h = a[:, t] * h + b[:, t]
        out[:, t] = h
    return out


def make(shape, dtype, lo=-1.1, hi=1.1):
    a = torch.rand(shape, dtype=torch.float64) * (hi - lo) + lo
    if dtype.is_complex:
        a = a * torch.exp(1j * torch.rand(shape, dtype=torch.float64) * 6.28)
    return a.to(dtype), torch.randn(shape, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("L", [1, 3, 64, 65, 300, 4097])
@pytest.mark.parametrize("reverse", [False, True])
def test_matches_loop(backend, dtype, L, reverse):
    a, b = make((2, L, 3), dtype, -1.0, 1.0)
    h0 = torch.randn(2, 3, dtype=dtype)
    h, last = linear_scan(a, b, h0, reverse=reverse, return_final_state=True, backend=backend)
    ref = naive(a, b, h0, reverse)
    assert torch.allclose(h, ref, atol=1e-9, rtol=1e-9)
    assert torch.equal(last, h[:, 0] if reverse else h[:, -1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_channel_shapes_broadcast_and_zero_decay(backend):
    a = torch.rand(4, 5, dtype=torch.float64)  # time-invariant decay, broadcast over (B, L)
    a[0, 0] = 0.0  # a zero decay must not break the chunked closed form
    b = torch.randn(2, 130, 4, 5, dtype=torch.float64)
    assert torch.allclose(linear_scan(a, b, backend=backend), naive(a, b), atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_decay_complex_input_promotes(backend):
    a = torch.rand(2, 40, 3)
    b = torch.randn(2, 40, 3, dtype=torch.complex64)
    h = linear_scan(a, b, backend=backend)
    assert h.dtype == torch.complex64
    assert torch.allclose(h, naive(a.to(b.dtype), b), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_accumulates_in_float32(dtype):
    a, b = torch.full((1, 2000, 4), 0.999), torch.full((1, 2000, 4), 0.01)
    h = linear_scan(a.to(dtype), b.to(dtype))
    assert h.dtype == dtype
    ref = naive(a.to(dtype).double(), b.to(dtype).double())
    assert torch.allclose(h.double(), ref, rtol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck(backend, dtype, reverse, monkeypatch):
    monkeypatch.setattr(torch_backend, "CHUNK", 4)  # several chunks on a tiny sequence
    a, b = make((2, 11, 2), dtype, -0.9, 0.9)
    h0 = torch.randn(2, 2, dtype=dtype)
    args = tuple(t.requires_grad_() for t in (a, b, h0))

    def f(a, b, h0):
        return linear_scan(a, b, h0, reverse=reverse, return_final_state=True, backend=backend)

    assert torch.autograd.gradcheck(f, args)


def test_gradients_agree_between_backends():
    a, b = make((2, 200, 3), torch.complex128, -1.0, 1.0)
    h0 = torch.randn(2, 3, dtype=torch.complex128)
    w = torch.randn(2, 200, 3, dtype=torch.complex128)
    grads = []
    for backend in BACKENDS:
        args = [t.clone().requires_grad_() for t in (a, b, h0)]
        (linear_scan(*args, backend=backend) * w).real.sum().backward()
        grads.append([t.grad for t in args])
    for g in grads[1:]:
        for x, y in zip(grads[0], g, strict=True):
            assert torch.allclose(x, y, atol=1e-9)


def test_bad_arguments():
    with pytest.raises(ValueError, match="b: expected"):
        linear_scan(torch.rand(3), torch.rand(3))
    with pytest.raises(ValueError, match="a:"):
        linear_scan(torch.rand(2, 5, 4), torch.rand(2, 5, 3))
    with pytest.raises(ValueError, match="initial_state"):
        linear_scan(torch.rand(2, 5, 3), torch.rand(2, 5, 3), torch.rand(2, 4))
    with pytest.raises(ValueError, match="backend"):
        linear_scan(torch.rand(2, 5, 3), torch.rand(2, 5, 3), backend="nope")
    x = torch.rand(2, 5, 3)
    with pytest.raises(TypeError, match="b: expected a floating-point or complex tensor"):
        linear_scan(x, torch.ones(2, 5, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="a: expected a floating-point or complex tensor"):
        linear_scan(torch.ones(2, 5, 3, dtype=torch.bool), x)
    with pytest.raises(TypeError, match="initial_state: expected a torch.Tensor"):
        linear_scan(x, x, [[0.0] * 3] * 2)
    with pytest.raises(TypeError, match="initial_state: expected a floating-point"):
        linear_scan(x, x, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="a: expected a tensor on b's device"):
        linear_scan(torch.rand(2, 5, 3, device="meta"), x)


def naive_resets(a, b, h0, reverse, resets):
    """The loop with restarts: h_t = b_t where ``resets`` (L,) is set, whatever came before."""
    h = h0.clone()
    out = torch.empty_like(b)
    ts = range(b.shape[1] - 1, -1, -1) if reverse else range(b.shape[1])
    for t in ts:
        h = b[:, t].clone() if resets[t] else a[:, t] * h + b[:, t]
        out[:, t] = h
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("reverse", [False, True])
def test_backend_resets_select_the_state(backend, dtype, reverse, monkeypatch):
    """Each backend's ``resets`` argument: the state restarts (selected, so a nan before a
    restart does not reach past it), across the torch backend's chunks; gradients by gradcheck,
    with a restart on the first processed step too (the initial state's gradient is then 0)."""
    monkeypatch.setattr(torch_backend, "CHUNK", 4)
    fn = _dispatch.select("linear_scan", torch.device("cpu"), backend)[1]
    a, b = make((2, 11, 2), dtype, -0.9, 0.9)
    h0 = torch.randn(2, 2, dtype=dtype)
    resets = torch.zeros(11, dtype=torch.bool)
    resets[[3, 4, 8]] = True
    poisoned = b.clone()
    poisoned[:, 6 if reverse else 2] = float("nan")  # between two restarts
    h = fn(a, poisoned, h0, reverse, resets)
    ref = naive_resets(a, poisoned, h0, reverse, resets)
    assert torch.isnan(h).sum() == torch.isnan(ref).sum() > 0
    finite = ~torch.isnan(ref)
    assert torch.allclose(h[finite], ref[finite], atol=1e-10)
    for first in (False, True):
        r = resets.clone()
        r[-1 if reverse else 0] = first
        args = tuple(t.clone().requires_grad_() for t in (a, b, h0))
        assert torch.autograd.gradcheck(lambda a, b, h0, r=r: fn(a, b, h0, reverse, r), args)
