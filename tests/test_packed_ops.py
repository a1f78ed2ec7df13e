"""Packed sequences (``cu_seqlens``) and the one op contract of ``linear_scan`` and
``selective_scan_fn``.

A packed call holds S sequences back to back along time in one batch row; it must equal running
each sequence alone: outputs, one final state per sequence, and the gradients of every input
(initial states included).  The expected values come from a loop over the sequences through the
reference backend in float64; every backend is checked against it, forward and reverse (each
sequence reversed within itself), with zero-length sequences next to others (and at both ends),
a length-1 sequence and sequences crossing the chunk boundaries (chunks shrunk).  The Triton
kernels are run in a subprocess under ``TRITON_INTERPRET=1`` (as test_triton_interpret.py does),
a few cases, about 10 s.  Tolerances follow ``_tol.py``.

A nan or an inf inside one sequence (in its inputs, decays or initial state) must stay there:
the other sequences' outputs, final states and gradients still equal running them alone (a
restart that multiplied the carried state by zero would spread 0 * nan = nan to all of them).
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import Tensor

import lrnnx.ops.selective_scan.torch as ss_torch
from _scan_inputs import make_scan_inputs
from _tol import assert_close_rel
from lrnnx.ops import _dispatch, linear_scan, selective_scan_fn
from lrnnx.ops.linear_scan import torch as ls_torch

try:
    import lrnnx.ops.selective_scan.cpu as ss_cpu
    from lrnnx.ops._numba import HAVE_NUMBA
except ImportError:  # pragma: no cover - numba missing: the cpu backend falls back to torch
    ss_cpu, HAVE_NUMBA = None, False

BACKENDS = ["reference", "torch"] + (["cpu"] if HAVE_NUMBA else [])
#: zero-length sequences at both ends and next to others, a length-1 one, one crossing steps 8,
#: 16, 24 and 32 (the shrunk chunks) and one ending exactly at a chunk boundary
CU = [0, 0, 5, 5, 6, 30, 32, 37, 37]
T = CU[-1]
SS_GRADS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "deltaA", "initial_state")


@pytest.fixture
def small_chunk(monkeypatch):
    """Chunks of 8 steps for the chunked backends, so sequences span several chunks."""
    monkeypatch.setattr(ss_torch, "CHUNK", 8)
    if ss_cpu is not None:
        monkeypatch.setattr(ss_cpu, "CHUNK", 8)


def _wide(t: Tensor) -> Tensor:
    return t.to(torch.complex128 if t.is_complex() else torch.float64)


def _grads(loss: Tensor, leaves: dict) -> dict:
    names = list(leaves)
    got = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
    return {
        k: torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(names, got, strict=True)
    }


def _projection(shape, dtype, seed, device=None) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen, dtype=torch.float64)
    return w.to(dtype.to_real() if dtype.is_complex else dtype).to(device)


def _loss(out: Tensor, final: Tensor) -> Tensor:
    """A fixed random projection of the output and of the final states (real and imaginary)."""
    loss = (out.real * _projection(out.shape, out.dtype, 1, out.device)).sum()
    loss = loss + (final.real * _projection(final.shape, final.dtype, 2, out.device)).sum()
    if final.is_complex():
        loss = loss + (final.imag * _projection(final.shape, final.dtype, 3, out.device)).sum()
    if out.is_complex():
        loss = loss + (out.imag * _projection(out.shape, out.dtype, 4, out.device)).sum()
    return loss


def _check(got: tuple, ref: tuple, length: int, msg: str, factor: float = 10.0) -> None:
    (out, final, g), (out0, final0, g0) = got, ref
    assert_close_rel(out, out0, length=length, msg=f"{msg}: output")
    assert_close_rel(final, final0, length=length, msg=f"{msg}: final states")
    assert set(g) == set(g0)
    for k in g0:
        # a gradient sums over the sequence: rounding of up to L terms, hence the factor
        assert_close_rel(g[k], g0[k], length=length, factor=factor, msg=f"{msg}: grad {k}")


# ---------------------------------------------------------------------------------------------
# linear_scan


def _ls_inputs(dtype: torch.dtype, with_h0: bool, cu=CU, C=(3, 2), seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    shape = (1, cu[-1], *C)
    a = 1.8 * torch.rand(shape, generator=gen, dtype=torch.float64) - 0.9
    b = torch.randn(shape, generator=gen, dtype=torch.float64)
    h0 = torch.randn(len(cu) - 1, *C, generator=gen, dtype=torch.float64)
    if dtype.is_complex:
        a = a * torch.exp(6.28j * torch.rand(shape, generator=gen, dtype=torch.float64))
        b = torch.complex(b, torch.randn(shape, generator=gen, dtype=torch.float64))
        h0 = torch.complex(h0, torch.randn(h0.shape, generator=gen, dtype=torch.float64))
    kw = dict(a=a.to(dtype), b=b.to(dtype))
    if with_h0:
        kw["initial_state"] = h0.to(dtype)
    return kw


def _ls_packed(kw: dict, backend: str, reverse: bool, cu=CU, cast=lambda t: t, device="cpu"):
    """(output, final states, gradients) of one packed call, on the CPU (moved back there from
    ``device``, where the inputs and the offsets are placed)."""
    leaves = {k: cast(v).to(device).clone().requires_grad_() for k, v in kw.items()}
    h, final = linear_scan(
        **leaves, reverse=reverse, output_final_state=True,
        cu_seqlens=torch.tensor(cu, device=device), backend=backend,
    )  # fmt: skip
    return _on_cpu(h.detach(), final.detach(), _grads(_loss(h, final), leaves))


def _on_cpu(out: Tensor, final: Tensor, grads: dict) -> tuple:
    return out.cpu(), final.cpu(), {k: g.cpu() for k, g in grads.items()}


def _ls_per_sequence(kw: dict, reverse: bool, cu=CU):
    """Each sequence alone through the reference backend, in float64."""
    leaves = {k: _wide(v).clone().requires_grad_() for k, v in kw.items()}
    hs, finals = [], []
    for s in range(len(cu) - 1):
        i, j = cu[s], cu[s + 1]
        h0, a = leaves.get("initial_state"), leaves["a"]
        a = a[:, i:j] if a.dim() == leaves["b"].dim() else a  # a decay given once: as it is
        h, f = linear_scan(
            a, leaves["b"][:, i:j], None if h0 is None else h0[s : s + 1],
            reverse=reverse, output_final_state=True, backend="reference",
        )  # fmt: skip
        hs.append(h)
        finals.append(f)
    h, final = torch.cat(hs, 1), torch.cat(finals, 0)
    return h.detach(), final.detach(), _grads(_loss(h, final), leaves)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128], ids=["real", "complex"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("with_h0", [False, True], ids=["zero-h0", "h0"])
def test_linear_scan_packed_equals_per_sequence(backend, dtype, reverse, with_h0):
    kw = _ls_inputs(dtype, with_h0)
    got = _ls_packed(kw, backend, reverse)
    ref = _ls_per_sequence(kw, reverse)
    assert got[1].shape == (len(CU) - 1, 3, 2)
    _check(got, ref, T, f"linear_scan {backend}")
    # zero-length sequences keep their initial state (or zeros), exactly
    for s in (0, 2, len(CU) - 2):
        expected = kw["initial_state"][s] if with_h0 else torch.zeros(3, 2, dtype=dtype)
        assert torch.equal(got[1][s], expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_scan_packed_long_chunks_and_broadcast_decay(backend):
    """Sequences crossing the torch backend's 64-step chunks, float32, a decay given once (C,)."""
    cu = [0, 70, 70, 71, 200]
    kw = _ls_inputs(torch.float32, True, cu=cu, C=(5,))
    kw["a"] = kw["a"][0, 0]  # (C,): broadcast over time, still reset at every sequence start
    got = _ls_packed(kw, backend, False, cu=cu)
    ref = _ls_per_sequence(kw, False, cu=cu)
    _check(got, ref, cu[-1], f"linear_scan {backend} float32")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_linear_scan_one_sequence_equals_unpacked(backend, reverse):
    kw = _ls_inputs(torch.float64, True, cu=[0, 20])
    got = _ls_packed(kw, backend, reverse, cu=[0, 20])
    leaves = {k: v.clone().requires_grad_() for k, v in kw.items()}
    h, f = linear_scan(**leaves, reverse=reverse, output_final_state=True, backend=backend)
    _check(got, (h.detach(), f.detach(), _grads(_loss(h, f), leaves)), 20, "S=1", factor=1.0)


