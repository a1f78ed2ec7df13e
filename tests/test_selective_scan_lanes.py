"""The CPU selective scan's channel-lane kernels (Mamba's case, lrnnx.ops.selective_scan.cpu_lanes)
against the float64 reference loop: y, final state and every gradient (initial state included),
over block widths that fill, split and under-fill the lanes, grouped B/C, chunk boundaries, the
optional inputs, and inputs in any memory order (Mamba's (b, L, d) activations seen as (b, d, L)).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

pytest.importorskip("numba")

import lrnnx.ops.selective_scan.cpu as ss_cpu  # noqa: E402
import lrnnx.ops.selective_scan.cpu_lanes as lanes  # noqa: E402
from _tol import assert_close_rel, tol  # noqa: E402
from lrnnx.ops import selective_scan_fn  # noqa: E402

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "deltaA", "initial_state")


def _activation(b: int, d: int, L: int, order: str, gen, dtype) -> Tensor:
    """A (b, d, L) tensor stored as (b, d, L) ("channels"), as (b, L, d) seen through a
    transpose ("time", Mamba's layout), or as every other channel of a wider (b, L, 2d)
    tensor ("slice", as Mamba's z is a half of in_proj's output)."""
    if order == "channels":
        return torch.randn(b, d, L, generator=gen, dtype=dtype)
    if order == "time":
        return torch.randn(b, L, d, generator=gen, dtype=dtype).transpose(1, 2)
    return torch.randn(b, L, 2 * d, generator=gen, dtype=dtype)[..., ::2].transpose(1, 2)


def make(
    b=2, d=40, n=5, L=29, g=1, order="time", z=True, softplus=True, bias=True, D=True, h0=True,
    dtype=torch.float64, seed=0,
):  # fmt: skip
    """Keyword arguments of selective_scan_fn for Mamba's case."""
    gen = torch.Generator().manual_seed(seed)
    kw = dict(
        u=_activation(b, d, L, order, gen, dtype),
        delta=_activation(b, d, L, order, gen, dtype),
        A=-(torch.rand(d, n, generator=gen, dtype=dtype) + 0.3),
        # B time-major (as Mamba's x_proj gives it), C state-major
        B=torch.randn(b, L, g, n, generator=gen, dtype=dtype).permute(0, 2, 3, 1),
        C=torch.randn(b, g, n, L, generator=gen, dtype=dtype),
        delta_softplus=softplus,
    )
    if not softplus:  # a positive step
        kw["delta"] = kw["delta"].abs() * 0.5 + 0.05
    if z:
        kw["z"] = _activation(b, d, L, "slice" if order == "time" else order, gen, dtype)
    if bias:
        kw["delta_bias"] = 0.3 * torch.randn(d, generator=gen, dtype=dtype)
    if D:
        kw["D"] = torch.randn(d, generator=gen, dtype=dtype)
    if h0:
        kw["initial_state"] = torch.randn(b, d, n, generator=gen, dtype=dtype)
    return kw


def run(kw: dict, backend: str, dtype=None):
    """y, final state and the gradients of a loss touching both, for every tensor input."""
    leaves = {}
    for k, v in kw.items():
        if isinstance(v, Tensor) and v.is_floating_point():
            v = v.detach().to(dtype or v.dtype)
            # keep the memory order: .to() of another dtype keeps strides (preserve_format)
            leaves[k] = v.requires_grad_()
    args = {**kw, **leaves}
    y, h = selective_scan_fn(**args, output_final_state=True, backend=backend)
    w = torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)
    loss = (y * w).sum() + (h * h).sum() + h.sum()
    names = [k for k in NAMES if k in leaves]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    return y, h, dict(zip(names, grads, strict=True))


def assert_matches_reference(kw: dict, dtype=torch.float64, factor: float = 1.0) -> tuple:
    got = run(kw, "cpu", dtype)
    ref = run(kw, "reference")
    L = kw["u"].shape[-1]
    assert_close_rel(got[0], ref[0], dtype=dtype, length=L, factor=factor, msg="y")
    assert_close_rel(got[1], ref[1], dtype=dtype, length=L, factor=factor, msg="final state")
    for name, g in ref[2].items():
        assert_close_rel(got[2][name], g, dtype=dtype, length=L, factor=factor, msg=name)
    return got


