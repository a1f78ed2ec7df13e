"""Packed sequences, native reverse and non-finite isolation of the Triton kernels, compiled for
a real GPU (test_packed_ops.py runs the same cases under Triton's CPU interpreter, in make
test-slow).

Each case is one packed call on CUDA (float32 / complex64, the offsets on the GPU as flash-attn
and mamba_ssm pass them) against every sequence run alone through the float64 reference on the
CPU: outputs, one final state per sequence and the gradients of every input.  Sequences cross
the kernels' time tiles (64 steps for linear_scan, 32 for the selective scan) and sit next to
empty ones.  Skipped without a CUDA GPU (CI).
"""

from __future__ import annotations

import pytest
import torch

import test_packed_ops as t
from lrnnx.ops import _dispatch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def f32(x):
    return x.to(torch.complex64 if x.is_complex() else torch.float32)


@pytest.fixture(autouse=True)
def _triton():
    pytest.importorskip("triton")
    for op in ("linear_scan", "selective_scan"):
        assert _dispatch.select(op, torch.device("cuda"))[0] == "triton", op


#: empty sequences at both ends, one of length 1, sequences crossing 32, 64 and 128 steps
CU_LONG = [0, 0, 1, 40, 40, 110, 200, 263, 263]


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128], ids=["real", "complex"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cu", [t.CU, CU_LONG], ids=["short", "long"])
def test_linear_scan_packed_cuda(dtype, reverse, cu):
    kw = t._ls_inputs(dtype, True, cu=cu, C=(3, 5))
    got = t._ls_packed(kw, "triton", reverse, cu=cu, cast=f32, device="cuda")
    ref = t._ls_per_sequence({k: f32(v) for k, v in kw.items()}, reverse, cu=cu)
    assert got[0].dtype in (torch.float32, torch.complex64)
    t._check(got, ref, cu[-1], f"triton linear_scan rev={reverse}")


@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("case", range(len(t._SS_CASES)))
@pytest.mark.parametrize("cu", [t.CU, CU_LONG], ids=["short", "long"])
def test_selective_scan_packed_cuda(cplx, reverse, case, cu):
    form, disc, extras = t._SS_CASES[(case + cplx + 2 * reverse) % len(t._SS_CASES)]
    kw = {k: f32(v) if isinstance(v, torch.Tensor) else v for k, v in t._ss_inputs(
        form, cplx, extras, cu=cu).items()}  # fmt: skip
    got = t._ss_packed(kw, "triton", reverse, disc, cu=cu, device="cuda")
    ref = t._ss_per_sequence(kw, reverse, disc, cu=cu)
    assert got[0].dtype in (torch.float32, torch.complex64)
    t._check(got, ref, cu[-1], f"triton selective_scan {form} {disc} rev={reverse}")
    for s in (0, len(cu) - 2):  # empty sequences keep their initial state
        expected = kw["initial_state"][s] if extras else torch.zeros_like(got[1][s])
        torch.testing.assert_close(got[1][s], expected, rtol=0, atol=0)


@pytest.mark.parametrize("where", ["b", "a", "initial_state"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64], ids=["real", "complex"])
def test_linear_scan_nonfinite_isolated_cuda(where, reverse, dtype):
    kw = t._poison(t._ls_inputs(dtype, True, cu=t.CU_BAD), where, 1)
    got = t._ls_packed(kw, "triton", reverse, cu=t.CU_BAD, device="cuda")
    ref = t._ls_per_sequence(kw, reverse, cu=t.CU_BAD)
    t._assert_isolated(got, ref, 1, t._LS_PER_STEP, f"triton linear_scan {where}")


@pytest.mark.parametrize("where", ["u", "delta", "initial_state"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_selective_scan_nonfinite_isolated_cuda(where, reverse):
    kw = t._ss_inputs("grouped" if reverse else "input", reverse, True, cu=t.CU_BAD)
    if where == "delta":
        del kw["deltaA"]
    kw = {k: f32(v) if isinstance(v, torch.Tensor) else v for k, v in t._poison(
        kw, where, -1).items()}  # fmt: skip
    got = t._ss_packed(kw, "triton", reverse, "mamba", cu=t.CU_BAD, device="cuda")
    ref = t._ss_per_sequence(kw, reverse, "mamba", cu=t.CU_BAD)
    t._assert_isolated(got, ref, -1, t._SS_PER_STEP, f"triton selective_scan {where}")
