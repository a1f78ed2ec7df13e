"""Mamba / S6 block against a float64 loop of the paper's equations, plus event mode and caches."""

import copy

import pytest
import torch
import torch.nn.functional as F

from _tol import assert_close_rel
from lrnnx.models.ltv.mamba import Mamba

torch.manual_seed(0)
H, N = 8, 4
DISCS = ["mamba", "zoh", "bilinear", "dirac"]


def make(disc="mamba", **kw):
    torch.manual_seed(1)
    m = Mamba(H, d_state=N, d_conv=3, expand=2, discretization=disc, **kw)
    with torch.no_grad():  # break the arange symmetry of A so the test sees every state
        m.A_log.add_(0.3 * torch.randn_like(m.A_log))
        m.D.add_(torch.randn_like(m.D))
    return m


def paper_loop(m, x, ts=None):
    """The Mamba block in float64, one timestep at a time, straight from the equations.

    A float64 model is used as it is (not copied), so gradients reach its parameters."""
    if m.A_log.dtype != torch.float64:
        m = copy.deepcopy(m).double()
    x = x.double()
    Bsz, L, _ = x.shape
    E, K = m.d_inner, m.d_conv
    A = -torch.exp(m.A_log)
    W = m.conv1d.weight[:, 0, :]  # (E, K)
    hist = torch.zeros(Bsz, E, K)
    h = torch.zeros(Bsz, E, N, dtype=torch.float64)
    outs = []
    for t in range(L):
        xz = m.in_proj(x[:, t])
        xi, z = xz[:, :E], xz[:, E:]
        hist = torch.cat([hist[..., 1:].double(), xi[..., None]], -1)
        u = F.silu((hist * W).sum(-1) + m.conv1d.bias)
        dbc = m.x_proj(u)
        dt, Bt, Ct = dbc[:, : m.dt_rank], dbc[:, m.dt_rank : m.dt_rank + N], dbc[:, m.dt_rank + N :]
        delta = F.softplus(dt @ m.dt_proj.weight.T + m.dt_proj.bias)[..., None]  # (B, E, 1)
        dA = delta if ts is None else delta * ts[:, t, None, None].double()
        if m.discretization == "bilinear":
            A_bar = (1 + dA * A / 2) / (1 - dA * A / 2)
            g = delta / (1 - delta * A / 2)
        else:
            A_bar = torch.exp(dA * A)
            g = {
                "mamba": delta,
                "zoh": (torch.exp(delta * A) - 1) / A,
                "dirac": torch.ones_like(delta * A),
            }[m.discretization]
        h = A_bar * h + g * Bt[:, None, :] * u[..., None]
        y = (h * Ct[:, None, :]).sum(-1) + m.D * u
        outs.append(m.out_proj(y * F.silu(z)))
    return torch.stack(outs, 1), h


def step_all(m, x, cache, ts=None):
    ys = []
    for t in range(x.shape[1]):
        kw = {} if ts is None else {"integration_timesteps": ts[:, t]}
        ys.append(m.step(x[:, t : t + 1], cache, **kw)[0])
    return torch.cat(ys, 1)


@pytest.mark.parametrize("disc", DISCS)
def test_forward_matches_paper_loop(disc):
    m = make(disc)
    x = torch.randn(2, 70, H)
    ref, _ = paper_loop(m, x)
    assert torch.allclose(m(x).double(), ref, atol=1e-4, rtol=1e-3)
    assert torch.allclose(copy.deepcopy(m).double()(x.double()), ref, atol=1e-10)


@pytest.mark.parametrize("disc", DISCS)
def test_event_mode(disc):
    m = make(disc)
    x = torch.randn(2, 40, H)
    ones = torch.ones(2, 40)
    assert torch.allclose(m(x, integration_timesteps=ones), m(x), atol=1e-6)
    ts = torch.rand(2, 40) * 30  # long gaps: the state visibly decays between events
    ref, _ = paper_loop(m, x, ts)
    y = m(x, integration_timesteps=ts)
    assert torch.allclose(y.double(), ref, atol=1e-4, rtol=1e-3)
    with torch.no_grad():
        m.D.zero_()  # look at the state's contribution alone
    sync, event = m(x), m(x, integration_timesteps=ts)
    assert (event - sync).abs().max() > 0.05 * sync.abs().max()
    cache = m.allocate_inference_cache(2, 40)
    assert torch.allclose(step_all(m, x, cache, ts), event, atol=1e-6)


