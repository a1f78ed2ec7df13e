"""Fused CPU Cauchy product, compiled by numba at first use (cached on disk afterwards).

A task is one h (all of v's rows r, all poles n, all points k); tasks run on torch's threads
(:func:`lrnnx.ops._numba.run_on_threads`).  The small inputs (v, w, a, b) are split into real
and imaginary planes; the (R, H, K) result and its gradient stay in torch's interleaved complex
memory, which each task reads or writes once per h through (R, K) scratch planes (no planar
copies of them: at S4's layer shape, R=4 H=256 N=16 K=1025, forward+backward took 0.73x the
time of planar copies in an in-process A/B on the 2-core AMD EPYC, 14.6 -> 10.7 ms).  For each
pole n the task forms 1 / (a_k - b_k w_n) for every k into a (K,) scratch row (the loop over k
vectorises), then adds v[r, n] times it to each row r: the (H, N, K) matrix of the torch
backend is never stored.

Backward (PyTorch's convention for complex gradients: grad = conj(d out / d input) grad_out)
forms the same row again per pole and reduces over k:

    dv[r, h, n] = sum_k conj(q_k) g[r, h, k],                 q_k = 1 / (a_k - b_k w[h, n])
    dw[h, n]    = sum_k conj(b_k q_k^2) sum_r conj(v[r, h, n]) g[r, h, k]

Gradients of a and b (S4 never needs them) come from the torch backend: a call that needs them
runs there.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lrnnx.core.autograd import graph_by_formula
from lrnnx.ops._numba import (
    HAVE_NUMBA,
    as_planes,
    is_available,
    run_on_threads,
    shared_array,
    threads_for,
)

__all__ = ["cauchy", "is_available", "warm_up"]

#: below this many (h, n, k) terms a call runs on the calling thread
SERIAL_WORK = 1 << 16

if HAVE_NUMBA:
    import numba
    import numpy as np

    # reassociation lets the reductions over k vectorise; error_model="numpy": no zero-division
    # branch (a pole on a point gives inf, as torch's reciprocal does)
    _OPTS = dict(cache=True, nogil=True, fastmath={"reassoc", "contract"}, error_model="numpy")

    @numba.njit(**_OPTS)
    def _inverse(ar, ai, br, bi, wr, wi, qr, qi):  # pragma: no cover - compiled
        """q_k = 1 / (a_k - b_k w) = conj(d) / |d|^2 for every k."""
        for k in range(ar.shape[0]):
            dr = ar[k] - (br[k] * wr - bi[k] * wi)
            di = ai[k] - (br[k] * wi + bi[k] * wr)
            s = 1.0 / (dr * dr + di * di)
            qr[k] = dr * s
            qi[k] = -di * s

    @numba.njit(**_OPTS)
    def _forward(first, stride, vr, vi, wr, wi, ar, ai, br, bi, out):  # pragma: no cover
        """Tasks h = first, first + stride, ...: out[:, h] = sum_n v[:, h, n] q(w[h, n]).

        ``out`` (R, H, K, 2): the complex result's interleaved memory; each h is summed in
        (R, K) real and imaginary planes (the loop over k vectorises) and written once."""
        R, H, N = vr.shape
        K = ar.shape[0]
        qr, qi = np.empty(K, vr.dtype), np.empty(K, vr.dtype)
        accr, acci = np.empty((R, K), vr.dtype), np.empty((R, K), vr.dtype)
        for h in range(first, H, stride):
            accr[:] = 0.0
            acci[:] = 0.0
            for n in range(N):
                _inverse(ar, ai, br, bi, wr[h, n], wi[h, n], qr, qi)
                for r in range(R):
                    xr, xi = vr[r, h, n], vi[r, h, n]
                    orow, oirow = accr[r], acci[r]
                    for k in range(K):
                        orow[k] += xr * qr[k] - xi * qi[k]
                        oirow[k] += xr * qi[k] + xi * qr[k]
            for r in range(R):
                o, orow, oirow = out[r, h], accr[r], acci[r]
                for k in range(K):
                    o[k, 0] = orow[k]
                    o[k, 1] = oirow[k]

    @numba.njit(**_OPTS)
    def _backward(
        first, stride, vr, vi, wr, wi, ar, ai, br, bi, g, dvr, dvi, dwr, dwi
    ):  # pragma: no cover - compiled
        """Tasks h: dv[:, h, n] and dw[h, n] (the formulas of the module docstring); ``g``
        (R, H, K, 2): the complex gradient's interleaved memory, split into (R, K) real and
        imaginary planes per h."""
        R, H, N = vr.shape
        K = ar.shape[0]
        qr, qi = np.empty(K, vr.dtype), np.empty(K, vr.dtype)
        tr, ti = np.empty(K, vr.dtype), np.empty(K, vr.dtype)
        gr, gi = np.empty((R, K), vr.dtype), np.empty((R, K), vr.dtype)
        for h in range(first, H, stride):
            for r in range(R):
                src, g_r, g_i = g[r, h], gr[r], gi[r]
                for k in range(K):
                    g_r[k] = src[k, 0]
                    g_i[k] = src[k, 1]
            for n in range(N):
                _inverse(ar, ai, br, bi, wr[h, n], wi[h, n], qr, qi)
                tr[:] = 0.0
                ti[:] = 0.0
                for r in range(R):
                    xr, xi = vr[r, h, n], vi[r, h, n]
                    g_r, g_i = gr[r], gi[r]
                    sr = 0.0
                    si = 0.0
                    for k in range(K):
                        # conj(q) g
                        sr += qr[k] * g_r[k] + qi[k] * g_i[k]
                        si += qr[k] * g_i[k] - qi[k] * g_r[k]
                        # t += conj(v) g
                        tr[k] += xr * g_r[k] + xi * g_i[k]
                        ti[k] += xr * g_i[k] - xi * g_r[k]
                    dvr[r, h, n] = sr
                    dvi[r, h, n] = si
                sr = 0.0
                si = 0.0
                for k in range(K):
                    # conj(b q^2) t
                    q2r = qr[k] * qr[k] - qi[k] * qi[k]
                    q2i = 2.0 * qr[k] * qi[k]
                    cr = br[k] * q2r - bi[k] * q2i
                    ci = br[k] * q2i + bi[k] * q2r
                    sr += cr * tr[k] + ci * ti[k]
                    si += cr * ti[k] - ci * tr[k]
                dwr[h, n] = sr
                dwi[h, n] = si


def _run(kernel, H: int, work: int, *args) -> None:
    """``kernel(first, stride, *args)`` on :func:`lrnnx.ops._numba.threads_for` threads (one
    per h at most; the calling thread alone for small work)."""
    threads = max(1, min(threads_for(work, SERIAL_WORK), H))
    run_on_threads(lambda i, n: kernel(i, n, *args), threads)


class CauchyCPUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, w: Tensor, a: Tensor, b: Tensor) -> Tensor:
        ctx.save_for_backward(v, w, a, b)
        return _product(v, w, a, b)

    @staticmethod
    @graph_by_formula(lambda ctx: (_formula, ctx.saved_tensors))
    def backward(ctx, g: Tensor):
        v, w, a, b = ctx.saved_tensors
        R, H, N = v.shape
        K = a.shape[0]
        real = v.real.dtype
        dvr, dvi = torch.empty(R, H, N, dtype=real), torch.empty(R, H, N, dtype=real)
        dwr, dwi = torch.empty(H, N, dtype=real), torch.empty(H, N, dtype=real)
        _run(_backward, H, 2 * R * H * N * K, *as_planes(v), *as_planes(w), *as_planes(a), *as_planes(b),
             _interleaved(g.to(v.dtype)), dvr.numpy(), dvi.numpy(), dwr.numpy(), dwi.numpy())  # fmt: skip
        return torch.complex(dvr, dvi), torch.complex(dwr, dwi), None, None


def _formula(v: Tensor, w: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """The reference backend's quotients (differentiable at every order)."""
    from lrnnx.ops.cauchy.reference import cauchy as reference

    return reference(v, w, a, b, None)


