"""Packed sequences for both scans: ``cu_seqlens`` in flash-attn / fla's convention.

S sequences lie back to back along time in one batch row; ``cu_seqlens`` (S + 1,) holds their
offsets: sequence s is steps ``cu_seqlens[s] : cu_seqlens[s + 1]``, with ``cu_seqlens[0] = 0``
and ``cu_seqlens[-1] = T``.  Repeated offsets are zero-length sequences.  A packed scan equals
running each sequence alone: the recurrence restarts where a sequence's scan begins (its first
step, or its last with ``reverse``), from that sequence's initial state, and each sequence's
final state is read where its scan ends.

The helpers here validate ``cu_seqlens`` once (on the host: one device sync) and give each
backend the positions it needs; none of them loops over sequences in Python.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_cu_seqlens", "scan_bounds", "step_layout"]


def check_cu_seqlens(cu_seqlens: object, batch: int, length: int, where: str) -> Tensor:
    """Validate ``cu_seqlens`` for an input of ``batch`` rows and ``length`` steps.

    ``where`` names the input's layout for the messages (e.g. "b (1, T, *C)").  Returns the
    offsets as an int64 CPU tensor (S + 1,).  Raises ValueError (naming ``cu_seqlens``) for a
    non-tensor, a non-integer dtype, a shape other than (S + 1,) with S >= 1, a batch other than
    1, a first offset other than 0, a last other than T, or decreasing offsets.
    """
    if not isinstance(cu_seqlens, Tensor):
        raise ValueError(
            "cu_seqlens: expected a LongTensor (S + 1,) of offsets, got "
            f"{type(cu_seqlens).__name__}"
        )
    if cu_seqlens.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"cu_seqlens: expected an integer tensor (int64, or int32 as flash-attn's), got dtype "
            f"{cu_seqlens.dtype}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(
            f"cu_seqlens: expected shape (S + 1,) with S >= 1 sequences, got "
            f"{tuple(cu_seqlens.shape)}"
        )
    if batch != 1:
        raise ValueError(
            f"cu_seqlens: packed sequences lie back to back in one batch row, so {where} needs "
            f"batch size 1, got {batch}"
        )
    cu = cu_seqlens.detach().to("cpu", torch.int64)
    if cu[0].item() != 0:
        raise ValueError(f"cu_seqlens: expected cu_seqlens[0] = 0, got {cu[0].item()}")
    if cu[-1].item() != length:
        raise ValueError(
            f"cu_seqlens: expected cu_seqlens[-1] = T = {length} (the number of steps), got "
            f"{cu[-1].item()}"
        )
    if bool((cu[1:] < cu[:-1]).any()):
        s = int((cu[1:] < cu[:-1]).nonzero()[0, 0])
        raise ValueError(
            f"cu_seqlens: offsets must not decrease, got cu_seqlens[{s}] = {cu[s].item()} > "
            f"cu_seqlens[{s + 1}] = {cu[s + 1].item()}"
        )
    return cu


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
