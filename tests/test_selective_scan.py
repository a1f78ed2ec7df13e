"""selective_scan_fn: backends against each other and against a naive float64 loop."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import lrnnx.ops.selective_scan.torch as ss_torch
from _scan_inputs import make_scan_inputs
from lrnnx.ops import selective_scan_fn

DISCS = ("mamba", "zoh", "bilinear", "dirac")
FORMS = ("shared", "input", "grouped")
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "deltaA", "initial_state")


@pytest.fixture
def small_chunk(monkeypatch):
    """Chunks of 16 steps, so L=37 runs two full chunks and a partial one."""
    monkeypatch.setattr(ss_torch, "CHUNK", 16)


def naive(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    discretization: str = "mamba",
    deltaA: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The defining equations, step by step in float64 (complex128), independent of lrnnx."""

    def wide(x: Tensor | None) -> Tensor | None:
        if x is None:
            return None
        return x.to(torch.complex128 if x.is_complex() else torch.float64)

    u, delta, A, B, C, D, z, delta_bias, deltaA, initial_state = map(
        wide, (u, delta, A, B, C, D, z, delta_bias, deltaA, initial_state)
    )
    b, d, L = u.shape
    n = A.shape[1]

    def per_step(X: Tensor) -> Tensor:  # -> (b, d, n, L)
        if X.dim() == 2:
            return X[None, :, :, None].expand(b, d, n, L)
        if X.dim() == 3:
            return X[:, None].expand(b, d, n, L)
        return X[:, torch.arange(d) // (d // X.shape[1])]

    dt = delta if delta_bias is None else delta + delta_bias[:, None]
    if delta_softplus:
        dt = torch.log1p(torch.exp(dt))
    dA = dt if deltaA is None else deltaA
    Bf, Cf = per_step(B), per_step(C)
    state_dtype = torch.complex128 if A.is_complex() or B.is_complex() else torch.float64
    h = torch.zeros(b, d, n, dtype=state_dtype) if initial_state is None else initial_state
    y = torch.zeros(b, d, L, dtype=state_dtype)
    for t in range(L):
        x_A = dA[:, :, t, None] * A  # exponent of A_bar
        x_g = dt[:, :, t, None] * A  # exponent of the input integral
        if discretization == "mamba":
            A_bar, gamma_bar = torch.exp(x_A), dt[:, :, t, None]
        elif discretization == "zoh":
            A_bar, gamma_bar = torch.exp(x_A), (torch.exp(x_g) - 1) / A
        elif discretization == "bilinear":
            A_bar, gamma_bar = (1 + x_A / 2) / (1 - x_A / 2), dt[:, :, t, None] / (1 - x_g / 2)
        else:  # dirac
            A_bar, gamma_bar = torch.exp(x_A), 1.0
        h = A_bar * h + gamma_bar * Bf[..., t] * u[:, :, t, None]
        y[:, :, t] = (Cf[..., t] * h).sum(-1)
    y = 2 * y.real if A.is_complex() else y
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * z * torch.sigmoid(z)
    return y, h


make_inputs = make_scan_inputs


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("extras", [False, True], ids=["bare", "extras"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("disc", DISCS)
def test_forward_matches_naive(small_chunk, disc, cplx, form, extras):
    kw = make_inputs(form, cplx, extras)
    y0, h0 = naive(**kw, discretization=disc)
    for backend in ("torch", "reference"):
        y, h = selective_scan_fn(**kw, discretization=disc, return_last_state=True, backend=backend)
        assert y.shape == kw["u"].shape and y.dtype == torch.float64
        assert h.shape == (2, 4, 3) and h.dtype == (torch.complex128 if cplx else torch.float64)
        torch.testing.assert_close(y, y0, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(h, h0, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("disc", DISCS)
def test_float32_default_chunk(disc, cplx):
    """Float32 over several default-size chunks, against the float64 loop."""
    kw = make_inputs("input", cplx, True, deltaA=True, L=150, dtype=torch.float32)
    y0, h0 = naive(**kw, discretization=disc)
    y, h = selective_scan_fn(**kw, discretization=disc, return_last_state=True)
    assert y.dtype == torch.float32
    assert h.dtype == (torch.complex64 if cplx else torch.float32)
    torch.testing.assert_close(y.double(), y0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.to(h0.dtype), h0, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("disc", DISCS)
def test_deltaA(small_chunk, disc, cplx):
    kw = make_inputs("grouped", cplx, True)
    dt = torch.nn.functional.softplus(kw["delta"] + kw["delta_bias"][:, None])
    for backend in ("torch", "reference"):
        # deltaA equal to delta' is the ordinary call
        y, h = selective_scan_fn(**kw, discretization=disc, return_last_state=True, backend=backend)
        y1, h1 = selective_scan_fn(
            **kw, discretization=disc, deltaA=dt, return_last_state=True, backend=backend
        )
        torch.testing.assert_close(y1, y, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h1, h, rtol=1e-12, atol=1e-12)
        # a different deltaA changes A_bar only
        dA = 0.05 + torch.rand_like(dt)
        y2, h2 = selective_scan_fn(
            **kw, discretization=disc, deltaA=dA, return_last_state=True, backend=backend
        )
        y0, h0 = naive(**kw, discretization=disc, deltaA=dA)
        torch.testing.assert_close(y2, y0, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(h2, h0, rtol=1e-10, atol=1e-10)
        assert not torch.allclose(y2, y)


def test_default_backend_and_return_forms():
    kw = make_inputs("input", False, False, L=10)
    y = selective_scan_fn(**kw)
    assert isinstance(y, Tensor) and y.shape == (2, 4, 10)
    torch.testing.assert_close(y, naive(**kw)[0])
    # positional arguments in mamba_ssm's order
    y2, h = selective_scan_fn(kw["u"], kw["delta"], kw["A"], kw["B"], kw["C"], None, None, None,
                              False, True)  # fmt: skip
    torch.testing.assert_close(y2, y)
    assert h.shape == (2, 4, 3)


# ----------------------------------------------------------------------------- gradients


def _grads(kw: dict, disc: str, backend: str) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Outputs and gradients of a loss touching y and the last state, for every tensor input."""
    kw = {k: (v.clone().requires_grad_() if isinstance(v, Tensor) else v) for k, v in kw.items()}
    y, h = selective_scan_fn(**kw, discretization=disc, return_last_state=True, backend=backend)
    w = torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)
    loss = (y * w).sum() + (h * h.conj()).real.sum() + h.real.sum()
    names = [k for k in GRAD_NAMES if k in kw]
    got = torch.autograd.grad(loss, [kw[k] for k in names], allow_unused=True)
    # an input the rule never reads (delta under dirac with deltaA) has a zero gradient
    got = [torch.zeros_like(kw[k]) if g is None else g for k, g in zip(names, got, strict=True)]
    return y, h, dict(zip(names, got, strict=True))


@pytest.mark.parametrize("deltaA", [False, True], ids=["", "deltaA"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("disc", DISCS)
def test_gradients_match_reference(small_chunk, disc, cplx, form, deltaA):
    kw = make_inputs(form, cplx, True, deltaA=deltaA)
    y_t, h_t, g_t = _grads(kw, disc, "torch")
    y_r, h_r, g_r = _grads(kw, disc, "reference")
    torch.testing.assert_close(y_t, y_r, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h_t, h_r, rtol=1e-10, atol=1e-10)
    assert set(g_t) == set(GRAD_NAMES if deltaA else GRAD_NAMES[:8] + GRAD_NAMES[9:])
    for name in g_t:
        torch.testing.assert_close(g_t[name], g_r[name], rtol=1e-9, atol=1e-9, msg=name)


@pytest.mark.parametrize("wanted", [("C", "D", "z"), ("initial_state",), ("A",), ("delta",)])
def test_gradient_subsets(small_chunk, wanted):
    """Only some inputs need a gradient: the chunk-to-chunk carry is skipped or kept as needed."""
    kw = make_inputs("input", True, True, deltaA=True)
    got = {}
    for backend in ("torch", "reference"):
        args = {k: (v.clone().requires_grad_(k in wanted) if isinstance(v, Tensor) else v)
                for k, v in kw.items()}  # fmt: skip
        y, h = selective_scan_fn(**args, return_last_state=True, backend=backend)
        loss = y.pow(2).sum() + h.abs().sum()
        got[backend] = torch.autograd.grad(loss, [args[k] for k in wanted])
    for a, b in zip(got["torch"], got["reference"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


GRADCHECK_CASES = [
    # disc, cplx, form, b, n, L, chunk (L % chunk != 0, several chunks)
    ("mamba", False, "input", 2, 2, 9, 4),
    ("zoh", True, "grouped", 1, 3, 7, 3),
    ("bilinear", False, "shared", 2, 3, 5, 2),
    ("dirac", True, "input", 1, 2, 9, 4),
    ("mamba", True, "shared", 2, 2, 6, 64),
]


@pytest.mark.parametrize("disc,cplx,form,b,n,L,chunk", GRADCHECK_CASES)
def test_gradcheck(monkeypatch, disc, cplx, form, b, n, L, chunk):
    monkeypatch.setattr(ss_torch, "CHUNK", chunk)
    kw = make_inputs(form, cplx, True, deltaA=True, b=b, d=2, n=n, L=L, g=2)
    names = [k for k in GRAD_NAMES if k in kw]
    flags = {k: v for k, v in kw.items() if not isinstance(v, Tensor)}

    def fn(*tensors):
        return selective_scan_fn(
            **dict(zip(names, tensors, strict=True)), **flags, discretization=disc, return_last_state=True,
            backend="torch",
        )  # fmt: skip

    inputs = tuple(kw[k].clone().requires_grad_() for k in names)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_saves_only_chunk_starts():
    """The torch backend keeps inputs and (b, d, n) per chunk, never the (b, d, n, L) states."""
    b, d, n, L = 1, 8, 16, 512
    kw = make_inputs("input", False, False, b=b, d=d, n=n, L=L, dtype=torch.float32)
    kw = {k: v.requires_grad_() for k, v in kw.items()}
    saved = []

    def pack(x: Tensor) -> Tensor:
        saved.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        y = selective_scan_fn(**kw, backend="torch")
    y.sum().backward()
    assert sum(saved) < b * d * n * L / 2
    assert all(v.grad is not None for v in kw.values())


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_accumulates_in_float32(low):
    kw = make_inputs("input", False, True, L=300, d=8, n=4, dtype=torch.float32)
    kw = {k: (v.to(low) if isinstance(v, Tensor) else v) for k, v in kw.items()}
    y, h = selective_scan_fn(**kw, return_last_state=True)
    assert y.dtype == low and h.dtype == torch.float32
    ref = {k: (v.float() if isinstance(v, Tensor) else v) for k, v in kw.items()}
    y32, h32 = selective_scan_fn(**ref, return_last_state=True)
    # same rounded inputs, float32 arithmetic: the state agrees to float32 accuracy ...
    torch.testing.assert_close(h, h32, rtol=1e-5, atol=1e-5)
    # ... and y only differs by its final rounding to the low-precision dtype
    torch.testing.assert_close(y.float(), y32, rtol=1e-2, atol=1e-2)


# ----------------------------------------------------------------------------- validation


def _bad_cases():
    b, d, n, L = 2, 4, 3, 10
    return [
        (dict(u=torch.randn(b, d)), ValueError, "u:"),
        (dict(u=torch.ones(b, d, L, dtype=torch.long)), TypeError, "u:"),
        (dict(u=[[0.0]]), TypeError, "u:"),
        (dict(delta=torch.randn(b, d, L + 1)), ValueError, "delta:"),
        (dict(delta=torch.ones(b, d, L, dtype=torch.int32)), TypeError, "delta:"),
        (dict(A=torch.randn(d + 1, n)), ValueError, "A:"),
        (dict(A=torch.ones(d, n, dtype=torch.long)), TypeError, "A:"),
        (dict(B=torch.randn(3, 4)), ValueError, "B: expected (d, n)=(4, 3), (b, n, L)=(2, 3, 10)"),
        (dict(B=torch.randn(b, 3, n, L)), ValueError, "B: expected (b, g, n, L) with g dividing"),
        (dict(C=torch.randn(b, n, L + 1)), ValueError, "C:"),
        (dict(C=torch.randn(d, n, dtype=torch.complex64)), TypeError, "C:"),
        (dict(D=torch.randn(d + 1)), ValueError, "D:"),
        (dict(z=torch.randn(b, d)), ValueError, "z:"),
        (dict(delta_bias=torch.randn(1, d)), ValueError, "delta_bias:"),
        (dict(deltaA=torch.randn(b, d, L - 1)), ValueError, "deltaA:"),
        (dict(initial_state=torch.randn(b, d, n + 1)), ValueError, "initial_state:"),
        (
            dict(initial_state=torch.randn(b, d, n, dtype=torch.complex64)),
            TypeError,
            "initial_state",
        ),
        (dict(discretization="euler"), ValueError, "discretization: expected one of ['mamba'"),
        (dict(backend="nope"), ValueError, "backend:"),
    ]


@pytest.mark.parametrize("bad,exc,msg", _bad_cases())
def test_bad_inputs(bad, exc, msg):
    kw = make_inputs("input", False, False, L=10, dtype=torch.float32)
    kw.update(bad)
    with pytest.raises(exc) as info:
        selective_scan_fn(**kw)
    assert msg in str(info.value)


def test_mamba_ssm_layout_of_complex_input_dependent_B_and_C():
    """mamba_ssm passes the input-dependent B, C of a complex A as real (b, n, 2L) or
    (b, g, n, 2L) tensors, real and imaginary parts interleaved along time: accepted, equal to
    the complex (b, n, L) form, gradients included."""
    from _tol import assert_close_rel

    torch.manual_seed(0)
    u, dt = torch.randn(2, 4, 9, dtype=torch.float64), torch.rand(2, 4, 9, dtype=torch.float64)
    A = torch.complex(
        -torch.rand(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    )
    for shape in ((2, 3, 18), (2, 2, 3, 18)):
        B2 = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        C2 = torch.randn(shape, dtype=torch.float64)
        y = selective_scan_fn(u, dt, A, B2, C2, delta_softplus=True)
        Bc = torch.view_as_complex(B2.detach().unflatten(-1, (9, 2))).requires_grad_()
        Cc = torch.view_as_complex(C2.unflatten(-1, (9, 2)))
        expect = selective_scan_fn(u, dt, A, Bc, Cc, delta_softplus=True, backend="reference")
        assert_close_rel(y, expect, dtype=torch.float64, length=9)
        (g2,) = torch.autograd.grad(y.square().sum(), B2)
        (gc,) = torch.autograd.grad(expect.square().sum(), Bc)
        assert_close_rel(g2, torch.view_as_real(gc).flatten(-2), dtype=torch.float64, length=9)
    with pytest.raises(TypeError, match="^delta_softplus: expected a bool"):
        selective_scan_fn(u, dt, A, Bc.detach(), Cc, None, None, None, torch.ones(2))
    with pytest.raises(TypeError, match="^return_last_state: expected a bool"):
        selective_scan_fn(u, dt, A, Bc.detach(), Cc, return_last_state=torch.ones(2))


def test_selective_scan_ref_is_the_reference_backend():
    """mamba_ssm's name for its reference: the reference backend, with every other argument
    passed through (z, D, delta_bias, softplus, the last state, initial_state)."""
    from lrnnx.ops.selective_scan import selective_scan_ref

    torch.manual_seed(0)
    b, d, n, L = 2, 4, 3, 9
    f64 = dict(dtype=torch.float64)
    u, delta, z = (
        torch.randn(b, d, L, **f64),
        torch.randn(b, d, L, **f64),
        torch.randn(b, d, L, **f64),
    )
    A, D, bias = -torch.rand(d, n, **f64), torch.randn(d, **f64), torch.randn(d, **f64)
    B, C, h0 = torch.randn(b, n, L, **f64), torch.randn(b, n, L, **f64), torch.randn(b, d, n, **f64)
    kw = dict(D=D, z=z, delta_bias=bias, delta_softplus=True, return_last_state=True)
    y, h = selective_scan_ref(u, delta, A, B, C, initial_state=h0, **kw)
    y2, h2 = selective_scan_fn(u, delta, A, B, C, initial_state=h0, backend="reference", **kw)
    assert torch.equal(y, y2) and torch.equal(h, h2)
    with pytest.raises(TypeError, match="backend"):
        selective_scan_ref(u, delta, A, B, C, backend="torch")
    y3, h3 = selective_scan_ref(u, delta, A, B, C, output_final_state=True)  # fla's name
    y4, h4 = selective_scan_fn(u, delta, A, B, C, output_final_state=True, backend="reference")
    assert torch.equal(y3, y4) and torch.equal(h3, h4)
