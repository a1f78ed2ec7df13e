"""Core building blocks: the LRNN base class, discretizations, causal FFT convolution, checks."""

from lrnnx.core.base import LRNN
from lrnnx.core.discretization import DISCRETIZATIONS, get_discretization
from lrnnx.core.fftconv import causal_conv

__all__ = ["LRNN", "DISCRETIZATIONS", "get_discretization", "causal_conv"]
