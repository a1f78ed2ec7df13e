"""Event-driven S5 (Event-SSM) and S7 against float64 loops of the papers' equations."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from _tol import assert_close_rel
from lrnnx.core.hippo import dplr_hippo_legs
from lrnnx.models.ltv.s5 import S5
from lrnnx.models.ltv.s7 import S7

torch.manual_seed(0)
H, N = 5, 8
S5_DISC = ("zoh", "bilinear", "dirac", "async", "no_discretization")
S7_DISC = ("zoh", "bilinear", "dirac", "async")
CONFIGS = [("s5", d, c) for d in S5_DISC for c in (False, True)] + [
    ("s7", d, c) for d in S7_DISC for c in (False, True)
]
SMALL = [("s5", d, False) for d in S5_DISC] + [("s7", d, False) for d in S7_DISC]


def make(cfg, **kw):
    name, disc, conj = cfg
    if name == "s5":
        return S5(H, N, discretization=disc, conj_sym=conj, **kw)
    return S7(H, N, J=2, discretization=disc, conj_sym=conj, **kw)


def rand_timesteps(B, L):
    ts = torch.rand(B, L) * 3.0
    ts[:, ::7] = 0.0  # simultaneous events
    return ts


# ---------------------------------------------------------------------------------------------
# the papers' recurrences, written out in float64 independently of the model code


def _cplx(p):
    return torch.complex(p[..., 0].double(), p[..., 1].double())


def _rule(disc, lam, step, dt):
    """(A_bar, gamma_bar) of Event-SSM's rules for continuous Lambda, step and elapsed time dt."""
    if disc == "no_discretization":
        return torch.exp(lam * dt), torch.ones_like(lam)
    if disc == "async":  # decay over step * dt, input integrated over step
        return torch.exp(lam * step * dt), (torch.exp(lam * step) - 1) / lam
    d = step * dt
    if disc == "zoh":
        return torch.exp(lam * d), (torch.exp(lam * d) - 1) / lam
    if disc == "bilinear":
        return (1 + d * lam / 2) / (1 - d * lam / 2), d / (1 - d * lam / 2)
    return torch.exp(lam * d), torch.ones_like(lam)  # dirac


def s5_loop(m, x, ts=None, h=None):
    """h_k = A_bar_k h_{k-1} + gamma_bar_k B_tilde u_k,  y_k = Re(C h_k) + D u_k."""
    x = x.double()
    lam = torch.clamp(m.Lambda_re.double(), max=-1e-4) + 1j * m.Lambda_im.double()
    step = None
    if m.discretization != "no_discretization":
        step = m.step_rescale * torch.exp(m.log_step.double())
    Bt, C, D = _cplx(m.B), _cplx(m.C), m.D.double()
    scale = 2.0 if m.conj_sym else 1.0
    h = torch.zeros(x.shape[0], lam.shape[0], dtype=torch.complex128) if h is None else h
    ys = []
    for k in range(x.shape[1]):
        dt = (
            torch.ones(x.shape[0], 1, dtype=torch.float64)
            if ts is None
            else ts[:, k, None].double()
        )
        A, g = _rule(m.discretization, lam, step, dt)
        h = A * h + g * (x[:, k].to(h.dtype) @ Bt.T)
        ys.append(scale * (h @ C.T).real + D * x[:, k])
    return torch.stack(ys, 1), h


