"""lrnnx.ops.causal_conv1d: every backend against the reference loop (forward, the gradient of
every input, final states, silu), low precision, empty and bad inputs, and the model helper
:func:`lrnnx.core.conv.causal_depthwise_conv` built on it."""

import pytest
import torch
import torch.nn.functional as F

from _tol import assert_close_rel
from lrnnx.core.conv import causal_depthwise_conv, window_tail
from lrnnx.ops import _dispatch, causal_conv1d

BACKENDS = [b for b in ("torch", "cpu") if _dispatch._load("causal_conv1d", b) is not None]


def _inputs(B, D, L, K, dtype=torch.float64, seed=0, bias=True, init=True):
    g = torch.Generator().manual_seed(seed)

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()

    return (
        t(B, D, L),
        t(D, K),
        t(D) if bias else None,
        t(B, D, K - 1) if init else None,
    )


def _explicit(x, weight, bias, init, silu):
    """The definition on the padded window, for the final states and an independent check."""
    B, D, L = x.shape
    K = weight.shape[1]
    h = x.new_zeros(B, D, K - 1) if init is None else init
    xpad = torch.cat([h, x], -1)
    y = sum(weight[:, j, None] * xpad[..., j : j + L] for j in range(K))
    y = y if bias is None else y + bias[:, None]
    return (F.silu(y) if silu else y), xpad[..., L:]


def _run(backend, inputs, activation, dy, dfinal):
    x, w, b, h = inputs
    y, final = causal_conv1d(x, w, b, None, h, True, None, activation, backend=backend)
    wrt = [t for t in inputs if t is not None]
    # allow_unused: with K = 1 the (B, D, 0) initial states reach no output in some backends
    grads = torch.autograd.grad((y * dy).sum() + (final * dfinal).sum(), wrt, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(wrt, grads, strict=True)]
    return y, final, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [1, 2, 3, 4])
