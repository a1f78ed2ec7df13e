"""Fused CPU causal depthwise convolution, compiled by numba at first use (cached on disk).

Work split.  The (B, D) rows of x (B, D, L) are independent: a task is a range of rows, and
tasks run on ``torch.get_num_threads()`` threads (the kernels are compiled ``nogil``; torch's
own OpenMP threads run them where they can, see :func:`lrnnx.ops._numba.run_on_threads`).  Small inputs run as one task on the calling thread, where starting
threads would cost more than the work.

Forward, per row: y = bias, then one pass per tap j, y_t += w_j xpad_{t + j} (a shifted read of
the row, from the initial states for the first K - 1 - j steps), then silu in place.

Packed sequences (``cu_seqlens``, B = 1): each row runs the same per-row code on every
sequence's own padded window [h_s, x_s] in turn (a loop inside the compiled kernel), so the
window stops at the sequence start forward and backward; unpacked rows are one sequence each.  Every
inner loop runs along time, so LLVM vectorises it, and the row (L values) stays in L1.

Channels-last x (its channels adjacent: a (B, L, D) tensor seen as (B, D, L), as Mamba and
RG-LRU pass their input projections) has kernels of its own, which read it where it lies and
write y and dx in the same order, so neither the model nor the kernels transpose anything: a
task is a batch element, a block of :data:`LANES` channels (the vector lanes) and a block of
:data:`TIME_BLOCK` steps; each step reads one row of channels, and the backward's dweight and
dbias sums are kept per task and added up in torch.  The formulas are the same as below.

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

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from lrnnx.core.autograd import first_order
from lrnnx.ops._numba import (
    HAVE_NUMBA,
    SERIAL_WORK,
    as_array,
    flat_view,
    is_available,
    run_on_threads,
    threads_for,
)

__all__ = ["causal_conv1d", "is_available", "SERIAL_WORK"]

# below SERIAL_WORK output elements (B * D * L) the kernels run on the calling thread
#: parallel tasks per thread, so threads finish close together
TASKS_PER_THREAD = 4
#: channels-last kernels: channels per task at most, in vector lanes (a task computes its width
#: rounded up to whole vectors; wide, so the fixed cost of each lane loop is spread)
LANES = 128
#: channels-last kernels: steps per task (its tiles, (TIME_BLOCK + 2 (K - 1), LANES) each,
#: stay in L2; long sequences split into several tasks)
TIME_BLOCK = 256

if HAVE_NUMBA:
    import numba

    from lrnnx.ops._numba_math import _lane_count, _sigmoid

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
    def _fwd_rows(x, w, bias, h0, cu, silu, y, r0, r1):  # pragma: no cover - compiled
        """y[b, d] for rows r = b D + d, r0 <= r < r1, of x (B, D, L) (any strides).  Each row
        holds the sequences cu[s] : cu[s + 1] (cu = [0, L] unpacked); sequence s of row b starts
        from the states h0[(b S + s) D + d]."""
        D, K = w.shape
        L = x.shape[2]
        P = K - 1
        S = cu.shape[0] - 1
        xp = np.empty(L + P, x.dtype)
        for r in range(r0, r1):
            b, d = r // D, r % D
            xr, yr = x[b, d], y[b, d]
            for s in range(S):  # the window stops at each sequence's start
                lo, hi = cu[s], cu[s + 1]
                if hi > lo:
                    xs = xp[: hi - lo + P]
                    _padded_row(xr[lo:hi], h0[(b * S + s) * D + d], xs)
                    _preact_row(xs, w[d], bias[d], yr[lo:hi])
            if silu:
                for t in range(L):
                    v = yr[t]
                    yr[t] = v * _sigmoid(v)

    @numba.njit(**_OPTS)
    def _bwd_segment(xs, dys, wr, bv, silu, dz, gx, dwr, dhr):  # pragma: no cover - compiled
        """Backward of one sequence of one row: xs its padded window (n + K - 1), dys its
        upstream gradient (n); adds to dwr (K,), writes gx[:n] (dx) and dhr (K - 1,) (dinit);
        returns its dbias.  dz is scratch of n + K - 1 or more."""
        K = wr.shape[0]
        P = K - 1
        n = dys.shape[0]
        one = np.ones(1, xs.dtype)[0]
        zero = np.zeros(1, xs.dtype)[0]
        dz = dz[: n + P]  # [dz, K - 1 zeros]: dx_u = sum_j w_j dz_{u + K - 1 - j}
        if silu:  # dz = dy silu'(z), z recomputed: silu'(z) = s (1 + z (1 - s))
            _preact_row(xs, wr, bv, dz[:n])
            for t in range(n):
                z = dz[t]
                sg = _sigmoid(z)
                dz[t] = dys[t] * (sg * (one + z * (one - sg)))
        else:
            for t in range(n):
                dz[t] = dys[t]
        for t in range(n, n + P):
            dz[t] = zero
        db = zero
        if K == 4:  # one pass each for (dbias, dw) and dx
            a0, a1, a2, a3 = zero, zero, zero, zero
            for t in range(n):
                g = dz[t]
                db += g
                a0 += g * xs[t]
                a1 += g * xs[t + 1]
                a2 += g * xs[t + 2]
                a3 += g * xs[t + 3]
            dwr[0] += a0
            dwr[1] += a1
            dwr[2] += a2
            dwr[3] += a3
            w0, w1, w2, w3 = wr[0], wr[1], wr[2], wr[3]
            for u in range(n):
                gx[u] = w3 * dz[u] + w2 * dz[u + 1] + w1 * dz[u + 2] + w0 * dz[u + 3]
        else:
            for t in range(n):
                db += dz[t]
            for j in range(K):
                a = zero
                for t in range(n):
                    a += dz[t] * xs[t + j]
                dwr[j] += a
            for u in range(n):
                gx[u] = zero
            for j in range(K):
                wj = wr[j]
                sh = P - j
                for u in range(n):
                    gx[u] += wj * dz[u + sh]
        for i in range(P):  # state i reaches y_t through tap j = i - t
            a = zero
            for j in range(max(0, i - n + 1), i + 1):
                a += wr[j] * dz[i - j]
            dhr[i] = a
        return db

    @numba.njit(**_OPTS)
    def _bwd_rows(x, w, bias, h0, cu, silu, dy, dx, dh0, dw, db, r0, r1):  # pragma: no cover
        """Gradients of rows r = b D + d, r0 <= r < r1: dx (B, D, L), dh0 (laid out as h0),
        and per-row dw (R, K), db (R,).  x, dy and dx may have any strides (x transposed from
        (B, L, D), an expanded dy): each is read or written once per row, in a copy loop."""
        D, K = w.shape
        L = x.shape[2]
        P = K - 1
        S = cu.shape[0] - 1
        zero = np.zeros(1, x.dtype)[0]
        xp = np.empty(L + P, x.dtype)  # [initial states, x] of one sequence
        dz = np.empty(L + P, x.dtype)
        gx = np.empty(L, x.dtype)  # dx of one sequence, copied out at the end
        for r in range(r0, r1):
            b, d = r // D, r % D
            xr, dyr, dxr = x[b, d], dy[b, d], dx[b, d]
            for j in range(K):
                dw[r, j] = zero
            acc = zero
            for s in range(S):
                lo, hi = cu[s], cu[s + 1]
                hs = (b * S + s) * D + d
                xs = xp[: hi - lo + P]
                _padded_row(xr[lo:hi], h0[hs], xs)
                acc += _bwd_segment(xs, dyr[lo:hi], w[d], bias[d], silu, dz, gx, dw[r], dh0[hs])
                for u in range(hi - lo):
                    dxr[lo + u] = gx[u]
            db[r] = acc

    # ------------------------------------------------------------------ channels-last layout
    # x (B, D, L) with its channels adjacent (a (B, L, D) tensor seen transposed, as Mamba and
    # RG-LRU pass their projections): a task is (batch element, block of LANES channels, block
    # of TIME_BLOCK steps), every inner loop runs along the channels (vector lanes), and each
    # step of the block reads one contiguous row of LANES inputs.

    @numba.njit(**_OPTS)
    def _cl_task(task, D, L):  # pragma: no cover - compiled
        """Task -> (batch element, first channel, width, first step, end step)."""
        ncb = (D + LANES - 1) // LANES
        ntb = (L + TIME_BLOCK - 1) // TIME_BLOCK
        b, rest = task // (ncb * ntb), task % (ncb * ntb)
        c0, t0 = (rest // ntb) * LANES, (rest % ntb) * TIME_BLOCK
        return b, c0, min(LANES, D - c0), t0, min(L, t0 + TIME_BLOCK)

    @numba.njit(**_OPTS)
    def _cl_first_sequence(cu, t):  # pragma: no cover - compiled
        """The sequence holding step t (cu[s] <= t < cu[s + 1]; empty sequences skipped)."""
        return np.searchsorted(cu, t, side="right") - 1

    @numba.njit(**_OPTS)
    def _cl_window(xf, sx, h0, b, hs, c0, W, nl, lo, a, e, P, XT):  # pragma: no cover - compiled
        """XT[r, i] = xpad of channel c0 + i at step a - P + r, r < e - a + P: x[b, c0 + i, t]
        from the flat x (channels adjacent, strides sx) for steps of the sequence (t >= lo),
        its initial states h0[hs, c0 + i] before it; lanes W to nl are 0."""
        base = b * sx[0] + c0
        zero = XT.dtype.type(0.0)
        for r in range(e - a + P):
            t = a - P + r
            row = XT[r]
            if t >= lo:
                src = xf[base + t * sx[2] : base + t * sx[2] + W]
                for i in range(W):
                    row[i] = src[i]
            else:
                k = t - lo + P
                for i in range(W):
                    row[i] = h0[hs, c0 + i, k]
            for i in range(W, nl):
                row[i] = zero

    @numba.njit(**_OPTS)
    def _cl_preact(XT, wT, bl, n, nl, Z):  # pragma: no cover - compiled
        """Z[t] = bias + sum_j w_j XT[t + j], t < n, in lanes i < nl."""
        K = wT.shape[0]
        for t in range(n):
            z = Z[t]
            for i in range(nl):
                z[i] = bl[i]
            for j in range(K):
                xr, wj = XT[t + j], wT[j]
                for i in range(nl):
                    z[i] += wj[i] * xr[i]

    @numba.njit(**_OPTS)
    def _cl_lanes(w, b, c0, W, wT, bl):  # pragma: no cover - compiled
        """wT[j, i] = w[c0 + i, j], bl[i] = bias[c0 + i]; lanes past W are 0."""
        K = w.shape[1]
        for i in range(LANES):
            for j in range(K):
                wT[j, i] = w[c0 + i, j] if i < W else 0.0
            bl[i] = b[c0 + i] if i < W else 0.0

    @numba.njit(**_OPTS)
    def _cl_fwd(xf, sx, w, bias, h0, cu, silu, yf, sy, task0, task1):  # pragma: no cover
        """y for tasks task0 <= task < task1 (see :func:`_cl_task`): x and y flat views with
        strides sx, sy ((batch, channel, time) elements, channel stride 1)."""
        D, K = w.shape
        P = K - 1
        L = cu[cu.shape[0] - 1]
        S = cu.shape[0] - 1
        dtype = xf.dtype
        XT = np.zeros((TIME_BLOCK + P, LANES), dtype)
        Z = np.zeros((TIME_BLOCK, LANES), dtype)
        wT, bl = np.zeros((K, LANES), dtype), np.zeros(LANES, dtype)
        for task in range(task0, task1):
            b, c0, W, t0, t1 = _cl_task(task, D, L)
            nl = _lane_count(W)  # lanes computed
            _cl_lanes(w, bias, c0, W, wT, bl)
            s = _cl_first_sequence(cu, t0)
            while s < S and cu[s] < t1:
                lo, hi = cu[s], cu[s + 1]
                a, e = max(lo, t0), min(hi, t1)
                if e > a:
                    _cl_window(xf, sx, h0, b, b * S + s, c0, W, nl, lo, a, e, P, XT)
                    _cl_preact(XT, wT, bl, e - a, nl, Z)
                    if silu:
                        for t in range(e - a):
                            z = Z[t]
                            for i in range(nl):
                                z[i] = z[i] * _sigmoid(z[i])
                    base = b * sy[0] + c0
                    for t in range(e - a):
                        o = base + (a + t) * sy[2]
                        dst, z = yf[o : o + W], Z[t]
                        for i in range(W):
                            dst[i] = z[i]
                s += 1

    @numba.njit(**_OPTS)
    def _cl_bwd(
        xf, sx, w, bias, h0, cu, silu, dyf, sdy, dxf, sdx, dh0, dwp, dbp, task0, task1
    ):  # pragma: no cover - compiled
        """Gradients for tasks task0 <= task < task1 (see :func:`_cl_fwd`): dx through its
        flat view; dh0 (rows, D, P) for the sequences beginning in a task's steps (the others
        keep their zeros); dwp (tasks, K, LANES), dbp (tasks, LANES): each task's sums, lanes
        in its channel order (summed into dweight and dbias by the caller).

        Per sequence piece [a, e) of the task: dz = dy silu'(z) over [a, min(hi, e + P)) (the
        later steps dx needs; the pre-activation recomputed), then dx_u = sum_j w_j dz_{u+P-j}
        (0 past the sequence), dw_j += dz_t xpad_{t + j} and dbias += dz_t over [a, e), and at
        the sequence's first step dinit_i = sum_{j <= i} w_j dz_{lo + i - j}."""
        D, K = w.shape
        P = K - 1
        L = cu[cu.shape[0] - 1]
        S = cu.shape[0] - 1
        dtype = xf.dtype
        one, zero = dtype.type(1.0), dtype.type(0.0)
        XT = np.zeros((TIME_BLOCK + 2 * P, LANES), dtype)
        G = np.zeros((TIME_BLOCK + 2 * P, LANES), dtype)
        Z = np.zeros((TIME_BLOCK + P, LANES), dtype)
        acc = np.zeros(LANES, dtype)
        wT, bl = np.zeros((K, LANES), dtype), np.zeros(LANES, dtype)
        dW, dB = np.zeros((K, LANES), dtype), np.zeros(LANES, dtype)
        for task in range(task0, task1):
            b, c0, W, t0, t1 = _cl_task(task, D, L)
            nl = _lane_count(W)  # lanes computed
            _cl_lanes(w, bias, c0, W, wT, bl)
            for j in range(K):
                for i in range(LANES):
                    dW[j, i] = zero
            for i in range(LANES):
                dB[i] = zero
            s = _cl_first_sequence(cu, t0)
            while s < S and cu[s] < t1:
                lo, hi = cu[s], cu[s + 1]
                a, e = max(lo, t0), min(hi, t1)
                s += 1
                if e <= a:
                    continue
                hs = b * S + s - 1
                e2 = min(hi, e + P)  # dx at e - 1 reads dz up to e - 1 + P
                n2 = e2 - a
                _cl_window(xf, sx, h0, b, hs, c0, W, nl, lo, a, e2, P, XT)
                base = b * sdy[0] + c0
                for t in range(n2):
                    o = base + (a + t) * sdy[2]
                    src, g = dyf[o : o + W], G[t]
                    for i in range(W):
                        g[i] = src[i]
                    for i in range(W, nl):
                        g[i] = zero
                for t in range(n2, n2 + P):  # past the sequence (or unused): no gradient
                    for i in range(nl):
                        G[t, i] = zero
                if silu:  # dz = dy silu'(z) = dy s (1 + z (1 - s)), z recomputed
                    _cl_preact(XT, wT, bl, n2, nl, Z)
                    for t in range(n2):
                        z, g = Z[t], G[t]
                        for i in range(nl):
                            sg = _sigmoid(z[i])
                            g[i] = g[i] * (sg * (one + z[i] * (one - sg)))
                base = b * sdx[0] + c0
                for u in range(e - a):
                    for i in range(nl):
                        acc[i] = zero
                    for j in range(K):
                        g, wj = G[u + P - j], wT[j]
                        for i in range(nl):
                            acc[i] += wj[i] * g[i]
                    o = base + (a + u) * sdx[2]
                    dst = dxf[o : o + W]
                    for i in range(W):
                        dst[i] = acc[i]
                for t in range(e - a):
                    g = G[t]
                    for i in range(nl):
                        dB[i] += g[i]
                    for j in range(K):
                        xr, dw = XT[t + j], dW[j]
                        for i in range(nl):
                            dw[i] += g[i] * xr[i]
                if a == lo:  # the sequence's first step: its initial states' gradient
                    for k in range(P):
                        for i in range(W):
                            v = zero
                            for j in range(max(0, k - (hi - lo) + 1), k + 1):
                                v += wT[j, i] * G[k - j, i]
                            dh0[hs, c0 + i, k] = v
            for j in range(K):
                for i in range(LANES):
                    dwp[task, j, i] = dW[j, i]
            for i in range(LANES):
                dbp[task, i] = dB[i]


