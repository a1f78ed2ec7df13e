"""Discretization rules, causal convolution, HiPPO init and input checks."""

import math

import pytest
import torch

from lrnnx.core import DISCRETIZATIONS, causal_conv, get_discretization
from lrnnx.core.checks import check_sequence, check_timesteps, lengths_mask
from lrnnx.core.hippo import dplr_hippo_legs, hippo_legs

torch.manual_seed(0)


def _stable_eigs(n=64):
    return torch.complex(
        -torch.rand(n, dtype=torch.float64) * 5 - 1e-3, torch.randn(n, dtype=torch.float64) * 20
    )


@pytest.mark.parametrize("name", ["zoh", "bilinear", "dirac", "async"])
def test_stable_rules_map_left_half_plane_into_unit_disc(name):
    A = _stable_eigs()
    delta = torch.rand(64, dtype=torch.float64) * 10 + 1e-4
    A_bar, _ = DISCRETIZATIONS[name](A, delta)
    assert bool((A_bar.abs() < 1).all())


def test_bilinear_is_the_tustin_transform():
    # Tustin maps the whole left half plane into the disc, and s = 0 to z = 1; check one value by hand
    A = torch.tensor([-2.0 + 1.0j], dtype=torch.complex128)
    d = torch.tensor([0.5], dtype=torch.float64)
    A_bar, gamma = DISCRETIZATIONS["bilinear"](A, d)
    expect = (1 + 0.25 * A) / (1 - 0.25 * A)
    assert torch.allclose(A_bar, expect) and torch.allclose(gamma, 0.5 / (1 - 0.25 * A))


def test_zoh_integrates_a_held_input_exactly():
    # with u held constant over one step, x(delta) = e^{A delta} x0 + (e^{A delta} - 1)/A u
    A = torch.tensor([-0.7 + 2.0j], dtype=torch.complex128)
    d = torch.tensor([0.3], dtype=torch.float64)
    A_bar, gamma = DISCRETIZATIONS["zoh"](A, d)
    # integrate dx/dt = A x + 1 from x0 = 1 with n tiny Euler steps (closed form of the product)
    n = 200000
    g = 1 + A * (0.3 / n)
    x = g**n + (g**n - 1) / A
    assert torch.allclose(A_bar + gamma, x, atol=1e-5)


def test_zoh_is_accurate_for_tiny_eigenvalues():
    A = torch.tensor([-1e-9 + 0j], dtype=torch.complex128)
    _, gamma = DISCRETIZATIONS["zoh"](A, torch.tensor([0.1], dtype=torch.float64))
    assert torch.allclose(gamma.real, torch.tensor([0.1], dtype=torch.float64), rtol=1e-8)


def test_async_with_unit_timesteps_is_zoh():
    A = _stable_eigs(8)
    d = torch.rand(8, dtype=torch.float64)
    za, zg = DISCRETIZATIONS["zoh"](A, d)
    aa, ag = DISCRETIZATIONS["async"](A, d, torch.ones(8, dtype=torch.float64))
    assert torch.allclose(za, aa) and torch.allclose(zg, ag)
    # a longer gap decays the state further but integrates the input the same
    aa2, ag2 = DISCRETIZATIONS["async"](A, d, torch.full((8,), 3.0, dtype=torch.float64))
    assert torch.allclose(aa2, za**3) and torch.allclose(ag2, zg)


def test_unknown_discretization_is_refused():
    with pytest.raises(ValueError, match="discretization"):
        get_discretization("euler")


@pytest.mark.parametrize("L", [1, 7, 32, 33, 100, 1000])
@pytest.mark.parametrize("complex_", [False, True])
def test_causal_conv_matches_direct_sum(L, complex_):
    dt = torch.complex128 if complex_ else torch.float64
    u, k = torch.randn(3, 2, L, dtype=dt), torch.randn(2, L, dtype=dt)
    # y_t = sum_{s <= t} k_s u_{t-s} as a product with the lower-triangular Toeplitz matrix of k
    lag = torch.arange(L)[:, None] - torch.arange(L)[None, :]  # t - j
    T = torch.where(lag >= 0, k[:, lag.clamp(min=0)], torch.zeros((), dtype=dt))  # (2, t, j)
    expect = torch.einsum("ctj,bcj->bct", T, u)
    for method in ("fft", "direct", "auto"):
        assert torch.allclose(causal_conv(u, k, method=method), expect, atol=1e-9)


