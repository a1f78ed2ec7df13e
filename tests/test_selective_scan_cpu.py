"""The fused numba CPU selective scan against the torch backend (gradients: autograd ground truth)
and against the reference loop; gradcheck in float64.

Three kernel signatures are compiled here (float32, complex64, float64); numba caches them on
disk, so only a first run pays the compile time.
"""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
from torch import Tensor

pytest.importorskip("numba")

import lrnnx.ops._numba as _numba  # noqa: E402
import lrnnx.ops.selective_scan.cpu as ss_cpu  # noqa: E402
import lrnnx.ops.selective_scan.torch as ss_torch  # noqa: E402
from _scan_inputs import make_scan_inputs  # noqa: E402
from lrnnx.ops import _dispatch, selective_scan_fn  # noqa: E402

DISCS = ("mamba", "zoh", "bilinear", "dirac")
FORMS = ("shared", "input", "grouped")
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "deltaA", "initial_state")


@pytest.fixture
def small_chunk(monkeypatch):
    """Chunks of 16 steps (and 16 for the torch backend), so L=37 spans 2 full chunks + 5 steps."""
    monkeypatch.setattr(ss_cpu, "CHUNK", 16)
    monkeypatch.setattr(ss_torch, "CHUNK", 16)


# n = 6 exercises both the four-row blocks of the recurrence kernels and their remainder
make_inputs = functools.partial(make_scan_inputs, n=6)


def run(kw: dict, disc: str, backend: str, wanted=GRAD_NAMES):
    """y, last state and the gradients of a loss touching both (None where not requested)."""
    kw = {
        k: (v.clone().requires_grad_(k in wanted) if isinstance(v, Tensor) else v)
        for k, v in kw.items()
    }
    y, h = selective_scan_fn(**kw, discretization=disc, return_last_state=True, backend=backend)
    w = torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)
    loss = (y * w).sum() + (h * h.conj()).real.sum() + h.real.sum()
    names = [k for k in GRAD_NAMES if k in kw and k in wanted]
    got = torch.autograd.grad(loss, [kw[k] for k in names], allow_unused=True)
    # an input the rule never reads (delta under dirac with deltaA) has a zero gradient
    grads = {
        k: torch.zeros_like(kw[k]) if g is None else g for k, g in zip(names, got, strict=True)
    }
    return y.detach(), h.detach(), grads


def assert_match(a, b, rtol: float, atol: float) -> None:
    y_a, h_a, g_a = a
    y_b, h_b, g_b = b
    torch.testing.assert_close(y_a, y_b, rtol=rtol, atol=atol)
    torch.testing.assert_close(h_a, h_b, rtol=rtol, atol=atol)
    assert set(g_a) == set(g_b)
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_b[name], rtol=rtol, atol=atol, msg=name)


# ----------------------------------------------------------------------------- dispatch


def _resolved(device: str):
    """The backend function the dispatcher picks (it may wrap it, e.g. for torch.compile)."""
    return inspect.unwrap(_dispatch.resolve("selective_scan", torch.device(device)))


def test_dispatcher_picks_cpu_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("LRNNX_BACKEND", raising=False)
    assert _resolved("cpu") is ss_cpu.selective_scan
    monkeypatch.setenv("LRNNX_BACKEND", "torch")
    assert _resolved("cpu") is ss_torch.selective_scan


def test_missing_numba_falls_back_to_torch_with_one_warning(monkeypatch):
    monkeypatch.delenv("LRNNX_BACKEND", raising=False)
    monkeypatch.setattr(_numba, "HAVE_NUMBA", False)
    monkeypatch.setattr(_dispatch, "_LOADED", {})
    monkeypatch.setattr(_dispatch, "_WARNED", set())
    kw = make_inputs("input", False, extras=False, L=10)
    with pytest.warns(RuntimeWarning, match="'cpu' of selective_scan is unavailable"):
        y = selective_scan_fn(**kw)
    torch.testing.assert_close(y, selective_scan_fn(**kw, backend="torch"))


