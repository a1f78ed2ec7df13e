"""Mamba-1 language-model checkpoints from transformers and mamba_ssm -> :class:`LRNNLMHeadModel`.

Two layouts hold the same model (Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective
State Spaces", arXiv 2312.00752): an embedding, ``n_layer`` pre-norm residual blocks
``x + Mamba(RMSNorm(x))`` with the residual stream in float32 (``residual_in_fp32``), a final
RMSNorm and a head tied to the embedding by default.  Their Mamba mixers have the parameter
names and the math of :class:`lrnnx.models.ltv.mamba.Mamba` (``in_proj``, ``conv1d``,
``x_proj``, ``dt_proj``, ``A_log``, ``D``, ``out_proj``; delta = softplus(dt_proj(dt)) with the
bias inside, a causal depthwise convolution, SiLU gate), so the weights are copied unchanged:

* transformers' ``MambaForCausalLM`` (``config.json`` with ``"model_type": "mamba"``; the
  state-spaces/mamba-130m-hf ... mamba-2.8b-hf checkpoints): ``hidden_size``, ``state_size``,
  ``num_hidden_layers``, ``vocab_size``, ``expand``, ``conv_kernel``, ``use_bias``,
  ``use_conv_bias``, ``time_step_rank`` (``"auto"`` = ceil(hidden_size / 16)),
  ``layer_norm_epsilon``, ``residual_in_fp32``, ``tie_word_embeddings``; weights
  ``backbone.embeddings.weight``, ``backbone.layers.{i}.norm.weight``,
  ``backbone.layers.{i}.mixer.*``, ``backbone.norm_f.weight`` and, untied, ``lm_head.weight``,
  in ``model.safetensors``, sharded safetensors (``model.safetensors.index.json``),
  ``pytorch_model.bin`` or sharded ``.bin`` (``pytorch_model.bin.index.json``).  The embedding
  has exactly ``vocab_size`` rows; lrnnx pads them with zero rows to a multiple of
  ``pad_vocab_size_multiple`` (the config's if it has one, else 8) and drops the padded logits.
* mamba_ssm's ``MambaLMHeadModel`` (``config.json`` with ``d_model``, ``n_layer``,
  ``vocab_size``, ``ssm_cfg``, ``rms_norm``, ``residual_in_fp32``, ``fused_add_norm``,
  ``pad_vocab_size_multiple``, ``tie_embeddings``, ``d_intermediate``; ``pytorch_model.bin`` with
  ``backbone.embedding.weight``, ``backbone.layers.{i}.{norm,mixer,norm2,mlp}.*``,
  ``backbone.norm_f.*``, ``lm_head.weight``).  Its norms have epsilon 1e-5; ``rms_norm=False``
  means LayerNorm (with bias); ``d_intermediate > 0`` adds a SwiGLU MLP whose hidden width is
  rounded up to a multiple of 128.  The embedding has ``vocab_size`` rounded up to a multiple of
  ``pad_vocab_size_multiple`` rows and mamba_ssm's logits have that padded width; lrnnx's have
  exactly ``vocab_size`` entries (the padded ones are dropped).  Mamba-2/3 layers
  (``ssm_cfg["layer"]``) and attention layers (``attn_layer_idx``) are refused.

``fused_add_norm`` only picks mamba_ssm's fused kernel (the same function) and is ignored.
Nothing here imports transformers or mamba_ssm.

Example:
    >>> lm = load_mamba_checkpoint("mamba-130m-hf")             # or LRNNLMHeadModel.from_pretrained
    >>> logits = lm(torch.tensor([[1, 2, 3]]))                   # (B, L) -> (B, L, vocab_size)
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Dict, Mapping, Optional, Type, Union

import torch
from torch import Tensor

from lrnnx.architectures._common import CONFIG_NAME, _resolve_device, _resolve_dtype

#: the layouts :func:`detect_layout` tells apart
LAYOUTS = ("lrnnx", "transformers", "mamba_ssm")

#: transformers' MambaConfig defaults, for keys a config.json leaves out
_HF_DEFAULTS: Dict[str, Any] = {
    "vocab_size": 50280,
    "hidden_size": 768,
    "state_size": 16,
    "num_hidden_layers": 32,
    "layer_norm_epsilon": 1e-5,
    "expand": 2,
    "conv_kernel": 4,
    "use_bias": False,
    "use_conv_bias": True,
    "hidden_act": "silu",
    "residual_in_fp32": True,
    "time_step_rank": "auto",
    "tie_word_embeddings": True,
}
#: transformers' time-step init options -> lrnnx Mamba's names (init only; kept for fine-tuning)
_HF_INIT_KEYS = {
    "time_step_min": "dt_min",
    "time_step_max": "dt_max",
    "time_step_init_scheme": "dt_init",
    "time_step_scale": "dt_scale",
    "time_step_floor": "dt_init_floor",
}
#: mamba_ssm's MambaConfig defaults (mamba_ssm/models/config_mamba.py)
_SSM_DEFAULTS: Dict[str, Any] = {
    "d_model": 2560,
    "d_intermediate": 0,
    "n_layer": 64,
    "vocab_size": 50277,
    "ssm_cfg": {},
    "attn_layer_idx": [],
    "rms_norm": True,
    "residual_in_fp32": True,
    "pad_vocab_size_multiple": 8,
    "tie_embeddings": True,
}
#: mamba_ssm's Mamba-1 constructor arguments that lrnnx's Mamba takes under the same name
_SSM_MIXER_KEYS = (
    "d_conv",
    "expand",
    "dt_rank",
    "dt_min",
    "dt_max",
    "dt_init",
    "dt_scale",
    "dt_init_floor",
    "conv_bias",
    "bias",
)
#: mamba_ssm's norm epsilon (MixerModel's default; its MambaConfig has no field for it)
_SSM_NORM_EPS = 1e-5
#: mamba_ssm's GatedMLP rounds its hidden width up to a multiple of this
_SSM_MLP_MULTIPLE = 128
#: lrnnx's default row padding of the embedding
_DEFAULT_PAD_MULTIPLE = 8
#: Mamba relatives whose checkpoints are not Mamba-1 LMs
_UNSUPPORTED_MODEL_TYPES = {
    "mamba2": "Mamba-2 (SSD) layers, which lrnnx does not implement",
    "falcon_mamba": "RMSNorms on B, C and dt inside the mixer, which lrnnx's Mamba does not have",
}

#: a mixer parameter of block i, in both layouts
_MIXER_KEY = re.compile(r"^layers\.(\d+)\.mixer\.")

_SAFETENSORS = "model.safetensors"
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_BIN = "pytorch_model.bin"
_BIN_INDEX = "pytorch_model.bin.index.json"


# --------------------------------------------------------------------------------- layouts
def detect_layout(config: Mapping[str, Any]) -> str:
    """Which checkpoint layout a parsed ``config.json`` belongs to.

    Returns:
        ``"lrnnx"`` (written by ``save_pretrained``: it has ``mixer_types``, and
        ``"model_type": "lrnnx"`` since the Hugging Face integration),
        ``"transformers"`` (``"model_type": "mamba"``) or ``"mamba_ssm"`` (``d_model`` and
        ``n_layer`` without a ``model_type``).

    Raises:
        TypeError: ``config`` is not a dict.
        ValueError: another model type, or a config of none of these layouts.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config: expected the dict of a config.json, got {type(config).__name__}")
    model_type = config.get("model_type")
    if "mixer_types" in config or model_type == "lrnnx":
        return "lrnnx"
    if model_type == "mamba":
        return "transformers"
    if model_type in _UNSUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"config: model_type {model_type!r} is not supported: it has "
            f"{_UNSUPPORTED_MODEL_TYPES[model_type]}; lrnnx loads Mamba-1 checkpoints "
            "(transformers' model_type 'mamba' and mamba_ssm's MambaLMHeadModel)"
        )
    if model_type is None and "d_model" in config and "n_layer" in config:
        return "mamba_ssm"
    from lrnnx.architectures._common import architecture_of

    held = architecture_of(dict(config))
    raise ValueError(
        "config: "
        + (f"a checkpoint of {held} (load it with {held}.from_pretrained); " if held else "")
        + "expected an lrnnx config (with 'mixer_types'), a transformers Mamba config "
        "('model_type': 'mamba') or a mamba_ssm MambaLMHeadModel config ('d_model', 'n_layer'), "
        f"got model_type {model_type!r} with keys {sorted(config)[:12]}"
    )


