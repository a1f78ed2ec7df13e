"""Linear time-varying (LTV) LRNN models."""

from lrnnx.models.ltv.base import LTV_LRNN

__all__ = ["LTV_LRNN"]
