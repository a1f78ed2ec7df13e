"""``linear``: y = x W^T + b, the dense layers of every model, on the fastest GEMM at hand.

Backends (same signature, same results up to the order of the sums):

- ``torch``: ``torch.nn.functional.linear`` (on x86 CPUs torch's MKL, on GPUs cuBLAS); also
  what ``reference`` names, the specification.
- ``cpu``: oneDNN's matmul (bundled with torch) for the forward product and for the input's
  gradient, MKL for the weight's gradient.  MKL runs a generic AVX2 path on CPUs not made by
  Intel: on the 2-core AMD EPYC (znver5, AVX-512) its SGEMM reached 210 GFLOP/s against oneDNN's
  450-480 (x (8192, 256) W (512, 256): 10.1 ms against 4.7), while the weight's gradient, a
  product over the token axis, was not faster on oneDNN in every shape (0.61-1.42x MKL's time:
  slower at 8192 tokens, 256 inputs, 1024 outputs).  See :mod:`lrnnx.ops.linear.cpu` for
  when lrnnx picks it.

Pick one with ``backend=`` or ``LRNNX_BACKEND`` (names of other ops' backends, such as
``triton``, mean ``torch`` here); otherwise ``cpu`` where it applies (float32 on the CPU, MKL
being torch's BLAS on a CPU not made by Intel, a product of at least 2**23 multiply-adds, no
autocast, not under torch.compile or a torch.func transform) and ``torch`` everywhere else.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from lrnnx.ops import _dispatch
from lrnnx.ops.linear import cpu as _cpu

__all__ = ["linear", "BACKENDS"]

#: the names ``backend=`` takes
BACKENDS = ("cpu", "torch", "reference")


def linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, backend: Optional[str] = None
) -> Tensor:
    """y = x W^T + b, as ``torch.nn.functional.linear``.

    Args:
        x: (..., in_features).
        weight: (out_features, in_features).
        bias: (out_features,) or None.
        backend: "cpu", "torch" or "reference" (default: ``LRNNX_BACKEND``, else lrnnx's
            choice, see the module docstring).

    Returns:
        (..., out_features).

    Raises:
        ValueError: an unknown ``backend``.  Shape and dtype errors are torch's own
            (``F.linear``'s), whatever the backend.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)} for linear, got {backend!r}")
    name = backend or _dispatch.env_backend()
    if name in (None, "cpu") and _cpu.applies(x, weight, bias, asked=name == "cpu"):
        return _cpu.linear(x, weight, bias)
    return F.linear(x, weight, bias)
