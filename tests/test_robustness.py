"""Robustness of every model in users' hands: one test per kind of bad input or edge case.

Each test runs over every model (and every Centaurus mode): non-finite inputs stay causal,
padding never matters whatever it holds, dtypes (whole-model casts, float64, autocast, integer
input), empty batches and sequences, caches, and ``lengths`` given as a list.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import Tensor

from _tol import assert_close_rel, rel_err
from lrnnx.models.lti import LRU, S4, S4D, S5, Centaurus
from lrnnx.models.ltv import RGLRU, S7, Mamba
from lrnnx.models.ltv.s5 import S5 as EventS5

H, N, L = 8, 8, 48

MODELS = {
    "s4": lambda: S4(H, d_state=N, transposed=False),
    "s4d": lambda: S4D(H, d_state=N, transposed=False),
    "s5": lambda: S5(H, N, "zoh"),
    "lru": lambda: LRU(H, N),
    "centaurus-neck": lambda: Centaurus(H, N, sub_state_dim=4, mode="neck"),
    "centaurus-pointwise": lambda: Centaurus(H, N, sub_state_dim=4, mode="pointwise"),
    "centaurus-dws": lambda: Centaurus(H, N, sub_state_dim=4, mode="dws"),
    "centaurus-full": lambda: Centaurus(H, N, sub_state_dim=4, mode="full"),
    "mamba": lambda: Mamba(H, N),
    "event-s5": lambda: EventS5(H, N, discretization="async"),
    "s7": lambda: S7(H, N),
    "rglru": lambda: RGLRU(H),
}
LTV = {"mamba", "event-s5", "s7", "rglru"}
LTI = sorted(set(MODELS) - LTV)
#: models with projection layers (nn.Linear) that need their input in the weights' dtype
WITH_PROJECTIONS = {"s4", "s4d", "mamba", "rglru"}


def build(name, dtype=None):
    model = MODELS[name]().eval()
    return model if dtype is None else model.to(dtype)


def run(model, x, **kwargs):
    y = model(x, **kwargs)
    return y[0] if isinstance(y, tuple) else y


def step(name, model, x_t, cache):
    """One step for x_t (B, H) whatever the model's step layout; returns y (B, H)."""
    y, cache = model.step(x_t[:, None] if name in LTV else x_t, cache)
    return y.reshape(x_t.shape[0], y.shape[-1]), cache


def modes(name):
    """LTI models are checked on each of their paths (FFT convolution and scan; S4 and S4D
    only convolve)."""
    if name not in LTI:
        return [None]
    return [m for m in ("fft", "scan") if m in MODELS[name]().modes]


def with_mode(model, mode):
    if mode is not None:
        model.mode = mode
    return model


# ---- 1. causality under non-finite input ------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_nonfinite_input_stays_causal(name, bad):
    """One NaN/inf at t=30 of one sequence never reaches that sequence's outputs before t=30,
    nor the other sequences (an FFT would spread it over every output)."""
    x = torch.randn(2, L, H)
    x_bad = x.clone()
    x_bad[0, 30, 3] = bad
    for mode in modes(name):
        model = with_mode(build(name), mode)
        with torch.no_grad():
            y, y_bad = run(model, x), run(model, x_bad)
        assert_close_rel(y_bad[0, :30], y[0, :30], length=L, msg=f"{name} {mode} before t")
        assert_close_rel(y_bad[1], y[1], length=L, msg=f"{name} {mode} other sequence")
        assert not torch.isfinite(y_bad[0, 30:]).all(), f"{name} {mode}: non-finite input lost"


# ---- 2. padding never matters -----------------------------------------------------------------


@pytest.mark.parametrize("fill", [float("nan"), float("inf"), 1e30])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_padding_never_matters(name, fill):
    """Whatever the padding holds (NaN included): valid outputs, padded outputs (exact zeros),
    the final state and the gradients are those of zero padding."""
    lengths = torch.tensor([L, 20])
    x = torch.randn(2, L, H)
    x[1, 20:] = 0
    x_fill = x.clone()
    x_fill[1, 20:] = fill
    for mode in modes(name):
        model = with_mode(build(name), mode)
        outs = []
        for inp in (x, x_fill):
            model.zero_grad()
            cache = model.allocate_inference_cache(2, L)
            y = run(model, inp, lengths=lengths)
            y.square().sum().backward()
            with torch.no_grad():
                run(model, inp, lengths=lengths, inference_cache=cache)
            grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            outs.append((y.detach(), cache["lrnn_state"].clone(), grads))
        (y0, s0, g0), (y1, s1, g1) = outs
        assert torch.equal(y1[1, 20:], torch.zeros_like(y1[1, 20:])), f"{name} {mode}"
        assert_close_rel(y1, y0, length=L, msg=f"{name} {mode} outputs")
        assert_close_rel(s1, s0, length=L, msg=f"{name} {mode} final state")
        for a, b in zip(g1, g0, strict=True):
            assert_close_rel(a, b, length=L, factor=10, msg=f"{name} {mode} gradients")


