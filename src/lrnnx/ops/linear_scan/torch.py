"""Chunked parallel linear scan in pure torch; runs on any device.

Forward: within chunks of ``CHUNK`` steps a Hillis-Steele doubling scan (log2(CHUNK) vectorised
passes), then the chunk-end states are scanned the same way (recursively) and folded back in.
Only multiplications and additions, so decays of any sign or phase, zero included, are exact.

Backward: the adjoint of a linear scan is the same scan run the other way,
    g_h[t] = g[t] + conj(a[t+1]) g_h[t+1],   grad_b = g_h,   grad_a[t] = g_h[t] conj(h[t-1]),
so the autograd Function saves only (a, h) and never the intermediate passes.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

CHUNK = 64

Kernel = Callable[[Tensor, Tensor, Optional[Tensor], bool], Tensor]


def _doubling(a: Tensor, b: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """In-place Hillis-Steele scan along ``dim``; returns (cumulative product of a, states)."""
    n = b.shape[dim]
    off = 1
    while off < n:
        a_hi, b_hi = a.narrow(dim, off, n - off), b.narrow(dim, off, n - off)
        a_lo, b_lo = a.narrow(dim, 0, n - off), b.narrow(dim, 0, n - off)
        b_new = torch.addcmul(b_hi, a_hi, b_lo)
        a_new = a_hi * a_lo
        b_hi.copy_(b_new)
        a_hi.copy_(a_new)
        off *= 2
    return a, b


def _scan_zero_init(a: Tensor, b: Tensor) -> Tensor:
    """States of h_t = a_t h_{t-1} + b_t from h_{-1} = 0, for a, b (B, L, C); consumes a and b."""
    B, L, C = b.shape
    if L <= CHUNK:
        return _doubling(a, b, 1)[1]
    pad = (-L) % CHUNK
    if pad:
        a = torch.cat([a, a.new_ones(B, pad, C)], 1)
        b = torch.cat([b, b.new_zeros(B, pad, C)], 1)
    nc = (L + pad) // CHUNK
    P, h = _doubling(a.view(B, nc, CHUNK, C), b.view(B, nc, CHUNK, C), 2)
    ends = _scan_zero_init(P[:, :, -1].clone(), h[:, :, -1].clone())  # state at each chunk end
    h[:, 1:] += P[:, 1:] * ends[:, :-1, None]
    return h.view(B, nc * CHUNK, C)[:, :L]


@torch.no_grad()
def scan_kernel(a: Tensor, b: Tensor, initial_state: Optional[Tensor], reverse: bool) -> Tensor:
    """Forward-only scan for a, b (B, L, *C); returns a new tensor h (B, L, *C)."""
    shape = b.shape
    B, L = shape[0], shape[1]
    a = a.reshape(B, L, -1)
    b = b.reshape(B, L, -1)
    if reverse:
        a, b = a.flip(1), b.flip(1)
    else:
        a, b = a.clone(), b.clone()
    if initial_state is not None:
        b[:, 0] += a[:, 0] * initial_state.reshape(B, -1)
    h = _scan_zero_init(a, b)
    if reverse:
        h = h.flip(1)
    return h.reshape(shape)


class LinearScanFunction(torch.autograd.Function):
    """Autograd wrapper shared by every fused backend: forward and adjoint are both scans."""

    @staticmethod
    def forward(ctx, a, b, initial_state, reverse: bool, kernel: Kernel):
        h = kernel(a, b, initial_state, reverse)
        ctx.reverse = reverse
        ctx.kernel = kernel
        ctx.has_h0 = initial_state is not None
        ctx.save_for_backward(a, h, initial_state if ctx.has_h0 else None)
        return h

    @staticmethod
    def backward(ctx, grad_h):
        a, h, h0 = ctx.saved_tensors
        reverse, kernel = ctx.reverse, ctx.kernel
        grad_h = grad_h.to(h.dtype).contiguous()
        ac = a.conj()
        # decay seen by the adjoint at t is the forward decay of the step after t
        zero = torch.zeros_like(ac[:, :1])
        if not reverse:
            a_adj = torch.cat([ac[:, 1:], zero], 1)
            prev = torch.cat(
                [(h0 if h0 is not None else torch.zeros_like(h[:, 0]))[:, None], h[:, :-1]], 1
            )
        else:
            a_adj = torch.cat([zero, ac[:, :-1]], 1)
            prev = torch.cat(
                [h[:, 1:], (h0 if h0 is not None else torch.zeros_like(h[:, 0]))[:, None]], 1
            )
        g = kernel(a_adj, grad_h, None, not reverse)
        grad_a = g * prev.conj() if ctx.needs_input_grad[0] else None
        grad_h0 = None
        if ctx.has_h0 and ctx.needs_input_grad[2]:
            grad_h0 = (ac[:, -1] * g[:, -1]) if reverse else (ac[:, 0] * g[:, 0])
        return grad_a, g, grad_h0, None, None


def linear_scan(a: Tensor, b: Tensor, initial_state: Optional[Tensor], reverse: bool) -> Tensor:
    """Chunked parallel scan with an O(output)-memory backward."""
    return LinearScanFunction.apply(a, b, initial_state, reverse, scan_kernel)
