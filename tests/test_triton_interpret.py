"""The Triton kernels on the CPU, under Triton's interpreter, against the reference loops.

``TRITON_INTERPRET=1`` only takes effect for kernels defined after it is set, and pytest imports
every test module (some of which load the Triton backends) into one process, so the kernels run
in a fresh subprocess (``_triton_interpret_worker.py``) that saves each result beside its float64
reference; the assertions are made here.  Each case checks forward and backward: the output, the
final state and the gradient of every tensor input (initial state included) of a fixed random
projection of both, relative to the reference's magnitude with the float32 tolerance of
``_tol.py`` for the sequence's length.  The worker also checks that the dispatcher hands out the
Triton backend and counts the kernel launches, so a fallback to the torch backend cannot pass.

Neither op takes ``lengths``; the CUDA-only checks (long sequences, memory) stay in
test_cuda*.py.  Skipped when Triton is not installed (it has wheels for Linux x86-64 only).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _tol import assert_close_rel
from _triton_interpret_worker import FLIP_CASES, LS_CASES, SS_CASES

WORKER = Path(__file__).with_name("_triton_interpret_worker.py")


def _have_triton() -> bool:
    """Triton is installed (found without importing it: the import belongs to the worker)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


# slow (make test-slow, which CI runs): the interpreter takes about a minute on 2 cores
pytestmark = [
    pytest.mark.skipif(not _have_triton(), reason="triton is not installed"),
    pytest.mark.slow,
]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """Run every case once in a subprocess with TRITON_INTERPRET=1 (about 30 s on 2 cores)."""
    out = tmp_path_factory.mktemp("triton_interpret") / "results.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop("LRNNX_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(out)],
        env=env,
        cwd=WORKER.parent,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode == 3:  # Triton is installed but cannot be imported here
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out)


def _check(result: dict, case: str) -> None:
    assert result["pairs"], case
    for name, (got, ref) in result["pairs"].items():
        assert got.dtype in (torch.float32, torch.complex64), (case, name, got.dtype)
        assert_close_rel(got, ref, dtype=got.dtype, length=result["L"], msg=f"{case}: {name}")


@pytest.mark.parametrize("case", list(LS_CASES))
def test_linear_scan_kernel_matches_reference(results, case):
    """h, final state and the gradients of a, b, h0; one launch forward, one backward."""
    r = results[case]
    assert r["launches"] == {"forward+backward": 2}
    assert set(r["pairs"]) == {"h", "final_state", "grad_a", "grad_b", "grad_h0"}
    _check(r, case)


@pytest.mark.parametrize("case", list(SS_CASES))
def test_selective_scan_kernels_match_reference(results, case):
    """y, last state and the gradient of every tensor input, through the fused kernels."""
    r = results[case]
    assert r["launches"] == {"ss_forward": 1, "ss_backward": 1}
    expected = {"y", "last_state", "grad_u", "grad_delta", "grad_A", "grad_B", "grad_C"}
    kw = SS_CASES[case]
    if kw.get("extras", True):
        expected |= {"grad_D", "grad_z", "grad_delta_bias", "grad_initial_state"}
    if kw.get("deltaA", False):
        expected.add("grad_deltaA")
    assert set(r["pairs"]) == expected
    _check(r, case)


@pytest.mark.parametrize("case", list(FLIP_CASES))
def test_selective_scan_native_reverse_equals_flip(results, case):
    """reverse=True runs the kernels backwards in time (REVERSE, not a flipped copy) and equals
    the forward kernels on flipped inputs: y, final states and every gradient."""
    r = results[case]
    assert r["reverse_flags"] == [True, False]  # native reverse, then the flipped forward run
    assert {"y", "last_state", "grad_u", "grad_delta", "grad_initial_state"} <= set(r["pairs"])
    _check(r, case)
