"""Layers shared by the architectures: the dense layer, RMSNorm, gated MLP, multi-head attention,
residual block, bidirectional wrapper."""

from lrnnx.layers.bidirectional import Bidirectional
from lrnnx.layers.block import Block
from lrnnx.layers.linear import Linear
from lrnnx.layers.mha import MHA
from lrnnx.layers.mlp import GatedMLP
from lrnnx.layers.norm import RMSNorm

__all__ = ["Bidirectional", "Block", "Linear", "MHA", "GatedMLP", "RMSNorm"]