def _run(kernel, rows: int, length: int, *args) -> None:
    """``kernel(*args, r0, r1)`` over all rows: on the calling thread for small work, else in
    row ranges on :func:`lrnnx.ops._numba.threads_for` threads (torch.get_num_threads() at
    most, one per row at most), torch's own where it can
    (:func:`lrnnx.ops._numba.run_on_threads`)."""
    threads = min(threads_for(rows * length, SERIAL_WORK), rows)
    if threads <= 1:
        kernel(*args, 0, rows)
        return
    ntasks = min(rows, threads * TASKS_PER_THREAD)
    step = -(-rows // ntasks)
    starts = range(0, rows, step)

    def share(i: int, n: int) -> None:
        for r0 in starts[i::n]:
            kernel(*args, r0, min(r0 + step, rows))

    run_on_threads(share, threads)


def _rows_contiguous(t: Tensor) -> bool:
    """Whether the kernels read ``t`` (B, D, L) in place: each row's L steps adjacent in memory
    (or one value repeated, stride 0: an expanded gradient).  Any batch and channel strides are
    fine (a slice along time, a chunk of a wider tensor)."""
    return t.shape[-1] <= 1 or t.stride(-1) in (0, 1)


def kernel_layout(t: Tensor) -> Tensor:
    """``t`` detached, as the row kernels read it: in place when its rows are contiguous, else
    a contiguous copy (a channels-last x goes to the channels-last kernels instead; any other
    order, read along time, would cost a cache line per element); without torch's lazy
    negative bit (``x.conj().imag``), which numpy cannot read."""
    t = t.detach().resolve_neg()
    return t if _rows_contiguous(t) else t.contiguous()


def _states_rows(x: Tensor, cu: Optional[Tensor]) -> int:
    """How many (b, s) state rows there are: B unpacked, S packed (x (1, D, T))."""
    return x.shape[0] if cu is None else cu.shape[0] - 1


def _arrays(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], h0: Optional[Tensor], cu: Optional[Tensor]
):
    """Kernel-ready arrays: x (B, D, L) in :func:`kernel_layout`, the small ones contiguous,
    zeros for a missing bias or state ((B or S) * D, K - 1), the offsets (S + 1,) int64
    ([0, L] unpacked: one sequence per row)."""
    B, D, L = x.shape
    K = weight.shape[1]
    rows = _states_rows(x, cu) * D
    xa = kernel_layout(x).numpy()
    wa = as_array(weight)
    ba = as_array(bias) if bias is not None else torch.zeros(D, dtype=x.dtype).numpy()
    if h0 is None:
        ha = torch.zeros(rows, K - 1, dtype=x.dtype).numpy()
    else:
        ha = as_array(h0.reshape(rows, K - 1))
    offsets = torch.tensor([0, L]) if cu is None else cu
    return xa, wa, ba, ha, as_array(offsets.to(torch.int64))


