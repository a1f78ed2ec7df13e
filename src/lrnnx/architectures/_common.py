"""Helpers shared by the architectures: mixer-argument routing and save/load."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Union

import torch
from torch import Tensor, nn

from lrnnx.models.registry import MODEL_ALIASES, class_path, resolve_name

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def positive_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def mixer_name(mixer: Union[str, type]) -> str:
    """Canonical registry name, or ``"module:Class"`` for a class / import path."""
    if isinstance(mixer, type):
        return class_path(mixer)
    if isinstance(mixer, str) and ":" in mixer:
        return mixer
    return resolve_name(mixer)


def check_no_dims(kwargs: Dict[str, Any], where: str = "mixer_kwargs") -> None:
    """d_model / d_state are architecture arguments: repeating them in mixer kwargs is an error."""
    for key in ("d_model", "d_state", "dim"):
        if key in kwargs:
            raise ValueError(
                f"{where}: {key!r} is given twice; pass d_model/d_state once, as the "
                f"architecture's own arguments"
            )


def split_mixer_kwargs(
    mixer_kwargs: Optional[Dict[str, Any]], names: List[str]
) -> Dict[str, Dict[str, Any]]:
    """Route ``mixer_kwargs`` to each mixer type.

    Either a flat dict (the keyword arguments of every recurrent mixer; attention takes none) or
    a dict keyed by mixer name (``{"s5": {...}, "attn": {...}}``, names/aliases case-insensitive).

    Returns:
        canonical name -> kwargs, for each name in ``names``.
    """
    if mixer_kwargs is None:
        return {n: {} for n in names}
    if not isinstance(mixer_kwargs, dict):
        raise TypeError(f"mixer_kwargs: expected None or a dict, got {type(mixer_kwargs).__name__}")
    is_name = {
        k: isinstance(k, str) and (":" in k or k.strip().lower().replace("_", "-") in MODEL_ALIASES)
        for k in mixer_kwargs
    }
    if mixer_kwargs and all(is_name.values()):
        per_type: Dict[str, Dict[str, Any]] = {}
        for k, v in mixer_kwargs.items():
            if not isinstance(v, dict):
                raise TypeError(
                    f"mixer_kwargs[{k!r}]: expected a dict of arguments, got {type(v).__name__}"
                )
            check_no_dims(v, f"mixer_kwargs[{k!r}]")
            per_type[mixer_name(k)] = dict(v)
        unused = sorted(set(per_type) - set(names))
        if unused:
            raise ValueError(
                f"mixer_kwargs: arguments for {unused}, which no layer uses (layers: {sorted(set(names))})"
            )
        return {n: per_type.get(n, {}) for n in names}
    if any(is_name.values()):
        raise ValueError(
            "mixer_kwargs: mixes mixer names "
            f"{[k for k, v in is_name.items() if v]} with plain arguments "
            f"{[k for k, v in is_name.items() if not v]}; use either {{name: kwargs}} or flat kwargs"
        )
    check_no_dims(mixer_kwargs)
    return {n: ({} if n == "attn" else dict(mixer_kwargs)) for n in names}


def _tie_map(module: nn.Module) -> Dict[str, str]:
    """state_dict key -> the first key sharing its storage (itself if not tied)."""
    first: Dict[tuple, str] = {}
    out: Dict[str, str] = {}
    for k, v in module.state_dict(keep_vars=True).items():
        ident = (v.data_ptr(), v.dtype, tuple(v.shape), tuple(v.stride())) if v.numel() else (k,)
        out[k] = first.setdefault(ident, k)
    return out


class PretrainedMixin:
    """``save_pretrained(dir)`` / ``from_pretrained(dir)``: config.json + model.safetensors.

    The class keeps its constructor arguments in ``self.config`` (JSON-serialisable).  Tied
    tensors (one storage under several names, e.g. an LM head tied to the embedding) are saved
    once and re-tied by construction on load.
    """

    config: Dict[str, Any]

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> None:
        """Write ``config.json`` and ``model.safetensors`` into ``save_directory``."""
        from safetensors.torch import save_file

        try:
            text = json.dumps(self.config, indent=2, sort_keys=True)
        except TypeError as e:
            raise TypeError(
                f"config: not JSON-serialisable ({e}); use plain numbers/strings/lists in the arguments"
            ) from e
        os.makedirs(save_directory, exist_ok=True)
        ties = _tie_map(self)
        state = self.state_dict()
        # one copy per storage; clone so no two saved tensors share memory
        tensors = {k: v.detach().contiguous().clone() for k, v in state.items() if ties[k] == k}
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            f.write(text + "\n")
        save_file(tensors, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(
        cls,
        load_directory: Union[str, os.PathLike],
        map_location: Union[str, torch.device, None] = None,
    ):
        """Rebuild from ``config.json`` and load ``model.safetensors`` (dtypes as saved).

        Args:
            load_directory: a directory written by :meth:`save_pretrained`.
            map_location: device for the weights (default: CPU).
        """
        from safetensors.torch import load_file

        cfg_path = os.path.join(load_directory, CONFIG_NAME)
        w_path = os.path.join(load_directory, WEIGHTS_NAME)
        for p in (cfg_path, w_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(
                    f"load_directory: {p} not found (expected a save_pretrained directory)"
                )
        with open(cfg_path) as f:
            config = json.load(f)
        model = cls(**config)
        device = torch.device("cpu") if map_location is None else torch.device(map_location)
        state = load_file(w_path, device=str(device))
        model._assign_state(state)
        return model.to(device)

    def _assign_state(self, state: Dict[str, Tensor]) -> None:
        """Put the loaded tensors in place (keeping their dtype); tied names follow their owner."""
        ties = _tie_map(self)
        expected = {k for k, owner in ties.items() if owner == k}
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise RuntimeError(
                f"weights do not match the config: missing {missing}, unexpected {unexpected}"
            )
        for key, tensor in state.items():
            path, _, leaf = key.rpartition(".")
            mod = self.get_submodule(path) if path else self
            current = (
                mod._parameters.get(leaf) if leaf in mod._parameters else mod._buffers.get(leaf)
            )
            if current is None or tuple(current.shape) != tuple(tensor.shape):
                got = None if current is None else tuple(current.shape)
                raise RuntimeError(
                    f"{key}: expected shape {got}, got {tuple(tensor.shape)} in the file"
                )
            with torch.no_grad():
                if leaf in mod._parameters:
                    current.data = tensor  # same Parameter object: ties survive
                else:
                    mod._buffers[leaf] = tensor
