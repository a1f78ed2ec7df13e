"""Pre-norm residual block around a sequence mixer (and an optional MLP):

    x <- x + drop(act(mixer(norm(x))))
    x <- x + drop(mlp(norm2(x)))            (if an MLP is given)

The mixer follows the lrnnx mixer protocol (any model from
:func:`lrnnx.models.registry.build_mixer`, or :class:`lrnnx.layers.MHA`):
``forward(x, integration_timesteps=None, lengths=None, inference_cache=None, *,
cu_seqlens=None)``, ``step(x, cache)`` and ``allocate_inference_cache(batch_size, max_seqlen,
dtype)``.

Packed sequences (``cu_seqlens``, fla's convention: x (1, T, D) holds S sequences back to back)
go to the mixer; the norms, the activation and the MLP act on each position alone, so the
block's output equals running each sequence alone whenever the mixer's does.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrnnx.core.checks import (
    check_sequence,
    check_step_input,
    lengths_mask,
    step_output,
    zero_where_not,
)
from lrnnx.layers.norm import RMSNorm

#: pointwise activations a Block can apply to the mixer output
ACTIVATIONS: Dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "silu": F.silu,
    "relu": F.relu,
    "tanh": torch.tanh,
}


class Block(nn.Module):
    """Pre-norm residual block.

    Example:
        >>> from lrnnx.models.registry import build_mixer
        >>> block = Block(64, build_mixer("s5", 64, 64), mlp=GatedMLP(64))
        >>> y = block(torch.randn(2, 128, 64))  # (B, L, D) -> (B, L, D)

    Args:
        dim: model width D.
        mixer: the sequence mixer module (D -> D).
        mlp: optional channel MLP (D -> D), e.g. :class:`lrnnx.layers.GatedMLP`.
        norm_cls: builds the norms from ``dim`` (``norm_cls(dim)``).
        activation: optional pointwise nonlinearity after the mixer (``"gelu"``, ``"silu"``,
            ``"relu"``, ``"tanh"``); useful around linear mixers (LRU, S5) without an MLP.
        dropout: dropout on each residual branch.
    """

    def __init__(
        self,
        dim: int,
        mixer: nn.Module,
        mlp: Optional[nn.Module] = None,
        norm_cls: Callable[[int], nn.Module] = RMSNorm,
        activation: Optional[str] = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim: expected a positive int, got {dim!r}")
        if not isinstance(mixer, nn.Module):
            raise TypeError(f"mixer: expected an nn.Module, got {type(mixer).__name__}")
        if mlp is not None and not isinstance(mlp, nn.Module):
            raise TypeError(f"mlp: expected None or an nn.Module, got {type(mlp).__name__}")
        if activation is not None and activation not in ACTIVATIONS:
            raise ValueError(
                f"activation: expected None or one of {list(ACTIVATIONS)}, got {activation!r}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a float in [0, 1), got {dropout!r}")
        self.dim = dim
        self.norm = norm_cls(dim)
        self.mixer = mixer
        self.mlp = mlp
        self.norm2 = norm_cls(dim) if mlp is not None else None
        self.activation = activation
        self._act = ACTIVATIONS[activation] if activation is not None else None
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _check_packing(self, cu_seqlens: Optional[Tensor]) -> None:
        """A mixer whose forward has no ``cu_seqlens`` cannot run packed sequences."""
        if cu_seqlens is None or "cu_seqlens" in inspect.signature(self.mixer.forward).parameters:
            return
        raise ValueError(
            f"cu_seqlens: the block's mixer {type(self.mixer).__name__} does not take packed "
            "sequences (its forward has no cu_seqlens); pad the batch and pass lengths instead"
        )

    def _mixer_out(self, h: Tensor) -> Tensor:
        return self.drop(self._act(h) if self._act is not None else h)

    def forward(
        self,
        x: Tensor,
        integration_timesteps: Optional[Tensor] = None,
        lengths: Optional[Tensor] = None,
        inference_cache: Optional[Dict[str, Any]] = None,
        *,
        cu_seqlens: Optional[Tensor] = None,
    ) -> Tensor:
        """(B, L, D) -> (B, L, D); with ``lengths`` the padded positions of the output are zero.

        The arguments are forwarded to the mixer (see the module docstring); with
        ``cu_seqlens`` (S + 1,) int32/int64 offsets, x is (1, T, D) holding S packed sequences.

        Raises:
            ValueError: ``cu_seqlens`` with a mixer that does not take packed sequences (or
                whatever the mixer raises: malformed offsets, ``lengths`` too, ...).
        """
        check_sequence(x, self.dim)
        self._check_packing(cu_seqlens)
        mask = lengths_mask(lengths, x.shape[0], x.shape[1], x.device)
        if mask is not None:
            # the padding is zeroed on entry: the norms and the MLP run on every position,
            # and a NaN or inf there would reach their weights' gradients (x 0 = NaN)
            x = zero_where_not(x, mask[..., None])
        kwargs: Dict[str, Any] = {}
        if integration_timesteps is not None:
            kwargs["integration_timesteps"] = integration_timesteps
        if lengths is not None:
            kwargs["lengths"] = lengths
        if inference_cache is not None:
            kwargs["inference_cache"] = inference_cache
        if cu_seqlens is not None:
            kwargs["cu_seqlens"] = cu_seqlens
        x = x + self._mixer_out(self.mixer(self.norm(x), **kwargs))
        if self.mlp is not None:
            x = x + self.drop(self.mlp(self.norm2(x)))
        if mask is not None:
            # padded positions never reach valid ones; zeroing keeps the stream clean
            x = zero_where_not(x, mask[..., None])
        return x

    def step(
        self,
        x: Tensor,
        inference_cache: Dict[str, Any],
        integration_timesteps: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Dict[str, Any]]:
        """One timestep: x (B, D) (or (B, 1, D)) -> (y (B, D) (or (B, 1, D)), cache), cache
        updated in place."""
        layout, x = x, check_step_input(x, self.dim)
        if integration_timesteps is None:
            h, inference_cache = self.mixer.step(self.norm(x), inference_cache)
        else:
            h, inference_cache = self.mixer.step(
                self.norm(x), inference_cache, integration_timesteps=integration_timesteps
            )
        x = x + self._mixer_out(h.reshape(x.shape))
        if self.mlp is not None:
            x = x + self.drop(self.mlp(self.norm2(x)))
        return step_output(x, layout), inference_cache

    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: int = 1, dtype: Optional[torch.dtype] = None
    ) -> Dict[str, Any]:
        """The mixer's cache (the norms and the MLP are stateless)."""
        return self.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype)
