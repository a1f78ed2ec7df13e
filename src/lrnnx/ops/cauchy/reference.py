"""Reference Cauchy product: every quotient formed, then summed. The specification."""

from __future__ import annotations

from typing import Optional

from torch import Tensor


def cauchy(v: Tensor, w: Tensor, a: Tensor, b: Tensor, max_elements: Optional[int]) -> Tensor:
    """out[r, h, k] = sum_n v[r, h, n] / (a[k] - b[k] w[h, n]); v (R, H, N), w (H, N), a and
    b (K,), all of one complex dtype (``max_elements`` is unused)."""
    return (v[..., None] / (a - b * w[..., None])).sum(-2)
