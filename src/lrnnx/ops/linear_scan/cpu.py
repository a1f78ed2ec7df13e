"""Fused CPU linear scan, compiled by numba at first use (cached on disk afterwards; by default
in a background process, see :mod:`lrnnx.ops._numba` and :func:`warm_up`).

One pass over memory: each parallel task owns a (batch, channel-block) tile, walks time
sequentially and keeps the block's states in registers/L1, so the op runs at memory bandwidth.
The tasks run on torch's own threads (:func:`lrnnx.ops._numba.run_on_threads`), never on a
second pool beside them.
The autograd wiring (backward = the same kernel run the other way) is shared with the torch
backend through :class:`lrnnx.ops.linear_scan.torch.LinearScanFunction`.  Restarts (packed
sequences) are a per-step flag array: where it is set the state is replaced by b_t, never
multiplied by zero (0 * nan = nan would carry one sequence's non-finite state into the next);
without restarts the kernel gets an empty array, so both cases run one compiled kernel.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lrnnx.ops._numba import (
    CHANNEL_BLOCK,
    HAVE_NUMBA,
    as_array,
    is_available,
    run_on_threads,
    threads_for,
)
from lrnnx.ops.linear_scan.torch import LinearScanFunction

__all__ = ["linear_scan", "is_available", "scan_kernel", "warm_up"]

if HAVE_NUMBA:
    import numba

    @numba.njit(cache=True, nogil=True)
    def _scan(first, stride, a, b, h0, resets, out, reverse, block):  # pragma: no cover
        """Tasks first, first + stride, ... of the (batch, channel block) tiles."""
        B, L, C = b.shape
        packed = resets.shape[0] > 0  # empty: no restarts (one compiled type for both cases)
        nblk = (C + block - 1) // block
        for task in range(first, B * nblk, stride):
            i = task // nblk
            c0 = (task % nblk) * block
            c1 = min(c0 + block, C)
            h = h0[i, c0:c1].copy()
            for s in range(L):
                t = L - 1 - s if reverse else s
                at, bt, ot = a[i, t, c0:c1], b[i, t, c0:c1], out[i, t, c0:c1]
                if packed and resets[t]:  # restart: the state before is dropped, not scaled
                    for c in range(c1 - c0):
                        h[c] = bt[c]
                        ot[c] = h[c]
                else:
                    for c in range(c1 - c0):
                        h[c] = at[c] * h[c] + bt[c]
                        ot[c] = h[c]


def _block(batch: int, channels: int, threads: int) -> int:
    """Channels per task: as wide as possible (long contiguous rows stream best) while still
    giving each of ``threads`` threads at least one task."""
    tasks_per_row = max(1, -(-threads // batch))
    return max(CHANNEL_BLOCK, -(-channels // tasks_per_row))


@torch.no_grad()
def scan_kernel(
    a: Tensor,
    b: Tensor,
    initial_state: Optional[Tensor],
    reverse: bool,
    resets: Optional[Tensor] = None,
) -> Tensor:
    """Forward-only fused scan for CPU tensors a, b (B, L, *C); returns h (B, L, *C).

    ``resets`` (L,) bool: steps where the state restarts (h_t = b_t)."""
    shape = b.shape
    B, L = shape[0], shape[1]
    a3 = a.reshape(B, L, -1)
    b3 = b.reshape(B, L, -1)
    h0 = (
        torch.zeros(B, b3.shape[2], dtype=b.dtype)
        if initial_state is None
        else initial_state.reshape(B, -1)
    )
    flags = _NO_RESETS if resets is None else resets.to(torch.bool)
    out = torch.empty(B, L, b3.shape[2], dtype=b.dtype)
    # serial for small work, never more threads than torch's, on torch's own threads where it
    # can (forward and the backward's adjoint scan both come through here)
    threads = threads_for(b3.numel())
    block = _block(B, b3.shape[2], threads)
    tasks = B * -(-b3.shape[2] // block)
    args = (as_array(a3), as_array(b3), as_array(h0), as_array(flags), out.numpy(), reverse, block)
    run_on_threads(lambda i, n: _scan(i, n, *args), min(threads, tasks))
    return out.reshape(shape)


#: the kernel's ``resets`` argument when there are none (same array type as real flags)
_NO_RESETS = torch.zeros(0, dtype=torch.bool)


def linear_scan(
    a: Tensor,
    b: Tensor,
    initial_state: Optional[Tensor],
    reverse: bool,
    resets: Optional[Tensor] = None,
) -> Tensor:
    """Fused CPU scan; tensors on other devices go to the torch backend.  ``resets`` (L,)
    bool: where the state restarts (see :mod:`lrnnx.ops.linear_scan.torch`)."""
    if b.device.type != "cpu":
        from lrnnx.ops.linear_scan.torch import linear_scan as torch_scan

        return torch_scan(a, b, initial_state, reverse, resets)
    return LinearScanFunction.apply(a, b, initial_state, reverse, scan_kernel, resets)


def warm_up(dtypes: tuple[torch.dtype, ...]) -> None:
    """Run, on tiny inputs, the kernel a call whose tensors have these dtypes runs (forward and
    backward scans), so that numba compiles or loads exactly that one.  Used by the background
    compile process (:func:`lrnnx.ops._numba.deferred`)."""
    for dtype in dtypes:
        a = torch.rand(1, 3, 2, dtype=dtype).requires_grad_()
        b = torch.randn(1, 3, 2, dtype=dtype).requires_grad_()
        linear_scan(a, b, None, False).abs().sum().backward()
