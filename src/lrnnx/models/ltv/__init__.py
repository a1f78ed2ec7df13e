"""Linear time-varying (LTV) LRNN models."""

from lrnnx.models.ltv.base import LTV_LRNN
from lrnnx.models.ltv.mamba import Mamba
from lrnnx.models.ltv.rglru import RGLRU
from lrnnx.models.ltv.s5 import S5
from lrnnx.models.ltv.s7 import S7

__all__ = ["LTV_LRNN", "Mamba", "RGLRU", "S5", "S7"]