@pytest.mark.parametrize(
    "u_shape, k_shape",
    [
        ((3, 1, 5, 40), (2, 5, 40)),
        ((4, 6, 50), (6, 17)),
        ((2, 3, 64), (3, 64)),
        ((33,), (33,)),
        ((1, 6, 50), (4, 6, 50)),
        ((5, 2, 1, 30), (1, 3, 30)),
    ],
)
@pytest.mark.parametrize("chunk", [None, 1, 70])
def test_real_fft_conv_gradients(u_shape, k_shape, chunk, monkeypatch):
    """The real-FFT backward (correlations, broadcast axes summed in the frequency domain):
    gradcheck in float64, and the same gradients as torch's autograd of the FFT formula;
    ``chunk``: dk's batch sum in slices of one or a few batch entries (as at large shapes)."""
    from lrnnx.core import fftconv
    from lrnnx.core.fftconv import RealFFTConv, fft_length

    if chunk is not None:
        monkeypatch.setattr(fftconv, "SPECTRUM_CHUNK", chunk)
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(*u_shape, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(*k_shape, dtype=torch.float64, generator=gen, requires_grad=True)
    L, Lk = u_shape[-1], k_shape[-1]
    n = fft_length(L + Lk - 1) if Lk < L else fft_length(2 * L)
    assert torch.autograd.gradcheck(lambda u, k: RealFFTConv.apply(u, k, n, L), (u, k))
    y = causal_conv(u, k, method="fft")
    plain = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :L]
    g = torch.randn(y.shape, dtype=y.dtype, generator=gen)
    got = torch.autograd.grad(y, (u, k), g)
    want = torch.autograd.grad(plain, (u, k), g)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-12 * b.abs().max().item())


def test_bit_length_and_fft_length():
    """fftconv's bit_length (a loop Dynamo 2.4 traces) is int.bit_length; fft_length is the
    smallest 2^a 3^b 5^c at or above its argument."""
    from lrnnx.core.fftconv import bit_length, fft_length

    for n in [*range(300), 2**40 - 1, 2**40, 2**40 + 1]:
        assert bit_length(n) == n.bit_length()
    smooth = [n for n in range(1, 400) if _only_235(n)]
    for n in range(1, 300):
        assert fft_length(n) == min(m for m in smooth if m >= n)


def _only_235(n: int) -> bool:
    for p in (2, 3, 5):
        while n % p == 0:
            n //= p
    return n == 1


