"""Causal convolution along the last axis: y_t = sum_{s <= t} k_s u_{t-s}.

FFT for long sequences (zero-padded to at least 2L so nothing wraps around), a direct sum for
short ones where the FFT's overhead dominates.  Real and complex inputs are both handled; a
real kernel with a real input uses the real FFT.

Causality holds for non-finite inputs too.  An FFT spreads one NaN or inf over every output,
including those before it; the FFT paths here convolve the input with its non-finite entries
set to 0 and then mark as NaN exactly the outputs whose window reaches one of them, which is
what the direct sum (and the recurrence) gives: outputs before a NaN are untouched.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lrnnx.core.autograd import graph_by_formula, transformed
from lrnnx.core.checks import _compiling, check_tensor

#: below this length the direct O(L^2) sum is cheaper than three FFTs
DIRECT_MAX_LEN = 32


def bit_length(n: int) -> int:
    """``n.bit_length()`` for an int n >= 0, by a loop: torch 2.4's Dynamo cannot call
    ``int.bit_length`` ("const method call int.bit_length"), and torch.compile(fullgraph=True)
    and torch.export reject the graph break."""
    bits = 0
    while (1 << bits) <= n:
        bits += 1
    return bits


def fft_length(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (sizes the FFT handles fastest)."""
    best = 1 << bit_length(n - 1)
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def causal_conv(u: Tensor, k: Tensor, method: str = "auto") -> Tensor:
    """Causal convolution of ``u`` (..., L) with kernel ``k`` (..., Lk), time on the last axis.

    ``u`` and ``k`` broadcast over their leading axes.  Only the first L kernel taps matter; a
    shorter kernel is zero-extended.  ``method`` is ``"fft"``, ``"direct"`` or ``"auto"``.
    Returns (..., L) in the promoted dtype (complex if either input is complex).

    Raises:
        TypeError: u or k is not a floating-point or complex tensor.
        ValueError: a 0-d input, leading axes that do not broadcast, k on another device, or
            an unknown ``method``.
    """
    check_tensor("u", u, complex_ok=True)
    check_tensor("k", k, u.device, complex_ok=True, device_of="u")
    if u.dim() == 0 or k.dim() == 0:
        raise ValueError(
            f"u, k: expected (..., L) and (..., Lk) with at least one axis, got shapes "
            f"{tuple(u.shape)} and {tuple(k.shape)}"
        )
    try:
        lead = torch.broadcast_shapes(u.shape[:-1], k.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"k: expected leading axes that broadcast with u's {tuple(u.shape[:-1])}, got "
            f"{tuple(k.shape[:-1])} (shapes (..., Lk) and (..., L))"
        ) from None
    L = u.shape[-1]
    if k.shape[-1] > L:
        k = k[..., :L]
    if method == "auto":
        method = "direct" if L <= DIRECT_MAX_LEN else "fft"
    if method == "fft" and (math.prod(lead) == 0 or L == 0 or k.shape[-1] == 0):
        method = "direct"  # nothing to transform (an empty FFT is an error in MKL): zeros
    if method == "direct":
        return _direct(u, k)
    if method != "fft":
        raise ValueError(f"method: expected 'fft', 'direct' or 'auto', got {method!r}")
    Lk = k.shape[-1]
    n = fft_length(L + Lk - 1) if Lk < L else fft_length(2 * L)
    u, bad = _finite_part(u)
    if u.is_complex() or k.is_complex():
        y = torch.fft.ifft(torch.fft.fft(u, n=n) * torch.fft.fft(k, n=n), n=n)[..., :L]
    elif transformed(u, k):  # torch.func / forward AD: the plain formula (no vmap/jvp rules)
        y = _formula(n, L)(u, k)
    else:
        y = RealFFTConv.apply(u, k, n, L)
    return _poison(y, bad, Lk)


class RealFFTConv(torch.autograd.Function):
    """y = irfft(rfft(u, n) rfft(k, n), n)[..., :L] for real u (..., L) and k (..., Lk) that
    broadcast, n >= L + Lk - 1 (no wrap-around), with a backward of real FFTs only.

    Backward: with DY = rfft(dy, n), du = irfft(DY conj(K), n)[..., :L] and dk =
    irfft(DY conj(U), n)[..., :Lk] (cross-correlations; each product summed over the axes its
    input was broadcast along before the inverse FFT).  torch's own backward of rfft ran a
    complex FFT of length n per input: in S4's layer at B=4 L=2048 H=256 those two took 13 of
    the step's ~100 ms on the 2-core AMD EPYC, against ~4 for the two real ones here.  The
    spectra U and K of forward are kept for it.  Asked for a graph of the gradients
    (``create_graph=True``), backward differentiates the plain FFT formula instead
    (:func:`lrnnx.core.autograd.graph_by_formula`), so second derivatives are exact.

    Memory: dk's product is summed over the batch a slice of ~:data:`SPECTRUM_CHUNK` entries
    at a time (:func:`_product_sum`) and du's is formed in DY's own memory, so the backward
    allocates no spectrum-sized temporaries beyond DY: fresh memory of that size comes from the
    system as zeroed pages, which cost as much as the products themselves (two 17 MB
    temporaries per call at B=4 L=2048 H=256)."""

    @staticmethod
    def forward(ctx, u: Tensor, k: Tensor, n: int, L: int) -> Tensor:
        U, K = torch.fft.rfft(u, n=n), torch.fft.rfft(k, n=n)
        ctx.save_for_backward(U, K, u, k)  # u, k: for second derivatives only (no copies)
        ctx.meta = (u.shape, u.dtype, k.shape, k.dtype, n, L)
        return torch.fft.irfft(U * K, n=n)[..., :L]

    @staticmethod
    @graph_by_formula(lambda ctx: (_formula(*ctx.meta[4:]), ctx.saved_tensors[2:]))
    def backward(ctx, dy: Tensor):
        U, K = ctx.saved_tensors[:2]
        u_shape, u_dtype, k_shape, k_dtype, n, L = ctx.meta
        DY = torch.fft.rfft(dy, n=n)
        du = dk = None
        if ctx.needs_input_grad[1]:  # first: du's product then takes DY's memory
            DK = _product_sum(DY, U, (*k_shape[:-1], DY.shape[-1]))
            dk = torch.fft.irfft(DK, n=n)[..., : k_shape[-1]].to(k_dtype)
        if ctx.needs_input_grad[0]:
            DU = DY.mul_(K.conj()).sum_to_size(*u_shape[:-1], DY.shape[-1])
            du = torch.fft.irfft(DU, n=n)[..., :L].to(u_dtype)
        return du, dk, None, None


