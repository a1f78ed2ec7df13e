"""Complete models built from lrnnx mixers: a language model, a classifier and a 1-D U-Net."""

from lrnnx.architectures._common import ChecksumError
from lrnnx.architectures.classifier import Classifier
from lrnnx.architectures.lm import LRNNLMHeadModel
from lrnnx.architectures.unet import UNet

__all__ = ["ChecksumError", "Classifier", "LRNNLMHeadModel", "UNet"]
