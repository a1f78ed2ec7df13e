"""The yardstick kernel of ``lrnnx bench`` (lrnnx.bench_yardstick): the plain Mamba recurrence,
forward and every gradient, against the reference loop (autograd through it) on small shapes."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("numba")

import lrnnx.bench_yardstick as yd  # noqa: E402
from _tol import assert_close_rel  # noqa: E402
from lrnnx.ops import selective_scan_fn  # noqa: E402


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(2, 5, 6, 19), (1, 3, 16, 1), (3, 2, 4, 40)])
def test_yardstick_matches_reference(shape, dtype, threads):
    """y and the gradients of u, delta, A, B, C (the loss sum(dy * y)); n = 6 and 16, L = 1;
    several channel blocks per batch element with two threads."""
    exact = [t.double() for t in yd._inputs(shape, seed=sum(shape))]
    inputs = [t.to(dtype) for t in exact]
    leaves = [t.clone().requires_grad_() for t in exact]  # the reference in float64
    y_ref = selective_scan_fn(*leaves, backend="reference")
    dy = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads_ref = torch.autograd.grad(y_ref, leaves, dy)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = yd.yardstick_forward(*inputs)
        grads = yd.yardstick_backward(*inputs, dy.to(dtype))
    finally:
        torch.set_num_threads(saved)
    L = shape[-1]
    assert y.dtype == dtype
    assert_close_rel(y, y_ref, length=L, msg="y")
    for name, ref in zip(("u", "delta", "A", "B", "C"), grads_ref, strict=True):
        # gradients sum L products of L-step recurrences: a factor for the longer chain
        assert_close_rel(grads[name], ref, length=L, factor=4, msg=name)


def test_rows_report_ratios_and_fractions():
    """A measured row: positive times, the ratio is lrnnx's time over the yardstick's, and the
    exp and copy fractions are finite and positive; the markdown lists the shape."""
    row = yd.measure_shape((1, 4, 16, 32), repeats=1)
    assert row.ratio == pytest.approx(row.lrnnx_fb / row.yard_fb)
    assert all(v > 0 for v in (row.lrnnx_fwd, row.lrnnx_fb, row.yard_fwd, row.yard_fb))
    assert 0 < row.exp_frac < 100 and 0 < row.copy_frac < 100
    assert row.exp_gps > 0 and row.copy_gbps > 0
    md = yd.yardstick_markdown([row])
    assert "b=1 d=4 n=16 L=32" in md and f"{row.ratio:.2f}x" in md