def cauchy(v: Tensor, w: Tensor, a: Tensor, b: Tensor, max_elements: Optional[int]) -> Tensor:
    """Fused Cauchy product; same arguments and result as the reference backend (v (R, H, N),
    w (H, N), a and b (K,), one complex dtype; ``max_elements`` unused).  Tensors on another
    device, and calls that need a's or b's gradient, go to the torch backend."""
    grad = torch.is_grad_enabled()
    if v.device.type != "cpu" or (grad and (a.requires_grad or b.requires_grad)):
        from lrnnx.ops.cauchy.torch import cauchy as torch_cauchy

        return torch_cauchy(v, w, a, b, max_elements)
    if grad and (v.requires_grad or w.requires_grad):
        return CauchyCPUFunction.apply(v, w, a, b)
    return _product(v, w, a, b)


def _product(v: Tensor, w: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """The forward kernel: out (R, H, K)."""
    R, H, N = v.shape
    K = a.shape[0]
    out = torch.empty(R, H, K, dtype=v.dtype)
    _run(_forward, H, R * H * N * K, *as_planes(v), *as_planes(w), *as_planes(a), *as_planes(b),
         _interleaved(out))  # fmt: skip
    return out


def _interleaved(t: Tensor):
    """A complex CPU tensor (..., K) as the (..., K, 2) float numpy array of its memory
    (contiguous first): the kernels read and write the (R, H, K) results and gradients there,
    with no planar copies of them."""
    return shared_array(torch.view_as_real(t.resolve_conj().contiguous()), t)


def warm_up(dtypes: tuple[torch.dtype, ...]) -> None:
    """Run the kernels a call with tensors of these dtypes runs (forward and backward) on tiny
    inputs, so numba compiles or loads them (the background compile process runs this)."""
    cdtype = (
        torch.complex128 if {torch.float64, torch.complex128} & set(dtypes) else torch.complex64
    )
    g = torch.Generator().manual_seed(0)

    def t(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=cdtype)

    v, w = t(1, 2, 2).requires_grad_(), t(2, 2).requires_grad_()
    cauchy(v, w, t(3), t(3), None).abs().sum().backward()
