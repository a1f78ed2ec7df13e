"""Root-mean-square layer normalisation (Zhang & Sennrich, "Root Mean Square Layer
Normalization", arXiv 1910.07467):

    y = x / sqrt(mean(x^2) + eps) * g

No mean subtraction and no bias; the statistic is computed in float32 (or wider) so the
normalisation is stable under bf16/fp16 autocast.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension.

    Example:
        >>> norm = RMSNorm(64)
        >>> y = norm(torch.randn(2, 128, 64))  # (..., D) -> (..., D)

    Args:
        dim: size D of the normalised (last) dimension.
        eps: added to the mean square before the square root.
    """

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim: expected a positive int, got {dim!r}")
        if not eps > 0:
            raise ValueError(f"eps: expected a positive float, got {eps!r}")
        self.dim, self.eps = dim, float(eps)
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        """The gain back to ones."""
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        """(..., D) -> (..., D) in x's dtype."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"x: expected a floating-point tensor, got {got}")
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"x: expected shape (..., {self.dim}), got {tuple(x.shape)}")
        # the mean square of bf16 activations loses too many bits: accumulate in float32
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(y.dtype)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