def test_real_fft_conv_second_derivatives():
    """Asked for a graph of its gradients (create_graph=True), the real-FFT convolution's
    backward differentiates the plain FFT formula: gradgradcheck in float64."""
    from lrnnx.core.fftconv import RealFFTConv

    gen = torch.Generator().manual_seed(0)
    u = torch.randn(2, 3, 40, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(3, 40, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda u, k: RealFFTConv.apply(u, k, 80, 40), (u, k))


@pytest.mark.parametrize("method", ["fft", "direct", "auto"])
def test_causal_conv_empty_inputs(method):
    for u, k in (
        (torch.randn(0, 40), torch.randn(40)),
        (torch.randn(3, 0), torch.randn(3, 0)),
        (torch.randn(1, 40), torch.randn(0, 40)),
    ):
        y = causal_conv(u, k, method=method)
        assert y.shape == torch.broadcast_shapes(u.shape[:-1], k.shape[:-1]) + (u.shape[-1],)


def test_causal_conv_bad_arguments():
    u = torch.randn(2, 3, 40)
    with pytest.raises(ValueError, match="k: expected leading axes that broadcast"):
        causal_conv(u, torch.randn(4, 40))
    with pytest.raises(TypeError, match="u: expected a torch.Tensor"):
        causal_conv(u.tolist(), torch.randn(40))
    with pytest.raises(TypeError, match="u: expected a floating-point or complex tensor"):
        causal_conv(torch.ones(2, 40, dtype=torch.int64), torch.randn(40))
    with pytest.raises(ValueError, match="k: expected a tensor on u's device"):
        causal_conv(u, torch.randn(40, device="meta"))
    with pytest.raises(ValueError, match="at least one axis"):
        causal_conv(torch.tensor(1.0), torch.randn(40))


def test_causal_conv_does_not_wrap_around():
    L = 64
    u = torch.zeros(L, dtype=torch.float64)
    u[-1] = 1.0
    y = causal_conv(u, torch.ones(L, dtype=torch.float64), method="fft")
    assert torch.allclose(y[:-1], torch.zeros(L - 1, dtype=torch.float64), atol=1e-12)


def test_hippo_dplr_reconstructs_legs():
    N = 16
    A, _ = hippo_legs(N)
    Lambda, V, P, _ = dplr_hippo_legs(N)
    rebuilt = V @ torch.diag(Lambda) @ V.conj().T - torch.outer(P, P)
    assert torch.allclose(rebuilt.real, torch.from_numpy(A), atol=1e-10)
    assert torch.allclose(Lambda.real, torch.full((N,), -0.5, dtype=torch.float64))
    assert torch.allclose(V.conj().T @ V, torch.eye(N, dtype=torch.complex128), atol=1e-10)


def test_checks_name_the_argument():
    with pytest.raises(ValueError, match=r"x: expected shape \(B, L, 4\)"):
        check_sequence(torch.randn(2, 3), 4)
    with pytest.raises(ValueError, match="x: expected shape"):
        check_sequence(torch.randn(2, 3, 5), 4)
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        check_sequence(torch.ones(2, 3, 4, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="lengths"):
        lengths_mask(torch.tensor([1, 9]), 2, 8)
    with pytest.raises(TypeError, match="lengths"):
        lengths_mask(torch.tensor([1.0, 2.0]), 2, 8)
    with pytest.raises(ValueError, match="integration_timesteps"):
        check_timesteps(-torch.ones(2, 8), 2, 8)
    with pytest.raises(ValueError, match="integration_timesteps"):
        check_timesteps(torch.ones(2, 7), 2, 8)
    mask = lengths_mask(torch.tensor([0, 3]), 2, 4)
    assert mask.tolist() == [[False] * 4, [True, True, True, False]]
    assert math.isclose(float(mask.float().sum()), 3.0)


@pytest.mark.parametrize("name", ["zoh", "bilinear", "dirac", "simplified_zoh"])
def test_rules_with_timesteps_step_over_delta_times_dt(name):
    """integration_timesteps dt_k make every rule but async discretize over delta * dt_k, the
    broadcast (B, L, P) the event models use; no_discretization refuses them."""
    rule = get_discretization(name)
    A = torch.tensor([-0.5 + 3j, -2.0 + 0.5j], dtype=torch.complex128)
    delta = torch.tensor([0.1, 0.3], dtype=torch.float64)
    dt = torch.tensor([[2.0], [5.0], [0.0]], dtype=torch.float64)  # (L, 1)
    A_bar, gamma = rule(A, delta, integration_timesteps=dt)
    A_ref, gamma_ref = rule(A, delta * dt)
    assert A_bar.shape == (3, 2)
    torch.testing.assert_close(A_bar, A_ref, rtol=1e-14, atol=0)
    if isinstance(gamma_ref, float):
        assert gamma == gamma_ref
    else:
        torch.testing.assert_close(gamma, gamma_ref, rtol=1e-14, atol=0)
    torch.testing.assert_close(A_bar[2], torch.ones(2, dtype=A_bar.dtype))  # no time, no decay
    with pytest.raises(ValueError, match="integration_timesteps: 'no_discretization'"):
        get_discretization("no_discretization")(A, delta, integration_timesteps=dt)
