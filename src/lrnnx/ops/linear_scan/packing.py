"""Packed sequences for both scans: ``cu_seqlens`` in flash-attn / fla's convention.

S sequences lie back to back along time in one batch row; ``cu_seqlens`` (S + 1,) holds their
offsets: sequence s is steps ``cu_seqlens[s] : cu_seqlens[s + 1]``, with ``cu_seqlens[0] = 0``
and ``cu_seqlens[-1] = T``.  Repeated offsets are zero-length sequences.  A packed scan equals
running each sequence alone: the recurrence restarts where a sequence's scan begins (its first
step, or its last with ``reverse``), from that sequence's initial state, and each sequence's
final state is read where its scan ends.

``cu_seqlens`` is validated once, on the host (one device sync), by
:func:`lrnnx.core.checks.check_cu_seqlens`; the helpers here give each backend the positions it
needs, and none of them loops over sequences in Python.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["scan_bounds", "step_layout"]


def scan_bounds(cu: Tensor, reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Where each sequence's scan begins and ends, for the int64 offsets ``cu`` (S + 1,).

    Returns ``(nonempty, begin, end)``: ``nonempty`` (S,) bool; ``begin`` and ``end`` (S,) the
    first and last step each sequence processes (first and last step, swapped with
    ``reverse``), clamped to valid indices for zero-length sequences (mask them with
    ``nonempty``).  Both are increasing over the non-empty sequences.
    """
    T = int(cu[-1])
    nonempty = cu[1:] > cu[:-1]
    first, last = cu[:-1], cu[1:] - 1
    begin, end = (last, first) if reverse else (first, last)
    hi = max(T - 1, 0)
    return nonempty, begin.clamp(0, hi), end.clamp(0, hi)


def step_layout(cu: Tensor, reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per-step view of the offsets ``cu`` (S + 1,): ``(seq, begins, ends)``, each (T,).

    ``seq[t]`` is the sequence step t belongs to; ``begins[t]`` whether t is where that
    sequence's scan begins (its state restarts there from the sequence's initial state);
    ``ends[t]`` whether its scan ends there (its final state is read there).  On ``cu``'s device.
    """
    T = int(cu[-1])
    t = torch.arange(T, device=cu.device)
    seq = torch.searchsorted(cu[1:].contiguous(), t, right=True)
    first = t == cu[seq]
    last = t == cu[seq + 1] - 1
    return (seq, last, first) if reverse else (seq, first, last)
