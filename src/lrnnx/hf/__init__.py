"""Hugging Face transformers integration: ``import lrnnx.hf`` registers the ``"lrnnx"`` model
type with ``AutoConfig`` and ``AutoModelForCausalLM``.

A directory written by :meth:`lrnnx.architectures.LRNNLMHeadModel.save_pretrained` then loads
with ``transformers.AutoModelForCausalLM.from_pretrained(dir)`` as an :class:`LRNNForCausalLM`
(the same modules and weights), whose ``generate`` decodes on lrnnx's recurrent cache and which
``transformers.Trainer`` trains; what its ``save_pretrained`` writes loads with
``LRNNLMHeadModel.from_pretrained``.

Needs transformers (``pip install "lrnnx[hf]"``); ``import lrnnx`` never imports it.  Tested
with transformers 5.24 (see :mod:`lrnnx.hf.modeling` for the generation hooks used and 4.x);
refuses releases before 4.49 (:data:`MIN_TRANSFORMERS`).

Not supported: ``inputs_embeds`` (the models start from token ids), ``resize_token_embeddings``
(the vocabulary size is an lrnnx constructor argument: build a new config), assisted /
speculative decoding and beam search's cache reordering (recurrent states cannot be rolled
back or reordered by transformers).
"""

from __future__ import annotations

try:
    import transformers
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError('lrnnx.hf needs Hugging Face transformers: pip install "lrnnx[hf]"') from e

#: the oldest transformers lrnnx.hf loads with: before 4.49 from_pretrained renamed every
#: checkpoint key containing "gamma" or "beta" to "weight" / "bias" (a legacy of BERT's
#: TensorFlow ports), so LRU's gamma_log was silently left at a fresh initialisation
MIN_TRANSFORMERS = "4.49"


def check_transformers_version(version: str) -> None:
    """Raise ImportError for a transformers release older than :data:`MIN_TRANSFORMERS`."""
    from packaging.version import Version

    if Version(version) < Version(MIN_TRANSFORMERS):
        raise ImportError(
            f"lrnnx.hf needs transformers>={MIN_TRANSFORMERS}, found {version}: older releases "
            'rename parameters whose names contain "gamma" or "beta" when loading (LRU\'s '
            f'gamma_log would load re-initialised). pip install "transformers>={MIN_TRANSFORMERS}"'
        )


check_transformers_version(transformers.__version__)

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from lrnnx.hf.configuration import MODEL_TYPE, LRNNConfig  # noqa: E402
from lrnnx.hf.modeling import LRNNCausalLMOutput, LRNNForCausalLM, LRNNPreTrainedModel  # noqa: E402

AutoConfig.register(MODEL_TYPE, LRNNConfig, exist_ok=True)
AutoModelForCausalLM.register(LRNNConfig, LRNNForCausalLM, exist_ok=True)

__all__ = [
    "MODEL_TYPE",
    "LRNNCausalLMOutput",
    "LRNNConfig",
    "LRNNForCausalLM",
    "LRNNPreTrainedModel",
]
