"""RG-LRU block (Griffin, arXiv 2402.19427) against a float64 loop of the paper's equations."""

from __future__ import annotations

import math

import pytest
import torch

from _tol import assert_close_rel
from lrnnx.models.ltv.rglru import RGLRU


def _randomize(model: RGLRU, seed: int, ac_range=(0.3, 0.999)) -> RGLRU:
    """Non-trivial parameters everywhere (the Griffin init makes the conv tiny and a ~ 1), with
    a^c spread over ``ac_range`` so that fast and slow channels are both exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "Lambda":
                lo, hi = ac_range
                ac = lo + (hi - lo) * torch.rand(p.shape, generator=g, dtype=torch.float64)
                a = ac ** (1.0 / model.c)
                p.copy_(torch.log(a / (1 - a)))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return model


def _gelu_tanh(z):
    return 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))


def _gelu_erf(z):
    return 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))


def _dense_gate(bdl):
    """The block-diagonal gate as a dense (D, D) matrix acting as x @ W, and its bias."""
    return torch.block_diag(*bdl.weight.double()), bdl.bias.double()


def _naive_rglru(model, xc, h0=None, reset=False):
    """h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t x_t) with a_t = sigmoid(Lambda)^(c r_t).

    reset: Griffin's segment start at t = 0 instead: h_0 = i_0 x_0 (h0 is ignored there)."""
    Wa, ba = _dense_gate(model.recurrent_gate_proj)
    Wx, bx = _dense_gate(model.input_gate_proj)
    a = torch.sigmoid(model.Lambda.double())
    xc = xc.double()
    B, L, D = xc.shape
    h = torch.zeros(B, D, dtype=torch.float64) if h0 is None else h0.double().clone()
    out = []
    for t in range(L):
        x_t = xc[:, t]
        r_t = torch.sigmoid(x_t @ Wa + ba)
        i_t = torch.sigmoid(x_t @ Wx + bx)
        a_t = a ** (model.c * r_t)
        if reset and t == 0:
            h = i_t * x_t
        else:
            h = a_t * h + torch.sqrt(1 - a_t**2) * (i_t * x_t)
        out.append(h)
    return torch.stack(out, 1), h


def _naive_block(model, x, h0=None, conv0=None, reset=False):
    """Whole Griffin recurrent block, one timestep at a time, in float64.

    conv0 (B, D, K-1): the conv inputs before t = 0 (zeros when None); reset: Griffin's
    segment reset at t = 0 (see _naive_rglru).  The GeLU is the model's (tanh or erf).
    Returns (y, final h, last K-1 conv inputs).  The parameters are not detached: test_gradients.py
    differentiates this loop."""
    f = lambda t: None if t is None else t.double()  # noqa: E731
    Wg, bg = f(model.gate_proj.weight), f(model.gate_proj.bias)
    Wi, bi = f(model.in_proj.weight), f(model.in_proj.bias)
    Wo, bo = f(model.out_proj.weight), f(model.out_proj.bias)
    w, cb = f(model.conv1d.weight)[:, 0, :], f(model.conv1d.bias)  # (D, K)
    x = x.double()
    B, L, _ = x.shape
    D, K = w.shape
    lin = lambda v, W, b: v @ W.T + (0 if b is None else b)  # noqa: E731
    hist = [torch.zeros(B, D, dtype=torch.float64) for _ in range(K - 1)]
    if conv0 is not None:
        hist = [conv0[:, :, k].double() for k in range(K - 1)]
    xcs, gates = [], []
    for t in range(L):
        hist.append(lin(x[:, t], Wi, bi))
        xc = sum(w[:, k] * hist[len(hist) - K + k] for k in range(K))
        xcs.append(xc + (0 if cb is None else cb))
        gelu = _gelu_erf if model.gelu_approximate == "none" else _gelu_tanh
        gates.append(gelu(lin(x[:, t], Wg, bg)))
    h, hL = _naive_rglru(model, torch.stack(xcs, 1), h0, reset=reset)
    y = lin(torch.stack(gates, 1) * h, Wo, bo)
    conv_tail = torch.stack(hist[len(hist) - (K - 1) :], -1) if K > 1 else x.new_zeros(B, D, 0)
    return y, hL, conv_tail


# ----------------------------------------------------------------------------------------------


def test_rglru_recurrence_matches_naive_float64():
    torch.manual_seed(0)
    m = _randomize(RGLRU(6, lru_width=12, num_heads=3), seed=1).double()
    xc = torch.randn(3, 70, 12, dtype=torch.float64)
    h0 = torch.randn(3, 12, dtype=torch.float64)
    ref, _ = _naive_rglru(m, xc, h0)
    got = m.rg_lru(xc, initial_state=h0)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    # the recurrence really carries state: a different h0 changes the output
    assert (m.rg_lru(xc) - got).abs().max() > 1e-3