def test_linear_scan_packed_no_steps():
    """T = 0: every sequence is empty; the final states are the initial states (or zeros)."""
    b = torch.randn(1, 0, 3)
    h0 = torch.randn(2, 3, requires_grad=True)
    cu = torch.tensor([0, 0, 0])
    h, final = linear_scan(torch.rand(1, 0, 3), b, h0, output_final_state=True, cu_seqlens=cu)
    assert h.shape == (1, 0, 3) and torch.equal(final, h0)
    h, final = linear_scan(torch.rand(1, 0, 3), b, output_final_state=True, cu_seqlens=cu)
    assert torch.equal(final, torch.zeros(2, 3))


# ---------------------------------------------------------------------------------------------
# selective_scan_fn


def _ss_inputs(form: str, cplx: bool, extras: bool, cu=CU) -> dict:
    kw = make_scan_inputs(form, cplx, extras=extras, deltaA=True, b=1, L=cu[-1], n=5)
    if extras:  # one initial state per sequence
        gen = torch.Generator().manual_seed(7)
        shape = (len(cu) - 1, 4, 5)
        h0 = torch.randn(shape, generator=gen, dtype=torch.float64)
        if cplx:
            h0 = torch.complex(h0, torch.randn(shape, generator=gen, dtype=torch.float64))
        kw["initial_state"] = h0
    return kw


