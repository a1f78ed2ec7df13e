"""Bidirectional (non-causal) mixer from two causal ones:

    y = F(x) + R(G(R(x)))

F (``forward_mixer``) reads the sequence from the first element to the last, G
(``backward_mixer``) from the last to the first: R reverses each sequence *inside its own
length*, R(x)[b, t] = x[b, lengths[b] - 1 - t] for t < lengths[b], and leaves the padding where
it is.  So the output at t depends on every valid input, before and after t; padded outputs are
exactly 0, and padding values never matter (NaN included: padding is removed by selects).

Elapsed times.  ``integration_timesteps`` dt[t] (event models) is the time elapsed between
element t - 1 and element t.  In the reversed sequence, element t' is original element
t = n - 1 - t' and the element before it is original element t + 1, so the time elapsed before
it is the original time elapsed *after* t, dt[t + 1]:

    dt_rev[t'] = dt[n - t']    for 1 <= t' < n        (n = the sequence's length)
    dt_rev[0]  = dt[0]

i.e. dt is shifted by one and then reversed.  (With absolute event times T_t and
dt[t] = T_t - T_{t-1}, the reversed sequence has times -T_{n-1-t'}, whose differences are
exactly dt[n - t'].)  The first reversed element has no predecessor: the time from the end of
the recording to the last event is unknown, so it keeps the gap the original first element had
(dt[0]), which keeps the total elapsed time.  From a zero state that gap only matters to rules
whose input gain depends on dt (event-S5 with ``zoh``/``bilinear``); Mamba's event mode and
event-S5's ``async`` use dt only in the decay of the (zero) previous state.

Packed sequences.  With ``cu_seqlens`` (S + 1,) int32/int64 offsets (fla's convention: x (1, T, D)
holds S sequences back to back), R reverses each sequence within its own span,
R(x)[cu[s] + t] = x[cu[s + 1] - 1 - t], the elapsed times are reversed per sequence by the rule
above, and both mixers get the same offsets (a reversed sequence keeps its span), so the
backward mixer's packed scan restarts at each reversed sequence's start.  The output equals
running each sequence alone through the bidirectional mixer.

A bidirectional mixer has no streaming mode: :meth:`Bidirectional.step`,
:meth:`Bidirectional.allocate_inference_cache` and ``forward(..., inference_cache=...)`` raise
:class:`NoStreamingError` (a ValueError and a NotImplementedError).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from lrnnx.core.base import reset_submodules
from lrnnx.core.checks import (
    as_lengths,
    check_sequence,
    check_timesteps,
    packed_offsets,
    zero_where_not,
)
from lrnnx.ops.linear_scan.packing import step_layout

_NO_STREAMING = (
    "a bidirectional model has no streaming mode: its output at t depends on the inputs after "
    "t, so it cannot run step by step or from an inference cache; run forward on whole "
    "sequences, or use a causal model (bidirectional=False) to stream"
)


class NoStreamingError(ValueError, NotImplementedError):
    """``step`` / inference caches of a bidirectional (non-causal) model: there is no streaming
    mode.  Both a ValueError and a NotImplementedError."""


def reverse_index(lengths: Optional[Tensor], batch: int, seqlen: int, device=None) -> Tensor:
    """(B, L) gather index of the reversal within lengths: lengths[b] - 1 - t for
    t < lengths[b], t on the padding (all sequences of length L when ``lengths`` is None)."""
    t = torch.arange(seqlen, device=device)[None, :]
    if lengths is None:
        return (seqlen - 1 - t).expand(batch, seqlen)
    n = lengths.to(device)[:, None]
    return torch.where(t < n, n - 1 - t, t)


def reverse_within_lengths(x: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
    """Reverse each sequence of x (B, L, ...) along dim 1 inside its length; padding stays put.

    Without ``lengths`` this is ``x.flip(1)``.  Applying it twice gives x back.
    """
    if lengths is None:
        return x.flip(1)
    B, L = x.shape[:2]
    idx = reverse_index(lengths, B, L, x.device)
    return x.gather(1, idx.view(B, L, *([1] * (x.dim() - 2))).expand(x.shape))


def reverse_timesteps(ts: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
    """Elapsed times (B, L) for the reversed sequences (see the module docstring):
    dt_rev[t'] = dt[n - t'] for 1 <= t' < n and dt_rev[0] = dt[0]; padding stays put."""
    B, L = ts.shape
    t = torch.arange(L, device=ts.device)[None, :]
    n = (
        torch.full((B, 1), L, device=ts.device)
        if lengths is None
        else lengths.to(ts.device)[:, None]
    )
    idx = torch.where(t < n, torch.where(t == 0, 0, n - t), t)
    return ts.gather(1, idx)