def s7_loop(m, x, ts=None, h=None):
    """S7: Delta_k = softplus(W_dt W_r u_k + b), Lambda = -1/(a w^2 + b) + i theta,
    x_k = A_bar_k x_{k-1} + gamma_bar_k B_k u_k,  y_k = Re(C_k x_k) + D_k u_k,
    B_k = B + W_B u_k, C_k = C + W_C u_k, D_k = D + W_D u_k."""
    x = x.double()
    w = m.Lambda_w.double()
    lam = -1.0 / (m.reparam_a * w**2 + m.reparam_b) + 1j * m.Lambda_im.double()
    B0, WB, C0, WC = _cplx(m.B), _cplx(m.B_proj), _cplx(m.C), _cplx(m.C_proj)
    D0, WD = m.D.double(), m.D_proj.double()
    Wr, Wdt, bdt = m.dt_down.weight.double(), m.dt_proj.weight.double(), m.dt_proj.bias.double()
    scale = 2.0 if m.conj_sym else 1.0
    h = torch.zeros(x.shape[0], lam.shape[0], dtype=torch.complex128) if h is None else h
    ys = []
    for k in range(x.shape[1]):
        u = x[:, k]
        dt = (
            torch.ones(x.shape[0], 1, dtype=torch.float64)
            if ts is None
            else ts[:, k, None].double()
        )
        step = m.step_rescale * F.softplus(u @ Wr.T @ Wdt.T + bdt)  # (B, P)
        A, g = _rule(m.discretization, lam, step, dt)
        Bk = B0 + torch.einsum("phi,bi->bph", WB, u.to(WB.dtype))
        Ck = C0 + torch.einsum("hpi,bi->bhp", WC, u.to(WC.dtype))
        Dk = D0 + u @ WD.T
        h = A * h + g * torch.einsum("bph,bh->bp", Bk, u.to(Bk.dtype))
        ys.append(scale * torch.einsum("bhp,bp->bh", Ck, h).real + Dk * u)
    return torch.stack(ys, 1), h


def paper_loop(m, x, ts=None, h=None):
    return (s5_loop if isinstance(m, S5) else s7_loop)(m, x, ts, h)


def step_all(m, x, ts=None, cache=None):
    cache = m.allocate_inference_cache(x.shape[0], x.shape[1]) if cache is None else cache
    ys = []
    for k in range(x.shape[1]):
        dt = None if ts is None else ts[:, k]
        ys.append(m.step(x[:, k : k + 1], cache, integration_timesteps=dt)[0])
    return torch.cat(ys, 1), cache


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("events", [False, True], ids=["sync", "events"])
def test_forward_matches_paper_loop(cfg, events):
    m = make(cfg)
    x = torch.randn(2, 40, H)
    ts = rand_timesteps(2, 40) if events else None
    ref, _ = paper_loop(m, x, ts)
    y = m(x, integration_timesteps=ts)
    assert_close_rel(y, ref, dtype=torch.float32, length=40)
    m64 = copy.deepcopy(m).double()
    y64 = m64(x.double(), integration_timesteps=None if ts is None else ts.double())
    assert y64.dtype == torch.float64
    assert torch.allclose(y64, ref, atol=1e-10, rtol=1e-10), (y64 - ref).abs().max()


@pytest.mark.parametrize("cfg", SMALL, ids=str)
def test_step_matches_forward(cfg):
    m = make(cfg)
    x, ts = torch.randn(3, 64, H), rand_timesteps(3, 64)
    for t in (None, ts):
        ys, cache = step_all(m, x, t)
        y = m(x, integration_timesteps=t)
        assert_close_rel(ys, y, length=64, msg="step vs forward")
        assert cache["seqlen_offset"] == 64
    # a (B, 1) timestep and a (B, H) input are accepted too
    cache = m.allocate_inference_cache(3, 1)
    y1, _ = m.step(x[:, 0], cache, integration_timesteps=ts[:, :1])
    assert y1.shape == (3, H)
    assert_close_rel(y1, m(x[:, :1], integration_timesteps=ts[:, :1])[:, 0], msg="one step")


