"""Fused CPU causal depthwise convolution, compiled by numba at first use (cached on disk).

Work split.  The (B, D) rows of x (B, D, L) are independent: a task is a range of rows, and
tasks run on ``torch.get_num_threads()`` threads (the kernels are compiled ``nogil``; a thread
pool hands the tasks out).  Small inputs run as one task on the calling thread, where starting
threads would cost more than the work.

Forward, per row: y = bias, then one pass per tap j, y_t += w_j xpad_{t + j} (a shifted read of
the row, from the initial states for the first K - 1 - j steps), then silu in place.  Every
inner loop runs along time, so LLVM vectorises it, and the row (L values) stays in L1.

Backward, per row: the pre-activation is recomputed (nothing but the inputs is saved), the
upstream gradient is multiplied by silu', then

    dx_u    = sum_j w_j dz_{u + K - 1 - j}      (t = u + K - 1 - j < L)
    dw_j    = sum_t dz_t xpad_{t + j}            (per row; summed over the batch in torch)
    dbias   = sum_t dz_t                          (per row; summed over the batch in torch)
    dinit_i = sum_{j <= i} w_j dz_{i - j}         (the K - 1 initial states)

so the whole backward reads x and dy once and writes dx once: no im2col buffer and no
``aten::convolution_backward`` (which on some CPUs takes seconds for this depthwise shape).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lrnnx.ops._numba import HAVE_NUMBA, as_array, is_available

__all__ = ["causal_conv1d", "is_available", "SERIAL_WORK"]

#: below this many output elements (B * D * L) the kernels run on the calling thread
SERIAL_WORK = 1 << 16
#: parallel tasks per thread, so threads finish close together
TASKS_PER_THREAD = 4

if HAVE_NUMBA:
    import math

    import numba
    import numpy as np

    # reassociation lets the per-row sums (dw, dbias) vectorise; no nnan/ninf: NaN and inf
    # propagate as in torch.  error_model="numpy": no zero-division branch in the loops.
    _OPTS = dict(cache=True, nogil=True, fastmath={"reassoc", "contract"}, error_model="numpy")

    @numba.njit(**_OPTS)
    def _padded_row(xr, hr, xp):  # pragma: no cover - compiled
        """xp = [hr, xr]: the row's K - 1 initial states, then its L inputs."""
        P = hr.shape[0]
        for i in range(P):
            xp[i] = hr[i]
        for t in range(xr.shape[0]):
            xp[P + t] = xr[t]

    @numba.njit(**_OPTS)
    def _preact_row(xp, wr, bv, yr):  # pragma: no cover - compiled
        """yr_t = bias + sum_j w_j xp_{t + j} for one row; xp is the padded row (L + K - 1)."""
        L = yr.shape[0]
        K = wr.shape[0]
        if K == 4:  # the usual width (Mamba, Griffin): one pass, four taps in registers
            w0, w1, w2, w3 = wr[0], wr[1], wr[2], wr[3]
            for t in range(L):
                yr[t] = bv + w0 * xp[t] + w1 * xp[t + 1] + w2 * xp[t + 2] + w3 * xp[t + 3]
            return
        for t in range(L):
            yr[t] = bv
        for j in range(K):
            wj = wr[j]
            for t in range(L):
                yr[t] += wj * xp[t + j]

    @numba.njit(**_OPTS)
    def _fwd_rows(x, w, bias, h0, silu, y, r0, r1):  # pragma: no cover - compiled
        """y[b, d] for rows r = b D + d, r0 <= r < r1, of x (B, D, L) (any strides)."""
        D, K = w.shape
        L = x.shape[2]
        one = np.ones(1, x.dtype)[0]  # a constant of the rows' dtype (no float64 promotion)
        xp = np.empty(L + K - 1, x.dtype)
        for r in range(r0, r1):
            b, d = r // D, r % D
            yr = y[b, d]
            _padded_row(x[b, d], h0[r], xp)
            _preact_row(xp, w[d], bias[d], yr)
            if silu:
                for t in range(L):
                    v = yr[t]
                    yr[t] = v / (one + math.exp(-v))

    @numba.njit(**_OPTS)
    def _bwd_rows(x, w, bias, h0, silu, dy, dx, dh0, dw, db, r0, r1):  # pragma: no cover
        """Gradients of rows r = b D + d, r0 <= r < r1: dx (B, D, L), dh0 (R, K - 1), and
        per-row dw (R, K), db (R,).  x, dy and dx may have any strides (x transposed from
        (B, L, D), an expanded dy): each is read or written once per row, in a copy loop."""
        D, K = w.shape
        L = x.shape[2]
        P = K - 1
        one = np.ones(1, x.dtype)[0]
        zero = np.zeros(1, x.dtype)[0]
        xp = np.empty(L + P, x.dtype)  # [initial states, x]
        dz = np.zeros(L + P, x.dtype)  # [dz, K - 1 zeros]: dx_u = sum_j w_j dz_{u + K - 1 - j}
        gx = np.empty(L, x.dtype)  # dx of the row, copied out at the end
        for r in range(r0, r1):
            b, d = r // D, r % D
            wr, dyr = w[d], dy[b, d]
            _padded_row(x[b, d], h0[r], xp)
            if silu:  # dz = dy silu'(z), z recomputed: silu'(z) = s (1 + z (1 - s))
                _preact_row(xp, wr, bias[d], dz[:L])
                for t in range(L):
                    z = dz[t]
                    s = one / (one + math.exp(-z))
                    dz[t] = dyr[t] * (s * (one + z * (one - s)))
            else:
                for t in range(L):
                    dz[t] = dyr[t]
            if K == 4:  # one pass each for (dbias, dw) and dx
                a, a0, a1, a2, a3 = zero, zero, zero, zero, zero
                for t in range(L):
                    g = dz[t]
                    a += g
                    a0 += g * xp[t]
                    a1 += g * xp[t + 1]
                    a2 += g * xp[t + 2]
                    a3 += g * xp[t + 3]
                db[r] = a
                dw[r, 0], dw[r, 1], dw[r, 2], dw[r, 3] = a0, a1, a2, a3
                w0, w1, w2, w3 = wr[0], wr[1], wr[2], wr[3]
                for u in range(L):
                    gx[u] = w3 * dz[u] + w2 * dz[u + 1] + w1 * dz[u + 2] + w0 * dz[u + 3]
            else:
                a = zero
                for t in range(L):
                    a += dz[t]
                db[r] = a
                for j in range(K):
                    a = zero
                    for t in range(L):
                        a += dz[t] * xp[t + j]
                    dw[r, j] = a
                for u in range(L):
                    gx[u] = zero
                for j in range(K):
                    wj = wr[j]
                    s = P - j
                    for u in range(L):
                        gx[u] += wj * dz[u + s]
            dxr = dx[b, d]
            for u in range(L):
                dxr[u] = gx[u]
            for i in range(P):  # state i reaches y_t through tap j = i - t
                a = zero
                for j in range(max(0, i - L + 1), i + 1):
                    a += wr[j] * dz[i - j]
                dh0[r, i] = a


