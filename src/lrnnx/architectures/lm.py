"""Causal language model over a stack of LRNN / attention mixers (the layout of mamba_ssm's
``MambaLMHeadModel``, with any lrnnx mixer per layer):

    x_0 = Embed(ids)
    x_l = Block_l(x_{l-1})       pre-norm residual: x + mixer(norm(x)) [+ x + MLP(norm(x))]
    logits = W_E Norm(x_n)       (head tied to the embedding by default)

Norm is RMSNorm (default) or LayerNorm; with ``residual_in_fp32`` the residual stream x_l is
kept in float32 while the weights may be bf16/fp16 (mamba_ssm's and transformers' Mamba).
:meth:`LRNNLMHeadModel.from_pretrained` also loads transformers' ``MambaForCausalLM`` and
mamba_ssm's ``MambaLMHeadModel`` checkpoints (see :mod:`lrnnx.interop.mamba`).

Packed sequences: ``forward(input_ids (1, T), cu_seqlens=...)`` runs S documents laid back to
back in one row (fla's / flash-attn's convention); every layer restarts at each document's
start, so the logits equal running each document alone.  Train on them with
:func:`packed_lm_loss` (or the labels of :func:`packed_next_token_labels`): the last token of a
document predicts nothing, in particular not the first token of the next one.

Every mixer type — recurrent or attention — supports prefill (``forward`` with a cache) and
decoding (``step``), so generation runs the whole stack on cached states: the attention
layers keep a KV cache and are stepped like the others.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrnnx.architectures._common import (
    CONFIG_NAME,
    PretrainedMixin,
    mixer_name,
    positive_int,
    split_mixer_kwargs,
)
from lrnnx.core.base import with_factory_arguments
from lrnnx.core.checks import (
    check_batch_size,
    check_cu_seqlens,
    lengths_mask,
    packed_offsets,
    zero_where_not,
)
from lrnnx.layers import Block, GatedMLP, RMSNorm
from lrnnx.layers.linear import Embedding, Linear, normal, rescaled
from lrnnx.layers.mha import check_kv_room
from lrnnx.models.registry import build_mixer

#: label value that :func:`packed_lm_loss` and torch's cross_entropy skip
IGNORE_INDEX = -100


def packed_next_token_labels(
    input_ids: Tensor, cu_seqlens: Tensor, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Next-token labels of packed documents: (1, T) -> (1, T).

    labels[t] = input_ids[t + 1] when t + 1 lies in the same document, else ``ignore_index``:
    a document's last token has nothing to predict, and must not be trained to predict the
    first token of the next document (a causal LM run alone never sees that pair).

    Args:
        input_ids: (1, T) token ids of S documents back to back.
        cu_seqlens: int32/int64 offsets (S + 1,) (0 first, T last; repeats: empty documents).
        ignore_index: the label of positions without a target.

    Raises:
        ValueError: ``input_ids`` not (1, T), or malformed ``cu_seqlens``.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids: expected packed token ids of shape (1, T), got "
            f"{tuple(getattr(input_ids, 'shape', ())) or type(input_ids).__name__}"
        )
    B, T = input_ids.shape
    cu = check_cu_seqlens(cu_seqlens, B, T, f"input_ids {tuple(input_ids.shape)} (1, T)")
    labels = torch.full_like(input_ids, ignore_index)
    labels[:, :-1] = input_ids[:, 1:]
    ends = cu[1:][cu[1:] > cu[:-1]] - 1  # the last token of every non-empty document
    labels[:, ends.to(input_ids.device)] = ignore_index
    return labels


def packed_lm_loss(
    logits: Tensor, input_ids: Tensor, cu_seqlens: Tensor, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Mean next-token cross-entropy (nats) of packed documents, within each document only.

    Equals the loss of the same documents as a padded batch, averaged over every predicted
    token (each document of length n contributes its n - 1 predictions).

    Args:
        logits: (1, T, V) from ``LRNNLMHeadModel(input_ids, cu_seqlens=cu_seqlens)``.
        input_ids: (1, T) the packed token ids.
        cu_seqlens: int32/int64 offsets (S + 1,).
        ignore_index: passed to :func:`packed_next_token_labels`.

    Returns:
        A scalar in float32 (at least); NaN when no document has two tokens.
    """
    labels = packed_next_token_labels(input_ids, cu_seqlens, ignore_index)
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"logits: expected shape (1, T, V) with (1, T) = {tuple(input_ids.shape)}, got "
            f"{tuple(logits.shape)}"
        )
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)
    flat = flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat
    return F.cross_entropy(flat, labels.reshape(-1), ignore_index=ignore_index)


