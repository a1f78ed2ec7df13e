"""``LRNNForCausalLM``: :class:`lrnnx.architectures.LRNNLMHeadModel` as a transformers model
(``PreTrainedModel`` + ``GenerationMixin``), for ``AutoModelForCausalLM``, ``generate`` and
``Trainer``.

The model is an ``LRNNLMHeadModel`` (same modules, same ``state_dict`` keys: ``embedding``,
``layers.*``, ``norm_f``, ``lm_head``), so one ``model.safetensors`` serves both classes, and
its computation is ``LRNNLMHeadModel``'s own (``forward`` / ``step``), not a copy.

Generation keeps lrnnx's inference cache (every layer's recurrent state, and the KV caches of
the attention layers, sized for the generation's ``max_length``) in the model keyword
``inference_cache``: the prompt is prefilled with one parallel forward, then each new token
costs one ``LRNNLMHeadModel.step``.  transformers' own ``Cache`` classes are not used
(like ``MambaForCausalLM`` of transformers 4.x with its ``cache_params``), so the hooks this
relies on are ``prepare_inputs_for_generation``, ``_update_model_kwargs_for_generation`` and
``_prepare_cache_for_generation`` (the last two are transformers-internal).  Supported and
tested: transformers 5.24.  The hooks exist with the same leading arguments since 4.46; the
``hf`` extra's floor is 4.49 (see :data:`lrnnx.hf.MIN_TRANSFORMERS`), and 4.x is not tested
beyond a run of the suite at 4.46 (whose one wrong result, LRU's renamed gamma_log, set
that floor); a version whose ``generate`` no longer calls
``_prepare_cache_for_generation`` still works for recurrent-only models and asks for an
explicit ``inference_cache=`` when there are attention layers.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.utils import ModelOutput

from lrnnx.architectures._common import _encode_extra, _is_extra_key, _owner
from lrnnx.architectures.lm import LRNNLMHeadModel
from lrnnx.hf.configuration import LRNNConfig
from lrnnx.utils.generation import _prompt_layout

#: model keyword under which generate() carries the KV-cache length (the generation's
#: max_length) from _prepare_cache_for_generation to the first prepare_inputs_for_generation
_MAX_SEQLEN_KEY = "inference_cache_max_seqlen"


@dataclass
class LRNNCausalLMOutput(ModelOutput):
    """What :meth:`LRNNForCausalLM.forward` returns.

    Attributes:
        loss: with ``labels``, the mean next-token cross-entropy (a scalar tensor).
        logits: (B, L, vocab_size) next-token logits (zero at padded positions).
        inference_cache: the cache the forward started from and advanced (in place), if any.
    """

    loss: Optional[Tensor] = None
    logits: Optional[Tensor] = None
    inference_cache: Optional[Dict[Any, Any]] = None


def _is_loaded(t: Tensor) -> bool:
    """Whether transformers marked ``t`` as loaded from a checkpoint (or tied to one that is)."""
    return bool(getattr(t, "_is_hf_initialized", False))


class LRNNPreTrainedModel(PreTrainedModel):
    """transformers' base class settings shared by the lrnnx models."""

    config_class = LRNNConfig
    main_input_name = "input_ids"
    # the state after a token cannot be rolled back: no assisted / speculative decoding
    _is_stateful = True
    _no_split_modules = ["Block"]
    # modules' extra states that are Python values travel in the config, not in the weights
    # file.  transformers before 5 reads this class attribute (regexes); 5 reads the instance's,
    # which each model sets to its own keys exactly (see LRNNForCausalLM.__init__)
    _keys_to_ignore_on_load_missing = [r"(^|\.)_extra_state$"]
    supports_gradient_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        """transformers' initialisation of the tensors a checkpoint did not provide (and of a
        model built from a config): the module's own scheme (``reset_parameters``: its
        paper's HiPPO or ring spectra, step ranges, ...; transformers' generic normal one
        would break them), never touching what transformers marks as loaded (flag
        ``_is_hf_initialized``): a model's reset covers its submodules, whose loaded tensors
        and extra states (S4's kernel length, which the config gave and the loaded C means)
        are put back afterwards."""
        reset = getattr(module, "reset_parameters", None)
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if not callable(reset) or all(map(_is_loaded, own)):
            return
        loaded = [t for t in (*module.parameters(), *module.buffers()) if _is_loaded(t)]
        values = [t.detach().clone() for t in loaded]
        extra = {
            sub: copy.deepcopy(sub.get_extra_state())
            for sub in module.modules()
            if type(sub).get_extra_state is not nn.Module.get_extra_state
        }
        with torch.no_grad():
            reset()
            for t, value in zip(loaded, values, strict=True):
                t.copy_(value)
        for sub, state in extra.items():
            sub.set_extra_state(state)


