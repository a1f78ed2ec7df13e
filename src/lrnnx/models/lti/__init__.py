"""Linear time-invariant (LTI) LRNN models."""

from lrnnx.models.lti.base import LTI_LRNN
from lrnnx.models.lti.centaurus import (
    Centaurus,
    CentaurusDWS,
    CentaurusFull,
    CentaurusNeck,
    CentaurusPWNeck,
)
from lrnnx.models.lti.lru import LRU
from lrnnx.models.lti.s4 import S4
from lrnnx.models.lti.s4d import S4D
from lrnnx.models.lti.s5 import S5

__all__ = [
    "LTI_LRNN",
    "Centaurus",
    "CentaurusDWS",
    "CentaurusFull",
    "CentaurusNeck",
    "CentaurusPWNeck",
    "LRU",
    "S4",
    "S4D",
    "S5",
]