@pytest.mark.parametrize("L", [1, 2, 5, 37])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_backend_matches_reference_float64(backend, K, L, activation):
    """Forward, final states and the gradient of x, weight, bias, initial_states (L < K too)."""
    inputs = _inputs(2, 3, L, K, seed=K * 100 + L)
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(2, 3, L, generator=g, dtype=torch.float64)
    dfinal = torch.randn(2, 3, K - 1, generator=g, dtype=torch.float64)
    ref = _run("reference", inputs, activation, dy, dfinal)
    got = _run(backend, inputs, activation, dy, dfinal)
    y_def, final_def = _explicit(*inputs, silu=activation is not None)
    assert_close_rel(ref[0], y_def, length=K, msg="reference vs definition")
    assert torch.equal(ref[1], final_def.detach())  # final states are copies of inputs
    assert_close_rel(got[0], ref[0], length=K, msg=f"{backend} y")
    assert torch.equal(got[1], ref[1])
    names = ["x", "weight", "bias", "initial_states"]
    for name, a, e in zip(names, got[2], ref[2], strict=True):
        if e.numel():
            # weight and bias gradients sum over the batch and time: B * L terms
            assert_close_rel(a, e, length=2 * L * K, msg=f"{backend} d{name}")
        else:
            assert a.shape == e.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_bias_and_initial_states(backend):
    inputs = _inputs(2, 5, 16, 4, bias=False, init=False)
    x, w, _, _ = inputs
    y = causal_conv1d(x, w, activation="swish", backend=backend)
    y_ref = causal_conv1d(x, w, activation="silu", backend="reference")
    assert_close_rel(y, y_ref, length=4, msg="y")
    gx, gw = torch.autograd.grad(y.square().sum(), [x, w])
    rx, rw = torch.autograd.grad(y_ref.square().sum(), [x, w])
    assert_close_rel(gx, rx, length=4, msg="dx")
    assert_close_rel(gw, rw, length=64, msg="dweight")
    _, final = causal_conv1d(x, w, return_final_states=True, backend=backend)
    assert torch.equal(final, x[..., -3:].detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_equals_one_call(backend):
    """Chunks chained through the final states give the whole sequence's output (chunks shorter
    than the kernel too: their final states reach back into the initial states)."""
    x, w, b, _ = _inputs(2, 4, 23, 4)
    whole = causal_conv1d(x, w, b, backend=backend)
    state, parts = None, []
    for lo, hi in ((0, 2), (2, 3), (3, 13), (13, 23)):
        y, state = causal_conv1d(x[..., lo:hi], w, b, None, state, True, backend=backend)
        parts.append(y)
    assert_close_rel(torch.cat(parts, -1), whole, length=4, msg="chunked")


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_and_non_contiguous(backend):
    """float32 against the float64 reference, with a transposed (channels-last) x, as the
    models pass it."""
    x64, w64, b64, h64 = _inputs(2, 64, 300, 4)
    x32 = x64.detach().float().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    assert not x32.is_contiguous()
    args32 = (x32, *(t.detach().float().requires_grad_() for t in (w64, b64, h64)))
    y32 = causal_conv1d(*args32[:3], None, args32[3], activation="silu", backend=backend)
    y64 = causal_conv1d(x64, w64, b64, None, h64, activation="silu", backend="torch")
    assert y32.dtype == torch.float32
    assert_close_rel(y32, y64, dtype=torch.float32, length=4, msg="y")
    g32 = torch.autograd.grad(y32.sum(), args32)
    g64 = torch.autograd.grad(y64.sum(), (x64, w64, b64, h64))
    for name, a, e in zip(("x", "weight", "bias", "initial_states"), g32, g64, strict=True):
        assert a.dtype == torch.float32
        assert_close_rel(a, e, dtype=torch.float32, length=2 * 300 * 4, msg=f"d{name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_accumulates_in_float32(backend, dtype):
    """bf16/fp16 in, same dtype out; the result is the float32 computation rounded once."""
    x, w, b, h = _inputs(2, 8, 64, 4, dtype=dtype)
    y, final = causal_conv1d(x, w, b, None, h, True, None, "silu", backend=backend)
    assert y.dtype == dtype and final.dtype == dtype
    x64, w64, b64, h64 = (t.detach().double() for t in (x, w, b, h))
    exact = causal_conv1d(x64, w64, b64, None, h64, activation="silu", backend="reference")
    assert_close_rel(y, exact, dtype=dtype, msg="y")  # one rounding: no sqrt(K) growth
    assert torch.equal(final, x[..., -3:].detach())
    grads = torch.autograd.grad(y.float().sum(), [x, w, b, h])
    for t, g in zip((x, w, b, h), grads, strict=True):
        assert g.dtype == dtype and g.shape == t.shape and torch.isfinite(g.float()).all()


def test_promotes_to_the_widest_input():
    """A float64 weight with a float32 x: computed in float64, returned in x's dtype."""
    x, w, b, h = _inputs(1, 3, 9, 3)
    y = causal_conv1d(x.float(), w, b, initial_states=h)
    exact = causal_conv1d(x, w, b, initial_states=h, backend="reference")
    assert y.dtype == torch.float32
    assert_close_rel(y, exact, dtype=torch.float32, msg="y")


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("shape", [(0, 3, 5), (2, 3, 0), (2, 0, 5), (0, 0, 0)])
def test_empty(backend, shape):
    B, D, L = shape
    x, w, b, h = _inputs(B, D, L, 4)
    y, final = causal_conv1d(x, w, b, None, h, True, None, "silu", backend=backend)
    assert y.shape == (B, D, L) and final.shape == (B, D, 3)
    if L == 0:
        assert torch.equal(final, h.detach())  # no step: the states stay
    grads = torch.autograd.grad(y.sum() + final.sum(), [x, w, b, h])
    assert [g.shape for g in grads] == [t.shape for t in (x, w, b, h)]
    _, final0 = causal_conv1d(x, w, return_final_states=True, backend=backend)
    assert final0.shape == (B, D, 3) and not final0.any()


def test_gradcheck_cpu():
    if "cpu" not in BACKENDS:
        pytest.skip("numba is not installed")
    for K, L, act in ((3, 5, "silu"), (4, 2, None), (1, 3, "silu")):
        inputs = _inputs(2, 2, L, K, seed=K + L)

        def fn(*args, act=act):
            x, w, b, h = args
            return causal_conv1d(x, w, b, None, h, True, None, act, backend="cpu")

        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_parallel_path_matches_serial(monkeypatch):
    """The thread-pool path (row ranges on several threads) gives the serial path's result."""
    if "cpu" not in BACKENDS:
        pytest.skip("numba is not installed")
    from lrnnx.ops.causal_conv1d import cpu

    inputs = _inputs(3, 7, 40, 4)
    serial = _run("cpu", inputs, "silu", torch.ones(3, 7, 40), torch.ones(3, 7, 3))
    monkeypatch.setattr(cpu, "SERIAL_WORK", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parallel = _run("cpu", inputs, "silu", torch.ones(3, 7, 40), torch.ones(3, 7, 3))
    finally:
        torch.set_num_threads(threads)
    for a, e in zip(
        (parallel[0], parallel[1], *parallel[2]), (serial[0], serial[1], *serial[2]), strict=True
    ):
        assert_close_rel(a, e, length=40, msg="parallel vs serial")


def test_default_without_env_is_cpu(monkeypatch):
    if "cpu" not in BACKENDS:
        pytest.skip("numba is not installed")
    monkeypatch.delenv("LRNNX_BACKEND", raising=False)
    assert _dispatch.select("causal_conv1d", torch.device("cpu"))[0] == "cpu"


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda x, w, b, h: causal_conv1d(x[0], w), ValueError, "x: expected shape"),
        (lambda x, w, b, h: causal_conv1d(x, w[:2]), ValueError, "weight: expected shape"),
        (lambda x, w, b, h: causal_conv1d(x, w[:, None]), ValueError, "weight: expected shape"),
        (lambda x, w, b, h: causal_conv1d(x, w[:, :0]), ValueError, "K >= 1"),
        (lambda x, w, b, h: causal_conv1d(x, w, b[:2]), ValueError, "bias: expected shape"),
        (
            lambda x, w, b, h: causal_conv1d(x, w, b, initial_states=h[..., :1]),
            ValueError,
            "initial_states",
        ),
        (
            lambda x, w, b, h: causal_conv1d(x, w, b, initial_states=h[:1]),
            ValueError,
            "initial_states",
        ),
        (lambda x, w, b, h: causal_conv1d(x, w, activation="relu"), ValueError, "activation"),
        (lambda x, w, b, h: causal_conv1d(x, w, activation=True), ValueError, "activation"),
        (lambda x, w, b, h: causal_conv1d(x.long(), w), TypeError, "x: expected a real"),
        (lambda x, w, b, h: causal_conv1d(x, w.to(torch.complex128)), TypeError, "weight"),
        (lambda x, w, b, h: causal_conv1d(x.detach().numpy(), w), TypeError, "x: expected a"),
        (lambda x, w, b, h: causal_conv1d(x, w, b.to("meta")), ValueError, "bias: expected a t"),
        (lambda x, w, b, h: causal_conv1d(x, w, backend="nope"), ValueError, "backend"),
    ],
)
def test_bad_arguments_name_the_argument(call, exc, match):
    x, w, b, h = (t.detach() for t in _inputs(2, 3, 6, 4))
    with pytest.raises(exc, match=match):
        call(x, w, b, h)