@pytest.mark.parametrize(
    "kw",
    [
        dict(d_model=6, lru_width=12, num_heads=3, bias=True),
        dict(d_model=5, d_conv=3, expand=2, num_heads=1, conv_bias=False),
        dict(d_model=4, d_conv=1, num_heads=2),
    ],
)
def test_block_matches_naive_float64(kw):
    torch.manual_seed(0)
    m = _randomize(RGLRU(**kw), seed=2).double()
    x = torch.randn(2, 40, kw["d_model"], dtype=torch.float64)
    y_ref, h_ref, conv_ref = _naive_block(m, x)
    cache = m.allocate_inference_cache(2, 40)
    y = m(x, inference_cache=cache)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cache["lrnn_state"], h_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cache["conv_state"], conv_ref, rtol=1e-12, atol=1e-14)
    assert cache["seqlen_offset"] == 40


def test_sqrt_normaliser_is_accurate_near_one_in_float32():
    # a^c = 1 - 1e-7: sqrt(1 - a_t^2) computed as 1 - a_t**2 in float32 would lose most digits
    torch.manual_seed(0)
    m = _randomize(RGLRU(8, num_heads=2), seed=3, ac_range=(1 - 2e-7, 1 - 1e-7))
    xc = torch.randn(2, 30, 8)
    got = m.rg_lru(xc)
    ref, _ = _naive_rglru(m, xc)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-9)
    # for contrast: 1 - a^2 formed directly in float32 loses (here: all) digits
    lam = m.Lambda.detach()
    direct = 1 - (torch.sigmoid(lam) ** m.c) ** 2
    exact = -torch.expm1(2 * m.c * torch.nn.functional.logsigmoid(lam.double()))
    assert (direct.double() / exact - 1).abs().max() > 1e-2
    # and the gradient through the normaliser stays finite
    xc.requires_grad_(True)
    m.rg_lru(xc).sum().backward()
    assert torch.isfinite(m.Lambda.grad).all() and torch.isfinite(xc.grad).all()


@pytest.mark.slow  # a long sequence (L >= 2048) stepped token by token: make test-slow
def test_step_matches_forward_long():
    torch.manual_seed(0)
    m = RGLRU(8, num_heads=2)
    _randomize(m, seed=4)
    with torch.no_grad():  # keep the paper's slow decays (a^c in [0.9, 0.999]) for long memory
        ac = 0.9 + 0.099 * torch.rand(m.lru_width, dtype=torch.float64)
        a = ac ** (1 / m.c)
        m.Lambda.copy_(torch.log(a / (1 - a)))
    L = 2048
    x = torch.randn(2, L, 8)
    with torch.no_grad():
        y = m(x)
        cache = m.allocate_inference_cache(2, L)
        ys = [m.step(x[:, t : t + 1], cache)[0] for t in range(L)]
    y_step = torch.cat(ys, 1)
    scale = y.abs().max()
    assert (y_step - y).abs().max() <= 2e-5 * scale
    assert cache["seqlen_offset"] == L


def test_step_keeps_input_shape():
    m = RGLRU(8, num_heads=2)
    cache = m.allocate_inference_cache(3, 4)
    x = torch.randn(3, 1, 8)
    y3, c = m.step(x, cache)
    assert y3.shape == (3, 1, 8) and c is cache
    y2, _ = m.step(torch.randn(3, 8), cache)
    assert y2.shape == (3, 8)
    assert cache["seqlen_offset"] == 2


@pytest.mark.parametrize("prompt_len", [1, 2, 17])
def test_prefill_then_steps_and_chunks_equal_whole(prompt_len):
    torch.manual_seed(0)
    m = _randomize(RGLRU(6, lru_width=8, num_heads=4, d_conv=4, bias=True), seed=5).double()
    x = torch.randn(2, 30, 6, dtype=torch.float64)
    y = m(x)
    cache = m.allocate_inference_cache(2, 30)
    y_p = m(x[:, :prompt_len], inference_cache=cache)
    ys = [m.step(x[:, t], cache)[0] for t in range(prompt_len, 30)]
    torch.testing.assert_close(torch.cat([y_p, torch.stack(ys, 1)], 1), y, rtol=1e-10, atol=1e-12)
    # forward in chunks continues the same way
    cache = m.allocate_inference_cache(2, 30)
    chunks = [
        m(x[:, s:e], inference_cache=cache)
        for s, e in [(0, prompt_len), (prompt_len, 25), (25, 30)]
    ]
    torch.testing.assert_close(torch.cat(chunks, 1), y, rtol=1e-10, atol=1e-12)
    assert cache["seqlen_offset"] == 30
    _, h_ref, conv_ref = _naive_block(m, x)
    torch.testing.assert_close(cache["lrnn_state"], h_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cache["conv_state"], conv_ref, rtol=1e-12, atol=1e-14)


