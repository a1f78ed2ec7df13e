"""S7's chunked evaluation of the paper's bilinear maps, and its low-rank option (bc_rank).

The paper's version is compared in float64 with the explicit-product formula the chunked
functions replace (B_k u_k and C_k x_k through (.., H * H) and (.., P * H) outer products), with
chunks of two rows so that every evaluation spans many chunks and a ragged last one.  The
low-rank version is compared with a float64 loop of its own equations, with the paper's version
holding the CP-reconstructed maps, and with itself run sequence by sequence / step by step.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import test_ltv_s5_s7 as tv
from _tol import assert_close_rel, tol
from lrnnx.architectures import LRNNLMHeadModel
from lrnnx.models.ltv import s7 as s7_module
from lrnnx.models.ltv.s7 import S7, bilinear_form, quadratic_form

F64 = torch.float64
H, N, R = 6, 8, 3
#: float64 gradients through the discretization and the scan (test_gradients.py's bound)
GRAD_RTOL = 1e-10


@pytest.fixture
def small_chunks(monkeypatch):
    """Two rows per chunk at H = 6, P = 8 (intermediates of 2 P H = 96 columns)."""
    monkeypatch.setattr(s7_module, "_CHUNK_ELEMENTS", 200)


def make(bc_rank=None, conj_sym=False, disc="async", seed=0) -> S7:
    """A float64 S7 moved off its initialisation (so every parameter matters)."""
    torch.manual_seed(seed)
    m = S7(H, N, J=2, discretization=disc, conj_sym=conj_sym, bc_rank=bc_rank, dtype=F64)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p) * p.abs().mean())
    return m


class OuterProductS7(S7):
    """S7 through the explicit products u_k u_k^T (.., H * H) and x_k u_k^T (.., P * H): the
    formula of the paper's maps before the chunked evaluation (no symmetrisation either)."""

    def _tensors(self):
        P, Hd = self.n_state, self.d_model
        p = super()._tensors()
        p["B_c"], p["C_c"] = torch.view_as_complex(self.B), torch.view_as_complex(self.C)
        p["W_B"] = torch.view_as_complex(self.B_proj).reshape(P, Hd * Hd)
        p["W_C"] = torch.view_as_complex(self.C_proj).reshape(Hd, P * Hd)
        return p

    def _input(self, p, u, dtype=None):
        uu = (u[..., :, None] * u[..., None, :]).flatten(-2)
        return u.to(p["B_c"].dtype) @ p["B_c"].T + uu.to(p["W_B"].dtype) @ p["W_B"].T

    def _output(self, p, h, u):
        hu = (h[..., :, None] * u[..., None, :].to(h.dtype)).flatten(-2)
        Ch = h @ p["C_c"].to(h.dtype).T + hu @ p["W_C"].to(h.dtype).T
        return self.out_scale * Ch.real.to(u.dtype) + (p["D"] + F.linear(u, p["D_proj"])) * u


def _grads(m, y, inputs, seed=5):
    W = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    return torch.autograd.grad((y * W).sum(), inputs)


def _compare_grads(got, exp, names):
    for name, g, e in zip(names, got, exp, strict=True):
        assert e.abs().sum() > 0, f"{name}: no gradient in the reference"
        assert_close_rel(g, e, dtype=F64, factor=GRAD_RTOL / tol(F64), msg=name)


def _run_both(m, ref, x, **kw):
    """Forward and gradients (every parameter and x) of the model and of the reference."""
    names = [n for n, _ in m.named_parameters()] + ["x"]
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = m(xa, **kw), ref(xb, **kw)
    g = _grads(m, y, list(m.parameters()) + [xa])
    g_ref = _grads(ref, y_ref, list(ref.parameters()) + [xb])
    return y, y_ref, g, g_ref, names


# ---------------------------------------------------------------------------------------------
# the chunked forms themselves


