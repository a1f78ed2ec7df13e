"""CPU selective scan with channels in SIMD lanes: the kernels of Mamba's own case.

Mamba's scan ("mamba" rule, real A, B_t and C_t input-dependent and shared by a group of
channels) runs here instead of in :mod:`lrnnx.ops.selective_scan.cpu`'s kernels, whose loops
vectorise along time (backward) or along the state (forward, n = 16: two vectors and a
horizontal sum per step).  Here the vector lanes are :data:`LANES` channels of one group, so
every step's B_t[k] and C_t[k] are one number broadcast to all lanes and the recurrence
h[k] = exp(delta' A[k]) h[k] + delta' u B_t[k] is lane-wise: no horizontal sums in forward,
and in backward one per (step, state) for dB_t[k] and dC_t[k] (sums over the group's channels).

A task is one batch element and one block of at most LANES channels of one group, computed on
its width rounded up to whole vectors (:data:`lrnnx.ops._numba_math.LANE_QUANTUM`).  It walks
time in chunks of at most K steps (:func:`chunk_steps`: the backward's (K, n, LANES) buffers
stay in a core's L2), loading each chunk's u, delta, z (deltaA, dy) into (K, LANES) tiles: the
tensors may have any strides, so Mamba's (b, L, d)-ordered activations, passed as (b, d, L)
transposed views, are read where they lie and y, du, ddelta, dz are written in the same order
(no layout copies; the results keep their input's memory order).  Lanes past the block's
channels hold zeros, which stay finite through every step and add nothing to the group sums.

Forward keeps the state at each chunk start (b, chunks, n, d) when a gradient is needed.
Backward walks each block's chunks last to first: it recomputes the chunk from its checkpoint
keeping A_bar (K, n, LANES) and every state (K + 1, n, LANES), runs the gate's backward, then
the adjoint r_{t-1} = A_bar_t (dy_t C_t + r_t) step by step with every input's gradient of
the step in the same pass (the formulas of :mod:`lrnnx.ops.selective_scan.cpu`'s docstring);
the adjoint left after the first chunk is the gradient of ``initial_state``.

Time is walked in the general kernels' segments (chunks cut at packed sequences' boundaries,
where the state restarts from the sequence's own initial state); ``reverse=True`` walks them
last to first and each from its last step to its first (the tiles hold the steps in walking
order), so no time-flipped copy is made.  With ``deltaA`` (STREAM's event mode) A_bar uses that
step (one more tile) and its gradient is written as ddeltaA.  The other cases (complex A, the
other rules, B or C per channel or time-invariant, or groups narrower than :data:`MIN_GROUP`
channels) keep the general kernels; :func:`usable` decides.  Tested against the reference
backend (values, gradients, initial and final states, odd widths and groups, strided inputs,
reverse, packed sequences, deltaA).
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np
import torch
from torch import Tensor

from lrnnx.ops._numba import HAVE_NUMBA, as_array, flat_view

#: channels per task at most, one per SIMD lane: wide, so each lane loop (one per step and state)
#: runs many vectors and its fixed cost (LLVM's run-time overlap checks of the tiles, the
#: horizontal sums of backward) is spread over them (the backward's adjoint pass took 2.7 ns
#: per update and thread at 32 lanes, 0.84 at 128, on the 2-core AMD EPYC)
LANES = 128
#: the narrowest channel group (of B and C) worth a task: narrower ones leave most lanes empty
MIN_GROUP = 16
#: the L2 cache of a core assumed where the system does not describe its caches (the smallest
#: of current x86 server cores': AMD Zen 2 and Zen 3)
DEFAULT_L2_BYTES = 512 * 1024
#: backward keeps (K + 1) n LANES states and K n LANES decays per chunk; K is the largest power
#: of two whose two buffers take at most this share of a core's L2.  Measured fwd+bwd at b=64
#: d=128 L=68 n=16 and at b=2 d=1024 L=2048 on the 2-core AMD EPYC (1 MiB L2): K = 32 (54 %)
#: was 3-6 % and 9-20 % faster than K = 16, and K = 64 (buffers past the L2) slower than 32; K = 16
#: had been measured best on a 512 KiB L2 (Zen 3), which the same share gives
L2_SHARE = 0.6


def _cache_size(text: str) -> int:
    """Bytes of a sysfs cache size: "1024K", "2M", "512" (bytes)."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(text.rstrip("KMG")) * scale


