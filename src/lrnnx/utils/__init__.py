"""Utilities: autoregressive generation, optimizer parameter groups, caches under autograd."""

from lrnnx.utils.caches import detach_cache
from lrnnx.utils.generation import GenerationOutput, filter_logits, generate, sample_logits
from lrnnx.utils.optim import param_groups

__all__ = [
    "GenerationOutput",
    "detach_cache",
    "filter_logits",
    "generate",
    "sample_logits",
    "param_groups",
]
