"""Causal depthwise convolution with a streaming state (the short conv of Mamba and Griffin)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lrnnx.ops import causal_conv1d


def causal_depthwise_conv(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], history: Optional[Tensor] = None
) -> tuple[Tensor, Tensor]:
    """y_t = bias + sum_j weight[:, j] x_{t - K + 1 + j}, channel by channel.

    Args:
        x: (B, D, L) input.
        weight: (D, 1, K) depthwise kernel (nn.Conv1d layout).
        bias: (D,) or None.
        history: (B, D, K - 1) the inputs before x (zeros when None: a fresh sequence).

    The convolution is :func:`lrnnx.ops.causal_conv1d` (fused forward and backward kernels on
    CPU, ``F.conv1d`` elsewhere); y is in x's dtype, accumulated in float32 for bfloat16/float16.

    Returns:
        y (B, D, L) and the padded window (B, D, K - 1 + L) it was computed from, from which
        :func:`window_tail` reads the streaming state.
    """
    D, K = weight.shape[0], weight.shape[-1]
    y = causal_conv1d(x, weight.reshape(D, K), bias, initial_states=history)
    if history is None:
        history = x.new_zeros(x.shape[0], x.shape[1], K - 1)
    window = torch.cat([history.to(x.dtype), x], dim=-1)  # one copy of x: cheap beside the conv
    return y, window


def window_tail(window: Tensor, width: int, history: int, lengths: Optional[Tensor]) -> Tensor:
    """The last ``width`` entries of each sequence's window, ending at its own length.

    ``window`` is (B, D, history + L) as returned by :func:`causal_depthwise_conv`; with
    ``lengths`` (B,) the tail of sequence b ends at window index history + lengths[b] - 1.
    """
    if lengths is None:
        return window[..., window.shape[-1] - width :]
    end = history + lengths.to(window.device)  # exclusive end in window coordinates
    idx = end[:, None] - width + torch.arange(width, device=window.device)  # (B, width)
    # a sequence shorter than the width reaches into the history; before that there is nothing
    valid = idx >= 0
    idx = idx.clamp(min=0)
    tail = window.gather(-1, idx[:, None, :].expand(-1, window.shape[1], -1))
    return tail * valid[:, None, :]