@pytest.fixture
def spy(monkeypatch):
    """The Prepared classes the CPU backend builds, in call order (a backward prepares its
    forward's kind again from the saved inputs: counted once)."""
    made = []
    real = ss_cpu._prepare

    def prepare(*args, **kwargs):
        prep = real(*args, **kwargs)
        if not made or made[-1] is not type(prep):
            made.append(type(prep))
        return prep

    monkeypatch.setattr(ss_cpu, "_prepare", prepare)
    return made


# ----------------------------------------------------------------------------- which kernels


def test_mamba_case_runs_on_lanes(spy):
    run(make(d=40), "cpu")
    assert spy == [lanes.Prepared]


@pytest.mark.parametrize(
    "change",
    ["complex", "zoh", "per_channel", "time_invariant", "narrow"],
)
def test_other_cases_keep_the_general_kernels(spy, change):
    kw = make(b=1, d=32, n=3, L=9)
    d, n, L = 32, 3, 9
    if change == "complex":
        kw["A"] = torch.complex(kw["A"], torch.ones_like(kw["A"]))
        kw["initial_state"] = kw["initial_state"].to(torch.complex128)
    elif change == "zoh":
        kw["discretization"] = "zoh"
    elif change == "per_channel":  # g = d: every channel its own B_t, C_t
        kw["B"], kw["C"] = torch.randn(1, d, n, L).double(), torch.randn(1, d, n, L).double()
    elif change == "time_invariant":
        kw["B"], kw["C"] = torch.randn(d, n).double(), torch.randn(d, n).double()
    elif change == "narrow":  # groups of 8 channels fill a quarter of the lanes
        kw["B"], kw["C"] = torch.randn(1, 4, n, L).double(), torch.randn(1, 4, n, L).double()
    y = selective_scan_fn(**kw, backend="cpu")
    assert spy == [ss_cpu._Prepared]
    ref = selective_scan_fn(**kw, backend="reference")
    assert_close_rel(y, ref, dtype=torch.float64, length=L)


# ----------------------------------------------------------------------------- float64 values


# one lane; a block of 17 channels on 24 lanes (whole vectors); one full block (LANES = 128);
# 300 channels in 3 blocks of 100 on 104 lanes
@pytest.mark.parametrize("d", [1, 17, 128, 300])
@pytest.mark.parametrize("order", ["time", "channels"])
def test_float64_matches_reference(spy, d, order):
    assert_matches_reference(make(d=d, order=order))
    assert set(spy) == {lanes.Prepared}


@pytest.mark.parametrize("order", ["time", "channels"])
def test_reverse(spy, monkeypatch, order):
    """reverse=True (time last to first) on the lanes, chunks of 6 over L = 23 walked backwards,
    against the reference loop's own reverse recurrence."""
    monkeypatch.setattr(ss_cpu, "CHUNK", 6)
    assert_matches_reference({**make(d=40, L=23, order=order), "reverse": True})
    assert set(spy) == {lanes.Prepared}


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("order", ["time", "channels"])
def test_event_mode_delta_a(spy, monkeypatch, reverse, order):
    """deltaA (STREAM's event mode: A_bar from its own step, gamma_bar from delta') on the
    lanes, its gradient included."""
    monkeypatch.setattr(ss_cpu, "CHUNK", 6)
    kw = make(d=40, L=17, order=order)
    gen = torch.Generator().manual_seed(5)
    kw["deltaA"] = _activation(2, 40, 17, order, gen, torch.float64).abs() + 0.05
    assert_matches_reference({**kw, "reverse": reverse})
    assert set(spy) == {lanes.Prepared}


