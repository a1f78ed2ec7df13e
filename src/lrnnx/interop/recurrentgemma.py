"""Griffin's recurrent block from transformers' RecurrentGemma checkpoints, as lrnnx RG-LRUs.

transformers' ``RecurrentGemmaRecurrentBlock`` (Hawk / Griffin's temporal block, De et al.,
arXiv 2402.19427; the layout of the public ``google/recurrentgemma-*`` checkpoints) computes the
same function as :class:`lrnnx.models.ltv.rglru.RGLRU` built with

- ``reset_at_start=True``: the recurrence restarts at position 0 (a_0 = 0, no sqrt(1 - a_0^2)
  normalisation), which transformers does wherever ``position_ids == 0``;
- ``c=8`` (fixed in transformers), ``bias=True`` and ``conv_bias=True`` (every projection and
  the conv have biases there);
- ``gelu_approximate`` from ``hidden_activation``: "gelu_pytorch_tanh" (the default),
  "gelu_new" and "gelu_fast" are the tanh GeLU, "gelu" and "gelu_python" the exact erf GeLU.

The weights map one to one (transformers name -> lrnnx name)::

    linear_y                    -> gate_proj              GeLU branch, (D, H) and (D,)
    linear_x                    -> in_proj                recurrent branch, (D, H) and (D,)
    conv_1d                     -> conv1d                 same (D, 1, K) depthwise causal layout
    rg_lru.recurrent_gate_*     -> recurrent_gate_proj    (heads, D/heads, D/heads) as x @ W;
    rg_lru.input_gate_*         -> input_gate_proj        biases (heads, D/heads) flattened to (D,)
    rg_lru.recurrent_param      -> Lambda = -recurrent_param
    linear_out                  -> out_proj               (H, D) and (H,)

The sign: transformers writes log a_t = -8 r_t softplus(recurrent_param), lrnnx
log a_t = c r_t log sigmoid(Lambda) = -c r_t softplus(-Lambda).

Only the recurrent (``"recurrent"`` block type) temporal blocks are converted: RecurrentGemma's
local-attention blocks, MLP blocks, RMSNorms, embeddings and logit soft-capping are not part of
this module.  Gradients differ in one corner only: transformers clips the derivative of
sqrt(1 - a_t^2) at 1000 (where 1 - a_t^2 < 2.5e-7), lrnnx differentiates it exactly; the
forward pass is the same.

transformers is not imported here: a block module is read through its ``state_dict`` and a
checkpoint directory through ``config.json`` and safetensors files.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping
from typing import Any, Dict, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrnnx.models.ltv.rglru import RGLRU

#: the fixed c of transformers' RG-LRU (log a_t = -8 r_t softplus(recurrent_param))
RECURRENTGEMMA_C = 8.0

#: transformers ``hidden_activation`` names -> F.gelu's ``approximate``
_GELU_BY_ACTIVATION = {
    "gelu_pytorch_tanh": "tanh",
    "gelu_new": "tanh",
    "gelu_fast": "tanh",
    "gelu": "none",
    "gelu_python": "none",
}

#: a recurrent block's parameters, relative to the block
_BLOCK_KEYS = (
    "linear_y.weight",
    "linear_y.bias",
    "linear_x.weight",
    "linear_x.bias",
    "linear_out.weight",
    "linear_out.bias",
    "conv_1d.weight",
    "conv_1d.bias",
    "rg_lru.recurrent_param",
    "rg_lru.input_gate_weight",
    "rg_lru.input_gate_bias",
    "rg_lru.recurrent_gate_weight",
    "rg_lru.recurrent_gate_bias",
)

#: "<prefix>layers.<i>.temporal_block.<key>" (prefix "model." for RecurrentGemmaForCausalLM)
_LAYER_KEY = re.compile(r"^(?:.*\.)?layers\.(\d+)\.temporal_block\.(.+)$")


def _config_get(config: Any, name: str, default: Any = None) -> Any:
    """A field of a config given as a dict (config.json) or an object (RecurrentGemmaConfig)."""
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def gelu_approximate_from_activation(name: str) -> str:
    """F.gelu's ``approximate`` for a transformers ``hidden_activation`` name.

    Raises:
        ValueError: not one of the GeLU variants listed in the module docstring.
    """
    if name not in _GELU_BY_ACTIVATION:
        raise ValueError(
            f"hidden_activation: expected one of {sorted(_GELU_BY_ACTIVATION)} (the GeLU "
            f"variants RGLRU computes), got {name!r}"
        )
    return _GELU_BY_ACTIVATION[name]


def _gelu_approximate_of_module(act: nn.Module) -> str:
    """Which GeLU an activation module computes, read from its values (not its class name)."""
    z = torch.linspace(-6.0, 6.0, 241, dtype=torch.float64)
    with torch.no_grad():
        got = act(z.float()).double()
    for approximate in ("tanh", "none"):
        # float32 rounding is ~1e-7 here; the two GeLUs differ by up to ~1e-3
        if (got - F.gelu(z, approximate=approximate)).abs().max() < 1e-5:
            return approximate
    raise ValueError(
        f"block.act_fn: expected a GeLU (tanh or erf), got {type(act).__name__} whose values "
        "match neither"
    )


def _check_block_state(state: Mapping[str, Tensor], where: str) -> Dict[str, int]:
    """Check a block's parameters are all there with consistent shapes; return the sizes."""
    missing = [k for k in _BLOCK_KEYS if k not in state]
    if missing:
        hint = ""
        if any(_LAYER_KEY.match(k) for k in state):
            hint = "; for a whole model's state_dict use recurrentgemma_layers_from_state_dict"
        raise ValueError(f"{where}: missing entries {missing}{hint}")
    unexpected = sorted(set(state) - set(_BLOCK_KEYS))
    if unexpected:  # another version's parameter would otherwise be dropped without a word
        raise ValueError(
            f"{where}: unexpected entries {unexpected} (a recurrent block has {list(_BLOCK_KEYS)})"
        )
    for k in _BLOCK_KEYS:
        v = state[k]
        if not isinstance(v, Tensor) or not v.is_floating_point():
            got = v.dtype if isinstance(v, Tensor) else type(v).__name__
            raise TypeError(f"{where}[{k!r}]: expected a real floating-point tensor, got {got}")
    for k, ndim in (("linear_x.weight", 2), ("rg_lru.recurrent_gate_weight", 3),
                    ("conv_1d.weight", 3)):  # fmt: skip
        if state[k].dim() != ndim or 0 in state[k].shape:
            raise ValueError(
                f"{where}[{k!r}]: expected a non-empty {ndim}-D tensor, got shape "
                f"{tuple(state[k].shape)}"
            )
    D, H = state["linear_x.weight"].shape
    heads = state["rg_lru.recurrent_gate_weight"].shape[0]
    bw = D // heads  # the gate blocks' width; a heads count not dividing D fails the shapes
    K = state["conv_1d.weight"].shape[-1]
    expected = {
        "linear_y.weight": (D, H),
        "linear_y.bias": (D,),
        "linear_x.bias": (D,),
        "linear_out.weight": (H, D),
        "linear_out.bias": (H,),
        "conv_1d.weight": (D, 1, K),
        "conv_1d.bias": (D,),
        "rg_lru.recurrent_param": (D,),
        "rg_lru.input_gate_weight": (heads, bw, bw),
        "rg_lru.input_gate_bias": (heads, bw),
        "rg_lru.recurrent_gate_weight": (heads, bw, bw),
        "rg_lru.recurrent_gate_bias": (heads, bw),
    }
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape:
            raise ValueError(
                f"{where}[{k!r}]: expected shape {shape} (hidden_size {H}, lru_width {D}, "
                f"{heads} heads, conv width {K}), got {tuple(state[k].shape)}"
            )
    return {"hidden_size": H, "lru_width": D, "num_attention_heads": heads, "conv1d_width": K}


