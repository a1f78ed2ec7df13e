"""Input validation shared by every model: clear errors instead of silent broadcasts."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def check_sequence(x: Tensor, d_model: int, name: str = "x") -> None:
    """Require a floating tensor of shape (B, L, d_model)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(
            f"{name}: expected shape (B, L, {d_model}) = (batch, length, d_model), "
            f"got {tuple(x.shape)}"
        )


def check_step_input(x: Tensor, d_model: int, name: str = "x") -> Tensor:
    """Accept (B, H) or (B, 1, H) for one step; return (B, H)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 3 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() != 2 or x.shape[-1] != d_model:
        raise ValueError(
            f"{name}: expected shape (B, {d_model}) or (B, 1, {d_model}), got {tuple(x.shape)}"
        )
    return x


def lengths_mask(
    lengths: Optional[Tensor], batch: int, seqlen: int, device=None
) -> Optional[Tensor]:
    """Validate ``lengths`` (B,) and return a (B, L) boolean mask of valid positions (or None)."""
    if lengths is None:
        return None
    if not isinstance(lengths, Tensor):
        lengths = torch.as_tensor(lengths)
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise TypeError(f"lengths: expected an integer tensor, got dtype {lengths.dtype}")
    if lengths.shape != (batch,):
        raise ValueError(f"lengths: expected shape ({batch},), got {tuple(lengths.shape)}")
    if bool((lengths < 0).any()) or bool((lengths > seqlen).any()):
        raise ValueError(
            f"lengths: expected values in [0, {seqlen}], got min {int(lengths.min())} "
            f"max {int(lengths.max())}"
        )
    pos = torch.arange(seqlen, device=lengths.device)
    return (pos[None, :] < lengths[:, None]).to(device)


def check_timesteps(ts: Optional[Tensor], batch: int, seqlen: int) -> Optional[Tensor]:
    """Validate ``integration_timesteps`` (B, L): finite and >= 0."""
    if ts is None:
        return None
    if not isinstance(ts, Tensor):
        raise TypeError(f"integration_timesteps: expected a torch.Tensor, got {type(ts).__name__}")
    if not ts.is_floating_point():
        raise TypeError(f"integration_timesteps: expected a floating-point tensor, got {ts.dtype}")
    if ts.shape != (batch, seqlen):
        raise ValueError(
            f"integration_timesteps: expected shape ({batch}, {seqlen}), got {tuple(ts.shape)}"
        )
    if not bool(torch.isfinite(ts).all()) or bool((ts < 0).any()):
        raise ValueError(
            "integration_timesteps: expected finite values >= 0, got negative or non-finite"
        )
    return ts
