"""The root class of every lrnnx model."""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Any, Dict, Optional, Tuple

from torch import Tensor, nn

from lrnnx.core.discretization import DISCRETIZATIONS, get_discretization


class LRNN(nn.Module, metaclass=ABCMeta):
    """Base class of all linear RNNs.

    Holds the discretization rule, chosen by name from
    :data:`lrnnx.core.discretization.DISCRETIZATIONS` (``None`` for models that discretize
    internally).  Subclasses implement ``forward`` (parallel, over a whole sequence),
    ``step`` (one timestep, for inference) and ``allocate_inference_cache``.
    """

    #: discretizations this class accepts; subclasses narrow it
    allowed_discretizations: Tuple[str, ...] = tuple(DISCRETIZATIONS)

    def __init__(self, discretization: Optional[str]):
        super().__init__()
        self.discretization = discretization
        self.discretize_fn = (
            None
            if discretization is None
            else get_discretization(discretization, self.allowed_discretizations)
        )

    @abstractmethod
    def forward(self, x: Tensor, *args, **kwargs):
        """Process a whole sequence x of shape (B, L, H)."""

    @abstractmethod
    def step(self, x: Tensor, inference_cache: Dict[str, Any], **kwargs):
        """Advance the recurrence by one timestep."""

    @abstractmethod
    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: int = 1, dtype=None, **kwargs
    ) -> Dict[str, Any]:
        """Create the state (and precomputed matrices) that ``step`` updates."""