def _split(kw: dict) -> tuple[dict, dict]:
    tensors = {k: v for k, v in kw.items() if isinstance(v, Tensor)}
    flags = {k: v for k, v in kw.items() if not isinstance(v, Tensor)}
    return tensors, flags


def _ss_packed(
    kw: dict, backend: str, reverse: bool, disc: str, cu=CU, cast=lambda t: t, device="cpu"
):
    tensors, flags = _split(kw)
    leaves = {k: cast(v).to(device).clone().requires_grad_() for k, v in tensors.items()}
    y, final = selective_scan_fn(
        **leaves, **flags, discretization=disc, reverse=reverse, output_final_state=True,
        cu_seqlens=torch.tensor(cu, device=device), backend=backend,
    )  # fmt: skip
    return _on_cpu(y.detach(), final.detach(), _grads(_loss(y, final), leaves))


def _ss_per_sequence(kw: dict, reverse: bool, disc: str, cu=CU):
    """Each sequence alone through the reference backend, in float64."""
    tensors, flags = _split(kw)
    leaves = {k: _wide(v).clone().requires_grad_() for k, v in tensors.items()}
    ys, finals = [], []
    for s in range(len(cu) - 1):
        i, j = cu[s], cu[s + 1]
        part = {}
        for k, v in leaves.items():
            if k == "initial_state":
                part[k] = v[s : s + 1]
            elif v.dim() >= 3:  # time-varying: (1, d, T), (1, n, T) or (1, g, n, T)
                part[k] = v[..., i:j]
            else:
                part[k] = v
        y, f = selective_scan_fn(
            **part, **flags, discretization=disc, reverse=reverse, output_final_state=True,
            backend="reference",
        )  # fmt: skip
        ys.append(y)
        finals.append(f)
    y, final = torch.cat(ys, -1), torch.cat(finals, 0)
    return y.detach(), final.detach(), _grads(_loss(y, final), leaves)


