"""Hugging Face transformers integration: ``import lrnnx.hf`` registers the ``"lrnnx"`` model
type with ``AutoConfig`` and ``AutoModelForCausalLM``.

A directory written by :meth:`lrnnx.architectures.LRNNLMHeadModel.save_pretrained` then loads
with ``transformers.AutoModelForCausalLM.from_pretrained(dir)`` as an :class:`LRNNForCausalLM`
(the same modules and weights), whose ``generate`` decodes on lrnnx's recurrent cache and which
``transformers.Trainer`` trains; what its ``save_pretrained`` writes loads with
``LRNNLMHeadModel.from_pretrained``.

Needs transformers (``pip install "lrnnx[hf]"``); ``import lrnnx`` never imports it.  Tested
with transformers 5.24 (see :mod:`lrnnx.hf.modeling` for the generation hooks used and 4.x).

Not supported: ``inputs_embeds`` (the models start from token ids), ``resize_token_embeddings``
(the vocabulary size is an lrnnx constructor argument: build a new config), assisted /
speculative decoding and beam search's cache reordering (recurrent states cannot be rolled
back or reordered by transformers).
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError('lrnnx.hf needs Hugging Face transformers: pip install "lrnnx[hf]"') from e

from transformers import AutoConfig, AutoModelForCausalLM

from lrnnx.hf.configuration import MODEL_TYPE, LRNNConfig
from lrnnx.hf.modeling import LRNNCausalLMOutput, LRNNForCausalLM, LRNNPreTrainedModel

AutoConfig.register(MODEL_TYPE, LRNNConfig, exist_ok=True)
AutoModelForCausalLM.register(LRNNConfig, LRNNForCausalLM, exist_ok=True)

__all__ = [
    "MODEL_TYPE",
    "LRNNCausalLMOutput",
    "LRNNConfig",
    "LRNNForCausalLM",
    "LRNNPreTrainedModel",
]