def _foreign_layout(config: Mapping[str, Any], layout: Optional[str]) -> str:
    """``layout`` checked, or detected; "lrnnx" is refused (nothing to convert)."""
    layout = detect_layout(config) if layout is None else layout
    if layout not in ("transformers", "mamba_ssm"):
        raise ValueError(
            f"layout: expected 'transformers' or 'mamba_ssm' (a config to convert), got {layout!r}"
        )
    return layout


def _hf_lm_config(config: Mapping[str, Any]) -> Dict[str, Any]:
    c = {**_HF_DEFAULTS, **config}
    if c["hidden_act"] not in ("silu", "swish"):  # one function under two names (ACT2FN)
        raise ValueError(
            f"config: hidden_act {c['hidden_act']!r} is not supported (lrnnx's Mamba uses "
            "'silu' (alias 'swish'), as mamba_ssm does)"
        )
    hidden = int(c["hidden_size"])
    rank = c["time_step_rank"]
    mixer = {
        "d_conv": int(c["conv_kernel"]),
        "expand": c["expand"],
        "dt_rank": math.ceil(hidden / 16) if rank == "auto" else int(rank),
        "conv_bias": bool(c["use_conv_bias"]),
        "bias": bool(c["use_bias"]),
    }
    mixer.update({ours: c[theirs] for theirs, ours in _HF_INIT_KEYS.items() if theirs in c})
    return {
        "d_model": hidden,
        "d_state": int(c["state_size"]),
        "n_layer": int(c["num_hidden_layers"]),
        "vocab_size": int(c["vocab_size"]),
        "mixer_types": "mamba",
        "mixer_kwargs": mixer,
        "tie_embeddings": bool(c["tie_word_embeddings"]),
        "pad_vocab_size_multiple": int(c.get("pad_vocab_size_multiple", _DEFAULT_PAD_MULTIPLE)),
        "norm_eps": float(c["layer_norm_epsilon"]),
        "norm_type": "rmsnorm",
        "residual_in_fp32": bool(c["residual_in_fp32"]),
    }