@pytest.mark.parametrize("reverse", [False, True])
def test_packed_sequences(spy, monkeypatch, reverse):
    """cu_seqlens on the lanes: five sequences (one empty, one of a single step, boundaries on
    and inside the 6-step chunks) with their own initial states; a NaN in one sequence's
    input stays in that sequence."""
    monkeypatch.setattr(ss_cpu, "CHUNK", 6)
    cu = torch.tensor([0, 1, 7, 7, 16, 23])
    kw = make(b=1, d=40, L=23, h0=False)
    gen = torch.Generator().manual_seed(3)
    kw.update(cu_seqlens=cu, reverse=reverse,
              initial_state=torch.randn(5, 40, 5, generator=gen, dtype=torch.float64))  # fmt: skip
    assert_matches_reference(kw)
    assert set(spy) == {lanes.Prepared}
    bad = dict(kw, u=kw["u"].clone())
    bad["u"][:, 3, 10] = float("nan")  # in the fourth sequence (7..16)
    y, h = selective_scan_fn(**bad, output_final_state=True, backend="cpu")
    ref, href = selective_scan_fn(**bad, output_final_state=True, backend="reference")
    outside = torch.ones(23, dtype=torch.bool)
    outside[7:16] = False
    assert torch.isfinite(y[..., outside]).all()
    assert_close_rel(y[..., outside], ref[..., outside], dtype=torch.float64, length=23)
    assert torch.isfinite(h[[0, 1, 2, 4]]).all()


@pytest.mark.parametrize("d, g", [(96, 2), (96, 4), (544, 2)])
def test_grouped_b_c(spy, d, g):
    """Blocks never straddle a group: 96 channels in 2 groups of 48 or 4 groups of 24 (one
    block each), 544 in 2 groups of 272 (three blocks of 90 or 91 each)."""
    assert_matches_reference(make(d=d, g=g, L=13))
    assert set(spy) == {lanes.Prepared}


@pytest.mark.parametrize(
    "option", ["no_z", "no_softplus", "no_bias", "no_D", "no_h0", "nothing_optional"]
)
def test_optional_inputs(option):
    flags = dict(z=True, softplus=True, bias=True, D=True, h0=True)
    if option == "nothing_optional":
        flags = dict.fromkeys(flags, False)
    else:
        flags[option.removeprefix("no_")] = False
    assert_matches_reference(make(d=24, **flags))


def test_chunk_boundaries(monkeypatch):
    """Chunks of 5 steps over L = 23: four full chunks and a partial one, each checkpointed in
    forward and recomputed in backward."""
    monkeypatch.setattr(ss_cpu, "CHUNK", 5)
    assert lanes.chunk_steps(5, ss_cpu.CHUNK) == 5
    assert_matches_reference(make(d=40, L=23))


@pytest.mark.parametrize("l2", [256 << 10, 512 << 10, 1 << 20, 2 << 20])
@pytest.mark.parametrize("itemsize", [4, 8])
def test_chunk_steps_fit_the_l2(monkeypatch, l2, itemsize):
    """K: the largest power of two whose states (K, n, LANES) and decays take at most
    L2_SHARE of a core's L2, at least 8 steps, never longer than the general interval."""
    monkeypatch.setattr(lanes, "l2_cache_bytes", lambda: l2)
    for n in (1, 4, 16, 64):
        K = lanes.chunk_steps(n, 1 << 20, itemsize)
        per_step = 2 * n * lanes.LANES * itemsize
        assert K & (K - 1) == 0
        assert K == 8 or K * per_step <= lanes.L2_SHARE * l2 < 2 * K * per_step
    assert lanes.chunk_steps(256, 1 << 20, itemsize) == 8  # at least 8 steps per chunk
    assert lanes.chunk_steps(16, 3, itemsize) == 3  # never longer than the general interval


def test_chunk_steps_of_known_caches(monkeypatch):
    """n = 16 in float32: K = 16 on a 512 KiB L2 (AMD Zen 3), 32 on 1 MiB (Zen 5), as measured."""
    monkeypatch.setattr(lanes, "l2_cache_bytes", lambda: 512 << 10)
    assert lanes.chunk_steps(16, 256) == 16
    monkeypatch.setattr(lanes, "l2_cache_bytes", lambda: 1 << 20)
    assert lanes.chunk_steps(16, 256) == 32


@pytest.mark.parametrize(
    "text, size", [("1024K", 1 << 20), ("2M", 2 << 20), ("512K\n", 512 << 10), ("4096", 4096)]
)
def test_cache_size_text(text, size):
    assert lanes._cache_size(text) == size


def test_l2_cache_bytes_is_a_plausible_size():
    """This machine's L2 as read from sysfs, or the default where it is not described."""
    size = lanes.l2_cache_bytes()
    assert 64 << 10 <= size <= 64 << 20