class LRNNForCausalLM(LRNNPreTrainedModel, GenerationMixin):
    """An lrnnx language model (any mixer per layer, attention included) for transformers.

    Example:
        >>> import lrnnx.hf                               # registers model_type "lrnnx"
        >>> from transformers import AutoModelForCausalLM
        >>> model = AutoModelForCausalLM.from_pretrained("ckpt")  # LRNNLMHeadModel.save_pretrained
        >>> out = model.generate(ids, max_new_tokens=32, do_sample=True, top_p=0.9)

    Args:
        config: an :class:`lrnnx.hf.LRNNConfig` (``LRNNLMHeadModel``'s arguments).
    """

    _tied_weights_keys = {"lm_head.weight": "embedding.weight"}

    def __init__(self, config: LRNNConfig) -> None:
        super().__init__(config)
        # from_pretrained(dtype=...) (or a config's "dtype") builds the model under that default
        # dtype, which only the tensors created without an explicit dtype would follow (and
        # which some models refuse to build in: 16 bits); the LM is built in float32, then a
        # cast applies lrnnx's precision policy to every tensor (float64 everywhere; the
        # recurrences' own tensors float32 under 16-bit dtypes), as
        # LRNNLMHeadModel.from_pretrained(dtype=...) does
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)
        try:
            lm = LRNNLMHeadModel(**config.lrnnx_kwargs())
        finally:
            torch.set_default_dtype(default)
        if default != torch.float32:
            lm.to(default)
        # the LM's modules become this model's own children (identical state_dict keys); the
        # LM object itself stays unregistered and runs forward / step on those same modules
        for name, child in lm.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "_lm", lm)
        for key, value in config.lrnnx_extra_state.items():
            _owner(self, key)[0].set_extra_state(value)
        # (their weights files lack these keys: transformers need not report them missing)
        self._keys_to_ignore_on_load_missing = {
            rf"^{re.escape(k)}$" for k in config.lrnnx_extra_state
        }
        # initialised by the LM's construction: transformers' post_init need not draw every
        # tensor again (and reset S4's kernel length the config gave).  Not on the meta device,
        # where from_pretrained builds: there its loader marks what it loads, and the keys a
        # checkpoint lacks must stay unmarked to be initialised
        for t in (*self.parameters(), *self.buffers()):
            if not t.is_meta:
                t._is_hf_initialized = True
        self.post_init()

    def state_dict(self, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        """torch's ``state_dict`` without the modules' extra states that are Python values,
        not tensors: transformers saves and loads the state_dict as weights, so those travel in
        ``config.lrnnx_extra_state`` instead (tensor ones, S4's kernel length, stay)."""
        state = super().state_dict(*args, **kwargs)
        for key in [k for k in state if k.endswith("_extra_state")]:
            if not isinstance(state[key], Tensor):
                del state[key]
        return state

    def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``save_pretrained``, with the modules' current JSON extra states in
        the config (``LRNNLMHeadModel.from_pretrained`` reads them from there too); tensor
        extra states (S4's kernel length) are saved among the weights, as transformers does.

        Raises:
            TypeError: an extra state that is neither a tensor nor a JSON value.
        """
        full = nn.Module.state_dict(self, keep_vars=True)
        extra = {k: v for k, v in full.items() if _is_extra_key(self, k)}
        self.config.lrnnx_extra_state = _encode_extra(self, extra)[0]
        return super().save_pretrained(save_directory, *args, **kwargs)

    @property
    def lm(self) -> LRNNLMHeadModel:
        """The :class:`LRNNLMHeadModel` sharing this model's modules (e.g. for
        :func:`lrnnx.utils.generation.generate` or its ``save_pretrained``)."""
        self._lm.train(self.training)
        return self._lm

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embedding = value
        self._lm.embedding = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> Any:
        """Not supported (see :mod:`lrnnx.hf`).

        Raises:
            NotImplementedError: always.  transformers' own would swap the embedding and head
                but leave the LM's vocabulary (and its padding rows) as built: new ids refused,
                the loss failing, a saved checkpoint that no longer loads.
        """
        raise NotImplementedError(
            "resize_token_embeddings: the vocabulary size of an lrnnx LM is a constructor "
            "argument (vocab_size, padded to pad_vocab_size_multiple); build a new "
            "LRNNConfig(vocab_size=...) model and copy the rows you keep"
        )

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value
        self._lm.lm_head = value

    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: Optional[int] = None, dtype: Optional[torch.dtype] = None
    ) -> Dict[Any, Any]:
        """:meth:`LRNNLMHeadModel.allocate_inference_cache` (``max_seqlen``: prompt + new
        tokens, required with attention layers)."""
        return self._lm.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype)

    def step(self, input_ids: Tensor, inference_cache: Dict[Any, Any]) -> Tuple[Tensor, Dict]:
        """:meth:`LRNNLMHeadModel.step`: input_ids (B,) -> (logits (B, vocab_size), cache)."""
        return self._lm.step(input_ids, inference_cache)

    # ------------------------------------------------------------------------------- forward
    def forward(
        self,
        input_ids: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        inference_cache: Optional[Dict[Any, Any]] = None,
        use_cache: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        inputs_embeds: Optional[Tensor] = None,
        **kwargs: Any,
    ) -> Union[LRNNCausalLMOutput, Tuple[Tensor, ...]]:
        """input_ids (B, L) -> logits (B, L, vocab_size), and the loss with ``labels``.

        Args:
            input_ids: token ids (integer dtype).
            attention_mask: (B, L) 1 for tokens, 0 for padding; each row's 1s contiguous (left
                or right padding).  Rows are computed as if alone (the recurrences never see
                the padding); logits at padded positions are zero.  With a filled
                ``inference_cache`` (continuing), the new tokens must not be padded.
            labels: (B, L) targets; the loss is the mean cross-entropy of ``logits[:, t]``
                against ``labels[:, t + 1]`` over the labels that are not -100 (transformers'
                causal-LM loss; the model shifts, so ``labels = input_ids`` is the usual choice).
            inference_cache: from :meth:`allocate_inference_cache`, advanced in place: a single
                token per row is one :meth:`LRNNLMHeadModel.step`, several are a prefill.
            use_cache: accepted for transformers' API; a cache is used when one is passed.
            return_dict: False returns a tuple (loss if any, logits, cache if any).
            inputs_embeds: not supported (ValueError): the recurrences start from token ids.
            **kwargs: ``num_items_in_batch`` (from ``Trainer``) reaches the loss; transformers'
                other generation keywords are ignored.

        Raises:
            ValueError: ``inputs_embeds``, a malformed ``attention_mask``, padded new tokens
                on a filled cache, or the errors of :meth:`LRNNLMHeadModel.forward`.
        """
        if inputs_embeds is not None:
            raise ValueError(
                "inputs_embeds: not supported by lrnnx models (got a tensor); pass input_ids"
            )
        if input_ids is None:
            raise ValueError("input_ids: required, got None")
        mask = self._new_tokens_mask(attention_mask, input_ids, inference_cache)
        if inference_cache is not None and input_ids.dim() == 2 and input_ids.shape[1] == 1:
            logits = self._lm.step(input_ids, inference_cache)[0][:, None]
        else:
            logits = self._padded_forward(input_ids, mask, inference_cache)
        loss = None
        if labels is not None:
            loss = self._loss(logits, labels, kwargs.get("num_items_in_batch"))
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        out = LRNNCausalLMOutput(loss=loss, logits=logits, inference_cache=inference_cache)
        return out if return_dict else out.to_tuple()

    def _new_tokens_mask(
        self, attention_mask: Optional[Tensor], input_ids: Tensor, cache: Optional[Dict]
    ) -> Optional[Tensor]:
        """The mask columns of ``input_ids`` (the last L; generate's mask also covers the
        tokens already in the cache), or None when nothing is padded."""
        if attention_mask is None or input_ids.dim() != 2:
            return None
        L = input_ids.shape[1]
        if attention_mask.dim() != 2 or attention_mask.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"attention_mask: expected shape ({input_ids.shape[0]}, >= {L}), got "
                f"{tuple(attention_mask.shape)}"
            )
        mask = attention_mask[:, -L:]
        if bool((mask != 0).all()):
            return None
        if cache is not None and cache.get("seqlen_offset", 0) > 0:
            raise ValueError(
                "attention_mask: the new tokens of a filled inference_cache must not be padded "
                "(padding is for the prompt, prefilled into an empty cache)"
            )
        return mask

    def _padded_forward(
        self, input_ids: Tensor, mask: Optional[Tensor], cache: Optional[Dict]
    ) -> Tensor:
        """``LRNNLMHeadModel.forward`` with each padded row moved to the front (the layout its
        ``lengths`` takes) and its logits moved back to the row's positions."""
        ids, lengths = _prompt_layout(input_ids, mask)
        logits = self._lm(ids, lengths=lengths, inference_cache=cache)
        if lengths is None:
            return logits
        L = input_ids.shape[1]
        pos = torch.arange(L, device=ids.device)
        start = (mask.to(ids.device).cumsum(1) == 0).sum(1)  # each row's leading padding
        # position p of a row holds its token p - start; padding maps to the zero logits
        # after the row's length
        src = (pos - start[:, None]) % L
        return logits.gather(1, src[..., None].expand(-1, -1, logits.shape[-1]))

    def _loss(self, logits: Tensor, labels: Tensor, num_items_in_batch: Any) -> Tensor:
        """transformers' causal-LM loss (shifted cross-entropy, ignore_index -100)."""
        if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.is_complex():
            got = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
            raise TypeError(f"labels: expected an integer tensor of token ids, got {got}")
        if labels.shape != logits.shape[:2]:
            raise ValueError(
                f"labels: expected shape {tuple(logits.shape[:2])} (that of input_ids), got "
                f"{tuple(labels.shape)}"
            )
        return self.loss_function(
            logits=logits,
            labels=labels.to(logits.device),
            vocab_size=self.config.vocab_size,
            num_items_in_batch=num_items_in_batch,
        )

    # ---------------------------------------------------------------------------- generation
    def _prepare_cache_for_generation(
        self, generation_config: Any, model_kwargs: Dict[str, Any], *args: Any, **kwargs: Any
    ) -> None:
        """generate(): no transformers ``Cache``; remember the generation's ``max_length``,
        which sizes the attention layers' KV caches once the batch is known.

        Raises:
            ValueError: beam search (``num_beams > 1``) with the cache: transformers reorders
                the beams' caches through its ``Cache`` classes, which lrnnx's states are not.
        """
        beams = getattr(generation_config, "num_beams", 1) or 1
        if beams > 1 and generation_config.use_cache is not False:
            raise ValueError(
                f"num_beams: beam search needs transformers to reorder the beams' caches, which "
                f"lrnnx's recurrent states do not support (got num_beams={beams}); use greedy "
                "decoding or sampling, or use_cache=False (every step re-runs the sequence)"
            )
        if model_kwargs.get("inference_cache") is None:
            model_kwargs[_MAX_SEQLEN_KEY] = generation_config.max_length

    def prepare_inputs_for_generation(
        self,
        input_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        inference_cache: Optional[Dict[Any, Any]] = None,
        use_cache: Optional[bool] = True,
        inputs_embeds: Optional[Tensor] = None,
        **kwargs: Any,
    ) -> Dict[str, Any]:
        """generate()'s inputs of the next forward: the whole prompt into a new cache (the
        prefill), then only the tokens the cache has not seen (one per step).

        Without a cache (``use_cache=False``) every step re-runs the whole sequence.

        Raises:
            ValueError: ``inputs_embeds``; right-padded prompts (pad on the left, as
                transformers expects of decoder-only models; lrnnx's own
                :func:`lrnnx.utils.generation.generate` takes both sides); attention layers and
                no known length to size their KV caches.
        """
        if inputs_embeds is not None:
            raise ValueError("inputs_embeds: not supported by lrnnx models; pass input_ids")
        if use_cache is False:
            return {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if inference_cache is None:
            if attention_mask is not None and bool((attention_mask[:, -1] == 0).any()):
                raise ValueError(
                    "attention_mask: right-padded prompts (a 0 in the last column); pad prompts "
                    "on the left (tokenizer.padding_side = 'left')"
                )
            inference_cache = self._generation_cache(input_ids, kwargs.get(_MAX_SEQLEN_KEY))
        seen = inference_cache.get("seqlen_offset", 0)
        inputs: Dict[str, Any] = {
            "input_ids": input_ids[:, seen:],
            "inference_cache": inference_cache,
            "use_cache": True,
        }
        if seen == 0:  # the prompt's padding matters to the prefill only
            inputs["attention_mask"] = attention_mask
        return inputs

    def _generation_cache(self, input_ids: Tensor, max_seqlen: Optional[int]) -> Dict[Any, Any]:
        """A new inference cache for the batch; KV caches hold ``max_seqlen`` tokens."""
        if max_seqlen is None and "attn" in self._lm.mixer_types:
            raise ValueError(
                "generate: the attention layers need the generation's length to size their KV "
                "caches and this transformers version did not give it; pass inference_cache="
                "model.allocate_inference_cache(batch_size, max_seqlen) to generate()"
            )
        return self._lm.allocate_inference_cache(input_ids.shape[0], max_seqlen)

    def _update_model_kwargs_for_generation(
        self, outputs: ModelOutput, model_kwargs: Dict[str, Any], *args: Any, **kwargs: Any
    ) -> Dict[str, Any]:
        """transformers' update, plus the inference cache the forward filled (the next
        forward continues from it)."""
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, *args, **kwargs
        )
        cache = outputs.get("inference_cache") if isinstance(outputs, ModelOutput) else None
        if cache is not None:
            model_kwargs["inference_cache"] = cache
        return model_kwargs