def _ssm_mixer_kwargs(ssm_cfg: Any) -> Dict[str, Any]:
    """mamba_ssm's ``ssm_cfg`` -> d_state and lrnnx Mamba kwargs; other layers are refused."""
    if not isinstance(ssm_cfg, dict):
        raise TypeError(f"config['ssm_cfg']: expected a dict, got {type(ssm_cfg).__name__}")
    cfg = dict(ssm_cfg)
    layer = cfg.pop("layer", "Mamba1")
    if layer != "Mamba1":
        raise ValueError(
            f"config['ssm_cfg']['layer']: {layer!r} layers are not supported; lrnnx implements "
            "Mamba-1 ('Mamba1') only"
        )
    cfg.pop("use_fast_path", None)  # mamba_ssm's kernel choice, no effect on the function
    unknown = sorted(set(cfg) - set(_SSM_MIXER_KEYS) - {"d_state"})
    if unknown:
        raise ValueError(
            f"config['ssm_cfg']: unknown Mamba-1 options {unknown}; expected some of "
            f"{['d_state', *_SSM_MIXER_KEYS, 'use_fast_path', 'layer']}"
        )
    return cfg


def _ssm_lm_config(config: Mapping[str, Any]) -> Dict[str, Any]:
    c = {**_SSM_DEFAULTS, **config}
    if c["attn_layer_idx"]:
        raise ValueError(
            f"config['attn_layer_idx']: attention layers {c['attn_layer_idx']} are not "
            "supported (mamba_ssm's MHA parameter layout differs from lrnnx's); expected []"
        )
    mixer = _ssm_mixer_kwargs(c["ssm_cfg"])
    d_state = int(mixer.pop("d_state", 16))
    d_mlp = int(c["d_intermediate"])
    if d_mlp > 0:  # mamba_ssm's GatedMLP rounds its hidden width up
        d_mlp = -(-d_mlp // _SSM_MLP_MULTIPLE) * _SSM_MLP_MULTIPLE
    return {
        "d_model": int(c["d_model"]),
        "d_state": d_state,
        "n_layer": int(c["n_layer"]),
        "vocab_size": int(c["vocab_size"]),
        "mixer_types": "mamba",
        "mixer_kwargs": mixer,
        "d_intermediate": d_mlp,
        "tie_embeddings": bool(c["tie_embeddings"]),
        "pad_vocab_size_multiple": int(c["pad_vocab_size_multiple"]),
        "norm_eps": _SSM_NORM_EPS,
        "norm_type": "rmsnorm" if c["rms_norm"] else "layernorm",
        "residual_in_fp32": bool(c["residual_in_fp32"]),
    }


def mamba_lm_config(config: Mapping[str, Any], layout: Optional[str] = None) -> Dict[str, Any]:
    """The :class:`lrnnx.architectures.LRNNLMHeadModel` arguments of a transformers / mamba_ssm
    Mamba ``config.json`` (keys it leaves out take that library's defaults).

    Args:
        config: the parsed ``config.json``.
        layout: ``"transformers"`` or ``"mamba_ssm"``; None detects it (:func:`detect_layout`).

    Raises:
        ValueError: not one of the two layouts, or parts lrnnx does not have (Mamba-2 layers,
            attention layers, an activation other than SiLU, unknown ``ssm_cfg`` options).
    """
    layout = _foreign_layout(config, layout)
    return _hf_lm_config(config) if layout == "transformers" else _ssm_lm_config(config)


# ---------------------------------------------------------------------------- state dicts
def _lrnnx_key(key: str) -> str:
    """``backbone.embeddings.weight`` / ``backbone.embedding.weight`` -> ``embedding.weight``;
    ``backbone.layers.{i}.mixer.X`` -> ``layers.{i}.mixer.model.X`` (lrnnx wraps each
    recurrent mixer in a :class:`lrnnx.models.registry.MixerAdapter`); other ``backbone.X`` ->
    ``X`` (the norm, norm2, mlp and norm_f names are lrnnx's); ``lm_head.weight`` stays."""
    if not key.startswith("backbone."):
        return key
    key = key[len("backbone.") :]
    if key.startswith("embeddings."):
        return "embedding." + key[len("embeddings.") :]
    return _MIXER_KEY.sub(r"layers.\1.mixer.model.", key)


def _pad_rows(weight: Tensor, rows: int) -> Tensor:
    """Zero rows appended up to ``rows`` (their logits are dropped, their ids rejected)."""
    if weight.dim() != 2 or weight.shape[0] >= rows:
        return weight  # a wrong shape is reported by the load, with the key
    return torch.cat([weight, weight.new_zeros(rows - weight.shape[0], weight.shape[1])])


def convert_mamba_state_dict(
    state: Mapping[str, Tensor], config: Mapping[str, Any], layout: Optional[str] = None
) -> Dict[str, Tensor]:
    """A transformers / mamba_ssm Mamba state dict -> :class:`LRNNLMHeadModel` keys.

    The tensors are copied unchanged (dtypes kept), except that the embedding (and an untied
    head) get zero rows up to lrnnx's padded vocabulary.  A tied head (``lm_head.weight``, which
    mamba_ssm saves and transformers drops) is left out: lrnnx ties it by construction.

    Args:
        state: the checkpoint's tensors by name.
        config: its parsed ``config.json``.
        layout: ``"transformers"`` or ``"mamba_ssm"``; None detects it.

    Raises:
        ValueError: a tied head that differs from the embedding; an untied config without
            ``lm_head.weight``; an embedding or head with fewer rows than the config's
            vocab_size; a config :func:`mamba_lm_config` refuses.
    """
    lm = mamba_lm_config(config, layout)
    out = {_lrnnx_key(k): v for k, v in state.items()}
    rows = (
        math.ceil(lm["vocab_size"] / lm["pad_vocab_size_multiple"]) * lm["pad_vocab_size_multiple"]
    )
    emb = out.get("embedding.weight")
    head = out.pop("lm_head.weight", None)
    if lm["tie_embeddings"]:
        if head is not None and emb is not None and not torch.equal(head, emb):
            raise ValueError(
                "state: the config ties the head to the embedding, but lm_head.weight differs "
                "from the embedding matrix"
            )
    elif head is None:
        raise ValueError(
            "state: the config has an untied head (tie_word_embeddings / tie_embeddings false) "
            "but the checkpoint has no 'lm_head.weight'"
        )
    else:
        _check_rows(head, lm["vocab_size"], _source_key(state, "lm_head.weight"))
        out["lm_head.weight"] = _pad_rows(head, rows)
    if emb is not None:
        _check_rows(emb, lm["vocab_size"], _source_key(state, "embedding.weight"))
        out["embedding.weight"] = _pad_rows(emb, rows)
    return out


def _source_key(state: Mapping[str, Tensor], ours: str) -> str:
    """The checkpoint's own name of the tensor that maps to lrnnx's ``ours``."""
    return next((k for k in state if _lrnnx_key(k) == ours), ours)


def _check_rows(weight: Tensor, vocab_size: int, key: str) -> None:
    """A vocabulary matrix must hold a row per id of the config's vocabulary (padding rows
    are only ever added past it): fewer would give ids the checkpoint never trained."""
    if weight.dim() == 2 and weight.shape[0] < vocab_size:
        raise ValueError(
            f"{key}: has {weight.shape[0]} rows, but the config's vocab_size is {vocab_size}; "
            "the config does not belong to these weights"
        )


# ---------------------------------------------------------------------------------- files
def _load_safetensors(path: str, device: str) -> Dict[str, Tensor]:
    from safetensors.torch import load_file

    return load_file(path, device=device)


def _load_bin(path: str, device: str) -> Dict[str, Tensor]:
    # weights_only: a pickle from elsewhere must not run code
    return torch.load(path, map_location=device, weights_only=True)


def _load_sharded(index_path: str, load: Any, device: str) -> Dict[str, Tensor]:
    """Every shard named by a transformers ``*.index.json`` (``{"weight_map": {key: file}}``)."""
    with open(index_path) as f:
        weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path}: expected a non-empty 'weight_map' of tensor -> file")
    folder = os.path.dirname(index_path)
    state: Dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(load(os.path.join(folder, shard), device))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise RuntimeError(f"{index_path}: tensors {missing[:8]} are in no shard")
    return state