# ------------------------------------------------------------------------ the model helper


@pytest.mark.parametrize("history", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_causal_depthwise_conv_matches_conv1d_on_the_window(history, dtype):
    """The helper Mamba and RG-LRU call: nn.Conv1d's layout, y in x's dtype, and the window
    the cache states are read from."""
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, 6, 4, groups=6).double()
    x = torch.randn(2, 6, 10, dtype=torch.float64)
    h = torch.randn(2, 6, 3, dtype=torch.float64) if history else None
    y, window = causal_depthwise_conv(x.to(dtype), conv.weight, conv.bias, h)
    expect_window = torch.cat(
        [torch.zeros(2, 6, 3, dtype=torch.float64) if h is None else h, x], -1
    )
    assert y.dtype == dtype and window.dtype == dtype
    assert torch.equal(window, expect_window.to(dtype))
    expect = F.conv1d(expect_window.to(dtype).double(), conv.weight, conv.bias, groups=6)
    assert_close_rel(y, expect.detach(), dtype=dtype, length=4 if dtype == torch.float64 else 1)
    # window_tail reads the streaming state from the window
    tail = window_tail(window, 3, 3, torch.tensor([10, 1]))
    assert torch.equal(tail[0], window[0, :, -3:])
    assert torch.equal(tail[1], window[1, :, 1:4])


