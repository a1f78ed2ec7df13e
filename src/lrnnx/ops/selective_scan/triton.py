"""Fused CUDA selective scan in Triton, compiled just in time on first use.

Layout of the work.  One program owns one batch row and a block of BLOCK_D channels and walks
time in tiles of BLOCK_T steps; the (b, d, L, n) state never reaches global memory.  For a tile
it loads u, delta (and z, deltaA) as (BLOCK_D, BLOCK_T) tiles and B, C as (BLOCK_T, n) tiles
(or (BLOCK_D, n) when time-invariant), discretizes into (BLOCK_D, BLOCK_T, n) register tensors
A_bar and x = gamma_bar B u, runs the tile's recurrence h_t = A_bar_t h_{t-1} + x_t with
``tl.associative_scan`` under (a1, x1) then (a2, x2) = (a2 a1, a2 x1 + x2), offsets it by the
carried state, contracts with C and stores y.  The state before each tile (a checkpoint every
BLOCK_T steps, (b, d, L / BLOCK_T, n)) is kept when a gradient will be needed.

Backward walks each program's tiles in reverse.  A tile is recomputed from its checkpoint with
a scan that also yields the exclusive prefix: the scan element (a, x, p, q) = (all of the
segment, all but its last step), combined as (a2 a1, a2 x1 + x2, p2 a1, p2 x1 + q2), gives
h_t and h_{t-1} in one pass without shifting registers.  The adjoint recurrence
G_t = dy_t C_t + A_bar_{t+1} G_{t+1} is the same scan run in reverse (``reverse=True``) on
c_t = A_bar_t G_t = A_bar_t (dy_t C_t + c_{t+1}), whose exclusive part is c_{t+1}, so
G_t = dy_t C_t + c_{t+1}; c at the tile's first step is carried into the previous tile, and
after the first tile it is the gradient of ``initial_state``.  Every input's gradient then
follows element-wise from (A_bar, gamma_bar, h_{t-1}, h_t, G).  Reductions: A, D, delta_bias
and time-invariant B/C per program (summed over the batch with torch); time-varying B/C are
summed over the program's channels in registers and added into (b, g, n, L) with atomics.

Packed sequences (``cu_seqlens``, batch 1; ``PACKED``): per step, the sequence index and two
flags (1: a sequence's scan begins here, 2: one ends here) are loaded with the tile.  The scans
then carry a restart flag with each element and compose segments by *selecting* the later
one's values when it holds a restart (a segmented scan:
(f1, a1, x1) then (f2, a2, x2) = (f1 | f2, f2 ? (a2, x2) : (a2 a1, a2 x1 + x2)); the exclusive
part likewise), never by multiplying the carried state by a zero A_bar: 0 * nan = 0 * inf = nan,
so a non-finite value in one sequence would reach every later one.  Where a sequence begins,
the element is (restart, A_bar_t, x_t + A_bar_t h0_s) and a step whose segment holds a restart
ignores the carried state; where one ends, the state is stored as that sequence's final state.
Backward mirrors it: the recomputed h_{t-1} at a beginning is h0_s, the adjoint restarts there
(c_t = 0, selected: nothing flows back across the boundary), the gradient of a final state joins
the adjoint where its sequence ends, and conj(A_bar_t) G_t at a beginning is the gradient of
h0_s.  Without ``cu_seqlens`` the kernels are compiled without any of this.

``reverse`` (``REVERSE``) is native: tile c holds steps L - 1 - (c BLOCK_T + j), so the kernels
walk time from the last step to the first (forward, and backward from the first to the last)
with the same in-register scans, and no flipped copy of any input is made.

Complex A is processed as (re, im) register planes; gradients follow PyTorch's convention
(grad_w = dL/dRe w + i dL/dIm w), so they match autograd through the torch backend.
Everything is computed in float32: float64 inputs (and states wider than 256) go to the torch
backend, as do tensors on other devices.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import Tensor

from lrnnx.core.autograd import first_order
from lrnnx.ops.linear_scan.packing import step_layout
from lrnnx.ops.selective_scan.torch import selective_scan as _torch_scan

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # the dispatcher then falls back to the torch backend
    HAVE_TRITON = False

__all__ = ["selective_scan", "is_available"]

#: largest state size n handled by the kernels (register tiles grow with n)
MAX_STATE = 256

_DISC = {"mamba": 0, "zoh": 1, "bilinear": 2, "dirac": 3}


#: the kernels were built for Triton's interpreter, which runs them on CPU tensors with numpy:
#: ``TRITON_INTERPRET=1`` was set when this module was imported (``triton.jit`` reads it then)
INTERPRET = HAVE_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_available() -> bool:
    return HAVE_TRITON and (torch.cuda.is_available() or INTERPRET)


if HAVE_TRITON:
    # ------------------------------------------------------------------ elementary functions
    # written with tl primitives only (no libdevice), so they also run under TRITON_INTERPRET

    @triton.jit
    def _sigmoid(x):
        return 1.0 / (1.0 + tl.exp(-x))

    @triton.jit
    def _softplus(x):
        # log(1 + e^x) = max(x, 0) + log1p(v), v = e^-|x| in (0, 1], with
        # log1p(v) = 2 atanh(q), q = v / (2 + v) <= 1/3: the odd series to q^15 is exact to 1e-9
        v = tl.exp(-tl.abs(x))
        q = v / (2.0 + v)
        q2 = q * q
        p = 1.0 / 15.0
        p = p * q2 + 1.0 / 13.0
        p = p * q2 + 1.0 / 11.0
        p = p * q2 + 1.0 / 9.0
        p = p * q2 + 1.0 / 7.0
        p = p * q2 + 1.0 / 5.0
        p = p * q2 + 1.0 / 3.0
        p = p * q2 + 1.0
        return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + 2.0 * q * p)  # torch's threshold

    @triton.jit
    def _expm1(x):
        # Taylor series to x^8 where exp(x) - 1 would cancel (|x| < 1/2: relative error < 1e-8)
        p = 1.0 / 40320.0
        p = p * x + 1.0 / 5040.0
        p = p * x + 1.0 / 720.0
        p = p * x + 1.0 / 120.0
        p = p * x + 1.0 / 24.0
        p = p * x + 1.0 / 6.0
        p = p * x + 0.5
        p = (p * x + 1.0) * x
        return tl.where(tl.abs(x) < 0.5, p, tl.exp(x) - 1.0)

    @triton.jit
    def _sincos(x):
        # reduce to [-pi, pi] first (2 pi split in two parts, the first exact in 8 bits), so the
        # result is accurate whether tl.sin/tl.cos lower to hardware approximations or not
        k = tl.floor(x * 0.15915494309189535 + 0.5)
        r = x - k * 6.28125
        r = r - k * 1.9353071795864769e-3
        return tl.sin(r), tl.cos(r)

    # ------------------------------------------------------------------ scan operators

    @triton.jit
    def _combine(a1, x1, a2, x2):
        return a2 * a1, a2 * x1 + x2

    @triton.jit
    def _combine_ex(a1, x1, p1, q1, a2, x2, p2, q2):
        # (whole segment, segment without its last step): the second part is the exclusive scan
        return a2 * a1, a2 * x1 + x2, p2 * a1, p2 * x1 + q2

    @triton.jit
    def _combine_c(ar1, ai1, xr1, xi1, ar2, ai2, xr2, xi2):
        return (
            ar2 * ar1 - ai2 * ai1,
            ar2 * ai1 + ai2 * ar1,
            ar2 * xr1 - ai2 * xi1 + xr2,
            ar2 * xi1 + ai2 * xr1 + xi2,
        )

    @triton.jit
    def _combine_ex_c(
        ar1, ai1, xr1, xi1, pr1, pi1, qr1, qi1, ar2, ai2, xr2, xi2, pr2, pi2, qr2, qi2
    ):  # fmt: skip
        return (
            ar2 * ar1 - ai2 * ai1,
            ar2 * ai1 + ai2 * ar1,
            ar2 * xr1 - ai2 * xi1 + xr2,
            ar2 * xi1 + ai2 * xr1 + xi2,
            pr2 * ar1 - pi2 * ai1,
            pr2 * ai1 + pi2 * ar1,
            pr2 * xr1 - pi2 * xi1 + qr2,
            pr2 * xi1 + pi2 * xr1 + qi2,
        )

    @triton.jit
    def _combine_seg(f1, a1, x1, f2, a2, x2):
        # segmented: a later segment holding a restart keeps its own values (selected)
        r = f2 != 0
        return f1 | f2, tl.where(r, a2, a2 * a1), tl.where(r, x2, a2 * x1 + x2)

    @triton.jit
    def _combine_ex_seg(f1, a1, x1, g1, p1, q1, f2, a2, x2, g2, p2, q2):
        # segmented _combine_ex: (f, a, x) the whole segment, (g, p, q) it without its last step
        r = f2 != 0
        e = g2 != 0
        return (
            f1 | f2, tl.where(r, a2, a2 * a1), tl.where(r, x2, a2 * x1 + x2),
            f1 | g2, tl.where(e, p2, p2 * a1), tl.where(e, q2, p2 * x1 + q2),
        )  # fmt: skip

    @triton.jit
    def _combine_seg_c(f1, ar1, ai1, xr1, xi1, f2, ar2, ai2, xr2, xi2):
        ar, ai, xr, xi = _combine_c(ar1, ai1, xr1, xi1, ar2, ai2, xr2, xi2)
        r = f2 != 0
        return (
            f1 | f2, tl.where(r, ar2, ar), tl.where(r, ai2, ai),
            tl.where(r, xr2, xr), tl.where(r, xi2, xi),
        )  # fmt: skip

    @triton.jit
    def _combine_ex_seg_c(
        f1, ar1, ai1, xr1, xi1, g1, pr1, pi1, qr1, qi1,
        f2, ar2, ai2, xr2, xi2, g2, pr2, pi2, qr2, qi2,
    ):  # fmt: skip
        f, ar, ai, xr, xi = _combine_seg_c(f1, ar1, ai1, xr1, xi1, f2, ar2, ai2, xr2, xi2)
        _, pr, pi, qr, qi = _combine_seg_c(f1, ar1, ai1, xr1, xi1, g2, pr2, pi2, qr2, qi2)
        return f, ar, ai, xr, xi, f1 | g2, pr, pi, qr, qi

    # ------------------------------------------------------------------ shared tile pieces

    @triton.jit
    def _tile_steps(c, tt, L, BLOCK_T: tl.constexpr, REVERSE: tl.constexpr):
        """The steps of the c-th tile in processing order and their mask (reversed time: from
        the last step down; masked lanes point at step 0)."""
        pos = c * BLOCK_T + tt
        tmask = pos < L
        if REVERSE:
            t = tl.where(tmask, L - 1 - pos, 0)
        else:
            t = pos
        return t, tmask

    @triton.jit
    def _flags3(beg3, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
        """The restart flags (1, T, 1) as an int32 (D, T, N) scan operand."""
        return tl.where(beg3, 1, 0) + tl.zeros([BLOCK_D, BLOCK_T, BLOCK_N], dtype=tl.int32)

    @triton.jit
    def _steps(DELTA, DLA, off2, m2, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
               HAS_DA: tl.constexpr):  # fmt: skip
        """raw = delta + bias, dt = softplus(raw) or raw, s = deltaA or dt: (BLOCK_D, BLOCK_T)."""
        raw = tl.load(DELTA + off2, mask=m2, other=0.0)
        if HAS_BIAS:
            raw = raw + bias[:, None]
        if SOFTPLUS:
            dt = _softplus(raw)
        else:
            dt = raw
        if HAS_DA:
            s = tl.load(DLA + off2, mask=m2, other=0.0)
        else:
            s = dt
        return raw, dt, s

    @triton.jit
    def _disc_real(A3, s3, dt3, DISC: tl.constexpr):
        """A_bar (D, T, N) and gamma_bar (D, T, N) or (D, T, 1) for real A (D, 1, N)."""
        if DISC == 2:  # bilinear
            xa = 0.5 * s3 * A3
            a = (1.0 + xa) / (1.0 - xa)
            gam = dt3 / (1.0 - 0.5 * dt3 * A3)
        else:
            a = tl.exp(s3 * A3)
            if DISC == 0:  # mamba: gamma_bar = delta
                gam = dt3
            elif DISC == 1:  # zoh
                gam = _expm1(dt3 * A3) / A3
            else:  # dirac
                gam = dt3 * 0.0 + 1.0
        return a, gam

    @triton.jit
    def _disc_cplx(Ar, Ai, s3, dt3, DISC: tl.constexpr):
        """(re, im) of A_bar and gamma_bar for complex A (D, 1, N)."""
        if DISC == 2:  # bilinear: (1 + x) / (1 - x), x = s A / 2; gamma = dt / (1 - dt A / 2)
            xr = 0.5 * s3 * Ar
            xi = 0.5 * s3 * Ai
            den = (1.0 - xr) * (1.0 - xr) + xi * xi
            ar = (1.0 - xr * xr - xi * xi) / den
            ai = 2.0 * xi / den
            yr = 0.5 * dt3 * Ar
            yi = 0.5 * dt3 * Ai
            den2 = (1.0 - yr) * (1.0 - yr) + yi * yi
            gr = dt3 * (1.0 - yr) / den2
            gi = dt3 * yi / den2
        else:
            e = tl.exp(s3 * Ar)
            sn, cs = _sincos(s3 * Ai)
            ar = e * cs
            ai = e * sn
            if DISC == 0:
                gr = dt3
                gi = dt3 * 0.0
            elif DISC == 1:  # (exp(z) - 1) / A with a cancellation-free complex expm1
                em1 = _expm1(dt3 * Ar)
                sn2, cs2 = _sincos(dt3 * Ai)
                sh, _ = _sincos(0.5 * dt3 * Ai)
                er = em1 * cs2 - 2.0 * sh * sh
                ei = (em1 + 1.0) * sn2
                m = 1.0 / (Ar * Ar + Ai * Ai)
                gr = (er * Ar + ei * Ai) * m
                gi = (ei * Ar - er * Ai) * m
            else:
                gr = dt3 * 0.0 + 1.0
                gi = dt3 * 0.0
        return ar, ai, gr, gi

    @triton.jit
    def _load_bc(X, pb, d0, dd, dmask, t, tmask, kk, nmask, n, L, gs, ng,
                 VAR: tl.constexpr, UNIF: tl.constexpr):  # fmt: skip
        """B or C of the tile, broadcastable to (D, T, N).

        VAR: (b, g, n, L), channel i reads group i // gs; UNIF when the whole channel block lies
        in one group (a (T, N) tile).  Otherwise time-invariant (d, n).
        """
        if VAR:
            if UNIF:
                grp = d0 // gs
                off = ((pb * ng + grp) * n + kk[None, :]) * L + t[:, None]
                v = tl.load(X + off, mask=tmask[:, None] & nmask[None, :], other=0.0)[None, :, :]
            else:
                grp = (dd // gs)[:, None, None]
                off = ((pb * ng + grp) * n + kk[None, None, :]) * L + t[None, :, None]
                m = dmask[:, None, None] & tmask[None, :, None] & nmask[None, None, :]
                v = tl.load(X + off, mask=m, other=0.0)
        else:
            off = dd[:, None] * n + kk[None, :]
            v = tl.load(X + off, mask=dmask[:, None] & nmask[None, :], other=0.0)[:, None, :]
        return v

    @triton.jit
    def _add_bc(DX, val, pb, d0, dd, dmask, t, tmask, kk, nmask, n, L, gs, ng,
                UNIF: tl.constexpr):  # fmt: skip
        """Add a tile's gradient of a time-varying B or C (D, T, N) into (b, g, n, L)."""
        if UNIF:  # one group: sum the block's channels first, one atomic per (t, k)
            grp = d0 // gs
            off = ((pb * ng + grp) * n + kk[None, :]) * L + t[:, None]
            m = tmask[:, None] & nmask[None, :]
            tl.atomic_add(DX + off, tl.sum(val, 0), mask=m, sem="relaxed")
        else:
            grp = (dd // gs)[:, None, None]
            off = ((pb * ng + grp) * n + kk[None, None, :]) * L + t[None, :, None]
            m = dmask[:, None, None] & tmask[None, :, None] & nmask[None, None, :]
            tl.atomic_add(DX + off, val, mask=m, sem="relaxed")

    @triton.jit
    def _row(x, tt, j):
        """Row j of a (D, T, N) tile as (D, N)."""
        return tl.sum(tl.where((tt == j)[None, :, None], x, 0.0), 1)

    # ------------------------------------------------------------------ forward

    @triton.jit
    def _fwd_kernel(
        U, DELTA, AR, AI, BR, BI, CR, CI, DV, Z, BIAS, DLA, H0R, H0I, SEQ, FLG,
        Y, HLR, HLI, CKR, CKI,
        d, L, n, nck, gsB, ngB, gsC, ngC,
        DISC: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_DA: tl.constexpr, HAS_H0: tl.constexpr,
        IS_COMPLEX: tl.constexpr, B_VAR: tl.constexpr, B_UNIF: tl.constexpr,
        C_VAR: tl.constexpr, C_UNIF: tl.constexpr, SAVE: tl.constexpr,
        PACKED: tl.constexpr, H0_SEQ: tl.constexpr, REVERSE: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        pb = tl.program_id(0).to(tl.int64)
        d0 = tl.program_id(1) * BLOCK_D
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < d
        kk = tl.arange(0, BLOCK_N)
        nmask = kk < n
        tt = tl.arange(0, BLOCK_T)
        mdn = dmask[:, None] & nmask[None, :]
        # padded states get A = -1, B = C = 0 and a zero start: they stay zero
        offA = dd[:, None] * n + kk[None, :]
        Ar = tl.load(AR + offA, mask=mdn, other=-1.0)[:, None, :]
        if IS_COMPLEX:
            Ai = tl.load(AI + offA, mask=mdn, other=0.0)[:, None, :]
        if HAS_D:
            Dv = tl.load(DV + dd, mask=dmask, other=0.0)
        if HAS_BIAS:
            bias = tl.load(BIAS + dd, mask=dmask, other=0.0)
        else:
            bias = tl.zeros([BLOCK_D], dtype=tl.float32)
        offS = (pb * d + dd)[:, None] * n + kk[None, :]  # (b, d, n) tensors
        offK = ((pb * d + dd)[:, None] * nck) * n + kk[None, :]  # checkpoint c at + c * n
        if HAS_H0:
            hr = tl.load(H0R + offS, mask=mdn, other=0.0)
        else:
            hr = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        if IS_COMPLEX:
            if HAS_H0:
                hi = tl.load(H0I + offS, mask=mdn, other=0.0)
            else:
                hi = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        row = (pb * d + dd) * L
        for c in range(0, nck):
            t, tmask = _tile_steps(c, tt, L, BLOCK_T, REVERSE)
            m2 = dmask[:, None] & tmask[None, :]
            off2 = row[:, None] + t[None, :]
            if SAVE:
                tl.store(CKR + offK + c * n, hr, mask=mdn)
                if IS_COMPLEX:
                    tl.store(CKI + offK + c * n, hi, mask=mdn)
            u = tl.load(U + off2, mask=m2, other=0.0)
            raw, dt, s = _steps(DELTA, DLA, off2, m2, bias, HAS_BIAS, SOFTPLUS, HAS_DA)
            u3 = u[:, :, None]
            s3 = s[:, :, None]
            dt3 = dt[:, :, None]
            tm3 = tmask[None, :, None]
            if PACKED:  # where sequences begin and end, and (S, d, n) offsets of their states
                sq = tl.load(SEQ + t, mask=tmask, other=0).to(tl.int64)
                fl = tl.load(FLG + t, mask=tmask, other=0)
                mq = dmask[:, None, None] & tm3 & nmask[None, None, :]
                beg3 = ((fl & 1) != 0)[None, :, None]
                end3 = ((fl & 2) != 0)[None, :, None]
                offQ = (sq[None, :, None] * d + dd[:, None, None]) * n + kk[None, None, :]
            Br = _load_bc(BR, pb, d0, dd, dmask, t, tmask, kk, nmask, n, L, gsB, ngB, B_VAR, B_UNIF)
            Cr = _load_bc(CR, pb, d0, dd, dmask, t, tmask, kk, nmask, n, L, gsC, ngC, C_VAR, C_UNIF)
            if IS_COMPLEX:
                Bi = _load_bc(BI, pb, d0, dd, dmask, t, tmask, kk, nmask, n, L, gsB, ngB,
                              B_VAR, B_UNIF)  # fmt: skip
                Ci = _load_bc(CI, pb, d0, dd, dmask, t, tmask, kk, nmask, n, L, gsC, ngC,
                              C_VAR, C_UNIF)  # fmt: skip
                ar, ai, gr, gi = _disc_cplx(Ar, Ai, s3, dt3, DISC)
                xr = (gr * Br - gi * Bi) * u3
                xi = (gr * Bi + gi * Br) * u3
                # padding steps are the identity, so the tile's last row is the carry
                ar = tl.where(tm3, ar, 1.0)
                ai = tl.where(tm3, ai, 0.0)
                xr = tl.where(tm3, xr, 0.0)
                xi = tl.where(tm3, xi, 0.0)
                if PACKED:  # restart: the element (1, A_bar, x + A_bar h0_s) where one begins
                    if H0_SEQ:
                        qr0 = tl.load(H0R + offQ, mask=mq & beg3, other=0.0)
                        qi0 = tl.load(H0I + offQ, mask=mq & beg3, other=0.0)
                        xr = xr + ar * qr0 - ai * qi0
                        xi = xi + ar * qi0 + ai * qr0
                    f = _flags3(beg3, BLOCK_D, BLOCK_T, BLOCK_N)
                    f, ar, ai, xr, xi = tl.associative_scan((f, ar, ai, xr, xi), 1, _combine_seg_c)
                    rs = f != 0  # a restart lies between the tile start and t: no carry
                    h_r = tl.where(rs, xr, ar * hr[:, None, :] - ai * hi[:, None, :] + xr)
                    h_i = tl.where(rs, xi, ar * hi[:, None, :] + ai * hr[:, None, :] + xi)
                else:
                    ar, ai, xr, xi = tl.associative_scan((ar, ai, xr, xi), 1, _combine_c)
                    h_r = ar * hr[:, None, :] - ai * hi[:, None, :] + xr
                    h_i = ar * hi[:, None, :] + ai * hr[:, None, :] + xi
                y = 2.0 * tl.sum(Cr * h_r - Ci * h_i, 2)
                hr = _row(h_r, tt, BLOCK_T - 1)
                hi = _row(h_i, tt, BLOCK_T - 1)
                if PACKED:  # final states where sequences end
                    tl.store(HLR + offQ, h_r, mask=mq & end3)
                    tl.store(HLI + offQ, h_i, mask=mq & end3)
            else:
                a, gam = _disc_real(Ar, s3, dt3, DISC)
                x = gam * Br * u3
                a = tl.where(tm3, a, 1.0)
                x = tl.where(tm3, x, 0.0)
                if PACKED:  # restart: the element (1, A_bar, x + A_bar h0_s) where one begins
                    if H0_SEQ:
                        x = x + a * tl.load(H0R + offQ, mask=mq & beg3, other=0.0)
                    f = _flags3(beg3, BLOCK_D, BLOCK_T, BLOCK_N)
                    f, a, x = tl.associative_scan((f, a, x), 1, _combine_seg)
                    h = tl.where(f != 0, x, a * hr[:, None, :] + x)  # restarted: no carry
                else:
                    a, x = tl.associative_scan((a, x), 1, _combine)
                    h = a * hr[:, None, :] + x
                y = tl.sum(Cr * h, 2)
                hr = _row(h, tt, BLOCK_T - 1)
                if PACKED:  # final states where sequences end
                    tl.store(HLR + offQ, h, mask=mq & end3)
            if HAS_D:
                y = y + Dv[:, None] * u
            if HAS_Z:
                zt = tl.load(Z + off2, mask=m2, other=0.0)
                y = y * zt * _sigmoid(zt)
            tl.store(Y + off2, y, mask=m2)
        if not PACKED:
            tl.store(HLR + offS, hr, mask=mdn)
            if IS_COMPLEX:
                tl.store(HLI + offS, hi, mask=mdn)

    # ------------------------------------------------------------------ backward

    @triton.jit
    def _bwd_kernel(
        U, DELTA, AR, AI, BR, BI, CR, CI, DV, Z, BIAS, DLA, CKR, CKI, DOUT, DHR, DHI,
        H0R, H0I, SEQ, FLG,
        DU, DDELTA, DZ, DDLA, DAR, DAI, DBR, DBI, DCR, DCI, DDV, DBIAS, DH0R, DH0I,
        d, L, n, nck, gsB, ngB, gsC, ngC,
        DISC: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_DA: tl.constexpr, IS_COMPLEX: tl.constexpr,
        B_VAR: tl.constexpr, B_UNIF: tl.constexpr, C_VAR: tl.constexpr, C_UNIF: tl.constexpr,
        PACKED: tl.constexpr, H0_SEQ: tl.constexpr, REVERSE: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        pb = tl.program_id(0).to(tl.int64)
        d0 = tl.program_id(1) * BLOCK_D
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < d
        kk = tl.arange(0, BLOCK_N)
        nmask = kk < n
        tt = tl.arange(0, BLOCK_T)
        mdn = dmask[:, None] & nmask[None, :]
        offA = dd[:, None] * n + kk[None, :]
        Ar = tl.load(AR + offA, mask=mdn, other=-1.0)[:, None, :]
        if IS_COMPLEX:
            Ai = tl.load(AI + offA, mask=mdn, other=0.0)[:, None, :]
        if HAS_D:
            Dv = tl.load(DV + dd, mask=dmask, other=0.0)
        if HAS_BIAS:
            bias = tl.load(BIAS + dd, mask=dmask, other=0.0)
        else:
            bias = tl.zeros([BLOCK_D], dtype=tl.float32)
        offS = (pb * d + dd)[:, None] * n + kk[None, :]
        offK = ((pb * d + dd)[:, None] * nck) * n + kk[None, :]
        # c = A_bar_{t} G_{t} at the step after the current tile; at the end: d(last state)
        # (packed: each final state's gradient joins where its sequence ends)
        zero_dn = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        if PACKED:
            cr = zero_dn
            ci = zero_dn
        else:
            cr = tl.load(DHR + offS, mask=mdn, other=0.0)
            if IS_COMPLEX:
                ci = tl.load(DHI + offS, mask=mdn, other=0.0)
        dAr = zero_dn
        dAi = zero_dn
        dBr_s = zero_dn  # time-invariant B/C: summed over time here
        dBi_s = zero_dn
        dCr_s = zero_dn
        dCi_s = zero_dn
        dD_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        ones3 = tl.full([BLOCK_D, BLOCK_T, BLOCK_N], 1.0, tl.float32)
        zeros3 = tl.zeros([BLOCK_D, BLOCK_T, BLOCK_N], dtype=tl.float32)
        nof3 = tl.zeros([BLOCK_D, BLOCK_T, BLOCK_N], dtype=tl.int32)  # no restart
        row = (pb * d + dd) * L
        for it in range(0, nck):
            c = nck - 1 - it
            t, tmask = _tile_steps(c, tt, L, BLOCK_T, REVERSE)
            m2 = dmask[:, None] & tmask[None, :]
            off2 = row[:, None] + t[None, :]
            tm3 = tmask[None, :, None]
            m3 = dmask[:, None, None] & tm3 & nmask[None, None, :]
            u = tl.load(U + off2, mask=m2, other=0.0)
            dout = tl.load(DOUT + off2, mask=m2, other=0.0)
            if PACKED:  # where sequences begin and end, and (S, d, n) offsets of their states
                sq = tl.load(SEQ + t, mask=tmask, other=0).to(tl.int64)
                fl = tl.load(FLG + t, mask=tmask, other=0)
                beg3 = ((fl & 1) != 0)[None, :, None]
                end3 = ((fl & 2) != 0)[None, :, None]
                offQ = (sq[None, :, None] * d + dd[:, None, None]) * n + kk[None, None, :]
            raw, dt, s = _steps(DELTA, DLA, off2, m2, bias, HAS_BIAS, SOFTPLUS, HAS_DA)
            u3 = u[:, :, None]
            s3 = s[:, :, None]
            dt3 = dt[:, :, None]
            Br = _load_bc(BR, pb, d0, dd, dmask, t, tmask, kk, nmask, n, L, gsB, ngB, B_VAR, B_UNIF)
            Cr = _load_bc(CR, pb, d0, dd, dmask, t, tmask, kk, nmask, n, L, gsC, ngC, C_VAR, C_UNIF)
            h0r = tl.load(CKR + offK + c * n, mask=mdn, other=0.0)
            if IS_COMPLEX:
                Bi = _load_bc(BI, pb, d0, dd, dmask, t, tmask, kk, nmask, n, L, gsB, ngB,
                              B_VAR, B_UNIF)  # fmt: skip
                Ci = _load_bc(CI, pb, d0, dd, dmask, t, tmask, kk, nmask, n, L, gsC, ngC,
                              C_VAR, C_UNIF)  # fmt: skip
                h0i = tl.load(CKI + offK + c * n, mask=mdn, other=0.0)
                ar, ai, gr, gi = _disc_cplx(Ar, Ai, s3, dt3, DISC)
                ar = tl.where(tm3, ar, 1.0)
                ai = tl.where(tm3, ai, 0.0)
                bgr = gr * Br - gi * Bi  # gamma_bar B
                bgi = gr * Bi + gi * Br
                xr = tl.where(tm3, bgr * u3, 0.0)
                xi = tl.where(tm3, bgi * u3, 0.0)
                # recompute: exclusive part -> h_{t-1}; h_t = A_bar h_{t-1} + x
                if PACKED:  # restart where a sequence begins: h_{t-1} is its h0
                    if H0_SEQ:
                        qr0 = tl.load(H0R + offQ, mask=m3 & beg3, other=0.0)
                        qi0 = tl.load(H0I + offQ, mask=m3 & beg3, other=0.0)
                    else:
                        qr0 = zeros3
                        qi0 = zeros3
                    f = _flags3(beg3, BLOCK_D, BLOCK_T, BLOCK_N)
                    xr_s = xr + ar * qr0 - ai * qi0
                    xi_s = xi + ar * qi0 + ai * qr0
                    _, _, _, _, _, rs, pr, pi, qr, qi = tl.associative_scan(
                        (f, ar, ai, xr_s, xi_s, nof3, ones3, zeros3, zeros3, zeros3),
                        1, _combine_ex_seg_c,
                    )  # fmt: skip
                    rs = rs != 0  # a restart before t in the tile: h_{t-1} carries nothing in
                    hpr = tl.where(rs, qr, pr * h0r[:, None, :] - pi * h0i[:, None, :] + qr)
                    hpi = tl.where(rs, qi, pr * h0i[:, None, :] + pi * h0r[:, None, :] + qi)
                    hpr = tl.where(beg3, qr0, hpr)
                    hpi = tl.where(beg3, qi0, hpi)
                else:
                    _, _, _, _, pr, pi, qr, qi = tl.associative_scan(
                        (ar, ai, xr, xi, ones3, zeros3, zeros3, zeros3), 1, _combine_ex_c
                    )
                    hpr = pr * h0r[:, None, :] - pi * h0i[:, None, :] + qr
                    hpi = pr * h0i[:, None, :] + pi * h0r[:, None, :] + qi
                h_r = ar * hpr - ai * hpi + xr
                h_i = ar * hpi + ai * hpr + xi
                w = 2.0 * tl.sum(Cr * h_r - Ci * h_i, 2)
            else:
                a, gam = _disc_real(Ar, s3, dt3, DISC)
                a = tl.where(tm3, a, 1.0)
                x = tl.where(tm3, gam * Br * u3, 0.0)
                if PACKED:  # restart where a sequence begins: h_{t-1} is its h0
                    if H0_SEQ:
                        qr0 = tl.load(H0R + offQ, mask=m3 & beg3, other=0.0)
                    else:
                        qr0 = zeros3
                    f = _flags3(beg3, BLOCK_D, BLOCK_T, BLOCK_N)
                    _, _, _, rs, p, q = tl.associative_scan(
                        (f, a, x + a * qr0, nof3, ones3, zeros3), 1, _combine_ex_seg
                    )
                    # a restart before t in the tile: h_{t-1} carries nothing in
                    hp = tl.where(rs != 0, q, p * h0r[:, None, :] + q)
                    hp = tl.where(beg3, qr0, hp)
                else:
                    _, _, p, q = tl.associative_scan((a, x, ones3, zeros3), 1, _combine_ex)
                    hp = p * h0r[:, None, :] + q
                h = a * hp + x
                w = tl.sum(Cr * h, 2)
            # gate: out = (y + D u) silu(z)
            if HAS_D:
                w = w + Dv[:, None] * u
            if HAS_Z:
                zt = tl.load(Z + off2, mask=m2, other=0.0)
                sg = _sigmoid(zt)
                tl.store(DZ + off2, dout * w * sg * (1.0 + zt * (1.0 - sg)), mask=m2)
                dy = dout * zt * sg
            else:
                dy = dout
            dy = tl.where(m2, dy, 0.0)
            du = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
            if HAS_D:
                dD_acc += tl.sum(dy * u, 1)
                du = dy * Dv[:, None]
            dy3 = dy[:, :, None]
            if IS_COMPLEX:
                # adjoint: G_t = 2 dy_t conj(C_t) + conj(A_bar_{t+1}) G_{t+1}
                btr = 2.0 * dy3 * Cr
                bti = -2.0 * dy3 * Ci
                if PACKED:  # a final state's gradient joins where its sequence ends
                    btr += tl.load(DHR + offQ, mask=m3 & end3, other=0.0)
                    bti += tl.load(DHI + offQ, mask=m3 & end3, other=0.0)
                car = ar  # conj(A_bar)
                cai = -ai
                cxr = car * btr - cai * bti
                cxi = car * bti + cai * btr
                if PACKED:
                    # the adjoint restarts where a sequence begins: c_t = 0, selected
                    cxr = tl.where(beg3, 0.0, cxr)
                    cxi = tl.where(beg3, 0.0, cxi)
                    _, _, _, _, _, rs, pr, pi, qr, qi = tl.associative_scan(
                        (f, car, cai, cxr, cxi, nof3, ones3, zeros3, zeros3, zeros3),
                        1, _combine_ex_seg_c, reverse=True,
                    )  # fmt: skip
                    rs = rs != 0  # a restart after t in the tile: nothing from the next one
                    Gr = btr + tl.where(rs, qr, pr * cr[:, None, :] - pi * ci[:, None, :] + qr)
                    Gi = bti + tl.where(rs, qi, pr * ci[:, None, :] + pi * cr[:, None, :] + qi)
                else:
                    _, _, _, _, pr, pi, qr, qi = tl.associative_scan(
                        (car, cai, cxr, cxi, ones3, zeros3, zeros3, zeros3),
                        1, _combine_ex_c, reverse=True,
                    )  # fmt: skip
                    Gr = btr + pr * cr[:, None, :] - pi * ci[:, None, :] + qr
                    Gi = bti + pr * ci[:, None, :] + pi * cr[:, None, :] + qi
                Gr = tl.where(m3, Gr, 0.0)
                Gi = tl.where(m3, Gi, 0.0)
                cnr = car * Gr - cai * Gi  # c_t = conj(A_bar_t) G_t, carried to the tile before
                cni = car * Gi + cai * Gr
                if PACKED:
                    cnr = tl.where(beg3, 0.0, cnr)
                    cni = tl.where(beg3, 0.0, cni)
                cr = _row(cnr, tt, 0)
                ci = _row(cni, tt, 0)
                if PACKED:  # the gradient of h0_s: conj(A_bar) G where sequence s begins
                    tl.store(DH0R + offQ, ar * Gr + ai * Gi, mask=m3 & beg3)
                    tl.store(DH0I + offQ, ar * Gi - ai * Gr, mask=m3 & beg3)
                # C: 2 dy conj(h)
                vr = 2.0 * dy3 * h_r
                vi = -2.0 * dy3 * h_i
                if C_VAR:
                    _add_bc(DCR, vr, pb, d0, dd, dmask, t, tmask, kk, nmask, n, L, gsC, ngC, C_UNIF)
                    _add_bc(DCI, vi, pb, d0, dd, dmask, t, tmask, kk, nmask, n, L, gsC, ngC, C_UNIF)
                else:
                    dCr_s += tl.sum(vr, 1)
                    dCi_s += tl.sum(vi, 1)
                # B: G conj(gamma_bar) u;  u: Re(G conj(gamma_bar B))
                vr = (Gr * gr + Gi * gi) * u3
                vi = (Gi * gr - Gr * gi) * u3
                if B_VAR:
                    _add_bc(DBR, vr, pb, d0, dd, dmask, t, tmask, kk, nmask, n, L, gsB, ngB, B_UNIF)
                    _add_bc(DBI, vi, pb, d0, dd, dmask, t, tmask, kk, nmask, n, L, gsB, ngB, B_UNIF)
                else:
                    dBr_s += tl.sum(vr, 1)
                    dBi_s += tl.sum(vi, 1)
                du += tl.sum(Gr * bgr + Gi * bgi, 2)
                # A_bar path: v = G conj(h_{t-1}); q = conj(f'(x)) v with x = s A
                vr = Gr * hpr + Gi * hpi
                vi = Gi * hpr - Gr * hpi
                if DISC == 2:  # f' = ((1 + A_bar) / 2)^2
                    fr0 = 0.5 * (1.0 + ar)
                    fi0 = 0.5 * ai
                    fr = fr0 * fr0 - fi0 * fi0
                    fi = 2.0 * fr0 * fi0
                else:  # f' = A_bar
                    fr = ar
                    fi = ai
                qr = fr * vr + fi * vi
                qi = fr * vi - fi * vr
                ds = tl.sum(Ar * qr + Ai * qi, 2)  # Re(conj(A) q)
                dAr += tl.sum(s3 * qr, 1)
                dAi += tl.sum(s3 * qi, 1)
                # gamma_bar path: v = G conj(B) u
                vr = (Gr * Br + Gi * Bi) * u3
                vi = (Gi * Br - Gr * Bi) * u3
                if DISC == 0:
                    ddt = tl.sum(vr, 2)
                elif DISC == 1:  # d/ddt = e = exp(dt A); d/dA = (dt e - gamma_bar) / A
                    ee = tl.exp(dt3 * Ar)
                    sn, cs = _sincos(dt3 * Ai)
                    er = ee * cs
                    ei = ee * sn
                    ddt = tl.sum(er * vr + ei * vi, 2)
                    nr = dt3 * er - gr
                    ni = dt3 * ei - gi
                    m = 1.0 / (Ar * Ar + Ai * Ai)
                    pr = (nr * Ar + ni * Ai) * m
                    pi = (ni * Ar - nr * Ai) * m
                    dAr += tl.sum(pr * vr + pi * vi, 1)
                    dAi += tl.sum(pr * vi - pi * vr, 1)
                elif DISC == 2:  # d/ddt = inv^2; d/dA = dt^2 / 2 inv^2, inv = 1 / (1 - dt A / 2)
                    dr = 1.0 - 0.5 * dt3 * Ar
                    di = -0.5 * dt3 * Ai
                    m = 1.0 / (dr * dr + di * di)
                    ir = dr * m
                    ii = -di * m
                    pr = ir * ir - ii * ii
                    pi = 2.0 * ir * ii
                    ddt = tl.sum(pr * vr + pi * vi, 2)
                    f = 0.5 * dt3 * dt3
                    dAr += tl.sum(f * (pr * vr + pi * vi), 1)
                    dAi += tl.sum(f * (pr * vi - pi * vr), 1)
                else:
                    ddt = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
            else:
                # adjoint: G_t = dy_t C_t + A_bar_{t+1} G_{t+1}, via c_t = A_bar_t G_t
                bt = dy3 * Cr
                if PACKED:
                    # a final state's gradient joins where its sequence ends
                    bt += tl.load(DHR + offQ, mask=m3 & end3, other=0.0)
                    # the adjoint restarts where a sequence begins: c_t = 0, selected
                    _, _, _, rs, p, q = tl.associative_scan(
                        (f, a, tl.where(beg3, 0.0, a * bt), nof3, ones3, zeros3),
                        1, _combine_ex_seg, reverse=True,
                    )  # fmt: skip
                    # a restart after t in the tile: nothing arrives from the next one
                    G = tl.where(m3, bt + tl.where(rs != 0, q, p * cr[:, None, :] + q), 0.0)
                    cr = _row(tl.where(beg3, 0.0, a * G), tt, 0)
                else:
                    _, _, p, q = tl.associative_scan(
                        (a, a * bt, ones3, zeros3), 1, _combine_ex, reverse=True
                    )
                    G = tl.where(m3, bt + p * cr[:, None, :] + q, 0.0)
                    cr = _row(a * G, tt, 0)
                if PACKED:  # the gradient of h0_s: A_bar G where sequence s begins
                    tl.store(DH0R + offQ, a * G, mask=m3 & beg3)
                v = dy3 * h
                if C_VAR:
                    _add_bc(DCR, v, pb, d0, dd, dmask, t, tmask, kk, nmask, n, L, gsC, ngC, C_UNIF)
                else:
                    dCr_s += tl.sum(v, 1)
                v = G * gam * u3
                if B_VAR:
                    _add_bc(DBR, v, pb, d0, dd, dmask, t, tmask, kk, nmask, n, L, gsB, ngB, B_UNIF)
                else:
                    dBr_s += tl.sum(v, 1)
                du += tl.sum(G * gam * Br, 2)
                # A_bar path: q = dA_bar/dx G h_{t-1}, x = s A
                if DISC == 2:
                    f = 0.5 * (1.0 + a)
                    qa = f * f * G * hp
                else:
                    qa = a * G * hp
                ds = tl.sum(qa * Ar, 2)
                dAr += tl.sum(s3 * qa, 1)
                # gamma_bar path: v = G B u
                v = G * Br * u3
                if DISC == 0:
                    ddt = tl.sum(v, 2)
                elif DISC == 1:  # d/ddt = exp(dt A); d/dA = (dt e - gamma_bar) / A
                    ee = tl.exp(dt3 * Ar)
                    ddt = tl.sum(ee * v, 2)
                    dAr += tl.sum((dt3 * ee - gam) / Ar * v, 1)
                elif DISC == 2:  # d/ddt = inv^2; d/dA = dt^2 / 2 inv^2
                    inv = 1.0 / (1.0 - 0.5 * dt3 * Ar)
                    i2 = inv * inv
                    ddt = tl.sum(i2 * v, 2)
                    dAr += tl.sum(0.5 * dt3 * dt3 * i2 * v, 1)
                else:
                    ddt = tl.zeros([BLOCK_D, BLOCK_T], dtype=tl.float32)
            # route the step gradients: deltaA takes the A_bar path, delta' the rest
            if HAS_DA:
                tl.store(DDLA + off2, ds, mask=m2)
                tot = ddt
            else:
                tot = ddt + ds
            if SOFTPLUS:
                tot = tl.where(raw > 20.0, tot, tot * _sigmoid(raw))
            tot = tl.where(m2, tot, 0.0)
            tl.store(DDELTA + off2, tot, mask=m2)
            db_acc += tl.sum(tot, 1)
            tl.store(DU + off2, du, mask=m2)
        offP = (pb * d + dd)[:, None] * n + kk[None, :]
        if not PACKED:
            tl.store(DH0R + offP, cr, mask=mdn)
        tl.store(DAR + offP, dAr, mask=mdn)
        if not B_VAR:
            tl.store(DBR + offP, dBr_s, mask=mdn)
        if not C_VAR:
            tl.store(DCR + offP, dCr_s, mask=mdn)
        if IS_COMPLEX:
            if not PACKED:
                tl.store(DH0I + offP, ci, mask=mdn)
            tl.store(DAI + offP, dAi, mask=mdn)
            if not B_VAR:
                tl.store(DBI + offP, dBi_s, mask=mdn)
            if not C_VAR:
                tl.store(DCI + offP, dCi_s, mask=mdn)
        tl.store(DDV + pb * d + dd, dD_acc, mask=dmask)
        tl.store(DBIAS + pb * d + dd, db_acc, mask=dmask)


# ---------------------------------------------------------------------- torch side


def _pow2(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":  # TRITON_INTERPRET runs on CPU tensors
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


class _Plan:
    """Tile sizes and kernel-ready tensors shared by forward and backward."""

    def __init__(
        self, u, delta, A, B, C, D, z, delta_bias, deltaA, h0, softplus, disc, cu=None,
        reverse=False,
    ):  # fmt: skip
        b, d, L = u.shape
        n = A.shape[1]
        self.shape = (b, d, L, n)
        self.reverse = bool(reverse)  # the kernels walk time backwards (REVERSE)
        # packed sequences (b = 1): per step its sequence and flags (1: begins, 2: ends)
        self.packed = cu is not None
        self.nstates = b if cu is None else cu.shape[0] - 1
        if self.packed:
            seq, begins, ends = step_layout(cu, reverse=self.reverse)
            self.seq = seq.to(device=u.device, dtype=torch.int32)
            self.flg = (begins.int() + 2 * ends.int()).to(u.device)
        self.cplx = A.is_complex()
        self.BLOCK_N = max(2, _pow2(n))
        # time tile = checkpoint interval; shorter for wide states so the tiles stay in registers
        self.BLOCK_T = max(4, min(32, 2048 // self.BLOCK_N))
        self.nck = triton.cdiv(L, self.BLOCK_T)
        sms = _sm_count(u.device)
        # register budget (elements of one (D, T, N) tile): backward keeps about twice as many
        # tiles live as forward, complex twice as many as real
        per = self.BLOCK_T * self.BLOCK_N
        self.bd_fwd = self._block_d((2048 if self.cplx else 4096) // per, b, d, sms)
        self.bd_bwd = self._block_d((1024 if self.cplx else 2048) // per, b, d, sms)
        self.B_shape, self.C_shape = B.shape, C.shape

        def planes(X):
            if X.is_complex():
                return X.real.contiguous(), X.imag.contiguous()
            X = X.contiguous()
            return X, X

        self.u = u.contiguous()
        self.delta = delta.contiguous()
        self.A = planes(A)
        self.B = planes(B)
        self.C = planes(C)
        dummy = self.u
        self.D = D.contiguous() if D is not None else dummy
        self.z = z.contiguous() if z is not None else dummy
        self.bias = delta_bias.contiguous() if delta_bias is not None else dummy
        self.deltaA = deltaA.contiguous() if deltaA is not None else dummy
        self.h0 = planes(h0) if h0 is not None else (dummy, dummy)
        if not self.packed:
            self.seq = self.flg = dummy
        self.flags = dict(
            DISC=_DISC[disc],
            SOFTPLUS=bool(softplus),
            HAS_D=D is not None,
            HAS_Z=z is not None,
            HAS_BIAS=delta_bias is not None,
            HAS_DA=deltaA is not None,
            IS_COMPLEX=self.cplx,
        )
        self.has_h0 = h0 is not None
        self.pack_flags = dict(PACKED=self.packed, H0_SEQ=self.packed and self.has_h0)
        # (b, g, n, L) B/C: channels per group and group count; (d, n): unused
        self.bc = []
        for X in (B, C):
            g = X.shape[1] if X.dim() == 4 else 1
            self.bc += [d // g, g]

    @staticmethod
    def _block_d(budget: int, b: int, d: int, sms: int) -> int:
        bd = max(1, min(64, budget, _pow2(d)))
        # narrower channel blocks when the grid would leave multiprocessors idle
        while bd > 1 and b * triton.cdiv(d, bd) < 2 * sms:
            bd //= 2
        return bd

    def _var_flags(self, bd: int) -> dict:
        gsB, _, gsC, _ = self.bc
        B_var, C_var = len(self.B_shape) == 4, len(self.C_shape) == 4
        return dict(
            B_VAR=B_var, B_UNIF=B_var and gsB % bd == 0, C_VAR=C_var, C_UNIF=C_var and gsC % bd == 0
        )

    def forward(self, save: bool) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        b, d, L, n = self.shape
        f32 = dict(dtype=torch.float32, device=self.u.device)
        y = torch.empty(b, d, L, **f32)
        if not self.packed:
            hl = (torch.empty(b, d, n, **f32), torch.empty(b, d, n, **f32) if self.cplx else y)
        elif self.has_h0:  # the kernel writes the final states of non-empty sequences
            hl = (self.h0[0].clone(), self.h0[1].clone() if self.cplx else y)
        else:
            zeros = [torch.zeros(self.nstates, d, n, **f32) for _ in range(2 if self.cplx else 1)]
            hl = (zeros[0], zeros[-1] if self.cplx else y)
        if save:
            ck = (torch.empty(b, d, self.nck, n, **f32),)
            ck = (ck[0], torch.empty_like(ck[0]) if self.cplx else ck[0])
        else:
            ck = (y, y)
        bd = self.bd_fwd
        grid = (b, triton.cdiv(d, bd))
        _fwd_kernel[grid](
            self.u, self.delta, *self.A, *self.B, *self.C, self.D, self.z, self.bias,
            self.deltaA, *self.h0, self.seq, self.flg, y, *hl, *ck,
            d, L, n, self.nck, *self.bc,
            **self.flags, **self._var_flags(bd), **self.pack_flags,
            HAS_H0=self.has_h0 and not self.packed, SAVE=save, REVERSE=self.reverse,
            BLOCK_D=bd, BLOCK_T=self.BLOCK_T, BLOCK_N=self.BLOCK_N, num_warps=4,
        )  # fmt: skip
        h_last = torch.complex(*hl) if self.cplx else hl[0]
        return y, h_last, (ck if save else None)

    def backward(self, ck: tuple[Tensor, Tensor], dout: Tensor, dh: Tensor) -> dict:
        b, d, L, n = self.shape
        f32 = dict(dtype=torch.float32, device=self.u.device)
        dout = dout.to(torch.float32).contiguous()
        dh = dh.to(torch.complex64 if self.cplx else torch.float32)
        dh = (dh.real.contiguous(), dh.imag.contiguous()) if self.cplx else (dh.contiguous(),) * 2
        cp = 2 if self.cplx else 1

        def buf(*shape, zero=False):
            make = torch.zeros if zero else torch.empty
            planes_ = [make(*shape, **f32) for _ in range(cp)]
            return (planes_[0], planes_[-1])

        du = torch.empty(b, d, L, **f32)
        ddelta = torch.empty(b, d, L, **f32)
        dz = torch.empty(b, d, L, **f32) if self.flags["HAS_Z"] else du
        ddA = torch.empty(b, d, L, **f32) if self.flags["HAS_DA"] else du
        dA = buf(b, d, n)
        # time-varying B/C: atomics into a zeroed (b, g, n, L); time-invariant: (b, d, n) rows
        dB = buf(*self.B_shape, zero=True) if len(self.B_shape) == 4 else buf(b, d, n)
        dC = buf(*self.C_shape, zero=True) if len(self.C_shape) == 4 else buf(b, d, n)
        dD = torch.empty(b, d, **f32)
        dbias = torch.empty(b, d, **f32)
        if self.packed:  # the kernel writes those of non-empty sequences; the rest pass dh
            dh0 = (dh[0].clone(), dh[1].clone())
        else:
            dh0 = buf(b, d, n)
        bd = self.bd_bwd
        grid = (b, triton.cdiv(d, bd))
        _bwd_kernel[grid](
            self.u, self.delta, *self.A, *self.B, *self.C, self.D, self.z, self.bias,
            self.deltaA, *ck, dout, *dh, *self.h0, self.seq, self.flg,
            du, ddelta, dz, ddA, *dA, *dB, *dC, dD, dbias, *dh0,
            d, L, n, self.nck, *self.bc,
            **self.flags, **self._var_flags(bd), **self.pack_flags, REVERSE=self.reverse,
            BLOCK_D=bd, BLOCK_T=self.BLOCK_T, BLOCK_N=self.BLOCK_N, num_warps=4,
        )  # fmt: skip

        def join(p):
            return torch.complex(*p) if self.cplx else p[0]

        dB, dC = join(dB), join(dC)
        return dict(
            u=du,
            delta=ddelta,
            A=join(dA).sum(0),
            B=dB if len(self.B_shape) == 4 else dB.sum(0),
            C=dC if len(self.C_shape) == 4 else dC.sum(0),
            D=dD.sum(0),
            z=dz,
            delta_bias=dbias.sum(0),
            deltaA=ddA,
            initial_state=join(dh0),
        )


_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "deltaA", "initial_state")


class SelectiveScanTritonFunction(torch.autograd.Function):
    """Fused forward with a state checkpoint per time tile; fused backward recomputing tiles."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, deltaA, h0, softplus, disc, cu, reverse):
        plan = _Plan(u, delta, A, B, C, D, z, delta_bias, deltaA, h0, softplus, disc, cu, reverse)
        y, h_last, ck = plan.forward(save=True)
        ctx.plan = plan  # kernel-ready views of the inputs
        # the inputs are saved too, so autograd reports in-place changes made before backward
        ctx.save_for_backward(*ck, u, delta, A, B, C, D, z, delta_bias, deltaA, h0)
        return y, h_last

    @staticmethod
    @first_order("selective_scan (triton backend)")  # the kernel is not differentiable
    def backward(ctx, dy: Tensor, dh: Tensor):
        ck = ctx.saved_tensors[:2]
        grads = ctx.plan.backward(ck, dy, dh)
        needs = ctx.needs_input_grad[: len(_NAMES)]
        out = [grads[k] if need else None for k, need in zip(_NAMES, needs, strict=True)]
        return (*out, None, None, None, None)


def _supported(u: Tensor, A: Tensor) -> bool:
    return (
        HAVE_TRITON
        and (u.device.type == "cuda" or (u.device.type == "cpu" and INTERPRET))
        and u.dtype == torch.float32
        and A.dtype in (torch.float32, torch.complex64)
        and A.shape[1] <= MAX_STATE
    )


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
    """Fused CUDA selective scan; same arguments and results as the reference backend.

    Args (validated and cast to one compute dtype by :func:`lrnnx.ops.selective_scan_fn`):
        u, delta: (b, d, L).  A: (d, n) real or complex.
        B, C: (d, n) time-invariant, or (b, g, n, L) with g dividing d.
        D, delta_bias: (d,) or None.  z, deltaA: (b, d, L) or None.
        initial_state: (b, d, n) (complex when A is) or None for zeros; (S, d, n) with
            ``cu_seqlens``; h_L with ``reverse``.
        reverse: run from the last step to the first (h_t = A_bar_t h_{t+1} + ...), natively:
            the kernels walk time backwards, no input is flipped.
        cu_seqlens: int64 offsets (S + 1,) of packed sequences (b = 1): the kernels restart
            the scan where each sequence begins (see the module's docstring).

    Returns:
        y (b, d, L) and the state after the last step (b, d, n), or each sequence's (S, d, n).
        Float64 inputs, states wider than :data:`MAX_STATE` and tensors off CUDA go to the
        torch backend (CPU tensors run the kernels under ``TRITON_INTERPRET=1``).
    """
    if not _supported(u, A):
        return _torch_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, discretization,
                           deltaA, initial_state, reverse, cu_seqlens)  # fmt: skip
    return _run(u, delta, A, B, C, D, z, delta_bias, delta_softplus, discretization, deltaA,
                initial_state, cu_seqlens, reverse)  # fmt: skip


def _run(
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, discretization, deltaA, h0, cu=None,
    reverse=False,
):  # fmt: skip
    """The kernels without the device check (the tests drive them under TRITON_INTERPRET)."""
    if A.is_complex():  # the kernels take complex B, C and state; autograd takes Re for real ones
        B, C = B.to(A.dtype), C.to(A.dtype)
        if h0 is not None:
            h0 = h0.to(A.dtype)
    if cu is not None:
        cu = cu.to("cpu", torch.int64)
    tensors = (u, delta, A, B, C, D, z, delta_bias, deltaA, h0)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return SelectiveScanTritonFunction.apply(
            *tensors, delta_softplus, discretization, cu, bool(reverse)
        )
    plan = _Plan(*tensors, delta_softplus, discretization, cu, bool(reverse))
    y, h_last, _ = plan.forward(save=False)
    return y, h_last