def test_forms_match_einsum_and_gradcheck(small_chunks):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(7, 3, dtype=F64, generator=gen, requires_grad=True)
    b = torch.randn(7, 4, dtype=F64, generator=gen, requires_grad=True)
    W = torch.randn(5, 3, 4, dtype=F64, generator=gen, requires_grad=True)
    assert_close_rel(bilinear_form(a, b, W), torch.einsum("oji,nj,ni->no", W, a, b))
    assert torch.autograd.gradcheck(bilinear_form, (a, b, W))
    # gradients for a subset of the inputs (the others need none)
    assert torch.autograd.gradcheck(lambda W_: bilinear_form(a.detach(), b.detach(), W_), (W,))
    S0 = torch.randn(5, 4, 4, dtype=F64, generator=gen, requires_grad=True)

    def quad(u, S):
        return quadratic_form(u, 0.5 * (S + S.transpose(1, 2)))

    assert_close_rel(quad(b, S0), torch.einsum("oji,nj,ni->no", S0, b, b))
    assert torch.autograd.gradcheck(quad, (b, S0))
    assert torch.autograd.gradcheck(lambda u: quad(u, S0.detach()), (b,))
    # leading dimensions and an empty input
    a3, b3 = a.detach().reshape(1, 7, 3), b.detach().reshape(1, 7, 4)
    assert bilinear_form(a3, b3, W).shape == (1, 7, 5)
    assert quadratic_form(b[:0].detach(), S0).shape == (0, 5)


def test_nothing_quadratic_in_width_is_kept_per_token():
    """Tensors saved for the backward grow by O(H + P) per token, not by H^2 or P H."""
    Hw = 64
    m = S7(Hw, 8)

    def saved_per_token(L):
        storages = {}

        def pack(t):  # a tensor saved by several nodes is counted once
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(torch.randn(2, L, Hw), integration_timesteps=torch.rand(2, L))
        return sum(storages.values()) / 4  # float32 elements

    growth = (saved_per_token(96) - saved_per_token(32)) / (2 * 64)
    assert growth < Hw * Hw / 8, growth  # the explicit products saved H^2 + 2 P H per token


# ---------------------------------------------------------------------------------------------
# the paper's version: the chunked evaluation equals the explicit products


def _outer(m):
    ref = OuterProductS7(H, N, J=2, discretization=m.discretization, conj_sym=m.conj_sym)
    ref = ref.to(F64)
    ref.load_state_dict(m.state_dict())
    return ref


@pytest.mark.parametrize("conj_sym", [False, True])
def test_paper_version_equals_explicit_products(small_chunks, conj_sym):
    m = make(conj_sym=conj_sym)
    ref = _outer(m)
    L = 13
    x, ts = torch.randn(3, L, H, dtype=F64), tv.rand_timesteps(3, L).double()
    lengths = torch.tensor([13, 6, 0])
    y, y_ref, g, g_ref, names = _run_both(m, ref, x, integration_timesteps=ts, lengths=lengths)
    assert_close_rel(y, y_ref, length=L, msg="y")
    _compare_grads(g, g_ref, names)


def test_paper_version_packed_equals_explicit_products(small_chunks):
    m = make()
    ref = _outer(m)
    cu = torch.tensor([0, 5, 5, 12, 17])
    x, ts = torch.randn(1, 17, H, dtype=F64), tv.rand_timesteps(1, 17).double()
    h0 = torch.randn(4, m.n_state, dtype=torch.complex128)
    ys, states = [], []
    for model in (m, ref):
        cache = model.allocate_inference_cache(4)
        cache["lrnn_state"].copy_(h0)
        ys.append(model(x, ts, inference_cache=cache, cu_seqlens=cu))
        states.append(cache["lrnn_state"])
    assert_close_rel(ys[0], ys[1], length=17, msg="y")
    assert_close_rel(states[0], states[1], length=17, msg="final states")
    names = [n for n, _ in m.named_parameters()]
    _compare_grads(
        _grads(m, ys[0], list(m.parameters())), _grads(ref, ys[1], list(ref.parameters())), names
    )


def test_paper_version_step_equals_forward_and_explicit_step(small_chunks):
    m = make()
    ref = _outer(m)
    x, ts = torch.randn(3, 9, H, dtype=F64), tv.rand_timesteps(3, 9).double()
    ys, _ = tv.step_all(m, x, ts)
    assert_close_rel(ys, m(x, integration_timesteps=ts), length=9, msg="step vs forward")
    ys_ref, _ = tv.step_all(ref, x, ts)
    assert_close_rel(ys, ys_ref, length=9, msg="step vs explicit step")
    # a float32 model stepping a complex128 state: the readout runs in the state's precision
    m32 = copy.deepcopy(m).float()
    cache = m32.allocate_inference_cache(3, dtype=F64)
    y1, _ = m32.step(x[:, 0].float(), cache)
    assert cache["lrnn_state"].dtype == torch.complex128 and y1.dtype == torch.float32
    assert_close_rel(y1, m(x[:, :1])[:, 0].float(), msg="float32 model, wide state")


# ---------------------------------------------------------------------------------------------
# the low-rank option