def test_causal_depthwise_conv_gradients_reach_the_conv_parameters():
    torch.manual_seed(0)
    conv = torch.nn.Conv1d(5, 5, 4, groups=5).double()
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    y, _ = causal_depthwise_conv(x, conv.weight, conv.bias)
    grads = torch.autograd.grad(y.square().sum(), [x, conv.weight, conv.bias])
    expect_y = F.conv1d(F.pad(x, (3, 0)), conv.weight, conv.bias, groups=5)
    expect = torch.autograd.grad(expect_y.square().sum(), [x, conv.weight, conv.bias])
    for a, e in zip(grads, expect, strict=True):
        assert_close_rel(a, e, length=48)


def test_bench_row():
    """``lrnnx bench --ops causal_conv1d``: lrnnx's choice beside the torch backend (no timing
    assertion)."""
    from lrnnx import bench

    assert "causal_conv1d" in bench.OPS
    assert bench.causal_conv1d_shapes(False) == [(4, 512, 2048, 4)]
    rows = bench.bench_causal_conv1d(torch.device("cpu"), True, 1.0, 1, [(1, 8, 16, 4)])
    assert [r.backend for r in rows][-1] == "torch" and rows[0].name == "causal_conv1d"
    assert all(r.fwd_ms > 0 and r.fwdbwd_ms > 0 for r in rows)
    if len(rows) == 2:
        assert "torch" in rows[0].speedup


# ------------------------------------------------------------ channels-last inputs (CPU)

#: packed offsets crossing the channels-last kernels' time blocks (256 steps): a sequence
#: over two boundaries, one starting a step before a boundary, one of a single step on it,
#: empty ones, one shorter than the window
_CL_CU = [0, 0, 3, 255, 256, 257, 257, 600, 601, 700]


def _channels_last(B, D, L, dtype=torch.float64, seed=0):
    """x (B, D, L) whose channels are adjacent: a slice of a (B, L, 2D) tensor, transposed (as
    Mamba passes its in_proj output)."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(B, L, 2 * D, generator=g, dtype=torch.float64).to(dtype)
    return wide[..., :D].transpose(1, 2).requires_grad_()


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("shape", [(2, 70, 1), (2, 70, 5), (3, 5, 300), (1, 130, 600)])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_channels_last_matches_reference(K, shape, activation):
    """A channels-last x runs the channels-last kernels (tasks of up to 128 channels and 256 steps: odd
    widths, several blocks each way): y, final states and every gradient against the reference
    in float64, and y and dx keep x's memory order."""
    if "cpu" not in BACKENDS:
        pytest.skip("numba is not installed")
    from lrnnx.ops.causal_conv1d import cpu

    B, D, L = shape
    x = _channels_last(B, D, L, seed=K + L)
    assert cpu.channels_last(x) or L == 1
    _, w, b, h = _inputs(B, D, L, K, seed=K)
    g = torch.Generator().manual_seed(2)
    dy = torch.randn(B, D, L, generator=g, dtype=torch.float64)
    dfinal = torch.randn(B, D, K - 1, generator=g, dtype=torch.float64)
    got = _run("cpu", (x, w, b, h), activation, dy, dfinal)
    ref = _run("reference", (x, w, b, h), activation, dy, dfinal)
    assert_close_rel(got[0], ref[0], length=K, msg="y")
    assert torch.equal(got[1], ref[1])
    for name, a, e in zip(("x", "weight", "bias", "initial_states"), got[2], ref[2], strict=True):
        assert_close_rel(a, e, length=B * L * K, msg=f"d{name}")
    if L > 1:
        y = causal_conv1d(x, w, b, initial_states=h, activation=activation, backend="cpu")
        assert y.stride(1) == 1, "y keeps x's channels-last order"
        (dx,) = torch.autograd.grad(y, x, dy)
        assert dx.stride(1) == 1, "dx keeps x's channels-last order"


