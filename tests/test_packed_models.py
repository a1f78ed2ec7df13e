"""Packed sequences (``cu_seqlens``) through ``causal_conv1d``, :func:`causal_depthwise_conv`,
Mamba and MHA.

The expectation is always running each sequence alone: a loop over the sequences through the
unpacked path (for the op, the reference backend), in float64.  Compared: outputs, final states
or inference caches, and the gradients of the input and of every parameter (initial states
included).  The offsets hold zero-length sequences at both ends and next to others, a length-1
sequence and sequences shorter than the conv width; ``[0, T]`` (S = 1) must equal the unpacked
call.  Causality: a NaN (or, where an op multiplies by a zero weight, a finite change) written at
one step never reaches earlier steps nor other sequences.  Tolerances follow ``_tol.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from _tol import assert_close_rel
from lrnnx.core.conv import causal_depthwise_conv, window_tail
from lrnnx.layers import MHA
from lrnnx.models.ltv.mamba import Mamba
from lrnnx.ops import _dispatch, causal_conv1d

CONV_BACKENDS = ["reference"] + [
    b for b in ("torch", "cpu") if _dispatch._load("causal_conv1d", b) is not None
]
#: empty sequences first, last and next to others; lengths 2 and 1 (shorter than K - 1 = 3),
#: 9 and 12 (longer than the window)
CU = [0, 0, 2, 3, 3, 12, 13, 13, 25, 25]
T = CU[-1]
S = len(CU) - 1
CUS = {"mixed": CU, "single": [0, T]}


def _randn(*shape: int, seed: int, dtype=torch.float64) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _grads(loss: Tensor, leaves: list) -> list:
    got = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, got, strict=True)]


def _loss(*outs: Tensor) -> Tensor:
    """A fixed random projection of every output (so each entry gets its own gradient)."""
    return sum(
        (o * _randn(*o.shape, seed=100 + i, dtype=o.dtype)).sum() for i, o in enumerate(outs)
    )


def _pieces(cu: list):
    return [(cu[s], cu[s + 1]) for s in range(len(cu) - 1)]


# ---------------------------------------------------------------------------------------------
# the op


def _conv_inputs(K: int, dtype=torch.float64, D: int = 3, cu=CU, bias=True, init=True):
    leaves = [
        _randn(1, D, cu[-1], seed=1, dtype=dtype),
        _randn(D, K, seed=2, dtype=dtype),
        _randn(D, seed=3, dtype=dtype) if bias else None,
        _randn(len(cu) - 1, D, K - 1, seed=4, dtype=dtype) if init else None,
    ]
    return [None if t is None else t.requires_grad_() for t in leaves]


def _conv_packed(inputs, backend, activation, cu=CU):
    x, w, b, h = inputs
    y, final = causal_conv1d(
        x, w, b, None, h, True, None, activation, backend, cu_seqlens=torch.tensor(cu)
    )
    return y, final, _grads(_loss(y, final), [t for t in inputs if t is not None])


def _conv_alone(inputs, activation, cu=CU):
    """Every sequence in its own call of the reference backend, float64."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    x, w, b, h = leaves
    ys, finals = [], []
    for s, (i, j) in enumerate(_pieces(cu)):
        hs = None if h is None else h[s : s + 1]
        y, f = causal_conv1d(x[..., i:j], w, b, None, hs, True, None, activation, "reference")
        ys.append(y)
        finals.append(f)
    y, final = torch.cat(ys, -1), torch.cat(finals, 0)
    return y, final, _grads(_loss(y, final), [t for t in leaves if t is not None])


def _check_conv(got, ref, K: int, dtype=None, msg=""):
    (y, final, grads), (y0, final0, grads0) = got, ref
    assert_close_rel(y, y0, dtype=dtype, length=K, msg=f"{msg} y")
    assert torch.equal(final, final0.detach().to(final.dtype)), f"{msg}: final states are copies"
    for i, (g, g0) in enumerate(zip(grads, grads0, strict=True)):
        if g0.numel():  # weight and bias gradients sum over T steps
            assert_close_rel(g, g0, dtype=dtype, length=T * K, msg=f"{msg} grad {i}")


@pytest.mark.parametrize("backend", CONV_BACKENDS)
@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_conv_packed_equals_each_sequence_alone(backend, K, activation):
    """y, per-sequence final states (those of short sequences reach into their initial states,
    an empty one's are its initial states) and the gradients of x, weight, bias, states."""
    inputs = _conv_inputs(K)
    got = _conv_packed(inputs, backend, activation)
    _check_conv(got, _conv_alone(inputs, activation), K, msg=f"{backend} K={K}")


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_conv_packed_without_bias_and_states(backend):
    inputs = _conv_inputs(4, bias=False, init=False)
    got = _conv_packed(inputs, backend, "silu")
    _check_conv(got, _conv_alone(inputs, "silu"), 4, msg=backend)


