"""Gated MLP with a SwiGLU activation (Shazeer, "GLU Variants Improve Transformer",
arXiv 2002.05202):

    [a, g] = W_1 x            (two halves of width `hidden`)
    y      = W_2 (a * SiLU(g))
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from lrnnx.layers.linear import Linear


class GatedMLP(nn.Module):
    """SwiGLU feed-forward layer, (..., dim) -> (..., dim).

    Example:
        >>> mlp = GatedMLP(64)              # hidden = 8/3 * 64 rounded up to 128 -> 256
        >>> y = mlp(torch.randn(2, 16, 64))

    Args:
        dim: input and output width.
        hidden: width of the gated hidden layer.  If None, ``8 * dim / 3`` (which keeps the
            parameter count of a 4x GELU MLP) rounded up to a multiple of ``multiple_of``; an
            explicit ``hidden`` is used as given.
        multiple_of: rounding of the default hidden width (hardware-friendly sizes).
    """

    def __init__(self, dim: int, hidden: Optional[int] = None, multiple_of: int = 128) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("multiple_of", multiple_of)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if hidden is None:
            hidden = int(8 * dim / 3)
            hidden = (hidden + multiple_of - 1) // multiple_of * multiple_of
        elif not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
            raise ValueError(f"hidden: expected None or a positive int, got {hidden!r}")
        self.dim, self.hidden = dim, hidden
        self.fc1 = Linear(dim, 2 * hidden, bias=False)
        self.fc2 = Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """(..., dim) -> (..., dim)."""
        if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x: expected shape (..., {self.dim}), got {got}")
        a, g = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(a * F.silu(g))