# the forms, discretizations and extras rotate over the cases, so each backend sees them all
_SS_CASES = [
    ("shared", "mamba", False),
    ("input", "zoh", True),
    ("grouped", "bilinear", True),
    ("input", "dirac", False),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("case", range(len(_SS_CASES)))
def test_selective_scan_packed_equals_per_sequence(small_chunk, backend, cplx, reverse, case):
    form, disc, extras = _SS_CASES[(case + cplx + 2 * reverse) % len(_SS_CASES)]
    kw = _ss_inputs(form, cplx, extras)
    got = _ss_packed(kw, backend, reverse, disc)
    ref = _ss_per_sequence(kw, reverse, disc)
    assert got[1].shape == (len(CU) - 1, 4, 5)
    _check(got, ref, T, f"selective_scan {backend} {form} {disc}")
    for s in (0, 2, len(CU) - 2):  # zero-length sequences keep their initial state
        expected = kw["initial_state"][s] if extras else torch.zeros_like(got[1][s])
        assert torch.equal(got[1][s], expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_selective_scan_packed_float32_default_chunks(backend):
    """complex64 with the default chunks (cpu: 256 steps), sequences crossing them."""
    cu = [0, 3, 3, 300, 301, 520]
    kw = make_scan_inputs("grouped", True, extras=True, b=1, L=cu[-1], dtype=torch.float32)
    kw["initial_state"] = torch.randn(len(cu) - 1, 4, 3, dtype=torch.complex64)
    for reverse in (False, True):
        got = _ss_packed(kw, backend, reverse, "zoh", cu=cu)
        ref = _ss_per_sequence(kw, reverse, "zoh", cu=cu)
        _check(got, ref, cu[-1], f"selective_scan {backend} complex64 rev={reverse}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_selective_scan_one_sequence_equals_unpacked(small_chunk, backend, reverse):
    kw = make_scan_inputs("grouped", True, extras=True, deltaA=True, b=1, L=21)
    got = _ss_packed(kw, backend, reverse, "zoh", cu=[0, 21])
    tensors, flags = _split(kw)
    leaves = {k: v.clone().requires_grad_() for k, v in tensors.items()}
    y, f = selective_scan_fn(
        **leaves, **flags, discretization="zoh", reverse=reverse, output_final_state=True,
        backend=backend,
    )  # fmt: skip
    ref = (y.detach(), f.detach(), _grads(_loss(y, f), leaves))
    _check(got, ref, 21, "S=1", factor=1.0)


def test_selective_scan_packed_no_steps():
    kw = make_scan_inputs("input", False, extras=False, b=1, L=0)
    h0 = torch.randn(3, 4, 3, dtype=torch.float64)
    y, final = selective_scan_fn(
        **kw, initial_state=h0, output_final_state=True, cu_seqlens=torch.tensor([0, 0, 0, 0])
    )
    assert y.shape == (1, 4, 0) and torch.equal(final, h0)


# ---------------------------------------------------------------------------------------------
# a nan or inf inside one sequence stays there (a restart selects, never multiplies by zero)

#: sequence 1 holds a nan and sequence 3 an inf (2 is empty between them, 4 has one step); the
#: finite sequences 0, 4 and 5 lie before, between and after them
CU_BAD = [0, 6, 13, 13, 19, 20, 27]
BAD = {1: float("nan"), 3: float("inf")}
GOOD = [s for s in range(len(CU_BAD) - 1) if s not in BAD]
_GOOD_STEPS = torch.tensor([t for s in GOOD for t in range(CU_BAD[s], CU_BAD[s + 1])])
_BAD_STEPS = torch.tensor([t for s in BAD for t in range(CU_BAD[s], CU_BAD[s + 1])])


def _poison(kw: dict, name: str, time_dim: int) -> dict:
    """A copy of ``kw`` whose input ``name`` holds a nan in sequence 1 and an inf in sequence 3:
    at a middle step (each sequence's first steps are finite), or the whole initial state."""
    kw = {k: v.clone() if isinstance(v, Tensor) else v for k, v in kw.items()}
    for s, value in BAD.items():
        if name == "initial_state":
            kw[name][s] = value
        else:
            mid = (CU_BAD[s] + CU_BAD[s + 1]) // 2
            kw[name].select(time_dim, mid).fill_(value)
    return kw


def _good_part(result: tuple, time_dim: int, per_step: tuple[str, ...]) -> tuple:
    """The finite sequences' part of (outputs, final states, gradients): their steps of the
    output and of each per-step input's gradient, their rows of the final and initial states."""
    out, final, g = result
    seqs = torch.tensor(GOOD)
    part = {k: v.index_select(time_dim, _GOOD_STEPS) for k, v in g.items() if k in per_step}
    if "initial_state" in g:
        part["initial_state"] = g["initial_state"].index_select(0, seqs)
    return out.index_select(time_dim, _GOOD_STEPS), final.index_select(0, seqs), part


def _assert_isolated(got: tuple, ref: tuple, time_dim: int, per_step: tuple, msg: str) -> None:
    # the poison took: the packed output is non-finite in the bad sequences
    assert not torch.isfinite(got[0].index_select(time_dim, _BAD_STEPS)).all(), msg
    got, ref = _good_part(got, time_dim, per_step), _good_part(ref, time_dim, per_step)
    assert set(got[2]) == set(ref[2]) and got[2], msg
    _check(got, ref, CU_BAD[-1], msg)  # asserts every compared value is finite


@pytest.fixture
def small_scan_chunk(monkeypatch):
    """linear_scan's torch chunks of 4 steps: restarts inside chunks, at their starts and in
    the recursive scan of the chunk ends."""
    monkeypatch.setattr(ls_torch, "CHUNK", 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["b", "a", "initial_state"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128], ids=["real", "complex"])
def test_linear_scan_nonfinite_sequence_stays_in_it(
    small_scan_chunk, backend, where, reverse, dtype
):
    """Outputs, final states and gradients of the finite sequences equal running them alone."""
    got, ref = _ls_nonfinite(dtype, where, reverse, backend)
    _assert_isolated(got, ref, 1, _LS_PER_STEP, f"linear_scan {backend} {where}")


_LS_PER_STEP = ("a", "b")


def _ls_nonfinite(dtype: torch.dtype, where: str, reverse: bool, backend: str) -> tuple:
    """(packed through ``backend``, each sequence alone) with ``where`` poisoned."""
    kw = _poison(_ls_inputs(dtype, True, cu=CU_BAD), where, 1)
    return _ls_packed(kw, backend, reverse, cu=CU_BAD), _ls_per_sequence(kw, reverse, cu=CU_BAD)


#: the selective scan's per-step inputs (their gradients are per sequence); A, D, delta_bias and
#: time-invariant B/C are shared, so their gradients sum over the poisoned sequences too
_SS_PER_STEP = ("u", "delta", "z", "deltaA", "B", "C")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["u", "delta", "initial_state"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_selective_scan_nonfinite_sequence_stays_in_it(small_chunk, backend, where, reverse):
    """As for linear_scan, complex for the reverse scans."""
    got, ref = _ss_nonfinite(where, reverse, reverse, backend)
    _assert_isolated(got, ref, -1, _SS_PER_STEP, f"selective_scan {backend} {where}")


def _ss_nonfinite(where: str, reverse: bool, cplx: bool, backend: str, cast=lambda t: t):
    """(packed through ``backend``, each sequence alone) with ``where`` poisoned; mamba's rule,
    so an inf delta gives an inf input (zoh would turn it into a finite restart).  ``cast``
    the inputs (float32 for the Triton kernels)."""
    kw = _ss_inputs("grouped" if cplx else "input", cplx, True, cu=CU_BAD)
    if where == "delta":  # delta then drives A_bar too
        del kw["deltaA"]
    kw = {k: cast(v) if isinstance(v, Tensor) else v for k, v in _poison(kw, where, -1).items()}
    got = _ss_packed(kw, backend, reverse, "mamba", cu=CU_BAD)
    return got, _ss_per_sequence(kw, reverse, "mamba", cu=CU_BAD)


# ---------------------------------------------------------------------------------------------
# the Triton kernels, under the interpreter in a subprocess

_TRITON_WORKER = """
import sys
import torch
sys.path.insert(0, {tests!r})
import test_packed_ops as t
from lrnnx.ops import _dispatch
from lrnnx.ops.selective_scan import triton as ss_triton

from lrnnx.ops.linear_scan import triton as ls_triton

launches = {{"fwd": 0, "bwd": 0, "linear_scan": 0}}
kernel = ls_triton.scan_kernel
def scan_kernel(*a, **k):
    launches["linear_scan"] += 1
    return kernel(*a, **k)
ls_triton.scan_kernel = scan_kernel
for name, key in (("forward", "fwd"), ("backward", "bwd")):
    orig = getattr(ss_triton._Plan, name)
    def spy(self, *a, _orig=orig, _key=key, **k):
        launches[_key] += 1
        return _orig(self, *a, **k)
    setattr(ss_triton._Plan, name, spy)
cpu = torch.device("cpu")
assert _dispatch.select("selective_scan", cpu, "triton")[0] == "triton"
assert _dispatch.select("linear_scan", cpu, "triton")[0] == "triton"
f32 = lambda x: x.to(torch.complex64 if x.is_complex() else torch.float32)
out = {{}}
# the interpreter's time tile is 32 steps: sequences cross it, one ends at 32
for cplx, reverse, form, disc, extras in [
    (False, False, "grouped", "zoh", True),
    (True, True, "input", "mamba", True),
    (True, False, "shared", "bilinear", False),
    (False, True, "input", "dirac", False),
]:
    kw = t._ss_inputs(form, cplx, extras)
    kw32 = {{k: f32(v) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}}
    got = t._ss_packed(kw32, "triton", reverse, disc)
    ref = t._ss_per_sequence(kw32, reverse, disc)
    out[f"ss-{{form}}-{{disc}}-cplx{{cplx}}-rev{{reverse}}"] = (got, ref)
for dtype in (torch.float32, torch.complex64):
    kw = t._ls_inputs(dtype, True)
    out[f"ls-{{dtype}}"] = (t._ls_packed(kw, "triton", True), t._ls_per_sequence(kw, True))
# a nan and an inf in two sequences: the others are unaffected, forward and backward
bad = {{}}
for dtype, where, reverse in [
    (torch.float32, "b", False),
    (torch.complex64, "a", True),
    (torch.float32, "initial_state", True),
]:
    bad[f"ls-{{dtype}}-{{where}}-rev{{reverse}}"] = t._ls_nonfinite(dtype, where, reverse, "triton")
for where, reverse, cplx in [("u", False, False), ("delta", True, False), ("initial_state", True, True)]:
    got, ref = t._ss_nonfinite(where, reverse, cplx, "triton", f32)
    bad[f"ss-{{where}}-rev{{reverse}}-cplx{{cplx}}"] = (got, ref)
torch.save({{"cases": out, "nonfinite": bad, "launches": launches}}, sys.argv[1])
"""


def _have_triton() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


@pytest.mark.slow  # the Triton interpreter: about 40 s on 2 cores (make test-slow)
@pytest.mark.skipif(not _have_triton(), reason="triton is not installed")
def test_triton_kernels_packed_under_interpreter(tmp_path):
    script = tmp_path / "worker.py"
    tests = str(Path(__file__).parent)
    script.write_text(textwrap.dedent(_TRITON_WORKER.format(tests=tests)))
    out = tmp_path / "out.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("LRNNX_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, str(script), str(out)],
        env=env, cwd=tests, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    result = torch.load(out)
    # seven selective scans, each one fused forward and one fused backward launch; five linear
    # scans, each one launch forward and one backward
    assert result["launches"] == {"fwd": 7, "bwd": 7, "linear_scan": 10}
    for case, (got, ref) in result["cases"].items():
        assert got[0].dtype in (torch.float32, torch.complex64), case
        _check(got, ref, T, f"triton {case}")
    assert len(result["nonfinite"]) == 6
    for case, (got, ref) in result["nonfinite"].items():
        assert got[0].dtype in (torch.float32, torch.complex64), case
        time_dim, per_step = (1, _LS_PER_STEP) if case.startswith("ls") else (-1, _SS_PER_STEP)
        _assert_isolated(got, ref, time_dim, per_step, f"triton {case}")


# ---------------------------------------------------------------------------------------------
# the op contract


@pytest.mark.parametrize("op", [linear_scan, selective_scan_fn])
def test_new_arguments_are_keyword_only(op):
    params = inspect.signature(op).parameters
    for name in ("output_final_state", "cu_seqlens"):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    assert "reverse" in params and "initial_state" in params


def test_linear_scan_final_state_aliases():
    a, b = torch.rand(2, 5, 3), torch.randn(2, 5, 3)
    h = linear_scan(a, b)
    for kw in (
        dict(output_final_state=True),
        dict(return_final_state=True),
        dict(output_final_state=True, return_final_state=True),
    ):
        out, final = linear_scan(a, b, **kw)
        assert torch.equal(out, h) and torch.equal(final, h[:, -1])
    assert isinstance(linear_scan(a, b, output_final_state=False, return_final_state=False), Tensor)
    out, final = linear_scan(a, b, None, False, True)  # positional return_final_state still works
    assert torch.equal(final, h[:, -1])
    with pytest.raises(ValueError, match="output_final_state.*return_final_state"):
        linear_scan(a, b, output_final_state=True, return_final_state=False)


def test_selective_scan_final_state_aliases_and_mamba_signature():
    kw = make_scan_inputs("input", False, extras=False, L=9)
    u, delta, A, B, C = (kw[k] for k in ("u", "delta", "A", "B", "C"))
    y = selective_scan_fn(u, delta, A, B, C)
    # mamba_ssm's positional signature: (u, delta, A, B, C, D, z, delta_bias, delta_softplus,
    # return_last_state)
    y1, last = selective_scan_fn(u, delta, A, B, C, None, None, None, False, True)
    y2, last2 = selective_scan_fn(u, delta, A, B, C, output_final_state=True)
    assert torch.equal(y1, y) and torch.equal(y2, y) and torch.equal(last, last2)
    assert last.shape == (2, 4, 3)
    y3, _ = selective_scan_fn(u, delta, A, B, C, return_last_state=True, output_final_state=True)
    assert torch.equal(y3, y)
    assert isinstance(selective_scan_fn(u, delta, A, B, C, output_final_state=False), Tensor)
    with pytest.raises(ValueError, match="output_final_state.*return_last_state"):
        selective_scan_fn(u, delta, A, B, C, return_last_state=False, output_final_state=True)


def _bad_cu() -> list:
    return [
        (torch.tensor([0, 4, 9]), 2, "batch size 1"),
        (torch.tensor([0.0, 4.0, 9.0]), 1, "integer"),
        (torch.tensor([[0, 4, 9]]), 1, r"\(S \+ 1,\)"),
        (torch.tensor([0]), 1, r"\(S \+ 1,\)"),
        ([0, 9], 1, None),  # a list, not a tensor
        (torch.tensor([1, 4, 9]), 1, r"cu_seqlens\[0\] = 0"),
        (torch.tensor([0, 4, 8]), 1, r"cu_seqlens\[-1\] = T = 9"),
        (torch.tensor([0, 5, 4, 9]), 1, "must not decrease"),
    ]


@pytest.mark.parametrize("cu,batch,msg", _bad_cu())
def test_bad_cu_seqlens(cu, batch, msg):
    a, b = torch.rand(batch, 9, 3), torch.randn(batch, 9, 3)
    kw = make_scan_inputs("input", False, extras=False, b=batch, L=9)
    for call in (
        lambda: linear_scan(a, b, cu_seqlens=cu),
        lambda: selective_scan_fn(**kw, cu_seqlens=cu),
    ):
        with pytest.raises(ValueError, match="cu_seqlens") as info:
            call()
        if msg is not None:
            assert info.match(msg)
        # a wrong type or dtype is a TypeError as well (as for lengths)
        wrong_type = not isinstance(cu, torch.Tensor) or cu.is_floating_point()
        assert isinstance(info.value, TypeError) == wrong_type


def test_packed_initial_state_shape_is_per_sequence():
    cu = torch.tensor([0, 4, 9])
    with pytest.raises(ValueError, match=r"initial_state: expected shape \(2, 3\)"):
        linear_scan(torch.rand(1, 9, 3), torch.randn(1, 9, 3), torch.randn(1, 3), cu_seqlens=cu)
    kw = make_scan_inputs("input", False, extras=False, b=1, L=9)
    with pytest.raises(ValueError, match=r"initial_state: expected \(S, d, n\)"):
        selective_scan_fn(**kw, initial_state=torch.randn(1, 4, 3), cu_seqlens=cu)


def test_int32_offsets_and_dispatch_default():
    """flash-attn's int32 offsets are accepted; the default backend runs packed inputs."""
    kw = _ls_inputs(torch.float64, True)
    h64, f64 = linear_scan(**kw, output_final_state=True, cu_seqlens=torch.tensor(CU))
    h32, f32 = linear_scan(
        **kw, output_final_state=True, cu_seqlens=torch.tensor(CU, dtype=torch.int32)
    )
    assert torch.equal(h64, h32) and torch.equal(f64, f32)
    assert _dispatch.select("linear_scan", torch.device("cpu"))[0] in BACKENDS
