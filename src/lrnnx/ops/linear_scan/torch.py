"""Chunked parallel linear scan in pure torch; runs on any device.

Forward: within chunks of ``CHUNK`` steps a Hillis-Steele doubling scan (log2(CHUNK) vectorised
passes), then the chunk-end states are scanned the same way (recursively) and folded back in.
Only multiplications and additions, so decays of any sign or phase, zero included, are exact.

Restarts (``resets``, packed sequences): h_t = b_t where the flag is set, whatever the state
before.  The scan then carries a flag with each element, "a restart lies in this segment",
and composes segments by *selecting* the later one's (a, b) when it holds a restart
(a segmented scan) instead of multiplying the state by a zero decay: 0 * nan and 0 * inf are nan,
so a non-finite state of one sequence would leak into every later one.

Backward: the adjoint of a linear scan is the same scan run the other way,
    g_h[t] = g[t] + conj(a[t+1]) g_h[t+1],   grad_b = g_h,   grad_a[t] = g_h[t] conj(h[t-1]),
so the autograd Function saves only (a, h) and never the intermediate passes.  A restart at
t + 1 is a restart of the adjoint at t (nothing flows back across it), and grad_a is 0 where
the forward restarted (a_t was not used there).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from lrnnx.core.autograd import first_order

CHUNK = 64

#: a backend's forward-only kernel: (a, b, initial_state, reverse, resets) -> h
Kernel = Callable[[Tensor, Tensor, Optional[Tensor], bool, Optional[Tensor]], Tensor]


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


def _doubling_segmented(a: Tensor, b: Tensor, f: Tensor, dim: int) -> tuple[Tensor, ...]:
    """:func:`_doubling` with restart flags ``f`` (bool, a's shape with size-1 channel dims):
    a segment holding a restart keeps its own (a, b).  Returns (a, states, prefix-or of f)."""
    n = b.shape[dim]
    off = 1
    while off < n:
        a_hi, b_hi, f_hi = (x.narrow(dim, off, n - off) for x in (a, b, f))
        a_lo, b_lo, f_lo = (x.narrow(dim, 0, n - off) for x in (a, b, f))
        b_new = torch.where(f_hi, b_hi, torch.addcmul(b_hi, a_hi, b_lo))
        a_new = torch.where(f_hi, a_hi, a_hi * a_lo)
        f_new = f_hi | f_lo
        b_hi.copy_(b_new)
        a_hi.copy_(a_new)
        f_hi.copy_(f_new)
        off *= 2
    return a, b, f


def _scan_zero_init(a: Tensor, b: Tensor, f: Optional[Tensor] = None) -> Tensor:
    """States of h_t = a_t h_{t-1} + b_t from h_{-1} = 0 (h_t = b_t where the restart flag
    ``f`` (B, L, 1) is set), for a, b (B, L, C); consumes a, b and f."""
    B, L, C = b.shape
    if L <= CHUNK:
        return _doubling(a, b, 1)[1] if f is None else _doubling_segmented(a, b, f, 1)[1]
    pad = (-L) % CHUNK
    if pad:  # padding steps are the identity
        a = torch.cat([a, a.new_ones(B, pad, C)], 1)
        b = torch.cat([b, b.new_zeros(B, pad, C)], 1)
        if f is not None:
            f = torch.cat([f, f.new_zeros(f.shape[0], pad, 1)], 1)
    nc = (L + pad) // CHUNK
    a, b = a.view(B, nc, CHUNK, C), b.view(B, nc, CHUNK, C)
    if f is None:
        P, h = _doubling(a, b, 2)
        ends = _scan_zero_init(P[:, :, -1].clone(), h[:, :, -1].clone())  # state at chunk ends
        h[:, 1:] += P[:, 1:] * ends[:, :-1, None]
    else:
        P, h, F = _doubling_segmented(a, b, f.view(f.shape[0], nc, CHUNK, 1), 2)
        ends = _scan_zero_init(P[:, :, -1].clone(), h[:, :, -1].clone(), F[:, :, -1].clone())
        # a step after a restart in its chunk takes nothing from the chunks before
        h[:, 1:] = torch.where(F[:, 1:], h[:, 1:], h[:, 1:] + P[:, 1:] * ends[:, :-1, None])
    return h.view(B, nc * CHUNK, C)[:, :L]


@torch.no_grad()
def scan_kernel(
    a: Tensor,
    b: Tensor,
    initial_state: Optional[Tensor],
    reverse: bool,
    resets: Optional[Tensor] = None,
) -> Tensor:
    """Forward-only scan for a, b (B, L, *C); returns a new tensor h (B, L, *C).

    ``resets`` (L,) bool: steps where the state restarts (h_t = b_t; see the module's
    docstring), in time order (with ``reverse`` the restart ignores h_{t+1})."""
    shape = b.shape
    B, L = shape[0], shape[1]
    a = a.reshape(B, L, -1)
    b = b.reshape(B, L, -1)
    f = None if resets is None else resets.reshape(1, L, 1)
    if reverse:
        a, b = a.flip(1), b.flip(1)
        f = None if f is None else f.flip(1)
    else:
        a, b = a.clone(), b.clone()
        f = None if f is None else f.clone()
    if initial_state is not None:
        h0 = a[:, 0] * initial_state.reshape(B, -1)
        b[:, 0] += h0 if f is None else torch.where(f[:, 0], 0, h0)
    h = _scan_zero_init(a, b, f)
    if reverse:
        h = h.flip(1)
    return h.reshape(shape)


def _adjoint_resets(resets: Optional[Tensor], reverse: bool) -> Optional[Tensor]:
    """The adjoint scan's restarts: at t when the forward one restarts at the step after t
    (t + 1, or t - 1 with ``reverse``); the adjoint's first step has nothing to carry."""
    if resets is None:
        return None
    edge = resets.new_zeros(1)
    return torch.cat([edge, resets[:-1]]) if reverse else torch.cat([resets[1:], edge])


def _mask_steps(x: Tensor, resets: Optional[Tensor]) -> Tensor:
    """x (B, L, *C) with 0 at the restart steps (selected, so a non-finite x there is dropped)."""
    if resets is None:
        return x
    return torch.where(resets.view((1, -1) + (1,) * (x.dim() - 2)), 0, x)


class LinearScanFunction(torch.autograd.Function):
    """Autograd wrapper shared by every fused backend: forward and adjoint are both scans."""

    @staticmethod
    def forward(ctx, a, b, initial_state, reverse: bool, kernel: Kernel, resets=None):
        h = kernel(a, b, initial_state, reverse, resets)
        ctx.reverse = reverse
        ctx.kernel = kernel
        ctx.has_h0 = initial_state is not None
        ctx.save_for_backward(a, h, initial_state if ctx.has_h0 else None, resets)
        return h

    @staticmethod
    @first_order("linear_scan")  # the fused kernels are not differentiable
    def backward(ctx, grad_h):
        a, h, h0, resets = ctx.saved_tensors
        reverse, kernel = ctx.reverse, ctx.kernel
        grad_h = grad_h.to(h.dtype).contiguous()
        ac = a.conj()
        # decay seen by the adjoint at t is the forward decay of the step after t
        zero = torch.zeros_like(ac[:, :1])
        start = (h0 if h0 is not None else torch.zeros_like(h[:, 0]))[:, None]
        if not reverse:
            a_adj = torch.cat([ac[:, 1:], zero], 1)
            prev = torch.cat([start, h[:, :-1]], 1)
        else:
            a_adj = torch.cat([zero, ac[:, :-1]], 1)
            prev = torch.cat([h[:, 1:], start], 1)
        g = kernel(a_adj, grad_h, None, not reverse, _adjoint_resets(resets, reverse))
        grad_a = _mask_steps(g * prev.conj(), resets) if ctx.needs_input_grad[0] else None
        grad_h0 = None
        if ctx.has_h0 and ctx.needs_input_grad[2]:
            first = h.shape[1] - 1 if reverse else 0  # the step that read the initial state
            grad_h0 = ac[:, first] * g[:, first]
            if resets is not None:  # it did not read it when it restarted
                grad_h0 = torch.where(resets[first], 0, grad_h0)
        return grad_a, g, grad_h0, None, None, None


def linear_scan(
    a: Tensor,
    b: Tensor,
    initial_state: Optional[Tensor],
    reverse: bool,
    resets: Optional[Tensor] = None,
) -> Tensor:
    """Chunked parallel scan with an O(output)-memory backward.

    Args: a, b (B, L, *C) (a already expanded to b's shape, one dtype); initial_state
    (B, *C) or None; ``resets`` (L,) bool or None: where the state restarts (h_t = b_t).
    """
    return LinearScanFunction.apply(a, b, initial_state, reverse, scan_kernel, resets)
