"""Primitives behind every model. Models call these; each picks its backend by device."""

from lrnnx.ops.cauchy import cauchy
from lrnnx.ops.causal_conv1d import causal_conv1d
from lrnnx.ops.linear import linear
from lrnnx.ops.linear_scan import linear_scan
from lrnnx.ops.selective_scan import selective_scan_fn

# (each name is the op's function, which shadows its subpackage as an attribute: import a
# backend module with ``from lrnnx.ops.<op> import cpu``)
__all__ = ["cauchy", "causal_conv1d", "linear", "linear_scan", "selective_scan_fn"]
