"""Cauchy product in PyTorch: the (H, N, K) matrix in chunks over K, recomputed in backward."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

#: the most (H, N, K-chunk) entries formed at once (64 MB in complex128)
MAX_ELEMENTS = 2**22


def cauchy(v: Tensor, w: Tensor, a: Tensor, b: Tensor, max_elements: Optional[int]) -> Tensor:
    """out[r, h, k] = sum_n v[r, h, n] / (a[k] - b[k] w[h, n]); v (R, H, N), w (H, N), a and
    b (K,), one complex dtype.  Chunks over K of at most ``max_elements`` (default
    :data:`MAX_ELEMENTS`) matrix entries; under autograd each chunk is recomputed in the
    backward pass, so memory stays bounded there too."""
    H, N = w.shape
    K = a.shape[0]
    budget = MAX_ELEMENTS if max_elements is None else max_elements
    chunk = max(1, budget // max(H * N, 1))
    if chunk >= K:
        return _block(v, w, a, b)
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (v, w, a, b))
    out = []
    for s in range(0, K, chunk):
        ab = (a[s : s + chunk], b[s : s + chunk])
        if recompute:
            out.append(checkpoint(_block, v, w, *ab, use_reentrant=False))
        else:
            out.append(_block(v, w, *ab))
    return torch.cat(out, dim=-1)


def _block(v: Tensor, w: Tensor, a: Tensor, b: Tensor) -> Tensor:
    inv = torch.reciprocal(a - b * w[..., None])  # (H, N, k)
    return torch.einsum("rhn,hnk->rhk", v, inv)
