"""Shared plumbing for the numba CPU backends: availability, threads, tensor <-> array views."""

from __future__ import annotations

import logging
import sys

import torch
from torch import Tensor

try:
    import numba

    HAVE_NUMBA = True
except ImportError:  # the CPU backends then report themselves unavailable and dispatch falls back
    numba = None
    HAVE_NUMBA = False

#: channels handled by one parallel task: long enough to vectorise, short enough to balance threads
CHANNEL_BLOCK = 256

#: why the ``cpu`` backends are unavailable without numba, and the fix
MISSING_NUMBA = 'numba is not installed: pip install "lrnnx[cpu]" adds it'

logger = logging.getLogger("lrnnx.ops")
_ANNOUNCED = False


def is_available() -> bool:
    return HAVE_NUMBA


def sync_threads() -> None:
    """Make numba use as many threads as torch (``torch.set_num_threads`` governs both)."""
    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)


def _dispatchers(module) -> list:
    """The module's cached numba functions (``@numba.njit(cache=True)``)."""
    return [
        f for f in vars(module).values() if hasattr(f, "py_func") and getattr(f, "_cache", None)
    ]


def _compiled_before(dispatchers: list) -> bool:
    """Whether numba's on-disk cache already holds every one of these functions (numba's
    private cache API; anything unexpected counts as "not compiled")."""
    try:
        return all(d._cache._cache_file._load_index() for d in dispatchers)
    except Exception:  # noqa: BLE001 - a numba version without these internals
        return False


def announce_compilation(module) -> None:
    """Say once per process that the fused CPU kernels are being compiled, when ``module`` (a
    numba backend about to run for the first time) has kernels not in numba's cache yet: the
    first call otherwise stalls for seconds without a word.

    Logged at INFO on the ``lrnnx.ops`` logger; when logging is not configured, one line on
    stderr instead.
    """
    global _ANNOUNCED
    if _ANNOUNCED or not HAVE_NUMBA:
        return
    dispatchers = _dispatchers(module)
    if not dispatchers or _compiled_before(dispatchers):
        return
    _ANNOUNCED = True
    try:
        where = dispatchers[0]._cache.cache_path
    except AttributeError:
        where = "numba's cache directory"
    message = (
        f"lrnnx: compiling the fused CPU kernels (first use; cached in {where}, later runs "
        "load them)"
    )
    if logger.hasHandlers():
        logger.info(message)
    else:
        print(message, file=sys.stderr, flush=True)


def as_array(t: Tensor):
    """A contiguous CPU tensor as a numpy array sharing its memory."""
    return t.detach().contiguous().numpy()
