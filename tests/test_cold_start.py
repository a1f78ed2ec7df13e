"""Cold start of the fused CPU kernels (lrnnx.ops._numba): while numba compiles them, calls run
on the pure-torch backend and a background process fills numba's cache; ``LRNNX_NUMBA_COMPILE``
chooses; the notice appears only when something compiles.  No wall-clock assertions.

Most tests use a tiny numba module written to tmp_path (its own cache beside it), so the
background process compiles in a second; the slow test runs the real linear_scan kernels in
fresh processes with an empty ``NUMBA_CACHE_DIR``."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
import torch

from _tol import assert_close_rel
from lrnnx.ops import _dispatch, _numba
from lrnnx.ops.linear_scan import reference as ls_reference

pytestmark = pytest.mark.skipif(not _numba.HAVE_NUMBA, reason="numba not installed")

# a numba backend in miniature: a cached kernel, warm_up(dtypes) running it, a marker of calls
_PROBE = """
import time
import numba
import torch

HAVE_NUMBA = True
CALLS = []
WARM_UP_SLEEP = {sleep}
WARM_UP_FAILS = {fails}


@numba.njit(cache=True)
def _double(x):
    for i in range(x.shape[0]):
        x[i] *= 2


def fused(t):
    CALLS.append(t.dtype)
    out = t.clone()
    _double(out.numpy())
    return out


def warm_up(dtypes):
    if WARM_UP_FAILS:
        raise RuntimeError("the compiler broke")
    time.sleep(WARM_UP_SLEEP)
    for dtype in dtypes:
        fused(torch.ones(3, dtype=dtype))


if not {recipe}:  # a backend without a recipe: its first call is replayed
    del warm_up
"""


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """make(sleep=0, fails=False): a fresh probe module, importable here and in children."""
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(_numba.COMPILE_ENV, raising=False)
    monkeypatch.setattr(_numba, "_JOBS", [])
    monkeypatch.setattr(_numba, "_READY", {})

    def make(sleep: float = 0.0, fails: bool = False, recipe: bool = True):
        name = f"lrnnx_probe_{uuid.uuid4().hex[:8]}"
        source = _PROBE.format(sleep=sleep, fails=fails, recipe=recipe)
        (tmp_path / f"{name}.py").write_text(source)
        return __import__(name)

    yield make
    _numba._stop_jobs()


def _fallback(calls: list):
    def torch_double(t):
        calls.append(t.dtype)
        return t * 2

    return torch_double


def test_first_call_runs_torch_then_the_fused_kernel_once_compiled(probe):
    mod = probe()
    torch_calls = []
    call = _numba.deferred(mod, mod.fused, _fallback(torch_calls))
    x = torch.arange(3.0)
    torch.testing.assert_close(call(x), 2 * x)  # at once, on the fallback
    assert torch_calls == [torch.float32] and mod.CALLS == []
    assert _numba.wait_for_background(timeout=120)
    torch.testing.assert_close(call(x), 2 * x)
    assert mod.CALLS == [torch.float32] and len(torch_calls) == 1  # now the fused kernel
    # another dtype is another variant: compiled on its own
    call(x.double())
    assert torch_calls[-1] == torch.float64 and mod.CALLS == [torch.float32]
    assert _numba.wait_for_background(timeout=120)
    # a new process finds the cache filled (its marker): fused at once, no compile process
    _numba._READY.clear()
    jobs = len(_numba._JOBS)
    call(x.double())
    assert mod.CALLS[-1] == torch.float64 and len(_numba._JOBS) == jobs


@pytest.mark.slow  # compile processes started from fresh interpreters: make test-slow
def test_without_a_recipe_the_first_call_is_replayed(probe):
    mod = probe(recipe=False)
    torch_calls = []
    call = _numba.deferred(mod, mod.fused, _fallback(torch_calls))
    x = torch.arange(4.0).double()[::2]  # strided: the replayed copy keeps the layout
    torch.testing.assert_close(call(x), 2 * x)
    (job,) = _numba._JOBS
    assert job.replay and os.path.exists(job.replay)
    assert _numba.wait_for_background(timeout=120)
    torch.testing.assert_close(call(x), 2 * x)
    assert mod.CALLS == [torch.float64] and torch_calls == [torch.float64]
    assert not os.path.exists(job.replay)  # the copy of the arguments is gone


def test_wait_mode_compiles_in_process(probe, monkeypatch):
    monkeypatch.setenv(_numba.COMPILE_ENV, "wait")
    mod = probe()
    torch_calls = []
    call = _numba.deferred(mod, mod.fused, _fallback(torch_calls))
    torch.testing.assert_close(call(torch.ones(2)), torch.full((2,), 2.0))
    assert mod.CALLS and not torch_calls and not _numba._JOBS


def test_wait_mode_leaves_the_marker_for_background_processes(probe, monkeypatch):
    """wait mode with MARK_WAIT_COMPILES compiles the variant's kernels here (warm_up,
    whatever the caller's grad mode) and leaves the marker, so a later process in background mode runs the fused kernels
    at once, with no compile process a busy machine could starve."""
    monkeypatch.setenv(_numba.COMPILE_ENV, "wait")
    monkeypatch.setattr(_numba, "MARK_WAIT_COMPILES", True)  # as lrnnx train sets it
    mod = probe()
    torch_calls = []
    call = _numba.deferred(mod, mod.fused, _fallback(torch_calls))
    with torch.inference_mode():
        call(torch.ones(2))
    marker = _numba._marker(mod, ("float32",))
    assert marker is not None and marker.exists()
    monkeypatch.setenv(_numba.COMPILE_ENV, "background")
    _numba._READY.clear()  # as in a new process
    call(torch.ones(2))
    assert not torch_calls and not _numba._JOBS


def test_unknown_mode_is_a_clear_error(probe, monkeypatch):
    monkeypatch.setenv(_numba.COMPILE_ENV, "later")
    mod = probe()
    call = _numba.deferred(mod, mod.fused, _fallback([]))
    with pytest.raises(
        ValueError,
        match=r"LRNNX_NUMBA_COMPILE: expected one of \['background', 'wait'\], got 'later'",
    ):
        call(torch.ones(2))


@pytest.mark.slow  # compile processes started from fresh interpreters: make test-slow
def test_failed_compile_warns_once_and_stays_on_torch(probe):
    mod = probe(fails=True)
    torch_calls = []
    call = _numba.deferred(mod, mod.fused, _fallback(torch_calls))
    call(torch.ones(2))
    assert not _numba.wait_for_background(timeout=120)
    with pytest.warns(RuntimeWarning, match="the compiler broke.*LRNNX_NUMBA_COMPILE=wait"):
        call(torch.ones(2))
    call(torch.ones(2))  # no second warning (pytest's filters would turn it into an error)
    assert len(torch_calls) == 3 and not mod.CALLS


@pytest.mark.slow  # compile processes started from fresh interpreters: make test-slow
def test_processes_starting_together_compile_once(probe):
    """Two compile processes for the same kernels (as from two pytest-xdist workers or DDP
    ranks): they take turns through the cache directory's lock and both succeed."""
    mod = probe(sleep=1.0)
    a = _numba._Job(mod, ("float32",))
    b = _numba._Job(mod, ("float32",))
    assert a.proc.wait(120) == 0 and b.proc.wait(120) == 0
    assert _numba._marker(mod, ("float32",)).exists()