def _check_ids(
    ids: Any,
    vocab_size: int,
    name: str = "input_ids",
    check_values: bool = True,
    mask: Optional[Tensor] = None,
) -> None:
    """Type and range checks of token ids (any integer dtype; the range at the valid positions
    of ``mask`` (B, L) when given: padding may hold anything, e.g. -100).

    The range check reads the ids' values (a host synchronisation); it is skipped under
    ``torch.compile`` (a data-dependent branch would break the graph) and where the caller
    turns it off (``check_values=False``, e.g. during CUDA-graph capture).
    """
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor (torch.long), got dtype {ids.dtype}")
    if not check_values or ids.numel() == 0 or torch.compiler.is_compiling():
        return
    if mask is not None:
        ids = ids[mask]
    if ids.numel() and (bool((ids < 0).any()) or bool((ids >= vocab_size).any())):
        raise ValueError(
            f"{name}: expected token ids in [0, {vocab_size}), got min {int(ids.min())} "
            f"max {int(ids.max())}"
        )


#: the normalisations an LM can use before each mixer / MLP and before the head (``norm_type``)
NORM_TYPES = ("rmsnorm", "layernorm")


class _LayerNorm(nn.LayerNorm):
    """LayerNorm (Ba et al., arXiv 1607.06450) with a bias, computed in float32 at least (like
    :class:`lrnnx.layers.RMSNorm`), output in the input's dtype: mamba_ssm's ``rms_norm=False``."""

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        w = None if self.weight is None else self.weight.to(xf.dtype)
        b = None if self.bias is None else self.bias.to(xf.dtype)
        return F.layer_norm(xf, self.normalized_shape, w, b, self.eps).to(x.dtype)


class _OutputInWeightDtype:
    """Norm mixin for a residual stream wider than the weights (``residual_in_fp32``): the norm
    reads the float32 stream and hands the mixer / MLP / head its own (the weights') dtype."""

    weight: Tensor

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).to(self.weight.dtype)  # type: ignore[misc]


class _FP32ResidualRMSNorm(_OutputInWeightDtype, RMSNorm):
    """RMSNorm of a float32 residual stream (same parameters as :class:`RMSNorm`)."""


class _FP32ResidualLayerNorm(_OutputInWeightDtype, _LayerNorm):
    """LayerNorm of a float32 residual stream (same parameters as ``nn.LayerNorm``)."""


def _norm_factory(norm_type: str, eps: float, residual_in_fp32: bool) -> Callable[[int], nn.Module]:
    """``dim -> norm module`` for ``norm_type`` (one of :data:`NORM_TYPES`)."""
    if norm_type == "rmsnorm":
        cls = _FP32ResidualRMSNorm if residual_in_fp32 else RMSNorm
        return lambda d: cls(d, eps=eps)
    cls_ln = _FP32ResidualLayerNorm if residual_in_fp32 else _LayerNorm
    return lambda d: cls_ln(d, eps=eps)


class CausalLMOutput(NamedTuple):
    """What :meth:`LRNNLMHeadModel.forward` returns with ``return_dict=True`` (mamba_ssm's
    ``CausalLMOutput``; transformers' ``CausalLMOutput`` has the same ``.logits``)."""

    logits: Tensor


class _Head(Linear):
    """The LM's output layer.  Tied, its weight is the embedding's parameter, which it takes
    again after torch gave it a parameter of its own (``to_empty`` off the meta device, of the
    whole LM or, as FSDP1 materialises, module by module with ``recurse=False``: the
    embedding, registered first, is moved before the head either way)."""

    def tie_to(self, embedding: nn.Module) -> None:
        # plain attributes, not submodules: the embedding is the LM's; the parameter the tie
        # was made with tells torch's re-creation from a weight the user set apart
        self.__dict__["_tied_embedding"] = embedding
        self.__dict__["_tie_origin"] = self.weight

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True):
        embedding = self.__dict__.get("_tied_embedding")
        keep = embedding is not None and (
            self.weight is embedding.weight or self.weight is self.__dict__.get("_tie_origin")
        )
        out = super()._apply(fn, recurse)
        if keep and self.weight is not embedding.weight:
            self.weight = embedding.weight
            self.__dict__["_tie_origin"] = self.weight
        return out


