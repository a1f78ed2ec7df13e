"""S4 (DPLR) and S4D, checked against independent float64 loops of the papers' equations.

References written here: the dense DPLR matrix A = Lambda - P P^* (conjugate pairs expanded),
bilinear-discretised and powered (K_l = C dA^l dB); the diagonal S4D kernel by explicit powers for
each discretisation; the original HiPPO matrices (not their NPLR form) for the deterministic init.
"""

from __future__ import annotations

import contextlib
import logging
import math

import numpy as np
import pytest
import torch

from _tol import assert_close_rel, tol
from lrnnx.core.hippo import hippo_transition, nplr
from lrnnx.models.lti.s4 import S4
from lrnnx.models.lti.s4d import S4D, vandermonde
from lrnnx.ops import cauchy


@contextlib.contextmanager
def default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def make(cls, seed=0, **kw):
    """A float64 model (parameters created in float64, so no float32 rounding of the init)."""
    torch.manual_seed(seed)
    kw.setdefault("verbose", False)
    with default_dtype(torch.float64):
        return cls(**kw).eval()


def raw_params(m):
    """Lambda (H, N), P (R, H, N) or None, B (H, N), C (Ch, H, N), dt (H, N) from the raw
    parameters, for the default transforms (A_real -> -exp, A_imag -> -id, inv_dt -> exp).

    Attached to the parameters, so test_gradients.py differentiates the references below."""
    assert (m.real_transform, m.imag_transform, m.dt_transform) == ("exp", "none", "exp")
    assert not m.dt_fast
    rep = m.H // m.n_ssm
    c = (lambda t: t) if m.is_real else torch.view_as_complex
    lam = -torch.exp(m.A_real)
    if not m.is_real:
        lam = lam - 1j * m.A_imag
    lam = lam.repeat(rep, 1)
    P = c(m.P).repeat(1, rep, 1) if hasattr(m, "P") else None
    B = c(m.B).repeat(rep, 1)
    dt = torch.exp(m.inv_dt).expand(m.H, m.N)
    return lam, P, B, c(m.C), dt


def dense_dplr(m, C=None):
    """Full-state bilinear system of the DPLR matrix A = Lambda - P P^* (paper, section 3)."""
    lam, P, B, C0, dt = raw_params(m)
    C = C0 if C is None else C
    if not m.is_real:  # expand the kept half with its conjugates
        full = lambda t: torch.cat([t, t.conj()], -1)  # noqa: E731
        lam, P, B, C, dt = full(lam), full(P), full(B), full(C), torch.cat([dt, dt], -1)
    A = torch.diag_embed(lam) - torch.einsum("rhm,rhn->hmn", P, P.conj())
    eye = torch.eye(A.shape[-1], dtype=A.dtype)
    Dt = torch.diag_embed(dt.to(A.dtype))
    inv = torch.linalg.inv(eye - Dt @ A / 2)
    dA = inv @ (eye + Dt @ A / 2)
    dB = (inv @ Dt @ B[..., None])[..., 0]
    return dA, dB, C


def powered_kernel(dA, dB, C, L):
    """K_l = Re(C dA^l dB), l < L, by repeated multiplication."""
    x, out = dB, []
    for _ in range(L):
        out.append(torch.einsum("chn,hn->ch", C, x))
        x = torch.einsum("hmn,hn->hm", dA, x)
    return torch.stack(out, -1).real


def s4d_reference_kernel(m, L):
    """S4D kernel from explicit powers of each discretisation (S4D paper, section 3)."""
    lam, _, B, C, dt = raw_params(m)
    dtA = dt * lam
    if m.disc == "zoh":
        dA, dB = torch.exp(dtA), (torch.exp(dtA) - 1) / lam * B
    elif m.disc == "bilinear":
        dA, dB = (1 + dtA / 2) / (1 - dtA / 2), dt / (1 - dtA / 2) * B
    else:  # dirac
        dA, dB = torch.exp(dtA), B
    x, out = C * dB, []
    for _ in range(L):
        out.append(x.sum(-1))
        x = x * dA
    K = torch.stack(out, -1)
    return K.real if m.is_real else 2 * K.real


def run_steps(m, x):
    """Step through x (B, H, L) (transposed layout); returns (B, H_out, L) and the cache."""
    cache = m.allocate_inference_cache(x.shape[0])
    ys = []
    with torch.no_grad():
        for t in range(x.shape[-1]):
            y, cache = m.step(x[..., t], cache)
            ys.append(y)
    return torch.stack(ys, -1), cache


# ---------------------------------------------------------------------------------------------
# HiPPO NPLR forms


@pytest.mark.parametrize("measure,rank", [("legs", 1), ("legt", 2), ("fout", 1), ("legs", 2)])
@pytest.mark.parametrize("N", [4, 16])
def test_nplr_reconstructs_hippo(measure, rank, N):
    W, P, B, V = (t.numpy() for t in nplr(measure, N, rank))
    A, B0 = hippo_transition(measure, N)
    Vf = np.concatenate([V, V.conj()], 1)
    Wf, Bf = np.concatenate([W, W.conj()]), np.concatenate([B, B.conj()])
    Pf = np.concatenate([P, P.conj()], 1)
    np.testing.assert_allclose(Vf.conj().T @ Vf, np.eye(N), atol=1e-12)
    np.testing.assert_allclose(Vf @ (np.diag(Wf) - Pf.T @ Pf.conj()) @ Vf.conj().T, A, atol=1e-11)
    np.testing.assert_allclose(Vf @ Bf, B0, atol=1e-12)
    assert np.all(W.imag <= 1e-12)


