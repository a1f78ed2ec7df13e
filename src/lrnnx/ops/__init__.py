"""Primitives behind every model. Models call these; each picks its backend by device."""

from lrnnx.ops.linear_scan import linear_scan

__all__ = ["linear_scan"]