def lowrank_loop(m, x, ts=None, h=None):
    """Float64 loop of the low-rank equations (module docstring):
    B_k u = B u + U_B ((R_B u) * (V_B u)),  C_k x = C x + U_C ((R_C u) * (V_C x)),
    Delta_k, Lambda, A_bar_k, gamma_bar_k and D_k as in the paper (test_ltv_s5_s7.s7_loop)."""
    x = x.double()
    w = m.Lambda_w.double()
    lam = -1.0 / (m.reparam_a * w**2 + m.reparam_b) + 1j * m.Lambda_im.double()
    B0, C0 = tv._cplx(m.B), tv._cplx(m.C)
    R_B, V_B = m.B_proj_in[0].double(), m.B_proj_in[1].double()
    U_B, U_C, V_C = tv._cplx(m.B_proj_out), tv._cplx(m.C_proj_out), tv._cplx(m.C_proj_state)
    R_C = m.C_proj_in.double()
    D0, WD = m.D.double(), m.D_proj.double()
    Wr, Wdt, bdt = m.dt_down.weight.double(), m.dt_proj.weight.double(), m.dt_proj.bias.double()
    scale = 2.0 if m.conj_sym else 1.0
    h = torch.zeros(x.shape[0], lam.shape[0], dtype=torch.complex128) if h is None else h
    ys = []
    for k in range(x.shape[1]):
        u = x[:, k]
        dt = torch.ones(x.shape[0], 1, dtype=F64) if ts is None else ts[:, k, None].double()
        step = m.step_rescale * F.softplus(u @ Wr.T @ Wdt.T + bdt)
        A, g = tv._rule(m.discretization, lam, step, dt)
        Bu = u.to(B0.dtype) @ B0.T + ((u @ R_B.T) * (u @ V_B.T)).to(U_B.dtype) @ U_B.T
        h = A * h + g * Bu
        Cx = h @ C0.T + ((u @ R_C.T).to(h.dtype) * (h @ V_C.T)) @ U_C.T
        ys.append(scale * Cx.real + (D0 + u @ WD.T) * u)
    return torch.stack(ys, 1), h


@pytest.mark.parametrize("conj_sym", [False, True])
@pytest.mark.parametrize("disc", ["async", "zoh", "bilinear", "dirac"])
def test_lowrank_matches_its_loop(disc, conj_sym):
    m = make(bc_rank=R, conj_sym=conj_sym, disc=disc)
    x, ts = torch.randn(2, 20, H, dtype=F64), tv.rand_timesteps(2, 20).double()
    xa = x.clone().requires_grad_()
    y = m(xa, integration_timesteps=ts)
    ref, h = lowrank_loop(m, xa, ts)
    assert_close_rel(y, ref, length=20, msg="y")
    names = [n for n, _ in m.named_parameters()] + ["x"]
    inputs = list(m.parameters()) + [xa]
    _compare_grads(_grads(m, y, inputs), _grads(m, ref, inputs), names)
    m32 = copy.deepcopy(m).float()  # float32 against the same loop
    assert_close_rel(m32(x.float(), ts.float()), ref.float(), length=20, msg="float32")


def test_lowrank_gradcheck():
    m = S7(3, 4, discretization="async", bc_rank=2, dtype=F64)
    names, params = zip(*m.named_parameters(), strict=True)
    x, ts = torch.randn(2, 4, 3, dtype=F64), torch.rand(2, 4, dtype=F64) + 0.1

    def f(x_, *ps):
        return functional_call(m, dict(zip(names, ps, strict=True)), (x_, ts))

    inputs = (x.requires_grad_(),) + tuple(p.detach().clone().requires_grad_() for p in params)
    assert torch.autograd.gradcheck(f, inputs)


def test_lowrank_equals_paper_version_with_cp_maps():
    """The rank-r maps are the paper's W_B, W_C with CP-factorised weights."""
    low = make(bc_rank=R)
    full = S7(H, N, J=2, dtype=F64)
    state = {k: v for k, v in low.state_dict().items() if "_proj_" not in k}
    U_B, U_C, V_C = (
        torch.view_as_complex(low.get_parameter(n).detach())
        for n in ("B_proj_out", "C_proj_out", "C_proj_state")
    )
    R_B, V_B, R_C = low.B_proj_in[0].detach(), low.B_proj_in[1].detach(), low.C_proj_in.detach()
    W_B = torch.einsum("ps,sh,si->phi", U_B, R_B.to(U_B.dtype), V_B.to(U_B.dtype))
    W_C = torch.einsum("hs,sp,si->hpi", U_C, V_C, R_C.to(U_C.dtype))
    state["B_proj"], state["C_proj"] = torch.view_as_real(W_B), torch.view_as_real(W_C)
    full.load_state_dict(state)
    x, ts = torch.randn(2, 15, H, dtype=F64), tv.rand_timesteps(2, 15).double()
    assert_close_rel(low(x, ts), full(x, ts), length=15)