@pytest.mark.parametrize("backend", CONV_BACKENDS[1:])
def test_conv_packed_float32_channels_last(backend):
    """float32 on the layout the models pass (x transposed from (1, T, D)) against float64."""
    inputs = _conv_inputs(4, D=16)
    x, w, b, h = (t.detach().float() for t in inputs)
    x = x.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert not x.is_contiguous()
    leaves = [x, *(t.requires_grad_() for t in (w, b, h))]
    got = _conv_packed(leaves, backend, "silu")
    _check_conv(got, _conv_alone(inputs, "silu"), 4, dtype=torch.float32, msg=backend)


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_conv_single_sequence_is_the_unpacked_call(backend):
    inputs = _conv_inputs(4, cu=[0, T])
    got = _conv_packed(inputs, backend, "silu", cu=[0, T])
    x, w, b, h = inputs
    y, final = causal_conv1d(x, w, b, None, h, True, None, "silu", backend)
    _check_conv(got, (y, final, _grads(_loss(y, final), inputs)), 4, msg=backend)


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_conv_nan_stays_in_its_window(backend):
    """A NaN at step t reaches only outputs t .. t + K - 1 of its own sequence."""
    x, w, b, h = (t.detach() for t in _conv_inputs(4))
    bad = x.clone()
    bad[..., 4] = float("nan")  # sequence 4 = steps 3 .. 11
    y = causal_conv1d(x, w, b, None, h, backend=backend, cu_seqlens=torch.tensor(CU))
    y_bad = causal_conv1d(bad, w, b, None, h, backend=backend, cu_seqlens=torch.tensor(CU))
    hit = torch.zeros(T, dtype=torch.bool)
    hit[4:8] = True
    assert torch.isnan(y_bad[..., hit]).all()
    assert torch.equal(y_bad[..., ~hit], y[..., ~hit])


@pytest.mark.parametrize("backend", CONV_BACKENDS)
def test_conv_packed_all_sequences_empty(backend):
    """T = 0: an empty y, and each sequence's final states are its initial states."""
    x, w, b, h = _conv_inputs(4, cu=[0, 0, 0])
    y, final = causal_conv1d(
        x, w, b, None, h, True, backend=backend, cu_seqlens=torch.tensor([0, 0, 0])
    )
    assert y.shape == (1, 3, 0) and torch.equal(final, h.detach())
    grads = torch.autograd.grad(y.sum() + final.sum(), [x, w, b, h])
    assert [g.shape for g in grads] == [t.shape for t in (x, w, b, h)]
    assert torch.equal(grads[3], torch.ones_like(h))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(x=_randn(2, 3, T, seed=0)), "batch size 1"),
        (dict(h=_randn(1, 3, 3, seed=0)), r"initial_states: expected shape \(S, D, K - 1\)"),
        (dict(cu=torch.tensor([0, 5, T - 1])), "cu_seqlens"),
        (dict(cu=torch.tensor([0.0, T])), "cu_seqlens"),
        (dict(cu=torch.tensor([0, 9, 5, T])), "must not decrease"),
    ],
)
def test_conv_packed_bad_arguments(kwargs, match):
    x, w, b, h = (t.detach() for t in _conv_inputs(4))
    args = dict(x=x, h=h, cu=torch.tensor(CU)) | kwargs
    with pytest.raises(ValueError, match=match):
        causal_conv1d(args["x"], w, b, None, args["h"], cu_seqlens=args["cu"])


def test_causal_depthwise_conv_packed_window_tails():
    """The models' helper: y and the streaming states read by window_tail (width K - 1 as
    RG-LRU keeps, K as Mamba keeps: 0 before an empty sequence's window) per sequence."""
    conv = torch.nn.Conv1d(3, 3, 4, groups=3).double()
    x, _, _, h = (t.detach() for t in _conv_inputs(4))
    cu = torch.tensor(CU)
    y, window = causal_depthwise_conv(x, conv.weight, conv.bias, h, cu_seqlens=cu)
    assert window.shape == (1, 3, T + S * 3)
    for s, (i, j) in enumerate(_pieces(CU)):
        y_s, win_s = causal_depthwise_conv(x[..., i:j], conv.weight, conv.bias, h[s : s + 1])
        assert_close_rel(y[..., i:j], y_s, length=4, msg=f"y of sequence {s}")
        tail3 = window_tail(window, 3, 3, None, cu_seqlens=cu)[s : s + 1]
        assert torch.equal(tail3, window_tail(win_s, 3, 3, None))
        tail4 = window_tail(window, 4, 3, None, cu_seqlens=cu)[s : s + 1]
        assert torch.equal(tail4, window_tail(win_s, 4, 3, torch.tensor([j - i])))


