"""Reference linear scan: the recurrence written as a loop. Slow; the specification."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def linear_scan(
    a: Tensor,
    b: Tensor,
    initial_state: Optional[Tensor],
    reverse: bool,
    resets: Optional[Tensor] = None,
) -> Tensor:
    """h_t = a_t * h_{t-1} + b_t for a, b of shape (B, L, *C); autograd flows through the loop.

    ``resets`` (L,) bool: where the state restarts, h_t = b_t (the state before is dropped,
    not multiplied by zero, so a non-finite one does not reach past it).

    Time slices are taken with ``unbind`` (one view each) rather than ``b[:, t]`` so backward
    stays linear in L.
    """
    a_t, b_t = a.unbind(1), b.unbind(1)
    restart = [False] * len(b_t) if resets is None else resets.tolist()
    order = range(len(b_t) - 1, -1, -1) if reverse else range(len(b_t))
    h = torch.zeros_like(b_t[0]) if initial_state is None else initial_state
    out = [None] * len(b_t)
    for t in order:
        h = b_t[t] if restart[t] else a_t[t] * h + b_t[t]
        out[t] = h
    return torch.stack(out, dim=1)
