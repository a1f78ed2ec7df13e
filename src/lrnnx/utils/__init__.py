"""Utilities: autoregressive generation, optimizer parameter groups."""

from lrnnx.utils.generation import GenerationOutput, filter_logits, generate, sample_logits
from lrnnx.utils.optim import param_groups

__all__ = ["GenerationOutput", "filter_logits", "generate", "sample_logits", "param_groups"]