def test_hippo_legt_is_the_lmu_matrix():
    # LMU (Voelker 2019): A_ij = (2i+1)(-1 if i < j else (-1)^(i-j+1)), B_i = (2i+1)(-1)^i;
    # S4's LegT is it in the basis diag((-1)^i / sqrt(2i+1)), halved
    N = 7
    i, j = np.meshgrid(np.arange(N), np.arange(N), indexing="ij")
    A_lmu = (2 * i + 1) * np.where(i < j, -1.0, (-1.0) ** (i - j + 1))
    B_lmu = (2 * np.arange(N) + 1) * (-1.0) ** np.arange(N)
    T = np.diag((-1.0) ** np.arange(N) / np.sqrt(2 * np.arange(N) + 1))
    A, B = hippo_transition("legt", N)
    np.testing.assert_allclose(A, 0.5 * T @ A_lmu @ np.linalg.inv(T), atol=1e-12)
    np.testing.assert_allclose(B, 0.5 * T @ B_lmu, atol=1e-12)


@pytest.mark.parametrize(
    "init,rank,atol", [("legs", 1, 1e-12), ("legt", 2, 1e-12), ("fout", 1, 1e-6)]
)
def test_s4_deterministic_init_is_the_hippo_system(init, rank, atol):
    # the whole NPLR pipeline: kernel of the original HiPPO (A, B) with output e_0, bilinear
    m = make(
        S4, d_model=3, d_state=8, init=init, rank=rank, deterministic=True, dt_min=0.01, dt_max=0.3
    )
    dt = m._dt().detach()[:, 0]
    np.testing.assert_allclose(dt.numpy(), np.geomspace(0.01, 0.3, 3), rtol=1e-12)
    L = 40
    K, _ = m.compute_kernel(L)
    A, B = (torch.tensor(t) for t in hippo_transition(init, 8))
    if init != "legs":  # Re(Lambda) = 0 is clamped to -1e-4, i.e. A - 1e-4 I
        A = A - 1e-4 * torch.eye(8)
    eye = torch.eye(8, dtype=torch.float64)
    for h in range(3):
        dA = torch.linalg.solve(eye - dt[h] / 2 * A, eye + dt[h] / 2 * A)
        x = torch.linalg.solve(eye - dt[h] / 2 * A, dt[h] * B)
        ref = []
        for _ in range(L):
            ref.append(x[0])
            x = dA @ x
        torch.testing.assert_close(K[0, h], torch.stack(ref), atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------
# kernels


S4_KERNEL_CASES = [
    dict(),
    dict(init="legt", rank=2),
    dict(init="fout"),
    dict(dt_tie=False),
    dict(is_real=True),
    dict(init="dplr-lin", rank=3, channels=2),
    dict(init="hippo", n_ssm=2),
]


@pytest.mark.parametrize(
    "kw", S4_KERNEL_CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "legs"
)
def test_s4_kernel_matches_dense_dplr_powers(kw):
    m = make(S4, d_model=4, d_state=8, dt_min=0.01, dt_max=0.5, **kw)
    C = raw_params(m)[3].clone()  # the true C, before the parameter turns into C~
    dA, dB, Cf = dense_dplr(m, C)
    L = 48
    with torch.no_grad():
        K, k_state = m.compute_kernel(L)
    assert K.shape == (m.channels, 4, L) and k_state is None
    torch.testing.assert_close(K, powered_kernel(dA, dB, Cf, L), atol=1e-12, rtol=0)
    # a longer request doubles the internal length: C~ <- C~ (I + dA^L); same system
    with torch.no_grad():
        K2, _ = m.compute_kernel(150)
    assert m.l_kernel == 192
    torch.testing.assert_close(K2, powered_kernel(dA, dB, Cf, 150), atol=1e-12, rtol=0)


#: S4D set-ups whose kernels are checked against powers of the discrete matrices (here) and
#: differentiated against them (test_gradients.py)
S4D_CONFIGS = [
    dict(init="legs"),
    dict(init="diag-lin", dt_tie=False),
    dict(init="diag-inv", channels=2),
    dict(init="diag-real", is_real=True),
]
S4D_CONFIG_IDS = ["legs", "lin-untied", "inv-channels", "real"]


@pytest.mark.parametrize("disc", ["zoh", "bilinear", "dirac"])
@pytest.mark.parametrize("kw", S4D_CONFIGS, ids=S4D_CONFIG_IDS)
def test_s4d_kernel_matches_powers(disc, kw):
    m = make(S4D, d_model=3, d_state=8, disc=disc, dt_min=0.01, dt_max=0.5, **kw)
    K, _ = m.compute_kernel(64)
    torch.testing.assert_close(K, s4d_reference_kernel(m, 64), atol=1e-11, rtol=1e-11)


def test_s4d_inits_follow_the_paper():
    N = 16
    lam = lambda m: raw_params(m)[0][0]  # noqa: E731
    n = torch.arange(N // 2, dtype=torch.float64)
    lin = lam(make(S4D, d_model=1, d_state=N, init="diag-lin"))
    torch.testing.assert_close(lin.real, torch.full_like(n, -0.5))
    torch.testing.assert_close(lin.imag[1:], -math.pi * n[1:])  # n = 0 is clamped to -1e-4
    inv = lam(make(S4D, d_model=1, d_state=N, init="diag-inv"))
    torch.testing.assert_close(inv.imag, -(N / math.pi) * (N / (2 * n + 1) - 1))
    real = lam(make(S4D, d_model=1, d_state=N, init="diag-real", is_real=True))
    torch.testing.assert_close(real, -(torch.arange(N, dtype=torch.float64) + 1))
    legs = lam(make(S4D, d_model=1, d_state=N, init="legs"))
    W = nplr("legs", N)[0]
    torch.testing.assert_close(legs, W)


def test_cauchy_and_vandermonde_chunks_agree_with_naive():
    torch.manual_seed(0)
    H, N, K = 3, 5, 37
    v = torch.randn(2, H, N, dtype=torch.complex128, requires_grad=True)
    w = torch.complex(
        -torch.rand(H, N, dtype=torch.float64) - 0.1, torch.randn(H, N, dtype=torch.float64)
    )
    w.requires_grad_(True)
    om = torch.exp(-2j * math.pi * torch.arange(K, dtype=torch.float64) / (2 * K - 2))
    a, b = 1 - om, (1 + om) / 2
    naive = (v[..., None] / (a - b * w[..., None])).sum(-2)
    naive = naive + (v.conj()[..., None] / (a - b * w.conj()[..., None])).sum(-2)
    whole = cauchy(v, w, a, b, conj=True, max_elements=10**9, backend="torch")
    chunked = cauchy(v, w, a, b, conj=True, max_elements=H * 2 * N * 4, backend="torch")
    torch.testing.assert_close(whole, naive)
    torch.testing.assert_close(chunked, naive)
    g_whole = torch.autograd.grad(whole.abs().sum(), (v, w))
    g_chunk = torch.autograd.grad(chunked.abs().sum(), (v, w))
    for g1, g2 in zip(g_whole, g_chunk, strict=True):
        torch.testing.assert_close(g1, g2)
    L = 41
    x = torch.log(torch.rand(H, N, dtype=torch.float64) * 0.9 + 0.05).to(torch.complex128)
    x = (x + 1j * torch.randn(H, N, dtype=torch.float64)).requires_grad_(True)
    ref = torch.stack([(v * torch.exp(t * x)).sum(-1) for t in range(L)], -1)
    out = vandermonde(v, x, L, max_elements=H * N * 3)
    torch.testing.assert_close(out, ref)
    g1 = torch.autograd.grad(out.real.sum(), (v, x))
    g2 = torch.autograd.grad(vandermonde(v, x, L, max_elements=10**9).real.sum(), (v, x))
    for a1, a2 in zip(g1, g2, strict=True):
        torch.testing.assert_close(a1, a2)


@pytest.mark.parametrize("L", [1, 2, 5, 1000, 2049])
def test_vandermonde_split_powers_equal_direct_exponentials(L):
    """exp(l x) = exp(r x) exp(q b x) (l = q b + r): the float64 result equals sum_n v exp(l x)
    with one exponential per step (to float64 rounding, relative to the magnitude), fast and
    slow decays and phases up to thousands of radians; float32 to float32 rounding."""
    gen = torch.Generator().manual_seed(L)
    H, N = 3, 6
    re = -torch.rand(H, N, generator=gen, dtype=torch.float64) * torch.logspace(-4, 0, N)
    x = torch.complex(re, 3 * torch.randn(H, N, generator=gen, dtype=torch.float64))
    v = torch.randn(2, H, N, generator=gen, dtype=torch.complex128)
    steps = torch.arange(L, dtype=torch.float64)
    ref = torch.einsum("chn,hnl->chl", v, torch.exp(x[..., None] * steps))
    assert_close_rel(vandermonde(v, x, L), ref, length=L)
    got32 = vandermonde(v.to(torch.complex64), x.to(torch.complex64), L)
    # a float32 exponent l x is off by up to |l x| eps32 whichever way it is formed (one
    # exponential per step too): the allowance grows with the largest |l x|, here ~10^4
    phase_err = 4 * torch.finfo(torch.float32).eps * L * x.abs().max().item()
    assert_close_rel(got32, ref, length=L, factor=max(1.0, phase_err / tol(torch.float32, L)))


def test_vandermonde_gradcheck():
    gen = torch.Generator().manual_seed(0)
    x = torch.complex(-torch.rand(2, 3, generator=gen, dtype=torch.float64) - 0.05,
                      torch.randn(2, 3, generator=gen, dtype=torch.float64))  # fmt: skip
    v = torch.randn(2, 3, generator=gen, dtype=torch.complex128)
    for L, budget in ((11, None), (11, 2 * 3 * 4)):  # whole, and chunks of 4 steps
        torch.autograd.gradcheck(
            lambda v, x, L=L, budget=budget: vandermonde(v, x, L, budget),
            (v.requires_grad_(), x.requires_grad_()),
        )


@pytest.mark.parametrize("cls", [S4, S4D])
def test_model_kernel_independent_of_chunk_budget(cls):
    m1, m2 = make(cls, d_model=3, d_state=8), make(cls, d_model=3, d_state=8)
    m2.kernel_max_elements = 40  # forces many chunks
    torch.testing.assert_close(m1.compute_kernel(100)[0], m2.compute_kernel(100)[0])


# ---------------------------------------------------------------------------------------------
# recurrent mode


@pytest.mark.parametrize(
    "cls,kw,L",
    [  # L = 4096: make test-slow
        pytest.param(S4, dict(), 4096, marks=pytest.mark.slow),
        pytest.param(S4D, dict(disc="zoh"), 4096, marks=pytest.mark.slow),
        (S4D, dict(disc="bilinear"), 1024),
        (S4D, dict(disc="dirac"), 1024),
        (S4, dict(is_real=True, init="legt", rank=2, channels=2), 512),
        (S4D, dict(is_real=True, init="diag-real", disc="bilinear"), 512),
    ],
    ids=["s4-4096", "s4d-zoh-4096", "s4d-bilinear", "s4d-dirac", "s4-real-legt", "s4d-real"],
)
def test_step_matches_forward(cls, kw, L):
    m = make(cls, d_model=2, d_state=8, **kw)
    x = torch.randn(2, 2, L, dtype=torch.float64)
    with torch.no_grad():
        y, state = m(x)
    assert state is None
    ys, _ = run_steps(m, x)
    torch.testing.assert_close(ys, y, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize(
    "cls,kw",
    [
        (S4, dict()),
        (S4, dict(is_real=True)),
        (S4D, dict(disc="bilinear")),
        (S4D, dict(bottleneck=2, gate=2)),
    ],
)
def test_state_passing_and_cache(cls, kw):
    m = make(cls, d_model=4, d_state=8, **kw)
    x = torch.randn(2, 4, 300, dtype=torch.float64)
    with torch.no_grad():
        m(x[..., :50])  # S4: the kernel is first attuned to L = 50, then doubled for L = 300
        y, _ = m(x)
        ys, cache = run_steps(m, x)
        torch.testing.assert_close(ys, y, atol=1e-9, rtol=1e-9)
        # explicit state: (y, next_state) chains like one pass, and the state is the stepped one
        s0 = m.default_state(2)
        assert s0.shape == (2, m.H, m.state_dim)
        y1, s1 = m(x[..., :137], state=s0)
        y2, s2 = m(x[..., 137:], state=s1)
        torch.testing.assert_close(torch.cat([y1, y2], -1), y, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(s2, cache["lrnn_state"], atol=1e-9, rtol=1e-9)
        # forward(prompt) into a cache, then step == forward(whole)
        c = m.allocate_inference_cache(2)
        yp, sp = m(x[..., :200], inference_cache=c)
        assert c["seqlen_offset"] == 200 and sp is c["lrnn_state"]
        rest = []
        for t in range(200, 300):
            yt, c = m.step(x[..., t], c)
            rest.append(yt)
        torch.testing.assert_close(
            torch.cat([yp, torch.stack(rest, -1)], -1), y, atol=1e-9, rtol=1e-9
        )


def test_state_gradients_flow_through_forward():
    m = make(S4, d_model=2, d_state=8)
    s0 = (m.default_state(1) + 0.1).requires_grad_(True)
    y, s1 = m(torch.randn(1, 2, 20, dtype=torch.float64), state=s0)
    (y.sum() + s1.abs().sum()).backward()
    assert s0.grad is not None and s0.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", [S4, S4D])
def test_lengths(cls):
    m = make(cls, d_model=3, d_state=8)
    x = torch.randn(2, 3, 64, dtype=torch.float64)
    lengths = torch.tensor([64, 23])
    garbage = x.clone()
    garbage[1, :, 23:] = 1e3
    c = m.allocate_inference_cache(2)
    with torch.no_grad():
        y, state = m(garbage, lengths=lengths, inference_cache=c)
        y_full, _ = m(x[:1])
        y_short, _ = m(x[1:, :, :23])
    assert torch.all(y[1, :, 23:] == 0)
    torch.testing.assert_close(y[0], y_full[0])
    torch.testing.assert_close(y[1, :, :23], y_short[0])
    # the final state is each sequence's state at its own length
    _, c_short = run_steps(m, x[1:, :, :23])
    _, c_full = run_steps(m, x[:1])
    torch.testing.assert_close(state[1], c_short["lrnn_state"][0])
    torch.testing.assert_close(state[0], c_full["lrnn_state"][0])
    # an int applies to the whole batch
    with torch.no_grad():
        y_int, _ = m(garbage, lengths=23)
    torch.testing.assert_close(y_int[1], y[1])


@pytest.mark.parametrize("cls", [S4, S4D])
def test_causal_and_time_invariant(cls):
    m = make(cls, d_model=3, d_state=8)
    x = torch.randn(2, 3, 200, dtype=torch.float64)
    with torch.no_grad():
        y, _ = m(x)
        x2 = x.clone()
        x2[..., 120:] = torch.randn(2, 3, 80, dtype=torch.float64)
        y2, _ = m(x2)
        shift = 37
        xs = torch.cat([torch.zeros(2, 3, shift, dtype=torch.float64), x[..., :-shift]], -1)
        ys, _ = m(xs)
    torch.testing.assert_close(y2[..., :120], y[..., :120], atol=1e-12, rtol=0)
    assert (y2[..., 120:] - y[..., 120:]).abs().max() > 1e-3
    torch.testing.assert_close(ys[..., shift:], y[..., :-shift], atol=1e-10, rtol=0)


def test_l_max_caps_the_kernel():
    m = make(S4, d_model=2, d_state=8, l_max=32)
    assert m.l_kernel == 32  # C~ attuned at construction
    x = torch.randn(1, 2, 80, dtype=torch.float64)
    with torch.no_grad(), pytest.warns(UserWarning, match="longer than l_max = 32"):
        y, _ = m(x)
    assert m.l_kernel == 32
    ys, _ = run_steps(m, x)
    torch.testing.assert_close(y[..., :32], ys[..., :32])  # beyond l_max the kernel is cut off
    assert (y[..., 32:] - ys[..., 32:]).abs().max() > 1e-6


def test_long_sequence_is_finite():
    torch.manual_seed(0)
    m = S4(d_model=2, d_state=16, verbose=False)
    with torch.no_grad():
        y, _ = m(torch.randn(1, 2, 16384))
    assert torch.isfinite(y).all()


# ---------------------------------------------------------------------------------------------
# block options


@pytest.mark.parametrize("cls", [S4, S4D])
def test_gradients_reach_every_parameter(cls):
    torch.manual_seed(0)
    m = cls(
        d_model=6,
        d_state=8,
        bottleneck=2,
        gate=2,
        channels=2,
        dropout=0.1,
        tie_dropout=True,
        dt_tie=False,
        verbose=False,
    )
    m.train()
    y, _ = m(torch.randn(2, 6, 40))
    y.square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("cls", [S4, S4D])
def test_transposed_layouts_agree(cls):
    m1 = make(cls, d_model=4, d_state=8, transposed=True, channels=2)
    m2 = make(cls, seed=1, d_model=4, d_state=8, transposed=False, channels=2)
    m2.load_state_dict(m1.state_dict())
    x = torch.randn(2, 4, 33, dtype=torch.float64)
    with torch.no_grad():
        y1, _ = m1(x)
        y2, _ = m2(x.transpose(1, 2))
    torch.testing.assert_close(y2.transpose(1, 2), y1)


@pytest.mark.parametrize("cls", [S4, S4D])
@pytest.mark.parametrize(
    "kw,d_out",
    [
        (dict(channels=3, final_act=None), 24),
        (dict(channels=3), 8),
        (dict(n_ssm=2), 8),
        (dict(n_ssm=2, init="diag"), 8),
        (dict(init="hippo", n_ssm=4), 8),
        (dict(bottleneck=4), 8),
        (dict(gate=3, final_act="gelu"), 8),
        (dict(bottleneck=2, gate=2, channels=2, final_act=None), 8),
        (dict(bottleneck=2, channels=2, final_act=None), 8),
        (dict(transposed=False, final_act="id"), 8),
    ],
)
def test_block_shapes(cls, kw, d_out):
    m = make(cls, d_model=8, d_state=8, **kw)
    assert m.d_output == d_out
    x = torch.randn(2, 8, 20, dtype=torch.float64)
    if not m.transposed:
        x = x.transpose(1, 2)
    with torch.no_grad():
        y, _ = m(x)
    assert y.shape == ((2, d_out, 20) if m.transposed else (2, 20, d_out))
    ys, cache = run_steps(m, x if m.transposed else x.transpose(1, 2))
    assert ys.shape == (2, d_out, 20)
    torch.testing.assert_close(ys, y if m.transposed else y.transpose(1, 2), atol=1e-9, rtol=1e-9)


def test_optimizer_hints():
    m = S4(d_model=4, d_state=8, lr=1e-3, wd=0.0, verbose=False)
    for name in ("inv_dt", "A_real", "A_imag", "B", "P"):
        assert getattr(m, name)._optim == {"lr": 1e-3, "weight_decay": 0.0}, name
    assert "lr" not in getattr(m.C, "_optim", {})
    assert not hasattr(m.D, "_optim")
    m = S4D(d_model=4, d_state=8, verbose=False)  # default: no lr hint, no weight decay on A, B, dt
    for name in ("inv_dt", "A_real", "A_imag", "B"):
        assert getattr(m, name)._optim == {"weight_decay": 0.0}, name
    m = S4D(d_model=4, d_state=8, lr={"dt": 0.01, "C": 0.5}, wd={"A": 0.1}, verbose=False)
    assert m.inv_dt._optim == {"lr": 0.01} and m.C._optim == {"lr": 0.5}
    assert m.A_real._optim == {"weight_decay": 0.1}
    m = S4(d_model=4, d_state=8, lr=0.0, verbose=False)  # lr 0: frozen buffers
    names = dict(m.named_parameters())
    assert "A_real" not in names and "P" not in names and "C" in names
    assert "A_real" in dict(m.named_buffers())


@pytest.mark.parametrize("transform", ["exp", "softplus", "sigmoid", "relu", "none"])
@pytest.mark.parametrize("dt_fast,dt_tie", [(False, True), (True, False)])
def test_dt_init_and_transforms(transform, dt_fast, dt_tie):
    m = make(
        S4D,
        d_model=16,
        d_state=8,
        dt_transform=transform,
        dt_fast=dt_fast,
        dt_tie=dt_tie,
        real_transform=transform if transform != "none" else "exp",
        imag_transform="softplus",
        dt_min=0.002,
        dt_max=0.05,
    )
    dt = m._dt()
    assert dt.shape == ((16, 1) if dt_tie else (16, 4))
    slack = 1e-4 if transform == "relu" else 1e-12  # relu adds 1e-4 to keep dt > 0
    assert dt.min() >= 0.002 - 1e-12 and dt.max() <= 0.05 + slack
    A = m._A_diag()
    assert torch.all(A.real < 0)
    K, _ = m.compute_kernel(32)
    torch.testing.assert_close(K, _kernel_from(m._dt(), A, m, 32))


def _kernel_from(dt, A, m, L):
    dA, dB = torch.exp(dt * A), (torch.exp(dt * A) - 1) / A * m._B()
    powers = dA[..., None] ** torch.arange(L, dtype=torch.float64)
    return 2 * torch.einsum("chn,hnl->chl", m._C() * dB, powers).real


def test_verbose_logging(caplog):
    with caplog.at_level(logging.INFO, logger="lrnnx.models.lti._s4_block"):
        S4(d_model=2, d_state=4, verbose=False)
        assert not caplog.records
        S4(d_model=2, d_state=4, verbose=True, l_max=16)
    assert any("S4" in r.getMessage() for r in caplog.records)


def test_bf16_autocast_keeps_ssm_in_float32():
    torch.manual_seed(0)
    m = S4(d_model=4, d_state=8, verbose=False)
    x = torch.randn(2, 4, 64)
    with torch.no_grad():
        y32, _ = m(x)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            y16, _ = m(x)
    assert torch.isfinite(y16).all()
    # the block's linear layers run in bf16 (a few roundings); the kernel and the convolution
    # in float32
    assert_close_rel(y16, y32, dtype=torch.bfloat16, factor=2)


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("cls", [S4, S4D])
def test_bad_inputs_raise(cls):
    m = cls(d_model=4, d_state=8, verbose=False)
    with pytest.raises(ValueError, match="d_model = 4"):
        m(torch.randn(2, 5, 10))
    with pytest.raises(ValueError, match="x: expected shape"):
        m(torch.randn(2, 4))
    with pytest.raises(TypeError, match="floating"):
        m(torch.ones(2, 4, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="lengths"):
        m(torch.randn(2, 4, 10), lengths=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="lengths"):
        m(torch.randn(2, 4, 10), lengths=11)
    with pytest.raises(ValueError, match="state: expected shape"):
        m(torch.randn(2, 4, 10), state=torch.zeros(2, 4, 3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="complex"):
        m(torch.randn(2, 4, 10), state=torch.zeros(2, 4, m.state_dim))
    cache = m.allocate_inference_cache(2)
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        m.step(torch.randn(2, 5), cache)
    with pytest.raises(ValueError, match=r"lrnn_state"):
        m.step(torch.randn(3, 4), cache)
    m_bl = cls(d_model=4, d_state=8, transposed=False, verbose=False)
    with pytest.raises(ValueError, match=r"\(B, L, H\)"):
        m_bl(torch.randn(2, 4, 10))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(n_ssm=3), "n_ssm"),
        (dict(n_ssm=1, init="diag"), "n_ssm"),  # 'diag' splits the SSMs between two inits
        (dict(d_state=7), "d_state"),
        (dict(init="nope"), "init"),
        (dict(dropout=1.5), "dropout"),
        (dict(final_act="bogus"), "final_act"),
        (dict(dt_min=0.1, dt_max=0.01), "dt_min"),
        (dict(dt_transform="bogus"), "dt_transform"),
        (dict(bottleneck=8), "bottleneck"),
        (dict(channels=0), "channels"),
    ],
)
@pytest.mark.parametrize("cls", [S4, S4D])
def test_bad_arguments_raise(cls, kw, match):
    with pytest.raises(ValueError, match=match):
        cls(**{"d_model": 4, "d_state": 8, "verbose": False, **kw})


def test_model_specific_arguments_raise():
    with pytest.raises(ValueError, match="rank"):
        S4(d_model=4, d_state=8, init="legt", rank=1, verbose=False)
    with pytest.raises(ValueError, match="disc"):
        S4D(d_model=4, d_state=8, disc="async", verbose=False)
    S4D(d_model=4, d_state=8, init="legt", verbose=False)  # S4D drops the low-rank term


@pytest.mark.parametrize("cls", [S4, S4D])
def test_l_max_cuts_the_kernel_and_says_so(cls):
    """An input longer than l_max is convolved with the kernel cut at l_max taps (state-spaces'
    FFTConv): equal to stepping up to step l_max, forgetting older inputs after it, with a
    UserWarning once per module; the constructor's sigmoid transforms and flags are checked."""
    torch.manual_seed(0)
    model = cls(3, d_state=4, l_max=4, transposed=False).double().eval()
    x = torch.randn(1, 12, 3, dtype=torch.float64)
    with pytest.warns(UserWarning, match="longer than l_max = 4"):
        y = model(x)[0]
    with torch.no_grad():
        cache = model.allocate_inference_cache(1, 1)
        ys = torch.stack([model.step(x[:, t], cache)[0] for t in range(12)], 1)
    assert_close_rel(y[:, :4], ys[:, :4], length=4)
    # output t sees inputs t - 3 .. t only: the input 8 steps back changes nothing
    x2 = x.clone()
    x2[:, 0] += 1.0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per module
        assert_close_rel(model(x2)[0][:, 8:], y[:, 8:], length=12)
    with pytest.raises(ValueError, match="real_transform: 'sigmoid'"):
        cls(3, d_state=4, init="diag-real", real_transform="sigmoid")
    with pytest.raises(TypeError, match="transposed: expected a bool"):
        cls(3, d_state=4, transposed="no")
    with pytest.raises(ValueError, match="lr"):
        cls(3, d_state=4, lr=-1.0)


def test_functional_call_leaves_the_callers_tensors_and_the_module_alone():
    """torch.func.functional_call puts the caller's tensors in the parameters' place: attuning
    C~ (which rewrites C in place at the first forward and when a longer input comes) must then
    happen out of place, for that call only."""
    import copy

    from torch.func import functional_call, grad

    torch.manual_seed(0)
    model = S4(8, d_state=8, transposed=False, verbose=False)
    fresh = copy.deepcopy(model)
    x = torch.randn(2, 16, 8)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    before = {k: v.clone() for k, v in params.items()}
    y = functional_call(model, params, (x,))[0]
    assert all(torch.equal(params[k], before[k]) for k in params), "the caller's tensors changed"
    assert model.l_kernel == 0 and torch.equal(model.C, fresh.C)
    assert_close_rel(y, fresh(x)[0], msg="functional_call")
    assert_close_rel(model(x)[0], fresh(x)[0], msg="the module afterwards")
    g = grad(lambda p: functional_call(model, p, (x,))[0].square().sum())(params)
    assert all(torch.equal(params[k], before[k]) for k in params) and set(g) == set(params)


def test_accumulated_gradient_over_a_longer_batch_is_with_respect_to_one_C():
    """A longer micro-batch while a gradient is pending (accumulation) attunes C~ out of place:
    its gradient is with respect to the C~ the first micro-batch used (finite differences of
    the parameter as it stands), and the parameter is not rewritten under the pending sum."""
    torch.manual_seed(0)
    model = S4(4, d_state=4, transposed=False, verbose=False).double()
    x = torch.randn(2, 24, 4, dtype=torch.float64)
    model(x[:, :8])[0].square().sum().backward()  # attunes C~ to 8, in place; a gradient pends
    assert model.l_kernel == 8
    C0, g0 = model.C.detach().clone(), model.C.grad.clone()
    loss = model(x)[0].square().sum()  # 24 > 8: attuned out of place
    loss.backward()
    assert model.l_kernel == 8 and torch.equal(model.C, C0)
    g_long = model.C.grad - g0
    v = torch.randn_like(C0)
    eps = 1e-6
    with torch.no_grad():
        model.C.copy_(C0 + eps * v)
        up = model(x)[0].square().sum()
        model.C.copy_(C0 - eps * v)
        down = model(x)[0].square().sum()
        model.C.copy_(C0)
    fd = float((up - down) / (2 * eps))
    assert math.isclose(float((g_long * v).sum()), fd, rel_tol=1e-6), (
        float((g_long * v).sum()),
        fd,
    )
    model.zero_grad()  # nothing pending: the next longer input re-attunes in place, once
    model(x)
    assert model.l_kernel == 32


def test_one_graph_over_a_short_and_a_longer_input_is_with_respect_to_one_C():
    """Two losses of different lengths summed in one graph (multi-resolution or multi-view
    losses): the longer forward runs while the first graph awaits its backward, so it attunes
    C~ out of place and the whole gradient is with respect to the C~ the first one used
    (finite differences of the parameter as it stands)."""
    torch.manual_seed(0)
    model = S4(4, d_state=4, transposed=False, verbose=False).double()
    x = torch.randn(2, 24, 4, dtype=torch.float64)

    def loss() -> torch.Tensor:
        return model(x[:, :8])[0].square().sum() + model(x)[0].square().sum()

    loss().backward()
    assert model.l_kernel == 8, "the longer forward rewrote C under the pending graph"
    C0, g = model.C.detach().clone(), model.C.grad.clone()
    v = torch.randn_like(C0)
    eps = 1e-6
    with torch.no_grad():
        model.C.copy_(C0 + eps * v)
        up = loss()
        model.C.copy_(C0 - eps * v)
        down = loss()
        model.C.copy_(C0)
    fd = float((up - down) / (2 * eps))
    assert math.isclose(float((g * v).sum()), fd, rel_tol=1e-6), (float((g * v).sum()), fd)
    model.zero_grad()  # the graph is spent: the next longer input re-attunes in place
    y = model(x)[0]
    assert model.l_kernel == 32
    longer = torch.zeros(1, 40, 4, dtype=torch.float64)
    with torch.no_grad():
        model(longer)  # y's graph is alive and may still be differentiated: out of place
    assert model.l_kernel == 32
    del y  # the graph is freed without a backward: nothing awaits
    with torch.no_grad():
        model(longer)
    assert model.l_kernel == 64


def test_state_dict_taken_before_a_forward_stays_matched():
    """A state_dict shares C with the module, as torch's do (in-place EMA updates through it
    rely on that), and shares its record of l_kernel too: a forward that attunes C in place
    after the state_dict was taken leaves the two matched (also with keep_vars); a deepcopy is
    a consistent snapshot."""
    import copy

    torch.manual_seed(0)
    model = S4(4, d_state=4, transposed=False, verbose=False).eval()
    x = torch.randn(1, 16, 4)
    sd, sd_vars = model.state_dict(), model.state_dict(keep_vars=True)
    snapshot = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model(x[:, :8])  # attunes the module's C to 8
        y = model(x)[0]  # and to 16
    assert model.l_kernel == 16 and int(sd["_extra_state"]) == 16
    assert sd["C"].data_ptr() == model.C.data_ptr() and int(snapshot["_extra_state"]) == 0
    for state, which in ((sd, "state_dict"), (sd_vars, "keep_vars"), (snapshot, "deepcopy")):
        loaded = S4(4, d_state=4, transposed=False, verbose=False).eval()
        loaded.load_state_dict(state)
        with torch.no_grad():
            assert_close_rel(loaded(x)[0], y, msg=which)
    loaded.l_kernel = 64  # a loaded module's record is its own
    assert model.l_kernel == 16


@pytest.mark.slow  # torch.compile (~5 s): make test-slow
def test_state_dict_taken_before_a_compiled_forward_stays_matched():
    """A compiled forward that attunes C in place writes the shared record too: a state_dict
    taken before it (a trainer's checkpoint dict) reloads into the model it was."""
    torch.manual_seed(0)
    model = S4(4, d_state=4, transposed=False, verbose=False).eval()
    x = torch.randn(1, 16, 4)
    sd = model.state_dict()
    with torch.no_grad():
        y = torch.compile(model, backend="eager")(x)[0]
    assert int(sd["_extra_state"]) == model.l_kernel == 16
    loaded = S4(4, d_state=4, transposed=False, verbose=False).eval()
    loaded.load_state_dict({k: v.clone() for k, v in sd.items()})
    with torch.no_grad():
        assert_close_rel(loaded(x)[0], y)


def test_a_module_pickled_with_the_dict_record_unpickles():
    """Modules pickled whole (torch.save(model)) while the record was {"l_kernel": n} get
    the tensor record when unpickled."""
    torch.manual_seed(0)
    model = S4(4, d_state=4, transposed=False, verbose=False).eval()
    x = torch.randn(1, 16, 4)
    with torch.no_grad():
        y = model(x)[0]
    state = {**model.__dict__, "_kernel_length": {"l_kernel": 16}}
    del state["_l_kernel"]
    old = S4.__new__(S4)
    old.__setstate__(state)
    assert old.l_kernel == 16 and int(old.state_dict()["_extra_state"]) == 16
    with torch.no_grad():
        assert_close_rel(old(x)[0], y)


def test_state_dict_is_a_dict_of_tensors(tmp_path):
    """S4's kernel length travels as a 0-d int64 tensor: the idioms that treat a state_dict as
    tensors work (a clone of every value, safetensors' save_file, an EMA loop over the values
    as timm's), each copy loading into a fresh S4 with the length its C is attuned to; the
    dict of earlier checkpoints and an averaged (float) value load too; a bad value is named."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = S4(4, d_state=4, transposed=False, verbose=False).eval()
    x = torch.randn(1, 24, 4)
    with torch.no_grad():
        y = model(x)[0]  # attunes C to 24
    sd = model.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    assert sd["_extra_state"].dtype == torch.int64 and int(sd["_extra_state"]) == 24
    cloned = {k: v.clone() for k, v in sd.items()}
    save_file(cloned, tmp_path / "s4.safetensors")
    ema = S4(4, d_state=4, transposed=False, verbose=False).eval()
    for e, v in zip(ema.state_dict().values(), sd.values(), strict=True):
        e.lerp_(v, 1.0) if e.is_floating_point() else e.copy_(v)  # timm's ModelEmaV3 update
    averaged = {k: (v + v) / 2 for k, v in sd.items()}  # a float l_kernel
    legacy = {**sd, "_extra_state": {"l_kernel": 24}}
    states = dict(cloned=cloned, file=load_file(tmp_path / "s4.safetensors"), averaged=averaged,
                  legacy=legacy)  # fmt: skip
    for which, state in states.items():
        loaded = S4(4, d_state=4, transposed=False, verbose=False).eval()
        loaded.load_state_dict(state)
        assert loaded.l_kernel == 24, which
        with torch.no_grad():
            assert_close_rel(loaded(x)[0], y, msg=which)
    assert ema.l_kernel == 24
    with torch.no_grad():
        assert_close_rel(ema(x)[0], y, msg="ema")
    for bad in (torch.tensor(-1), torch.tensor(float("nan")), torch.tensor([1, 2])):
        with pytest.raises(ValueError, match="S4 extra state"):
            S4(4, d_state=4, transposed=False).load_state_dict({**sd, "_extra_state": bad})


@pytest.mark.parametrize("cls", [S4, S4D])
def test_bare_state_step_after_inference_mode_backpropagates(cls):
    """step on a bare state reuses setup_step's matrices; those made under inference_mode are
    inference tensors, which autograd cannot save: leaving the mode recomputes them."""
    torch.manual_seed(0)
    model = cls(4, d_state=4, transposed=False, verbose=False).eval()
    state = model.default_state(2)
    with torch.inference_mode():
        model.step(torch.randn(2, 4), state)
    x = torch.randn(2, 4, requires_grad=True)
    y, _ = model.step(x, state)
    (g,) = torch.autograd.grad(y.sum(), x)
    fresh = cls(4, d_state=4, transposed=False, verbose=False).eval()
    fresh.load_state_dict(model.state_dict())
    x2 = x.detach().clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(fresh.step(x2, state)[0].sum(), x2)
    assert_close_rel(g, g2)


def test_threads_serving_one_model_attune_it_once():
    """Threads calling one eval S4 at a new length at once (a server): the in-place attuning
    of C~ happens once, every call gets the serial result and the model stays right after."""
    import copy
    import threading
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(0)
    base = S4(16, d_state=8, transposed=False, verbose=False).eval()
    with torch.no_grad():
        base(torch.randn(1, 32, 16))  # attuned to 32
    x = torch.randn(2, 80, 16)  # longer: C~ is doubled (twice) in place
    with torch.no_grad():
        want = copy.deepcopy(base)(x)[0]
    for _ in range(5):
        model, start = copy.deepcopy(base), threading.Barrier(4)

        def serve(x, model=model, start=start):
            start.wait()
            with torch.no_grad():
                return model(x)[0]

        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(serve, [x] * 4))
        assert model.l_kernel == 128
        for y in outs:
            assert_close_rel(y, want, length=80)
        with torch.no_grad():
            assert_close_rel(model(x)[0], want, length=80)


@pytest.mark.parametrize("cls", [S4, S4D])
def test_scan_mode_is_refused_not_ignored(cls):
    """S4/S4D convolve with their kernel whatever the mode: "scan" says so instead of running
    the FFT under another name."""
    model = cls(d_model=4, d_state=4, transposed=False)
    model.mode = "fft"
    with pytest.raises(ValueError, match="mode: expected one of \\['auto', 'fft'\\], got 'scan'"):
        model.mode = "scan"
    assert model.mode == "fft"


@contextlib.contextmanager
def _mid_attune_in_another_thread(model):
    """Runs the body while another thread's forward (length 100) attunes ``model``'s C~ in
    place, held between its rewrite of C and that of its length: the moment a reader or
    writer without the lock would mix them; the thread ends before the block is left."""
    import threading
    import time

    rewritten = threading.Event()
    original = S4._multiply_C

    def slow_multiply(self, L, sign):
        original(self, L, sign)
        rewritten.set()
        time.sleep(0.3)  # C is new, l_kernel not yet

    def long_forward():
        with torch.no_grad():
            model(torch.randn(1, 100, model.d_model))

    S4._multiply_C = slow_multiply
    try:
        worker = threading.Thread(target=long_forward)
        worker.start()
        assert rewritten.wait(30)
        yield
        worker.join()
    finally:
        S4._multiply_C = original


def test_a_cache_allocated_while_another_thread_attunes_computes_the_forward():
    """Threads serving one model: a cache (setup_step's matrices) made while another thread's
    forward attunes C~ in place reads C~ with its own length (one lock), never the new C~ with
    the old length.  The attuning thread is held between the rewrite of C and that of its
    length, the moment a reader without the lock would mix them."""
    torch.manual_seed(0)
    model = S4(8, d_state=4, transposed=False, verbose=False).eval()
    x = torch.randn(1, 12, 8)
    with torch.no_grad():
        ref = model(x)[0]  # attuned to 12
    with _mid_attune_in_another_thread(model):
        cache = model.allocate_inference_cache(1)
    assert model.l_kernel == 192
    with torch.no_grad():
        ys = torch.stack([model.step(x[:, t], cache)[0] for t in range(12)], 1)
    assert_close_rel(ys, ref, length=12)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork on this platform")
def test_a_child_forked_while_a_thread_holds_the_attune_lock_runs_s4():
    """A process forked while another thread is inside an S4 forward (holding the attuning
    lock) gets a lock of its own: its S4 forwards run instead of waiting forever."""
    import os
    import threading
    import time

    import lrnnx.models.lti.s4 as s4_module

    model = S4(8, d_state=4, transposed=False, verbose=False).eval()
    x = torch.randn(1, 12, 8)
    held, release = threading.Event(), threading.Event()

    def holder():
        with s4_module._ATTUNE_LOCK:
            held.set()
            release.wait(60)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert held.wait(30)
        pid = os.fork()
        if pid == 0:  # the child: torch's threads are not there either (see the README)
            code = 1
            try:
                torch.set_num_threads(1)
                with torch.no_grad():
                    code = 0 if torch.isfinite(model(x)[0]).all() else 1
            finally:
                os._exit(code)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child's S4 forward never returned")
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        release.set()
        thread.join()


def test_a_load_during_another_threads_attuning_keeps_the_loaded_model():
    """load_state_dict while another thread's forward attunes C~ in place: the load waits for
    the rewrite of C and of its length to end, so the model is the loaded one afterwards
    (never the loaded C with the other thread's new length)."""
    torch.manual_seed(0)
    model = S4(8, d_state=4, transposed=False, verbose=False).eval()
    x = torch.randn(1, 12, 8)
    with torch.no_grad():
        model(x)  # attuned to 12
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x)[0]
    with _mid_attune_in_another_thread(model):
        model.load_state_dict(saved)
    assert model.l_kernel == 12
    with torch.no_grad():
        assert_close_rel(model(x)[0], ref, length=12)
