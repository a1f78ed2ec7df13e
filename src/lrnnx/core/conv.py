"""Causal depthwise convolution with a streaming state (the short conv of Mamba and Griffin)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lrnnx.ops import causal_conv1d
from lrnnx.ops.causal_conv1d.packing import padded_window, segment_tails


def causal_depthwise_conv(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    history: Optional[Tensor] = None,
    *,
    cu_seqlens: Optional[Tensor] = None,
    activation: Optional[str] = None,
    keep_window: bool = True,
    backend: Optional[str] = None,
) -> tuple[Tensor, Optional[Tensor]]:
    """y_t = bias + sum_j weight[:, j] x_{t - K + 1 + j}, channel by channel (then silu(y_t)
    with ``activation="silu"``, fused in the kernels).

    Args:
        x: (B, D, L) input; (1, D, T) holding S sequences back to back with ``cu_seqlens``.
        weight: (D, 1, K) depthwise kernel (nn.Conv1d layout).
        bias: (D,) or None.
        history: (B, D, K - 1) the inputs before x (zeros when None: a fresh sequence);
            (S, D, K - 1), one per sequence, with ``cu_seqlens``.
        cu_seqlens: (S + 1,) int64 offsets of packed sequences (fla's convention, see
            :func:`lrnnx.ops.causal_conv1d`): every sequence is convolved as if alone, its
            window starting with its own history.
        activation: None or ``"silu"`` (see :func:`lrnnx.ops.causal_conv1d`).
        keep_window: build the window (a copy of x); False when no cache needs it (the
            window returned is then None).
        backend: the convolution's backend (``"torch"`` pins ``F.conv1d``); None: lrnnx's
            choice (see :func:`lrnnx.ops.causal_conv1d`).

    The convolution is :func:`lrnnx.ops.causal_conv1d` (fused forward and backward kernels on
    CPU, ``F.conv1d`` elsewhere); y is in x's dtype, accumulated in float32 for bfloat16/float16.

    Returns:
        y (B, D, L) and the padded window it was computed from, from which :func:`window_tail`
        reads the streaming state: (B, D, K - 1 + L) = [history, x]; with ``cu_seqlens``
        (1, D, T + S (K - 1)) = [history_0, x_0, history_1, x_1, ...] (pass the same
        ``cu_seqlens`` to :func:`window_tail`).

    Raises:
        ValueError: from :func:`lrnnx.ops.causal_conv1d` (shapes, malformed ``cu_seqlens``,
            or ``cu_seqlens`` with B != 1).
    """
    D, K = weight.shape[0], weight.shape[-1]
    y = causal_conv1d(
        x, weight.reshape(D, K), bias, initial_states=history, activation=activation,
        backend=backend, cu_seqlens=cu_seqlens,
    )  # fmt: skip
    if not keep_window:
        return y, None
    history = None if history is None else history.to(x.dtype)
    if cu_seqlens is not None:
        window = padded_window(x, history, cu_seqlens.to(x.device, torch.int64), K - 1)
        return y, window
    if history is None:
        history = x.new_zeros(x.shape[0], x.shape[1], K - 1)
    window = torch.cat([history, x], dim=-1)  # one copy of x: cheap beside the conv
    return y, window


def window_tail(
    window: Tensor,
    width: int,
    history: int,
    lengths: Optional[Tensor],
    cu_seqlens: Optional[Tensor] = None,
) -> Tensor:
    """The last ``width`` entries of each sequence's window, ending at its own length.

    ``window`` is (B, D, history + L) as returned by :func:`causal_depthwise_conv`; with
    ``lengths`` (B,) the tail of sequence b ends at window index history + lengths[b] - 1.
    With ``cu_seqlens`` (S + 1,) (``lengths`` None) the window is the packed one and the
    result is (S, D, width), each sequence's tail.  Entries before a sequence's window (a
    ``width`` beyond history + its length) are 0.
    """
    if cu_seqlens is not None:
        return segment_tails(window, cu_seqlens.to(window.device, torch.int64), history, width)
    if lengths is None:
        return window[..., window.shape[-1] - width :]
    end = history + lengths.to(window.device)  # exclusive end in window coordinates
    idx = end[:, None] - width + torch.arange(width, device=window.device)  # (B, width)
    # a sequence shorter than the width reaches into the history; before that there is nothing
    valid = idx >= 0
    idx = idx.clamp(min=0)
    tail = window.gather(-1, idx[:, None, :].expand(-1, window.shape[1], -1))
    return tail * valid[:, None, :]