@pytest.mark.slow  # a long sequence (L >= 2048) stepped token by token: make test-slow
@pytest.mark.parametrize("cfg", [("s5", "async", True), ("s7", "async", False)], ids=str)
def test_step_matches_forward_long(cfg):
    m = make(cfg)
    L = 2048
    x, ts = torch.randn(2, L, H), torch.rand(2, L) * 2
    ys, cache = step_all(m, x, ts)
    y = m(x, integration_timesteps=ts)
    assert torch.isfinite(y).all()
    assert torch.allclose(ys, y, atol=1e-3, rtol=1e-3), (ys - y).abs().max()
    # the cache's final state is the forward's final state
    fwd_cache = m.allocate_inference_cache(2, L)
    m(x, integration_timesteps=ts, inference_cache=fwd_cache)
    assert torch.allclose(fwd_cache["lrnn_state"], cache["lrnn_state"], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("cfg", SMALL, ids=str)
def test_prefill_then_steps_equals_forward(cfg):
    m = make(cfg)
    x, ts = torch.randn(2, 50, H), rand_timesteps(2, 50)
    full = m(x, integration_timesteps=ts)
    cache = m.allocate_inference_cache(2, 50)
    y_prompt = m(x[:, :30], integration_timesteps=ts[:, :30], inference_cache=cache)
    assert cache["seqlen_offset"] == 30
    # the prompt's final state is the paper loop's state after 30 elements
    _, h30 = paper_loop(m, x[:, :30], ts[:, :30])
    assert torch.allclose(cache["lrnn_state"].to(h30.dtype), h30, atol=1e-4, rtol=1e-4)
    y_rest, cache = step_all(m, x[:, 30:], ts[:, 30:], cache)
    assert_close_rel(torch.cat([y_prompt, y_rest], 1), full, length=50, msg="prefill + steps")
    # a second forward chunk continues from the cache as well
    cache = m.allocate_inference_cache(2, 50)
    m(x[:, :20], integration_timesteps=ts[:, :20], inference_cache=cache)
    y_mid = m(x[:, 20:], integration_timesteps=ts[:, 20:], inference_cache=cache)
    assert_close_rel(y_mid, full[:, 20:], length=50, msg="2nd chunk")
    assert cache["seqlen_offset"] == 50


@pytest.mark.parametrize("name", ["s5", "s7"])
def test_unit_timesteps_equal_synchronous_zoh(name):
    zoh = make((name, "zoh", False))
    x = torch.randn(2, 60, H)
    ones = torch.ones(2, 60)
    y_sync = zoh(x)
    for disc in ("async", "zoh"):
        ev = make((name, disc, False))
        ev.load_state_dict(zoh.state_dict())
        assert_close_rel(ev(x, integration_timesteps=ones), y_sync, length=60, msg=disc)
        assert_close_rel(ev(x), y_sync, length=60, msg=disc)
    # with irregular timesteps async and zoh are different models
    ev = make((name, "async", False))
    ev.load_state_dict(zoh.state_dict())
    ts = rand_timesteps(2, 60)
    assert not torch.allclose(ev(x, integration_timesteps=ts), zoh(x, integration_timesteps=ts))


@pytest.mark.parametrize("name", ["s5", "s7"])
def test_async_random_timesteps_match_loop_and_depend_on_time(name):
    m = make((name, "async", False)).double()
    x = torch.randn(2, 80, H, dtype=torch.float64)
    ts = torch.rand(2, 80, dtype=torch.float64) * 5
    ref, _ = paper_loop(m, x, ts)
    y = m(x, integration_timesteps=ts)
    assert torch.allclose(y, ref, atol=1e-10, rtol=1e-10)
    # a longer gap before element 40 changes outputs from 40 on, never before it
    ts2 = ts.clone()
    ts2[:, 40] += 3.0
    y2 = m(x, integration_timesteps=ts2)
    assert torch.equal(y2[:, :40], y[:, :40])
    assert not torch.allclose(y2[:, 40:], y[:, 40:])


@pytest.mark.parametrize("cfg", SMALL, ids=str)
def test_lengths_no_leakage(cfg):
    m = make(cfg)
    L, lengths = 30, torch.tensor([30, 17, 0])
    x, ts = torch.randn(3, L, H) * 3, rand_timesteps(3, L)
    cache = m.allocate_inference_cache(3, L)
    cache["lrnn_state"].copy_(torch.randn_like(cache["lrnn_state"]))  # nonzero incoming state
    h_in = cache["lrnn_state"].clone()
    y = m(x, integration_timesteps=ts, lengths=lengths, inference_cache=cache)
    for b, n in enumerate(lengths.tolist()):
        assert torch.all(y[b, n:] == 0)
        c = m.allocate_inference_cache(1, L)
        c["lrnn_state"].copy_(h_in[b : b + 1])
        if n:
            yb = m(x[b : b + 1, :n], integration_timesteps=ts[b : b + 1, :n], inference_cache=c)
            assert_close_rel(y[b, :n], yb[0], length=L, msg=f"y[{b}]")
        # final state = the state after running the truncated sequence (h_in for length 0)
        assert_close_rel(cache["lrnn_state"][b], c["lrnn_state"][0], length=L, msg=f"state[{b}]")
    # padding content never reaches valid outputs or the state
    x2, ts2 = x.clone(), ts.clone()
    x2[1, 17:], ts2[1, 17:] = 100.0, 50.0
    c2 = m.allocate_inference_cache(3, L)
    c2["lrnn_state"].copy_(h_in)
    y2 = m(x2, integration_timesteps=ts2, lengths=lengths, inference_cache=c2)
    assert torch.equal(y2, y) and torch.equal(c2["lrnn_state"], cache["lrnn_state"])


# every parameter's gradient against this file's float64 loop: test_gradients.py


def test_s7_init_keeps_hippo_imaginary_parts():
    J, n = 2, 8
    m = S7(H, J * n, J=J)
    lam = torch.complex(-1.0 / (m.reparam_a * m.Lambda_w**2 + m.reparam_b), m.Lambda_im)
    hippo = dplr_hippo_legs(n)[0]
    assert torch.allclose(lam.real, torch.full_like(lam.real, -0.5), atol=1e-6)
    assert torch.allclose(lam.imag.double(), hippo.imag.repeat(J), atol=1e-5)
    im = lam.imag.abs()
    assert im.max() > 2.0 and im.std() > 0.5  # a spread of frequencies, not all zero
    assert len(torch.unique(torch.round(lam.imag[:n], decimals=4))) == n
    conj = S7(H, J * n, J=J, conj_sym=True)
    assert conj.n_state == J * n // 2 and bool((conj.Lambda_im > 0).all())


@pytest.mark.parametrize("disc", S7_DISC)
def test_s7_transition_is_stable(disc):
    # float64: in float32, exp(Re(Lambda) Delta_k dt_k) rounds to exactly 1 once the exponent
    # is below ~6e-8 (a vanishing selective step); the model is then neutral, never unstable
    m = S7(H, N, discretization=disc, dtype=torch.float64)
    x = torch.randn(4, 100, H, dtype=torch.float64) * 3
    ts = torch.rand(4, 100, dtype=torch.float64) * 10 + 1e-3
    A_bar, gamma_bar = m.discretize(x, ts)
    assert A_bar.shape == (4, 100, m.n_state)
    assert bool((A_bar.abs() < 1).all())
    assert len(torch.unique(A_bar.abs().round(decimals=5))) > 100  # input-dependent
    with torch.no_grad():  # any reparameterised weight keeps Re(Lambda) < 0
        m.Lambda_w.copy_(torch.randn_like(m.Lambda_w) * 30)
    assert bool((m.discretize(x, ts)[0].abs() < 1).all())
    m32 = S7(H, N, discretization=disc)
    assert bool((m32.discretize(x.float() * 3, ts.float())[0].abs() <= 1).all())


@pytest.mark.parametrize("cfg", [("s5", "async", True), ("s7", "zoh", False)], ids=str)
def test_bf16_autocast(cfg):
    m = make(cfg)
    x, ts = torch.randn(2, 40, H), rand_timesteps(2, 40)
    y32 = m(x.bfloat16().float(), integration_timesteps=ts)  # the same rounded inputs
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x.bfloat16(), integration_timesteps=ts)
        cache = m.allocate_inference_cache(2, 40)
        ys = torch.cat(
            [m.step(x[:, k : k + 1].bfloat16(), cache, ts[:, k])[0] for k in range(40)], 1
        )
    assert y.dtype == torch.bfloat16 and ys.dtype == torch.bfloat16
    assert cache["lrnn_state"].dtype == torch.complex64
    # bf16 inputs, float32 arithmetic: only the output's rounding to bf16 (test_bf16.py checks
    # that a bf16 state would not pass)
    assert_close_rel(y, y32, dtype=torch.bfloat16, msg="forward")
    assert_close_rel(ys, y32, dtype=torch.bfloat16, msg="step")


