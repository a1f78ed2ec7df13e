"""Reference causal depthwise convolution: the definition written as a loop. Slow; the spec."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    initial_states: Optional[Tensor],
    silu: bool,
    cu_seqlens: Optional[Tensor] = None,
) -> Tensor:
    """y_t = bias + sum_j weight[:, j] xpad_{t + j}, then silu(y) when ``silu``.

    ``xpad`` is x (B, D, L) with the K - 1 entries of ``initial_states`` (B, D, K - 1), or
    zeros, before it; weight is (D, K), bias (D,) or None.  With ``cu_seqlens`` (S + 1,) x is
    (1, D, T) holding S sequences and ``initial_states`` is (S, D, K - 1): the window of step t
    of sequence s stops at the sequence's first step and takes the rest from s's initial
    states.  Autograd flows through the loop.  Time slices are taken with ``unbind`` (one view
    each) so backward stays linear in L.
    """
    B, D, L = x.shape
    P = weight.shape[1] - 1
    cu = [0, L] if cu_seqlens is None else [int(c) for c in cu_seqlens]
    S = len(cu) - 1
    if initial_states is None:
        initial_states = x.new_zeros(B * S, D, P)
    # states of (row b, sequence s) at [b, s]: B = 1 when packed, S = 1 when not
    h = initial_states.reshape(B, S, D, P).unbind(-1)  # P columns, each (B, S, D)
    cols = x.unbind(-1)  # L columns, each (B, D)
    w = weight.unbind(-1)  # K columns, each (D,)
    out = []
    s = 0
    for t in range(L):
        while cu[s + 1] <= t:  # the sequence step t belongs to (skips empty ones)
            s += 1
        start = cu[s]
        acc = x.new_zeros(B, D) if bias is None else bias.expand(B, D)
        for j in range(P + 1):
            p = t - P + j  # the input tap j reads, before the sequence start: a state
            acc = acc + w[j] * (cols[p] if p >= start else h[P + p - start][:, s])
        out.append(acc)
    y = torch.stack(out, dim=-1) if out else x.new_zeros(B, D, 0)
    return y * torch.sigmoid(y) if silu else y
