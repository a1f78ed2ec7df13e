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
from _tol import assert_close_rel  # noqa: E402
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
    return _with_grads(y, h, {k: v for k, v in kw.items() if k in wanted})


def _with_grads(y: Tensor, h: Tensor, leaves: dict) -> tuple:
    """y, h and the gradients of a loss touching both for the tensors of ``leaves``."""
    w = torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)
    loss = (y * w).sum() + (h * h.conj()).real.sum() + h.real.sum()
    names = [k for k in GRAD_NAMES if k in leaves]
    got = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
    # an input the rule never reads (delta under dirac with deltaA) has a zero gradient
    grads = {
        k: torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(names, got, strict=True)
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
    # nondet_tol: two backward calls may differ by float64 rounding if partial sums are reduced
    # in another order (the tolerance rule of _tol.py), never by more
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, nondet_tol=1e-12)


@pytest.mark.parametrize("disc,cplx", [(d, False) for d in DISCS] + [("zoh", True)])
def test_leaf_inputs_where_numpy_shares_through_dlpack_read_only(monkeypatch, disc, cplx):
    """Inputs that require grad are leaves the kernels must not mark unresizable; numpy before
    2.0 (with torch before 2.9) made the DLPack arrays they were once shared through read-only,
    and numba refused to compile the backward that writes dz where delta's array lies
    (TypingError: Cannot modify readonly array).  DLPack made read-only here as there: the
    kernels still match the torch backend."""
    import numpy

    dlpack = numpy.from_dlpack

    def read_only(t, *args, **kwargs):
        array = dlpack(t, *args, **kwargs)
        array.flags.writeable = False
        return array

    kw = make_inputs("input", cplx, b=2, d=3, L=9, dtype=torch.float64)
    y_w, h_w, g_w = run(kw, disc, "torch")
    monkeypatch.setattr(numpy, "from_dlpack", read_only)
    y, h, g = run(kw, disc, "cpu")
    assert_close_rel(y, y_w, length=9, msg="y")
    assert_close_rel(h, h_w, length=9, msg="h")
    assert set(g) == set(g_w)
    for name in g:
        assert_close_rel(g[name], g_w[name], length=9, msg=name)


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
    """Below SERIAL_WORK state updates every call runs on one thread (a hand-off costs more
    than the work); above it, never more threads than torch.get_num_threads()."""
    asked = []
    real = ss_cpu.run_on_threads
    monkeypatch.setattr(ss_cpu, "run_on_threads", lambda fn, n: (asked.append(n), real(fn, n)))
    kw = make_inputs("input", False, L=8, d=4, n=4, dtype=torch.float32)
    assert kw["u"].numel() * 4 < ss_cpu.SERIAL_WORK
    ref = run(kw, "mamba", "torch")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert_match(run(kw, "mamba", "cpu"), ref, rtol=1e-4, atol=1e-5)
        assert asked and set(asked) == {1}  # forward and backward
        assert ss_cpu._threads(64, 1 << 30) == 2
        torch.set_num_threads(1)
        assert ss_cpu._threads(64, 1 << 30) == 1
    finally:
        torch.set_num_threads(threads)
    assert ss_cpu._threads(3, 1 << 30) <= 3


# ----------------------------------------------------------------------------- reverse=True
# The kernels walk the chunks (each packed sequence) from the last step to the first.  Two
# independent expectations: the forward scan of time-flipped inputs, flipped back (the
# definition), and the reference loop's own reverse recurrence in float64.

#: packed offsets over L = 37 with a zero-length sequence (17..17), a length-1 one (0..1) and
#: boundaries inside and on the 16-step chunks
PACKED = torch.tensor([0, 1, 17, 17, 30, 37])


def _packed_inputs(kw: dict, cplx: bool) -> dict:
    """One packed row (b = 1) with one initial state per sequence of :data:`PACKED`."""
    S = PACKED.numel() - 1
    gen = torch.Generator().manual_seed(7)
    h0 = kw["initial_state"]
    shape = (S, *h0.shape[1:])
    new = torch.randn(*shape, generator=gen, dtype=h0.real.dtype)
    kw["initial_state"] = torch.complex(new, torch.randn_like(new)) if cplx else new
    return kw


def run_reverse(kw: dict, disc: str, backend: str, cu: Tensor | None, via_flip: bool):
    """:func:`run` with ``reverse=True``; ``via_flip``: instead the forward scan of inputs
    flipped along time (sequences in reverse order, each flipped), y and states flipped back,
    so that the gradients are those of the same inputs."""
    leaves = {k: v.clone().requires_grad_() if isinstance(v, Tensor) else v for k, v in kw.items()}
    args, offsets = dict(leaves), cu
    if via_flip:
        for k in ("u", "delta", "z", "deltaA", "B", "C"):
            if k in args and args[k].dim() >= 3:  # (b, d, L), (b, n, L), (b, g, n, L)
                args[k] = args[k].flip(-1)
        if cu is not None:
            offsets = kw["u"].shape[-1] - cu.flip(0)
            args["initial_state"] = args["initial_state"].flip(0)
    y, h = selective_scan_fn(
        **args, discretization=disc, return_last_state=True, backend=backend,
        reverse=not via_flip, cu_seqlens=offsets,
    )  # fmt: skip
    if via_flip:
        y = y.flip(-1)
        h = h.flip(0) if cu is not None else h
    return _with_grads(y, h, leaves)