_POOL: Optional[ThreadPoolExecutor] = None
_POOL_LOCK = threading.Lock()


def _run(kernel, rows: int, length: int, *args) -> None:
    """``kernel(*args, r0, r1)`` over all rows: on the calling thread for small work, else in
    row ranges on torch.get_num_threads() threads."""
    threads = max(1, min(torch.get_num_threads(), rows))
    if threads == 1 or rows * length < SERIAL_WORK:
        kernel(*args, 0, rows)
        return
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers != threads:  # follow torch.set_num_threads
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(threads, thread_name_prefix="lrnnx-conv")
        pool = _POOL
    ntasks = min(rows, threads * TASKS_PER_THREAD)
    step = -(-rows // ntasks)
    futures = [pool.submit(kernel, *args, r0, min(r0 + step, rows)) for r0 in range(0, rows, step)]
    for f in futures:
        f.result()


def _rows_contiguous(t: Tensor) -> bool:
    """Whether the kernels read ``t`` (B, D, L) in place: each row's L steps adjacent in memory
    (or one value repeated, stride 0: an expanded gradient).  Any batch and channel strides are
    fine (a slice along time, a chunk of a wider tensor)."""
    return t.shape[-1] <= 1 or t.stride(-1) in (0, 1)


def kernel_layout(t: Tensor) -> Tensor:
    """``t`` detached, as the kernels read it: in place when its rows are contiguous, else a
    contiguous copy.  A transposed x (the models pass (B, L, D) transposed) would otherwise be
    read with a stride of D elements, a cache line and nearly a page per element; torch's
    blocked transposing copy followed by the contiguous kernel is faster, above all in backward.
    """
    t = t.detach()
    return t if _rows_contiguous(t) else t.contiguous()


def _arrays(x: Tensor, weight: Tensor, bias: Optional[Tensor], h0: Optional[Tensor]):
    """Kernel-ready arrays: x (B, D, L) in :func:`kernel_layout`, the small ones contiguous,
    zeros for a missing bias or state (B * D, K - 1)."""
    B, D, L = x.shape
    K = weight.shape[1]
    xa = kernel_layout(x).numpy()
    wa = as_array(weight)
    ba = as_array(bias) if bias is not None else torch.zeros(D, dtype=x.dtype).numpy()
    if h0 is None:
        ha = torch.zeros(B * D, K - 1, dtype=x.dtype).numpy()
    else:
        ha = as_array(h0.reshape(B * D, K - 1))
    return xa, wa, ba, ha


@torch.no_grad()
def forward_kernel(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], h0: Optional[Tensor], silu: bool
) -> Tensor:
    """y (B, D, L) for CPU tensors of one dtype (float32 or float64)."""
    B, D, L = x.shape
    y = torch.empty(B, D, L, dtype=x.dtype)
    xa, wa, ba, ha = _arrays(x, weight, bias, h0)
    _run(_fwd_rows, B * D, L, xa, wa, ba, ha, bool(silu), y.numpy())
    return y


