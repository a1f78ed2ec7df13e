"""LRU and S5 (LTI) against float64 loops of the papers' recurrences."""

import copy
import math

import pytest
import torch

from _tol import assert_close_rel
from lrnnx.models.lti import LRU, S5
from lrnnx.models.lti.s5 import MAX_REAL_EIG

torch.manual_seed(0)
H, N = 6, 8
S5_CONFIGS = [
    (d, c) for d in ("zoh", "bilinear", "dirac", "no_discretization") for c in (False, True)
]


def make(name, **kw):
    if name == "lru":
        return LRU(H, N, r_min=0.5, r_max=0.99, **kw)
    disc, conj = name
    return S5(H, N, disc, conj_sym=conj, **kw)


ALL = ["lru"] + S5_CONFIGS


def paper_matrices(m):
    """The discrete system written out from the parameters, in float64, independent of the model code."""
    if isinstance(m, LRU):
        lam = torch.exp(-torch.exp(m.nu_log.double()) + 1j * torch.exp(m.theta_log.double()))
        gamma = torch.exp(m.gamma_log.double())
        B = (m.B_re.double() + 1j * m.B_im.double()) * gamma[:, None]
        C = m.C_re.double() + 1j * m.C_im.double()
        return lam, B, C, m.D.double(), 1.0
    lam_c = torch.clamp(m.Lambda_re.double(), max=MAX_REAL_EIG) + 1j * m.Lambda_im.double()
    Bt = torch.view_as_complex(m.B.double().contiguous())
    C = torch.view_as_complex(m.C.double().contiguous())
    if m.discretization == "no_discretization":
        lam, g = torch.exp(lam_c), torch.ones_like(lam_c)
    else:
        d = torch.exp(m.log_step.double())
        if m.discretization == "zoh":
            lam, g = torch.exp(lam_c * d), (torch.exp(lam_c * d) - 1) / lam_c
        elif m.discretization == "bilinear":
            lam, g = (1 + d * lam_c / 2) / (1 - d * lam_c / 2), d / (1 - d * lam_c / 2)
        else:  # dirac
            lam, g = torch.exp(lam_c * d), torch.ones_like(lam_c)
    return lam, Bt * g[:, None], C, m.D.double(), 2.0 if m.conj_sym else 1.0


def paper_loop(m, x):
    lam, B, C, D, scale = paper_matrices(m)
    x = x.double()
    h = torch.zeros(x.shape[0], lam.shape[0], dtype=torch.complex128)
    ys = []
    for t in range(x.shape[1]):
        h = lam * h + x[:, t].to(h.dtype) @ B.T
        ys.append(scale * (h @ C.T).real + D * x[:, t])
    return torch.stack(ys, 1)


def step_all(m, x, cache=None):
    cache = m.allocate_inference_cache(x.shape[0]) if cache is None else cache
    return torch.stack([m.step(x[:, t], cache)[0] for t in range(x.shape[1])], 1), cache


@pytest.mark.parametrize("cfg", ALL, ids=str)
@pytest.mark.parametrize("mode", ["fft", "scan"])
def test_forward_matches_paper_loop(cfg, mode):
    m = make(cfg, mode=mode)
    x = torch.randn(2, 300, H)
    ref = paper_loop(m, x)
    assert_close_rel(m(x), ref, dtype=torch.float32, length=300)
    m64 = copy.deepcopy(m).double()
    assert torch.allclose(m64(x.double()), ref, atol=1e-9, rtol=1e-9)


# the two at L = 4096 run in make test-slow
@pytest.mark.parametrize(
    "cfg",
    [pytest.param(c, marks=pytest.mark.slow) if c in ("lru", ("zoh", True)) else c for c in ALL],
    ids=str,
)
def test_step_matches_forward_long(cfg):
    m = make(cfg)
    L = 4096 if cfg in ("lru", ("zoh", True)) else 1024
    x = torch.randn(2, L, H)
    ys, _ = step_all(m, x)
    y = m(x)
    assert torch.allclose(ys, y, atol=1e-3, rtol=1e-3), (ys - y).abs().max()


@pytest.mark.parametrize("cfg", ALL, ids=str)
def test_stable_causal_time_invariant(cfg):
    m = make(cfg)
    A_bar = m.discretize()[0]
    A_bar = torch.diagonal(A_bar) if A_bar.dim() == 2 else A_bar
    assert bool((A_bar.abs() < 1).all())
    x = torch.randn(1, 128, H)
    x2 = x.clone()
    x2[:, 70:] = torch.randn(1, 58, H)
    y, y2 = m(x), m(x2)
    assert_close_rel(y2[:, :70], y[:, :70], length=128, msg="causality")
    assert not torch.allclose(y[:, 70:], y2[:, 70:], atol=1e-3)
    shifted = torch.cat([torch.zeros(1, 10, H), x[:, :-10]], 1)
    assert_close_rel(m(shifted)[:, 10:], y[:, :-10], length=128, msg="time invariance")


@pytest.mark.parametrize("cfg", ["lru", ("zoh", False), ("bilinear", True)], ids=str)
def test_finite_at_16k(cfg):
    m = make(cfg)
    y = m(torch.randn(1, 16384, H))
    assert torch.isfinite(y).all()


# every parameter's gradient against this file's float64 loop: test_gradients.py


