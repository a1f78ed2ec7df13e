"""Packed sequences for ``causal_conv1d``: the padded window of S sequences.

With ``cu_seqlens`` (fla's convention, see :mod:`lrnnx.ops.linear_scan.packing`) x (1, D, T)
holds S sequences back to back, and each one's convolution sees its own P = K - 1 initial
states before its first step, never the end of the previous sequence.  The padded window puts
each sequence's initial states right before its inputs::

    window = [h_0, x_(seq 0), h_1, x_(seq 1), ..., h_(S-1), x_(seq S-1)]     (1, D, T + S P)

so sequence s occupies ``window[off[s] : off[s + 1]]`` with ``off = cu_seqlens + P * arange(S + 1)``
(the window's own offsets): exactly the window [h_s, x_s] it would have alone.  A valid
convolution of the window gives every step's output at window index ``t + seq(t) P``, and each
sequence's final states are the last P entries of its segment.  All index arithmetic, no loop
over sequences.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lrnnx.ops.linear_scan.packing import step_layout

__all__ = ["window_offsets", "input_positions", "padded_window", "segment_tails"]


def window_offsets(cu: Tensor, P: int) -> Tensor:
    """The offsets (S + 1,) of the S segments of the padded window: ``cu[s] + s P``."""
    return cu + P * torch.arange(cu.shape[0], device=cu.device)


def input_positions(cu: Tensor, P: int) -> Tensor:
    """Window index (T,) of every step t of x: ``t + (seq(t) + 1) P``."""
    seq = step_layout(cu, False)[0]
    return torch.arange(seq.shape[0], device=cu.device) + (seq + 1) * P


def padded_window(x: Tensor, initial_states: Optional[Tensor], cu: Tensor, P: int) -> Tensor:
    """The padded window (1, D, T + S P) of x (1, D, T) with initial_states (S, D, P) (zeros
    when None); ``cu`` (S + 1,) on x's device.  Differentiable in x and initial_states."""
    D, T = x.shape[1], x.shape[2]
    off = window_offsets(cu, P)
    window = x.new_zeros(1, D, T + (cu.shape[0] - 1) * P)  # sizes from shapes: no device sync
    window = window.index_copy(-1, input_positions(cu, P), x)
    if initial_states is not None and P > 0:
        S = initial_states.shape[0]
        pos = (off[:-1, None] + torch.arange(P, device=cu.device)).reshape(S * P)
        states = initial_states.to(x.dtype).permute(1, 0, 2).reshape(1, D, S * P)
        window = window.index_copy(-1, pos, states)
    return window


def segment_tails(window: Tensor, cu: Tensor, P: int, width: int) -> Tensor:
    """The last ``width`` entries of every sequence's segment of the padded window, (S, D,
    width); entries before a segment's start (``width`` > P + its length) are 0."""
    off = window_offsets(cu, P)
    S, D = off.shape[0] - 1, window.shape[1]
    if window.shape[-1] == 0 or width == 0:
        return window.new_zeros(S, D, width)
    idx = off[1:, None] - width + torch.arange(width, device=cu.device)  # (S, width)
    valid = idx >= off[:-1, None]
    tails = window[0][:, idx.clamp(min=0)].permute(1, 0, 2)  # (S, D, width)
    return torch.where(valid[:, None, :], tails, tails.new_zeros(()))
