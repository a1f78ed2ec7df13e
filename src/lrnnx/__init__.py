"""lrnnx: linear RNNs in PyTorch, on any device, with no compile step."""

__version__ = "0.1.0"
