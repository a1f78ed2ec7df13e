"""Centaurus (all four modes, every discretization) against float64 loops of the paper's recurrence."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from _tol import assert_close_rel
from lrnnx.core.discretization import DISCRETIZATIONS, get_discretization
from lrnnx.models.lti.centaurus import (
    Centaurus,
    CentaurusBase,
    CentaurusDWS,
    CentaurusFull,
    CentaurusNeck,
    CentaurusPWNeck,
)

torch.manual_seed(0)
H, N, M = 5, 3, 4
MODES = ["neck", "pw", "dws", "full"]
DISCS = ["zoh", "bilinear", "dirac", "simplified_zoh"]


def make(mode, disc="zoh", randomize=True, seed=0, **options):
    """A small model; d_state = H for dws (one state per channel), else N (full: H_out = N)."""
    torch.manual_seed(seed)
    m = Centaurus(H, H if mode == "dws" else N, M, discretization=disc, mode=mode, **options)
    if randomize:  # away from the symmetric initialisation, with steps large enough to matter
        with torch.no_grad():
            m.A_real_raw.normal_(0.0, 1.0)
            m.A_imag.uniform_(-3.0, 3.0)
            m.log_dt.uniform_(math.log(0.05), math.log(0.5))
            for name in ("B", "C", "E"):
                if getattr(m, name, None) is not None:
                    getattr(m, name).normal_(0.0, 0.5)
    return m


def paper_loop(m, u):
    """x_nm[t] = A_bar_nm x_nm[t-1] + gamma_nm v_n[t], z_n = sum_m E_nm Re x_nm, in float64.

    Written from the paper's equations and the model's raw parameters only; a mix / out
    norm+activation (eval mode) goes through ``post(z_or_y, module)``.
    """
    A = -F.softplus(m.A_real_raw.double()) + 1j * m.A_imag.double()  # (rows, M)
    # one step per state (N, 1), or per sub-state (N, M) (pointwise stores it flat, (N * M,))
    dt = torch.exp(m.log_dt.double()).reshape(m.d_state, -1)
    u = u.double()
    Bsz, L, _ = u.shape
    if isinstance(m, CentaurusFull):
        n_out, n_in = m.d_state, m.d_model
        A, dt = A.view(n_out, n_in, M), dt[:, None, :]  # a pair (o, i) uses the step of output o
    if m.discretization == "zoh":
        A_bar, g = torch.exp(dt * A), (torch.exp(dt * A) - 1) / A
    elif m.discretization == "bilinear":
        A_bar, g = (1 + dt * A / 2) / (1 - dt * A / 2), dt / (1 - dt * A / 2)
    elif m.discretization == "simplified_zoh":  # exact decay, input times dt
        A_bar, g = torch.exp(dt * A), dt * torch.ones_like(A)
    else:  # dirac
        A_bar, g = torch.exp(dt * A), torch.ones_like(A)
    x = torch.zeros((Bsz,) + tuple(A.shape), dtype=torch.complex128)
    ys = []
    for t in range(L):
        ut = u[:, t]
        if isinstance(m, CentaurusNeck):
            x = A_bar * x + g * (ut @ m.B.double().T)[:, :, None]
            y = (m.E.double() * x.real).sum(-1) @ m.C.double().T
        elif isinstance(m, CentaurusPWNeck):  # independent lanes, no mixing
            x = A_bar * x + g * (ut @ m.B.double().T).view(Bsz, -1, M)
            y = x.real.reshape(Bsz, -1) @ m.C.double().T
        elif isinstance(m, CentaurusDWS):  # depthwise SSM, then (norm, activation,) pointwise
            x = A_bar * x + g * ut[:, :, None]
            y = post((m.E.double() * x.real).sum(-1), m.mix_act) @ m.C.double().T
        else:  # full: pair (o, i) driven by u_i, y_o sums its pairs
            x = A_bar * x + g * ut[:, None, :, None]
            y = (m.E.double().view(n_out, n_in, M) * x.real).sum(-1).sum(-1)
        ys.append(post(y, m.out_act))
    return torch.stack(ys, 1)


def post(z, block):
    """The eval-mode norm + activation of a ChannelNormAct, by hand, in float64."""
    norm = block.norm
    if isinstance(norm, torch.nn.BatchNorm1d):
        rm, rv = norm.running_mean.double(), norm.running_var.double()
        z = (z - rm) / torch.sqrt(rv + norm.eps) * norm.weight.double() + norm.bias.double()
    elif isinstance(norm, torch.nn.LayerNorm):
        mu, var = z.mean(-1, keepdim=True), z.var(-1, unbiased=False, keepdim=True)
        z = (z - mu) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()
    elif isinstance(norm, torch.nn.RMSNorm):
        eps = torch.finfo(z.dtype).eps if norm.eps is None else norm.eps
        z = z / torch.sqrt(z.pow(2).mean(-1, keepdim=True) + eps) * norm.weight.double()
    acts = {None: lambda v: v, "relu": torch.relu, "silu": F.silu, "tanh": torch.tanh}
    return acts[block.activation](z)


def set_path(m, path):
    if path == "scan":
        m.mode = "scan"
    else:
        m.mode, m.contraction = "fft", path
    return m


def step_all(m, x, cache=None):
    cache = m.allocate_inference_cache(x.shape[0]) if cache is None else cache
    return torch.stack([m.step(x[:, t], cache)[0] for t in range(x.shape[1])], 1), cache


def test_factory_returns_mode_classes():
    expected = {
        "neck": CentaurusNeck,
        "pointwise": CentaurusPWNeck,
        "pw": CentaurusPWNeck,
        "s5": CentaurusPWNeck,
        "dws": CentaurusDWS,
        "full": CentaurusFull,
    }
    for mode, cls in expected.items():
        m = Centaurus(d_model=8, d_state=8, sub_state_dim=2, mode=mode)
        assert type(m) is cls and isinstance(m, CentaurusBase)
    assert type(Centaurus(8, 8, 2)) is CentaurusNeck  # default mode
    assert Centaurus(8, 8, 2, discretization="bilinear").discretization == "bilinear"
    with pytest.raises(ValueError, match="neck.*full"):
        Centaurus(8, 8, 2, mode="conv")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("disc", DISCS)
@pytest.mark.parametrize("path", ["latent", "kernel", "scan"])
def test_forward_matches_paper_loop(mode, disc, path):
    m = set_path(make(mode, disc), path)
    u = torch.randn(2, 150, H)
    ref = paper_loop(m, u)
    m64 = copy.deepcopy(m).double()
    assert torch.allclose(m64(u.double()), ref, atol=1e-9, rtol=1e-9)
    y = m(u)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert_close_rel(y, ref, dtype=torch.float32, length=150)


@pytest.mark.parametrize("mode", MODES)
def test_discretization_changes_the_computation(mode):
    u = torch.randn(1, 60, H)
    outs = {}
    for disc in DISCS:
        m = make(mode, disc, seed=3)  # same parameters, different rule
        with torch.no_grad():
            m.log_dt.fill_(0.0)  # dt = 1: the rules agree only to O(dt^2) / O(dt^3)
        outs[disc] = m(u)
    for a, b in [
        ("zoh", "bilinear"),
        ("zoh", "dirac"),
        ("bilinear", "dirac"),
        ("zoh", "simplified_zoh"),
    ]:
        assert (outs[a] - outs[b]).abs().max() > 0.05 * outs[a].abs().max(), (a, b)
    # simplified_zoh scales the input by dt, dirac by 1: the same block at dt = 1
    assert_close_rel(outs["simplified_zoh"], outs["dirac"], length=60)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("disc", DISCS)
def test_step_matches_forward(mode, disc):
    m = make(mode, disc)
    x = torch.randn(2, 512, H)
    ys, cache = step_all(m, x)
    assert cache["seqlen_offset"] == 512
    assert torch.allclose(ys, m(x), atol=1e-4, rtol=1e-3)


@pytest.mark.slow  # a long sequence (L >= 2048) stepped token by token: make test-slow
def test_step_matches_forward_long():
    m = make("neck", "zoh", randomize=False)  # reference init: dt down to 1e-3, long memory
    x = torch.randn(1, 4096, H)
    ys, _ = step_all(m, x)
    y = m(x)
    assert torch.allclose(ys, y, atol=1e-3 * y.abs().max().item(), rtol=1e-3)


def test_state_layout():
    for mode, shape in [("neck", (2, N, M)), ("pw", (2, N, M)), ("dws", (2, H, M))]:
        assert make(mode).allocate_inference_cache(2)["lrnn_state"].shape == shape
    full = make("full").allocate_inference_cache(2)["lrnn_state"]
    assert full.shape == (2, N, H, M) and full.is_complex()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", ["latent", "kernel", "scan"])
def test_prefill_then_step_equals_forward(mode, path):
    m = set_path(make(mode, "bilinear"), path)
    x = torch.randn(2, 90, H)
    y = m(x)
    cache = m.allocate_inference_cache(2)
    y_prompt = m(x[:, :50], inference_cache=cache)
    assert cache["seqlen_offset"] == 50
    y_rest, _ = step_all(m, x[:, 50:70], cache)
    # a forward from the now non-zero cache continues the sequence and leaves its end state
    y_mid = m(x[:, 70:85], inference_cache=cache)
    y_tail, _ = step_all(m, x[:, 85:], cache)
    assert cache["seqlen_offset"] == 90
    assert_close_rel(torch.cat([y_prompt, y_rest, y_mid, y_tail], 1), y, length=90)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", ["latent", "scan"])
def test_lengths_mask_and_final_state(mode, path):
    m = set_path(make(mode), path)
    x = torch.randn(3, 40, H)
    lengths = torch.tensor([40, 17, 0])
    noisy = x.clone()
    noisy[1, 17:] = 1e3 * torch.randn(23, H)  # garbage in the padding
    noisy[2] = 1e3 * torch.randn(40, H)
    cache = m.allocate_inference_cache(3)
    with torch.no_grad():
        cache["lrnn_state"][2] = torch.randn_like(cache["lrnn_state"][2])  # a length-0 row keeps it
    kept = cache["lrnn_state"][2].clone()
    y = m(noisy, lengths=lengths, inference_cache=cache)
    assert torch.all(y[1, 17:] == 0) and torch.all(y[2] == 0)
    assert torch.allclose(y[0], m(x[:1])[0], atol=1e-5)
    assert torch.allclose(y[1, :17], m(x[1:2, :17])[0], atol=1e-5)
    ref_cache = m.allocate_inference_cache(1)
    m(x[1:2, :17], inference_cache=ref_cache)
    assert torch.allclose(cache["lrnn_state"][1], ref_cache["lrnn_state"][0], atol=1e-5)
    assert torch.equal(cache["lrnn_state"][2], kept)


@pytest.mark.parametrize("mode", MODES)
def test_causal_and_time_invariant(mode):
    m = make(mode)
    x = torch.randn(1, 128, H)
    x2 = x.clone()
    x2[:, 70:] = torch.randn(1, 58, H)
    y, y2 = m(x), m(x2)
    assert_close_rel(y2[:, :70], y[:, :70], length=128, msg="causality")
    assert not torch.allclose(y[:, 70:], y2[:, 70:], atol=1e-3)
    shifted = torch.cat([torch.zeros(1, 10, H), x[:, :-10]], 1)
    assert_close_rel(m(shifted)[:, 10:], y[:, :-10], length=128, msg="time invariance")


@pytest.mark.parametrize("mode", MODES)
def test_stable_poles_and_kernel(mode):
    m = make(mode, "bilinear")
    A_bar, gamma, _ = m.discretize()
    assert bool((A_bar.abs() < 1).all())
    with pytest.raises(ValueError, match="L"):
        m.compute_kernel()  # no length before the first forward
    m(torch.randn(1, 33, H))
    k, empty = m.compute_kernel()
    Z = {"neck": N, "pw": N * M, "dws": H, "full": N * H}[mode]
    assert k.shape == (Z, 33) and empty.numel() == 0 and not k.is_complex()
    # the latent kernel is the impulse response of the sub-states, mixed by E
    P = A_bar[..., None] ** torch.arange(33)
    resp = (gamma[..., None] * P).real
    ref = resp.flatten(0, 1) if mode == "pw" else (m.E[..., None] * resp).sum(1)
    assert torch.allclose(k, ref, atol=1e-5)


def test_finite_at_16k():
    m = make("neck", "zoh", randomize=False)
    y = m(torch.randn(1, 16384, H))
    assert torch.isfinite(y).all() and y.abs().max() > 0


# every parameter's gradient against this file's float64 loop: test_gradients.py


def test_autocast_keeps_float32_state():
    m = make("neck")
    x = torch.randn(2, 64, H)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.float32
    assert_close_rel(y, m(x), length=64)  # autocast leaves the model in float32
    y16 = m(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert_close_rel(y16, m(x.bfloat16().float()), dtype=torch.bfloat16)  # the final rounding


def test_bad_arguments():
    with pytest.raises(ValueError, match="d_state"):
        CentaurusDWS(d_model=8, d_state=4, sub_state_dim=2)
    with pytest.raises(ValueError, match="d_state"):
        Centaurus(8, 6, 2, mode="dws")
    for disc in ("foo", "no_discretization", "async"):
        with pytest.raises(ValueError, match="discretization"):
            Centaurus(8, 8, 2, discretization=disc)
    with pytest.raises(ValueError, match="sub_state_dim"):
        CentaurusNeck(8, 8, 0)
    m = make("neck")
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(2, 10, H + 1))
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(10, H))
    with pytest.raises(TypeError, match="x"):
        m(torch.ones(2, 10, H, dtype=torch.long))
    with pytest.raises(ValueError, match="integration_timesteps"):
        m(torch.randn(2, 10, H), integration_timesteps=torch.ones(2, 9))
    with pytest.raises(ValueError, match="lengths"):
        m(torch.randn(2, 10, H), lengths=torch.tensor([3]))
    with pytest.raises(ValueError, match="lengths"):
        m(torch.randn(2, 10, H), lengths=torch.tensor([3, 11]))
    cache = m.allocate_inference_cache(2)
    with pytest.raises(ValueError, match="x"):
        m.step(torch.randn(2, H + 1), cache)
    with pytest.raises(ValueError, match="lrnn_state"):
        m.step(torch.randn(3, H), cache)
    with pytest.raises(ValueError, match="lrnn_state"):
        m(torch.randn(3, 10, H), inference_cache=cache)
    with pytest.raises(ValueError, match="contraction"):
        m.contraction = "fastest"


# ----------------------------------------------------------------- simplified_zoh and the options
def test_simplified_zoh_rule():
    """The registry rule alone: A_bar = exp(delta A) (zoh's decay), gamma_bar = delta."""
    rule = get_discretization("simplified_zoh")
    assert rule is DISCRETIZATIONS["simplified_zoh"]
    A = torch.complex(-torch.rand(6, 3, dtype=torch.float64) * 4, torch.randn(6, 3).double() * 5)
    delta = torch.rand(6, 1, dtype=torch.float64) + 1e-3
    A_bar, gamma = rule(A, delta)
    ea = torch.exp(delta.real * A.real) * torch.exp(1j * delta * A.imag)  # exp(dt a) by parts
    assert_close_rel(A_bar, ea, msg="A_bar")
    assert gamma.shape == (6, 3) and not gamma.is_complex()
    assert torch.equal(gamma, delta.expand(6, 3))
    assert bool((A_bar.abs() < 1).all())
    # it agrees with zoh's gamma to first order: |gamma_zoh - dt| ~ |A| dt^2 / 2
    small = torch.full((6, 1), 1e-4, dtype=torch.float64)
    _, g_zoh = DISCRETIZATIONS["zoh"](A, small)
    _, g = rule(A, small)
    assert torch.allclose((g_zoh - g) / small**2, A / 2, rtol=1e-3)


def test_simplified_zoh_in_event_s5():
    """Another model that takes the registry's rules uses it: forward == step."""
    from lrnnx.models.ltv import S5

    torch.manual_seed(0)
    m = S5(H, 8, discretization="simplified_zoh").double()
    x = torch.randn(2, 20, H, dtype=torch.float64)
    y = m(x)
    cache = m.allocate_inference_cache(2)
    ys = torch.stack([m.step(x[:, t], cache)[0] for t in range(20)], 1)
    assert_close_rel(ys, y, length=20)
    zoh = copy.deepcopy(m)
    zoh.discretize_fn = DISCRETIZATIONS["zoh"]
    assert (zoh(x) - y).abs().max() > 1e-6 * y.abs().max()  # the rule is really used


OPTIONS = {  # every option that reproduces an official layer, at once
    "neck": dict(d_output=7, dt_per_sub_state=True, out_norm="layer", out_activation="silu"),
    "pw": dict(d_output=7, dt_per_sub_state=True, out_norm="batch", out_activation="relu"),
    "dws": dict(
        d_output=7,
        dt_per_sub_state=True,
        mix_norm="batch",
        mix_activation="relu",
        out_norm="rms",
        out_activation="tanh",
    ),
    "full": dict(d_output=N, dt_per_sub_state=True, out_norm="batch", out_activation="relu"),
}


def make_with_options(mode):
    m = make(mode, "simplified_zoh", **OPTIONS[mode])
    with torch.no_grad():
        for block in (m.mix_act, m.out_act):
            for name, t in block.named_parameters():
                t.normal_(1.0 if name == "weight" else 0.0, 0.5)
            if isinstance(block.norm, torch.nn.BatchNorm1d):
                block.norm.running_mean.normal_()
                block.norm.running_var.uniform_(0.5, 2.0)
    return m.eval()


@pytest.mark.parametrize("mode", MODES)
def test_options_match_paper_loop(mode):
    m = make_with_options(mode).double()
    shape = {"pw": (N * M,)}.get(mode, (m.d_state, M))
    assert m.log_dt.shape == shape
    u = torch.randn(2, 40, H, dtype=torch.float64)
    ref = paper_loop(m, u)
    assert ref.shape == (2, 40, m.d_output)
    paths = ["latent", "scan"] + ([] if mode == "dws" else ["kernel"])
    for path in paths:
        assert_close_rel(set_path(m, path)(u), ref, length=40, msg=path)
    assert_close_rel(step_all(m, u)[0], ref, length=40, msg="step")


def test_per_sub_state_dt_starts_from_the_state_step():
    for mode in MODES:
        plain, per = make(mode, randomize=False), make(mode, randomize=False, dt_per_sub_state=True)
        rows = per.log_dt.reshape(plain.log_dt.shape[0], M)
        assert torch.equal(rows, plain.log_dt[:, None].expand(-1, M))


def test_step_uses_running_statistics_in_train_mode():
    m = make_with_options("dws")
    x = torch.randn(2, 30, H)
    y_eval = m(x)
    m.train()
    ys, _ = step_all(m, x)  # the eval-mode function, whatever the module's mode
    assert_close_rel(ys, y_eval, length=30)
    before = m.mix_act.norm.running_mean.clone()
    y_train = m(x)  # batch statistics: another function, and the running mean moves
    assert (y_train - y_eval).abs().max() > 1e-3 * y_eval.abs().max()
    assert not torch.equal(before, m.mix_act.norm.running_mean)


def test_norms_keep_float32_under_half():
    m = make_with_options("dws").half()
    assert m.mix_act.norm.weight.dtype == torch.float32 and m.C.dtype == torch.float32
    x = torch.randn(2, 16, H)
    assert_close_rel(m(x.half()), make_with_options("dws")(x).half(), dtype=torch.float16)


def test_option_errors():
    with pytest.raises(ValueError, match="mix_norm.*dws"):
        Centaurus(8, 8, 2, mode="neck", mix_norm="batch")
    with pytest.raises(ValueError, match="d_output.*None or 4"):
        Centaurus(8, 4, 2, mode="full", d_output=8)
    with pytest.raises(ValueError, match="norm.*'batch'.*'group'"):
        Centaurus(8, 8, 2, mode="dws", mix_norm="group")
    with pytest.raises(ValueError, match="activation.*'relu'.*'glu'"):
        Centaurus(8, 8, 2, out_activation="glu")
    with pytest.raises(TypeError, match="dt_per_sub_state"):
        Centaurus(8, 8, 2, dt_per_sub_state=1)
    with pytest.raises(ValueError, match="d_output"):
        Centaurus(8, 8, 2, d_output=0)
    m = make_with_options("dws")
    m.contraction = "kernel"
    with pytest.raises(ValueError, match="contraction.*'kernel'"):
        set_path(m, "kernel")(torch.randn(1, 8, H))
