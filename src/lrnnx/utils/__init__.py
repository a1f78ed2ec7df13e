"""Utilities: autoregressive generation."""

from lrnnx.utils.generation import GenerationOutput, filter_logits, generate, sample_logits

__all__ = ["GenerationOutput", "filter_logits", "generate", "sample_logits"]
