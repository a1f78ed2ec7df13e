"""``Linear``: ``torch.nn.Linear`` whose product runs on :func:`lrnnx.ops.linear` (oneDNN where
torch's MKL would take its slow generic path, ``F.linear`` elsewhere).

Same parameters, initialisation, state-dict keys and ``isinstance(m, nn.Linear)``; only the
forward's GEMM backend differs (results equal up to the order of the sums)."""

from __future__ import annotations

from torch import Tensor, nn

from lrnnx.ops.linear import linear

__all__ = ["Linear"]


class Linear(nn.Linear):
    """(..., in_features) -> (..., out_features): y = x W^T + b, see :func:`lrnnx.ops.linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
