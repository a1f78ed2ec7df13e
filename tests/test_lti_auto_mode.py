"""LTI models: what mode="auto" picks, and the allocation-free recurrent step."""

from __future__ import annotations

import pytest
import torch

from lrnnx.models.lti import base as lti_base
from lrnnx.models.lti.lru import LRU
from lrnnx.models.lti.s5 import S5
from lrnnx.ops.linear_scan import cpu as scan_cpu


@pytest.fixture
def no_backend_env(monkeypatch):
    monkeypatch.delenv("LRNNX_BACKEND", raising=False)


@pytest.mark.skipif(not scan_cpu.is_available(), reason="needs numba")
def test_auto_scans_at_every_length_with_a_fused_scan(no_backend_env):
    m = LRU(4, 4, mode="auto")
    assert not any(m._use_fft(L) for L in (1, 64, lti_base.AUTO_FFT_MIN_LEN, 16384))


def test_auto_uses_fft_from_the_threshold_with_the_torch_scan(monkeypatch):
    monkeypatch.setenv("LRNNX_BACKEND", "torch")
    m = S5(4, 4, "zoh", mode="auto")
    assert not m._use_fft(lti_base.AUTO_FFT_MIN_LEN - 1)
    assert m._use_fft(lti_base.AUTO_FFT_MIN_LEN)
    # a device whose only linear_scan backend is the pure-torch one: same rule
    monkeypatch.delenv("LRNNX_BACKEND")
    assert m._use_fft(16384, device=torch.device("meta"))
    assert not m._use_fft(64, device=torch.device("meta"))


def test_auto_follows_the_torch_scan_while_a_program_is_recorded(no_backend_env, monkeypatch):
    """While torch.export or torch.jit.trace records, the scan runs on its torch backend
    (lrnnx.ops._dispatch.resolve), so auto takes that backend's rule, and imports no fused
    backend to decide (Dynamo cannot trace an import: a strict export of an LTI model never run
    before failed on it)."""
    monkeypatch.setattr(lti_base, "recording_program", lambda: True)
    m = LRU(4, 4, mode="auto")
    assert not m._use_fft(lti_base.AUTO_FFT_MIN_LEN - 1)
    assert m._use_fft(lti_base.AUTO_FFT_MIN_LEN)


def test_default_mode_is_auto():
    """The default is the fastest path measured ("auto"), not the FFT."""
    from lrnnx.models.lti import Centaurus

    for model in (LRU(4, 4), S5(4, 4, "zoh"), Centaurus(4, 4, sub_state_dim=2, mode="neck")):
        assert model.mode == "auto", type(model).__name__


def test_explicit_modes_ignore_the_heuristic(no_backend_env):
    assert LRU(4, 4, mode="fft")._use_fft(1)
    assert not LRU(4, 4, mode="scan")._use_fft(10**6)


@pytest.mark.parametrize("backend", ["torch", None])
def test_auto_matches_both_paths(monkeypatch, backend):
    """Whichever path auto takes, the output is the FFT's and the scan's (float64)."""
    if backend is None:
        monkeypatch.delenv("LRNNX_BACKEND", raising=False)
    else:
        monkeypatch.setenv("LRNNX_BACKEND", backend)
    m = LRU(3, 4).double()
    x = torch.randn(2, lti_base.AUTO_FFT_MIN_LEN + 5, 3, dtype=torch.float64)
    outs = {}
    for mode in ("auto", "fft", "scan"):
        m.mode = mode
        outs[mode] = m(x)
    torch.testing.assert_close(outs["auto"], outs["fft"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(outs["auto"], outs["scan"], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("make", [lambda: LRU(6, 5), lambda: S5(6, 8, "zoh", conj_sym=True)])
def test_step_reuses_its_buffers(make):
    """The state and the B_bar x buffer keep their storage from step to step, and steps equal
    the forward pass."""
    m = make()
    x = torch.randn(2, 7, 6)
    with torch.no_grad():
        y_full = m(x)
        cache = m.allocate_inference_cache(2)
        state_ptr = cache["lrnn_state"].data_ptr()
        ys, buf_ptrs = [], set()
        for t in range(x.shape[1]):
            y, cache = m.step(x[:, t], cache)
            ys.append(y)
            buf_ptrs.add(cache["_step"].u.data_ptr())
    assert cache["lrnn_state"].data_ptr() == state_ptr
    assert len(buf_ptrs) == 1
    assert ys[0].data_ptr() != ys[1].data_ptr()  # outputs are fresh: callers may keep them
    torch.testing.assert_close(torch.stack(ys, 1), y_full, rtol=1e-5, atol=1e-5)


def test_step_keeps_the_graph_when_x_needs_a_gradient():
    """Outside no_grad a step stays differentiable in x (no out= buffer on that path)."""
    m = LRU(4, 3)
    cache = m.allocate_inference_cache(2)
    x = torch.randn(2, 4, requires_grad=True)
    y, cache = m.step(x, cache)
    (g,) = torch.autograd.grad(y.sum(), x)
    with torch.no_grad():  # y is linear in x from a zero state: the gradient is sum_j dy_j/dx
        e = torch.eye(4)
        expected = torch.stack([m.step(e[i : i + 1], m.allocate_inference_cache(1))[0][0]
                                for i in range(4)]).sum(1)  # fmt: skip
    torch.testing.assert_close(g, expected.expand(2, 4), rtol=1e-5, atol=1e-5)
