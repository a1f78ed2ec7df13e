"""Bidirectional mixers (lrnnx.layers.Bidirectional, build_mixer(bidirectional=True), the
architectures' flags) and selective_scan_fn(reverse=True) on every available backend."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor

import lrnnx.ops.selective_scan.torch as ss_torch
from _scan_inputs import make_scan_inputs
from _tol import assert_close_rel
from lrnnx.architectures import Classifier, LRNNLMHeadModel, UNet
from lrnnx.layers import Bidirectional, Block
from lrnnx.layers.bidirectional import (
    NoStreamingError,
    reverse_timesteps,
    reverse_within_lengths,
)
from lrnnx.models.registry import MODEL_REGISTRY, available_models, build_mixer
from lrnnx.ops import _dispatch, selective_scan_fn

MIXERS = sorted(set(available_models()) | {"attn"})
EVENT = [n for n in available_models() if MODEL_REGISTRY[n].supports_timesteps]
D, N, L = 8, 4, 9
LENGTHS = [9, 5, 1]


def make_bi(mixer: str) -> Bidirectional:
    bi = build_mixer(mixer, D, N, bidirectional=True)
    assert isinstance(bi, Bidirectional)
    return bi.double()


def rand_x(batch: int = 3, seqlen: int = L) -> Tensor:
    return torch.randn(batch, seqlen, D, dtype=torch.float64)


def rand_ts(batch: int = 3, seqlen: int = L) -> Tensor:
    return 0.2 + torch.rand(batch, seqlen, dtype=torch.float64)


# ------------------------------------------------------------------------- the wrapper


@pytest.mark.parametrize("mixer", MIXERS)
def test_full_length_is_forward_plus_flipped_backward(mixer):
    bi = make_bi(mixer)
    x = rand_x()
    expected = bi.fwd(x) + bi.bwd(x.flip(1)).flip(1)
    assert_close_rel(bi(x), expected, length=L, msg=mixer)
    # the two directions are independent mixers
    fwd_ptrs = {p.data_ptr() for p in bi.fwd.parameters()}
    assert not fwd_ptrs & {p.data_ptr() for p in bi.bwd.parameters()}


@pytest.mark.parametrize("mixer", MIXERS)
def test_lengths_equal_each_sequence_alone_and_padding_is_zero(mixer):
    bi = make_bi(mixer)
    x, lengths = rand_x(), torch.tensor(LENGTHS)
    y = bi(x, lengths=lengths)
    for b, n in enumerate(LENGTHS):
        one = bi(x[b : b + 1, :n])
        assert_close_rel(y[b, :n], one[0], length=L, msg=f"{mixer} sequence {b}")
        assert torch.equal(y[b, n:], torch.zeros_like(y[b, n:])), mixer


@pytest.mark.parametrize("mixer", MIXERS)
def test_nan_padding_changes_nothing(mixer):
    bi = make_bi(mixer)
    lengths = torch.tensor(LENGTHS)
    x = rand_x()
    ts = rand_ts() if mixer in EVENT else None
    x_nan, ts_nan = x.clone(), None if ts is None else ts.clone()
    for b, n in enumerate(LENGTHS):
        x_nan[b, n:] = float("nan")
        if ts_nan is not None:
            ts_nan[b, n:] = float("nan")
    w = torch.randn(3, L, D, dtype=torch.float64)

    def run(xin, tsin):
        xin = xin.clone().requires_grad_(True)
        bi.zero_grad()
        y = bi(xin, integration_timesteps=tsin, lengths=lengths)
        (y * w).sum().backward()
        grads = [p.grad.clone() for p in bi.parameters() if p.grad is not None]
        return y.detach(), xin.grad, grads

    y, gx, gp = run(x, ts)
    y2, gx2, gp2 = run(x_nan, ts_nan)
    assert_close_rel(y2, y, length=L, msg=mixer)
    assert_close_rel(gx2, gx, length=L, msg=mixer)
    assert len(gp) == len(gp2) > 0
    for a, b in zip(gp2, gp, strict=True):
        assert_close_rel(a, b, length=L, msg=mixer)
    for b, n in enumerate(LENGTHS):
        assert torch.equal(y2[b, n:], torch.zeros_like(y2[b, n:]))
        assert torch.equal(gx2[b, n:], torch.zeros_like(gx2[b, n:]))


@pytest.mark.parametrize("mixer", MIXERS)
def test_output_depends_on_later_inputs(mixer):
    bi = make_bi(mixer)
    x = rand_x(2)
    x2 = x.clone()
    x2[:, -1] += 1.0
    y, y2 = bi(x), bi(x2)
    assert (y[:, 0] - y2[:, 0]).abs().max() > 1e-6, mixer  # t = 0 sees t = L - 1
    causal = build_mixer(mixer, D, N).double()
    torch.testing.assert_close(causal(x)[:, :-1], causal(x2)[:, :-1])  # a causal one does not


@pytest.mark.parametrize("mixer", ["s5", "attn"])
def test_streaming_is_refused(mixer):
    bi = make_bi(mixer)
    msg = "a bidirectional model has no streaming mode"
    for call in (
        lambda: bi.step(torch.randn(2, D, dtype=torch.float64), {}),
        lambda: bi.allocate_inference_cache(2, 16),
        lambda: bi(rand_x(2), inference_cache={}),
        lambda: Block(D, bi).allocate_inference_cache(2, 16),
    ):
        with pytest.raises(NoStreamingError, match=msg):
            call()
    assert issubclass(NoStreamingError, ValueError)
    assert issubclass(NoStreamingError, NotImplementedError)


def test_build_mixer_bidirectional_arguments():
    bi = build_mixer("s5", D, N, bidirectional=True, conj_sym=False)
    assert isinstance(bi, Bidirectional) and bi.d_model == D
    assert bi.fwd.model.conj_sym is False and bi.bwd.model.conj_sym is False
    assert not isinstance(build_mixer("s5", D, N), Bidirectional)
    with pytest.raises(TypeError, match="bidirectional"):
        build_mixer("s5", D, N, bidirectional="yes")
    with pytest.raises(ValueError, match="its own parameters"):
        m = build_mixer("s5", D, N)
        Bidirectional(m, m)


# ------------------------------------------------------------------ elapsed times (events)


def test_reverse_helpers_match_loops():
    x, ts = rand_x(), rand_ts()
    lengths = torch.tensor(LENGTHS)
    xr, tr = reverse_within_lengths(x, lengths), reverse_timesteps(ts, lengths)
    for b, n in enumerate(LENGTHS):
        for t in range(L):
            src = n - 1 - t if t < n else t
            assert torch.equal(xr[b, t], x[b, src])
            dt = (ts[b, 0] if t == 0 else ts[b, n - t]) if t < n else ts[b, t]
            assert tr[b, t] == dt
    assert torch.equal(reverse_within_lengths(xr, lengths), x)  # an involution
    assert torch.equal(reverse_within_lengths(x), x.flip(1))


def reversed_event_times(ts: Tensor) -> Tensor:
    """Elapsed times of one time-reversed event sequence (1, n), from absolute times: events
    at T_t = sum_{s <= t} dt_s happen, reversed, at -T_{n-1-t'}; the first keeps dt_0."""
    T = ts.cumsum(1)
    T_rev = -T.flip(1)
    return torch.cat([ts[:, :1], T_rev.diff(dim=1)], dim=1)


@pytest.mark.skipif(not EVENT, reason="no event-driven model available")
@pytest.mark.parametrize("mixer", EVENT)
def test_backward_direction_sees_correctly_shifted_timesteps(mixer):
    bi = make_bi(mixer)
    x, ts, lengths = rand_x(), rand_ts(), torch.tensor(LENGTHS)
    y = bi(x, integration_timesteps=ts, lengths=lengths)
    y_fwd = bi.fwd(x, integration_timesteps=ts, lengths=lengths)
    for b, n in enumerate(LENGTHS):
        xb, tsb = x[b : b + 1, :n], ts[b : b + 1, :n]
        # the backward mixer on the explicitly reversed sequence, with its own elapsed times
        back = bi.bwd(xb.flip(1), integration_timesteps=reversed_event_times(tsb)).flip(1)
        assert_close_rel(y[b, :n] - y_fwd[b, :n], back[0], length=L, factor=10, msg=mixer)
        if n > 2:  # plain flipped timesteps (no shift) would be another result
            wrong = bi.bwd(xb.flip(1), integration_timesteps=tsb.flip(1)).flip(1)
            assert (wrong[0] - back[0]).abs().max() > 1e-6
    # the wrapper as a whole is a function of the event times, not of padding
    one = bi(x[1:2, :5], integration_timesteps=ts[1:2, :5])
    assert_close_rel(y[1, :5], one[0], length=L, msg=mixer)


# ------------------------------------------------------------------------ architectures


@pytest.mark.parametrize("mixer", ["s5", "attn"])
def test_classifier_bidirectional_round_trip(tmp_path, mixer):
    clf = Classifier(3, 4, d_model=D, d_state=N, n_layers=2, mixer=mixer, bidirectional=True)
    clf = clf.double().eval()
    inner = clf.blocks[0].mixer
    if mixer == "attn":
        assert not inner.causal  # bidirectional attention: one unmasked MHA, as in the UNet
    else:
        assert isinstance(inner, Bidirectional)
    assert clf.config["bidirectional"] is True
    x, lengths = torch.randn(3, L, 3, dtype=torch.float64), torch.tensor(LENGTHS)
    logits = clf(x, lengths=lengths)
    for b, n in enumerate(LENGTHS):
        assert_close_rel(logits[b], clf(x[b : b + 1, :n])[0], length=L)
    clf.save_pretrained(tmp_path)
    loaded = Classifier.from_pretrained(tmp_path)
    assert loaded.config == clf.config and loaded.bidirectional
    assert_close_rel(loaded(x, lengths=lengths), logits, length=L)


def test_classifier_config_without_flag_loads_causal(tmp_path):
    clf = Classifier(3, 4, d_model=D, d_state=N, n_layers=1, mixer="s5")
    clf.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    del config["bidirectional"]  # a config saved before the flag existed
    path.write_text(json.dumps(config))
    loaded = Classifier.from_pretrained(tmp_path)
    assert not loaded.bidirectional and not isinstance(loaded.blocks[0].mixer, Bidirectional)


def test_architecture_flags_are_consistent():
    with pytest.raises(ValueError, match="bidirectional once"):
        Classifier(3, 4, d_model=D, d_state=N, mixer="s5", mixer_kwargs={"bidirectional": True})
    with pytest.raises(ValueError, match="contradicts"):
        Classifier(3, 4, d_model=D, mixer="attn", mixer_kwargs={"causal": True}, bidirectional=True)
    a = UNet(2, 2, d_model=D, d_state=N, depth=1, causal=False)
    b = UNet(2, 2, d_model=D, d_state=N, depth=1, bidirectional=True)
    assert a.config == b.config and not b.causal
    assert list(a.state_dict()) == list(b.state_dict())  # same checkpoint layout as before
    assert isinstance(b.level.enc[0].mixer, Bidirectional)
    assert UNet(2, 2, d_model=D, d_state=N, depth=1).causal
    assert UNet(2, 2, d_model=D, d_state=N, depth=1, bidirectional=False).causal
    with pytest.raises(ValueError, match="contradictory"):
        UNet(2, 2, d_model=D, d_state=N, depth=1, causal=True, bidirectional=True)
    with pytest.raises(ValueError, match="language model is causal"):
        LRNNLMHeadModel(D, N, 1, 16, "s5", bidirectional=True)
    with pytest.raises(ValueError, match="language model is causal"):
        LRNNLMHeadModel(D, N, 1, 16, "s5", mixer_kwargs={"bidirectional": True})


# ------------------------------------------------------------- selective_scan_fn(reverse)


def _backends() -> list[str]:
    out = ["reference", "torch"]
    if _dispatch._load("selective_scan", "cpu") is not None:
        out.append("cpu")
    if torch.cuda.is_available() and _dispatch._load("selective_scan", "triton") is not None:
        out.append("triton")
    return out


BACKENDS = _backends()
TIME_VARYING = ("u", "delta", "z", "deltaA")


def _flip_time(kw: dict) -> dict:
    out = dict(kw)
    for k, v in kw.items():
        if isinstance(v, Tensor) and (k in TIME_VARYING or (k in ("B", "C") and v.dim() >= 3)):
            out[k] = v.flip(-1)
    return out


def _scan_and_grads(kw: dict, backend: str, reverse: bool, device: str):
    kw = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in kw.items()}
    leaves = {k: v.requires_grad_(True) for k, v in kw.items() if isinstance(v, Tensor)}
    args = kw if reverse else _flip_time(kw)
    y, h = selective_scan_fn(**args, return_last_state=True, backend=backend, reverse=reverse)
    if not reverse:
        y = y.flip(-1)
    gen = torch.Generator().manual_seed(1)
    wy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(device)
    wh = torch.randn(h.shape, generator=gen, dtype=torch.float64).to(device)
    hr = torch.view_as_real(h).sum(-1) if h.is_complex() else h
    loss = (y * wy).sum() + (hr * wh).sum()
    # allow_unused: dirac with deltaA never reads delta
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    grads = [
        torch.zeros_like(v) if g is None else g for v, g in zip(leaves.values(), grads, strict=True)
    ]
    return (
        y.detach().cpu(),
        h.detach().cpu(),
        {k: g.cpu() for k, g in zip(leaves, grads, strict=True)},
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "form,cplx,extras,disc",
    [
        ("shared", False, True, "mamba"),
        ("input", False, False, "zoh"),
        ("grouped", True, True, "bilinear"),
        ("shared", True, False, "dirac"),
    ],
)
def test_selective_scan_reverse_is_flipped_forward(monkeypatch, backend, form, cplx, extras, disc):
    monkeypatch.setattr(ss_torch, "CHUNK", 8)  # L = 37: several chunks and a partial one
    kw = make_scan_inputs(form, cplx, extras=extras, deltaA=True)
    kw["discretization"] = disc
    device = "cuda" if backend == "triton" else "cpu"
    # the definition: flip time, scan forward (reference loop), flip back
    y_ref, h_ref, g_ref = _scan_and_grads(kw, "reference", False, device)
    y, h, g = _scan_and_grads(kw, backend, True, device)
    assert_close_rel(y, y_ref, length=37, msg=f"{backend} y")
    assert_close_rel(h, h_ref, length=37, msg=f"{backend} last state")
    assert set(g) == set(g_ref)
    for k in g:
        assert_close_rel(g[k], g_ref[k], length=37, factor=10, msg=f"{backend} grad {k}")
    # and the same backend's own forward scan, flipped
    y_f, h_f, g_f = _scan_and_grads(kw, backend, False, device)
    assert_close_rel(y, y_f, length=37, msg=f"{backend} y vs own forward")
    assert_close_rel(h, h_f, length=37, msg=f"{backend} state vs own forward")


def test_selective_scan_reverse_definition_and_signature():
    """reverse: h_t = A_bar_t h_{t+1} + ..., from initial_state = h_L; the last state is h_0."""
    kw = make_scan_inputs("shared", False, extras=False, L=5)
    u, delta, A, B, C = (kw[k] for k in ("u", "delta", "A", "B", "C"))
    h0 = torch.randn(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float64)
    y, last = selective_scan_fn(
        u, delta, A, B, C, return_last_state=True, initial_state=h0, reverse=True
    )
    h, ys = h0, [None] * 5
    for t in reversed(range(5)):
        h = torch.exp(delta[..., t, None] * A) * h + delta[..., t, None] * B * u[..., t, None]
        ys[t] = (h * C).sum(-1)
    assert_close_rel(y, torch.stack(ys, -1), length=5)
    assert_close_rel(last, h, length=5)
    # mamba_ssm's positional signature is unchanged: (u, delta, A, B, C, D, z, delta_bias,
    # delta_softplus, return_last_state)
    out = selective_scan_fn(u, delta, A, B, C, None, None, None, False, True)
    assert isinstance(out, tuple) and len(out) == 2