@pytest.mark.parametrize("name", ["s5", "s7"])
def test_fast_path_flag_same_result(name):
    fast = make((name, "async", False), use_fast_path=True)
    slow = make((name, "async", False), use_fast_path=False)
    slow.load_state_dict(fast.state_dict())
    x, ts = torch.randn(2, 100, H), rand_timesteps(2, 100)
    assert_close_rel(fast(x, ts), slow(x, ts), length=100)


@pytest.mark.parametrize("name", ["s5", "s7"])
def test_bad_input_raises(name):
    m = make((name, "async", False))
    x = torch.randn(2, 10, H)
    with pytest.raises(ValueError, match="^x"):
        m(torch.randn(2, H))  # wrong rank
    with pytest.raises(ValueError, match="^x"):
        m(torch.randn(2, 10, H + 1))  # wrong d_model
    with pytest.raises(ValueError, match="integration_timesteps"):
        m(x, integration_timesteps=-torch.rand(2, 10))
    with pytest.raises(ValueError, match="integration_timesteps"):
        m(x, integration_timesteps=torch.rand(2, 9))
    with pytest.raises(ValueError, match="lengths"):
        m(x, lengths=torch.tensor([11, 3]))
    cache = m.allocate_inference_cache(2, 10)
    with pytest.raises(ValueError, match="^x"):
        m.step(torch.randn(2, 1, H + 1), cache)
    with pytest.raises(ValueError, match="integration_timesteps"):
        m.step(x[:, :1], cache, integration_timesteps=torch.rand(3))
    with pytest.raises(ValueError, match="integration_timesteps"):
        m.step(x[:, :1], cache, integration_timesteps=-torch.ones(2))
    with pytest.raises(ValueError, match="inference_cache"):
        m(torch.randn(3, 10, H), inference_cache=cache)
    cls = S5 if name == "s5" else S7
    with pytest.raises(ValueError, match="discretization"):
        cls(H, N, discretization="euler")
    if name == "s7":
        with pytest.raises(ValueError, match="discretization"):
            S7(H, N, discretization="no_discretization")
        with pytest.raises(ValueError, match="^J"):
            S7(H, N, J=3)
        with pytest.raises(ValueError, match="reparam_b"):
            S7(H, N, reparam_b=2.5)
    with pytest.raises(TypeError, match="dtype"):
        cls(H, N, dtype=torch.int64)
    # a 16-bit dtype: the model .to(dtype) gives (its own tensors float32, the precision policy)
    assert all(p.dtype == torch.float32 for p in cls(H, N, dtype=torch.bfloat16).parameters())