def channels_last(x: Tensor) -> bool:
    """Whether x (B, D, L) has its channels adjacent (stride 1) and its steps apart: a
    (B, L, D) tensor seen transposed, which the channels-last kernels read where it lies."""
    return x.shape[1] > 1 and x.shape[2] > 1 and x.stride(1) == 1


def _empty_channels_last(B: int, D: int, L: int, dtype: torch.dtype) -> Tensor:
    """An empty (B, D, L) tensor whose memory is (B, L, D)."""
    return torch.empty(B, L, D, dtype=dtype).transpose(1, 2)


def _cl_tasks(B: int, D: int, L: int) -> int:
    """Tasks of the channels-last kernels: batch x channel blocks x time blocks."""
    return B * -(-D // LANES) * -(-L // TIME_BLOCK)


def _cl_small(weight: Tensor, bias: Optional[Tensor], h0: Optional[Tensor], rows: int, D: int):
    """The channels-last kernels' small arrays: weight (D, K), bias (D,) and the initial states
    (rows, D, K - 1), zeros for a missing bias or state."""
    K = weight.shape[1]
    dtype = weight.dtype
    ba = as_array(bias) if bias is not None else torch.zeros(D, dtype=dtype).numpy()
    h = h0 if h0 is not None else torch.zeros(rows, D, K - 1, dtype=dtype)
    return as_array(weight), ba, as_array(h.reshape(rows, D, K - 1))


def _offsets(L: int, cu: Optional[Tensor]):
    return as_array((torch.tensor([0, L]) if cu is None else cu).to(torch.int64))


def _forward_channels_last(x, weight, bias, h0, silu: bool, cu) -> Tensor:
    """:func:`forward_kernel` for a channels-last x: y (B, D, L), channels-last too."""
    B, D, L = x.shape
    y = _empty_channels_last(B, D, L, x.dtype)
    (xf, sx), (yf, sy) = flat_view(x), flat_view(y)
    ntasks = _cl_tasks(B, D, L)
    wa, ba, ha = _cl_small(weight, bias, h0, _states_rows(x, cu), D)
    _run(_cl_fwd, ntasks, B * D * L // ntasks, xf, np.array(sx), wa, ba, ha, _offsets(L, cu),
         bool(silu), yf, np.array(sy))  # fmt: skip
    return y


def _backward_channels_last(x, weight, bias, h0, silu: bool, dy, cu):
    """:func:`backward_kernel` for a channels-last x: dx channels-last too."""
    B, D, L = x.shape
    K = weight.shape[1]
    rows = _states_rows(x, cu)
    if dy.stride(1) != 1:  # the kernels read dy's rows of channels (an expanded dy: copied)
        dy = dy.transpose(1, 2).contiguous().transpose(1, 2)
    dx = _empty_channels_last(B, D, L, x.dtype)
    dh0 = torch.zeros(rows, D, K - 1, dtype=x.dtype)  # a sequence without steps: no gradient
    ntasks = _cl_tasks(B, D, L)
    dwp = torch.empty(ntasks, K, LANES, dtype=x.dtype)
    dbp = torch.empty(ntasks, LANES, dtype=x.dtype)
    (xf, sx), (dyf, sdy), (dxf, sdx) = flat_view(x), flat_view(dy), flat_view(dx)
    wa, ba, ha = _cl_small(weight, bias, h0, rows, D)
    _run(_cl_bwd, ntasks, B * D * L // ntasks, xf, np.array(sx), wa, ba, ha, _offsets(L, cu),
         bool(silu), dyf, np.array(sdy), dxf, np.array(sdx), dh0.numpy(), dwp.numpy(),
         dbp.numpy())  # fmt: skip
    # task = (b, channel block, time block); lane i of block c is channel c LANES + i
    ncb = -(-D // LANES)
    dw = dwp.view(B, ncb, -1, K, LANES).sum((0, 2)).transpose(1, 2).reshape(-1, K)[:D]
    db = dbp.view(B, ncb, -1, LANES).sum((0, 2)).reshape(-1)[:D]
    return dx, dw, db, dh0


@torch.no_grad()
def forward_kernel(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    h0: Optional[Tensor],
    silu: bool,
    cu: Optional[Tensor] = None,
) -> Tensor:
    """y (B, D, L) for CPU tensors of one dtype (float32 or float64); ``cu`` (S + 1,) int64
    offsets of packed sequences (B = 1, h0 (S, D, K - 1)) or None."""
    if channels_last(x):
        return _forward_channels_last(x, weight, bias, h0, silu, cu)
    B, D, L = x.shape
    y = torch.empty(B, D, L, dtype=x.dtype)
    xa, wa, ba, ha, ca = _arrays(x, weight, bias, h0, cu)
    _run(_fwd_rows, B * D, L, xa, wa, ba, ha, ca, bool(silu), y.numpy())
    return y


@torch.no_grad()
def backward_kernel(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    h0: Optional[Tensor],
    silu: bool,
    dy: Tensor,
    cu: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx (B, D, L), dweight (D, K), dbias (D,), dinitial_states (B or S, D, K - 1))."""
    if channels_last(x):
        return _backward_channels_last(x, weight, bias, h0, silu, dy.to(x.dtype), cu)
    B, D, L = x.shape
    K = weight.shape[1]
    R = B * D
    H = _states_rows(x, cu)
    dx = torch.empty(B, D, L, dtype=x.dtype)
    dh0 = torch.empty(H, D, K - 1, dtype=x.dtype)
    dw = torch.empty(B, D, K, dtype=x.dtype)  # per row, summed over the batch below
    db = torch.empty(B, D, dtype=x.dtype)
    xa, wa, ba, ha, ca = _arrays(x, weight, bias, h0, cu)
    dya = kernel_layout(dy.to(x.dtype)).numpy()  # an expanded dy is not copied
    _run(
        _bwd_rows, R, L, xa, wa, ba, ha, ca, bool(silu), dya,
        dx.numpy(), dh0.view(H * D, K - 1).numpy(), dw.view(R, K).numpy(), db.view(R).numpy(),
    )  # fmt: skip
    return dx, dw.sum(0), db.sum(0), dh0


class CausalConv1dCPUFunction(torch.autograd.Function):
    """Fused forward; fused backward that recomputes the pre-activation (saves only the inputs,
    x in the kernels' layout: a transposed x is copied once, in forward, not again in backward).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, initial_states, silu: bool, cu):
        ctx.silu, ctx.cu = silu, cu
        xk = x if _rows_contiguous(x) or channels_last(x) else kernel_layout(x)
        ctx.save_for_backward(xk, weight, bias, initial_states)
        return forward_kernel(xk, weight, bias, initial_states, silu, cu)

    @staticmethod
    @first_order("causal_conv1d (cpu backend)")  # the kernel is not differentiable
    def backward(ctx, dy: Tensor):
        x, weight, bias, h0 = ctx.saved_tensors
        dx, dw, db, dh0 = backward_kernel(x, weight, bias, h0, ctx.silu, dy, ctx.cu)
        need = ctx.needs_input_grad
        return (
            dx if need[0] else None,
            dw if need[1] else None,
            db if bias is not None and need[2] else None,
            dh0 if h0 is not None and need[3] else None,
            None,
            None,
        )


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    initial_states: Optional[Tensor],
    silu: bool,
    cu_seqlens: Optional[Tensor] = None,
) -> Tensor:
    """Fused CPU causal depthwise convolution; same arguments and result as the reference.

    Tensors on another device go to the torch backend.
    """
    if x.device.type != "cpu":
        from lrnnx.ops.causal_conv1d.torch import causal_conv1d as torch_conv

        return torch_conv(x, weight, bias, initial_states, silu, cu_seqlens)
    cu = None if cu_seqlens is None else cu_seqlens.detach().to(torch.int64)
    tensors = (x, weight, bias, initial_states)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return CausalConv1dCPUFunction.apply(x, weight, bias, initial_states, bool(silu), cu)
    return forward_kernel(x, weight, bias, initial_states, silu, cu)
