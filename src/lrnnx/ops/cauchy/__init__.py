"""``cauchy``: the generalised Cauchy product behind S4's kernel (Gu, Goel, Re, ICLR 2022, Alg. 1)::

    out[..., h, k] = sum_n v[..., h, n] / (a[k] - b[k] w[h, n])

With ``conj`` the conjugate terms conj(v) / (a - b conj(w)) are added (the implicit second half
of each conjugate pair of a real system).

Backends (same signature, same results up to rounding):

- ``reference``: the (R, H, N, K) quotients summed, the specification.
- ``torch``: the (H, N, K) Cauchy matrix in chunks over K of at most ``max_elements`` entries,
  each chunk recomputed in backward (bounded memory), any device.
- ``cpu``: fused numba forward and backward (the CPU default): the quotients are formed and
  summed in registers, one h per task, never stored; backward forms them again.  On the 2-core
  machine the (H, N, K) matrix passes of the torch backend (a few hundred MB at S4's layer shape)
  were most of an S4 layer's time.

Pick one with ``backend=`` or ``LRNNX_BACKEND``; otherwise the fastest available for the device
(CUDA: ``torch``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch as _torch  # the sibling module `torch.py` takes the name `torch` here
from torch import Tensor

from lrnnx.core.checks import check_positive_int, check_tensor
from lrnnx.ops import _dispatch

__all__ = ["cauchy"]

_dispatch.register("cauchy", "reference", "lrnnx.ops.cauchy.reference:cauchy")
_dispatch.register("cauchy", "torch", "lrnnx.ops.cauchy.torch:cauchy")
_dispatch.register("cauchy", "cpu", "lrnnx.ops.cauchy.cpu:cauchy")


def cauchy(
    v: Tensor,
    w: Tensor,
    a: Tensor,
    b: Tensor,
    conj: bool = True,
    max_elements: Optional[int] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """Generalised Cauchy product  out[..., h, k] = sum_n v[..., h, n] / (a[k] - b[k] w[h, n]).

    Args:
        v: (..., H, N) numerators, real or complex.
        w: (H, N) poles, real or complex.
        a, b: (K,) the evaluation points' coefficients (S4: a = 1 - z_k, b = (1 + z_k) / 2 at
            the roots of unity z_k).
        conj: add the conjugate terms conj(v[..., h, n]) / (a[k] - b[k] conj(w[h, n])).
        max_elements: the torch backend's chunk of the (H, N, K) matrix (default
            :data:`lrnnx.ops.cauchy.torch.MAX_ELEMENTS`); the other backends never form it.
        backend: force a backend ("reference", "torch", "cpu").

    Returns:
        (..., H, K), complex (complex128 if any input is float64 or complex128, else
        complex64).  Differentiable in every input (the cpu backend's own kernels give v and w
        their gradients; a call needing those of a or b runs on the torch backend).

    Raises:
        TypeError: an input is not a floating-point or complex tensor.
        ValueError: shapes that do not fit (v (..., H, N), w (H, N), a and b (K,)), or tensors
            on different devices.
    """
    check_tensor("v", v, complex_ok=True)
    if max_elements is not None:
        check_positive_int("max_elements", max_elements)
    if v.dim() < 2:
        raise ValueError(
            f"v: expected at least 2 dimensions (..., H, N), got shape {tuple(v.shape)}"
        )
    device = v.device
    for name, x, dims in (("w", w, 2), ("a", a, 1), ("b", b, 1)):
        check_tensor(name, x, device, complex_ok=True, device_of="v")
        if x.dim() != dims:
            raise ValueError(f"{name}: expected {dims} dimensions, got shape {tuple(x.shape)}")
    H, N = v.shape[-2:]
    if tuple(w.shape) != (H, N):
        raise ValueError(f"w: expected (H, N) = {(H, N)} (v's last two dims), got {tuple(w.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"b: expected a's shape {tuple(a.shape)} (K,), got {tuple(b.shape)}")
    wide = any(t.dtype in (_torch.float64, _torch.complex128) for t in (v, w, a, b))
    dtype = _torch.complex128 if wide else _torch.complex64
    v, w, a, b = v.to(dtype), w.to(dtype), a.to(dtype), b.to(dtype)
    if conj:
        # conj_physical, not the lazy conj() view: torch.export 2.4 recursed without end on
        # that view (S4's kernel); the cat copies the values either way
        v = _torch.cat([v, v.conj_physical()], dim=-1)
        w = _torch.cat([w, w.conj_physical()], dim=-1)
    lead = v.shape[:-2]
    v = v.reshape(math.prod(lead), H, v.shape[-1])
    K = a.shape[0]
    if v.numel() == 0 or K == 0:  # no term or no point: zeros (empty sums), still attached
        out = v.sum(-1, keepdim=True) * (0 * a) + w.sum(-1)[:, None] * (0 * b)
        return out.reshape(*lead, H, K)
    fn = _dispatch.resolve("cauchy", device, backend, (v, w, a, b))
    with _dispatch.no_autocast(device):
        return fn(v, w, a, b, max_elements).reshape(*lead, H, K)