@pytest.mark.parametrize("activation", [None, "silu"])
def test_channels_last_packed_sequences(activation):
    """Packed sequences across the time blocks: equal to each sequence alone (reference), and a
    NaN written at one step reaches no earlier step and no other sequence."""
    if "cpu" not in BACKENDS:
        pytest.skip("numba is not installed")
    cu = torch.tensor(_CL_CU)
    S, T, D, K = len(_CL_CU) - 1, _CL_CU[-1], 70, 4
    x = _channels_last(1, D, T, seed=5)
    _, w, b, _ = _inputs(1, D, 1, K, seed=6)
    h = torch.randn(S, D, K - 1, dtype=torch.float64, requires_grad=True)
    got = causal_conv1d(x, w, b, None, h, True, None, activation, "cpu", cu_seqlens=cu)
    ref = causal_conv1d(x, w, b, None, h, True, None, activation, "reference", cu_seqlens=cu)
    assert_close_rel(got[0], ref[0], length=K, msg="y")
    assert torch.equal(got[1], ref[1])
    g = torch.Generator().manual_seed(7)
    dy = torch.randn(got[0].shape, generator=g, dtype=torch.float64)
    grads = [torch.autograd.grad(r[0], (x, w, b, h), dy) for r in (got, ref)]
    for name, a, e in zip(("x", "weight", "bias", "initial_states"), *grads, strict=True):
        assert_close_rel(a, e, length=T * K, msg=f"d{name}")
    # a NaN at step 300 (sequence [257, 600)) stays in that sequence's steps from 300 on
    bad = x.detach().clone()
    bad[0, 3, 300] = float("nan")
    bad = bad.transpose(1, 2).contiguous().transpose(1, 2)
    y = causal_conv1d(bad, w.detach(), b.detach(), None, h.detach(), activation=activation,
                      backend="cpu", cu_seqlens=cu)  # fmt: skip
    nan_steps = torch.isnan(y).any(1)[0].nonzero().flatten().tolist()
    assert nan_steps == [300, 301, 302, 303]


def test_channels_last_expanded_gradient_and_threads(monkeypatch):
    """An expanded upstream gradient (y.sum()) and the threaded path give the serial result."""
    if "cpu" not in BACKENDS:
        pytest.skip("numba is not installed")
    from lrnnx.ops.causal_conv1d import cpu

    x = _channels_last(3, 70, 300, dtype=torch.float32)
    w, b = (t.detach().float().requires_grad_() for t in _inputs(3, 70, 1, 4)[1:3])

    def grads():
        y = causal_conv1d(x, w, b, activation="silu", backend="cpu")
        return [y.detach(), *torch.autograd.grad(y.sum(), (x, w, b))]

    serial = grads()
    monkeypatch.setattr(cpu, "SERIAL_WORK", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parallel = grads()
    finally:
        torch.set_num_threads(threads)
    ref_y = causal_conv1d(x.double(), w.double(), b.double(), activation="silu",
                          backend="reference")  # fmt: skip
    ref = [ref_y.detach(), *torch.autograd.grad(ref_y.sum(), (x, w, b))]
    for a, s, e in zip(parallel, serial, ref, strict=True):
        assert_close_rel(a, s, dtype=torch.float32, length=900, msg="threads vs serial")
        assert_close_rel(s, e, dtype=torch.float32, length=900, msg="float32 vs float64")


def test_causal_conv1d_fn_call_styles():
    """Dao-AILab's causal_conv1d_fn(x, weight, bias, seq_idx, initial_states,
    return_final_states, final_states_out, activation), positionally: the same results as the
    keywords; seq_idx is its form of packed sequences; a tensor where a flag belongs (another
    function's order) is a TypeError naming the flag."""
    x, w, b, h = (t.detach() for t in _inputs(2, 4, 9, 4))
    y, final = causal_conv1d(x, w, b, None, h, True, None, "silu")
    y_kw, final_kw = causal_conv1d(
        x, w, b, initial_states=h, return_final_states=True, activation="silu"
    )
    assert torch.equal(y, y_kw) and torch.equal(final, final_kw)
    out = torch.empty_like(final)
    _, got = causal_conv1d(x, w, b, None, h, True, out, "silu")
    assert got is out and torch.equal(out, final)
    xp = x[:1]
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]], dtype=torch.int32)
    cu = torch.tensor([0, 3, 5, 9])
    assert torch.equal(causal_conv1d(xp, w, b, seq_idx), causal_conv1d(xp, w, b, cu_seqlens=cu))
    for call, error, match in [
        (lambda: causal_conv1d(x, w, b, None, None, h), TypeError, "^return_final_states"),
        (lambda: causal_conv1d(xp, w, b, seq_idx.float()), TypeError, "^seq_idx"),
        (lambda: causal_conv1d(x, w, b, seq_idx), ValueError, "^seq_idx: expected shape"),
        (lambda: causal_conv1d(xp, w, b, seq_idx.flip(1), h[:1]), ValueError, "initial_states"),
        (lambda: causal_conv1d(xp, w, b, seq_idx, cu_seqlens=cu), ValueError, "give one"),
        (lambda: causal_conv1d(x, w, b, final_states_out=out), ValueError, "final_states_out"),
        (lambda: causal_conv1d(x, w, b, None, h, True, out[:1]), ValueError, "final_states_out"),
    ]:
        with pytest.raises(error, match=match):
            call()


