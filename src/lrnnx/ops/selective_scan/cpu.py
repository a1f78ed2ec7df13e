"""Fused CPU selective scan, compiled by numba at first use (cached on disk afterwards).

Mamba's own case (the "mamba" rule, real A, B_t and C_t shared by groups of at least 16
channels) runs on the channel-lane kernels of
:mod:`lrnnx.ops.selective_scan.cpu_lanes` (:func:`_prepare` chooses); every other call on the
kernels of this module, described here.

Work split.  A task is one batch element and a block of channels (blocks never straddle a group
of grouped B/C, so the rows of the partial dB/dC a task writes are its own).  Tasks run on at
most ``torch.get_num_threads()`` threads, torch's own OpenMP threads where it can
(:func:`lrnnx.ops._numba.run_on_threads`): the kernels are compiled ``nogil``, each thread
makes one call that loops over its share of the tasks (a numba call costs tens of microseconds
of argument unboxing), and a call with less than :data:`SERIAL_WORK` state updates runs on the
calling thread alone.  Each channel is walked through time
in chunks of :data:`CHUNK` (K) steps; the (b, d, L, n) state tensor is never formed.

Forward under "mamba" (gamma_bar = delta', Mamba's rule) runs each chunk step by step with the
state in an (n,) array, B and C time-major (the loop over the state vectorises): that is the
fastest form of the recurrence when no per-step buffer is needed.  The other rules, and the
backward's recompute (which needs every state of the chunk), use state-major (n, K) buffers
that stay in L1/L2, in passes that each run along time (the inner loops are K long, so LLVM
vectorises them):

1. delta' = softplus(delta + bias) (or delta + bias) and the A-step s (deltaA, else delta').
2. A_bar and gamma_bar for every (state, step): for float32 the exp, expm1, softplus and sigmoid
   are inlined polynomials, vectorised (numba has no vector libm without Intel's SVML).
3. x = gamma_bar B_t u_t, then h_t = A_bar h_{t-1} + x_t: the recurrence is sequential in t, so
   eight state rows advance together (eight independent multiply-add chains per step).
4. w_t = sum_k C_t[k] h_t[k] (2 Re(...) for complex A) + D u_t, then the silu(z_t) gate.

Forward keeps the state at each chunk start, (b, d, L / K, n), when a gradient is needed.
Backward walks each channel's chunks in reverse: it recomputes the chunk from its checkpoint with
the same passes, runs the adjoint recurrence G_t = dy_t C_t + A_bar_{t+1} G_{t+1} backwards
through it, and accumulates every input's gradient from (A_bar, gamma_bar, h, G) (under
"mamba" with time-varying B and C in one fused pass per state row); the adjoint
state at the chunk start is carried into the previous chunk, and after the first chunk it is
the gradient of ``initial_state``.  Complex numbers follow PyTorch's convention (conjugate
Wirtinger: grad_w = conj(df/dw) grad_f), so the results match autograd through the torch
backend; complex tensors are split into real and imaginary planes, so every kernel works on
real arrays.

``reverse=True`` (time from the last step to the first) is a runtime flag of the same compiled
kernels: forward walks the segments last to first and each chunk from its last step to its
first (the (n, K) B/C rows are loaded reversed, u, delta, z into (K,) scratch, y written back
reversed); backward walks them first to last.  A packed sequence then begins at its last
segment and ends at its first.  No time-flipped copy of an input or of y is made.

Why numba and not a C++ extension (``torch.utils.cpp_extension.load_inline``): numba is a pip
wheel, so users need no compiler toolchain or torch headers, and ``cache=True`` keeps the
machine code next to this file: the first call of a dtype compiles all its kernels (10-20 s on
the 2-core machine; by default in a background process while calls run on the torch backend,
see :mod:`lrnnx.ops._numba` and :func:`warm_up`), later processes load them in about a second.  load_inline needs g++ and
the torch headers at run time, rebuilds whenever torch changes, and took 33 s here to build a
ten-line scan kernel alone.  The code LLVM generates from these loops is vectorised at the
host's width, as a C++ compiler's would be.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from lrnnx.core.autograd import first_order
from lrnnx.ops import _numba_math
from lrnnx.ops._numba import (
    HAVE_NUMBA,
    as_array,
    as_planes,
    is_available,
    run_on_threads,
    threads_for,
)
from lrnnx.ops.selective_scan import cpu_lanes

__all__ = ["selective_scan", "is_available", "warm_up"]

#: the other modules whose kernels a call compiles (their sources stamp the ready marker)
KERNEL_MODULES = (cpu_lanes, _numba_math)

#: steps per chunk: the checkpoint interval of forward and the recompute unit of backward;
#: long chunks amortise the per-row loop overhead (the (n, CHUNK) buffers stay in L2)
CHUNK = 256
#: parallel tasks per thread (channel blocks x batch), so threads finish close together
TASKS_PER_THREAD = 4
#: below this many state updates (b d L n) a call runs on the calling thread alone (about
#: 0.8 ms of work at 1.6 ns per update): handing tasks to other threads saves at most half of
#: it on a quiet machine, and on a busy one a parallel region waits for a descheduled thread
#: for a scheduler tick (measured: Mamba's forward at B=1 L=64, 131072 updates, 5.4 ms on two
#: threads beside another process against 0.95 ms quiet)
SERIAL_WORK = 1 << 19

_DISC = {"mamba": 0, "zoh": 1, "bilinear": 2, "dirac": 3}

if HAVE_NUMBA:
    import numba
    import numpy as np

    from lrnnx.ops._numba_math import _HELPER, _exp, _expm1, _sigmoid, _sincos, _softplus

    # fmt: off
    # (the kernels' long argument lists stay packed)

    # ------------------------------------------------------------------ chunk passes
    # Buffers are state-major, (n, K): every inner loop runs along the chunk's time steps (K
    # long, so LLVM vectorises it) rather than along the state (often 16: too short for the
    # vectoriser's minimum trip count).  Arguments ending in "c" are one channel's rows
    # restricted to the chunk, (T,); Xv is the (n, L or 1) slice of B or C a channel reads,
    # from column t0 (ts = 1) or always column 0 (ts = 0: time-invariant).

    @numba.njit(**_HELPER)
    def _back(T, j):  # pragma: no cover - compiled
        """T - 1 - j as an unsigned index: numba wraps negative signed indices around, and that
        select stops LLVM from vectorising a reversed copy (8x slower here)."""
        return numba.uint64(T - 1 - j)

    @numba.njit(**_HELPER)
    def _rows(Xv, t0, ts, T, rev, out):  # pragma: no cover - compiled
        """out[k, j] = X_{t0 + j}[k] for j < T (X_{t0 + T - 1 - j}[k] when ``rev``)."""
        for k in range(Xv.shape[0]):
            o = out[k]
            if ts and rev:
                src = Xv[k, t0 : t0 + T]
                for j in range(T):
                    o[j] = src[_back(T, j)]
            elif ts:
                src = Xv[k, t0 : t0 + T]
                for j in range(T):
                    o[j] = src[j]
            else:
                v = Xv[k, 0]
                for j in range(T):
                    o[j] = v

    @numba.njit(**_HELPER)
    def _take(row, t0, T, rev, buf):  # pragma: no cover - compiled
        """A chunk of one channel's row in walking order: the view row[t0 : t0 + T], or under
        ``rev`` its steps last to first, copied into the (K,) scratch ``buf`` (never the row)."""
        if rev:
            src = row[t0 : t0 + T]
            for j in range(T):
                buf[j] = src[_back(T, j)]
            return buf[:T]
        return row[t0 : t0 + T]

    @numba.njit(**_HELPER)
    def _out(row, t0, T, rev, buf):  # pragma: no cover - compiled
        """Where a chunk's output goes in walking order: row[t0 : t0 + T], or ``buf`` under
        ``rev`` (then :func:`_put` writes it back reversed)."""
        return buf[:T] if rev else row[t0 : t0 + T]

    @numba.njit(**_HELPER)
    def _put(buf, row, t0, T):  # pragma: no cover - compiled
        """row[t0 + T - 1 - j] = buf[j]: a reversed chunk's output back in time order."""
        dst = row[t0 : t0 + T]
        for j in range(T):
            dst[_back(T, j)] = buf[j]

    @numba.njit(**_HELPER)
    def _put_rows(buf, rows, t0, T):  # pragma: no cover - compiled
        """rows[k, t0 + T - 1 - j] += buf[k, j]: a reversed chunk's dB or dC rows."""
        for k in range(rows.shape[0]):
            src, dst = buf[k], rows[k, t0 : t0 + T]
            for j in range(T):
                dst[j] += src[_back(T, j)]

    @numba.njit(**_HELPER)
    def _put_steps(
        bi, ch, t0, T, has_dA, has_z, du, ddelta, ddA, dz, duc, ddc, ddAc, dzc
    ):  # pragma: no cover - compiled
        """A reversed chunk's du, ddelta (and ddeltaA, dz) back into channel ch's rows."""
        _put(duc, du[bi, ch], t0, T)
        _put(ddc, ddelta[bi, ch], t0, T)
        if has_dA:  # (else ddA, dz are (1, 1, 1) placeholders)
            _put(ddAc, ddA[bi, ch], t0, T)
        if has_z:
            _put(dzc, dz[bi, ch], t0, T)

    @numba.njit(**_HELPER)
    def _zero_rows(buf, T):  # pragma: no cover - compiled
        for k in range(buf.shape[0]):
            for j in range(T):
                buf[k, j] = 0.0

    @numba.njit(**_HELPER)
    def _steps(dc, bias_c, dAc, softplus, has_dA, T, raw, dt, s):  # pragma: no cover
        """raw = delta + bias, dt = softplus(raw) or raw, s = deltaA or dt."""
        for j in range(T):
            raw[j] = dc[j] + bias_c
        if softplus:
            for j in range(T):
                dt[j] = _softplus(raw[j])
        else:
            for j in range(T):
                dt[j] = raw[j]
        if has_dA:
            for j in range(T):
                s[j] = dAc[j]
        else:
            for j in range(T):
                s[j] = dt[j]

    @numba.njit(**_HELPER)
    def _recur(a, x, hs, T):  # pragma: no cover - compiled
        """hs[k, j + 1] = a[k, j] hs[k, j] + x[k, j] for j < T.

        The recurrence is sequential in j, so eight (then four) rows advance together: eight
        independent multiply-add chains per step hide the latency of each."""
        n = a.shape[0]
        k = 0
        while k + 8 <= n:
            a0, a1, a2, a3, a4, a5, a6, a7 = a[k], a[k + 1], a[k + 2], a[k + 3], a[k + 4], a[k + 5], a[k + 6], a[k + 7]
            x0, x1, x2, x3, x4, x5, x6, x7 = x[k], x[k + 1], x[k + 2], x[k + 3], x[k + 4], x[k + 5], x[k + 6], x[k + 7]
            o0, o1, o2, o3, o4, o5, o6, o7 = hs[k], hs[k + 1], hs[k + 2], hs[k + 3], hs[k + 4], hs[k + 5], hs[k + 6], hs[k + 7]
            h0, h1, h2, h3, h4, h5, h6, h7 = o0[0], o1[0], o2[0], o3[0], o4[0], o5[0], o6[0], o7[0]
            for j in range(T):
                h0 = a0[j] * h0 + x0[j]
                h1 = a1[j] * h1 + x1[j]
                h2 = a2[j] * h2 + x2[j]
                h3 = a3[j] * h3 + x3[j]
                h4 = a4[j] * h4 + x4[j]
                h5 = a5[j] * h5 + x5[j]
                h6 = a6[j] * h6 + x6[j]
                h7 = a7[j] * h7 + x7[j]
                o0[j + 1] = h0
                o1[j + 1] = h1
                o2[j + 1] = h2
                o3[j + 1] = h3
                o4[j + 1] = h4
                o5[j + 1] = h5
                o6[j + 1] = h6
                o7[j + 1] = h7
            k += 8
        while k + 4 <= n:
            a0, a1, a2, a3 = a[k], a[k + 1], a[k + 2], a[k + 3]
            x0, x1, x2, x3 = x[k], x[k + 1], x[k + 2], x[k + 3]
            o0, o1, o2, o3 = hs[k], hs[k + 1], hs[k + 2], hs[k + 3]
            h0, h1, h2, h3 = o0[0], o1[0], o2[0], o3[0]
            for j in range(T):
                h0 = a0[j] * h0 + x0[j]
                h1 = a1[j] * h1 + x1[j]
                h2 = a2[j] * h2 + x2[j]
                h3 = a3[j] * h3 + x3[j]
                o0[j + 1] = h0
                o1[j + 1] = h1
                o2[j + 1] = h2
                o3[j + 1] = h3
            k += 4
        while k < n:
            ak, xk, ok = a[k], x[k], hs[k]
            h = ok[0]
            for j in range(T):
                h = ak[j] * h + xk[j]
                ok[j + 1] = h
            k += 1

    @numba.njit(**_HELPER)
    def _adjoint(a, dy, Cb, carry, T, G):  # pragma: no cover - compiled
        """Adjoint of :func:`_recur`: G[k, j] = dy[j] C[k, j] + a[k, j + 1] G[k, j + 1], from
        G[k, T] = carry[k] / a[k, T] (the adjoint arriving from the next chunk, already through
        its decay); then carry[k] = a[k, 0] G[k, 0], the adjoint of the state before the chunk.
        Eight (then four) rows advance together, as in :func:`_recur`."""
        n = a.shape[0]
        k = 0
        while k + 8 <= n:
            a0, a1, a2, a3, a4, a5, a6, a7 = a[k], a[k + 1], a[k + 2], a[k + 3], a[k + 4], a[k + 5], a[k + 6], a[k + 7]
            c0, c1, c2, c3, c4, c5, c6, c7 = Cb[k], Cb[k + 1], Cb[k + 2], Cb[k + 3], Cb[k + 4], Cb[k + 5], Cb[k + 6], Cb[k + 7]
            g0, g1, g2, g3, g4, g5, g6, g7 = G[k], G[k + 1], G[k + 2], G[k + 3], G[k + 4], G[k + 5], G[k + 6], G[k + 7]
            e = dy[T - 1]
            r0, r1, r2, r3 = e * c0[T - 1] + carry[k], e * c1[T - 1] + carry[k + 1], e * c2[T - 1] + carry[k + 2], e * c3[T - 1] + carry[k + 3]
            r4, r5, r6, r7 = e * c4[T - 1] + carry[k + 4], e * c5[T - 1] + carry[k + 5], e * c6[T - 1] + carry[k + 6], e * c7[T - 1] + carry[k + 7]
            g0[T - 1], g1[T - 1], g2[T - 1], g3[T - 1] = r0, r1, r2, r3
            g4[T - 1], g5[T - 1], g6[T - 1], g7[T - 1] = r4, r5, r6, r7
            for jj in range(1, T):
                j = T - 1 - jj
                e = dy[j]
                r0 = a0[j + 1] * r0 + e * c0[j]
                r1 = a1[j + 1] * r1 + e * c1[j]
                r2 = a2[j + 1] * r2 + e * c2[j]
                r3 = a3[j + 1] * r3 + e * c3[j]
                r4 = a4[j + 1] * r4 + e * c4[j]
                r5 = a5[j + 1] * r5 + e * c5[j]
                r6 = a6[j + 1] * r6 + e * c6[j]
                r7 = a7[j + 1] * r7 + e * c7[j]
                g0[j] = r0
                g1[j] = r1
                g2[j] = r2
                g3[j] = r3
                g4[j] = r4
                g5[j] = r5
                g6[j] = r6
                g7[j] = r7
            carry[k], carry[k + 1], carry[k + 2], carry[k + 3] = a0[0] * r0, a1[0] * r1, a2[0] * r2, a3[0] * r3
            carry[k + 4], carry[k + 5], carry[k + 6], carry[k + 7] = a4[0] * r4, a5[0] * r5, a6[0] * r6, a7[0] * r7
            k += 8
        while k + 4 <= n:
            a0, a1, a2, a3 = a[k], a[k + 1], a[k + 2], a[k + 3]
            c0, c1, c2, c3 = Cb[k], Cb[k + 1], Cb[k + 2], Cb[k + 3]
            g0, g1, g2, g3 = G[k], G[k + 1], G[k + 2], G[k + 3]
            r0 = dy[T - 1] * c0[T - 1] + carry[k]
            r1 = dy[T - 1] * c1[T - 1] + carry[k + 1]
            r2 = dy[T - 1] * c2[T - 1] + carry[k + 2]
            r3 = dy[T - 1] * c3[T - 1] + carry[k + 3]
            g0[T - 1], g1[T - 1], g2[T - 1], g3[T - 1] = r0, r1, r2, r3
            for jj in range(1, T):
                j = T - 1 - jj
                r0 = a0[j + 1] * r0 + dy[j] * c0[j]
                r1 = a1[j + 1] * r1 + dy[j] * c1[j]
                r2 = a2[j + 1] * r2 + dy[j] * c2[j]
                r3 = a3[j + 1] * r3 + dy[j] * c3[j]
                g0[j] = r0
                g1[j] = r1
                g2[j] = r2
                g3[j] = r3
            carry[k], carry[k + 1] = a0[0] * r0, a1[0] * r1
            carry[k + 2], carry[k + 3] = a2[0] * r2, a3[0] * r3
            k += 4
        while k < n:
            ak, ck, gk = a[k], Cb[k], G[k]
            r = dy[T - 1] * ck[T - 1] + carry[k]
            gk[T - 1] = r
            for jj in range(1, T):
                j = T - 1 - jj
                r = ak[j + 1] * r + dy[j] * ck[j]
                gk[j] = r
            carry[k] = ak[0] * r
            k += 1

    @numba.njit(**_HELPER)
    def _chunk_real(
        uc, dc, dAc, Ach, Bv, Cv, t0, tsB, tsC, rev, Dc, bias_c, disc, softplus, has_dA, T,
        raw, dt, s, a, g, Bb, Cb, x, hs, w,
    ):  # pragma: no cover - compiled
        """One chunk from hs[:, 0]: A_bar, gamma_bar into a, g; B_t, C_t into Bb, Cb; the
        states into hs[:, 1..T]; w = y + D u."""
        n = Ach.shape[0]
        one = uc.dtype.type(1.0)
        half = uc.dtype.type(0.5)
        _steps(dc, bias_c, dAc, softplus, has_dA, T, raw, dt, s)
        _rows(Bv, t0 * tsB, tsB, T, rev, Bb)
        _rows(Cv, t0 * tsC, tsC, T, rev, Cb)
        for k in range(n):
            Ak = Ach[k]
            ak, gk = a[k], g[k]
            if disc == 2:  # bilinear
                for j in range(T):
                    hx = half * s[j] * Ak
                    ak[j] = (one + hx) / (one - hx)
                for j in range(T):
                    gk[j] = dt[j] / (one - half * dt[j] * Ak)
            else:
                for j in range(T):
                    ak[j] = _exp(s[j] * Ak)
                if disc == 0:  # mamba: gamma_bar = delta'
                    for j in range(T):
                        gk[j] = dt[j]
                elif disc == 1:  # zoh: expm1(delta' A) / A
                    for j in range(T):
                        gk[j] = _expm1(dt[j] * Ak) / Ak
                else:  # dirac
                    for j in range(T):
                        gk[j] = one
            xk, bk = x[k], Bb[k]
            for j in range(T):
                xk[j] = gk[j] * bk[j] * uc[j]
        _recur(a, x, hs, T)
        for j in range(T):
            w[j] = Dc * uc[j]
        for k in range(n):
            ck, hk = Cb[k], hs[k]
            for j in range(T):
                w[j] += ck[j] * hk[j + 1]

    @numba.njit(**_HELPER)
    def _recur_cplx(ar, ai, xr, xi, hr, hi, T):  # pragma: no cover - compiled
        """Complex :func:`_recur` on split planes, two rows per pass."""
        n = ar.shape[0]
        k = 0
        while k + 2 <= n:
            ar0, ai0, ar1, ai1 = ar[k], ai[k], ar[k + 1], ai[k + 1]
            xr0, xi0, xr1, xi1 = xr[k], xi[k], xr[k + 1], xi[k + 1]
            or0, oi0, or1, oi1 = hr[k], hi[k], hr[k + 1], hi[k + 1]
            p0, q0, p1, q1 = or0[0], oi0[0], or1[0], oi1[0]
            for j in range(T):
                p0, q0 = ar0[j] * p0 - ai0[j] * q0 + xr0[j], ar0[j] * q0 + ai0[j] * p0 + xi0[j]
                p1, q1 = ar1[j] * p1 - ai1[j] * q1 + xr1[j], ar1[j] * q1 + ai1[j] * p1 + xi1[j]
                or0[j + 1] = p0
                oi0[j + 1] = q0
                or1[j + 1] = p1
                oi1[j + 1] = q1
            k += 2
        while k < n:
            ark, aik, xrk, xik, ork, oik = ar[k], ai[k], xr[k], xi[k], hr[k], hi[k]
            p, q = ork[0], oik[0]
            for j in range(T):
                p, q = ark[j] * p - aik[j] * q + xrk[j], ark[j] * q + aik[j] * p + xik[j]
                ork[j + 1] = p
                oik[j + 1] = q
            k += 1

    @numba.njit(**_HELPER)
    def _adjoint_cplx(ar, ai, dy, Cbr, Cbi, cr, ci, T, Gr, Gi):  # pragma: no cover - compiled
        """Complex :func:`_adjoint` for y = 2 Re(C h):
        G[k, j] = 2 dy[j] conj(C[k, j]) + conj(a[k, j + 1]) G[k, j + 1]."""
        n = ar.shape[0]
        two = dy.dtype.type(2.0)
        for k in range(n):
            ark, aik, crk, cik, grk, gik = ar[k], ai[k], Cbr[k], Cbi[k], Gr[k], Gi[k]
            p = two * dy[T - 1] * crk[T - 1] + cr[k]
            q = ci[k] - two * dy[T - 1] * cik[T - 1]
            grk[T - 1] = p
            gik[T - 1] = q
            for jj in range(1, T):
                j = T - 1 - jj
                e = two * dy[j]
                p, q = (
                    ark[j + 1] * p + aik[j + 1] * q + e * crk[j],
                    ark[j + 1] * q - aik[j + 1] * p - e * cik[j],
                )
                grk[j] = p
                gik[j] = q
            cr[k] = ark[0] * p + aik[0] * q
            ci[k] = ark[0] * q - aik[0] * p

    @numba.njit(**_HELPER)
    def _chunk_cplx(
        uc, dc, dAc, Ar, Ai, Brv, Biv, Crv, Civ, t0, tsB, tsC, rev, Dc, bias_c, disc, softplus,
        has_dA, T, raw, dt, s, ar, ai, gr, gi, Bbr, Bbi, Cbr, Cbi, xr, xi, hr, hi, w,
    ):  # pragma: no cover - compiled
        """Complex A (split planes): as :func:`_chunk_real`, with y = 2 Re(sum_k C h)."""
        n = Ar.shape[0]
        zero = uc.dtype.type(0.0)
        one = uc.dtype.type(1.0)
        half = uc.dtype.type(0.5)
        two = uc.dtype.type(2.0)
        _steps(dc, bias_c, dAc, softplus, has_dA, T, raw, dt, s)
        _rows(Brv, t0 * tsB, tsB, T, rev, Bbr)
        _rows(Biv, t0 * tsB, tsB, T, rev, Bbi)
        _rows(Crv, t0 * tsC, tsC, T, rev, Cbr)
        _rows(Civ, t0 * tsC, tsC, T, rev, Cbi)
        for k in range(n):
            Akr, Aki = Ar[k], Ai[k]
            ark, aik, grk, gik = ar[k], ai[k], gr[k], gi[k]
            if disc == 2:  # bilinear: (1 + x) / (1 - x), x = s A / 2
                for j in range(T):
                    xr_ = half * s[j] * Akr
                    xi_ = half * s[j] * Aki
                    dr = one - xr_
                    m = one / (dr * dr + xi_ * xi_)
                    ark[j] = ((one + xr_) * dr - xi_ * xi_) * m
                    aik[j] = (xi_ * dr + (one + xr_) * xi_) * m
                for j in range(T):
                    dr = one - half * dt[j] * Akr
                    di = -half * dt[j] * Aki
                    m = dt[j] / (dr * dr + di * di)
                    grk[j] = dr * m
                    gik[j] = -di * m
            else:
                for j in range(T):
                    e = _exp(s[j] * Akr)
                    sn, cs = _sincos(s[j] * Aki)
                    ark[j] = e * cs
                    aik[j] = e * sn
                if disc == 0:
                    for j in range(T):
                        grk[j] = dt[j]
                        gik[j] = zero
                elif disc == 1:  # zoh: expm1(x) / A with a cancellation-free complex expm1
                    m = one / (Akr * Akr + Aki * Aki)
                    for j in range(T):
                        em1 = _expm1(dt[j] * Akr)
                        th = dt[j] * Aki
                        sh = _sincos(half * th)[0]
                        sn, cs = _sincos(th)
                        er = em1 * cs - two * sh * sh
                        ei = (em1 + one) * sn
                        grk[j] = (er * Akr + ei * Aki) * m
                        gik[j] = (ei * Akr - er * Aki) * m
                else:
                    for j in range(T):
                        grk[j] = one
                        gik[j] = zero
            xrk, xik, brk, bik = xr[k], xi[k], Bbr[k], Bbi[k]
            for j in range(T):
                xrk[j] = (grk[j] * brk[j] - gik[j] * bik[j]) * uc[j]
                xik[j] = (grk[j] * bik[j] + gik[j] * brk[j]) * uc[j]
        _recur_cplx(ar, ai, xr, xi, hr, hi, T)
        for j in range(T):
            w[j] = zero
        for k in range(n):
            crk, cik, hrk, hik = Cbr[k], Cbi[k], hr[k], hi[k]
            for j in range(T):
                w[j] += crk[j] * hrk[j + 1] - cik[j] * hik[j + 1]
        for j in range(T):
            w[j] = two * w[j] + Dc * uc[j]

    @numba.njit(**_HELPER)
    def _gate_forward(zc, has_z, T, w, yc):  # pragma: no cover - compiled
        if has_z:
            for j in range(T):
                yc[j] = w[j] * zc[j] * _sigmoid(zc[j])
        else:
            for j in range(T):
                yc[j] = w[j]

    @numba.njit(**_HELPER)
    def _gate_backward(uc, zc, doc, dzc, Dc, has_z, T, w, dy, du_j):  # pragma: no cover
        """dy = dL/d(y + D u), dz, and the D path of du; returns this chunk's dL/dD."""
        one = uc.dtype.type(1.0)
        if has_z:
            for j in range(T):
                sg = _sigmoid(zc[j])
                dzc[j] = doc[j] * w[j] * sg * (one + zc[j] * (one - sg))
                dy[j] = doc[j] * zc[j] * sg
        else:
            for j in range(T):
                dy[j] = doc[j]
        dD = uc.dtype.type(0.0)
        for j in range(T):
            dD += dy[j] * uc[j]
            du_j[j] = dy[j] * Dc
        return dD

    @numba.njit(**_HELPER)
    def _finish_steps(
        softplus, has_dA, T, raw, ddt, ds, du_j, duc, ddc, ddAc
    ):  # pragma: no cover - compiled
        """Route the step gradients to deltaA or delta', then through softplus; returns dbias."""
        if has_dA:
            for j in range(T):
                ddAc[j] = ds[j]
        else:
            for j in range(T):
                ddt[j] += ds[j]
        if softplus:  # torch's threshold: identity (gradient 1) above 20
            for j in range(T):
                r = raw[j]
                ddt[j] = ddt[j] if r > 20.0 else ddt[j] * _sigmoid(r)
        db = raw.dtype.type(0.0)
        for j in range(T):
            ddc[j] = ddt[j]
            db += ddt[j]
            duc[j] = du_j[j]
        return db

    # ------------------------------------------------------------------ real kernels

    @numba.njit(**_HELPER)
    def _chunk_steps(uc, dt, s, Ak, BT, CT, t0, tsB, tsC, rev, Dc, T, h, w):  # pragma: no cover
        """Forward of one chunk under "mamba" (gamma_bar = delta'), step by step with the state
        in h (n,): h = exp(s_j A) h + delta'_j u_j B_j, w_j = C_j . h + D u_j.  BT, CT are
        time-major (L or 1, n), so a step's n values are contiguous and the loop over the
        state vectorises; the state never leaves the cache line it lives in.  Forward needs
        no per-step buffer (backward recomputes with :func:`_chunk_real`).  Step j is time
        t0 + j, or t0 + T - 1 - j under ``rev``."""
        n = h.shape[0]
        first, step = (t0 + T - 1, -1) if rev else (t0, 1)
        for j in range(T):
            tq = first + step * j
            Bq = BT[tq * tsB]
            Cq = CT[tq * tsC]
            sj = s[j]
            gu = dt[j] * uc[j]
            acc = uc.dtype.type(0.0)
            for k in range(n):
                hk = _exp(sj * Ak[k]) * h[k] + gu * Bq[k]
                h[k] = hk
                acc += Cq[k] * hk
            w[j] = acc + Dc * uc[j]

    @numba.njit(**_HELPER)
    def _fwd_real(
        task,
        u, delta, A, B, C, D, z, bias, dA_in, h0, disc, softplus, has_z, has_dA, K, rev, blocks,
        seg, BT, CT, y, hlast, ckpt,
    ):  # pragma: no cover - compiled
        """One task: batch element task // len(blocks), channels blocks[task % len(blocks)].

        ``seg`` (see :func:`_segments`) lists the chunks: the state restarts from h0 at a
        segment that begins a sequence and is stored in hlast at one that ends it.  Under
        ``rev`` the segments run last to first, each from its last step to its first (a
        sequence then begins at its last segment and ends at its first).  Under
        "mamba" the chunks run step by step (:func:`_chunk_steps`, on BT, CT: B and C
        time-major), under the other rules in passes (:func:`_chunk_real`)."""
        b, d, L = u.shape
        n = A.shape[1]
        nblk = blocks.shape[0]
        save = ckpt.shape[2] > 0
        nseg = seg.shape[0]
        nseq = h0.shape[0] // b
        tsB = 1 if B.shape[3] > 1 else 0
        tsC = 1 if C.shape[3] > 1 else 0
        bi = task // nblk
        blk = task % nblk
        steps = disc == 0
        raw = np.empty(K, u.dtype)
        dt = np.empty(K, u.dtype)
        s = np.empty(K, u.dtype)
        w = np.empty(K, u.dtype)
        h = np.empty(n, u.dtype)
        # reversed chunks of u, delta, deltaA, z and y in walking order (unused forwards)
        R = K if rev else 0
        rb = np.empty((5, R), u.dtype)
        ub, db, dAb, zb, yb = rb[0], rb[1], rb[2], rb[3], rb[4]
        first, last = (2, 1) if rev else (1, 2)  # the flags of a walk's first and last segment
        P = 0 if steps else K  # the pass buffers, unused step by step
        a = np.empty((n, P), u.dtype)
        g = np.empty((n, P), u.dtype)
        x = np.empty((n, P), u.dtype)
        Bb = np.empty((n, P), u.dtype)
        Cb = np.empty((n, P), u.dtype)
        hs = np.empty((n, P + 1), u.dtype)
        bB = bi if B.shape[0] > 1 else 0
        bC = bi if C.shape[0] > 1 else 0
        for ch in range(blocks[blk, 0], blocks[blk, 1]):
            gB, gC = ch // (d // B.shape[1]), ch // (d // C.shape[1])
            Bv, Cv = B[bB, gB], C[bC, gC]
            for ci in range(nseg):
                c = nseg - 1 - ci if rev else ci
                t0, T, sq, fl = seg[c, 0], seg[c, 1], bi * nseq + seg[c, 2], seg[c, 3]
                if fl & first:  # a sequence begins: restart from its initial state
                    for k in range(n):
                        h[k] = h0[sq, ch, k]
                if save:
                    for k in range(n):
                        ckpt[bi, ch, c, k] = h[k]
                uc = _take(u[bi, ch], t0, T, rev, ub)
                dc = _take(delta[bi, ch], t0, T, rev, db)
                dAc = _take(dA_in[bi, ch], t0, T, rev, dAb) if has_dA else dc
                zc = _take(z[bi, ch], t0, T, rev, zb) if has_z else uc
                if steps:
                    _steps(dc, bias[ch], dAc, softplus, has_dA, T, raw, dt, s)
                    _chunk_steps(uc, dt, s, A[ch], BT[bB, gB], CT[bC, gC], t0, tsB, tsC, rev,
                                 D[ch], T, h, w)  # fmt: skip
                else:
                    for k in range(n):
                        hs[k, 0] = h[k]
                    _chunk_real(
                        uc, dc, dAc, A[ch], Bv, Cv, t0, tsB, tsC, rev, D[ch], bias[ch], disc,
                        softplus, has_dA, T, raw, dt, s, a, g, Bb, Cb, x, hs, w,
                    )
                    for k in range(n):
                        h[k] = hs[k, T]
                yc = _out(y[bi, ch], t0, T, rev, yb)
                _gate_forward(zc, has_z, T, w, yc)
                if rev:
                    _put(yc, y[bi, ch], t0, T)
                if fl & last:  # a sequence ends: its final state
                    for k in range(n):
                        hlast[sq, ch, k] = h[k]

    @numba.njit(**_HELPER)
    def _grads_mamba(
        a, G, hs, Bb, dy, dt, s, uc, A, t0, T, dBv, dCv, du_j, ds, ddt, dA_acc
    ):  # pragma: no cover - compiled
        """The input gradients of one chunk under "mamba" with time-varying B and C, one pass
        per state row (the passes of the general case, fused, read each buffer once):
        dC_t += dy_t h_t, dB_t += G_t delta'_t u_t, du += delta' G . B,
        q = A_bar G h_{t-1}: dA += s q, ds = A . q;  d(delta') = (G . B) u."""
        zero = uc.dtype.type(0.0)
        for j in range(T):
            ds[j] = zero
            ddt[j] = zero
        for k in range(A.shape[0]):
            ak, Gk, hk, bk = a[k], G[k], hs[k], Bb[k]
            dBk = dBv[k, t0 : t0 + T]
            dCk = dCv[k, t0 : t0 + T]
            Ak = A[k]
            acc = zero
            for j in range(T):
                Gj = Gk[j]
                dCk[j] += dy[j] * hk[j + 1]
                gb = Gj * bk[j]
                dBk[j] += Gj * dt[j] * uc[j]
                du_j[j] += gb * dt[j]
                ddt[j] += gb * uc[j]
                q = ak[j] * Gj * hk[j]
                acc += s[j] * q
                ds[j] += q * Ak
            dA_acc[k] += acc

    @numba.njit(**_HELPER)
    def _bwd_real(
        task,
        u, delta, A, B, C, D, z, bias, dA_in, disc, softplus, has_z, has_dA, K, rev, blocks, seg,
        per_B, per_C, ckpt, dout, dhlast,
        du, ddelta, dz, ddA, dAp, dBp, dCp, dDp, dbp, dh0,
    ):  # pragma: no cover - compiled
        """One task: batch element task // len(blocks), channels blocks[task % len(blocks)].

        Segments against forward's walk: the adjoint starts from dhlast at a segment that ends
        a sequence, and at one that begins a sequence the adjoint before it is that sequence's
        dh0.  Under ``rev`` (forward walked time backwards) this walk runs first to last,
        each chunk in forward's order (its steps last to first)."""
        b, d, L = u.shape
        n = A.shape[1]
        nblk = blocks.shape[0]
        nseg = seg.shape[0]
        nseq = dhlast.shape[0] // b
        one = u.dtype.type(1.0)
        half = u.dtype.type(0.5)
        zero = u.dtype.type(0.0)
        tsB = 1 if B.shape[3] > 1 else 0
        tsC = 1 if C.shape[3] > 1 else 0
        bi = task // nblk
        blk = task % nblk
        raw = np.empty(K, u.dtype)
        dt = np.empty(K, u.dtype)
        s = np.empty(K, u.dtype)
        w = np.empty(K, u.dtype)
        dy = np.empty(K, u.dtype)
        du_j = np.empty(K, u.dtype)
        ddt = np.empty(K, u.dtype)
        ds = np.empty(K, u.dtype)
        a = np.empty((n, K), u.dtype)
        g = np.empty((n, K), u.dtype)
        x = np.empty((n, K), u.dtype)
        Bb = np.empty((n, K), u.dtype)
        Cb = np.empty((n, K), u.dtype)
        G = np.empty((n, K), u.dtype)
        hs = np.empty((n, K + 1), u.dtype)
        carry = np.empty(n, u.dtype)
        dA_acc = np.empty(n, u.dtype)
        # reversed chunks of the inputs and gradients in walking order (unused forwards)
        R = K if rev else 0
        rb = np.empty((9, R), u.dtype)
        ub, db, dAb, zb, dob = rb[0], rb[1], rb[2], rb[3], rb[4]
        dzb, dub, ddb, ddAb = rb[5], rb[6], rb[7], rb[8]
        dBb = np.empty((n, R), u.dtype)
        dCb = np.empty((n, R), u.dtype)
        first, last = (2, 1) if rev else (1, 2)  # the flags of forward's first and last segment
        bB = bi if B.shape[0] > 1 else 0
        bC = bi if C.shape[0] > 1 else 0
        for ch in range(blocks[blk, 0], blocks[blk, 1]):
            Bv = B[bB, ch // (d // B.shape[1])]
            Cv = C[bC, ch // (d // C.shape[1])]
            dBv = dBp[bi, ch if per_B else blk]  # this task's rows of the partial dB, dC
            dCv = dCp[bi, ch if per_C else blk]
            Ach = A[ch]
            Dc = D[ch]
            for k in range(n):
                carry[k] = zero
                dA_acc[k] = zero
            dD = zero
            dbias = zero
            for ci in range(nseg):
                c = ci if rev else nseg - 1 - ci
                t0, T, sq, fl = seg[c, 0], seg[c, 1], bi * nseq + seg[c, 2], seg[c, 3]
                if fl & last:  # a sequence ends here: nothing arrives from the next one
                    for k in range(n):
                        carry[k] = dhlast[sq, ch, k]
                for k in range(n):
                    hs[k, 0] = ckpt[bi, ch, c, k]
                uc = _take(u[bi, ch], t0, T, rev, ub)
                dc = _take(delta[bi, ch], t0, T, rev, db)
                dAc = _take(dA_in[bi, ch], t0, T, rev, dAb) if has_dA else dc
                zc = _take(z[bi, ch], t0, T, rev, zb) if has_z else uc
                dzc = _out(dz[bi, ch], t0, T, rev, dzb) if has_z else dc
                # dB, dC of time-varying B, C: this chunk's rows in walking order under rev
                dBt = dBb if rev and tsB else dBv
                dCt = dCb if rev and tsC else dCv
                tb = 0 if rev else t0
                if rev and tsB:
                    _zero_rows(dBb, T)
                if rev and tsC:
                    _zero_rows(dCb, T)
                _chunk_real(
                    uc, dc, dAc, Ach, Bv, Cv, t0, tsB, tsC, rev, Dc, bias[ch], disc, softplus,
                    has_dA, T, raw, dt, s, a, g, Bb, Cb, x, hs, w,
                )
                dD += _gate_backward(
                    uc, zc, _take(dout[bi, ch], t0, T, rev, dob), dzc, Dc, has_z, T, w, dy, du_j
                )
                # adjoint of the states: G_t = dy_t C_t + A_bar_{t+1} G_{t+1}
                _adjoint(a, dy, Cb, carry, T, G)
                if fl & first:  # a sequence begins here: carry = A_bar G is its h0's gradient
                    for k in range(n):
                        dh0[sq, ch, k] = carry[k]
                if disc == 0 and tsB and tsC:  # Mamba's case: every input gradient in one pass
                    _grads_mamba(a, G, hs, Bb, dy, dt, s, uc, Ach, tb, T, dBt, dCt, du_j, ds, ddt,
                                 dA_acc)  # fmt: skip
                else:
                    for k in range(n):  # dC_t = dy_t h_t
                        hk = hs[k]
                        if tsC:
                            dCk = dCt[k, tb : tb + T]
                            for j in range(T):
                                dCk[j] += dy[j] * hk[j + 1]
                        else:
                            acc = zero
                            for j in range(T):
                                acc += dy[j] * hk[j + 1]
                            dCv[k, 0] += acc
                    for k in range(n):  # input gamma_bar B u: dB = G gamma_bar u, du += G gamma_bar B
                        Gk, gk, bk = G[k], g[k], Bb[k]
                        if tsB:
                            dBk = dBt[k, tb : tb + T]
                            for j in range(T):
                                gG = Gk[j] * gk[j]
                                dBk[j] += gG * uc[j]
                                du_j[j] += gG * bk[j]
                        else:
                            acc = zero
                            for j in range(T):
                                gG = Gk[j] * gk[j]
                                acc += gG * uc[j]
                                du_j[j] += gG * bk[j]
                            dBv[k, 0] += acc
                    # A_bar path: q = dA_bar/dx G h_{t-1} for x = s A;  dA += s q, ds += A q
                    for j in range(T):
                        ds[j] = zero
                        ddt[j] = zero
                    for k in range(n):
                        ak, Gk, hk = a[k], G[k], hs[k]
                        Ak = Ach[k]
                        acc = zero
                        if disc == 2:
                            for j in range(T):
                                f = half * (one + ak[j])
                                q = f * f * Gk[j] * hk[j]
                                acc += s[j] * q
                                ds[j] += q * Ak
                        else:
                            for j in range(T):
                                q = ak[j] * Gk[j] * hk[j]
                                acc += s[j] * q
                                ds[j] += q * Ak
                        dA_acc[k] += acc
                    # gamma_bar path: dL/dgamma_bar = G B u
                    for k in range(n):
                        Gk, gk, bk = G[k], g[k], Bb[k]
                        Ak = Ach[k]
                        acc = zero
                        if disc == 0:
                            for j in range(T):
                                ddt[j] += Gk[j] * bk[j] * uc[j]
                        elif disc == 1:  # d/ddt = exp(dt A) = 1 + A g;  d/dA = (dt e - g) / A
                            for j in range(T):
                                e = one + Ak * gk[j]
                                gg = Gk[j] * bk[j] * uc[j]
                                ddt[j] += e * gg
                                acc += (dt[j] * e - gk[j]) * gg
                            dA_acc[k] += acc / Ak
                        elif disc == 2:  # d/ddt = inv^2;  d/dA = dt^2 / 2 inv^2
                            for j in range(T):
                                inv = one / (one - half * dt[j] * Ak)
                                gg = inv * inv * Gk[j] * bk[j] * uc[j]
                                ddt[j] += gg
                                acc += dt[j] * dt[j] * gg
                            dA_acc[k] += half * acc
                duc = _out(du[bi, ch], t0, T, rev, dub)
                ddc = _out(ddelta[bi, ch], t0, T, rev, ddb)
                ddAc = _out(ddA[bi, ch], t0, T, rev, ddAb) if has_dA else dc
                dbias += _finish_steps(softplus, has_dA, T, raw, ddt, ds, du_j, duc, ddc, ddAc)
                if rev:  # the chunk's gradients back in time order
                    _put_steps(bi, ch, t0, T, has_dA, has_z, du, ddelta, ddA, dz, duc, ddc, ddAc,
                               dzc)  # fmt: skip
                    if tsB:
                        _put_rows(dBb, dBv, t0, T)
                    if tsC:
                        _put_rows(dCb, dCv, t0, T)
            for k in range(n):
                dAp[bi, ch, k] = dA_acc[k]
            dDp[bi, ch] = dD
            dbp[bi, ch] = dbias


    # ------------------------------------------------------------------ complex kernels

    @numba.njit(**_HELPER)
    def _fwd_cplx(
        task,
        u, delta, Ar, Ai, Br, Bi, Cr, Ci, D, z, bias, dA_in, h0r, h0i, disc, softplus, has_z,
        has_dA, K, rev, blocks, seg, y, hlr, hli, ckr, cki,
    ):  # pragma: no cover - compiled
        """One task: batch element task // len(blocks), channels blocks[task % len(blocks)];
        segments as in :func:`_fwd_real`."""
        b, d, L = u.shape
        n = Ar.shape[1]
        nblk = blocks.shape[0]
        save = ckr.shape[2] > 0
        nseg = seg.shape[0]
        nseq = h0r.shape[0] // b
        tsB = 1 if Br.shape[3] > 1 else 0
        tsC = 1 if Cr.shape[3] > 1 else 0
        bi = task // nblk
        blk = task % nblk
        raw = np.empty(K, u.dtype)
        dt = np.empty(K, u.dtype)
        s = np.empty(K, u.dtype)
        w = np.empty(K, u.dtype)
        ar = np.empty((n, K), u.dtype)
        ai = np.empty((n, K), u.dtype)
        gr = np.empty((n, K), u.dtype)
        gi = np.empty((n, K), u.dtype)
        Bbr = np.empty((n, K), u.dtype)
        Bbi = np.empty((n, K), u.dtype)
        Cbr = np.empty((n, K), u.dtype)
        Cbi = np.empty((n, K), u.dtype)
        xr = np.empty((n, K), u.dtype)
        xi = np.empty((n, K), u.dtype)
        hr = np.empty((n, K + 1), u.dtype)
        hi = np.empty((n, K + 1), u.dtype)
        R = K if rev else 0  # reversed chunks in walking order, as in _fwd_real
        rb = np.empty((5, R), u.dtype)
        ub, db, dAb, zb, yb = rb[0], rb[1], rb[2], rb[3], rb[4]
        first, last = (2, 1) if rev else (1, 2)
        bB = bi if Br.shape[0] > 1 else 0
        bC = bi if Cr.shape[0] > 1 else 0
        for ch in range(blocks[blk, 0], blocks[blk, 1]):
            gB = ch // (d // Br.shape[1])
            gC = ch // (d // Cr.shape[1])
            for ci in range(nseg):
                c = nseg - 1 - ci if rev else ci
                t0, T, sq, fl = seg[c, 0], seg[c, 1], bi * nseq + seg[c, 2], seg[c, 3]
                if fl & first:  # a sequence begins: restart from its initial state
                    for k in range(n):
                        hr[k, 0] = h0r[sq, ch, k]
                        hi[k, 0] = h0i[sq, ch, k]
                if save:
                    for k in range(n):
                        ckr[bi, ch, c, k] = hr[k, 0]
                        cki[bi, ch, c, k] = hi[k, 0]
                uc = _take(u[bi, ch], t0, T, rev, ub)
                dc = _take(delta[bi, ch], t0, T, rev, db)
                dAc = _take(dA_in[bi, ch], t0, T, rev, dAb) if has_dA else dc
                zc = _take(z[bi, ch], t0, T, rev, zb) if has_z else uc
                _chunk_cplx(
                    uc, dc, dAc, Ar[ch], Ai[ch], Br[bB, gB], Bi[bB, gB], Cr[bC, gC],
                    Ci[bC, gC], t0, tsB, tsC, rev, D[ch], bias[ch], disc, softplus, has_dA, T,
                    raw, dt, s, ar, ai, gr, gi, Bbr, Bbi, Cbr, Cbi, xr, xi, hr, hi, w,
                )
                yc = _out(y[bi, ch], t0, T, rev, yb)
                _gate_forward(zc, has_z, T, w, yc)
                if rev:
                    _put(yc, y[bi, ch], t0, T)
                for k in range(n):
                    hr[k, 0] = hr[k, T]
                    hi[k, 0] = hi[k, T]
                if fl & last:  # a sequence ends: its final state
                    for k in range(n):
                        hlr[sq, ch, k] = hr[k, 0]
                        hli[sq, ch, k] = hi[k, 0]

    @numba.njit(**_HELPER)
    def _bwd_cplx(
        task,
        u, delta, Ar, Ai, Br, Bi, Cr, Ci, D, z, bias, dA_in, disc, softplus, has_z, has_dA, K,
        rev, blocks, seg, per_B, per_C, ckr, cki, dout, dhr, dhi,
        du, ddelta, dz, ddA, dAr, dAi, dBr, dBi, dCr, dCi, dDp, dbp, dh0r, dh0i,
    ):  # pragma: no cover - compiled
        """One task: batch element task // len(blocks), channels blocks[task % len(blocks)];
        segments as in :func:`_bwd_real`."""
        b, d, L = u.shape
        n = Ar.shape[1]
        nblk = blocks.shape[0]
        nseg = seg.shape[0]
        nseq = dhr.shape[0] // b
        one = u.dtype.type(1.0)
        half = u.dtype.type(0.5)
        two = u.dtype.type(2.0)
        zero = u.dtype.type(0.0)
        tsB = 1 if Br.shape[3] > 1 else 0
        tsC = 1 if Cr.shape[3] > 1 else 0
        bi = task // nblk
        blk = task % nblk
        raw = np.empty(K, u.dtype)
        dt = np.empty(K, u.dtype)
        s = np.empty(K, u.dtype)
        w = np.empty(K, u.dtype)
        dy = np.empty(K, u.dtype)
        du_j = np.empty(K, u.dtype)
        ddt = np.empty(K, u.dtype)
        ds = np.empty(K, u.dtype)
        ar = np.empty((n, K), u.dtype)
        ai = np.empty((n, K), u.dtype)
        gr = np.empty((n, K), u.dtype)
        gi = np.empty((n, K), u.dtype)
        Bbr = np.empty((n, K), u.dtype)
        Bbi = np.empty((n, K), u.dtype)
        Cbr = np.empty((n, K), u.dtype)
        Cbi = np.empty((n, K), u.dtype)
        xr = np.empty((n, K), u.dtype)
        xi = np.empty((n, K), u.dtype)
        Gr = np.empty((n, K), u.dtype)
        Gi = np.empty((n, K), u.dtype)
        hr = np.empty((n, K + 1), u.dtype)
        hi = np.empty((n, K + 1), u.dtype)
        cr = np.empty(n, u.dtype)
        ci = np.empty(n, u.dtype)
        accr = np.empty(n, u.dtype)
        acci = np.empty(n, u.dtype)
        R = K if rev else 0  # reversed chunks in walking order, as in _bwd_real
        rb = np.empty((9, R), u.dtype)
        ub, db, dAb, zb, dob = rb[0], rb[1], rb[2], rb[3], rb[4]
        dzb, dub, ddb, ddAb = rb[5], rb[6], rb[7], rb[8]
        dBbr = np.empty((n, R), u.dtype)
        dBbi = np.empty((n, R), u.dtype)
        dCbr = np.empty((n, R), u.dtype)
        dCbi = np.empty((n, R), u.dtype)
        first, last = (2, 1) if rev else (1, 2)
        bB = bi if Br.shape[0] > 1 else 0
        bC = bi if Cr.shape[0] > 1 else 0
        for ch in range(blocks[blk, 0], blocks[blk, 1]):
            gB = ch // (d // Br.shape[1])
            gC = ch // (d // Cr.shape[1])
            Brv, Biv, Crv, Civ = Br[bB, gB], Bi[bB, gB], Cr[bC, gC], Ci[bC, gC]
            dBrv = dBr[bi, ch if per_B else blk]
            dBiv = dBi[bi, ch if per_B else blk]
            dCrv = dCr[bi, ch if per_C else blk]
            dCiv = dCi[bi, ch if per_C else blk]
            Arc, Aic = Ar[ch], Ai[ch]
            Dc = D[ch]
            for k in range(n):
                cr[k] = zero
                ci[k] = zero
                accr[k] = zero
                acci[k] = zero
            dD = zero
            dbias = zero
            for cw in range(nseg):
                c = cw if rev else nseg - 1 - cw
                t0, T, sq, fl = seg[c, 0], seg[c, 1], bi * nseq + seg[c, 2], seg[c, 3]
                if fl & last:  # a sequence ends here: nothing arrives from the next one
                    for k in range(n):
                        cr[k] = dhr[sq, ch, k]
                        ci[k] = dhi[sq, ch, k]
                for k in range(n):
                    hr[k, 0] = ckr[bi, ch, c, k]
                    hi[k, 0] = cki[bi, ch, c, k]
                uc = _take(u[bi, ch], t0, T, rev, ub)
                dc = _take(delta[bi, ch], t0, T, rev, db)
                dAc = _take(dA_in[bi, ch], t0, T, rev, dAb) if has_dA else dc
                zc = _take(z[bi, ch], t0, T, rev, zb) if has_z else uc
                dzc = _out(dz[bi, ch], t0, T, rev, dzb) if has_z else dc
                # dB, dC of time-varying B, C: this chunk's rows in walking order under rev
                dBrt = dBbr if rev and tsB else dBrv
                dBit = dBbi if rev and tsB else dBiv
                dCrt = dCbr if rev and tsC else dCrv
                dCit = dCbi if rev and tsC else dCiv
                tb = 0 if rev else t0
                if rev and tsB:
                    _zero_rows(dBbr, T)
                    _zero_rows(dBbi, T)
                if rev and tsC:
                    _zero_rows(dCbr, T)
                    _zero_rows(dCbi, T)
                _chunk_cplx(
                    uc, dc, dAc, Arc, Aic, Brv, Biv, Crv, Civ, t0, tsB, tsC, rev, Dc, bias[ch],
                    disc, softplus, has_dA, T, raw, dt, s, ar, ai, gr, gi, Bbr, Bbi, Cbr,
                    Cbi, xr, xi, hr, hi, w,
                )
                dD += _gate_backward(
                    uc, zc, _take(dout[bi, ch], t0, T, rev, dob), dzc, Dc, has_z, T, w, dy, du_j
                )
                # y = 2 Re(C h): h_t receives 2 dy_t conj(C_t);
                # G_t = 2 dy_t conj(C_t) + conj(A_bar_{t+1}) G_{t+1}
                _adjoint_cplx(ar, ai, dy, Cbr, Cbi, cr, ci, T, Gr, Gi)
                if fl & first:  # a sequence begins here: conj(A_bar) G is its h0's gradient
                    for k in range(n):
                        dh0r[sq, ch, k] = cr[k]
                        dh0i[sq, ch, k] = ci[k]
                for k in range(n):  # dC = 2 dy conj(h)
                    hrk, hik = hr[k], hi[k]
                    if tsC:
                        dCrk = dCrt[k, tb : tb + T]
                        dCik = dCit[k, tb : tb + T]
                        for j in range(T):
                            dCrk[j] += two * dy[j] * hrk[j + 1]
                            dCik[j] -= two * dy[j] * hik[j + 1]
                    else:
                        sr = zero
                        si = zero
                        for j in range(T):
                            sr += dy[j] * hrk[j + 1]
                            si += dy[j] * hik[j + 1]
                        dCrv[k, 0] += two * sr
                        dCiv[k, 0] -= two * si
                for k in range(n):  # dB = G conj(gamma_bar) u;  du += Re(G conj(gamma_bar B))
                    grk, gik, gmr, gmi, brk, bik = Gr[k], Gi[k], gr[k], gi[k], Bbr[k], Bbi[k]
                    if tsB:
                        dBrk = dBrt[k, tb : tb + T]
                        dBik = dBit[k, tb : tb + T]
                        for j in range(T):
                            pr = grk[j] * gmr[j] + gik[j] * gmi[j]
                            pi = gik[j] * gmr[j] - grk[j] * gmi[j]
                            dBrk[j] += pr * uc[j]
                            dBik[j] += pi * uc[j]
                            du_j[j] += pr * brk[j] + pi * bik[j]
                    else:
                        sr = zero
                        si = zero
                        for j in range(T):
                            pr = grk[j] * gmr[j] + gik[j] * gmi[j]
                            pi = gik[j] * gmr[j] - grk[j] * gmi[j]
                            sr += pr * uc[j]
                            si += pi * uc[j]
                            du_j[j] += pr * brk[j] + pi * bik[j]
                        dBrv[k, 0] += sr
                        dBiv[k, 0] += si
                # A_bar path: q = conj(dA_bar/dx) G conj(h_{t-1});  dA += s q, ds += Re(conj(A) q)
                for j in range(T):
                    ds[j] = zero
                    ddt[j] = zero
                for k in range(n):
                    ark, aik, grk, gik, hrk, hik = ar[k], ai[k], Gr[k], Gi[k], hr[k], hi[k]
                    Akr, Aki = Arc[k], Aic[k]
                    if disc == 2:  # dA_bar/dx = ((1 + A_bar) / 2)^2
                        for j in range(T):
                            pr = half * (one + ark[j])
                            pi = half * aik[j]
                            ark[j] = pr * pr - pi * pi
                            aik[j] = two * pr * pi
                    sr = zero
                    si = zero
                    for j in range(T):
                        vr = grk[j] * hrk[j] + gik[j] * hik[j]
                        vi = gik[j] * hrk[j] - grk[j] * hik[j]
                        qr = ark[j] * vr + aik[j] * vi
                        qi = ark[j] * vi - aik[j] * vr
                        sr += s[j] * qr
                        si += s[j] * qi
                        ds[j] += Akr * qr + Aki * qi
                    accr[k] += sr
                    acci[k] += si
                # gamma_bar path: v = G conj(B) u
                for k in range(n):
                    grk, gik, brk, bik = Gr[k], Gi[k], Bbr[k], Bbi[k]
                    gmr, gmi = gr[k], gi[k]
                    Akr, Aki = Arc[k], Aic[k]
                    sr = zero
                    si = zero
                    if disc == 0:
                        for j in range(T):
                            ddt[j] += (grk[j] * brk[j] + gik[j] * bik[j]) * uc[j]
                    elif disc == 1:
                        m = one / (Akr * Akr + Aki * Aki)
                        for j in range(T):
                            vr = (grk[j] * brk[j] + gik[j] * bik[j]) * uc[j]
                            vi = (gik[j] * brk[j] - grk[j] * bik[j]) * uc[j]
                            # exp(dt A) = 1 + A g;  dg/dA = (dt exp(dt A) - g) / A
                            er = one + Akr * gmr[j] - Aki * gmi[j]
                            ei = Akr * gmi[j] + Aki * gmr[j]
                            ddt[j] += er * vr + ei * vi
                            nr = dt[j] * er - gmr[j]
                            ni = dt[j] * ei - gmi[j]
                            pr = (nr * Akr + ni * Aki) * m
                            pi = (ni * Akr - nr * Aki) * m
                            sr += pr * vr + pi * vi
                            si += pr * vi - pi * vr
                    elif disc == 2:
                        for j in range(T):
                            vr = (grk[j] * brk[j] + gik[j] * bik[j]) * uc[j]
                            vi = (gik[j] * brk[j] - grk[j] * bik[j]) * uc[j]
                            dr = one - half * dt[j] * Akr  # inv = 1 / (1 - dt A / 2)
                            di = -half * dt[j] * Aki
                            m = one / (dr * dr + di * di)
                            pr = (dr * dr - di * di) * m * m  # inv^2
                            pi = -two * dr * di * m * m
                            ddt[j] += pr * vr + pi * vi
                            f = half * dt[j] * dt[j]
                            sr += f * (pr * vr + pi * vi)
                            si += f * (pr * vi - pi * vr)
                    accr[k] += sr
                    acci[k] += si
                duc = _out(du[bi, ch], t0, T, rev, dub)
                ddc = _out(ddelta[bi, ch], t0, T, rev, ddb)
                ddAc = _out(ddA[bi, ch], t0, T, rev, ddAb) if has_dA else dc
                dbias += _finish_steps(softplus, has_dA, T, raw, ddt, ds, du_j, duc, ddc, ddAc)
                if rev:  # the chunk's gradients back in time order
                    _put_steps(bi, ch, t0, T, has_dA, has_z, du, ddelta, ddA, dz, duc, ddc, ddAc,
                               dzc)  # fmt: skip
                    if tsB:
                        _put_rows(dBbr, dBrv, t0, T)
                        _put_rows(dBbi, dBiv, t0, T)
                    if tsC:
                        _put_rows(dCbr, dCrv, t0, T)
                        _put_rows(dCbi, dCiv, t0, T)
            for k in range(n):
                dAr[bi, ch, k] = accr[k]
                dAi[bi, ch, k] = acci[k]
            dDp[bi, ch] = dD
            dbp[bi, ch] = dbias

    # ------------------------------------------------------------------ task loops
    # One call per thread runs its share of the tasks (first, first + stride, ...): a numba
    # call unboxes every array argument (tens of microseconds for these argument lists), so
    # one call per task would cost milliseconds at small shapes with many batch elements.

    @numba.njit(**_HELPER)
    def _tasks_fwd_real(first, stride, ntasks, *args):  # pragma: no cover - compiled
        for task in range(first, ntasks, stride):
            _fwd_real(task, *args)

    @numba.njit(**_HELPER)
    def _tasks_bwd_real(first, stride, ntasks, *args):  # pragma: no cover - compiled
        for task in range(first, ntasks, stride):
            _bwd_real(task, *args)

    @numba.njit(**_HELPER)
    def _tasks_fwd_cplx(first, stride, ntasks, *args):  # pragma: no cover - compiled
        for task in range(first, ntasks, stride):
            _fwd_cplx(task, *args)

    @numba.njit(**_HELPER)
    def _tasks_bwd_cplx(first, stride, ntasks, *args):  # pragma: no cover - compiled
        for task in range(first, ntasks, stride):
            _bwd_cplx(task, *args)

    # fmt: on


# ---------------------------------------------------------------------- torch side


def _bc_layout(X: Tensor, d: int) -> Tensor:
    """B or C for the kernels, (b or 1, g, n, L or 1): (d, n) -> (1, d, n, 1)."""
    if X.dim() == 2:
        return X.reshape(1, d, X.shape[1], 1)
    return X


@functools.lru_cache(maxsize=64)  # a model calls with the same few shapes: no per-call cost
def _blocks(b: int, d: int, groups: tuple[int, ...], threads: int) -> tuple[Tensor, Tensor, int]:
    """Channel blocks (nblk, 2) that never straddle a group, their group under the finest
    grouping G (the lcm of the grouped B/C's g), and G; enough blocks for ``threads``.
    (Cached: callers only read the tensors.)"""
    G = 1
    for g in groups:
        G = G * g // math.gcd(G, g)
    per_group = d // G
    want = max(1, -(-TASKS_PER_THREAD * threads // (b * G)))
    size = -(-per_group // min(want, per_group))
    rows, owner = [], []
    for f in range(G):
        for s in range(0, per_group, size):
            rows.append((f * per_group + s, f * per_group + min(s + size, per_group)))
            owner.append(f)
    return torch.tensor(rows, dtype=torch.int64), torch.tensor(owner, dtype=torch.int64), G


def _reduce_bc(part: Tensor, shape: torch.Size, d: int, owner: Tensor, G: int) -> Tensor:
    """Sum a partial gradient of B or C back into its input's shape, (d, n) or (b, g, n, L)."""
    if len(shape) == 2:  # per-channel rows, summed over the batch
        return part.sum(0).reshape(shape)
    b, g = shape[:2]
    if g != d:  # rows are channel blocks: add each into its group
        grp = torch.div(owner, G // g, rounding_mode="floor")
        part = part.new_zeros(b, g, *part.shape[2:]).index_add_(1, grp, part)
    return part


@functools.lru_cache(maxsize=64)
def _plain_segments(L: int, K: int) -> Tensor:
    """:func:`_segments` of one sequence [0, L] (cached: the common call pays nothing)."""
    return _segments(torch.tensor([0, L], dtype=torch.int64), L, K)


def _segments(cu: Tensor, L: int, K: int) -> Tensor:
    """The pieces of time the kernels walk, (nseg, 4) int64 rows (t0, T, sequence, flags).

    Time is cut every K steps (the checkpoint interval) and at every offset of ``cu`` (S + 1,),
    the sequence boundaries ([0, L] without packing).  Flag 1: the segment begins its sequence
    (the state restarts from the sequence's initial state; backward stores the adjoint there as
    its gradient); flag 2: it ends it (the state is the sequence's final state; backward starts
    the adjoint from that state's gradient).  Zero-length sequences own no segment."""
    bounds = torch.unique(torch.cat([torch.arange(0, L, K, dtype=torch.int64), cu]))
    t0, t1 = bounds[:-1], bounds[1:]
    seq = torch.searchsorted(cu[1:].contiguous(), t0, right=True)
    flags = (t0 == cu[seq]).long() + 2 * (t1 == cu[seq + 1]).long()
    return torch.stack([t0, t1 - t0, seq, flags], 1).contiguous()


def _threads(ntasks: int, work: int) -> int:
    """Threads for a call: :func:`lrnnx.ops._numba.threads_for` (torch.get_num_threads() at
    most; one on a thread of a kernel pool), one when the work (state updates, b d L n) is
    below :data:`SERIAL_WORK`, and one per task at most."""
    return max(1, min(threads_for(work, SERIAL_WORK), ntasks))


def _run(kernel, ntasks: int, work: int, *args) -> None:
    """Run ``kernel(first, stride, ntasks, *args)`` (a task loop) on :func:`_threads` threads.

    The kernels are compiled ``nogil``; thread i of n runs tasks i, i + n, ... (tasks are
    equal slices of the work) on torch's own threads where it can
    (:func:`lrnnx.ops._numba.run_on_threads`), the calling thread being thread 0.  A first
    call compiles once: numba's compile lock makes the other threads wait for it.
    """
    run_on_threads(lambda i, n: kernel(i, n, ntasks, *args), _threads(ntasks, work))


class _Prepared:
    """Kernel-ready arrays and the layout facts forward and backward share."""

    def __init__(
        self, u, delta, A, B, C, D, z, delta_bias, deltaA, h0, softplus, disc, chunk, cu=None,
        reverse=False,
    ):  # fmt: skip
        b, d, L = u.shape
        n = A.shape[1]
        # packed sequences (b = 1): S initial and final states; otherwise one per batch row
        self.nstates = b * (1 if cu is None else cu.shape[0] - 1)
        self.seg = _plain_segments(L, int(chunk)) if cu is None else _segments(cu, L, int(chunk))
        dtype = u.dtype
        self.shape = (b, d, L, n)
        self.cplx = A.is_complex()
        self.B, self.C = _bc_layout(B, d), _bc_layout(C, d)
        self.per_B = self.B.shape[1] == d
        self.per_C = self.C.shape[1] == d
        grouped = tuple(X.shape[1] for X in (self.B, self.C) if X.shape[1] != d)
        # one block per group on one thread: fewer, longer tasks
        threads = _threads(b * d, b * d * L * n)
        self.blocks, self.owner, self.G = _blocks(b, d, grouped, threads)
        self.work = b * d * L * n
        dummy = u.new_zeros(1, 1, 1)
        self.has_z, self.has_dA = z is not None, deltaA is not None
        self.arrays = [
            as_array(u),
            as_array(delta),
            *(as_planes(A) if self.cplx else (as_array(A),)),
            *(as_planes(self.B) if self.cplx else (as_array(self.B),)),
            *(as_planes(self.C) if self.cplx else (as_array(self.C),)),
            as_array(D if D is not None else u.new_zeros(d)),
            as_array(z if z is not None else dummy),
            as_array(delta_bias if delta_bias is not None else u.new_zeros(d)),
            as_array(deltaA if deltaA is not None else dummy),
        ]
        self.h0 = h0 if h0 is not None else torch.zeros(self.nstates, d, n, dtype=A.dtype)
        # reverse: a runtime flag of the same compiled kernels (time walked last to first)
        self.flags = (
            _DISC[disc],
            bool(softplus),
            self.has_z,
            self.has_dA,
            int(chunk),
            bool(reverse),
        )
        self.dtype = dtype

    def _time_major(self) -> tuple:
        """B and C (b or 1, g, L or 1, n) for the step-by-step forward of "mamba" (tiny
        placeholders under the other rules, whose forward runs in passes)."""
        if self.flags[0] != _DISC["mamba"]:
            dummy = torch.zeros(1, 1, 1, 1, dtype=self.dtype).numpy()
            return dummy, dummy
        return as_array(self.B.transpose(2, 3)), as_array(self.C.transpose(2, 3))

    def forward(self, save: bool) -> tuple[Tensor, Tensor, Tensor]:
        b, d, L, n = self.shape
        nseg = self.seg.shape[0] if save else 0
        y = torch.empty(b, d, L, dtype=self.dtype)
        ck = torch.empty(b, d, nseg, n, dtype=self.dtype)
        # final states: the kernels write those of non-empty sequences; the rest keep h0
        contiguous = dict(memory_format=torch.contiguous_format)
        hl = self.h0.real.clone(**contiguous)
        blocks = self.blocks.numpy()
        seg = self.seg.numpy()
        ntasks = b * len(blocks)
        if not self.cplx:
            BT, CT = self._time_major()
            _run(_tasks_fwd_real, ntasks, self.work, *self.arrays, as_array(self.h0), *self.flags,
                 blocks, seg, BT, CT, y.numpy(), hl.numpy(), ck.numpy())  # fmt: skip
            return y, hl, ck
        ck_i = torch.empty_like(ck)
        hl_i = self.h0.imag.clone(**contiguous)
        _run(_tasks_fwd_cplx, ntasks, self.work, *self.arrays, *as_planes(self.h0), *self.flags, blocks, seg,
             y.numpy(), hl.numpy(), hl_i.numpy(), ck.numpy(), ck_i.numpy())  # fmt: skip
        return y, torch.complex(hl, hl_i), torch.complex(ck, ck_i)

    def reduce_bc(self, grad: Tensor, shape: torch.Size) -> Tensor:
        """The partial dB or dC of :meth:`backward` summed into B's or C's ``shape``."""
        return _reduce_bc(grad, shape, self.shape[1], self.owner, self.G)

    def backward(self, ckpt: Tensor, dy: Tensor, dh: Tensor) -> dict:
        b, d, L, n = self.shape
        nblk = self.blocks.shape[0]
        f = dict(dtype=self.dtype)
        du, ddelta = torch.empty(b, d, L, **f), torch.empty(b, d, L, **f)
        dz = torch.empty(b, d, L, **f) if self.has_z else torch.empty(1, 1, 1, **f)
        ddA = torch.empty(b, d, L, **f) if self.has_dA else torch.empty(1, 1, 1, **f)
        # partial gradients of B/C: one row per channel (shared or g = d) or per channel block
        rows_B = d if self.per_B else nblk
        rows_C = d if self.per_C else nblk
        dB = torch.zeros(b, rows_B, *self.B.shape[2:], **f)
        dC = torch.zeros(b, rows_C, *self.C.shape[2:], **f)
        dA, dD, dbias = (
            torch.empty(b, d, n, **f),
            torch.empty(b, d, **f),
            torch.empty(b, d, **f),
        )
        # the kernels write the h0 gradients of non-empty sequences; a zero-length sequence's
        # final state is its h0, so its gradient passes through
        dh = dh.to(self.h0.dtype)
        contiguous = dict(memory_format=torch.contiguous_format)
        dh0 = dh.real.clone(**contiguous)
        common = (*self.flags, self.blocks.numpy(), self.seg.numpy(), self.per_B, self.per_C)
        dy = as_array(dy.to(self.dtype))
        ntasks = b * nblk
        if not self.cplx:
            _run(_tasks_bwd_real, ntasks, self.work, *self.arrays, *common, as_array(ckpt), dy,
                 as_array(dh), du.numpy(), ddelta.numpy(), dz.numpy(),
                 ddA.numpy(), dA.numpy(), dB.numpy(), dC.numpy(), dD.numpy(), dbias.numpy(),
                 dh0.numpy())  # fmt: skip
        else:
            dA_i, dh0_i = torch.empty_like(dA), dh.imag.clone(**contiguous)
            dB_i, dC_i = torch.zeros_like(dB), torch.zeros_like(dC)
            _run(_tasks_bwd_cplx, ntasks, self.work, *self.arrays, *common, *as_planes(ckpt), dy,
                 *as_planes(dh), du.numpy(), ddelta.numpy(), dz.numpy(),
                 ddA.numpy(), dA.numpy(), dA_i.numpy(), dB.numpy(), dB_i.numpy(), dC.numpy(),
                 dC_i.numpy(), dD.numpy(), dbias.numpy(), dh0.numpy(), dh0_i.numpy())  # fmt: skip
            dA, dh0 = torch.complex(dA, dA_i), torch.complex(dh0, dh0_i)
            dB, dC = torch.complex(dB, dB_i), torch.complex(dC, dC_i)
        return dict(
            u=du,
            delta=ddelta,
            z=dz,
            deltaA=ddA,
            A=dA.sum(0),
            D=dD.sum(0),
            delta_bias=dbias.sum(0),
            h0=dh0,
            dB=dB,
            dC=dC,
        )


class SelectiveScanCPUFunction(torch.autograd.Function):
    """Fused forward with chunk-start checkpoints; fused backward recomputing chunk by chunk."""

    @staticmethod
    def forward(
        ctx, u, delta, A, B, C, D, z, delta_bias, deltaA, h0, softplus, disc, chunk, cu, reverse
    ):
        prep = _prepare(
            u, delta, A, B, C, D, z, delta_bias, deltaA, h0, softplus, disc, chunk, cu, reverse
        )
        y, h_last, ckpt = prep.forward(save=True)
        # backward prepares its views again from the saved inputs: raw views kept from here
        # would outlive a storage that is freed and allocated anew in between (FSDP frees a
        # layer's gathered parameters after its forward and gathers them again for backward;
        # the kernels then read freed memory: gradients of 1e30); saving the inputs also
        # makes autograd report in-place changes made before backward
        ctx.args = (softplus, disc, chunk, cu, reverse)
        ctx.bc_shapes = (B.shape, C.shape)
        ctx.save_for_backward(ckpt, u, delta, A, B, C, D, z, delta_bias, deltaA, h0)
        return y, h_last

    @staticmethod
    @first_order("selective_scan (cpu backend)")  # the backward kernel is not differentiable
    def backward(ctx, dy: Tensor, dh: Tensor):
        ckpt, *inputs = ctx.saved_tensors
        prep = _prepare(*inputs, *ctx.args)
        need = ctx.needs_input_grad
        grads = prep.backward(ckpt, dy, dh)
        B, C = ctx.bc_shapes
        out = [
            grads["u"],
            grads["delta"],
            grads["A"],
            prep.reduce_bc(grads["dB"], B) if need[3] else None,
            prep.reduce_bc(grads["dC"], C) if need[4] else None,
            grads["D"] if need[5] else None,
            grads["z"] if need[6] else None,
            grads["delta_bias"] if need[7] else None,
            grads["deltaA"] if need[8] else None,
            grads["h0"] if need[9] else None,
        ]
        out = [g if need[i] else None for i, g in enumerate(out)]
        return (*out, None, None, None, None, None)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    discretization: str,
    deltaA: Tensor | None,
    initial_state: Tensor | None,
    reverse: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Fused CPU selective scan; same arguments and results as the reference backend.

    Args (validated and cast to one compute dtype by :func:`lrnnx.ops.selective_scan_fn`):
        u, delta: (b, d, L).  A: (d, n) real or complex.
        B, C: (d, n) time-invariant, or (b, g, n, L) with g dividing d.
        D, delta_bias: (d,) or None.  z, deltaA: (b, d, L) or None.
        initial_state: (b, d, n) (complex when A is) or None for zeros; (S, d, n) with
            ``cu_seqlens``.
        reverse: run the recurrence from the last step to the first (each packed sequence
            from its own last step to its first); the kernels walk the chunks backwards, so no
            time-flipped copy of any input or of y is made.
        cu_seqlens: int64 offsets (S + 1,) of packed sequences (b = 1): the kernels walk time
            in segments cut at the sequence boundaries (see :func:`_segments`).

    Returns:
        y (b, d, L) and the state after the last step (b, d, n), or each sequence's (S, d, n).
        Tensors on another device go to the torch backend.
    """
    if u.device.type != "cpu":
        from lrnnx.ops.selective_scan.torch import selective_scan as torch_scan

        return torch_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, discretization,
                          deltaA, initial_state, reverse=reverse, cu_seqlens=cu_seqlens)  # fmt: skip
    if A.is_complex():  # the kernels take complex B, C and state; autograd takes Re for real ones
        B, C = B.to(A.dtype), C.to(A.dtype)
        if initial_state is not None:
            initial_state = initial_state.to(A.dtype)
    chunk = max(1, int(CHUNK))  # read at call time so tests can shrink it
    cu = None if cu_seqlens is None else cu_seqlens.to("cpu", torch.int64)
    tensors = (u, delta, A, B, C, D, z, delta_bias, deltaA, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return SelectiveScanCPUFunction.apply(
            *tensors, delta_softplus, discretization, chunk, cu, bool(reverse)
        )
    prep = _prepare(*tensors, delta_softplus, discretization, chunk, cu, bool(reverse))
    y, h_last, _ = prep.forward(save=False)
    return y, h_last


def _prepare(
    u, delta, A, B, C, D, z, delta_bias, deltaA, h0, softplus, disc, chunk, cu, reverse
):  # fmt: skip
    """The kernels for a call: Mamba's own case on channel lanes (:mod:`.cpu_lanes`), the
    general kernels of this module otherwise."""
    if cpu_lanes.usable(u, A, B, C, disc):
        b, _, L = u.shape
        K = cpu_lanes.chunk_steps(A.shape[1], chunk, u.element_size())
        seg = _plain_segments(L, K) if cu is None else _segments(cu, L, K)
        nstates = b if cu is None else cu.shape[0] - 1
        return cpu_lanes.Prepared(
            u,
            delta,
            A,
            B,
            C,
            D,
            z,
            delta_bias,
            deltaA,
            h0,
            softplus,
            K,
            seg,
            nstates,
            reverse,
            _run,
        )
    return _Prepared(u, delta, A, B, C, D, z, delta_bias, deltaA, h0, softplus, disc, chunk, cu,
                     reverse)  # fmt: skip


def warm_up(dtypes: tuple[torch.dtype, ...]) -> None:
    """Run, on tiny inputs, the kernels a call whose tensors have these dtypes runs (forward and
    backward), so that numba compiles or loads exactly those: float32 or float64, real or
    complex A (complex64 / complex128 in ``dtypes``).  Every discretization, gate and B/C form
    of one dtype shares these kernels.  Used by the background compile process
    (:func:`lrnnx.ops._numba.deferred`)."""
    real = torch.float64 if {torch.float64, torch.complex128} & set(dtypes) else torch.float32
    cplx = any(dt.is_complex for dt in dtypes)
    g = torch.Generator().manual_seed(0)

    def t(*shape: int, dtype: torch.dtype = real) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

    A = t(2, 2, dtype=real.to_complex() if cplx else real)
    # B, C shared by both channels (Mamba's case: channel lanes, for a real A), then one per
    # channel (the general kernels)
    for groups in (1, 2):
        y, h = selective_scan(
            t(1, 2, 3), t(1, 2, 3), A, t(1, groups, 2, 3), t(1, groups, 2, 3), t(2), t(1, 2, 3), t(2),
            True, "mamba", None, None,
        )  # fmt: skip
        (y.sum() + h.real.sum()).backward()