def _retie_after_load(module: nn.Module, incompatible_keys: Any) -> None:
    """load_state_dict's post-hook: ``assign=True`` of a tied state_dict (one tensor under
    both keys) gives each key its own parameter over that one tensor: one parameter again."""
    head, emb = module.lm_head.weight, module.embedding.weight
    if head is not emb and head.data_ptr() == emb.data_ptr() and head.shape == emb.shape:
        module.tie_weights()


class LRNNLMHeadModel(PretrainedMixin, nn.Module):
    """Language model with one mixer type per layer.

    Example:
        >>> lm = LRNNLMHeadModel(d_model=64, d_state=16, n_layer=3, vocab_size=100,
        ...                      mixer_types=["s5", "attn", "lru"])
        >>> logits = lm(torch.randint(0, 100, (2, 32)))          # (B, L) -> (B, L, 100)
        >>> cache = lm.allocate_inference_cache(2, max_seqlen=64)
        >>> logits = lm(prompt, inference_cache=cache)           # prefill
        >>> next_logits, cache = lm.step(next_ids, cache)        # (B,) -> (B, 100)

    Args:
        d_model: width of the residual stream.
        d_state: state size passed to every recurrent mixer (ignored by RG-LRU and attention).
        n_layer: number of blocks.
        vocab_size: number of tokens; logits have exactly this many entries.
        mixer_types: one mixer name for every layer, or a list of ``n_layer`` names (registry
            names/aliases such as ``"s5"``, ``"mamba"``, ``"attn"``, or ``"module:Class"``).
        mixer_kwargs: flat constructor arguments for every recurrent mixer, or
            ``{name: kwargs}`` per mixer type (``"attn"`` takes :class:`lrnnx.layers.MHA`'s).
        d_intermediate: hidden width of a SwiGLU MLP after each mixer (0: no MLP).
        num_heads: attention heads of the ``"attn"`` layers.
        tie_embeddings: share the embedding matrix with the output head.
        pad_vocab_size_multiple: the embedding/head rows are padded to a multiple of this
            (faster matmuls); the padded logits are dropped.
        rotary: rotary position embeddings in the attention layers.
        norm_eps: epsilon of the norms.
        norm_type: ``"rmsnorm"`` (RMSNorm, weight only) or ``"layernorm"`` (LayerNorm with
            weight and bias; mamba_ssm's ``rms_norm=False``).
        residual_in_fp32: keep the residual stream (the sum of the blocks' outputs) in float32
            (float64 for a float64 model) whatever the weights' dtype, as mamba_ssm and
            transformers' Mamba do; each norm hands its mixer / MLP / the head the weights'
            dtype.  Only changes results for bf16 / fp16 weights.
        initializer_range: std of the normal initialisation of the embedding.
        rescale_prenorm_residual: divide the initial weights of the residual branches' output
            projections (the ``nn.Linear`` layers named ``out_proj``, as in Mamba, RG-LRU,
            attention and custom mixers, and the MLPs' ``fc2``) by sqrt(n_residuals *
            n_layer), n_residuals = 2 with an MLP (``d_intermediate`` > 0), else 1, so that
            with such mixers the residual stream's variance at initialisation does not grow
            with depth (GPT-2's scheme, as mamba_ssm's MambaLMHeadModel does by default; the
            LTI mixers' outputs, which no such layer ends, are left as they are).  Resets draw
            them the same way (a custom mixer's torch ``nn.Linear`` redraws torch's default).
        bidirectional: must be False: a language model predicts the next token, so its mixers
            are causal (True raises a ValueError; use ``Classifier(bidirectional=True)`` or
            ``UNet(causal=False)`` for non-causal models).
        device, dtype: torch's factory arguments (not part of the config): the model is built,
            then moved and cast as ``.to(device, dtype)`` does (the mixers' precision policy
            included).
    """

    @with_factory_arguments
    def __init__(
        self,
        d_model: int,
        d_state: int,
        n_layer: int,
        vocab_size: int,
        mixer_types: Union[str, Sequence[Union[str, type]]],
        mixer_kwargs: Optional[Dict[str, Any]] = None,
        d_intermediate: int = 0,
        num_heads: int = 4,
        tie_embeddings: bool = True,
        pad_vocab_size_multiple: int = 8,
        rotary: bool = True,
        norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        bidirectional: bool = False,
        norm_type: str = "rmsnorm",
        residual_in_fp32: bool = False,
        rescale_prenorm_residual: bool = True,
    ) -> None:
        super().__init__()
        if bidirectional:
            raise ValueError(
                "bidirectional: a language model is causal (token t is predicted from the tokens "
                "before it), so it cannot have bidirectional mixers; use Classifier("
                "bidirectional=True) or UNet(causal=False) for a non-causal model"
            )
        positive_int("d_model", d_model)
        positive_int("d_state", d_state)
        positive_int("n_layer", n_layer)
        positive_int("vocab_size", vocab_size)
        positive_int("num_heads", num_heads)
        positive_int("pad_vocab_size_multiple", pad_vocab_size_multiple)
        if norm_type not in NORM_TYPES:
            raise ValueError(f"norm_type: expected one of {list(NORM_TYPES)}, got {norm_type!r}")
        if not isinstance(residual_in_fp32, bool):
            raise TypeError(
                f"residual_in_fp32: expected a bool, got {type(residual_in_fp32).__name__}"
            )
        if (
            not isinstance(d_intermediate, int)
            or isinstance(d_intermediate, bool)
            or d_intermediate < 0
        ):
            raise ValueError(f"d_intermediate: expected an int >= 0, got {d_intermediate!r}")
        if isinstance(mixer_types, (str, type)):
            mixer_types = [mixer_types] * n_layer
        if not isinstance(mixer_types, (list, tuple)) or len(mixer_types) != n_layer:
            got = (
                len(mixer_types)
                if isinstance(mixer_types, (list, tuple))
                else type(mixer_types).__name__
            )
            raise ValueError(
                f"mixer_types: expected one name or a list of n_layer = {n_layer} names, got {got}"
            )
        names: List[str] = [mixer_name(m) for m in mixer_types]
        per_type = split_mixer_kwargs(mixer_kwargs, names)
        for n, kw in per_type.items():
            if kw.get("bidirectional"):
                raise ValueError(
                    f"mixer_kwargs: bidirectional=True for {n!r}; a language model is causal "
                    "and cannot have bidirectional mixers"
                )
        for key in ("num_heads", "rotary"):
            if key in per_type.get("attn", {}):
                raise ValueError(
                    f"mixer_kwargs['attn']: pass {key} once, as the model's {key} argument"
                )

        self.config: Dict[str, Any] = {
            "d_model": d_model,
            "d_state": d_state,
            "n_layer": n_layer,
            "vocab_size": vocab_size,
            "mixer_types": names,
            "mixer_kwargs": mixer_kwargs,
            "d_intermediate": d_intermediate,
            "num_heads": num_heads,
            "tie_embeddings": tie_embeddings,
            "pad_vocab_size_multiple": pad_vocab_size_multiple,
            "rotary": rotary,
            "norm_eps": norm_eps,
            "initializer_range": initializer_range,
            "bidirectional": False,
            "norm_type": norm_type,
            "residual_in_fp32": residual_in_fp32,
            "rescale_prenorm_residual": bool(rescale_prenorm_residual),
        }
        self.d_model, self.vocab_size, self.n_layer = d_model, vocab_size, n_layer
        self.mixer_types = names
        self.residual_in_fp32 = residual_in_fp32
        norm_cls = _norm_factory(norm_type, norm_eps, residual_in_fp32)
        self.padded_vocab_size = (
            math.ceil(vocab_size / pad_vocab_size_multiple) * pad_vocab_size_multiple
        )

        self.embedding = Embedding(self.padded_vocab_size, d_model)
        init_embedding = functools.partial(normal, std=initializer_range)
        self.embedding.init_fn = init_embedding
        layers = []
        for name in names:
            if name == "attn":
                mixer = build_mixer(
                    "attn", d_model, num_heads=num_heads, rotary=rotary, **per_type[name]
                )
            else:
                mixer = build_mixer(name, d_model, d_state, **per_type[name])
            mlp = GatedMLP(d_model, hidden=d_intermediate) if d_intermediate > 0 else None
            layers.append(Block(d_model, mixer, mlp=mlp, norm_cls=norm_cls))
        self.layers = nn.ModuleList(layers)
        if rescale_prenorm_residual:
            self._rescale_residual_outputs(n_residuals=2 if d_intermediate > 0 else 1)
        self.norm_f = norm_cls(d_model)
        self.lm_head = _Head(d_model, self.padded_vocab_size, bias=False)
        self.embedding.reset_parameters()
        if tie_embeddings:
            self.lm_head.init_fn = init_embedding  # a reset of either draws the shared matrix
        self.tie_weights()
        self.register_load_state_dict_post_hook(_retie_after_load)

    def _rescale_residual_outputs(self, n_residuals: int) -> None:
        """Scale the residual branches' output projections (``out_proj``, ``fc2``) by
        1 / sqrt(n_residuals n_layer), now (the drawn values, so the draws of every other
        tensor stay those of an unscaled model) and in their ``init_fn`` for later resets."""
        scale = 1.0 / math.sqrt(n_residuals * self.n_layer)
        for name, module in self.layers.named_modules():
            if name.rpartition(".")[2] in ("out_proj", "fc2") and isinstance(module, nn.Linear):
                if isinstance(module, Linear):  # lrnnx's: its resets draw the same way
                    module.init_fn = functools.partial(rescaled, scale=scale, base=module.init_fn)
                with torch.no_grad():
                    module.weight.mul_(scale)

    def tie_weights(self) -> None:
        """With ``tie_embeddings``, make the head's weight the embedding's parameter (one
        tensor, one gradient, one optimizer entry).  Operations that give each module its own
        parameter object break such a tie: ``to_empty`` (and any move off the meta device)
        and ``load_state_dict(..., assign=True)`` of a tied state_dict; the model restores it
        after them itself (a head the user untied, or loaded apart, stays as it is)."""
        if self.config["tie_embeddings"] and self.lm_head.weight is not self.embedding.weight:
            self.lm_head.weight = self.embedding.weight
        if self.config["tie_embeddings"]:
            self.lm_head.tie_to(self.embedding)

    # --------------------------------------------------------------------------------- forward
    def _embed(self, input_ids: Tensor) -> Tensor:
        """The residual stream's start: float32 at least with ``residual_in_fp32``.  Ids of a
        narrow integer dtype (uint8, int16, ...) are widened: the embedding takes int32/int64."""
        if input_ids.dtype not in (torch.int32, torch.int64):
            input_ids = input_ids.long()
        x = self.embedding(input_ids)
        if self.residual_in_fp32:
            x = x.to(torch.promote_types(x.dtype, torch.float32))
        return x

    def forward(
        self,
        input_ids: Tensor,
        integration_timesteps: Optional[Tensor] = None,
        lengths: Optional[Tensor] = None,
        inference_cache: Optional[Dict[Any, Any]] = None,
        return_dict: bool = False,
        *,
        cu_seqlens: Optional[Tensor] = None,
    ) -> Union[Tensor, CausalLMOutput]:
        """input_ids (B, L) -> logits (B, L, vocab_size); (1, T) -> (1, T, vocab_size) packed.

        Compiles with ``torch.compile(lm, fullgraph=True)`` when every mixer does (the id range
        check runs in eager mode only).

        Args:
            input_ids: token ids (integer dtype).
            integration_timesteps: (B, L) elapsed times, passed to every mixer (event-driven
                models use them; time-invariant ones reject them; attention ignores them).
            lengths: (B,) valid lengths; logits at padded positions are zero and padding never
                changes the valid ones.
            inference_cache: from :meth:`allocate_inference_cache`; every layer starts from and
                fills its cache (prefill), ``seqlen_offset`` advances by L.  With ``lengths``
                each sequence's cache holds its state after its own ``lengths[b]`` tokens.
            return_dict: return a :class:`CausalLMOutput` (``.logits``) instead of the tensor,
                as transformers and mamba_ssm models do.
            cu_seqlens: int32/int64 offsets (S + 1,) of S documents packed in the one row of
                ``input_ids`` (0 first, T last, repeats: empty documents); every layer gets
                them and the logits equal running each document alone.  Not with
                ``lengths``; a cache then holds one state per document (batch size S, where
                the mixers have a packed prefill) and ``seqlen_offset`` advances by the
                longest.  Train with :func:`packed_lm_loss`.

        Raises:
            ValueError: bad ids or shapes; ``cu_seqlens`` malformed, with a batch other than
                1, with ``lengths``, or with a mixer that does not take packed sequences.
        """
        _check_ids(input_ids, self.vocab_size, check_values=False)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected shape (B, L), got {tuple(input_ids.shape)}")
        B, L = input_ids.shape
        cu = packed_offsets(
            cu_seqlens, lengths, *input_ids.shape, f"input_ids {tuple(input_ids.shape)} (1, T)"
        )
        mask = lengths_mask(lengths, B, L, input_ids.device)
        _check_ids(input_ids, self.vocab_size, mask=mask)
        if inference_cache is not None:
            self._check_cache(inference_cache, L)
        if mask is not None:  # the padding's ids may be anything (-100, vocab_size): token 0
            input_ids = zero_where_not(input_ids, mask)
        x = self._embed(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(
                x,
                integration_timesteps=integration_timesteps,
                lengths=lengths,
                inference_cache=None if inference_cache is None else inference_cache[i],
                cu_seqlens=cu,
            )
        logits = self.lm_head(self.norm_f(x))[..., : self.vocab_size]
        if mask is not None:
            logits = zero_where_not(logits, mask[..., None])
        if inference_cache is not None:
            # packed: the longest document, what a padded batch of the same documents adds
            steps = L if cu is None else int((cu[1:] - cu[:-1]).max())
            inference_cache["seqlen_offset"] = inference_cache.get("seqlen_offset", 0) + steps
        return CausalLMOutput(logits=logits) if return_dict else logits

    def step(
        self,
        input_ids: Tensor,
        inference_cache: Dict[Any, Any],
        integration_timesteps: Optional[Tensor] = None,
    ) -> tuple[Tensor, Dict[Any, Any]]:
        """One token per sequence: input_ids (B,) or (B, 1) -> (logits (B, vocab_size), cache).

        Every layer — attention included — advances its cache in place.  No host
        synchronisation while a CUDA graph is being captured (see
        :func:`lrnnx.utils.generation.generate`).
        """
        capturing = (
            isinstance(input_ids, Tensor)
            and input_ids.is_cuda
            and torch.cuda.is_current_stream_capturing()
        )
        _check_ids(input_ids, self.vocab_size, check_values=not capturing)
        if input_ids.dim() == 2 and input_ids.shape[1] == 1:
            input_ids = input_ids[:, 0]
        if input_ids.dim() != 1:
            raise ValueError(
                f"input_ids: expected shape (B,) or (B, 1), got {tuple(input_ids.shape)}"
            )
        self._check_cache(inference_cache)
        x = self._embed(input_ids)
        for i, layer in enumerate(self.layers):
            x, _ = layer.step(x, inference_cache[i], integration_timesteps=integration_timesteps)
        logits = self.lm_head(self.norm_f(x))[..., : self.vocab_size]
        inference_cache["seqlen_offset"] = inference_cache.get("seqlen_offset", 0) + 1
        return logits, inference_cache

    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: Optional[int] = None, dtype: Optional[torch.dtype] = None
    ) -> Dict[Any, Any]:
        """``{layer index: that layer's cache, ..., "seqlen_offset": 0}``.

        ``max_seqlen`` bounds prompt + generated tokens: it sizes the attention KV caches and is
        required only when the model has attention layers (recurrent states do not grow).
        """
        check_batch_size(batch_size)  # 0: an empty cache, as each layer allocates
        if max_seqlen is None:
            attn = [i for i, t in enumerate(self.mixer_types) if t == "attn"]
            if attn:
                raise ValueError(
                    f"max_seqlen: required for the attention layers {attn} (it sizes their KV "
                    "caches: prompt + generated tokens); pass e.g. max_seqlen=2048"
                )
            max_seqlen = 1
        positive_int("max_seqlen", max_seqlen)
        cache: Dict[Any, Any] = {
            i: layer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype)
            for i, layer in enumerate(self.layers)
        }
        cache["seqlen_offset"] = 0
        return cache

    def _check_cache(self, cache: Any, new_tokens: int = 1) -> None:
        """The cache's layout, and room for ``new_tokens`` in every KV cache, checked before
        any layer advances its state (a prefill refused by a later attention layer would
        otherwise leave the earlier layers' states advanced)."""
        if not isinstance(cache, dict) or any(i not in cache for i in range(self.n_layer)):
            error = ValueError if isinstance(cache, dict) else TypeError
            raise error(
                f"inference_cache: expected the dict of allocate_inference_cache with layer keys "
                f"0..{self.n_layer - 1}, got {type(cache).__name__}"
                + (f" with keys {sorted(map(str, cache))}" if isinstance(cache, dict) else "")
                + "; allocate one with model.allocate_inference_cache(batch_size)"
            )
        for i in range(self.n_layer):
            kc = cache[i].get("k_cache") if isinstance(cache[i], dict) else None
            if isinstance(kc, Tensor) and kc.dim() == 4:
                check_kv_room(
                    cache[i], new_tokens, f"inference_cache[{i}] (attention; no layer has advanced)"
                )

    def generate(self, input_ids: Tensor, max_new_tokens: Optional[int] = None, **kwargs: Any):
        """Shortcut for :func:`lrnnx.utils.generation.generate` (same arguments: ``max_new_tokens``
        or ``max_length``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
        ``repetition_penalty``, ``eos_token_id``, ``pad_token_id``, ``attention_mask``,
        ``return_dict_in_generate``, ``output_scores``, ...)."""
        from lrnnx.utils.generation import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    # ---------------------------------------------------------------------------- persistence
    @classmethod
    def from_pretrained(
        cls,
        load_directory: Union[str, os.PathLike],
        map_location: Union[str, torch.device, None] = None,
        *,
        device: Union[str, torch.device, None] = None,
        dtype: Union[str, torch.dtype, None] = None,
        torch_dtype: Union[str, torch.dtype, None] = None,
    ) -> LRNNLMHeadModel:
        """Load a checkpoint directory; returns the model in eval mode (call ``.train()`` to
        fine-tune).

        Three layouts are recognised from ``config.json``:

        * lrnnx's own (written by :meth:`save_pretrained`): see
          :meth:`lrnnx.architectures._common.PretrainedMixin.from_pretrained`.
        * transformers' ``MambaForCausalLM`` (``"model_type": "mamba"``, e.g. the
          state-spaces/mamba-130m-hf ... mamba-2.8b-hf checkpoints): ``model.safetensors``,
          sharded safetensors or ``pytorch_model.bin``.
        * mamba_ssm's ``MambaLMHeadModel`` (``d_model``, ``n_layer``, ``ssm_cfg``, ...;
          ``pytorch_model.bin``), Mamba-1 layers only.

        The two Mamba layouts are mapped exactly (same logits as the source library, within
        floating-point rounding) by :func:`lrnnx.interop.mamba.load_mamba_checkpoint`; logits
        always have ``vocab_size`` entries (mamba_ssm's padded vocabulary rows are dropped).

        Args:
            load_directory: the checkpoint directory.
            map_location: device for the weights (default: CPU).
            device: the same as ``map_location`` (give one, or both equal).
            dtype: cast the whole model after loading (``model.to(dtype)``): a floating-point
                ``torch.dtype`` or its name (``"bfloat16"``); None or ``"auto"`` keeps the dtypes
                as saved.
            torch_dtype: alias of ``dtype`` (Hugging Face's name).

        Raises:
            FileNotFoundError: ``config.json`` or the weights are missing.
            ValueError: a config that is none of the three layouts, or a Mamba checkpoint with
                parts lrnnx does not have (Mamba-2 layers, attention layers, ...); conflicting
                ``map_location``/``device`` or ``dtype``/``torch_dtype``; a corrupted lrnnx
                weights file (ChecksumError).
            RuntimeError: the weights do not match the config (missing / unexpected / shape).
        """
        config_path = os.path.join(load_directory, CONFIG_NAME)
        if os.path.isfile(config_path):
            from lrnnx.interop.mamba import detect_layout, load_mamba_checkpoint

            with open(config_path) as f:
                config = json.load(f)
            if detect_layout(config) != "lrnnx":
                return load_mamba_checkpoint(
                    load_directory,
                    map_location,
                    device=device,
                    dtype=dtype,
                    torch_dtype=torch_dtype,
                    model_cls=cls,
                )
        return super().from_pretrained(
            load_directory, map_location, device=device, dtype=dtype, torch_dtype=torch_dtype
        )