def packed_reverse_index(cu_seqlens: Tensor, device=None) -> Tensor:
    """(T,) gather index that reverses each packed sequence within its span:
    cu[s] + cu[s + 1] - 1 - t for t in [cu[s], cu[s + 1]).  ``cu_seqlens``: int64 (S + 1,)."""
    cu = cu_seqlens.to(device, torch.int64)
    seq = step_layout(cu, False)[0]
    return cu[seq] + cu[seq + 1] - 1 - torch.arange(int(cu[-1]), device=device)


def packed_reverse_timesteps_index(cu_seqlens: Tensor, device=None) -> Tensor:
    """(T,) gather index of the elapsed times of the reversed packed sequences (the module
    docstring's rule per sequence): cu[s] + cu[s + 1] - t, and cu[s] at each sequence start."""
    cu = cu_seqlens.to(device, torch.int64)
    seq = step_layout(cu, False)[0]
    t = torch.arange(int(cu[-1]), device=device)
    first = cu[seq]
    return torch.where(t == first, first, first + cu[seq + 1] - t)


class Bidirectional(nn.Module):
    """Non-causal mixer: ``forward_mixer(x) + R(backward_mixer(R(x)))`` (see the module docstring).

    Example:
        >>> from lrnnx.models.registry import build_mixer
        >>> bi = Bidirectional(build_mixer("s5", 32, 16), build_mixer("s5", 32, 16))
        >>> y = bi(torch.randn(2, 50, 32), lengths=torch.tensor([50, 30]))  # (B, L, D)
        >>> bi = build_mixer("s5", 32, 16, bidirectional=True)  # the same, built by the registry

    Args:
        forward_mixer: a causal mixer (the mixer protocol: ``forward(x, integration_timesteps=,
            lengths=)``), run on the sequences as they are; kept as ``.fwd``.
        backward_mixer: a second mixer (its own parameters), run on the reversed sequences;
            kept as ``.bwd``.

    Both mixers map (B, L, D) to (B, L, D); they get zeroed padding and ``lengths``, and the
    padded outputs are zeroed here whatever they return.
    """

    def __init__(self, forward_mixer: nn.Module, backward_mixer: nn.Module) -> None:
        super().__init__()
        for name, m in (("forward_mixer", forward_mixer), ("backward_mixer", backward_mixer)):
            if not isinstance(m, nn.Module):
                raise TypeError(f"{name}: expected an nn.Module, got {type(m).__name__}")
        if forward_mixer is backward_mixer:
            raise ValueError(
                "backward_mixer: expected a second mixer with its own parameters, got the "
                "forward mixer itself"
            )
        self.fwd, self.bwd = forward_mixer, backward_mixer
        width = getattr(forward_mixer, "d_model", getattr(forward_mixer, "dim", None))
        self.d_model: Optional[int] = width if isinstance(width, int) else None

    def reset_parameters(self) -> None:
        """Initialise both directions' mixers again, as their construction does."""
        reset_submodules(self)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}"

    @staticmethod
    def _call(
        mixer: nn.Module,
        x: Tensor,
        ts: Optional[Tensor],
        lengths: Optional[Tensor],
        cu_seqlens: Optional[Tensor] = None,
    ):
        kwargs: Dict[str, Any] = {}
        if ts is not None:
            kwargs["integration_timesteps"] = ts
        if lengths is not None:
            kwargs["lengths"] = lengths
        if cu_seqlens is not None:
            kwargs["cu_seqlens"] = cu_seqlens
        y = mixer(x, **kwargs)
        return y[0] if isinstance(y, (tuple, list)) else y

    def forward(
        self,
        x: Tensor,
        integration_timesteps: Optional[Tensor] = None,
        lengths: Optional[Tensor] = None,
        inference_cache: Optional[Dict[str, Any]] = None,
        *,
        cu_seqlens: Optional[Tensor] = None,
    ) -> Tensor:
        """(B, L, D) -> (B, L, D); (1, T, D) -> (1, T, D) with ``cu_seqlens``.

        Args:
            x: input sequences; padding (positions >= lengths) may hold anything.
            integration_timesteps: (B, L) time elapsed before each element (event models); the
                backward mixer gets them reversed as the module docstring explains.
            lengths: (B,) valid lengths; each sequence is reversed inside its length and the
                padded outputs are zero.
            inference_cache: not supported (raises :class:`NoStreamingError`).
            cu_seqlens: int32/int64 offsets (S + 1,) of S sequences packed in x's one row (0 first,
                T last, repeats are empty sequences): each is reversed within its own span
                (see the module docstring); the result equals running each alone.

        Raises:
            ValueError: ``cu_seqlens`` malformed, with a batch other than 1, or together with
                ``lengths``; a mixer that does not take packed sequences.
        """
        if inference_cache is not None:
            raise NoStreamingError(f"inference_cache: {_NO_STREAMING}")
        if self.d_model is not None:
            check_sequence(x, self.d_model)
        elif not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"x: expected a (B, L, D) tensor, got {getattr(x, 'shape', x)!r}")
        B, L, _ = x.shape
        if cu_seqlens is not None:
            return self._forward_packed(x, integration_timesteps, lengths, cu_seqlens)
        lengths = as_lengths(lengths, B, L, x.device)
        ts = integration_timesteps
        mask = None
        if lengths is not None:
            mask = torch.arange(L, device=x.device)[None, :] < lengths[:, None]
            x = zero_where_not(x, mask[..., None])
            if ts is not None:
                check_timesteps(ts, B, L, mask)
                ts = zero_where_not(ts, mask.to(ts.device))
        ts_rev = None if ts is None else reverse_timesteps(ts, lengths)
        y = self._call(self.fwd, x, ts, lengths)
        y_rev = self._call(self.bwd, reverse_within_lengths(x, lengths), ts_rev, lengths)
        y = y + reverse_within_lengths(y_rev, lengths)
        if mask is not None:
            y = zero_where_not(y, mask[..., None])
        return y

    def _forward_packed(
        self, x: Tensor, ts: Optional[Tensor], lengths: Optional[Tensor], cu_seqlens: Tensor
    ) -> Tensor:
        """Both directions over packed sequences: the reversal stays within each span."""
        B, T, D = x.shape
        cu = packed_offsets(cu_seqlens, lengths, B, T, f"x ({B}, {T}, {D}) (1, T, D)")
        check_timesteps(ts, B, T)
        idx = packed_reverse_index(cu, x.device)
        ts_rev = None
        if ts is not None:
            ts_rev = ts[:, packed_reverse_timesteps_index(cu, ts.device)]
        y = self._call(self.fwd, x, ts, None, cu)
        y_rev = self._call(self.bwd, x[:, idx], ts_rev, None, cu)
        return y + y_rev[:, idx]  # the reversal is its own inverse

    def step(self, x: Tensor, inference_cache: Any = None, **kwargs: Any) -> Tuple[Tensor, Any]:
        """Not supported: raises :class:`NoStreamingError`."""
        raise NoStreamingError(f"step: {_NO_STREAMING}")

    def allocate_inference_cache(self, batch_size: int, *args: Any, **kwargs: Any) -> Dict:
        """Not supported: raises :class:`NoStreamingError`."""
        raise NoStreamingError(f"allocate_inference_cache: {_NO_STREAMING}")


__all__ = [
    "Bidirectional",
    "NoStreamingError",
    "packed_reverse_index",
    "packed_reverse_timesteps_index",
    "reverse_index",
    "reverse_timesteps",
    "reverse_within_lengths",
]