def _check_config_sizes(config: Any, sizes: Dict[str, int], where: str) -> None:
    """The config's sizes, where it states them, must be those of the weights."""
    for name, value in sizes.items():
        stated = _config_get(config, name)
        if name == "lru_width" and stated is None:  # RecurrentGemma: lru_width = hidden_size
            stated = _config_get(config, "hidden_size")
        if stated is not None and int(stated) != value:
            raise ValueError(f"{where}: config {name}={stated} but the weights have {value}")


def _lrnnx_state(state: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """transformers' block parameters under RGLRU's names (see the module docstring)."""
    out = {}
    pairs = (("linear_y", "gate_proj"), ("linear_x", "in_proj"))
    pairs += (("linear_out", "out_proj"), ("conv_1d", "conv1d"))
    for src, dst in pairs:
        out[f"{dst}.weight"] = state[f"{src}.weight"]
        out[f"{dst}.bias"] = state[f"{src}.bias"]
    for gate in ("recurrent_gate", "input_gate"):
        out[f"{gate}_proj.weight"] = state[f"rg_lru.{gate}_weight"]
        out[f"{gate}_proj.bias"] = state[f"rg_lru.{gate}_bias"].reshape(-1)
    out["Lambda"] = -state["rg_lru.recurrent_param"]
    return out


def rglru_from_recurrentgemma(
    block: nn.Module | Mapping[str, Tensor],
    config: Any = None,
    *,
    layer_idx: Optional[int] = None,
    dtype: Optional[torch.dtype] = None,
    device: torch.device | str | None = None,
) -> RGLRU:
    """An :class:`RGLRU` computing what a RecurrentGemma recurrent block computes.

    Args:
        block: a transformers ``RecurrentGemmaRecurrentBlock``, or its ``state_dict`` (keys
            ``linear_x.weight``, ..., ``rg_lru.recurrent_param``, relative to the block).
        config: the ``RecurrentGemmaConfig`` or config.json dict; only ``hidden_activation`` is
            read from it (the sizes come from the weights and are checked against it).  None:
            the activation is read off ``block.act_fn`` for a module, and is transformers'
            default "gelu_pytorch_tanh" for a state_dict.
        layer_idx: stored on the RGLRU (for callers that key caches by layer).
        dtype: the RGLRU's parameter dtype; None keeps the weights' (the widest, when they
            differ; ``Lambda`` is at least float32).
        device: where to put the RGLRU (default: CPU).

    Returns:
        RGLRU with ``d_model = hidden_size`` H, ``lru_width`` D, ``num_heads =
        num_attention_heads``, ``d_conv = conv1d_width``, ``c = 8``, biases, and
        ``reset_at_start=True``: x (B, L, H) -> y (B, L, H) equal to the block's output for
        ``position_ids`` 0..L-1, and ``step`` equal to its cached decoding.

    Raises:
        TypeError: ``block`` is neither a module nor a mapping of tensors, or an entry is not
            a real floating-point tensor.
        ValueError: missing or mis-shaped weights, sizes disagreeing with ``config``, or an
            activation that is not a GeLU.
    """
    if isinstance(block, nn.Module):
        state, where = block.state_dict(), "block"
        if config is None:
            approximate = _gelu_approximate_of_module(block.act_fn)
        else:
            approximate = gelu_approximate_from_activation(_config_get(config, "hidden_activation"))
    elif isinstance(block, Mapping):
        state, where = block, "state_dict"
        name = "gelu_pytorch_tanh" if config is None else _config_get(config, "hidden_activation")
        approximate = gelu_approximate_from_activation(name or "gelu_pytorch_tanh")
    else:
        raise TypeError(
            "block: expected a RecurrentGemmaRecurrentBlock or its state_dict, got "
            f"{type(block).__name__}"
        )
    sizes = _check_block_state(state, where)
    if config is not None:
        _check_config_sizes(config, sizes, where)
    if dtype is None:  # the widest of the weights' dtypes: none is rounded
        dtype = functools.reduce(torch.promote_types, (state[k].dtype for k in _BLOCK_KEYS))
    model = RGLRU(
        sizes["hidden_size"],
        d_conv=sizes["conv1d_width"],
        c=RECURRENTGEMMA_C,
        conv_bias=True,
        bias=True,
        layer_idx=layer_idx,
        device=device,
        dtype=dtype,
        lru_width=sizes["lru_width"],
        num_heads=sizes["num_attention_heads"],
        reset_at_start=True,
        gelu_approximate=approximate,
    )
    with torch.no_grad():
        model.load_state_dict(_lrnnx_state(state), strict=True)
    return model


def _recurrent_layer_indices(config: Any) -> Optional[list[int]]:
    """Indices of the "recurrent" layers stated by the config, or None if it states none.

    ``block_types`` (``_block_types`` in configs written by transformers 4.x) repeats over
    ``num_hidden_layers``, as in RecurrentGemmaConfig.
    """
    types = _config_get(config, "block_types") or _config_get(config, "_block_types")
    n = _config_get(config, "num_hidden_layers")
    if not types or n is None:
        return None
    types = list(types)
    return [i for i in range(int(n)) if types[i % len(types)] == "recurrent"]


def _group_layers(keys: Iterable[str]) -> Dict[int, Dict[str, str]]:
    """{layer index: {key relative to the block: full key}} for recurrent temporal blocks."""
    layers: Dict[int, Dict[str, str]] = {}
    for key in keys:
        m = _LAYER_KEY.match(key)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = key
    # attention temporal blocks have q_proj/k_proj/...: keep the layers with any recurrent
    # block entry (one that lacks some is then named by _check_block_state, not dropped)
    return {i: ks for i, ks in sorted(layers.items()) if any(k in _BLOCK_KEYS for k in ks)}


def _check_layers_against_config(found: Iterable[int], config: Any, where: str) -> None:
    stated = _recurrent_layer_indices(config) if config is not None else None
    if stated is not None and sorted(found) != stated:
        raise ValueError(
            f"{where}: the config's block_types make layers {stated} recurrent, but the "
            f"weights have recurrent blocks at layers {sorted(found)}"
        )


def recurrentgemma_layers_from_state_dict(
    state_dict: Mapping[str, Tensor],
    config: Any = None,
    *,
    dtype: Optional[torch.dtype] = None,
    device: torch.device | str | None = None,
) -> Dict[int, RGLRU]:
    """Every recurrent layer of a RecurrentGemma model's state_dict, as ``{layer index: RGLRU}``.

    Args:
        state_dict: of ``RecurrentGemmaForCausalLM`` (keys ``model.layers.<i>.temporal_block.*``)
            or ``RecurrentGemmaModel`` (``layers.<i>.temporal_block.*``).
        config: see :func:`rglru_from_recurrentgemma`; its ``block_types`` are checked against
            the layers found.
        dtype, device: see :func:`rglru_from_recurrentgemma`.

    Returns:
        ``{i: RGLRU}`` for the layers whose temporal block is recurrent, in layer order; the
        attention layers, MLPs, norms and embeddings are not converted.

    Raises:
        ValueError: no recurrent block found, layers disagreeing with the config, or a block's
            weights missing or mis-shaped.
    """
    layers = _group_layers(state_dict)
    if not layers:
        raise ValueError(
            "state_dict: no 'layers.<i>.temporal_block.rg_lru.recurrent_param' entry: not a "
            "RecurrentGemma model with recurrent blocks"
        )
    _check_layers_against_config(layers, config, "state_dict")
    return {
        i: rglru_from_recurrentgemma(
            {k: state_dict[full] for k, full in keys.items()},
            config,
            layer_idx=i,
            dtype=dtype,
            device=device,
        )
        for i, keys in layers.items()
    }


def _weight_files(path: str) -> Dict[str, str]:
    """{tensor name: safetensors file} of a checkpoint directory, sharded or not."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index}: expected a non-empty 'weight_map' of tensor -> file")
        return {k: os.path.join(path, v) for k, v in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {k: single for k in f.keys()}
    raise FileNotFoundError(
        f"path: no model.safetensors or model.safetensors.index.json in {path!r} "
        f"(found {sorted(os.listdir(path))})"
    )


def _read_tensors(files: Mapping[str, str], names: Iterable[str]) -> Dict[str, Tensor]:
    """Only the named tensors, each file opened once."""
    from safetensors import safe_open

    by_file: Dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    out = {}
    for file, keys in by_file.items():
        with safe_open(file, framework="pt") as f:
            for k in keys:
                out[k] = f.get_tensor(k)
    return out


def load_recurrentgemma_recurrent_layers(
    path: str | os.PathLike,
    *,
    dtype: Optional[torch.dtype] = None,
    device: torch.device | str | None = None,
) -> Dict[int, RGLRU]:
    """The recurrent layers of a transformers RecurrentGemma checkpoint directory.

    Args:
        path: a directory written by ``RecurrentGemmaForCausalLM.save_pretrained`` (or
            downloaded from the hub): ``config.json`` with ``model_type`` "recurrent_gemma" and
            ``model.safetensors`` or sharded ``model-*.safetensors`` with their
            ``model.safetensors.index.json``.  Only the recurrent blocks' tensors are read.
        dtype, device: see :func:`rglru_from_recurrentgemma` (default: the checkpoint's dtype,
            CPU).

    Returns:
        ``{layer index: RGLRU}`` for every layer whose temporal block is recurrent (with
        ``reset_at_start=True``, see the module docstring).  RecurrentGemma's attention blocks,
        MLPs, norms and embeddings are not converted.

    Raises:
        FileNotFoundError: no config.json or no safetensors weights in ``path``.
        ValueError: not a RecurrentGemma config, or weights that do not match it.
    """
    path = os.fspath(path)
    config_file = os.path.join(path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"path: no config.json in {path!r}")
    with open(config_file) as f:
        config = json.load(f)
    if config.get("model_type") != "recurrent_gemma":
        raise ValueError(
            f"path: expected a RecurrentGemma checkpoint (config.json model_type "
            f"'recurrent_gemma'), got model_type {config.get('model_type')!r} in {path!r}"
        )
    files = _weight_files(path)
    layers = _group_layers(files)
    if not layers:
        raise ValueError(f"path: no recurrent block weights in {path!r}")
    _check_layers_against_config(layers, config, f"path {path!r}")
    wanted = [full for keys in layers.values() for full in keys.values()]
    tensors = _read_tensors(files, wanted)
    return recurrentgemma_layers_from_state_dict(tensors, config, dtype=dtype, device=device)


__all__ = [
    "RECURRENTGEMMA_C",
    "gelu_approximate_from_activation",
    "load_recurrentgemma_recurrent_layers",
    "recurrentgemma_layers_from_state_dict",
    "rglru_from_recurrentgemma",
]