@pytest.mark.parametrize("cfg", ["lru", ("zoh", True)], ids=str)
@pytest.mark.parametrize("mode", ["fft", "scan"])
def test_lengths_mask_and_final_state(cfg, mode):
    m = make(cfg, mode=mode)
    x = torch.randn(3, 40, H)
    lengths = torch.tensor([40, 17, 0])
    noisy = x.clone()
    noisy[1, 17:] = 1e3 * torch.randn(23, H)  # garbage in the padding
    cache = m.allocate_inference_cache(3)
    y = m(noisy, lengths=lengths, inference_cache=cache)
    assert torch.all(y[1, 17:] == 0) and torch.all(y[2] == 0)
    assert_close_rel(y[0], m(x[:1])[0], length=40, msg="y[0]")
    assert_close_rel(y[1, :17], m(x[1:2, :17])[0], length=17, msg="y[1]")
    # the state left in the cache is the state at each sequence's own end
    ref_cache = m.allocate_inference_cache(1)
    m(x[1:2, :17], inference_cache=ref_cache)
    assert_close_rel(cache["lrnn_state"][1], ref_cache["lrnn_state"][0], length=17, msg="state")
    assert torch.all(cache["lrnn_state"][2] == 0)


@pytest.mark.parametrize("cfg", ALL, ids=str)
@pytest.mark.parametrize("mode", ["fft", "scan"])
def test_prefill_then_step_equals_forward(cfg, mode):
    m = make(cfg, mode=mode)
    x = torch.randn(2, 90, H)
    cache = m.allocate_inference_cache(2)
    y_prompt = m(x[:, :60], inference_cache=cache)
    assert cache["seqlen_offset"] == 60
    y_rest, _ = step_all(m, x[:, 60:], cache)
    y = m(x)
    assert_close_rel(torch.cat([y_prompt, y_rest], 1), y, length=90, msg="prefill + steps")
    # and a forward from a non-zero cache continues the sequence too
    cache = m.allocate_inference_cache(2)
    m(x[:, :60], inference_cache=cache)
    assert_close_rel(m(x[:, 60:], inference_cache=cache), y[:, 60:], length=90, msg="2nd chunk")


def test_bf16_autocast_keeps_float32_state():
    m = make(("zoh", False))
    x = torch.randn(2, 64, H)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x.bfloat16())
    assert y.dtype == torch.bfloat16
    # bf16 inputs, float32 arithmetic: only the output's rounding to bf16 (test_bf16.py checks
    # that a bf16 state would not pass)
    assert_close_rel(y, m(x.bfloat16().float()), dtype=torch.bfloat16)


def test_lru_init_lies_on_the_ring():
    m = LRU(4, 4096, r_min=0.4, r_max=0.9, max_phase=math.pi / 2)
    with torch.no_grad():
        lam = torch.diagonal(m.discretize()[0])
    r, phase = lam.abs(), lam.angle()
    assert r.min() >= 0.4 - 1e-5 and r.max() <= 0.9 + 1e-5
    assert phase.min() >= 0 and phase.max() <= math.pi / 2 + 1e-5
    # |Lambda|^2 uniform on [r_min^2, r_max^2]: its mean is the midpoint
    assert abs(float((r**2).mean()) - (0.16 + 0.81) / 2) < 0.02
    assert torch.allclose(torch.exp(m.gamma_log), torch.sqrt(1 - r**2), atol=1e-5)
    names = {n for n, _ in m.named_parameters()}
    assert names == {"nu_log", "theta_log", "gamma_log", "B_re", "B_im", "C_re", "C_im", "D"}


def test_s5_conj_sym_keeps_half_the_spectrum():
    full, half = S5(H, 16, "zoh"), S5(H, 16, "zoh", conj_sym=True)
    assert full.n_state == 16 and half.n_state == 8
    assert torch.all(half.Lambda_im > 0)
    assert torch.allclose(full.Lambda_re, torch.full((16,), -0.5))
    with pytest.raises(ValueError, match="d_state"):
        S5(H, 7, "zoh", conj_sym=True)


def test_bad_inputs():
    m = make(("zoh", False))
    with pytest.raises(ValueError, match="x: expected shape"):
        m(torch.randn(2, 10))
    with pytest.raises(ValueError, match="x: expected shape"):
        m(torch.randn(2, 10, H + 1))
    with pytest.raises(ValueError, match="integration_timesteps"):
        m(torch.randn(2, 10, H), integration_timesteps=torch.ones(2, 9))
    with pytest.raises(ValueError, match="integration_timesteps"):
        m(torch.randn(2, 10, H), integration_timesteps=-torch.ones(2, 10))
    with pytest.raises(ValueError, match="discretization"):
        S5(H, N, "euler")
    with pytest.raises(ValueError, match="async"):
        S5(H, N, "async")
    with pytest.raises(ValueError, match="mode"):
        S5(H, N, "zoh", mode="conv")
    with pytest.raises(ValueError, match="lengths"):
        m(torch.randn(2, 10, H), lengths=torch.tensor([3, 11]))
    cache = m.allocate_inference_cache(2)
    with pytest.raises(ValueError, match="x: expected shape"):
        m.step(torch.randn(2, H + 1), cache)


def test_no_discretization_eigenvalues_train_at_small_steps():
    """no_discretization learns log A_bar = Lambda * step: at small steps its initial real
    parts (-step / 2) lie close to 0, inside the bound of its clamp (scaled by dt_min), so every
    one of them gets a gradient (the bound of the continuous eigenvalues froze them all)."""
    from lrnnx.models.ltv.s5 import S5 as EventS5

    torch.manual_seed(0)
    for model, x in (
        (S5(4, 8, "no_discretization", dt_min=1e-5, dt_max=1e-4), torch.randn(2, 16, 4)),
        (EventS5(4, 8, discretization="no_discretization", step_rescale=0.01),
         torch.randn(2, 16, 4)),
    ):  # fmt: skip
        model(x).pow(2).sum().backward()
        grad = model.Lambda_re.grad
        assert bool((grad != 0).all()), grad
