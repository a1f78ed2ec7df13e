"""Shared plumbing for the numba CPU backends: availability, threads, tensor <-> array views."""

from __future__ import annotations

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


def is_available() -> bool:
    return HAVE_NUMBA


def sync_threads() -> None:
    """Make numba use as many threads as torch (``torch.set_num_threads`` governs both)."""
    n = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)


def as_array(t: Tensor):
    """A contiguous CPU tensor as a numpy array sharing its memory."""
    return t.detach().contiguous().numpy()