@pytest.mark.slow  # compile processes started from fresh interpreters: make test-slow
def test_compile_process_ends_with_its_parent(probe, tmp_path):
    mod = probe(sleep=300.0)
    code = textwrap.dedent(f"""
        import os, sys, torch
        from lrnnx.ops import _numba
        import {mod.__name__} as mod
        job = _numba._Job(mod, ("float32",))
        print(job.proc.pid, flush=True)
        os._exit(0)  # killed-like: no atexit handlers run
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    pid = int(out.stdout.split()[0])
    for _ in range(600):  # the child reads EOF on its pipe and exits
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        pytest.fail("the compile process outlived its parent")


def test_explicit_backend_is_never_replaced():
    """backend="cpu" runs the fused kernels (compiling here if needed); lrnnx's own choice is
    the deferred wrapper around the same function."""
    cpu = torch.device("cpu")
    name, explicit = _dispatch.select("linear_scan", cpu, "cpu")
    ls_cpu = sys.modules["lrnnx.ops.linear_scan.cpu"]

    assert name == "cpu" and explicit is ls_cpu.linear_scan
    chosen = _dispatch.select("linear_scan", cpu)[1]
    assert chosen is not explicit and getattr(chosen, "__wrapped__", None) is ls_cpu.linear_scan


def test_notice_only_when_numba_compiles(monkeypatch, caplog):
    import numba

    monkeypatch.setattr(_numba, "_ANNOUNCED", False)
    monkeypatch.setattr(_numba, "KERNEL_PACKAGE", __name__)
    compiled = numba.njit(lambda x: x + 1)
    with caplog.at_level(logging.INFO, logger="lrnnx.ops"):
        compiled(1)  # compiles: announced
        compiled(2)  # compiled already: silent
        numba.njit(lambda x: x - 1)(1)  # compiles again: once per process
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("lrnnx: compiling the fused CPU kernels")


def test_notice_without_logging_is_one_stderr_line(monkeypatch, capsys):
    monkeypatch.setattr(_numba, "_ANNOUNCED", False)
    monkeypatch.setattr(_numba.logger, "hasHandlers", lambda: False)
    _numba.announce_compilation("/some/cache", background=True)
    _numba.announce_compilation("/some/cache")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "in a background process" in err[0] and "/some/cache" in err[0]


@pytest.mark.slow  # compile processes started from fresh interpreters: make test-slow
def test_bench_times_warm_fused_kernels_and_measures_a_cold_process(tmp_path):
    from lrnnx import bench

    with bench._backend_env(None):  # the timed cases never run torch in place of the kernels
        assert _numba.compile_mode() == "wait"
    row = bench.cold_run("s4d", "wait", tmp_path, (1, 8, 4, 4), 1)
    assert row.model == "s4d" and row.mode == "wait" and row.step1_s > 0 and row.step2_s > 0
    assert not row.compiling_after and row.ready_s is None
    row.cache = "cold"
    md = bench.cold_markdown([row], "test machine", (1, 8, 4, 4))
    assert "| s4d | wait | cold |" in md and "B=1 L=8 H=4 N=4" in md


# ------------------------------------------------------------------------ real kernels, slow

_SCAN_CHILD = """
import importlib, json, sys, torch
from lrnnx.ops import _numba, linear_scan
ls_cpu = importlib.import_module("lrnnx.ops.linear_scan.cpu")
fused = []
kernel = ls_cpu.scan_kernel
ls_cpu.scan_kernel = lambda *a: fused.append(1) or kernel(*a)
g = torch.Generator().manual_seed(0)
a = torch.rand(2, 33, 5, generator=g).requires_grad_()
b = torch.randn(2, 33, 5, generator=g).requires_grad_()
out = []
for _ in range(2 if sys.argv[1] == "wait" else 1):
    h = linear_scan(a, b)
    h.square().sum().backward()
    out.append(dict(fused=len(fused), h=h.tolist(), ga=a.grad.tolist()))
    a.grad = b.grad = None
if _numba.compiling():
    assert _numba.wait_for_background(timeout=300)
    h = linear_scan(a, b)
    out.append(dict(fused=len(fused), h=h.tolist(), ga=None))
print(json.dumps(dict(steps=out, jobs=len(_numba._JOBS))))
"""


def _scan_child(mode: str, cache_dir) -> tuple[dict, str]:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), **{_numba.COMPILE_ENV: mode})
    env.pop("LRNNX_BACKEND", None)
    out = subprocess.run(
        [sys.executable, "-c", _SCAN_CHILD, mode], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


@pytest.mark.slow
def test_fresh_cache_in_fresh_processes(tmp_path):
    """linear_scan with an empty NUMBA_CACHE_DIR: correct results at once on torch, the fused
    kernel once the background compile is done, the notice only where numba compiles."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 33, 5, generator=g).double()  # the children's inputs, in float64
    b = torch.randn(2, 33, 5, generator=g).double()
    a.requires_grad_()
    expected = ls_reference.linear_scan(a, b, None, False)
    (grad_a,) = torch.autograd.grad(expected.square().sum(), a)

    def check(step):
        h = torch.tensor(step["h"])
        assert_close_rel(h, expected.detach().float(), dtype=torch.float32, length=33)
        if step["ga"] is not None:
            ga = torch.tensor(step["ga"])
            assert_close_rel(ga, grad_a.float(), dtype=torch.float32, length=33, msg="grad a")

    cold, err = _scan_child("background", tmp_path / "bg")
    first, *_, last = cold["steps"]
    check(first)
    check(last)
    assert first["fused"] == 0 and last["fused"] > 0 and cold["jobs"] == 1
    assert err.count("compiling the fused CPU kernels in a background process") == 1
    assert list((tmp_path / "bg").rglob("lrnnx-ready-*"))  # under NUMBA_CACHE_DIR, with numba's
    warm, err = _scan_child("background", tmp_path / "bg")
    assert warm["steps"][0]["fused"] > 0 and warm["jobs"] == 0 and "compiling" not in err
    check(warm["steps"][0])

    cold, err = _scan_child("wait", tmp_path / "wait")
    assert cold["steps"][0]["fused"] > 0 and cold["jobs"] == 0
    assert err.count("lrnnx: compiling the fused CPU kernels (first use") == 1
    warm, err = _scan_child("wait", tmp_path / "wait")
    assert "compiling" not in err  # loading from the cache is not compiling
    for step in cold["steps"] + warm["steps"]:
        check(step)