@functools.cache
def l2_cache_bytes() -> int:
    """A core's L2 cache in bytes, as Linux describes cpu0's caches, else :data:`DEFAULT_L2_BYTES`
    (other systems, or a description missing or unreadable)."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in sorted(os.listdir(base)):
            path = os.path.join(base, index)
            if not index.startswith("index"):
                continue
            with open(os.path.join(path, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(path, "type")) as f:
                kind = f.read().strip()
            if level == "2" and kind in ("Unified", "Data"):
                with open(os.path.join(path, "size")) as f:
                    return _cache_size(f.read())
    except (OSError, ValueError):
        pass
    return DEFAULT_L2_BYTES


def chunk_steps(n: int, chunk: int, itemsize: int = 4) -> int:
    """Steps per chunk for state size n and ``itemsize``-byte floats: the checkpoint interval
    and backward's recompute unit, sized to a core's L2 (:data:`L2_SHARE`), at least 8 and at
    most ``chunk`` (the general kernels' interval, which tests shrink).  It changes where the
    states are checkpointed, never the results."""
    per_step = 2 * n * LANES * itemsize  # a step of the states and of the decays
    fit = max(1, int(l2_cache_bytes() * L2_SHARE) // per_step)
    return max(1, min(int(chunk), max(8, 1 << (fit.bit_length() - 1))))


def usable(u: Tensor, A: Tensor, B: Tensor, C: Tensor, disc: str) -> bool:
    """Whether a call is Mamba's case (see the module docstring)."""
    if A.is_complex() or disc != "mamba":
        return False
    d = u.shape[1]
    if B.dim() != 4 or C.dim() != 4:  # (d, n): time-invariant, per channel
        return False
    G = math.lcm(B.shape[1], C.shape[1])
    return G == 1 or d // G >= MIN_GROUP


if HAVE_NUMBA:
    import numba

    from lrnnx.ops._numba_math import _HELPER, _exp, _lane_count, _sigmoid, _softplus

    # fmt: off
    # (the kernels' long argument lists stay packed)

    # Strides: S[i] = (batch, channel, time) element strides of the i-th (b, d, L) tensor (its
    # data a flat 1-D view starting at its first element); SB = (batch, group, state, time).

    @numba.njit(**_HELPER)
    def _step_index(T, j, rev):  # pragma: no cover - compiled
        """The time offset in a chunk of walking step j: j, or T - 1 - j under ``rev``."""
        return T - 1 - j if rev else j

    @numba.njit(**_HELPER)
    def _load(flat, s, bi, c0, t0, T, W, rev, out):  # pragma: no cover - compiled
        """out[j, i] = X[bi, c0 + i, t0 + j] for j < T, i < W (t0 + T - 1 - j under ``rev``:
        rows in walking order); lanes from W on are 0.

        Read along X's contiguous dimension: a (b, d, L) X row by row (reading across rows,
        L apart, would map every row of a step to one L1 set when L is a power of two)."""
        nl = out.shape[1]  # lanes in use (a multiple of 8, at most LANES)
        sc, st = s[1], s[2]
        base = bi * s[0] + c0 * sc + t0 * st
        if sc == 1:  # channels contiguous: (b, L, d) seen as (b, d, L)
            for j in range(T):
                row = base + _step_index(T, j, rev) * st
                src, o = flat[row : row + W], out[j]
                for i in range(W):
                    o[i] = src[i]
        elif st == 1:  # time contiguous
            for i in range(W):
                src = flat[base + i * sc : base + i * sc + T]
                if rev:
                    for j in range(T):
                        out[j, i] = src[numba.uint64(T - 1 - j)]
                else:
                    for j in range(T):
                        out[j, i] = src[j]
        else:
            for j in range(T):
                row = base + _step_index(T, j, rev) * st
                for i in range(W):
                    out[j, i] = flat[numba.uint64(row + i * sc)]
        for j in range(T):
            for i in range(W, nl):
                out[j, i] = 0.0

    @numba.njit(**_HELPER)
    def _store(tile, T, W, flat, s, bi, c0, t0, rev):  # pragma: no cover - compiled
        """X[bi, c0 + i, t0 + j] = tile[j, i] for j < T, i < W (t0 + T - 1 - j under ``rev``),
        along X's contiguous dimension as :func:`_load`."""
        sc, st = s[1], s[2]
        base = bi * s[0] + c0 * sc + t0 * st
        if sc == 1:
            for j in range(T):
                row = base + _step_index(T, j, rev) * st
                dst, o = flat[row : row + W], tile[j]
                for i in range(W):
                    dst[i] = o[i]
        elif st == 1:
            for i in range(W):
                dst = flat[base + i * sc : base + i * sc + T]
                if rev:
                    for j in range(T):
                        dst[numba.uint64(T - 1 - j)] = tile[j, i]
                else:
                    for j in range(T):
                        dst[j] = tile[j, i]
        else:
            for j in range(T):
                row = base + _step_index(T, j, rev) * st
                for i in range(W):
                    flat[numba.uint64(row + i * sc)] = tile[j, i]

    @numba.njit(**_HELPER)
    def _load_bc(flat, s, bi, g, t0, T, n, rev, out):  # pragma: no cover - compiled
        """out[j, k] = X[bi, g, k, t0 + j] (t0 + T - 1 - j under ``rev``): a chunk of B or C,
        time-major, in walking order."""
        for j in range(T):
            base = bi * s[0] + g * s[1] + (t0 + _step_index(T, j, rev)) * s[3]
            for k in range(n):
                out[j, k] = flat[numba.uint64(base + k * s[2])]

    @numba.njit(**_HELPER)
    def _put_bc(rows, T, n, part, t0, rev):  # pragma: no cover - compiled
        """part[t0 + j, k] = rows[j, k] (t0 + T - 1 - j under ``rev``): a chunk's dB or dC
        rows, in walking order, back in time order."""
        for j in range(T):
            dst, src = part[t0 + _step_index(T, j, rev)], rows[j]
            for k in range(n):
                dst[k] = src[k]

    @numba.njit(**_HELPER)
    def _lanes(X, c0, W, out):  # pragma: no cover - compiled
        """out[i] = X[c0 + i] for i < W, 0 past W."""
        nl = out.shape[0]  # lanes in use (a multiple of 8, at most LANES)
        for i in range(nl):
            out[i] = X[c0 + i] if i < W else 0.0

    @numba.njit(**_HELPER)
    def _state_lanes(X, c0, W, out):  # pragma: no cover - compiled
        """out[k, i] = X[c0 + i, k] (one batch element's (d, n) state, or A), 0 past W."""
        nl, n = out.shape[1], out.shape[0]  # lanes in use (a multiple of 8, at most LANES)
        for i in range(W):  # row slices (an index c0 + i numba may wrap is read as a gather)
            row = X[c0 + i, :n]
            for k in range(n):
                out[k, i] = row[k]
        for k in range(n):
            for i in range(W, nl):
                out[k, i] = 0.0

    @numba.njit(**_HELPER)
    def _steps(RAW, U, bias, softplus, T, DT, DTU):  # pragma: no cover - compiled
        """RAW += bias (kept: the softplus gradient needs it); DT = softplus(RAW) or RAW;
        DTU = DT u (gamma_bar u under "mamba").  (Flags are tested outside the lane loops:
        a branch inside one keeps LLVM from vectorising it.)"""
        nl = RAW.shape[1]  # lanes in use (a multiple of 8, at most LANES)
        for j in range(T):
            r, dt, dtu, u = RAW[j], DT[j], DTU[j], U[j]
            for i in range(nl):
                r[i] += bias[i]
            if softplus:
                for i in range(nl):
                    dt[i] = _softplus(r[i])
            else:
                for i in range(nl):
                    dt[i] = r[i]
            for i in range(nl):
                dtu[i] = dt[i] * u[i]

    @numba.njit(**_HELPER)
    def _gate(Wt, Z, Dl, U, has_z, T, Y):  # pragma: no cover - compiled
        """Y = (w + D u) silu(z), or w + D u without z."""
        nl = Y.shape[1]  # lanes in use (a multiple of 8, at most LANES)
        for j in range(T):
            w, u, y, z = Wt[j], U[j], Y[j], Z[j]
            for i in range(nl):
                y[i] = w[i] + Dl[i] * u[i]
            if has_z:
                for i in range(nl):
                    y[i] = y[i] * z[i] * _sigmoid(z[i])

    @numba.njit(inline="always", **_HELPER)
    def _forward_chunk(h, At, SA, DTU, BT, CT, T, Wt):  # pragma: no cover - compiled
        """T steps from state h (n, LANES): h = exp(s A) h + delta' u B_t (s: the A-step,
        deltaA or delta'), Wt[j] = C_t . h (lane-wise)."""
        nl = h.shape[1]  # lanes in use (a multiple of 8, at most LANES)
        n = h.shape[0]
        for j in range(T):
            dt, dtu, w = SA[j], DTU[j], Wt[j]
            for i in range(nl):
                w[i] = 0.0
            for k in range(n):
                bk, ck = BT[j, k], CT[j, k]
                hk, ak = h[k], At[k]
                for i in range(nl):
                    v = _exp(dt[i] * ak[i]) * hk[i] + dtu[i] * bk
                    hk[i] = v
                    w[i] += ck * v

    @numba.njit(inline="always", **_HELPER)
    def _recompute_chunk(H, E, At, SA, DTU, BT, CT, T, Wt):  # pragma: no cover - compiled
        """:func:`_forward_chunk` from H[0], keeping A_bar in E[j] and the state after step j
        in H[j + 1]."""
        nl = At.shape[1]  # lanes in use (a multiple of 8, at most LANES)
        n = At.shape[0]
        for j in range(T):
            dt, dtu, w = SA[j], DTU[j], Wt[j]
            Hp, Hn, Ej = H[j], H[j + 1], E[j]
            for i in range(nl):
                w[i] = 0.0
            for k in range(n):
                bk, ck = BT[j, k], CT[j, k]
                ak, hp, hn, ek = At[k], Hp[k], Hn[k], Ej[k]
                for i in range(nl):
                    e = _exp(dt[i] * ak[i])
                    ek[i] = e
                    v = e * hp[i] + dtu[i] * bk
                    hn[i] = v
                    w[i] += ck * v

    @numba.njit(**_HELPER)
    def _gate_backward(Wt, Z, DO, U, Dl, has_z, T, DW, DZ, DU, dD):  # pragma: no cover
        """From dL/dy (DO): DW = dL/dw (w = C . h), DZ, the D path of du (DU) and dD += dw u."""
        nl = U.shape[1]  # lanes in use (a multiple of 8, at most LANES)
        one = U.dtype.type(1.0)
        for j in range(T):
            w, z, do, u, dw, dz, du = Wt[j], Z[j], DO[j], U[j], DW[j], DZ[j], DU[j]
            if has_z:
                for i in range(nl):
                    v = w[i] + Dl[i] * u[i]
                    sg = _sigmoid(z[i])
                    dz[i] = do[i] * v * sg * (one + z[i] * (one - sg))
                    dw[i] = do[i] * z[i] * sg
            else:
                for i in range(nl):
                    dw[i] = do[i]
            for i in range(nl):
                dD[i] += dw[i] * u[i]
                du[i] = dw[i] * Dl[i]

    @numba.njit(inline="always", **_HELPER)
    def _adjoint_chunk(
        R, H, E, At, SA, DTU, DW, BT, CT, T, dA, dBrow, dCrow, DSA, DUA
    ):  # pragma: no cover - compiled
        """The chunk's steps last to first.  With g = dy_t C_t + r (the state's adjoint) per
        state k: dC_t[k] = sum_l dy h_t, dB_t[k] = sum_l g delta' u, du += delta' g B_t[k],
        r = A_bar_t g (the adjoint of h_{t-1}), q = r h_{t-1}: dA[k] += s q, ds += A[k] q
        (s: the A-step, deltaA or delta').  dBrow, dCrow: the chunk's (K, n) rows in walking
        order; DSA, DUA (K, nl): each step's ds and sum_k g B_t[k], which :func:`_step_grads`
        turns into the steps' gradients.

        Only the recurrence runs step by step; the per-step lane work after it is a separate
        pass: inside the step loop it halved the loop's speed (0.51 against 0.23-0.28 ns per
        update on the 2-core AMD EPYC)."""
        nl = At.shape[1]  # lanes in use (a multiple of 8, at most LANES)
        n = At.shape[0]
        zero = DW.dtype.type(0.0)
        for jj in range(T):
            j = T - 1 - jj
            dw, dtu, sa, dsa, dua = DW[j], DTU[j], SA[j], DSA[j], DUA[j]
            Hp, Hn, Ej = H[j], H[j + 1], E[j]
            for i in range(nl):
                dsa[i] = zero
                dua[i] = zero
            for k in range(n):
                bk, ck = BT[j, k], CT[j, k]
                rk, hp, hn, ek, ak, dak = R[k], Hp[k], Hn[k], Ej[k], At[k], dA[k]
                acc_c = zero
                acc_b = zero
                for i in range(nl):
                    g = dw[i] * ck + rk[i]
                    acc_c += dw[i] * hn[i]
                    acc_b += g * dtu[i]
                    dua[i] += g * bk
                    r = ek[i] * g
                    rk[i] = r
                    q = r * hp[i]
                    dak[i] += sa[i] * q
                    dsa[i] += q * ak[i]
                dBrow[j, k] = acc_b
                dCrow[j, k] = acc_c

    @numba.njit(**_HELPER)
    def _step_grads(DT, U, RAW, DSA, DUA, softplus, has_dA, T, DU, DDA, dbias):  # pragma: no cover
        """The per-step gradients from the adjoint's sums: du += delta' DUA; d(delta') =
        u DUA (+ DSA when the A-step is delta', else DSA is deltaA's gradient, into DDA),
        through the softplus (torch's threshold: gradient 1 above 20) into ddelta (written
        over RAW) and dbias."""
        nl = U.shape[1]  # lanes in use (a multiple of 8, at most LANES)
        for j in range(T):
            du, dt, dua, dsa = DU[j], DT[j], DUA[j], DSA[j]
            for i in range(nl):
                du[i] += dt[i] * dua[i]
            u, raw = U[j], RAW[j]
            if has_dA:  # ds is deltaA's gradient; d(delta') is the input path's alone
                dda = DDA[j]
                for i in range(nl):
                    dda[i] = dsa[i]
                    dsa[i] = u[i] * dua[i]
            else:
                for i in range(nl):
                    dsa[i] += u[i] * dua[i]  # now d(delta')
            if softplus:
                for i in range(nl):
                    r = raw[i]
                    dsa[i] = dsa[i] if r > 20.0 else dsa[i] * _sigmoid(r)
            for i in range(nl):
                raw[i] = dsa[i]
                dbias[i] += dsa[i]

    @numba.njit(**_HELPER)
    def _load_chunk(
        flats, S, Bf, Cf, SB, SC, bi, c0, W, gB, gC, t0, T, rev, has_z, has_dA, bias, softplus,
        U, RAW, Z, DA, BT, CT, DT, DTU,
    ):  # pragma: no cover - compiled
        """A segment's tiles in walking order: u, delta (+ bias), z, deltaA (flats[0..3]), B_t
        and C_t; then delta' and delta' u (:func:`_steps`)."""
        _load(flats[0], S[0], bi, c0, t0, T, W, rev, U)
        _load(flats[1], S[1], bi, c0, t0, T, W, rev, RAW)
        if has_z:
            _load(flats[2], S[2], bi, c0, t0, T, W, rev, Z)
        if has_dA:
            _load(flats[3], S[3], bi, c0, t0, T, W, rev, DA)
        n = BT.shape[1]
        _load_bc(Bf, SB, bi, gB, t0, T, n, rev, BT)
        _load_bc(Cf, SC, bi, gC, t0, T, n, rev, CT)
        _steps(RAW, U, bias, softplus, T, DT, DTU)

    @numba.njit(**_HELPER)
    def _task(task, blocks):  # pragma: no cover - compiled
        """Task -> (batch element, block, first channel, width, B's group, C's group)."""
        nblk = blocks.shape[0]
        bi, blk = task // nblk, task % nblk
        c0 = blocks[blk, 0]
        return bi, blk, c0, blocks[blk, 1] - c0, blocks[blk, 2], blocks[blk, 3]

    @numba.njit(**_HELPER)
    def _fwd_task(
        task, flats, S, Bf, Cf, SB, SC, A, D, bias, h0, blocks, softplus, has_z, has_dA, K, seg,
        nseq, rev, hlast, ckpt,
    ):  # pragma: no cover - compiled
        """One task: batch element task // len(blocks), channels blocks[task % len(blocks)].
        flats = (u, delta, z, deltaA, y) flat data, S their strides.

        ``seg`` lists the pieces of time walked (rows (t0, T, sequence, flags), see
        :func:`lrnnx.ops.selective_scan.cpu._segments`, T <= K): the state restarts from the
        sequence's initial state at a segment that begins it (a select: nothing of the previous
        sequence is carried, not even a NaN) and is stored as its final state at one that ends
        it; sequence q of batch element bi has initial and final states h0[bi nseq + q],
        hlast[bi nseq + q].  Under ``rev`` the segments run last to first, each from its last
        step to its first (tiles hold steps in walking order), and a sequence begins at its
        last segment.  ckpt[c] is the state before segment c in walking order."""
        bi, blk, c0, W, gB, gC = _task(task, blocks)
        nl = _lane_count(W)
        n = A.shape[1]
        dtype = flats[0].dtype
        save = ckpt.shape[1] > 0
        h = np.zeros((n, nl), dtype)
        At = np.empty((n, nl), dtype)
        _state_lanes(A, c0, W, At)
        bl, Dl = np.empty(nl, dtype), np.empty(nl, dtype)
        _lanes(bias, c0, W, bl)
        _lanes(D, c0, W, Dl)
        # separate arrays, not slices of one: LLVM then knows they do not overlap, and
        # vectorises the lane loops without run-time overlap checks.  Not zeroed: every row a
        # chunk reads (t < T) is written first in all nl lanes (lanes past W by _load, as 0),
        # and zeroing them per task had been 13% of the backward's time at n = 1
        U, RAW, DT = np.empty((K, nl), dtype), np.empty((K, nl), dtype), np.empty((K, nl), dtype)
        DTU, Z, Y = np.empty((K, nl), dtype), np.empty((K, nl), dtype), np.empty((K, nl), dtype)
        DA = np.empty((K if has_dA else 1, nl), dtype)
        BT, CT = np.empty((K, n), dtype), np.empty((K, n), dtype)
        first, last = (2, 1) if rev else (1, 2)  # the flags of a walk's first and last segment
        nsg = seg.shape[0]
        for ci in range(nsg):
            c = nsg - 1 - ci if rev else ci
            t0, T, sq, fl = seg[c, 0], seg[c, 1], bi * nseq + seg[c, 2], seg[c, 3]
            if fl & first:  # a sequence begins: restart from its initial state
                _state_lanes(h0[sq], c0, W, h)
            if save:  # (row slices: an index c0 + i numba may wrap made these scatters)
                for k in range(n):
                    dst, src = ckpt[bi, c, k, c0 : c0 + W], h[k]
                    for i in range(W):
                        dst[i] = src[i]
            _load_chunk(flats, S, Bf, Cf, SB, SC, bi, c0, W, gB, gC, t0, T, rev, has_z, has_dA,
                        bl, softplus, U, RAW, Z, DA, BT, CT, DT, DTU)  # fmt: skip
            _forward_chunk(h, At, DA if has_dA else DT, DTU, BT, CT, T, Y)
            _gate(Y, Z, Dl, U, has_z, T, Y)
            _store(Y, T, W, flats[4], S[4], bi, c0, t0, rev)
            if fl & last:  # a sequence ends: its final state
                for i in range(W):
                    for k in range(n):
                        hlast[sq, c0 + i, k] = h[k, i]

    @numba.njit(**_HELPER)
    def _bwd_task(
        task, hbuf, ebuf, flats, S, Bf, Cf, SB, SC, A, D, bias, blocks, softplus, has_z, has_dA,
        K, seg, nseq, rev, ckpt, dhlast, dA, dD, dbias, dBp, dCp, dh0,
    ):  # pragma: no cover - compiled
        """One task, as :func:`_fwd_task`, walking its segments the other way: the adjoint
        starts from the final state's gradient at a segment that ends a sequence, and at one
        that begins it what is left is the gradient of its initial state.  flats = (u, delta,
        z, deltaA, dy, du, ddelta, dz, ddeltaA) flat data, S their strides; dBp, dCp (b, nblk, L, n): this
        block's group sums.  hbuf, ebuf: the thread's room for the chunk's states and decays."""
        dout, du, ddelta, dz, ddA = flats[4], flats[5], flats[6], flats[7], flats[8]
        bi, blk, c0, W, gB, gC = _task(task, blocks)
        nl = _lane_count(W)
        n = A.shape[1]
        dtype = flats[0].dtype
        At = np.empty((n, nl), dtype)
        R = np.zeros((n, nl), dtype)  # the adjoint arriving at the chunk's last state
        _state_lanes(A, c0, W, At)
        bl, Dl = np.empty(nl, dtype), np.empty(nl, dtype)
        _lanes(bias, c0, W, bl)
        _lanes(D, c0, W, Dl)
        # separate arrays (see _fwd_task)
        dA_k = np.zeros((n, nl), dtype)
        dD_k, db_k = np.zeros(nl, dtype), np.zeros(nl, dtype)
        DSA, DUA = np.empty((K, nl), dtype), np.empty((K, nl), dtype)  # the steps' two sums
        U, RAW, DT = np.empty((K, nl), dtype), np.empty((K, nl), dtype), np.empty((K, nl), dtype)
        DTU, Z, DO = np.empty((K, nl), dtype), np.empty((K, nl), dtype), np.empty((K, nl), dtype)
        Wt, DW = np.empty((K, nl), dtype), np.empty((K, nl), dtype)
        DU, DZ = np.empty((K, nl), dtype), np.empty((K, nl), dtype)
        DA, DDA = np.empty((K if has_dA else 1, nl), dtype), np.empty((K if has_dA else 1, nl), dtype)
        H = hbuf[: (K + 1) * n * nl].reshape((K + 1, n, nl))
        E = ebuf[: K * n * nl].reshape((K, n, nl))
        BT, CT = np.empty((K, n), dtype), np.empty((K, n), dtype)
        dBt, dCt = np.empty((K, n), dtype), np.empty((K, n), dtype)
        first, last = (2, 1) if rev else (1, 2)  # the flags of forward's first and last segment
        nsg = seg.shape[0]
        for ci in range(nsg):
            c = ci if rev else nsg - 1 - ci
            t0, T, sq, fl = seg[c, 0], seg[c, 1], bi * nseq + seg[c, 2], seg[c, 3]
            if fl & last:  # a sequence ends here: nothing arrives from the next one
                _state_lanes(dhlast[sq], c0, W, R)
            _load_chunk(flats, S, Bf, Cf, SB, SC, bi, c0, W, gB, gC, t0, T, rev, has_z, has_dA,
                        bl, softplus, U, RAW, Z, DA, BT, CT, DT, DTU)  # fmt: skip
            _load(dout, S[4], bi, c0, t0, T, W, rev, DO)
            for k in range(n):  # the chunk's first state (row slices, as in _fwd_task)
                src, dst = ckpt[bi, c, k, c0 : c0 + W], H[0, k]
                for i in range(W):
                    dst[i] = src[i]
                for i in range(W, nl):
                    dst[i] = 0.0
            SA = DA if has_dA else DT
            _recompute_chunk(H, E, At, SA, DTU, BT, CT, T, Wt)
            _gate_backward(Wt, Z, DO, U, Dl, has_z, T, DW, DZ, DU, dD_k)
            _adjoint_chunk(R, H, E, At, SA, DTU, DW, BT, CT, T, dA_k, dBt, dCt, DSA, DUA)
            _step_grads(DT, U, RAW, DSA, DUA, softplus, has_dA, T, DU, DDA, db_k)
            _put_bc(dBt, T, n, dBp[bi, blk], t0, rev)
            _put_bc(dCt, T, n, dCp[bi, blk], t0, rev)
            _store(DU, T, W, du, S[5], bi, c0, t0, rev)
            _store(RAW, T, W, ddelta, S[6], bi, c0, t0, rev)
            if has_z:
                _store(DZ, T, W, dz, S[7], bi, c0, t0, rev)
            if has_dA:
                _store(DDA, T, W, ddA, S[8], bi, c0, t0, rev)
            if fl & first:  # a sequence begins here: the adjoint left is its h0's gradient
                for i in range(W):
                    for k in range(n):
                        dh0[sq, c0 + i, k] = R[k, i]
        for i in range(W):
            for k in range(n):
                dA[bi, c0 + i, k] = dA_k[k, i]
            dD[bi, c0 + i] = dD_k[i]
            dbias[bi, c0 + i] = db_k[i]

    # one call per thread runs its share of the tasks (see cpu._run)

    @numba.njit(**_HELPER)
    def _tasks_fwd(first, stride, ntasks, *args):  # pragma: no cover - compiled
        for task in range(first, ntasks, stride):
            _fwd_task(task, *args)

    @numba.njit(**_HELPER)
    def _tasks_bwd(first, stride, ntasks, *args):  # pragma: no cover - compiled
        # the chunk's states and decays (~270 KiB at n = 16) once per thread: allocated per
        # task they were fresh pages to fault in every time
        K, n = args[13], args[6].shape[1]  # (see _bwd_task's arguments)
        hbuf = np.empty((K + 1) * n * LANES, args[0][0].dtype)
        ebuf = np.empty(K * n * LANES, args[0][0].dtype)
        for task in range(first, ntasks, stride):
            _bwd_task(task, hbuf, ebuf, *args)

    # fmt: on


# ---------------------------------------------------------------------- torch side


def _empty_like_order(X: Tensor) -> Tensor:
    """An empty (b, d, L) tensor in X's memory order: (b, L, d) storage seen as (b, d, L) when
    X's channels lie closer together than its steps (Mamba's activations), else contiguous.

    Made with its strides, not as a transposed view: autograd adds a second gradient into a
    returned du in place only when du is no view (Mamba's u also reaches x_proj), where it
    otherwise made a new tensor for the sum."""
    b, d, L = X.shape
    if d > 1 and X.stride(1) < X.stride(2):
        return torch.empty_strided((b, d, L), (L * d, 1, d), dtype=X.dtype)
    return torch.empty(b, d, L, dtype=X.dtype)


@functools.lru_cache(maxsize=64)
def _blocks(d: int, gB: int, gC: int) -> tuple:
    """Rows (c0, c1, B's group, C's group) of channel blocks of at most LANES channels that
    never straddle a group of B or C, equal widths within a group; with each block's B and C
    group as tensors (for summing the partial dB, dC)."""
    G = math.lcm(gB, gC)
    per = d // G
    count = -(-per // LANES)
    rows = []
    for f in range(G):
        for i in range(count):
            c0, c1 = f * per + per * i // count, f * per + per * (i + 1) // count
            rows.append((c0, c1, c0 // (d // gB), c0 // (d // gC)))
    blocks = np.array(rows, dtype=np.int64)
    return blocks, torch.from_numpy(blocks[:, 2].copy()), torch.from_numpy(blocks[:, 3].copy())


class Prepared:
    """Kernel-ready views for one call (forward and backward), the interface of
    :class:`lrnnx.ops.selective_scan.cpu._Prepared`."""

    def __init__(
        self, u, delta, A, B, C, D, z, delta_bias, deltaA, h0, softplus, K, seg, nstates, reverse,
        run,
    ):  # fmt: skip
        """``K``: steps per chunk (:func:`chunk_steps`); ``seg``: the segment table
        (:func:`lrnnx.ops.selective_scan.cpu._segments`, cut every K steps and at sequence
        boundaries); ``nstates``: initial and final states (b, or S packed sequences);
        ``run(kernel, ntasks, work, *args)`` runs a task loop on threads
        (:func:`lrnnx.ops.selective_scan.cpu._run`)."""
        b, d, L = u.shape
        n = A.shape[1]
        self.shape = (b, d, L, n)
        self.nstates = nstates
        self.K = K
        self.seg = seg.numpy()
        self.blocks, self.ownB, self.ownC = _blocks(d, B.shape[1], C.shape[1])
        self.ntasks = b * len(self.blocks)
        self.work = b * d * L * n
        self.run = run
        self.inputs = (u, delta, z, deltaA)
        self.has_z, self.has_dA = z is not None, deltaA is not None
        self.B, self.C = B, C
        self.A = as_array(A)
        self.D = as_array(D if D is not None else u.new_zeros(d))
        self.bias = as_array(delta_bias if delta_bias is not None else u.new_zeros(d))
        self.h0 = h0 if h0 is not None else torch.zeros(nstates, d, n, dtype=u.dtype)
        self.softplus = bool(softplus)
        self.reverse = bool(reverse)
        self.dtype = u.dtype

    def _flats(self, *tensors: Tensor) -> tuple:
        """The flat views (a tuple: numba unboxes it once) and their strides (rows of S)."""
        dummy = torch.zeros(1, 1, 1, dtype=self.dtype)
        pairs = [flat_view(t if t is not None else dummy) for t in tensors]
        return tuple(p[0] for p in pairs), np.array([p[1] for p in pairs], dtype=np.int64)

    def _bc(self) -> tuple:
        (Bf, SB), (Cf, SC) = flat_view(self.B), flat_view(self.C)
        return Bf, Cf, np.array(SB, dtype=np.int64), np.array(SC, dtype=np.int64)

    def forward(self, save: bool) -> tuple[Tensor, Tensor, Tensor]:
        """y (b, d, L) in u's memory order, the final states (b or S, d, n), checkpoints."""
        b, d, L, n = self.shape
        u, delta, z, deltaA = self.inputs
        y = _empty_like_order(u)
        ckpt = torch.empty(b, len(self.seg) if save else 0, n, d, dtype=self.dtype)
        # the kernels write the final states of non-empty sequences; the rest keep h0
        hlast = self.h0.clone(memory_format=torch.contiguous_format)
        flats, S = self._flats(u, delta, z, deltaA, y)
        self.run(_tasks_fwd, self.ntasks, self.work, flats, S, *self._bc(), self.A, self.D,
                 self.bias, as_array(self.h0), self.blocks, self.softplus, self.has_z,
                 self.has_dA, self.K, self.seg, self.nstates // b, self.reverse, hlast.numpy(),
                 ckpt.numpy())  # fmt: skip
        return y, hlast, ckpt

    def backward(self, ckpt: Tensor, dy: Tensor, dh: Tensor) -> dict:
        b, d, L, n = self.shape
        u, delta, z, deltaA = self.inputs
        f = dict(dtype=self.dtype)
        dy = dy.to(self.dtype)
        du, ddelta = _empty_like_order(u), _empty_like_order(delta)
        dz = _empty_like_order(z) if self.has_z else None
        ddA = _empty_like_order(deltaA) if self.has_dA else None
        nblk = len(self.blocks)
        dBp, dCp = torch.empty(b, nblk, L, n, **f), torch.empty(b, nblk, L, n, **f)
        dA, dD, dbias = torch.empty(b, d, n, **f), torch.empty(b, d, **f), torch.empty(b, d, **f)
        # the kernels write the h0 gradients of non-empty sequences; a zero-length sequence's
        # final state is its h0, so its gradient passes through
        dh = dh.to(self.dtype)
        dh0 = dh.clone(memory_format=torch.contiguous_format)
        flats, S = self._flats(u, delta, z, deltaA, dy, du, ddelta, dz, ddA)
        self.run(_tasks_bwd, self.ntasks, self.work, flats, S, *self._bc(), self.A, self.D,
                 self.bias, self.blocks, self.softplus, self.has_z, self.has_dA, self.K, self.seg,
                 self.nstates // b, self.reverse, as_array(ckpt), as_array(dh), dA.numpy(),
                 dD.numpy(), dbias.numpy(), dBp.numpy(), dCp.numpy(), dh0.numpy())  # fmt: skip
        return dict(
            u=du,
            delta=ddelta,
            z=dz,
            deltaA=ddA,
            A=dA.sum(0),
            D=dD.sum(0),
            delta_bias=dbias.sum(0),
            h0=dh0,
            dB=self._group_sum(dBp, self.ownB, self.B.shape[1]),
            dC=self._group_sum(dCp, self.ownC, self.C.shape[1]),
        )

    @staticmethod
    def _group_sum(part: Tensor, owner: Tensor, g: int) -> Tensor:
        """(b, nblk, L, n) block sums -> (b, g, n, L) (a transposed view of time-major data)."""
        if part.shape[1] != g:
            part = part.new_zeros(part.shape[0], g, *part.shape[2:]).index_add_(1, owner, part)
        return part.transpose(2, 3)

    def reduce_bc(self, grad: Tensor, shape: torch.Size) -> Tensor:
        return grad  # already in B's / C's shape