@pytest.mark.parametrize("disc", DISCS)
def test_step_and_prefill_match_forward(disc):
    m = make(disc)
    L = 2048 if disc == "mamba" else 200
    x = torch.randn(2, L, H)
    y = m(x)
    cache = m.allocate_inference_cache(2, L)
    assert torch.allclose(step_all(m, x, cache), y, atol=1e-4)
    cache = m.allocate_inference_cache(2, L)
    cut = L // 3
    y1 = m(x[:, :cut], inference_cache=cache)
    assert cache["seqlen_offset"] == cut
    y2 = step_all(m, x[:, cut : cut + 20], cache)
    y3 = m(x[:, cut + 20 :], inference_cache=cache)  # and forward again from the cache
    assert torch.allclose(torch.cat([y1, y2, y3], 1), y, atol=1e-4)


def test_lengths_do_not_leak():
    m = make()
    x = torch.randn(3, 30, H)
    lengths = torch.tensor([30, 11, 1])
    noisy = x.clone()
    noisy[1, 11:] = 1e3
    noisy[2, 1:] = -1e3
    cache = m.allocate_inference_cache(3, 30)
    y = m(noisy, lengths=lengths, inference_cache=cache)
    assert torch.all(y[1, 11:] == 0) and torch.all(y[2, 1:] == 0)
    for b, n in enumerate(lengths.tolist()):
        ref_cache = m.allocate_inference_cache(1, 30)
        ref = m(x[b : b + 1, :n], inference_cache=ref_cache)
        assert torch.allclose(y[b, :n], ref[0], atol=1e-5)
        assert torch.allclose(cache["lrnn_state"][b], ref_cache["lrnn_state"][0], atol=1e-5)
        assert torch.allclose(cache["conv_state"][b], ref_cache["conv_state"][0], atol=1e-6)


# every parameter's gradient against this file's float64 loop: test_gradients.py


def test_loads_mamba_ssm_state_dict():
    # the parameter names and shapes of mamba_ssm.modules.mamba_simple.Mamba(d_model=16)
    d, n, k, e, r = 16, 16, 4, 32, 1
    sd = {
        "A_log": torch.randn(e, n),
        "D": torch.randn(e),
        "in_proj.weight": torch.randn(2 * e, d),
        "conv1d.weight": torch.randn(e, 1, k),
        "conv1d.bias": torch.randn(e),
        "x_proj.weight": torch.randn(r + 2 * n, e),
        "dt_proj.weight": torch.randn(e, r),
        "dt_proj.bias": torch.randn(e),
        "out_proj.weight": torch.randn(d, e),
    }
    m = Mamba(d)
    m.load_state_dict(sd, strict=True)
    assert torch.equal(m.A_log, sd["A_log"])


def test_init_matches_the_paper():
    m = Mamba(32, d_state=8, dt_min=0.01, dt_max=0.05)
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 0.01 - 1e-6 and dt.max() <= 0.05 + 1e-6
    assert torch.allclose(-torch.exp(m.A_log), -torch.arange(1, 9.0).repeat(64, 1))


def test_bf16_autocast():
    m = make()
    x = torch.randn(2, 32, H)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert torch.isfinite(y).all()
    # the projections run in bf16 (a few roundings); the state in float32 (test_bf16.py checks
    # that a bf16 state would not pass)
    assert_close_rel(y, m(x), dtype=torch.bfloat16, factor=2)


def test_bad_inputs():
    m = make()
    with pytest.raises(ValueError, match="x: expected shape"):
        m(torch.randn(2, 5))
    with pytest.raises(ValueError, match="x: expected shape"):
        m(torch.randn(2, 5, H + 1))
    with pytest.raises(ValueError, match="integration_timesteps"):
        m(torch.randn(2, 5, H), integration_timesteps=-torch.ones(2, 5))
    with pytest.raises(ValueError, match="integration_timesteps"):
        m(torch.randn(2, 5, H), integration_timesteps=torch.ones(2, 4))
    with pytest.raises(ValueError, match="discretization"):
        Mamba(H, discretization="euler")
    with pytest.raises(ValueError, match="inference_cache"):
        m.step(torch.randn(3, H), m.allocate_inference_cache(2, 4))