def _wide(kw: dict) -> dict:
    """The inputs in float64 / complex128 (the reference's precision)."""
    return {
        k: v.to(torch.complex128 if v.is_complex() else torch.float64)
        if isinstance(v, Tensor)
        else v
        for k, v in kw.items()
    }


def assert_match_rel(got, expected, dtype: torch.dtype, L: int, factor: float) -> None:
    """y, last state and every gradient within ``factor * tol(dtype, L)`` of ``expected``."""
    assert_close_rel(got[0], expected[0].to(got[0].dtype), dtype=dtype, length=L,
                     factor=factor, msg="y")  # fmt: skip
    assert_close_rel(got[1], expected[1].to(got[1].dtype), dtype=dtype, length=L,
                     factor=factor, msg="last state")  # fmt: skip
    assert set(got[2]) == set(expected[2])
    for name, g in got[2].items():
        assert_close_rel(g, expected[2][name].to(g.dtype), dtype=dtype, length=L, factor=factor,
                         msg=name)  # fmt: skip


def _check_reverse(kw: dict, disc: str, cu: Tensor | None, factor: float) -> None:
    dtype = kw["u"].dtype
    L = kw["u"].shape[-1]
    got = run_reverse(kw, disc, "cpu", cu, via_flip=False)
    flipped = run_reverse(kw, disc, "cpu", cu, via_flip=True)
    reference = run_reverse(_wide(kw), disc, "reference", cu, via_flip=False)
    assert got[0].dtype == dtype
    assert_match_rel(got, flipped, dtype, L, factor)
    assert_match_rel(got, reference, dtype, L, factor)


@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("disc", DISCS)
def test_reverse_float64(small_chunk, disc, form, cplx):
    """Unpacked, b = 2, L = 37 over 16-step chunks: outputs, final states, every gradient."""
    kw = make_inputs(form, cplx, deltaA=disc == "zoh")
    # gradients through products of up to L decays: a few ulps per step more than y
    _check_reverse(kw, disc, None, factor=100.0)


@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("disc", DISCS)
def test_reverse_packed_float64(small_chunk, disc, cplx):
    """Packed sequences (zero-length and length-1 ones among them), each scanned from its own
    last step to its first, with its own initial and final state."""
    form = "shared" if disc == "dirac" else "grouped"
    kw = _packed_inputs(make_inputs(form, cplx, b=1, deltaA=disc == "bilinear"), cplx)
    _check_reverse(kw, disc, PACKED, factor=100.0)


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("disc", ["mamba", "zoh"])
def test_reverse_float32(small_chunk, disc, cplx, packed):
    """float32 / complex64 kernels (polynomial exp, sincos): against the float64 reference."""
    kw = make_inputs("input", cplx, b=1 if packed else 2, dtype=torch.float32)
    if packed:
        kw = _packed_inputs(kw, cplx)
    # float32 gradients through long decay products (as test_float32_long_sequence allows)
    _check_reverse(kw, disc, PACKED if packed else None, factor=50.0)


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_reverse_makes_no_flipped_copy(small_chunk, monkeypatch, packed):
    """reverse=True on the cpu backend is native: neither the dispatcher nor the kernels' torch
    side flips a tensor (forward or backward)."""
    kw = make_inputs("grouped", False, b=1 if packed else 2)
    if packed:
        kw = _packed_inputs(kw, False)
    expected = run_reverse(kw, "mamba", "cpu", PACKED if packed else None, via_flip=True)
    calls = []
    real_flip, real_method = torch.flip, Tensor.flip

    def spy(fn):
        def flip(*args, **kwargs):
            calls.append(args[0].shape)
            return fn(*args, **kwargs)

        return flip

    monkeypatch.setattr(torch, "flip", spy(real_flip))
    monkeypatch.setattr(Tensor, "flip", spy(real_method))
    got = run_reverse(kw, "mamba", "cpu", PACKED if packed else None, via_flip=False)
    assert calls == []
    assert_match_rel(got, expected, torch.float64, kw["u"].shape[-1], factor=100.0)


def test_backward_reads_inputs_whose_storage_was_reallocated():
    """FSDP frees a layer's gathered parameters after its forward and gathers them into new
    memory for its backward: the backward must read the tensors as they are then (views kept
    from the forward pointed at freed memory: gradients of 1e30)."""
    from lrnnx.models.ltv import Mamba

    torch.manual_seed(0)
    model = Mamba(16, 8)
    x = torch.randn(2, 24, 16)
    want = torch.autograd.grad(model(x).pow(2).sum(), list(model.parameters()))
    y = model(x)
    for p in model.parameters():  # as FSDP's reshard, then its all-gather into new storage
        keep = p.detach().clone()
        storage = p.untyped_storage()
        size = storage.size()
        storage.resize_(0)
        torch.randn(1 << 16)  # reuse the freed memory
        storage.resize_(size)
        storage.copy_(keep.untyped_storage())  # (a storage copy: autograd sees no change)
    got = torch.autograd.grad(y.pow(2).sum(), list(model.parameters()))
    for a, b in zip(want, got, strict=True):
        assert_close_rel(b, a, length=24)
