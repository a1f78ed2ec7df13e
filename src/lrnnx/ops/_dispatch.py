"""Backend selection for every op in :mod:`lrnnx.ops`.

Each op folder registers its backends here by name.  A call picks, in order:
the ``backend=`` argument, the ``LRNNX_BACKEND`` environment variable, then the first
available backend in the device's preference list.  A backend whose import or toolchain is
missing is skipped with one warning, so a call always lands on a backend that runs.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from typing import Callable, Dict, Optional

import torch

#: preference order per device type; "reference" is only used when asked for
PREFERENCE = {
    "cpu": ("cpu", "torch"),
    "cuda": ("triton", "torch"),
}
DEFAULT_PREFERENCE = ("torch",)

# op -> backend name -> "module:function"
_REGISTRY: Dict[str, Dict[str, str]] = {}
_LOADED: Dict[tuple, Optional[Callable]] = {}
_WARNED: set = set()


def register(op: str, backend: str, target: str) -> None:
    """Register ``target`` ("package.module:function") as backend ``backend`` of ``op``."""
    _REGISTRY.setdefault(op, {})[backend] = target


def backends(op: str) -> list[str]:
    """Names registered for ``op``."""
    return list(_REGISTRY.get(op, {}))


def _load(op: str, name: str) -> Optional[Callable]:
    key = (op, name)
    if key not in _LOADED:
        module, func = _REGISTRY[op][name].split(":")
        try:
            mod = importlib.import_module(module)
            fn = getattr(mod, func)
            available = getattr(mod, "is_available", lambda: True)
            _LOADED[key] = fn if available() else None
            reason = "its toolchain is not available"
        except Exception as e:  # a missing optional dependency must never break the op
            _LOADED[key] = None
            reason = f"{type(e).__name__}: {e}"
        if _LOADED[key] is None and key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(
                f"lrnnx: backend {name!r} of {op} is unavailable ({reason}); falling back",
                RuntimeWarning,
                stacklevel=3,
            )
    return _LOADED[key]


def select(op: str, device: torch.device, backend: Optional[str] = None) -> tuple[str, Callable]:
    """The backend ``op`` runs on for tensors on ``device``: its name and its function."""
    table = _REGISTRY[op]
    requested = backend or os.environ.get("LRNNX_BACKEND") or None
    if requested is not None:
        if requested not in table:
            raise ValueError(f"backend: expected one of {list(table)} for {op}, got {requested!r}")
        fn = _load(op, requested)
        if fn is not None:
            return requested, fn
    for name in PREFERENCE.get(device.type, DEFAULT_PREFERENCE):
        if name in table and name != requested:
            fn = _load(op, name)
            if fn is not None:
                return name, fn
    return "torch", _load(op, "torch")


_OPAQUE: Dict[Callable, Callable] = {}


def _opaque(fn: Callable) -> Callable:
    """``fn`` as one opaque call for torch.compile (a graph break) rather than traced into numba or
    Triton launchers and chunk loops, which Dynamo cannot follow.  Only once Dynamo is loaded:
    importing it costs seconds, and without it nothing is being compiled."""
    if "torch._dynamo" not in sys.modules:
        return fn
    if fn not in _OPAQUE:
        _OPAQUE[fn] = torch.compiler.disable(fn)
    return _OPAQUE[fn]


def resolve(op: str, device: torch.device, backend: Optional[str] = None) -> Callable:
    """Return the function implementing ``op`` for tensors on ``device``."""
    return _opaque(select(op, device, backend)[1])