@torch.no_grad()
def backward_kernel(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], h0: Optional[Tensor], silu: bool, dy: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx (B, D, L), dweight (D, K), dbias (D,), dinitial_states (B, D, K - 1))."""
    B, D, L = x.shape
    K = weight.shape[1]
    R = B * D
    dx = torch.empty(B, D, L, dtype=x.dtype)
    dh0 = torch.empty(B, D, K - 1, dtype=x.dtype)
    dw = torch.empty(B, D, K, dtype=x.dtype)  # per row, summed over the batch below
    db = torch.empty(B, D, dtype=x.dtype)
    xa, wa, ba, ha = _arrays(x, weight, bias, h0)
    dya = kernel_layout(dy.to(x.dtype)).numpy()  # an expanded dy is not copied
    _run(
        _bwd_rows, R, L, xa, wa, ba, ha, bool(silu), dya,
        dx.numpy(), dh0.view(R, K - 1).numpy(), dw.view(R, K).numpy(), db.view(R).numpy(),
    )  # fmt: skip
    return dx, dw.sum(0), db.sum(0), dh0


class CausalConv1dCPUFunction(torch.autograd.Function):
    """Fused forward; fused backward that recomputes the pre-activation (saves only the inputs,
    x in the kernels' layout: a transposed x is copied once, in forward, not again in backward).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, initial_states, silu: bool):
        ctx.silu = silu
        xk = x if _rows_contiguous(x) else kernel_layout(x)
        ctx.save_for_backward(xk, weight, bias, initial_states)
        return forward_kernel(xk, weight, bias, initial_states, silu)

    @staticmethod
    @once_differentiable  # the backward kernel is not itself differentiable
    def backward(ctx, dy: Tensor):
        x, weight, bias, h0 = ctx.saved_tensors
        dx, dw, db, dh0 = backward_kernel(x, weight, bias, h0, ctx.silu, dy)
        need = ctx.needs_input_grad
        return (
            dx if need[0] else None,
            dw if need[1] else None,
            db if bias is not None and need[2] else None,
            dh0 if h0 is not None and need[3] else None,
            None,
        )


def causal_conv1d(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], initial_states: Optional[Tensor], silu: bool
) -> Tensor:
    """Fused CPU causal depthwise convolution; same arguments and result as the reference.

    Tensors on another device go to the torch backend.
    """
    if x.device.type != "cpu":
        from lrnnx.ops.causal_conv1d.torch import causal_conv1d as torch_conv

        return torch_conv(x, weight, bias, initial_states, silu)
    tensors = (x, weight, bias, initial_states)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return CausalConv1dCPUFunction.apply(x, weight, bias, initial_states, bool(silu))
    return forward_kernel(x, weight, bias, initial_states, silu)
