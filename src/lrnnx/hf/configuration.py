"""``LRNNConfig``: transformers' configuration of :class:`lrnnx.architectures.LRNNLMHeadModel`.

Its attributes are exactly ``LRNNLMHeadModel``'s constructor arguments (read from the
constructor's signature, so the two never drift apart), plus transformers' own attributes
(``tie_word_embeddings``, token ids, ``dtype``, ...).  ``config.json`` files are shared: one
written by ``LRNNLMHeadModel.save_pretrained`` loads here, and one written by
``LRNNConfig.save_pretrained`` holds every constructor argument, so that
``LRNNLMHeadModel.from_pretrained`` can rebuild the model from it.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict

from transformers import PretrainedConfig

from lrnnx.architectures._common import (
    CHECKSUM_KEY,
    EXTRA_STATE_CONFIG_KEY,
    HF_MODEL_TYPES,
    class_path,
)
from lrnnx.architectures.lm import LRNNLMHeadModel

MODEL_TYPE = HF_MODEL_TYPES[class_path(LRNNLMHeadModel)]

#: values of the arguments that LRNNLMHeadModel requires, for ``LRNNConfig()`` without
#: arguments (transformers builds one, e.g. to write only the non-default attributes): the
#: size of Mamba-130m (d_model 768, 24 layers, GPT-NeoX's 50280 tokens)
REQUIRED_DEFAULTS: Dict[str, Any] = {
    "d_model": 768,
    "d_state": 16,
    "n_layer": 24,
    "vocab_size": 50280,
    "mixer_types": "mamba",
}


def lm_arguments() -> Dict[str, Any]:
    """``LRNNLMHeadModel``'s constructor arguments -> their defaults (required ones from
    :data:`REQUIRED_DEFAULTS`)."""
    out: Dict[str, Any] = {}
    for name, p in inspect.signature(LRNNLMHeadModel.__init__).parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if name in ("device", "dtype"):  # torch's factory arguments, not the architecture's
            continue
        out[name] = REQUIRED_DEFAULTS[name] if p.default is p.empty else p.default
    return out


class LRNNConfig(PretrainedConfig):
    """transformers configuration of an lrnnx language model (``model_type = "lrnnx"``).

    Example:
        >>> config = LRNNConfig(d_model=64, d_state=16, n_layer=3, vocab_size=100,
        ...                     mixer_types=["s5", "attn", "mamba"])
        >>> model = LRNNForCausalLM(config)          # lrnnx.hf.LRNNForCausalLM

    Args:
        **kwargs: :class:`lrnnx.architectures.LRNNLMHeadModel`'s arguments (``d_model``,
            ``d_state``, ``n_layer``, ``vocab_size``, ``mixer_types``, ``mixer_kwargs``,
            ``d_intermediate``, ``num_heads``, ``tie_embeddings``, ...; the required ones
            default to :data:`REQUIRED_DEFAULTS`) and transformers' ``PretrainedConfig``
            arguments (``bos_token_id``, ``eos_token_id``, ``pad_token_id``, ``use_cache``,
            ...).  ``tie_word_embeddings`` (transformers' name) is ``tie_embeddings``.
            ``lrnnx_extra_state`` holds the modules' extra states that are JSON values, not
            tensors (``get_extra_state`` of a custom mixer; state_dict key -> value; S4's
            kernel length in configs written before it was a tensor), which transformers does
            not keep in its weights files; ``LRNNForCausalLM`` fills it when saving.

    Raises:
        ValueError: ``tie_embeddings`` and ``tie_word_embeddings`` disagree.
    """

    model_type = MODEL_TYPE

    def __init__(self, **kwargs: Any) -> None:
        kwargs.pop(CHECKSUM_KEY, None)  # lrnnx's checksum of its own weights file, not an argument
        given_tie = "tie_embeddings" in kwargs
        self.lrnnx_extra_state: Dict[str, Any] = dict(
            kwargs.pop(EXTRA_STATE_CONFIG_KEY, None) or {}
        )
        for name, default in lm_arguments().items():
            setattr(self, name, kwargs.pop(name, default))
        tie_word = kwargs.pop("tie_word_embeddings", None)
        if tie_word is not None:
            if given_tie and bool(tie_word) != bool(self.tie_embeddings):
                raise ValueError(
                    f"tie_word_embeddings={tie_word!r} and tie_embeddings={self.tie_embeddings!r} "
                    "disagree; they name the same setting, give one"
                )
            self.tie_embeddings = bool(tie_word)
        # set here: recent transformers versions drop generation settings given to the base class
        self.use_cache = bool(kwargs.pop("use_cache", True))
        super().__init__(tie_word_embeddings=bool(self.tie_embeddings), **kwargs)

    def lrnnx_kwargs(self) -> Dict[str, Any]:
        """The keyword arguments of ``LRNNLMHeadModel(**config.lrnnx_kwargs())``."""
        return {name: getattr(self, name) for name in lm_arguments()}

    def to_diff_dict(self) -> Dict[str, Any]:
        """transformers writes only non-default attributes; every constructor argument is kept
        too, so that ``LRNNLMHeadModel.from_pretrained`` can read the file on its own."""
        out = {**super().to_diff_dict(), **self.lrnnx_kwargs()}
        if not self.lrnnx_extra_state:
            out.pop(EXTRA_STATE_CONFIG_KEY, None)
        return out