def test_step_rescale_scales_the_step():
    base = S5(H, N, discretization="zoh")
    fast = S5(H, N, discretization="zoh", step_rescale=2.0)
    fast.load_state_dict(base.state_dict())
    x = torch.randn(1, 30, H)
    ts = torch.full((1, 30), 2.0)
    assert_close_rel(fast(x), base(x, integration_timesteps=ts), length=30)
    assert math.isclose(fast.step_rescale, 2.0)


@pytest.mark.parametrize("cls", [S5, S7])
def test_float32_gradients_hold_over_long_gaps(cls):
    """An event after a gap long enough for the earlier state to decay to nothing: every
    parameter's float32 gradient is the float64 model's (zoh's gamma_bar = (exp(z) - 1) / A
    differentiated through exp, not through expm1's result + 1, whose rounding the gap
    multiplied: 150% off at a gap of 1e8)."""
    torch.manual_seed(0)
    m32 = cls(d_model=4, d_state=4, discretization="zoh")
    m64 = copy.deepcopy(m32).double()
    x = torch.randn(1, 2, 4, dtype=torch.float64)
    ts = torch.tensor([[1.0, 1e8]], dtype=torch.float64)
    grads = []
    for m, dtype in ((m32, torch.float32), (m64, torch.float64)):
        m(x.to(dtype), integration_timesteps=ts.to(dtype)).sum().backward()
        grads.append(torch.cat([p.grad.double().flatten() for p in m.parameters()]))
    assert_close_rel(grads[0], grads[1], dtype=torch.float32, length=2)
