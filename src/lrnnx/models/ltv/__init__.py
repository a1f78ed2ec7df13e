"""Linear time-varying (LTV) LRNN models."""

from lrnnx.models.ltv.base import LTV_LRNN
from lrnnx.models.ltv.mamba import Mamba
from lrnnx.models.ltv.rglru import RGLRU

__all__ = ["LTV_LRNN", "Mamba", "RGLRU"]
