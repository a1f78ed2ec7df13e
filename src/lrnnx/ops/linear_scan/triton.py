"""Fused CUDA linear scan in Triton, compiled just in time on first use.

Each program owns one batch row and a block of channels and walks time in tiles of BLOCK_T
steps: a tile of (a, b) is loaded with coalesced accesses along the contiguous channel axis,
scanned in registers with ``tl.associative_scan`` under the composition
(a1, b1) then (a2, b2) = (a2 a1, a2 b1 + b2), offset by the carried state and stored.  Complex
inputs are processed as contiguous (re, im) pairs split in registers.  The autograd wiring
(backward = the same kernel run the other way) is shared with the torch backend.

Restarts (packed sequences, ``RESETS``): a per-step flag is loaded with the tile and scanned
along, (f1, a1, b1) then (f2, a2, b2) = (f1 | f2, f2 ? (a2, b2) : (a2 a1, a2 b1 + b2)), and a
step whose segment holds a restart ignores the carried state: a select, so a nan or inf
state of one sequence never reaches the next (0 * nan would).  Without restarts the kernel is
compiled without the flags.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
from torch import Tensor

from lrnnx.ops.linear_scan.torch import LinearScanFunction
from lrnnx.ops.linear_scan.torch import linear_scan as _torch_scan

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # the dispatcher then falls back to the torch backend
    HAVE_TRITON = False

__all__ = ["linear_scan", "is_available", "scan_kernel"]


#: the kernels were built for Triton's interpreter, which runs them on CPU tensors with numpy:
#: ``TRITON_INTERPRET=1`` was set when this module was imported (``triton.jit`` reads it then)
INTERPRET = HAVE_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_available() -> bool:
    return HAVE_TRITON and (torch.cuda.is_available() or INTERPRET)


if HAVE_TRITON:

    @triton.jit
    def _combine(a1, b1, a2, b2):
        return a2 * a1, a2 * b1 + b2

    @triton.jit
    def _combine_complex(ar1, ai1, br1, bi1, ar2, ai2, br2, bi2):
        return (
            ar2 * ar1 - ai2 * ai1,
            ar2 * ai1 + ai2 * ar1,
            ar2 * br1 - ai2 * bi1 + br2,
            ar2 * bi1 + ai2 * br1 + bi2,
        )

    @triton.jit
    def _combine_seg(f1, a1, b1, f2, a2, b2):
        return f1 | f2, tl.where(f2 != 0, a2, a2 * a1), tl.where(f2 != 0, b2, a2 * b1 + b2)

    @triton.jit
    def _combine_seg_complex(f1, ar1, ai1, br1, bi1, f2, ar2, ai2, br2, bi2):
        ar, ai, br, bi = _combine_complex(ar1, ai1, br1, bi1, ar2, ai2, br2, bi2)
        r = f2 != 0
        return (
            f1 | f2,
            tl.where(r, ar2, ar),
            tl.where(r, ai2, ai),
            tl.where(r, br2, br),
            tl.where(r, bi2, bi),
        )

    @triton.jit
    def _scan_kernel(
        A, X, H0, R, OUT, L, C,
        HAS_H0: tl.constexpr, REVERSE: tl.constexpr, IS_COMPLEX: tl.constexpr,
        RESETS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        pid_b = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = cols < C
        steps = tl.arange(0, BLOCK_T)
        last = (steps == BLOCK_T - 1)[:, None]
        W: tl.constexpr = 2 if IS_COMPLEX else 1  # scalars per element
        base = pid_b.to(tl.int64) * L * C * W
        if HAS_H0:
            hr = tl.load(H0 + pid_b * C * W + cols * W, mask=cmask, other=0.0).to(tl.float32)
            if IS_COMPLEX:
                hi = tl.load(H0 + pid_b * C * W + cols * W + 1, mask=cmask, other=0.0).to(
                    tl.float32
                )
        else:
            hr = tl.zeros([BLOCK_C], dtype=tl.float32)
            if IS_COMPLEX:
                hi = tl.zeros([BLOCK_C], dtype=tl.float32)
        for k in range(0, tl.cdiv(L, BLOCK_T)):
            t = k * BLOCK_T + steps
            if REVERSE:
                t = L - 1 - t
            m = ((t >= 0) & (t < L))[:, None] & cmask[None, :]
            offs = base + (t.to(tl.int64)[:, None] * C + cols[None, :]) * W
            if RESETS:  # restart flags, broadcast over the channels (padding steps: none)
                f = tl.load(R + t, mask=(t >= 0) & (t < L), other=0).to(tl.int32)
                f = f[:, None] + tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.int32)
            # padding steps are the identity (a = 1, b = 0), so the tile's last row is the carry
            if IS_COMPLEX:
                # load (re, im) pairs as one contiguous (BLOCK_T, BLOCK_C, 2) tile, then split
                offs2 = offs[:, :, None] + tl.arange(0, 2)[None, None, :]
                m2 = m[:, :, None]
                ar, ai = tl.split(tl.load(A + offs2, mask=m2, other=0.0).to(tl.float32))
                br, bi = tl.split(tl.load(X + offs2, mask=m2, other=0.0).to(tl.float32))
                ar = tl.where(m, ar, 1.0)
                if RESETS:
                    f, ar, ai, br, bi = tl.associative_scan(
                        (f, ar, ai, br, bi), 0, _combine_seg_complex
                    )
                    outr = tl.where(f != 0, br, ar * hr[None, :] - ai * hi[None, :] + br)
                    outi = tl.where(f != 0, bi, ar * hi[None, :] + ai * hr[None, :] + bi)
                else:
                    ar, ai, br, bi = tl.associative_scan((ar, ai, br, bi), 0, _combine_complex)
                    outr = ar * hr[None, :] - ai * hi[None, :] + br
                    outi = ar * hi[None, :] + ai * hr[None, :] + bi
                tl.store(OUT + offs2, tl.join(outr, outi), mask=m2)
                hr = tl.sum(tl.where(last, outr, 0.0), axis=0)
                hi = tl.sum(tl.where(last, outi, 0.0), axis=0)
            else:
                ar = tl.load(A + offs, mask=m, other=1.0).to(tl.float32)
                br = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
                if RESETS:
                    f, ar, br = tl.associative_scan((f, ar, br), 0, _combine_seg)
                    outr = tl.where(f != 0, br, ar * hr[None, :] + br)
                else:
                    ar, br = tl.associative_scan((ar, br), 0, _combine)
                    outr = ar * hr[None, :] + br
                tl.store(OUT + offs, outr, mask=m)
                hr = tl.sum(tl.where(last, outr, 0.0), axis=0)


_FLOAT = {torch.float32: torch.float32, torch.complex64: torch.float32}


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":  # TRITON_INTERPRET runs on CPU tensors
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


@torch.no_grad()
def scan_kernel(
    a: Tensor,
    b: Tensor,
    initial_state: Optional[Tensor],
    reverse: bool,
    resets: Optional[Tensor] = None,
) -> Tensor:
    """Forward-only fused scan for CUDA tensors a, b (B, L, *C), float32 or complex64;
    ``resets`` (L,) bool: steps where the state restarts (h_t = b_t)."""
    shape = b.shape
    B, L = shape[0], shape[1]
    a3 = a.reshape(B, L, -1).contiguous()
    b3 = b.reshape(B, L, -1).contiguous()
    C = b3.shape[2]
    out = torch.empty_like(b3)
    is_complex = b.is_complex()
    view = torch.view_as_real if is_complex else (lambda t: t)
    h0 = None if initial_state is None else initial_state.reshape(B, -1).contiguous()
    flags = None if resets is None else resets.to(device=b.device, dtype=torch.int8).contiguous()
    # narrower channel blocks when the grid would leave streaming multiprocessors idle
    block_c, sms = 64, _sm_count(b.device)
    while block_c > 16 and B * triton.cdiv(C, block_c) < 4 * sms:
        block_c //= 2
    grid = (B, triton.cdiv(C, block_c))
    _scan_kernel[grid](
        view(a3), view(b3), view(h0) if h0 is not None else view(b3),
        flags if flags is not None else view(b3), view(out), L, C,
        HAS_H0=h0 is not None, REVERSE=reverse, IS_COMPLEX=is_complex, RESETS=flags is not None,
        BLOCK_T=64, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
    return out.reshape(shape)


def linear_scan(
    a: Tensor,
    b: Tensor,
    initial_state: Optional[Tensor],
    reverse: bool,
    resets: Optional[Tensor] = None,
) -> Tensor:
    """Fused CUDA scan for float32/complex64; other devices and dtypes use the torch backend
    (CPU tensors run the kernel too under ``TRITON_INTERPRET=1``, which is how the tests check it
    without a GPU).  ``resets`` (L,) bool: where the state restarts."""
    on_device = b.device.type == "cuda" or (b.device.type == "cpu" and INTERPRET)
    if not on_device or b.dtype not in _FLOAT:
        return _torch_scan(a, b, initial_state, reverse, resets)
    return LinearScanFunction.apply(a, b, initial_state, reverse, scan_kernel, resets)