def _formula(n: int, L: int):
    """RealFFTConv's result as a function of (u, k) by torch's FFTs (twice differentiable)."""

    def conv(u: Tensor, k: Tensor) -> Tensor:
        spectrum = torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n)
        return torch.fft.irfft(spectrum, n=n)[..., :L]

    return conv


#: spectrum entries per slice of :func:`_product_sum`'s batch loop (2**20 complex64: 8 MiB)
SPECTRUM_CHUNK = 1 << 20


def _product_sum(X: Tensor, Y: Tensor, shape: tuple) -> Tensor:
    """``(X * conj(Y)).sum_to_size(shape)`` for X (..., F) of the broadcast shape and Y that
    broadcasts to it, without the full product when the sum runs over X's leading axis: the
    product is made and summed a slice of that axis at a time (slices of at least
    :data:`SPECTRUM_CHUNK` entries, so small inputs take one slice: one product, as before)."""
    lead = len(shape) < X.dim() or shape[0] == 1  # the sum runs over X's leading axis
    step = max(1, SPECTRUM_CHUNK // max(1, X[0].numel()))
    if not lead or step >= X.shape[0]:
        return (X * Y.conj()).sum_to_size(shape)
    one = (1, *(shape[1:] if len(shape) == X.dim() else shape))  # shape with a leading 1
    acc = None
    for i in range(0, X.shape[0], step):
        Yi = Y if Y.dim() < X.dim() or Y.shape[0] == 1 else Y[i : i + step]
        part = (X[i : i + step] * Yi.conj()).sum_to_size(one)
        acc = part if acc is None else acc.add_(part)
    return acc.reshape(shape)


def _finite_part(u: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """``u`` with its non-finite entries set to 0, and the boolean mask of those entries.

    The mask is None when every entry is finite, the common case, found with one sum (a sum
    is finite only if every term is; an overflowing sum of finite terms merely takes the exact
    path).  Under torch.compile and torch.func transforms the check is left out (neither takes
    a data-dependent branch): the select always runs.
    """
    if not _compiling() and not transformed(u) and bool(torch.isfinite(u.sum())):
        return u, None
    bad = ~torch.isfinite(u)
    return torch.where(bad, u.new_zeros(()), u), bad


def _poison(y: Tensor, bad: Optional[Tensor], Lk: int) -> Tensor:
    """NaN where an output's causal window (its last ``Lk`` inputs) holds a non-finite input.

    ``bad`` (..., L) marks the non-finite inputs along the last axis; it broadcasts against y.
    """
    if bad is None:
        return y
    L = bad.shape[-1]
    count = bad.to(torch.int32).cumsum(-1, dtype=torch.int32)  # non-finite inputs up to t
    if Lk < L:  # only the last Lk inputs reach output t
        count = count - F.pad(count, (Lk, 0))[..., :L]
    return torch.where(count > 0, y.new_full((), float("nan")), y)


def _direct(u: Tensor, k: Tensor) -> Tensor:
    L = u.shape[-1]
    shape = torch.broadcast_shapes(u.shape[:-1], k.shape[:-1]) + (L,)
    dtype = torch.promote_types(u.dtype, k.dtype)
    terms = [torch.zeros(shape, dtype=dtype, device=u.device)]
    for s in range(min(k.shape[-1], L)):
        shifted = torch.cat([u.new_zeros(u.shape[:-1] + (s,)), u[..., : L - s]], dim=-1)
        terms.append(k[..., s : s + 1] * shifted)
    return torch.stack(terms).sum(0)


def causal_conv_mix(u: Tensor, k: Tensor) -> Tensor:
    """Causal convolution that also sums over input channels: a full (MIMO) convolution.

    y_o[t] = sum_i sum_{s <= t} k[o, i, s] u[b, i, t - s] for u (B, I, L) and k (O, I, L), real.
    The channel sum is done in the frequency domain, so it takes B*I + O*I + B*O FFTs rather
    than one per (batch, output, input) triple.  Returns (B, O, L).
    """
    L = u.shape[-1]
    n = fft_length(2 * L)
    u, bad = _finite_part(u)
    uf = torch.fft.rfft(u, n=n)
    kf = torch.fft.rfft(k[..., :L], n=n)
    y = torch.fft.irfft(torch.einsum("bil,oil->bol", uf, kf), n=n)[..., :L]
    if bad is not None:
        bad = bad.any(dim=1, keepdim=True)  # every output mixes every input
    return _poison(y, bad, L)