def read_mamba_weights(
    load_directory: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu"
) -> Dict[str, Tensor]:
    """The tensors of a checkpoint directory, by name, on ``device``.

    Looks for, in this order (transformers' preference): ``model.safetensors``,
    ``model.safetensors.index.json`` (sharded), ``pytorch_model.bin``,
    ``pytorch_model.bin.index.json``.  ``.bin`` files are read with
    ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: none of these files.
    """
    d, dev = os.fspath(load_directory), str(torch.device(device))
    candidates = (
        (_SAFETENSORS, lambda p: _load_safetensors(p, dev)),
        (_SAFETENSORS_INDEX, lambda p: _load_sharded(p, _load_safetensors, dev)),
        (_BIN, lambda p: _load_bin(p, dev)),
        (_BIN_INDEX, lambda p: _load_sharded(p, _load_bin, dev)),
    )
    for name, load in candidates:
        path = os.path.join(d, name)
        if os.path.isfile(path):
            return load(path)
    raise FileNotFoundError(
        f"load_directory: no weights in {d} (expected one of {[name for name, _ in candidates]})"
    )


def load_mamba_checkpoint(
    load_directory: Union[str, os.PathLike],
    map_location: Union[str, torch.device, None] = None,
    *,
    device: Union[str, torch.device, None] = None,
    dtype: Union[str, torch.dtype, None] = None,
    torch_dtype: Union[str, torch.dtype, None] = None,
    model_cls: Optional[Type[Any]] = None,
):
    """Build an :class:`lrnnx.architectures.LRNNLMHeadModel` from a transformers
    ``MambaForCausalLM`` or mamba_ssm ``MambaLMHeadModel`` directory; eval mode.

    ``lm(ids)`` (B, L) gives the source model's logits (B, L, vocab_size) within floating-point
    rounding (mamba_ssm's padded vocabulary entries are not returned).  The weights keep their
    saved dtypes unless ``dtype`` is given.

    Args:
        load_directory: holds ``config.json`` and the weights (see :func:`read_mamba_weights`).
        map_location: device for the weights (default: CPU).
        device: the same as ``map_location`` (give one, or both equal).
        dtype: cast the model after loading (``model.to(dtype)``); a floating-point dtype or its
            name; None or ``"auto"`` keeps the saved dtypes.
        torch_dtype: alias of ``dtype``.
        model_cls: the class to build (default :class:`LRNNLMHeadModel`; a subclass).

    Raises:
        FileNotFoundError: no ``config.json`` or no weights file.
        ValueError: a config :func:`mamba_lm_config` refuses; conflicting arguments.
        RuntimeError: the weights do not match the config (missing / unexpected / shape).
    """
    from lrnnx.architectures.lm import LRNNLMHeadModel

    target = _resolve_device(map_location, device)
    cast = _resolve_dtype(dtype, torch_dtype)
    config_path = os.path.join(os.fspath(load_directory), CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"load_directory: {config_path} not found")
    with open(config_path) as f:
        config = json.load(f)
    cls = LRNNLMHeadModel if model_cls is None else model_cls
    model = cls(**mamba_lm_config(config))
    state = convert_mamba_state_dict(read_mamba_weights(load_directory, target), config)
    # fresh, contiguous allocations (file buffers may be unaligned), one tensor at a time
    state = {
        k: torch.empty_like(state[k], memory_format=torch.contiguous_format).copy_(state.pop(k))
        for k in list(state)
    }
    model._assign_state(state)
    model.to(target)
    if cast is not None:
        model.to(cast)
    return model.eval()


__all__ = [
    "LAYOUTS",
    "convert_mamba_state_dict",
    "detect_layout",
    "load_mamba_checkpoint",
    "mamba_lm_config",
    "read_mamba_weights",
]
