"""oneDNN's fp32 matmul for ``linear`` on CPUs where torch's MKL takes its generic path.

torch's CPU builds for x86 use MKL for ``F.linear``; on a CPU not made by Intel MKL picks its
generic AVX2 code, at about half the speed oneDNN (also inside torch, used by its compiler
for CPU matmuls) reaches with AVX-512 on the same CPU.  Here the forward product and the
input's gradient run on oneDNN (``torch.ops.mkldnn._linear_pointwise``) and the weight's
gradient stays on MKL, which was the faster for that product over the long token axis.

When lrnnx picks it (:func:`applies`): float32 tensors on the CPU, x at least 2-D with
in_features matching, a contiguous weight, grad mode or not; not under CPU autocast (the
product then belongs to autocast's lower precision), torch.compile (its own CPU GEMMs) or a
torch.func transform; oneDNN present and agreeing with ``F.linear`` on a small product
(checked once per process: :func:`self_check`); and, unless ``backend="cpu"`` asks for it, MKL
being torch's BLAS on a CPU that is not Intel's (:func:`mkl_takes_generic_path`) and a product of
at least :data:`MIN_MACS` multiply-adds.  Everything else runs ``F.linear``.
"""

from __future__ import annotations

import functools
import platform
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lrnnx.core.autograd import transformed
from lrnnx.core.checks import _autocast_enabled, _compiling, recording_program, user_stacklevel

#: x86 vendors whose CPUs get MKL's generic code path
_GENERIC_VENDORS = ("AuthenticAMD", "HygonGenuine")
#: products of fewer multiply-adds (tokens x in_features x out_features) stay on F.linear:
#: oneDNN's call costs ~20 us against F.linear's 2-3, so one-token decoding steps ran up to 3x
#: slower on it; from 2**23 on it was faster in every shape measured on the 2-core AMD EPYC
#: (forward+backward 0.48-0.86x of F.linear's time; at 2**22 between 0.98x and 1.2x)
MIN_MACS = 1 << 23


def _pointwise():
    """oneDNN's linear (torch's own op), or None in a build without it."""
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


@functools.cache
def cpu_vendor() -> str:
    """The x86 vendor id from /proc/cpuinfo ("GenuineIntel", "AuthenticAMD", ...), or "" where
    there is none (other systems and architectures)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def mkl_takes_generic_path(vendor: Optional[str] = None) -> bool:
    """Whether torch's BLAS is MKL on an x86 CPU MKL gives its generic path (not Intel's)."""
    vendor = cpu_vendor() if vendor is None else vendor
    machine = platform.machine().lower()
    return (
        machine in ("x86_64", "amd64")
        and torch.backends.mkl.is_available()
        and vendor in _GENERIC_VENDORS
    )


@functools.cache
def self_check() -> bool:
    """oneDNN's op is present and gives ``F.linear``'s values (forward and the transposed-weight
    product of the input's gradient) on a small float32 product; warns once if it is present but
    disagrees or fails, and lrnnx then keeps ``F.linear``."""
    op = _pointwise()
    if op is None:
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 19, generator=gen)
    w = torch.randn(23, 19, generator=gen)
    b = torch.randn(23, generator=gen)
    g = torch.randn(37, 23, generator=gen)
    try:
        with torch.no_grad():
            pairs = ((op(x, w, b, "none", [], ""), F.linear(x, w, b)),
                     (op(g, w.t(), None, "none", [], ""), g @ w))  # fmt: skip
        ok = all(
            a.shape == r.shape and bool((a - r).abs().max() <= 1e-4 * r.abs().max())
            for a, r in pairs
        )
    except Exception as e:  # a changed or missing op: keep F.linear
        msg = f"lrnnx: oneDNN linear unavailable ({type(e).__name__}: {e}); using F.linear"
        warnings.warn(msg, RuntimeWarning, stacklevel=user_stacklevel())
        return False
    if not ok:
        msg = "lrnnx: oneDNN linear disagrees with F.linear; using F.linear"
        warnings.warn(msg, RuntimeWarning, stacklevel=user_stacklevel())
    return ok


def _dense_bias(bias: Tensor, out: int) -> bool:
    """A float32 CPU bias oneDNN takes as it is: (out,) and contiguous."""
    return (
        bias.dtype == torch.float32
        and bias.device.type == "cpu"
        and tuple(bias.shape) == (out,)
        and bias.is_contiguous()
    )


def applies(x: Tensor, weight: Tensor, bias: Optional[Tensor], asked: bool = False) -> bool:
    """Whether a call runs on oneDNN (see the module docstring); ``asked``: backend="cpu" was
    named, which skips the CPU-vendor and size rules."""
    # the size rule first: a small product, the common case of decoding, is decided by one
    # comparison (this runs for every dense layer of every step)
    if not asked and x.numel() * weight.shape[0] < MIN_MACS:
        return False
    f32 = torch.float32
    # oneDNN reads the bias as a dense (out,) vector: a strided one (a slice with step 2) gave
    # wrong results and a broadcastable (1,) one its own error, so both go to F.linear
    if not (
        x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dtype == f32
        and weight.dtype == f32
        and (bias is None or _dense_bias(bias, weight.shape[0]))
        and x.dim() >= 2
        and weight.dim() == 2
        and x.shape[-1] == weight.shape[1]
        and x.numel() > 0
        and weight.is_contiguous()
    ):
        return False
    if _autocast_enabled("cpu"):
        return False
    # no vmap/jvp rules, and a Python autograd Function: F.linear where transforms, compile,
    # export or tracing record the call
    if _compiling() or recording_program() or transformed(x, weight, bias):
        return False
    if not asked and not mkl_takes_generic_path():
        return False
    return self_check()


class OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b: forward and grad x on oneDNN, grad W (and b) on torch's BLAS."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        y = _pointwise()(x2, weight, bias, "none", [], "")
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        ctx.x_shape = x.shape
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x2, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        if not g2.is_contiguous():
            g2 = g2.contiguous()
        dx = dw = db = None
        # asked for a graph of the gradients (create_graph=True), dx is torch's mm, whose
        # autograd gives second derivatives; the oneDNN product has no derivative of its own
        second_order = torch.is_grad_enabled()
        if ctx.needs_input_grad[0] and second_order:
            dx = g2.mm(weight).reshape(ctx.x_shape)
        elif ctx.needs_input_grad[0]:
            # g W = linear(g, W^T): W^T (in, out) is W's transposed view, read in place
            dx = _pointwise()(g2, weight.t(), None, "none", [], "").reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            dw = g2.t().mm(x2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = g2.sum(0)
        return dx, dw, db


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """y = x W^T + b on oneDNN (call only where :func:`applies`)."""
    return OneDNNLinear.apply(x, weight, bias)