# ---------------------------------------------------------------------------------------------
# Mamba


def _mamba(fast: bool = True) -> Mamba:
    torch.manual_seed(0)
    model = Mamba(8, d_state=4, d_conv=4, expand=2).double()
    model.use_fast_path = fast
    return model


def _mamba_inputs(cu, seed=5):
    x = _randn(1, cu[-1], 8, seed=seed)
    ts = torch.rand(1, cu[-1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x, ts


def _cache_copy(cache: dict, rows=slice(None)) -> dict:
    return {k: v[rows].clone() if isinstance(v, Tensor) else v for k, v in cache.items()}


@pytest.mark.parametrize("event", [False, True])
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("cu", list(CUS), ids=list(CUS))
def test_mamba_packed_equals_each_sequence_alone(cu, fast, event):
    """Outputs and the gradients of x and of every parameter (conv, projections, A, D, dt),
    synchronous and event mode, on the fast and the torch scan backend."""
    cu = CUS[cu]
    model = _mamba(fast)
    x, ts = _mamba_inputs(cu)
    params = list(model.parameters())
    x1 = x.clone().requires_grad_()
    y = model(x1, ts if event else None, cu_seqlens=torch.tensor(cu))
    got = [y, *_grads(_loss(y), [x1, *params])]
    x2 = x.clone().requires_grad_()
    y0 = torch.cat([model(x2[:, i:j], ts[:, i:j] if event else None) for i, j in _pieces(cu)], 1)
    expect = [y0, *_grads(_loss(y0), [x2, *params])]
    names = ["y", "dx"] + [f"d{n}" for n, _ in model.named_parameters()]
    for name, a, e in zip(names, got, expect, strict=True):
        assert_close_rel(a, e, length=cu[-1], factor=1 if name in ("y", "dx") else 10, msg=name)


@pytest.mark.parametrize("fast", [True, False])
def test_mamba_packed_prefill_fills_one_cache_row_per_sequence(fast):
    """With a cache of S rows (random states: a continued prefill) each row receives its
    sequence's conv and SSM states, as running it alone; steps then continue every sequence."""
    model = _mamba(fast)
    x, _ = _mamba_inputs(CU)
    cache = model.allocate_inference_cache(S, dtype=torch.float64)
    cache["conv_state"].copy_(_randn(*cache["conv_state"].shape, seed=6))
    cache["lrnn_state"].copy_(_randn(*cache["lrnn_state"].shape, seed=7))
    alone = [_cache_copy(cache, slice(s, s + 1)) for s in range(S)]
    with torch.no_grad():
        y = model(x, cu_seqlens=torch.tensor(CU), inference_cache=cache)
        pieces = zip(_pieces(CU), alone, strict=True)
        y0 = torch.cat([model(x[:, i:j], inference_cache=c) for (i, j), c in pieces], 1)
        assert_close_rel(y, y0, length=T, msg="prefill outputs")
        for key in ("conv_state", "lrnn_state"):
            rows = torch.cat([c[key] for c in alone], 0)
            assert_close_rel(cache[key], rows, length=T, msg=key)
        assert cache["seqlen_offset"] == 12  # the longest sequence
        x_t = _randn(S, 1, 8, seed=8)
        y_t, _ = model.step(x_t, cache)
        y_t0 = torch.cat([model.step(x_t[s : s + 1], c)[0] for s, c in enumerate(alone)], 0)
        assert_close_rel(y_t, y_t0, length=T, msg="step after the packed prefill")


@pytest.mark.parametrize("scan", ["cpu", "torch"])
def test_mamba_packed_is_causal_within_and_across_sequences(scan, monkeypatch):
    """NaN at a step never reaches earlier steps; a change in one sequence never reaches
    another.  The fused CPU scan restarts by assignment, so even a NaN stays in its sequence;
    the torch scan restarts with A_bar = 0, and 0 * NaN carries a NaN across (finite changes
    only there)."""
    if _dispatch._load("selective_scan", scan) is None:
        pytest.skip(f"the {scan} backend is unavailable")
    monkeypatch.setenv("LRNNX_BACKEND", scan)  # by name: the fused kernels, even while cold
    model = _mamba(scan != "torch")
    x, _ = _mamba_inputs(CU)
    cu = torch.tensor(CU)
    with torch.no_grad():
        y = model(x, cu_seqlens=cu)
        bad = x.clone()
        bad[:, 8] = float("nan")  # inside sequence 4 (steps 3 .. 11)
        y_bad = model(bad, cu_seqlens=cu)
        assert torch.isnan(y_bad[:, 8:12]).all()
        assert_close_rel(y_bad[:, :8], y[:, :8], length=T, msg="before the NaN")
        other = x.clone()
        other[:, 3:12] = 1e3 * _randn(1, 9, 8, seed=9)  # all of sequence 4
        y_other = model(other, cu_seqlens=cu)
        keep = torch.ones(T, dtype=torch.bool)
        keep[3:12] = False
        assert_close_rel(y_other[:, keep], y[:, keep], length=T, msg="other sequences")
        if scan == "cpu":
            assert_close_rel(y_bad[:, keep], y[:, keep], length=T, msg="NaN in another sequence")


def test_mamba_packed_bad_arguments():
    model = _mamba()
    x, _ = _mamba_inputs(CU)
    cu = torch.tensor(CU)
    with pytest.raises(ValueError, match="lengths, cu_seqlens: pass one"):
        model(x, lengths=torch.tensor([T]), cu_seqlens=cu)
    with pytest.raises(ValueError, match="batch size 1"):
        model(x.expand(2, -1, -1), cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(x, cu_seqlens=torch.tensor([0, T + 1]))
    cache = model.allocate_inference_cache(1, dtype=torch.float64)
    with pytest.raises(ValueError, match=f"allocated for batch size 1.*batch size {S}"):
        model(x, cu_seqlens=cu, inference_cache=cache)


# ---------------------------------------------------------------------------------------------
# MHA


def _mha(causal: bool, rotary: bool = True) -> MHA:
    torch.manual_seed(0)
    return MHA(16, num_heads=2, causal=causal, rotary=rotary, bias=True).double()


@pytest.mark.parametrize("rotary", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("cu", list(CUS), ids=list(CUS))
def test_mha_packed_equals_each_sequence_alone(cu, causal, rotary):
    """Attention within each sequence only, rotary positions from 0 at each start: outputs and
    the gradients of x and every parameter."""
    cu = CUS[cu]
    attn = _mha(causal, rotary)
    x = _randn(1, cu[-1], 16, seed=10)
    params = list(attn.parameters())
    x1 = x.clone().requires_grad_()
    y = attn(x1, cu_seqlens=torch.tensor(cu))
    got = [y, *_grads(_loss(y), [x1, *params])]
    x2 = x.clone().requires_grad_()
    y0 = torch.cat([attn(x2[:, i:j]) for i, j in _pieces(cu)], 1)
    expect = [y0, *_grads(_loss(y0), [x2, *params])]
    for i, (a, e) in enumerate(zip(got, expect, strict=True)):
        assert_close_rel(a, e, length=cu[-1], factor=1 if i < 2 else 10, msg=f"output/grad {i}")


@pytest.mark.parametrize("causal", [True, False])
def test_mha_packed_other_sequences_and_later_steps_never_matter(causal):
    """A change in another sequence never reaches a sequence's outputs; a change at a later step
    never reaches earlier ones when causal.  (Finite changes: scaled_dot_product_attention
    multiplies masked-out values by 0, so a NaN anywhere spreads, unpacked as well.)"""
    attn = _mha(causal)
    x = _randn(1, T, 16, seed=11)
    cu = torch.tensor(CU)
    with torch.no_grad():
        y = attn(x, cu_seqlens=cu)
        other = x.clone()
        other[:, 3:12] = 1e3 * _randn(1, 9, 16, seed=12)  # all of sequence 4
        keep = torch.ones(T, dtype=torch.bool)
        keep[3:12] = False
        assert_close_rel(attn(other, cu_seqlens=cu)[:, keep], y[:, keep], length=T)
        later = x.clone()
        later[:, 20:] = _randn(1, 5, 16, seed=13)  # the end of the last sequence (13 .. 24)
        y_later = attn(later, cu_seqlens=cu)
        if causal:
            assert_close_rel(y_later[:, :20], y[:, :20], length=T, msg="causal")
        else:  # the whole of the last sequence sees its end; the others do not
            assert_close_rel(y_later[:, :13], y[:, :13], length=T, msg="non-causal")


def test_mha_packed_bad_arguments():
    attn = _mha(True)
    x = _randn(1, T, 16, seed=14)
    cu = torch.tensor(CU)
    with pytest.raises(ValueError, match="lengths, cu_seqlens: pass one"):
        attn(x, lengths=torch.tensor([T]), cu_seqlens=cu)
    with pytest.raises(ValueError, match="batch size 1"):
        attn(x.expand(2, -1, -1), cu_seqlens=cu)
    with pytest.raises(ValueError, match="cu_seqlens"):
        attn(x, cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="inference_cache: MHA has no packed prefill"):
        attn(x, cu_seqlens=cu, inference_cache=attn.allocate_inference_cache(S, T))
