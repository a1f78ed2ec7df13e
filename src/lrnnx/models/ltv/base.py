"""Base class for LTV (linear time-varying) models.

LTV models have input-dependent dynamics (A, B, C may change at every timestep), so they cannot
use an FFT convolution: they run a scan for training and inference alike.  They support the
asynchronous (event-driven) discretization, whose elapsed times between events come in
through ``integration_timesteps``.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from lrnnx.core.base import LRNN, not_implemented
from lrnnx.core.checks import check_sequence, check_timesteps, lengths_mask


class LTV_LRNN(LRNN):
    """Base class for all LTV LRNN models.

    ``discretization`` is one of ``"zoh"``, ``"bilinear"``, ``"dirac"``, ``"async"``,
    ``"no_discretization"``, or ``None`` for models that discretize internally.

    The class itself can be instantiated (``LTV_LRNN("zoh")``, as in the original lrnnx); its
    abstract methods then raise NotImplementedError.  A subclass must implement them all.
    """

    _interface = True

    def __init__(self, discretization: Optional[str]):
        super().__init__(discretization=discretization)

    @abstractmethod
    def forward(
        self,
        x: Tensor,
        integration_timesteps: Optional[Tensor] = None,
        lengths: Optional[Tensor] = None,
        inference_cache: Optional[Dict[str, Any]] = None,
    ) -> Tensor:
        """x (B, L, H) -> (B, L, H).

        Args:
            integration_timesteps: (B, L) time elapsed since the previous element (>= 0) for
                event-driven discretization (arXiv 2404.18508); None means uniform steps.
            lengths: (B,) valid lengths; outputs at padded positions are zero and each
                sequence's final state is its state at its own length.
            inference_cache: from ``allocate_inference_cache``; the forward starts from its state
                and leaves the final state there, so ``step`` continues the sequence.
        """
        raise not_implemented(self, "forward")

    @abstractmethod
    def step(
        self, x: Tensor, inference_cache: Dict[str, Any], **kwargs
    ) -> Tuple[Tensor, Dict[str, Any]]:
        """One timestep: x (B, 1, H) or (B, H) -> y of the same shape; the cache is updated in place."""
        raise not_implemented(self, "step")

    @abstractmethod
    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: int, dtype: Optional[torch.dtype] = None, **kwargs
    ) -> Dict[str, Any]:
        """State tensors (e.g. ``"lrnn_state"``, ``"conv_state"``) and ``"seqlen_offset"``."""
        raise not_implemented(self, "allocate_inference_cache")

    def _refuse_timesteps(self, integration_timesteps: Any) -> None:
        """For a model without an event-driven mode (forward and step alike).

        Raises:
            ValueError: ``integration_timesteps`` is given (not None).
        """
        if integration_timesteps is not None:
            raise ValueError(
                f"integration_timesteps: {type(self).__name__} has no event-driven mode; pass None"
            )

    def _check_forward_args(
        self,
        x: Tensor,
        integration_timesteps: Optional[Tensor],
        lengths: Optional[Tensor],
        supports_timesteps: bool = True,
    ) -> Optional[Tensor]:
        """Validate the forward arguments; return the (B, L) mask of valid positions or None."""
        check_sequence(x, self.d_model)
        B, L, _ = x.shape
        if not supports_timesteps:
            self._refuse_timesteps(integration_timesteps)
        mask = lengths_mask(lengths, B, L, x.device)
        check_timesteps(integration_timesteps, B, L, mask)
        return mask