def test_results_do_not_depend_on_the_chunk_size(monkeypatch):
    """The chunk size moves the checkpoints only: values and gradients are the same (to
    rounding of the gradient sums) with three chunk sizes."""
    kw = make(d=32, L=70)
    outs, steps = [], []
    for l2 in (64 << 10, 512 << 10, 4 << 20):
        monkeypatch.setattr(lanes, "l2_cache_bytes", lambda l2=l2: l2)
        steps.append(lanes.chunk_steps(5, ss_cpu.CHUNK, 8))
        outs.append(run(kw, "cpu"))
    assert len(set(steps)) == 3, steps
    for y, h, grads in outs[1:]:
        assert_close_rel(y, outs[0][0], length=70, msg="y")
        assert_close_rel(h, outs[0][1], length=70, msg="final state")
        for name, g in grads.items():
            assert_close_rel(g, outs[0][2][name], length=70, msg=name)


def test_gradcheck():
    kw = make(b=1, d=3, n=2, L=6)
    names = [k for k in NAMES if k in kw]
    rest = {k: v for k, v in kw.items() if k not in names}

    def f(*tensors):
        y, h = selective_scan_fn(
            **dict(zip(names, tensors, strict=True)), **rest, output_final_state=True,
            backend="cpu",
        )  # fmt: skip
        return y, h

    inputs = tuple(kw[k].detach().clone().requires_grad_() for k in names)
    assert torch.autograd.gradcheck(f, inputs, nondet_tol=1e-12)


# ----------------------------------------------------------------------------- float32, layout


def test_float32_matches_float64_reference():
    kw = make(b=3, d=64, n=16, L=150)
    assert_matches_reference(kw, dtype=torch.float32)


def test_results_keep_the_inputs_memory_order():
    """Mamba's activations are (b, L, d) tensors passed as (b, d, L) views: y and the input
    gradients come back in that order, so no layout copy is made on either side."""
    y, _, g = run(make(d=40, order="time"), "cpu")
    assert y.transpose(1, 2).is_contiguous()
    for name in ("u", "delta", "z"):
        assert g[name].transpose(1, 2).is_contiguous(), name
    y, _, g = run(make(d=40, order="channels"), "cpu")
    assert y.is_contiguous() and g["u"].is_contiguous() and g["delta"].is_contiguous()


def test_channels_stay_apart():
    """A NaN in one channel's input reaches that channel's output only (lanes are channels; the
    unused lanes of a partial block hold zeros)."""
    kw = make(d=20, h0=False)
    kw["u"] = kw["u"].clone()
    kw["u"][:, 7, 3] = float("nan")
    y = selective_scan_fn(**kw, backend="cpu")
    ref = selective_scan_fn(**kw, backend="reference")
    assert torch.isnan(y[:, 7, 3:]).all()
    keep = torch.ones(20, dtype=torch.bool)
    keep[7] = False
    assert torch.isfinite(y[:, keep]).all()
    assert_close_rel(y[:, keep], ref[:, keep], dtype=torch.float64, length=kw["u"].shape[-1])


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_agree(threads):
    """The same result (up to rounding) on one thread and on two."""
    kw = make(b=4, d=64, n=16, L=64, dtype=torch.float32)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        y, h, g = run(kw, "cpu")
    finally:
        torch.set_num_threads(old)
    ref = run(kw, "reference", torch.float64)
    for got, want in ((y, ref[0]), (h, ref[1]), *((g[k], ref[2][k]) for k in g)):
        assert (got.double() - want).abs().max() <= 4 * tol(torch.float32, 64) * want.abs().max()


@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.float64,), (torch.complex64,)])
def test_warm_up_runs_both_kernel_sets(spy, dtypes):
    """The background compile process runs warm_up: it must reach the lane kernels and the
    general ones of its dtypes (forward and backward), or calls would stay on the torch backend."""
    ss_cpu.warm_up(dtypes)
    if dtypes[0].is_complex:  # a complex A: the general kernels only
        assert set(spy) == {ss_cpu._Prepared}
    else:
        assert spy == [lanes.Prepared, ss_cpu._Prepared]
