"""``Linear``: ``torch.nn.Linear`` whose product runs on :func:`lrnnx.ops.linear` (oneDNN where
torch's MKL would take its slow generic path, ``F.linear`` elsewhere).

Same parameters, initialisation, state-dict keys and ``isinstance(m, nn.Linear)``; only the
forward's GEMM backend differs (results equal up to the order of the sums).

A layer whose model initialises it differently from torch (Mamba's and S7's dt projections,
RG-LRU's LeCun-normal projections and small convolution, the LM's embedding) carries that
scheme as its ``init_fn``, so its own ``reset_parameters`` draws what the model's construction
does: torch's materialisation of a meta-device model (``to_empty`` then ``reset_parameters``
on every module, as FSDP does) would otherwise give it torch's default initialisation.
``Conv1d`` and ``Embedding`` are the torch layers with that hook and nothing else.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from lrnnx.core.base import assign_
from lrnnx.ops.linear import linear

__all__ = [
    "Conv1d",
    "Embedding",
    "Linear",
    "lecun_normal",
    "normal",
    "dt_projection",
    "rescaled",
]


class _OwnInit:
    """Mixin for a torch layer: ``reset_parameters`` runs ``init_fn(layer)`` (under no_grad)
    when the layer has one, torch's initialisation otherwise (and always inside the torch
    layer's own constructor, before a model sets ``init_fn``)."""

    #: the layer's initialisation scheme, set by the model that builds it (None: torch's)
    init_fn: Optional[Callable[[nn.Module], None]] = None

    def reset_parameters(self) -> None:
        if self.init_fn is None:
            super().reset_parameters()  # type: ignore[misc]
        else:
            with torch.no_grad():
                self.init_fn(self)


class Linear(_OwnInit, nn.Linear):
    """(..., in_features) -> (..., out_features): y = x W^T + b, see :func:`lrnnx.ops.linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class Conv1d(_OwnInit, nn.Conv1d):
    """``torch.nn.Conv1d`` with an initialisation hook (``init_fn``, see the module docstring)."""


class Embedding(_OwnInit, nn.Embedding):
    """``torch.nn.Embedding`` with an initialisation hook (``init_fn``, see the module docstring)."""


# ---- initialisation schemes (pass them with functools.partial for their arguments) ----------


def lecun_normal(layer: nn.Module) -> None:
    """Weight ~ N(0, 1 / fan_in) (fan_in: input features times kernel size), bias 0."""
    fan_in = layer.weight[0].numel()  # (out, in) or (out, in / groups, kernel)
    normal(layer, std=1.0 / math.sqrt(fan_in))


def normal(layer: nn.Module, std: float) -> None:
    """Weight ~ N(0, std^2), bias 0 (if any)."""
    nn.init.normal_(layer.weight, std=std)
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)


def rescaled(
    layer: nn.Linear, scale: float, base: Optional[Callable[[nn.Module], None]] = None
) -> None:
    """``base``'s initialisation (torch's ``nn.Linear`` one when None), then the weight times
    ``scale``: the LM's depth scaling of the residual branches' output projections."""
    if base is None:
        nn.Linear.reset_parameters(layer)
    else:
        base(layer)
    layer.weight.mul_(scale)


def dt_projection(
    layer: nn.Linear,
    dt_min: float,
    dt_max: float,
    dt_init: str = "random",
    dt_scale: float = 1.0,
    dt_init_floor: float = 1e-4,
) -> None:
    """Mamba's initialisation of the projection whose softplus gives the step sizes
    (Gu & Dao, arXiv 2312.00752, and mamba_ssm): weight U(-s, s) (``dt_init="random"``) or the
    constant s (``"constant"``), s = dt_scale / sqrt(in_features); bias the inverse softplus
    of dt log-uniform in [dt_min, dt_max] (at least ``dt_init_floor``), so that
    softplus(bias) = dt at initialisation."""
    std = layer.in_features**-0.5 * dt_scale
    if dt_init == "constant":
        nn.init.constant_(layer.weight, std)
    else:
        nn.init.uniform_(layer.weight, -std, std)
    u = torch.rand(layer.out_features, device=layer.bias.device)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    assign_(layer.bias, dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
