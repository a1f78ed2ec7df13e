"""Reference causal depthwise convolution: the definition written as a loop. Slow; the spec."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def causal_conv1d(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], initial_states: Optional[Tensor], silu: bool
) -> Tensor:
    """y_t = bias + sum_j weight[:, j] xpad_{t + j}, then silu(y) when ``silu``.

    ``xpad`` is x (B, D, L) with the K - 1 entries of ``initial_states`` (B, D, K - 1), or
    zeros, before it; weight is (D, K), bias (D,) or None.  Autograd flows through the loop.
    Time slices are taken with ``unbind`` (one view each) so backward stays linear in L.
    """
    B, D, L = x.shape
    K = weight.shape[1]
    if initial_states is None:
        initial_states = x.new_zeros(B, D, K - 1)
    cols = initial_states.unbind(-1) + x.unbind(-1)  # xpad_0 .. xpad_{K-2+L}, each (B, D)
    w = weight.unbind(-1)  # K columns, each (D,)
    out = []
    for t in range(L):
        acc = x.new_zeros(B, D) if bias is None else bias.expand(B, D)
        for j in range(K):
            acc = acc + w[j] * cols[t + j]
        out.append(acc)
    y = torch.stack(out, dim=-1) if out else x.new_zeros(B, D, 0)
    return y * torch.sigmoid(y) if silu else y