def test_lengths_no_leakage_and_final_states():
    torch.manual_seed(0)
    m = _randomize(RGLRU(6, lru_width=8, num_heads=2, bias=True), seed=6).double()
    L = 12
    lengths = torch.tensor([12, 7, 2, 0])
    x = torch.randn(4, L, 6, dtype=torch.float64)
    for b, n in enumerate(lengths.tolist()):
        x[b, n:] = float("nan")  # padding must not reach anything
    prompt = torch.randn(4, 5, 6, dtype=torch.float64)

    cache = m.allocate_inference_cache(4, L)
    m(prompt, inference_cache=cache)  # start from non-zero states
    y = m(x, lengths=lengths, inference_cache=cache)
    assert torch.isfinite(y).all()
    h_end, conv_end = cache["lrnn_state"].clone(), cache["conv_state"].clone()
    nxt = torch.randn(4, 6, dtype=torch.float64)
    y_next, _ = m.step(nxt, cache)

    for b, n in enumerate(lengths.tolist()):
        assert (y[b, n:] == 0).all()
        alone = m.allocate_inference_cache(1, L)
        m(prompt[b : b + 1], inference_cache=alone)
        if n > 0:
            y_alone = m(x[b : b + 1, :n], inference_cache=alone)
            torch.testing.assert_close(y[b : b + 1, :n], y_alone, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(h_end[b : b + 1], alone["lrnn_state"], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(conv_end[b : b + 1], alone["conv_state"], rtol=1e-12, atol=1e-14)
        y_next_alone, _ = m.step(nxt[b : b + 1], alone)
        torch.testing.assert_close(y_next[b : b + 1], y_next_alone, rtol=1e-12, atol=1e-14)

    # without a cache: same outputs
    y_nc = m(x, lengths=lengths)
    torch.testing.assert_close(y_nc[0], m(x[:1])[0], rtol=1e-12, atol=1e-14)
    assert (y_nc[3] == 0).all()


def test_init_a_pow_c_uniform_in_paper_range():
    torch.manual_seed(0)
    m = RGLRU(16, lru_width=4096, num_heads=64)
    lam = m.Lambda.detach().double()
    ac = torch.sigmoid(lam) ** m.c
    assert m.Lambda.dtype == torch.float32
    assert ac.min() >= 0.9 - 1e-6 and ac.max() <= 0.999 + 1e-6
    assert ac.min() < 0.902 and ac.max() > 0.997
    # uniform: mean and every tenth of the interval match U[0.9, 0.999]
    assert abs(ac.mean().item() - 0.9495) < 3e-3
    counts = torch.histc(ac, bins=10, min=0.9, max=0.999)
    assert ((counts - 409.6).abs() < 100).all(), counts
    # it is a^c, not a, that lies in the range (a itself is much closer to 1)
    assert torch.sigmoid(lam).min() > 0.98
    # another range and c
    m2 = RGLRU(4, lru_width=2000, num_heads=1, c=4.0, a_init_range=(0.5, 0.6))
    ac2 = torch.sigmoid(m2.Lambda.detach().double()) ** 4
    assert ac2.min() >= 0.5 - 1e-6 and ac2.max() <= 0.6 + 1e-6 and ac2.max() - ac2.min() > 0.09


# every parameter's gradient against this file's float64 loop: test_gradients.py


def test_bf16_autocast_accumulates_in_float32():
    torch.manual_seed(0)
    m = _randomize(RGLRU(16, num_heads=2, bias=True), seed=7)
    x = torch.randn(2, 64, 16)
    with torch.no_grad():
        y32 = m(x)
        cache = m.allocate_inference_cache(2, 64, dtype=torch.bfloat16)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            y = m(x[:, :60], inference_cache=cache)
            ys = [m.step(x[:, t : t + 1], cache)[0] for t in range(60, 64)]
    y = torch.cat([y] + ys, 1)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()
    assert cache["lrnn_state"].dtype == torch.float32
    assert cache["conv_state"].dtype == torch.bfloat16
    # the projections run in bf16 (a few roundings); the state in float32 (test_bf16.py checks
    # that a bf16 state would not pass)
    assert_close_rel(y, y32, dtype=torch.bfloat16, factor=2)


def test_integration_timesteps_rejected():
    m = RGLRU(4, num_heads=1)
    x = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="integration_timesteps"):
        m(x, integration_timesteps=torch.ones(2, 5))


def test_bad_inputs_name_the_argument():
    m = RGLRU(4, num_heads=2)
    with pytest.raises(ValueError, match=r"^x: .*\(B, L, 4\)"):
        m(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"^x: .*\(2, 5, 3\)"):
        m(torch.randn(2, 5, 3))
    with pytest.raises(TypeError, match=r"^x: "):
        m(torch.ones(2, 5, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^lengths: "):
        m(torch.randn(2, 5, 4), lengths=torch.tensor([1, 2, 3]))
    cache = m.allocate_inference_cache(3, 5)
    with pytest.raises(ValueError, match=r"inference_cache\['lrnn_state'\]"):
        m(torch.randn(2, 5, 4), inference_cache=cache)
    with pytest.raises(ValueError, match=r"^x: "):
        m.step(torch.randn(3, 2, 4), cache)
    with pytest.raises(ValueError, match=r"^x: "):
        m.step(torch.randn(3, 5), cache)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="num_heads"):
        RGLRU(6, num_heads=4)
    with pytest.raises(ValueError, match="d_state"):
        RGLRU(6, d_state=16)
    with pytest.raises(ValueError, match="a_init_range"):
        RGLRU(6, a_init_range=(0.9, 1.0))
    with pytest.raises(ValueError, match="expand"):
        RGLRU(6, lru_width=12, expand=2)
    with pytest.raises(ValueError, match="d_conv"):
        RGLRU(6, d_conv=0)
    ok = RGLRU(6, d_state=1, expand=2)
    assert ok.lru_width == 12 and ok.allocate_inference_cache(2, 1)["lrnn_state"].shape == (2, 12)


# ----------------------------------------------------------------------------------------------
# Griffin's segment reset (reset_at_start=True): a_0 = 0 and no sqrt(1 - a_0^2) at t = 0


def _reset_model(seed: int = 8, **kw) -> RGLRU:
    kw = dict(d_model=5, lru_width=8, num_heads=2, bias=True, reset_at_start=True, **kw)
    return _randomize(RGLRU(**kw), seed=seed).double()


@pytest.mark.parametrize("use_fast_path", [True, False], ids=["fast", "torch"])
@pytest.mark.parametrize("gelu", ["tanh", "none"])
def test_reset_forward_matches_naive_float64(use_fast_path, gelu):
    torch.manual_seed(0)
    m = _reset_model(use_fast_path=use_fast_path, gelu_approximate=gelu)
    x = torch.randn(3, 25, 5, dtype=torch.float64)
    y_ref, h_ref, conv_ref = _naive_block(m, x, reset=True)
    torch.testing.assert_close(m(x), y_ref, rtol=1e-10, atol=1e-12)
    cache = m.allocate_inference_cache(3, 25)
    assert not cache["started"].any()
    torch.testing.assert_close(m(x, inference_cache=cache), y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cache["lrnn_state"], h_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cache["conv_state"], conv_ref, rtol=1e-12, atol=1e-14)
    assert cache["started"].all()
    # the recurrence alone ignores its initial state at the reset step
    xc = torch.randn(3, 9, 8, dtype=torch.float64)
    h0 = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(
        m.rg_lru(xc, initial_state=h0), _naive_rglru(m, xc, reset=True)[0], rtol=1e-10, atol=1e-12
    )
    # the option matters: the paper's update at t = 0 gives other outputs
    y_paper, _, _ = _naive_block(m, x)
    assert (y_paper[:, 0] - y_ref[:, 0]).abs().max() > 1e-2 * y_ref[:, 0].abs().max()


@pytest.mark.parametrize("prompt_len", [0, 1, 6])
def test_reset_prefill_then_steps_resets_once(prompt_len):
    torch.manual_seed(0)
    m = _reset_model(seed=9)
    L = 14
    x = torch.randn(2, L, 5, dtype=torch.float64)
    y_ref, h_ref, _ = _naive_block(m, x, reset=True)
    cache = m.allocate_inference_cache(2, L)
    ys = [m(x[:, :prompt_len], inference_cache=cache)] if prompt_len else []
    ys += [m.step(x[:, t], cache)[0][:, None] for t in range(prompt_len, L)]
    torch.testing.assert_close(torch.cat(ys, 1), y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cache["lrnn_state"], h_ref, rtol=1e-10, atol=1e-12)
    # chunked prefills reset only in the first chunk
    cache = m.allocate_inference_cache(2, L)
    chunks = [m(x[:, s:e], inference_cache=cache) for s, e in [(0, 3), (3, 4), (4, L)]]
    torch.testing.assert_close(torch.cat(chunks, 1), y_ref, rtol=1e-10, atol=1e-12)


def test_reset_lengths_rows_start_independently():
    torch.manual_seed(0)
    m = _reset_model(seed=10)
    L, lengths = 9, torch.tensor([9, 4, 0])
    x = torch.randn(3, L, 5, dtype=torch.float64)
    for b, n in enumerate(lengths.tolist()):
        x[b, n:] = float("nan")  # padding must not reach anything
    cache = m.allocate_inference_cache(3, L)
    y = m(x, lengths=lengths, inference_cache=cache)
    assert cache["started"].tolist() == [True, True, False]
    nxt = torch.randn(3, 5, dtype=torch.float64)
    y_next, _ = m.step(nxt, cache)  # row 2 takes its reset step now, the others continue
    assert cache["started"].all()
    for b, n in enumerate(lengths.tolist()):
        assert (y[b, n:] == 0).all()
        seq = torch.cat([x[b : b + 1, :n], nxt[b : b + 1, None]], 1)
        y_ref, _, _ = _naive_block(m, seq, reset=True)
        torch.testing.assert_close(y[b : b + 1, :n], y_ref[:, :n], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(y_next[b : b + 1], y_ref[:, n], rtol=1e-10, atol=1e-12)
    # without a cache: every row resets at its first step
    y_nc = m(x, lengths=lengths)
    torch.testing.assert_close(y_nc, y, rtol=1e-12, atol=1e-14)


def test_reset_gradients_float64():
    torch.manual_seed(0)
    m = _reset_model(seed=11, d_conv=2)
    B, L = 2, 5
    x = torch.randn(B, L, 5, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([5, 3])
    # every parameter's gradient against the loop's autograd gradient
    W = torch.randn(B, L, 5, dtype=torch.float64)
    params = dict(m.named_parameters())
    got = torch.autograd.grad((m(x) * W).sum(), list(params.values()))
    exp = torch.autograd.grad((_naive_block(m, x, reset=True)[0] * W).sum(), list(params.values()))
    for name, g, e in zip(params, got, exp, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12, msg=name)

    # finite differences through x, Lambda and a recurrence gate: forward with lengths
    def forward(x_, lam, wa):
        p = {"Lambda": lam, "recurrent_gate_proj.weight": wa}
        return torch.func.functional_call(m, p, (x_,), {"lengths": lengths})

    lam = m.Lambda.detach().clone().requires_grad_(True)
    wa = m.recurrent_gate_proj.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(forward, (x, lam, wa))

    # through x with a cache (its states are constants: no gradient flows across calls):
    # a prefill, the reset step of a fresh cache, and a step after a prefill
    x0 = x.detach()

    def cached(x_, prompt_len):
        cache = m.allocate_inference_cache(B, L)
        if prompt_len:
            with torch.no_grad():
                m(x0[:, :prompt_len], inference_cache=cache)
        if x_.dim() == 2:
            return m.step(x_, cache)[0]
        return m(x_, inference_cache=cache)

    assert torch.autograd.gradcheck(lambda x_: cached(x_, 0), (x,))
    assert torch.autograd.gradcheck(lambda x_: cached(x_, 0), (x[:, 0],))
    assert torch.autograd.gradcheck(lambda x_: cached(x_, 2), (x[:, 2],))


def test_reset_bad_arguments_and_cache():
    with pytest.raises(TypeError, match=r"^reset_at_start: .*got 1 \(int\)"):
        RGLRU(4, reset_at_start=1)
    with pytest.raises(ValueError, match=r"^gelu_approximate: .*'erf'"):
        RGLRU(4, gelu_approximate="erf")
    m = RGLRU(4, reset_at_start=True)
    cache = m.allocate_inference_cache(2, 3)
    del cache["started"]
    with pytest.raises(ValueError, match=r"missing entries \['started'\]"):
        m.step(torch.randn(2, 4), cache)
    cache["started"] = torch.zeros(3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"inference_cache\['started'\]: allocated for batch"):
        m(torch.randn(2, 3, 4), inference_cache=cache)
    cache["started"] = torch.zeros(2)
    with pytest.raises(TypeError, match=r"inference_cache\['started'\]: .*torch.bool.*float32"):
        m.step(torch.randn(2, 4), cache)