def _seq_idx_loop(x, w, b, ids, silu):
    """causal-conv1d's seq_idx rule as a float64 loop: y_t sums the taps at positions with t's
    id (none before the row), silu, and 0 where the id is negative."""
    B, D, L = x.shape
    K = w.shape[1]
    y = torch.zeros(B, D, L, dtype=torch.float64)
    for bi in range(B):
        for t in range(L):
            if ids[bi, t] < 0:
                continue
            acc = b.double().clone()
            for j in range(K):
                s = t - K + 1 + j
                if s >= 0 and ids[bi, s] == ids[bi, t]:
                    acc += w[:, j].double() * x[bi, :, s].double()
            y[bi, :, t] = torch.nn.functional.silu(acc) if silu else acc
    return y


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_seq_idx_of_a_batch_with_padding_is_causal_conv1ds_rule(backend):
    """seq_idx (B, L) with several sequences per row and -1 padding (causal-conv1d's
    test_causal_conv1d_varlen and _varlen_padding): each sequence convolved alone, padding 0;
    ids that repeat after another id (a sequence in two pieces) follow the same tap rule.
    Gradients equal those of the float64 loop's; states are refused with such ids."""
    torch.manual_seed(0)
    B, D, L, K = 3, 5, 11, 4
    ids = torch.tensor(
        [[0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2],
         [3, 3, 3, 3, 3, 4, 4, -1, -1, -1, -1],
         [5, 5, 6, 5, 5, 5, 7, 7, 7, -1, -1]], dtype=torch.int32)  # fmt: skip
    x = torch.randn(B, D, L, dtype=torch.float64, requires_grad=True)
    w = torch.randn(D, K, dtype=torch.float64, requires_grad=True)
    b = torch.randn(D, dtype=torch.float64, requires_grad=True)
    for silu in (False, True):
        act = "silu" if silu else None
        y = causal_conv1d(x, w, b, ids, activation=act, backend=backend)
        want = _seq_idx_loop(x, w, b, ids, silu)
        assert_close_rel(y, want, dtype=torch.float64)
        g = torch.randn_like(y)
        got = torch.autograd.grad(y, (x, w, b), g)
        expect = torch.autograd.grad(want, (x, w, b), g)
        for a, e in zip(got, expect, strict=True):
            assert_close_rel(a, e, dtype=torch.float64)
    # a row of one packing (ids >= 0, non-decreasing) is the packed call, states included
    row = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2]])
    cu = torch.tensor([0, 3, 8, 11])
    assert_close_rel(
        causal_conv1d(x[:1], w, b, row, backend=backend),
        causal_conv1d(x[:1], w, b, cu_seqlens=cu, backend=backend),
        dtype=torch.float64,
    )
    with pytest.raises(ValueError, match="initial_states"):
        causal_conv1d(x, w, b, ids, torch.zeros(B, D, K - 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="final states"):
        causal_conv1d(x, w, b, ids, return_final_states=True)
    with pytest.raises(ValueError, match="backend"):
        causal_conv1d(x, w, b, ids, backend="no-such-backend")
