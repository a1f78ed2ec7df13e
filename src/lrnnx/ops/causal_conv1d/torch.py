"""Causal depthwise convolution in pure torch (``F.conv1d`` on the padded window); any device.

Packed sequences (``cu_seqlens``): one valid convolution of the padded window (each sequence's
initial states inserted before it, :mod:`lrnnx.ops.causal_conv1d.packing`), read back at the
steps' positions; index arithmetic only, no loop over sequences.

Autograd is torch's own (``aten::convolution_backward``), which on some CPUs is very slow for
depthwise kernels: the ``cpu`` backend replaces it there.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lrnnx.ops.causal_conv1d.packing import input_positions, padded_window


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    initial_states: Optional[Tensor],
    silu: bool,
    cu_seqlens: Optional[Tensor] = None,
) -> Tensor:
    """Same arguments and result as :func:`lrnnx.ops.causal_conv1d.reference.causal_conv1d`."""
    D = x.shape[1]
    P = weight.shape[1] - 1
    if cu_seqlens is not None:
        cu = cu_seqlens.to(x.device)
        window = padded_window(x, initial_states, cu, P)
        y = F.conv1d(window, weight.unsqueeze(1), bias, groups=D)
        # output of step t: the window position of x_t minus P
        y = y.index_select(-1, input_positions(cu, P) - P)
    else:
        if initial_states is None:
            window = F.pad(x, (P, 0))
        else:
            window = torch.cat([initial_states, x], dim=-1)
        y = F.conv1d(window, weight.unsqueeze(1), bias, groups=D)
    return F.silu(y) if silu else y