# ---- 3. dtypes --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_step_rejects_integer_input(name):
    model = build(name)
    cache = model.allocate_inference_cache(2, 1)
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        step(name, model, torch.ones(2, H, dtype=torch.int64), cache)
    with pytest.raises(TypeError, match="x: expected a floating-point tensor"):
        model(torch.ones(2, 4, H, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(WITH_PROJECTIONS))
def test_input_dtype_mismatch_names_both_dtypes(name, dtype):
    """A float32 model with projection layers refuses another input dtype with both dtypes
    named (not torch's "expected m1 and m2 to have the same dtype" from deep inside)."""
    model = build(name)
    x = torch.randn(2, 4, H, dtype=dtype)
    with pytest.raises(TypeError, match=rf"x: expected dtype torch.float32.*got {dtype}"):
        model(x)
    cache = model.allocate_inference_cache(2, 1)
    with pytest.raises(TypeError, match=rf"x: expected dtype torch.float32.*got {dtype}"):
        step(name, model, x[:, 0], cache)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_whole_model_cast_keeps_the_recurrence_in_float32(name, dtype):
    """model.to(bf16/fp16): forward and step work on inputs of that dtype and return it; the
    model's own (spectral) parameters and its state stay float32/complex64; the result is the
    float32 model's up to the 16-bit rounding of inputs and projections."""
    model = build(name)
    cast = copy.deepcopy(model).to(dtype)
    for p_name, p in cast.named_parameters(recurse=False):
        assert p.dtype == torch.float32, f"{name}: {p_name} is {p.dtype}"
    x = torch.randn(2, 16, H).to(dtype)
    with torch.no_grad():
        y = run(cast, x)
        y32 = run(model, x.float())
        cache = cast.allocate_inference_cache(2, 1)
        ys = torch.stack([step(name, cast, x[:, t], cache)[0] for t in range(16)], 1)
    assert y.dtype == dtype and ys.dtype == dtype
    state = cache["lrnn_state"]
    assert state.dtype in (torch.float32, torch.complex64), f"{name}: state {state.dtype}"
    # 16-bit projections and inputs: a few units of the dtype's epsilon, relative
    assert rel_err(y.float(), y32) < 0.05, name
    assert rel_err(ys.float(), y.float()) < 0.05, name


@pytest.mark.parametrize("name", sorted(MODELS))
def test_double_is_float64_end_to_end(name):
    """model.double(): every tensor, the cache state included, is float64/complex128, and step
    reproduces forward to float64 precision."""
    model = build(name).double()
    assert all(p.dtype == torch.float64 for p in model.parameters())
    x = torch.randn(2, 16, H, dtype=torch.float64)
    with torch.no_grad():
        y = run(model, x)
        cache = model.allocate_inference_cache(2, 1)
        ys = torch.stack([step(name, model, x[:, t], cache)[0] for t in range(16)], 1)
    assert cache["lrnn_state"].dtype in (torch.float64, torch.complex128)
    assert y.dtype == torch.float64 and ys.dtype == torch.float64
    assert_close_rel(ys, y, length=16, factor=10, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_deferred_init_on_meta_follows_the_policy(name, dtype):
    """Built on the meta device, cast, placed with ``to_empty`` and loaded (the deferred
    initialisation of accelerate and FSDP): every tensor has the dtype a cast of a real model
    gives it, and the outputs are that model's."""
    model = build(name)
    with torch.device("meta"):
        deferred = MODELS[name]().eval()
    deferred = deferred.to(dtype).to_empty(device="cpu")
    deferred.load_state_dict(model.state_dict())
    cast = copy.deepcopy(model).to(dtype)
    expect = {k: v.dtype for k, v in cast.state_dict().items() if isinstance(v, torch.Tensor)}
    got = {k: v.dtype for k, v in deferred.state_dict().items() if isinstance(v, torch.Tensor)}
    assert got == expect, name
    x = torch.randn(2, 16, H).to(dtype)
    with torch.no_grad():
        assert_close_rel(run(deferred, x).float(), run(cast, x).float(), dtype=dtype, msg=name)


@pytest.fixture
def default_dtype():
    """Sets torch's default dtype for one test and restores it."""
    before = torch.get_default_dtype()
    yield torch.set_default_dtype
    torch.set_default_dtype(before)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_default_dtype_builds_the_cast_model(name, dtype, default_dtype):
    """Built under ``torch.set_default_dtype(dt)`` a model is the one ``.to(dt)`` gives, as a
    torch layer would be: float64 end to end (no float32 recurrence behind a float64 output),
    and under a 16-bit default its own tensors float32."""
    model = build(name)
    cast = copy.deepcopy(model).to(dtype)
    default_dtype(dtype)
    built = MODELS[name]().eval()
    default_dtype(torch.float32)
    expect = {k: v.dtype for k, v in cast.state_dict().items() if isinstance(v, Tensor)}
    got = {k: v.dtype for k, v in built.state_dict().items() if isinstance(v, Tensor)}
    assert got == expect, name
    if dtype != torch.float64:  # built in float32, then cast: the same initial values
        torch.manual_seed(0)
        model = build(name)
        torch.manual_seed(0)
        default_dtype(dtype)
        again = MODELS[name]().eval()
        default_dtype(torch.float32)
        want = copy.deepcopy(model).to(dtype).state_dict()
        for k, v in again.state_dict().items():
            if isinstance(v, Tensor):
                torch.testing.assert_close(v, want[k], msg=f"{name}: {k}")
    built.load_state_dict(cast.state_dict())
    x = torch.randn(2, 16, H).to(dtype)
    with torch.no_grad():
        assert_close_rel(run(built, x).float(), run(cast, x).float(), dtype=dtype, msg=name)


@pytest.mark.parametrize("old_torch", [False, True], ids=["", "get_default_device-cpu"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_default_device_places_every_tensor(name, old_torch, monkeypatch):
    """Built under ``with torch.device("meta")`` every tensor is on the meta device, those
    initialised on the CPU (HiPPO matrices) included: nothing is allocated, nothing is left
    behind for ``to_empty`` to overwrite.  (S4's kernel length, its extra state, is a 0-d CPU
    tensor wherever the model is: forwards read it without a device sync.)  Before torch 2.8
    ``torch.get_default_device()`` said "cpu" inside the context (``old_torch``): the HiPPO
    tensors of S4, S4D and S5 stayed on the CPU there."""
    if old_torch:
        monkeypatch.setattr(torch, "get_default_device", lambda: torch.device("cpu"))
    with torch.device("meta"):
        model = MODELS[name]()
    state = model.state_dict()
    where = {k: t.device.type for k, t in state.items() if not k.endswith("_extra_state")}
    assert set(where.values()) == {"meta"}, (name, where)


@pytest.mark.parametrize("cls", [Mamba, RGLRU, S7, EventS5])
def test_explicit_dtype_wins_over_the_default(cls, default_dtype):
    default_dtype(torch.float64)
    model = cls(H, dtype=torch.float32) if cls is RGLRU else cls(H, N, dtype=torch.float32)
    default_dtype(torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}, cls.__name__


@pytest.mark.parametrize("name", sorted(MODELS))
def test_step_under_autocast_matches_forward(name):
    """Under bf16 autocast, step runs the recurrence as forward does (float32 state and
    readout): step == forward to bf16 rounding of the projections only."""
    model = build(name)
    x = torch.randn(2, 12, H)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = run(model, x)
        cache = model.allocate_inference_cache(2, 1)
        ys = torch.stack([step(name, model, x[:, t], cache)[0] for t in range(12)], 1)
    assert cache["lrnn_state"].dtype in (torch.float32, torch.complex64)
    if name in WITH_PROJECTIONS:
        assert rel_err(ys.float(), y.float()) < 0.05, name
    else:  # no projection: the whole computation is float32 in both
        assert_close_rel(ys.float(), y.float(), length=12, msg=name)


# ---- 4. empty batches and sequences ----------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 16), (2, 0), (0, 0)])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_empty_batch_or_sequence(name, shape):
    model = build(name)
    x = torch.randn(*shape, H)
    y = run(model, x)
    assert y.shape == x.shape and y.dtype == x.dtype
    if shape[0]:  # a prefill over no steps leaves the cache as it was
        cache = model.allocate_inference_cache(shape[0], 1)
        run(model, torch.randn(shape[0], 4, H), inference_cache=cache)
        before = cache["lrnn_state"].clone()
        offset = cache["seqlen_offset"]
        y = run(model, x, inference_cache=cache)
        assert y.shape == x.shape
        assert torch.equal(cache["lrnn_state"], before)
        assert cache["seqlen_offset"] == offset


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)])
def test_empty_ops(shape):
    from lrnnx.ops import linear_scan, selective_scan_fn

    b = torch.randn(*shape, 3, requires_grad=True)
    h, last = linear_scan(torch.rand(*shape, 3), b, return_final_state=True)
    assert h.shape == b.shape and last.shape == (shape[0], 3)
    Bsz, Lx = shape
    u = torch.randn(Bsz, 4, Lx)
    h0 = torch.randn(Bsz, 4, 2)
    y, state = selective_scan_fn(
        u,
        torch.rand(Bsz, 4, Lx),
        -torch.rand(4, 2),
        torch.randn(Bsz, 2, Lx),
        torch.randn(Bsz, 2, Lx),
        initial_state=h0,
        return_last_state=True,
    )
    assert y.shape == u.shape and torch.equal(state, h0)


# ---- 5. caches --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bad_caches_are_named(name):
    model = build(name)
    x_t = torch.randn(2, H)
    with pytest.raises(ValueError, match="inference_cache: missing entries"):
        step(name, model, x_t, {})
    with pytest.raises(TypeError, match="inference_cache: expected the dict"):
        step(name, model, x_t, None)
    with pytest.raises(ValueError, match="allocated for batch size 3"):
        step(name, model, x_t, model.allocate_inference_cache(3, 1))
    with pytest.raises(ValueError, match="allocated for batch size 3"):
        run(model, torch.randn(2, 4, H), inference_cache=model.allocate_inference_cache(3, 1))
    with pytest.raises(ValueError, match="batch_size: expected an int >= 0"):
        model.allocate_inference_cache(-1, 1)
    with pytest.raises(TypeError, match="batch_size"):
        model.allocate_inference_cache(2.5, 1)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_cache_of_another_precision(name):
    """A cache allocated before model.double() would round every step to float32: refused,
    naming the entry and both precisions.  One allocated before model.float() (wider) works
    and gives the fresh cache's result."""
    model = build(name)
    stale = model.allocate_inference_cache(2, 1)
    model.double()
    x_t = torch.randn(2, H, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"inference_cache\['lrnn_state'\]: expected torch.float64"):
        step(name, model, x_t, stale)
    wide = model.allocate_inference_cache(2, 1)
    model.float()
    with torch.no_grad():
        y = step(name, model, x_t.float(), wide)[0]
        expect = step(name, model, x_t.float(), model.allocate_inference_cache(2, 1))[0]
    assert y.dtype == torch.float32
    assert_close_rel(y, expect, msg=name)


# ---- 8. lengths as a list ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_lengths_as_list(name):
    model = build(name)
    x = torch.randn(2, 12, H)
    with torch.no_grad():
        y_list = run(model, x, lengths=[12, 5])
        y_tensor = run(model, x, lengths=torch.tensor([12, 5]))
    assert_close_rel(y_list, y_tensor, msg=name)
    with pytest.raises(TypeError, match="lengths"):
        run(model, x, lengths=[12.0, 5.0])
    # one int: every sequence has that length (state-spaces/s4's convention, in every model)
    with torch.no_grad():
        assert_close_rel(run(model, x, lengths=7), run(model, x, lengths=[7, 7]), msg=name)
    with pytest.raises(ValueError, match="lengths"):
        run(model, x, lengths=13)
    with pytest.raises(TypeError, match="lengths"):
        run(model, x, lengths=True)


@pytest.mark.parametrize("name", ["mamba", "event-s5", "s7"])
def test_padding_never_matters_event_timesteps(name):
    """Elapsed times in the padding may hold anything too (they are never read): outputs and
    every parameter gradient (Mamba's delta * timesteps product made 0 * NaN in backward)."""
    model = build(name)
    lengths = torch.tensor([L, 20])
    x = torch.randn(2, L, H)
    ts = torch.rand(2, L)
    ts_fill = ts.clone()
    ts_fill[1, 20:] = float("nan")
    outs, grads = [], []
    for t in (ts, ts_fill):
        model.zero_grad()
        y = run(model, x, lengths=lengths, integration_timesteps=t)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert_close_rel(outs[1], outs[0], length=L, msg=name)
    for g_fill, g in zip(grads[1], grads[0], strict=True):
        assert_close_rel(g_fill, g, length=L, msg=f"{name} gradient")
    with pytest.raises(ValueError, match="integration_timesteps"):
        run(model, x, lengths=lengths, integration_timesteps=ts.masked_fill(ts > 0.5, -1.0))


# ---- attention: the same properties for MHA (a KV cache, no recurrent state) -----------------


def _mha(causal=True):
    from lrnnx.layers import MHA

    return MHA(H, num_heads=2, causal=causal).eval()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_mha_nonfinite_input_stays_causal(bad):
    """SDPA multiplies masked weights by 0: a NaN key or value after t (0 * NaN) made every
    earlier output NaN.  Outputs before t, and the other sequences, are those of finite input;
    outputs from t on are not finite."""
    x = torch.randn(2, L, H)
    x_bad = x.clone()
    x_bad[0, 30, 3] = bad
    mha = _mha()
    with torch.no_grad():
        y, y_bad = mha(x), mha(x_bad)
    assert_close_rel(y_bad[0, :30], y[0, :30], length=L, msg="before t")
    assert_close_rel(y_bad[1], y[1], length=L, msg="other sequence")
    assert not torch.isfinite(y_bad[0, 30:]).any(), "non-finite input lost"
    # non-causal: the sequence holding it is not finite anywhere, the other one is untouched
    full = _mha(causal=False)
    with torch.no_grad():
        y, y_bad = full(x), full(x_bad)
    assert_close_rel(y_bad[1], y[1], length=L, msg="non-causal: other sequence")
    assert not torch.isfinite(y_bad[0]).any()


@pytest.mark.parametrize("causal", [True, False])
def test_mha_packed_sequences_keep_a_nan_in_its_own_sequence(causal):
    x = torch.randn(1, 30, H)
    cu = torch.tensor([0, 12, 30])
    x_bad = x.clone()
    x_bad[0, 20, 1] = float("nan")
    mha = _mha(causal)
    with torch.no_grad():
        y, y_bad = mha(x, cu_seqlens=cu), mha(x_bad, cu_seqlens=cu)
    assert_close_rel(y_bad[0, :12], y[0, :12], length=30, msg="the other sequence")
    if causal:
        assert_close_rel(y_bad[0, 12:20], y[0, 12:20], length=30, msg="before the NaN")
        assert not torch.isfinite(y_bad[0, 20:]).any()
    else:
        assert not torch.isfinite(y_bad[0, 12:]).any()


@pytest.mark.parametrize("fill", [float("nan"), float("inf"), 1e30])
@pytest.mark.parametrize("causal", [True, False])
def test_mha_padding_never_matters(fill, causal):
    """Whatever the padding holds: valid outputs, padded outputs (exact zeros), the gradients,
    the cached keys and values of valid tokens and the decoding steps after a padded prefill
    are those of zero padding."""
    lengths = torch.tensor([L, 20])
    x = torch.randn(2, L, H)
    x[1, 20:] = 0
    x_fill = x.clone()
    x_fill[1, 20:] = fill
    mha = _mha(causal)
    outs = []
    for inp in (x, x_fill):
        mha.zero_grad()
        y = mha(inp, lengths=lengths)
        y.square().sum().backward()
        grads = [p.grad.clone() for p in mha.parameters()]
        steps = None
        if causal:
            cache = mha.allocate_inference_cache(2, max_seqlen=L + 3)
            with torch.no_grad():
                mha(inp, lengths=lengths, inference_cache=cache)
                steps = torch.stack([mha.step(x[:, t], cache)[0] for t in range(3)])
                kv = [cache[k][1, :, :20].clone() for k in ("k_cache", "v_cache")]
        outs.append((y.detach(), grads, steps, kv if causal else None))
    (y0, g0, s0, kv0), (y1, g1, s1, kv1) = outs
    assert torch.equal(y1[1, 20:], torch.zeros_like(y1[1, 20:]))
    assert_close_rel(y1, y0, length=L, msg="outputs")
    for a, b in zip(g1, g0, strict=True):
        assert_close_rel(a, b, length=L, factor=10, msg="gradients")
    if causal:
        assert_close_rel(s1, s0, length=L, msg="steps after the prefill")
        for a, b in zip(kv1, kv0, strict=True):
            assert_close_rel(a, b, length=L, msg="cached keys and values")


def test_mha_input_dtype_mismatch_names_both_dtypes():
    mha = _mha()
    with pytest.raises(TypeError, match=r"x: expected dtype torch.float32.*got torch.float64"):
        mha(torch.randn(2, 5, H, dtype=torch.float64))
    cache = mha.allocate_inference_cache(2, max_seqlen=4)
    with pytest.raises(TypeError, match=r"x: expected dtype torch.float32.*got torch.float64"):
        mha.step(torch.randn(2, H, dtype=torch.float64), cache)


# ---- the architectures ------------------------------------------------------------------------

ARCH_MIXERS = ["s4", "s5", "mamba", "rglru", "attn"]


def _lm(mixer):
    from lrnnx.architectures import LRNNLMHeadModel

    return LRNNLMHeadModel(
        d_model=16, d_state=8, n_layer=2, vocab_size=20, mixer_types=[mixer, "s5"]
    ).eval()


@pytest.mark.parametrize("mixer", ARCH_MIXERS)
def test_lm_caches_and_empty_inputs(mixer):
    lm = _lm(mixer)
    ids = torch.randint(0, 20, (2,))
    with pytest.raises(ValueError, match="inference_cache"):
        lm.step(ids, {})
    with pytest.raises(TypeError, match="inference_cache"):
        lm.step(ids, None)
    with pytest.raises(ValueError, match="batch"):
        lm.step(ids, lm.allocate_inference_cache(3, max_seqlen=8))
    with pytest.raises(ValueError, match="batch_size"):
        lm.allocate_inference_cache(-1, max_seqlen=8)
    if mixer == "attn":  # a KV cache needs its size
        with pytest.raises(ValueError, match="max_seqlen: required"):
            lm.allocate_inference_cache(2)
    else:  # recurrent states do not grow: no max_seqlen needed
        lm.step(ids, lm.allocate_inference_cache(2))
    for shape in [(0, 5), (2, 0)]:
        assert lm(torch.zeros(*shape, dtype=torch.long)).shape == (*shape, lm.vocab_size)


def test_lm_prefill_too_long_for_a_kv_cache_changes_nothing():
    """A prefill that an attention layer's cache cannot hold is refused before any layer
    advances: the cache is as it was, and a shorter prefill into it equals a fresh one."""
    from lrnnx.architectures import LRNNLMHeadModel

    torch.manual_seed(0)
    lm = LRNNLMHeadModel(d_model=16, d_state=8, n_layer=2, vocab_size=20,
                         mixer_types=["mamba", "attn"]).eval()  # fmt: skip
    cache = lm.allocate_inference_cache(2, max_seqlen=3)
    before = copy.deepcopy(cache)
    with torch.no_grad(), pytest.raises(ValueError, match=r"inference_cache\[1\].*no layer has"):
        lm(torch.randint(0, 20, (2, 4)), inference_cache=cache)
    for key, value in before[0].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(cache[0][key], value), key
    assert cache[0]["seqlen_offset"] == 0 and cache["seqlen_offset"] == 0
    ids = torch.randint(0, 20, (2, 3))
    with torch.no_grad():
        assert_close_rel(lm(ids, inference_cache=cache), lm(ids), length=3)


@pytest.mark.parametrize("mixer", ARCH_MIXERS)
def test_classifier_padding_never_matters(mixer):
    from lrnnx.architectures import Classifier

    clf = Classifier(d_input=3, n_classes=4, d_model=16, d_state=8, n_layers=2, mixer=mixer)
    clf.eval()
    x = torch.randn(2, 20, 3)
    lengths = torch.tensor([20, 9])
    x_nan = x.clone()
    x_nan[1, 9:] = float("nan")
    with torch.no_grad():
        assert_close_rel(clf(x_nan, lengths=lengths), clf(x, lengths=lengths), length=20)


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_padding_never_reaches_a_gradient(fill):
    """NaN or inf in the padding: every parameter's gradient is that of zero padding (the
    classifier's encoder and a Block's norms and MLP run on every position) and the padding's
    own gradient is exactly 0."""
    from lrnnx.architectures import Classifier
    from lrnnx.layers import Block, GatedMLP
    from lrnnx.models.registry import build_mixer

    torch.manual_seed(0)
    lengths = torch.tensor([7, 4])
    clf = Classifier(d_input=3, n_classes=4, d_model=8, d_state=4, n_layers=2, mixer="s5").double()
    block = Block(8, build_mixer("s5", 8, 4), mlp=GatedMLP(8)).double()
    for model, width in ((clf, 3), (block, 8)):
        x = torch.randn(2, 7, width, dtype=torch.float64)
        x[1, 4:] = 0.0
        expect = _grads(model, model(x, lengths=lengths).sum())
        bad = x.clone().requires_grad_()
        with torch.no_grad():
            bad[1, 4:] = fill
        got = _grads(model, model(bad, lengths=lengths).sum())
        assert set(got) == set(expect)
        for name, g in got.items():
            assert_close_rel(g, expect[name], length=7, msg=name)
        assert torch.equal(bad.grad[1, 4:], torch.zeros_like(bad.grad[1, 4:]))


def test_classifier_padded_timesteps_may_hold_anything():
    """integration_timesteps are read at the valid positions only (as every mixer does),
    pooling between blocks included."""
    from lrnnx.architectures import Classifier

    torch.manual_seed(0)
    clf = Classifier(3, 4, d_model=8, d_state=4, n_layers=2, mixer="event-s5",
                     pool_between=("mean", 2)).eval()  # fmt: skip
    x, lengths = torch.randn(2, 8, 3), torch.tensor([8, 5])
    ts = torch.rand(2, 8)
    bad = ts.clone()
    bad[1, 5:] = torch.tensor([float("nan"), -1.0, float("inf")])
    with torch.no_grad():
        expect = clf(x, integration_timesteps=ts, lengths=lengths)
        assert_close_rel(clf(x, integration_timesteps=bad, lengths=lengths), expect, length=8)


def test_padded_token_ids_may_hold_anything():
    """With lengths, padded ids (-100, vocab_size) are never range-checked or embedded: the
    valid logits are those of any in-range padding; ids of a narrow integer dtype work."""
    from lrnnx.architectures import Classifier

    torch.manual_seed(0)
    lm = _lm("s5")
    clf = Classifier(20, 3, d_model=16, d_state=8, n_layers=1, encoder="embedding").eval()
    ids = torch.randint(0, 20, (2, 6))
    lengths = torch.tensor([6, 3])
    bad = ids.clone()
    bad[1, 3:] = torch.tensor([-100, 20, 10**6])
    with torch.no_grad():
        assert_close_rel(lm(bad, lengths=lengths), lm(ids, lengths=lengths), length=6)
        assert_close_rel(clf(bad, lengths=lengths), clf(ids, lengths=lengths), length=6)
        for dtype in (torch.uint8, torch.int16):
            assert_close_rel(lm(ids.to(dtype)), lm(ids), length=6, msg=str(dtype))
            assert_close_rel(clf(ids.to(dtype)), clf(ids), length=6, msg=str(dtype))
    with pytest.raises(ValueError, match=r"input_ids: expected token ids in \[0, 20\)"):
        lm(bad)  # without lengths every id counts


def test_classifier_without_steps_is_named():
    from lrnnx.architectures import Classifier

    for pooling in ("mean", "last", "max"):
        clf = Classifier(d_input=3, n_classes=4, d_model=8, d_state=4, pooling=pooling)
        with pytest.raises(ValueError, match=r"x: expected at least 1 step .* \(2, 0, 3\)"):
            clf(torch.randn(2, 0, 3))
        assert clf(torch.randn(0, 0, 3)).shape == (0, 4)


@pytest.mark.parametrize("name", ["s5", "mamba"])
def test_empty_lengths_list_for_an_empty_batch(name):
    model = build(name)
    assert run(model, torch.randn(0, 5, H), lengths=[]).shape == (0, 5, H)


BAD_CALLS = {
    "x is not a tensor": (lambda m, n: run(m, [[1.0] * H] * 4), "x"),
    "x without a batch": (lambda m, n: run(m, torch.randn(10, H)), "x"),
    "x of another width": (lambda m, n: run(m, torch.randn(2, 10, H - 1)), "x"),
    "complex x": (lambda m, n: run(m, torch.randn(2, 10, H, dtype=torch.complex64)), "x"),
    "lengths (1, B)": (lambda m, n: run(m, torch.randn(2, 10, H), lengths=torch.tensor([[10, 5]])), "lengths"),
    "lengths > L": (lambda m, n: run(m, torch.randn(2, 10, H), lengths=torch.tensor([11, 5])), "lengths"),
    "lengths < 0": (lambda m, n: run(m, torch.randn(2, 10, H), lengths=torch.tensor([-1, 5])), "lengths"),
    "float lengths": (lambda m, n: run(m, torch.randn(2, 10, H), lengths=torch.tensor([10.0, 5.0])), "lengths"),
    "lengths of 3 for B=2": (lambda m, n: run(m, torch.randn(2, 10, H), lengths=torch.tensor([10, 5, 3])), "lengths"),
    "step of another width": (lambda m, n: step(n, m, torch.randn(2, H - 1), m.allocate_inference_cache(2, 1)), "x"),
    "batch_size as str": (lambda m, n: m.allocate_inference_cache("2", 1), "batch_size"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_bad_calls_name_the_argument(name, case):
    """A bad argument raises TypeError/ValueError whose message starts with its name."""
    call, arg = BAD_CALLS[case]
    with pytest.raises((TypeError, ValueError)) as info:
        call(build(name), name)
    assert str(info.value).startswith(arg), f"{name}, {case}: {info.value}"


@pytest.mark.parametrize("name", sorted(set(MODELS) - {"s4", "s4d"}))
def test_bad_timesteps_are_named(name):
    model, x = build(name), torch.randn(2, 10, H)
    for ts in (torch.rand(2, 9), -torch.rand(2, 10), torch.ones(2, 10, dtype=torch.long)):
        with pytest.raises((TypeError, ValueError), match="^integration_timesteps"):
            run(model, x, integration_timesteps=ts)


@pytest.mark.parametrize("name", ["s5", "lru", "centaurus-neck"])
def test_cache_with_a_foreign_state_is_named(name):
    model = build(name)
    cache = {**model.allocate_inference_cache(2, 1), "lrnn_state": torch.zeros(2, 3)}
    with pytest.raises(ValueError, match=r"inference_cache\['lrnn_state'\]"):
        step(name, model, torch.randn(2, H), cache)


# ---- keyword arguments, the interface classes, steps of an empty batch ------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_unknown_keywords_are_refused(name):
    """A misspelt keyword (``integration_timestep``) raises TypeError naming it, in step and in
    allocate_inference_cache: the LTV signatures take ``**kwargs`` (the base class's interface),
    which must not drop it silently."""
    model = build(name)
    cache = model.allocate_inference_cache(2, 1)
    with pytest.raises(TypeError, match="integration_timestep"):
        step_kw = dict(integration_timestep=torch.full((2,), 50.0))
        model.step(torch.randn(2, 1, H) if name in LTV else torch.randn(2, H), cache, **step_kw)
    with pytest.raises(TypeError, match="max_seq_len"):
        model.allocate_inference_cache(2, max_seq_len=4)


def test_rglru_step_refuses_timesteps_as_its_forward_does():
    model = build("rglru")
    cache = model.allocate_inference_cache(2, 1)
    with pytest.raises(ValueError, match="^integration_timesteps: RGLRU has no event-driven"):
        model.step(torch.randn(2, 1, H), cache, integration_timesteps=torch.ones(2))
    with pytest.raises(ValueError, match="^integration_timesteps: RGLRU has no event-driven"):
        model(torch.randn(2, 3, H), integration_timesteps=torch.ones(2, 3))


@pytest.mark.parametrize("name", LTI)
def test_lti_models_ignore_timesteps_with_a_warning(name):
    """The original lrnnx documents ``integration_timesteps`` of the LTI models as "not used,
    kept for interface compatibility with LTV models": accepted, checked, ignored, and said
    (S4 and S4D too, by keyword: one interface across the LTI models)."""
    model, x = build(name), torch.randn(2, 10, H)
    with pytest.warns(UserWarning, match="time-invariant and ignores"):
        y = run(model, x, integration_timesteps=torch.rand(2, 10) * 5)
    assert torch.equal(y, run(model, x))
    ts = torch.rand(2, 10)
    ts[0, 6:] = float("nan")  # padding may hold anything
    with pytest.warns(UserWarning):
        run(model, x, integration_timesteps=ts, lengths=torch.tensor([6, 10]))
    with pytest.raises(ValueError, match="integration_timesteps"):
        run(model, x, integration_timesteps=torch.rand(2, 9))


def test_interface_classes_instantiate_as_the_original_documents():
    from lrnnx.core.base import LRNN
    from lrnnx.models.lti import LTI_LRNN
    from lrnnx.models.ltv import LTV_LRNN

    lti, ltv = LTI_LRNN("zoh"), LTV_LRNN("zoh")  # the original lrnnx's docstring examples
    assert lti.discretization == ltv.discretization == "zoh"
    assert LRNN(None).discretize_fn is None
    for call, method in [
        (lambda: lti(torch.randn(1, 2, H)), "LTI_LRNN.forward"),
        (lambda: lti.discretize(), "LTI_LRNN.discretize"),
        (lambda: lti.compute_kernel(4), "LTI_LRNN.compute_kernel"),
        (lambda: ltv.step(torch.randn(1, H), {}), "LTV_LRNN.step"),
        (lambda: ltv.allocate_inference_cache(1, 1), "LTV_LRNN.allocate_inference_cache"),
    ]:
        with pytest.raises(NotImplementedError, match=method):
            call()

    class Partial(LTI_LRNN):  # a subclass must implement every abstract method
        def discretize(self):
            return None

    with pytest.raises(TypeError, match="compute_kernel.*forward.*step"):
        Partial("zoh")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_step_of_an_empty_batch(name):
    model = build(name)
    cache = model.allocate_inference_cache(0, 1)
    x_t = torch.randn(0, H)
    y, _ = step(name, model, x_t, cache)
    assert y.shape == (0, H)


@pytest.mark.parametrize("name", LTI)
def test_wider_cache_in_a_prefill(name):
    """A cache wider than the model (allocated while it was float64) serves a prefill on both
    paths, as it serves step: the state is read in the model's precision and written back."""
    for mode in modes(name):
        model = with_mode(build(name).double(), mode)
        wide = model.allocate_inference_cache(2, 1)
        model.float()
        x = torch.randn(2, 5, H)
        with torch.no_grad():
            y = run(model, x, inference_cache=wide)
            fresh = model.allocate_inference_cache(2, 1)
            expect = run(model, x, inference_cache=fresh)
        assert_close_rel(y, expect, msg=f"{name} {mode}")
        assert_close_rel(wide["lrnn_state"], fresh["lrnn_state"], msg=f"{name} {mode} state")


def test_mha_cache_of_another_precision():
    """A float64 attention layer refuses a KV cache allocated before model.double(); a float32
    one keeps taking a narrower cache chosen with dtype= (a memory choice)."""
    mha = _mha()
    stale = mha.allocate_inference_cache(2, max_seqlen=4)
    mha.double()
    with pytest.raises(TypeError, match=r"inference_cache\['k_cache'\]: expected torch.float64"):
        mha.step(torch.randn(2, H, dtype=torch.float64), stale)
    mha.float()
    small = mha.allocate_inference_cache(2, max_seqlen=4, dtype=torch.bfloat16)
    assert mha.step(torch.randn(2, H), small)[0].shape == (2, H)


@pytest.mark.parametrize(
    "name", ["s5", "lru", "event-s5", "s7", "centaurus-neck", "centaurus-full"]
)
def test_cache_is_a_snapshot_of_the_model(name):
    """The cache holds copies of the constants step reads: an in-place update of the
    parameters after the allocation (an optimizer step, load_state_dict) leaves it the old
    model's, never half old and half new (S4/S4D read D and their output layers live, as
    state-spaces/s4 does; Mamba and RG-LRU cache no constants)."""
    model = build(name)
    old = copy.deepcopy(model)
    cache = model.allocate_inference_cache(2, 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        x_t = torch.randn(2, H)
        y = step(name, model, x_t, cache)[0]
        expect = step(name, old, x_t, old.allocate_inference_cache(2, 1))[0]
    assert_close_rel(y, expect, msg=name)


def test_real_s4_in_float64_decodes_from_a_cache_allocated_before_any_forward():
    """A float64 real S4's first forward rewrites C in place (C -> C~); the cache allocated
    before it must hold its own copy of the output matrix."""
    torch.manual_seed(0)
    model = S4(H, d_state=4, transposed=False, is_real=True).double().eval()
    x = torch.randn(2, 10, H, dtype=torch.float64)
    with torch.no_grad():
        cache = model.allocate_inference_cache(2)
        y_pre = run(model, x[:, :6], inference_cache=cache)
        y_dec = torch.stack([model.step(x[:, t], cache)[0] for t in range(6, 10)], 1)
        y_full = run(model, x)
    assert_close_rel(torch.cat([y_pre, y_dec], 1), y_full, msg="prefill + steps")


@pytest.mark.parametrize("name", ["mamba", "event-s5", "s7"])
def test_bad_step_timesteps_are_named(name):
    model = build(name)
    cache = model.allocate_inference_cache(2, 1)
    x_t = torch.randn(2, 1, H)
    for ts in (True, [1.0, 1.0], "1", torch.ones(2, 2), torch.tensor([1.0, -1.0])):
        with pytest.raises((TypeError, ValueError), match="^integration_timesteps") as info:
            model.step(x_t, cache, integration_timesteps=ts)
        if isinstance(ts, Tensor) and ts.shape == (2, 2):
            assert "got (2, 2)" in str(info.value)


# ---- ops: lazy conjugate/negative bits, strided biases, autocast, 16-bit states -----------------


def test_linear_with_a_strided_or_broadcast_bias():
    """oneDNN takes a dense (out,) bias only: a strided one (a slice with step 2) and a
    broadcastable (1,) one go to F.linear, whatever the backend asked."""
    import torch.nn.functional as F

    from lrnnx.ops.linear import linear

    x, w = torch.randn(4096, 64), torch.randn(64, 64)  # past the size rule
    for b in (torch.randn(128)[::2], torch.randn(1)):
        for backend in (None, "cpu"):
            assert_close_rel(linear(x, w, b, backend=backend), F.linear(x, w, b), msg="bias")


def test_ops_read_lazy_conjugate_and_negative_views():
    """x.conj() and x.conj().imag are lazy views numpy cannot read; the CPU kernels take them
    (forward, and a backward whose incoming gradient is such a view) as the reference does."""
    from lrnnx.ops import causal_conv1d, linear_scan, selective_scan_fn

    a = torch.polar(torch.rand(1, 8, 4), torch.randn(1, 8, 4))
    b = torch.randn(1, 8, 4, dtype=torch.complex64)
    expect = linear_scan(a, b.conj().resolve_conj(), backend="reference")
    assert_close_rel(linear_scan(a, b.conj()), expect, msg="linear_scan conj input")
    grads = []
    for backend in (None, "reference"):
        bb = b.clone().requires_grad_()
        (linear_scan(a, bb, backend=backend).conj() * 2).real.sum().backward()
        grads.append(bb.grad)
    assert_close_rel(grads[0], grads[1], msg="linear_scan conj gradient")
    u = torch.randn(2, 17, 6, dtype=torch.complex64).conj().imag  # a real view, negative bit
    rest = (torch.rand(2, 17, 6), -torch.rand(17, 4), torch.randn(2, 4, 6), torch.randn(2, 4, 6))
    expect = selective_scan_fn(u.resolve_neg(), *rest, backend="reference")
    assert_close_rel(selective_scan_fn(u, *rest), expect, msg="selective_scan negative view")
    x, w = torch.randn(2, 6, 9, dtype=torch.complex64).conj().imag, torch.randn(6, 4)
    expect = causal_conv1d(x.resolve_neg(), w, backend="reference")
    assert_close_rel(causal_conv1d(x, w), expect, msg="causal_conv1d negative view")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_op_backends_stay_float32_under_autocast(backend):
    """The torch backends' einsums and convolutions are on autocast's bf16 list: the ops turn
    autocast off around every backend, so all agree with the float32 reference."""
    from lrnnx.ops import causal_conv1d, selective_scan_fn

    u, dl = torch.randn(2, 2, 16, 64).unbind(0)
    A, (B, C) = -torch.rand(16, 8) - 0.5, torch.randn(2, 2, 8, 64).unbind(0)
    x, w = torch.randn(2, 16, 30), torch.randn(16, 4)
    ref_y = selective_scan_fn(u, dl, A, B, C, delta_softplus=True, backend="reference")
    ref_c = causal_conv1d(x, w, activation="silu", backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = selective_scan_fn(u, dl, A, B, C, delta_softplus=True, backend=backend)
        c = causal_conv1d(x, w, activation="silu", backend=backend)
    assert_close_rel(y, ref_y, length=64, msg="selective scan")
    assert_close_rel(c, ref_c, msg="causal conv1d")


def test_linear_scan_16_bit_inputs():
    """16-bit a, b: h in their dtype, the final state float32 whatever L; a complex initial
    state makes the result complex instead of dropping its imaginary part."""
    from lrnnx.ops import linear_scan

    for L in (0, 4):
        a, b = torch.rand(2, L, 3).bfloat16(), torch.randn(2, L, 3).bfloat16()
        h, final = linear_scan(a, b, output_final_state=True)
        assert (h.dtype, final.dtype) == (torch.bfloat16, torch.float32), L
    a, b = torch.rand(1, 4, 2), torch.randn(1, 4, 2)
    h0 = torch.randn(1, 2, dtype=torch.complex64)
    h = linear_scan(a.bfloat16(), b.bfloat16(), h0)
    assert h.dtype == torch.complex64
    expect = linear_scan(a.bfloat16().float(), b.bfloat16().float(), h0, backend="reference")
    assert_close_rel(h, expect, msg="complex state")


# ---- torch.func transforms and forward-mode AD --------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_mode_ad_and_torch_func(name):
    """Forward AD (also under no_grad, where the fused paths skip their Functions), jvp, vmap
    and torch.func.grad give what finite differences, a batched call and autograd give: the
    ops run their reference formulas under transforms (lrnnx.core.autograd.transformed)."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import grad, jvp, vmap

    torch.manual_seed(0)
    for mode in modes(name):
        model = with_mode(build(name).double(), mode)
        x = torch.randn(2, 8, H, dtype=torch.float64)
        v = torch.randn_like(x)
        eps = 1e-6
        with torch.no_grad():
            fd = (run(model, x + eps * v) - run(model, x - eps * v)) / (2 * eps)
            with fwAD.dual_level():
                tangent = fwAD.unpack_dual(run(model, fwAD.make_dual(x, v))).tangent
        assert tangent is not None, f"{name} {mode}: forward AD lost the tangent"
        assert_close_rel(tangent, fd, factor=1e5, msg=f"{name} {mode} forward AD")  # FD: ~1e-10
        _, t2 = jvp(functools.partial(run, model), (x,), (v,))
        assert_close_rel(t2, tangent, msg=f"{name} {mode} jvp")
        batched = vmap(lambda xi, m=model: run(m, xi[None])[0])(x)
        assert_close_rel(batched, run(model, x), msg=f"{name} {mode} vmap")
        g = grad(lambda xx, m=model: run(m, xx).square().sum())(x)
        xx = x.clone().requires_grad_()
        run(model, xx).square().sum().backward()
        assert_close_rel(g, xx.grad, msg=f"{name} {mode} torch.func.grad")


def test_dtype_and_device_given_anywhere_in_the_chain_win(default_dtype):
    """A dtype or device reaches the model by keyword, by position or through a subclass's
    super().__init__: each wins over the defaults; a cooperative mixin first in the MRO does
    not keep the model from being settled."""

    class MyMamba(Mamba):
        def __init__(self, d, device=None, dtype=None):
            super().__init__(d, device=device, dtype=dtype)

    class Logged:
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)

    class LoggedS5(Logged, S5):
        pass

    meta = {t.device.type for t in MyMamba(8, "meta").state_dict().values()}
    assert meta == {"meta"}
    default_dtype(torch.float64)
    assert MyMamba(8, None, torch.float32).A_log.dtype == torch.float32
    assert LoggedS5(H, N, "zoh").Lambda_re.dtype == torch.float64
    default_dtype(torch.float32)
    with torch.device("meta"):
        model = LoggedS5(H, N, "zoh")
    assert {t.device.type for t in model.state_dict().values()} == {"meta"}


def test_accelerate_empty_weights_stay_on_meta():
    """accelerate's init_empty_weights puts parameters on the meta device while torch's default
    device stays the CPU: nothing is moved back (a copy out of meta would fail)."""
    accelerate = pytest.importorskip("accelerate")
    with accelerate.init_empty_weights():
        models = [Mamba(H, N), S5(H, N, "zoh"), S4(H, d_state=N), EventS5(H, N)]
    for model in models:
        assert {p.device.type for p in model.parameters()} == {"meta"}, type(model).__name__


@pytest.mark.parametrize("cls", [S4, S4D, S5, LRU, Centaurus, Mamba, EventS5, S7, RGLRU])
def test_constructor_signatures_stay_visible(cls):
    """The settling after construction wraps __init__ without hiding its arguments from
    inspect.signature (help(), IDEs, build_mixer's keyword check)."""
    import inspect

    params = inspect.signature(cls).parameters
    assert "d_model" in params and not any(p.kind is p.VAR_KEYWORD for p in params.values())


def test_architectures_built_under_float64_are_float64(default_dtype):
    """The LM (mixed mixers, attention included), classifier and U-Net built under a float64
    default hold nothing narrower, so their float64 outputs are computed in float64."""
    from lrnnx.architectures import Classifier, LRNNLMHeadModel, UNet

    default_dtype(torch.float64)
    models = [
        LRNNLMHeadModel(
            d_model=16, d_state=4, n_layer=3, vocab_size=20, mixer_types=["s5", "mamba", "attn"]
        ),
        Classifier(d_input=3, n_classes=4, d_model=8, d_state=4, n_layers=2, mixer="lru"),
        UNet(d_input=3, d_output=2, d_model=8, d_state=4, depth=2, mixer="s5"),
    ]
    default_dtype(torch.float32)
    for model in models:
        dtypes = {t.dtype for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()}
        assert dtypes == {torch.float64}, (type(model).__name__, dtypes)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_parameters_stay_resizable_through_the_kernels(name):
    """The fused CPU kernels read tensors through numpy; Tensor.numpy() would mark a storage as
    never to be resized, and FSDP2 frees each unsharded parameter by resizing its storage to 0
    (RuntimeError: Trying to resize storage that is not resizable).  Parameters and inputs that
    require grad are shared without that mark."""
    model = MODELS[name]()
    x = torch.randn(2, 16, H, requires_grad=True)
    run(model, x).square().sum().backward()
    tensors = [("x", x), *model.named_parameters()]
    assert [n for n, t in tensors if not t.untyped_storage().resizable()] == [], name


@pytest.mark.parametrize("name", sorted(MODELS))
def test_kernels_run_where_numpy_shares_through_dlpack_read_only(name, monkeypatch):
    """numpy before 2.0 makes arrays taken through DLPack read-only, which numba refuses to
    write: with numpy 1.26 every kernel call with a parameter or an input requiring grad failed
    (TypingError: Cannot modify readonly array).  Such tensors are shared writable without
    DLPack; here DLPack is made read-only as numpy 1.26 makes it, and nothing changes."""
    import numpy

    torch.manual_seed(0)
    model = build(name)
    x = torch.randn(2, 12, H, requires_grad=True)
    want = run(model, x)
    (want_dx,) = torch.autograd.grad(want.square().sum(), x)
    dlpack = numpy.from_dlpack

    def read_only(t, *args, **kwargs):
        array = dlpack(t, *args, **kwargs)
        array.flags.writeable = False
        return array

    monkeypatch.setattr(numpy, "from_dlpack", read_only)
    got = run(model, x)
    (dx,) = torch.autograd.grad(got.square().sum(), x)
    assert_close_rel(got, want, length=12)
    assert_close_rel(dx, want_dx, length=12)


def test_shared_arrays_are_writable_views_that_keep_their_tensor():
    from lrnnx.ops._numba import flat_view, shared_array

    weight = torch.nn.Parameter(torch.arange(12.0).reshape(3, 4))
    array = shared_array(weight)
    assert array.flags.writeable and array.shape == (3, 4)
    array[1, 2] = -1.0  # the parameter's own memory
    assert weight[1, 2].item() == -1.0 and weight.untyped_storage().resizable()
    flat, strides = flat_view(weight.detach()[:, 1:])  # a strided view of it: from (0, 1) on
    assert flat[0] == 1.0 and strides == (4, 1) and flat.flags.writeable
    del weight
    assert array.sum() == 66.0 - 6.0 - 1.0  # the array keeps the memory alive
    empty = torch.zeros(0, 3, requires_grad=True)
    assert shared_array(empty).shape == (0, 3)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_channels_last_cast_changes_nothing(name):
    """model.to(memory_format=torch.channels_last) re-lays out 4-D parameters (S4's C and P as
    (..., 2) real views of complex tensors): the model computes and trains as before."""
    torch.manual_seed(0)
    model = build(name)
    x = torch.randn(2, 12, H)
    want = run(model, x)
    model.to(memory_format=torch.channels_last)
    got = run(model, x)
    assert_close_rel(got, want, length=12)
    got.square().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_step_output_keeps_the_input_layout(name):
    """Every model steps on x (B, H) (the LTI interface) and on x (B, 1, H) (the LTV one) and
    gives y in the same layout, (B, H) or (B, 1, H), with the same values: a loop over
    ``x[:, t : t + 1]`` concatenates its outputs back into forward's (B, L, H)."""
    torch.manual_seed(0)
    model = build(name)
    x = torch.randn(2, 6, H)
    with torch.no_grad():
        y = run(model, x)
        flat, three = model.allocate_inference_cache(2, 6), model.allocate_inference_cache(2, 6)
        ys2, ys3 = [], []
        for t in range(6):
            ys2.append(model.step(x[:, t], flat)[0])
            ys3.append(model.step(x[:, t : t + 1], three)[0])
    assert all(o.shape == (2, H) for o in ys2) and all(o.shape == (2, 1, H) for o in ys3)
    assert_close_rel(torch.cat(ys3, 1), y, length=6)
    assert_close_rel(torch.stack(ys2, 1), y, length=6)


#: every model's constructor with the test's shapes and extra keyword arguments
BUILDERS = {
    "s4": lambda **kw: S4(H, d_state=N, transposed=False, **kw),
    "s4d": lambda **kw: S4D(H, d_state=N, transposed=False, **kw),
    "s5": lambda **kw: S5(H, N, "zoh", **kw),
    "lru": lambda **kw: LRU(H, N, **kw),
    "centaurus-neck": lambda **kw: Centaurus(H, N, sub_state_dim=4, mode="neck", **kw),
    "centaurus-pointwise": lambda **kw: Centaurus(H, N, sub_state_dim=4, mode="pointwise", **kw),
    "centaurus-dws": lambda **kw: Centaurus(H, N, sub_state_dim=4, mode="dws", **kw),
    "centaurus-full": lambda **kw: Centaurus(H, N, sub_state_dim=4, mode="full", **kw),
    "mamba": lambda **kw: Mamba(H, N, **kw),
    "event-s5": lambda **kw: EventS5(H, N, discretization="async", **kw),
    "s7": lambda **kw: S7(H, N, **kw),
    "rglru": lambda **kw: RGLRU(H, **kw),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_factory_arguments_in_every_model(name):
    """Every model takes torch's factory arguments ``device`` and ``dtype``: each tensor gets
    the dtype ``model.to(dtype)`` gives it (float64 end to end; under bfloat16 the recurrence's
    own tensors float32, the precision policy) and the model runs in that dtype;
    ``device="meta"`` puts every parameter there; a bad value is named."""
    assert set(BUILDERS) == set(MODELS)
    for dtype in (torch.float64, torch.bfloat16):
        built, cast = BUILDERS[name](dtype=dtype).eval(), BUILDERS[name]().to(dtype).eval()
        want = {k: v.dtype for k, v in cast.state_dict().items()}
        assert {k: v.dtype for k, v in built.state_dict().items()} == want, (name, dtype)
        with torch.no_grad():
            assert run(built, torch.randn(2, 5, H, dtype=dtype)).dtype == dtype
    meta = BUILDERS[name](device="meta")
    assert {t.device.type for t in meta.parameters()} == {"meta"}
    with torch.device("meta"):  # an explicit device wins over the default one, as in torch
        on_cpu = BUILDERS[name](device="cpu")
    assert {t.device.type for t in [*on_cpu.parameters(), *on_cpu.buffers()]} == {"cpu"}
    with pytest.raises(TypeError, match="dtype"):
        BUILDERS[name](dtype=torch.int64)
    with pytest.raises((ValueError, RuntimeError), match="device"):
        BUILDERS[name](device="no-such-device")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_cached_prefill_takes_lengths_in_every_form(name):
    """A padded prefill into a cache takes ``lengths`` as a tensor, a list or one int alike:
    the same outputs and the same cache (each sequence's state at its own length)."""
    torch.manual_seed(0)
    model = build(name)
    x = torch.randn(2, 9, H)
    results = []
    for lengths in (torch.tensor([5, 5]), [5, 5], 5):
        cache = model.allocate_inference_cache(2, 16)
        with torch.no_grad():
            y = run(model, x, lengths=lengths, inference_cache=cache)
            y_next = step(name, model, x[:, 5], cache)[0]
        results.append((y, y_next))
    for y, y_next in results[1:]:
        assert_close_rel(y, results[0][0], msg=name)
        assert_close_rel(y_next, results[0][1], msg=name)


def test_a_subclass_passing_factory_arguments_on_gets_them_checked_and_drawn():
    """A torch-style subclass whose __init__ takes device/dtype and hands them to the model's
    constructor: the same checks and the same float64 draws as the model built directly."""

    class MyLRU(LRU):
        def __init__(self, d_model, device=None, dtype=None):
            super().__init__(d_model, N, device=device, dtype=dtype)

    torch.manual_seed(0)
    direct = LRU(H, N, dtype=torch.float64)
    torch.manual_seed(0)
    sub = MyLRU(H, dtype=torch.float64)
    for (name, a), b in zip(direct.state_dict().items(), sub.state_dict().values(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    with pytest.raises(TypeError, match="MyLRU: dtype"):
        MyLRU(H, dtype=torch.int64)
    with pytest.raises(ValueError, match="MyLRU: device"):
        MyLRU(H, device="no-such-device")