def test_lowrank_step_prefill_lengths_and_packed():
    m = make(bc_rank=R)
    x, ts = torch.randn(3, 24, H, dtype=F64), tv.rand_timesteps(3, 24).double()
    full = m(x, ts)
    ys, cache = tv.step_all(m, x, ts)
    assert_close_rel(ys, full, length=24, msg="step vs forward")
    cache = m.allocate_inference_cache(3)
    y_pre = m(x[:, :10], ts[:, :10], inference_cache=cache)
    y_rest, cache = tv.step_all(m, x[:, 10:], ts[:, 10:], cache)
    assert_close_rel(torch.cat([y_pre, y_rest], 1), full, length=24, msg="prefill + steps")
    # lengths: each row equals the row alone, cut at its length; padding stays zero
    lengths = torch.tensor([24, 9, 0])
    y = m(x, ts, lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        assert torch.all(y[b, n:] == 0)
        if n:
            assert_close_rel(y[b, :n], m(x[b : b + 1, :n], ts[b : b + 1, :n])[0], length=n)
    # packed sequences: each equals the sequence alone
    cu = torch.tensor([0, 7, 7, 24])
    xp, tp = x[:1], ts[:1]
    yp = m(xp, tp, cu_seqlens=cu)
    for s, e in ((0, 7), (7, 24)):
        assert_close_rel(yp[:, s:e], m(xp[:, s:e], tp[:, s:e]), length=e - s, msg=f"[{s}:{e}]")


def test_lowrank_bf16_autocast():
    m = S7(H, N, J=2, bc_rank=R, discretization="zoh")
    x = torch.randn(2, 30, H)
    y32 = m(x.bfloat16().float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert_close_rel(y, y32, dtype=torch.bfloat16)


def test_lowrank_init_variance_matches_paper_version():
    """For unit-variance u and a state x, the input-dependent parts of B_k u and C_k x have
    the paper version's mean square (the module docstring's initialisation)."""
    Hw, n = 128, 4096
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(n, Hw, generator=gen)
    x = torch.complex(torch.randn(n, 16, generator=gen), torch.randn(n, 16, generator=gen))
    power = {}
    for rank in (None, 8):
        torch.manual_seed(2)
        m = S7(Hw, 16, bc_rank=rank)
        p = m._tensors()
        with torch.no_grad():  # the models' own terms, minus the constant parts
            Bu = m._input(p, u) - torch.complex(*F.linear(u, p["B"]).chunk(2, dim=-1))
            a = torch.cat([x.real, -x.imag], dim=-1)
            Cx = m._output(p, x, u) - F.linear(a, p["C"]) - (m.D + F.linear(u, m.D_proj)) * u
        power[rank] = (Bu.abs().square().mean().item(), Cx.square().mean().item())
    for full, low, what in zip(power[None], power[8], ("B", "C"), strict=True):
        assert 0.75 < low / full < 1.33, (what, low, full)


def test_lowrank_save_and_load(tmp_path):
    lm = LRNNLMHeadModel(16, 8, 2, 37, "s7", mixer_kwargs={"bc_rank": 4}, d_intermediate=8)
    lm = lm.double().eval()
    ids = torch.randint(0, 37, (2, 9))
    y = lm(ids)
    lm.save_pretrained(tmp_path)
    loaded = LRNNLMHeadModel.from_pretrained(tmp_path)
    mixers = [mod for mod in loaded.modules() if isinstance(mod, S7)]
    assert len(mixers) == 2 and all(mod.bc_rank == 4 for mod in mixers)
    assert not any(n.endswith(".B_proj") for n, _ in loaded.named_parameters())
    with torch.no_grad():
        assert_close_rel(loaded(ids), y, msg="loaded")


def test_bc_rank_argument():
    assert S7(64, 8, bc_rank="auto").bc_rank == 4
    assert S7(H, N, bc_rank=1).B_proj_in.shape == (2, 1, H)
    for bad in (0, -2):
        with pytest.raises(ValueError, match="^bc_rank"):
            S7(H, N, bc_rank=bad)
    for bad in (2.0, True, "full"):
        with pytest.raises(TypeError, match="^bc_rank"):
            S7(H, N, bc_rank=bad)