# ----------------------------------------------------------------------------- float64: tight


@pytest.mark.parametrize("deltaA", [False, True], ids=["", "deltaA"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("disc", DISCS)
def test_float64_matches_torch_backend(small_chunk, disc, form, deltaA):
    """Outputs, last state and every gradient, with D, z, bias + softplus and initial_state."""
    kw = make_inputs(form, False, deltaA=deltaA)
    assert_match(run(kw, disc, "cpu"), run(kw, disc, "torch"), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("disc", DISCS)
def test_float64_bare_matches_reference_loop(small_chunk, disc):
    """No optional inputs (zero initial state, no gate, no skip), against the Python loop."""
    kw = make_inputs("input", False, extras=False, n=4, L=21)
    assert_match(run(kw, disc, "cpu"), run(kw, disc, "reference"), rtol=1e-10, atol=1e-10)


def test_mixed_groupings_and_short_sequences(small_chunk):
    """B grouped by 2 and C by 4 (blocks follow the finer grouping); L = 1 and L = chunk + 1."""
    for L in (1, 17):
        kw = make_inputs("grouped", False, L=L, d=8, seed=L)
        gen = torch.Generator().manual_seed(1)
        kw["C"] = torch.randn(2, 4, 6, L, generator=gen, dtype=torch.float64)
        assert_match(run(kw, "zoh", "cpu"), run(kw, "zoh", "torch"), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("wanted", [("C",), ("initial_state", "D"), ("A", "delta_bias"), ("u",)])
def test_gradient_subsets(small_chunk, wanted):
    kw = make_inputs("grouped", False, deltaA=True)
    got, ref = run(kw, "mamba", "cpu", wanted), run(kw, "mamba", "torch", wanted)
    assert set(got[2]) == set(wanted)
    assert_match(got, ref, rtol=1e-9, atol=1e-9)


GRADCHECK_CASES = [
    # disc, form, deltaA, n, L, chunk (L % chunk != 0: several chunks and a partial one)
    ("mamba", "input", False, 5, 9, 4),
    ("zoh", "grouped", True, 4, 7, 3),
    ("bilinear", "shared", False, 3, 6, 4),
    ("dirac", "input", True, 2, 5, 2),
]


@pytest.mark.parametrize("disc,form,deltaA,n,L,chunk", GRADCHECK_CASES)
def test_gradcheck(monkeypatch, disc, form, deltaA, n, L, chunk):
    monkeypatch.setattr(ss_cpu, "CHUNK", chunk)
    kw = make_inputs(form, False, deltaA=deltaA, b=2, d=2, n=n, L=L, g=2)
    names = [k for k in GRAD_NAMES if k in kw]
    flags = {k: v for k, v in kw.items() if not isinstance(v, Tensor)}

    def fn(*tensors):
        args = dict(zip(names, tensors, strict=True))
        return selective_scan_fn(
            **args, **flags, discretization=disc, return_last_state=True, backend="cpu"
        )

    inputs = tuple(kw[k].clone().requires_grad_() for k in names)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- complex64


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("disc", DISCS)
def test_complex64_matches_torch_backend(small_chunk, disc, form):
    """Complex A: y = 2 Re(C h), conjugate-Wirtinger gradients (complex A, B, C, h0; real rest)."""
    kw = make_inputs(form, True, deltaA=disc == "zoh", dtype=torch.float32, n=5)
    got, ref = run(kw, disc, "cpu"), run(kw, disc, "torch")
    assert got[1].dtype == torch.complex64 and got[2]["A"].dtype == torch.complex64
    if form == "input":  # real B and C get real gradients
        assert not got[2]["B"].is_complex() and not got[2]["C"].is_complex()
    assert_match(got, ref, rtol=2e-4, atol=2e-4)


# ----------------------------------------------------------------------------- float32


@pytest.mark.parametrize("disc", DISCS)
def test_float32_long_sequence(disc):
    """Default chunk length over L = 2100 (8 full chunks and a partial one), Mamba's shapes:
    input-dependent B, C shared by all channels, n = 16."""
    kw = make_inputs("input", False, L=2100, d=3, n=16, b=1, dtype=torch.float32)
    got, ref = run(kw, disc, "cpu"), run(kw, disc, "torch")
    assert got[0].dtype == torch.float32
    scale = {k: v.abs().max().item() for k, v in ref[2].items()}
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-4 * ref[0].abs().max().item())
    torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-4)
    for name, g in got[2].items():
        torch.testing.assert_close(g, ref[2][name], rtol=2e-3, atol=1e-4 * scale[name], msg=name)


def test_float32_inference_matches_training_path_and_threads(monkeypatch):
    """The no-grad path (no checkpoints) equals the autograd path; thread count changes only the
    split into tasks, not the result (the serial threshold lowered, so threads do run)."""
    monkeypatch.setattr(ss_cpu, "SERIAL_WORK", 0)
    kw = make_inputs("grouped", False, L=300, d=16, dtype=torch.float32)
    with torch.no_grad():
        y0, h0 = selective_scan_fn(**kw, return_last_state=True, backend="cpu")
    y1, h1, _ = run(kw, "mamba", "cpu")
    torch.testing.assert_close(y0, y1, rtol=0, atol=0)
    torch.testing.assert_close(h0, h1, rtol=0, atol=0)
    threads = torch.get_num_threads()
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            got = run(kw, "mamba", "cpu")
            torch.testing.assert_close(got[0], y1, rtol=0, atol=0)
    finally:
        torch.set_num_threads(threads)


def test_saves_only_chunk_states():
    """Autograd keeps the inputs and one (b, d, n) state per chunk, never (b, d, L, n)."""
    b, d, n, L = 1, 8, 16, 1024
    kw = make_inputs("input", False, extras=False, b=b, d=d, n=n, L=L, dtype=torch.float32)
    kw = {k: v.requires_grad_() for k, v in kw.items()}
    saved = []

    def pack(x: Tensor) -> Tensor:
        saved.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        y = selective_scan_fn(**kw, backend="cpu")
    y.sum().backward()
    assert sum(saved) < b * d * n * L / 2
    assert all(v.grad is not None for v in kw.values())


# ----------------------------------------------------------------------------- work split


@pytest.mark.parametrize("disc", ["mamba", "zoh"])
def test_float64_state_row_blocks(small_chunk, disc):
    """n = 13: the recurrences advance rows in blocks of eight, then four, then one; "mamba"
    runs forward step by step, "zoh" in passes."""
    kw = make_inputs("input", False, n=13, L=37)
    assert_match(run(kw, disc, "cpu"), run(kw, disc, "torch"), rtol=1e-9, atol=1e-9)


def test_tiny_work_runs_on_the_calling_thread(monkeypatch):
    """Below SERIAL_WORK state updates no task goes to the thread pool (a hand-off costs more
    than the work); above it, never more threads than torch.get_num_threads()."""

    def no_pool(*args, **kwargs):
        raise AssertionError("the thread pool was used for tiny work")

    monkeypatch.setattr(ss_cpu, "_POOL", None)
    monkeypatch.setattr(ss_cpu, "ThreadPoolExecutor", no_pool)
    kw = make_inputs("input", False, L=8, d=4, n=4, dtype=torch.float32)
    assert kw["u"].numel() * 4 < ss_cpu.SERIAL_WORK
    ref = run(kw, "mamba", "torch")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert_match(run(kw, "mamba", "cpu"), ref, rtol=1e-4, atol=1e-5)
        assert ss_cpu._threads(64, 1 << 30) == 2
        torch.set_num_threads(1)
        assert ss_cpu._threads(64, 1 << 30) == 1
    finally:
        torch.set_num_threads(threads)
    assert ss_cpu._threads(3, 1 << 30) <= 3
