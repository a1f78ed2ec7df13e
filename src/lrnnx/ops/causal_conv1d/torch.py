"""Causal depthwise convolution in pure torch (``F.conv1d`` on the padded window); any device.

Autograd is torch's own (``aten::convolution_backward``), which on some CPUs is very slow for
depthwise kernels: the ``cpu`` backend replaces it there.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_conv1d(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], initial_states: Optional[Tensor], silu: bool
) -> Tensor:
    """Same arguments and result as :func:`lrnnx.ops.causal_conv1d.reference.causal_conv1d`."""
    B, D, _ = x.shape
    K = weight.shape[1]
    if initial_states is None:
        window = F.pad(x, (K - 1, 0))
    else:
        window = torch.cat([initial_states, x], dim=-1)
    y = F.conv1d(window, weight.unsqueeze(1), bias, groups=D)
    return F.silu(y) if silu else y
