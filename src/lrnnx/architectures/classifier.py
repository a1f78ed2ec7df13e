"""Sequence classifier: encoder -> LRNN blocks (optionally pooled in time between them) ->
norm -> pooling over the valid positions -> linear decoder.

    h = Encode(x)                                     linear (B, L, d_input) or embedding (B, L)
    for each block l:  h = Block_l(h);  h, lengths, dt = Pool(h) (between blocks, if asked)
    logits = W_dec Pool_final(RMSNorm(h))             mean / last / max over valid positions

Hierarchical pooling between blocks groups time into windows of ``factor`` elements:
``"stride"`` keeps each window's last valid element, ``"mean"``/``"max"`` reduce over its valid
elements.  Lengths become ceil(length / factor) and the elapsed times of a window are summed,
so ``integration_timesteps`` stay the time between consecutive kept elements (exactly so for
``"stride"``, which keeps the window's last element).

Packed sequences: ``forward(x (1, T, d_input), cu_seqlens=...)`` classifies S sequences laid
back to back in one row (fla's convention) and returns (S, n_classes): every block restarts at
each sequence's start, pooling windows (between blocks and at the end) stay within a sequence,
so the logits equal classifying each sequence alone.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrnnx.architectures._common import (
    PretrainedMixin,
    build_layer_mixer,
    check_no_dims,
    mixer_name,
    positive_int,
)
from lrnnx.core.base import empty_in_graph, with_factory_arguments
from lrnnx.core.checks import (
    as_lengths,
    check_input_dtype,
    check_timesteps,
    lengths_mask,
    packed_offsets,
    zero_where_not,
)
from lrnnx.layers import Block, GatedMLP, RMSNorm
from lrnnx.layers.block import ACTIVATIONS
from lrnnx.layers.linear import Linear
from lrnnx.ops.linear_scan.packing import step_layout

ENCODERS = ("linear", "embedding")
POOLINGS = ("mean", "last", "max")
POOL_BETWEEN = ("stride", "mean", "max")


def _valid_or_all(lengths: Optional[Tensor], B: int, L: int, device) -> Tensor:
    mask = lengths_mask(lengths, B, L, device)
    return torch.ones(B, L, dtype=torch.bool, device=device) if mask is None else mask


def pool_time(
    h: Tensor,
    lengths: Optional[Tensor],
    integration_timesteps: Optional[Tensor],
    kind: str,
    factor: int,
) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Pool (B, L, D) over windows of ``factor`` steps.

    Returns:
        (B, ceil(L / factor), D) pooled sequence (zero on windows past a sequence's length),
        lengths ceil(lengths / factor) (None if None), summed timesteps (B, ceil(L / factor)).
    """
    B, L, D = h.shape
    n = -(-L // factor)
    pad = n * factor - L
    valid = _valid_or_all(lengths, B, L, h.device)
    vw = F.pad(valid, (0, pad)).view(B, n, factor)  # valid elements of each window
    hw = F.pad(h, (0, 0, 0, pad)).view(B, n, factor, D)
    count = vw.sum(-1)  # (B, n)
    if kind == "stride":
        idx = (count - 1).clamp(min=0)  # the last valid element of the window
        out = hw.gather(2, idx[:, :, None, None].expand(B, n, 1, D))[:, :, 0]
    elif kind == "mean":
        out = zero_where_not(hw, vw[..., None]).sum(2) / count.clamp(min=1)[..., None].to(h.dtype)
    else:
        out = hw.masked_fill(~vw[..., None], float("-inf")).amax(2)
    out = torch.where((count > 0)[..., None], out, torch.zeros_like(out))
    new_lengths = None if lengths is None else (lengths.to(h.device) + factor - 1) // factor
    ts = None
    if integration_timesteps is not None:
        ts = F.pad(zero_where_not(integration_timesteps, valid), (0, pad))
        ts = ts.view(B, n, factor).sum(-1)
    return out, new_lengths, ts


def _segment_reduce(h: Tensor, seg: Tensor, n_seg: int, kind: str) -> Tensor:
    """Reduce rows of h (T, D) by segment id ``seg`` (T,) into (n_seg, D); every segment holds
    at least one row.  ``kind``: "mean", "max", or "stride"/"last" (the segment's last row)."""
    D = h.shape[-1]
    if kind in ("stride", "last"):
        last = torch.zeros(n_seg, dtype=torch.long, device=h.device)
        last.scatter_reduce_(0, seg, torch.arange(h.shape[0], device=h.device), "amax")
        return h[last]
    index = seg[:, None].expand(-1, D)
    if kind == "mean":
        count = torch.zeros(n_seg, dtype=h.dtype, device=h.device).index_add_(
            0, seg, torch.ones_like(h[:, 0])
        )
        return h.new_zeros(n_seg, D).index_add(0, seg, h) / count[:, None]
    start = h.new_full((n_seg, D), float("-inf"))
    return start.scatter_reduce(0, index, h, "amax", include_self=True)


def pool_time_packed(
    h: Tensor,
    cu: Tensor,
    integration_timesteps: Optional[Tensor],
    kind: str,
    factor: int,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """:func:`pool_time` of packed sequences h (1, T, D) with int64 offsets ``cu`` (S + 1,):
    windows of ``factor`` steps start at each sequence's own start.

    Returns (1, T', D), the new offsets (S + 1,) with lengths ceil(n_s / factor), and the
    summed elapsed times (1, T') (None if None).
    """
    n = cu[1:] - cu[:-1]
    new_cu = torch.cat([cu.new_zeros(1), ((n + factor - 1) // factor).cumsum(0)])
    dev = h.device
    seq = step_layout(cu.to(dev), False)[0]
    t = torch.arange(h.shape[1], device=dev)
    window = new_cu.to(dev)[seq] + (t - cu.to(dev)[seq]) // factor  # (T,) window of each step
    n_win = int(new_cu[-1])
    out = _segment_reduce(h[0], window, n_win, kind)[None]
    ts = None
    if integration_timesteps is not None:
        ts_in = integration_timesteps[0]
        ts = ts_in.new_zeros(n_win).index_add(0, window.to(ts_in.device), ts_in)[None]
    return out, new_cu, ts


class Classifier(PretrainedMixin, nn.Module):
    """Sequence classifier over any lrnnx mixer.

    Example:
        >>> clf = Classifier(d_input=3, n_classes=10, d_model=64, d_state=64, mixer="lru")
        >>> logits = clf(torch.randn(8, 256, 3), lengths=torch.full((8,), 200))  # (8, 10)

    Args:
        d_input: input features (``encoder="linear"``), or the vocabulary size
            (``encoder="embedding"``, inputs are (B, L) token ids).
        n_classes: number of classes.
        d_model, d_state: width and state size of every mixer (passed once, here).
        n_layers: number of blocks.
        mixer: registry name (``"s5"``, ``"lru"``, ``"mamba"``, ``"attn"``, ...), a class or a
            ``"module:Class"`` path.
        mixer_kwargs: further constructor arguments of the mixer (not d_model/d_state).
        encoder: ``"linear"`` or ``"embedding"``.
        pooling: ``"mean"``, ``"last"`` or ``"max"`` over each sequence's valid positions.
        pool_between: None, or ``(kind, factor)`` with kind ``"stride"``/``"mean"``/``"max"``:
            pool time by ``factor`` after every block but the last.
        dropout: dropout on the residual branches and before the decoder.
        d_intermediate: hidden width of a SwiGLU MLP in each block (0: none).
        activation: pointwise nonlinearity after each mixer (None for none); the LTI mixers
            are linear, so the default GELU is what makes the stack nonlinear without an MLP.
        bidirectional: non-causal mixers that read each sequence in both directions: recurrent
            mixers become :class:`lrnnx.layers.Bidirectional` (a forward and a time-reversed
            mixer, reversed within each sequence's length, outputs summed), attention is
            unmasked (``causal=False``).  The same rule as ``UNet(causal=False)``.
        device, dtype: torch's factory arguments (not part of the config): the model is built,
            then moved and cast as ``.to(device, dtype)`` does (the mixers' precision policy
            included).
    """

    @with_factory_arguments
    def __init__(
        self,
        d_input: int,
        n_classes: int,
        d_model: int = 64,
        d_state: int = 64,
        n_layers: int = 4,
        mixer: Union[str, type] = "s5",
        mixer_kwargs: Optional[Dict[str, Any]] = None,
        encoder: str = "linear",
        pooling: str = "mean",
        pool_between: Optional[Sequence[Any]] = None,
        dropout: float = 0.0,
        d_intermediate: int = 0,
        activation: Optional[str] = "gelu",
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (
            ("d_input", d_input),
            ("n_classes", n_classes),
            ("d_model", d_model),
            ("d_state", d_state),
            ("n_layers", n_layers),
        ):
            positive_int(name, value)
        if encoder not in ENCODERS:
            raise ValueError(f"encoder: expected one of {list(ENCODERS)}, got {encoder!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling: expected one of {list(POOLINGS)}, got {pooling!r}")
        if pool_between is not None:
            if (
                not isinstance(pool_between, (tuple, list))
                or len(pool_between) != 2
                or pool_between[0] not in POOL_BETWEEN
            ):
                raise ValueError(
                    f"pool_between: expected None or (kind, factor) with kind in {list(POOL_BETWEEN)}, "
                    f"got {pool_between!r}"
                )
            positive_int("pool_between factor", pool_between[1])
            pool_between = (pool_between[0], pool_between[1])
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a float in [0, 1), got {dropout!r}")
        if (
            not isinstance(d_intermediate, int)
            or isinstance(d_intermediate, bool)
            or d_intermediate < 0
        ):
            raise ValueError(f"d_intermediate: expected an int >= 0, got {d_intermediate!r}")
        if activation is not None and activation not in ACTIVATIONS:
            raise ValueError(
                f"activation: expected None or one of {list(ACTIVATIONS)}, got {activation!r}"
            )
        if mixer_kwargs is not None and not isinstance(mixer_kwargs, dict):
            raise TypeError(
                f"mixer_kwargs: expected None or a dict, got {type(mixer_kwargs).__name__}"
            )
        check_no_dims(mixer_kwargs or {})
        if not isinstance(bidirectional, bool):
            raise TypeError(f"bidirectional: expected a bool, got {bidirectional!r}")
        name = mixer_name(mixer)
        self.config: Dict[str, Any] = {
            "d_input": d_input,
            "n_classes": n_classes,
            "d_model": d_model,
            "d_state": d_state,
            "n_layers": n_layers,
            "mixer": name,
            "mixer_kwargs": mixer_kwargs,
            "encoder": encoder,
            "pooling": pooling,
            "pool_between": None if pool_between is None else list(pool_between),
            "dropout": dropout,
            "d_intermediate": d_intermediate,
            "activation": activation,
            "bidirectional": bidirectional,
        }
        self.bidirectional = bidirectional
        self.d_input, self.d_model, self.n_classes = d_input, d_model, n_classes
        self.encoder_kind, self.pooling, self.pool_between = encoder, pooling, pool_between
        self.encoder = (
            nn.Embedding(d_input, d_model) if encoder == "embedding" else Linear(d_input, d_model)
        )
        self.blocks = nn.ModuleList(
            Block(
                d_model,
                build_layer_mixer(
                    mixer, name, d_model, d_state, mixer_kwargs or {}, bidirectional, "Classifier"
                ),
                mlp=GatedMLP(d_model, hidden=d_intermediate) if d_intermediate > 0 else None,
                activation=activation,
                dropout=dropout,
            )
            for _ in range(n_layers)
        )
        self.norm_f = RMSNorm(d_model)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.decoder = Linear(d_model, n_classes)

    def _encode(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """x -> (B, L, d_model); with ``mask`` (B, L) of valid positions, the padding is
        replaced by zeros (token 0) before the encoder, so whatever it holds (NaN, inf, an
        out-of-range id such as -100) reaches neither the output nor a gradient.  x is checked
        (:meth:`_check_input`)."""
        if self.encoder_kind == "embedding":
            if x.dtype not in (torch.int32, torch.int64):  # uint8, int16, ...: the embedding
                x = x.long()  # takes int32/int64 ids
            return self.encoder(x if mask is None else zero_where_not(x, mask))
        return self.encoder(x if mask is None else zero_where_not(x, mask[..., None]))

    def _check_input(self, x: Tensor, mask: Optional[Tensor] = None, ids: bool = True) -> None:
        """Type and shape of x; with ``ids``, token ids in range (at the valid positions of
        ``mask`` when given)."""
        if self.encoder_kind == "embedding":
            if (
                not isinstance(x, Tensor)
                or x.is_floating_point()
                or x.is_complex()
                or x.dtype == torch.bool
            ):
                got = x.dtype if isinstance(x, Tensor) else type(x).__name__
                raise TypeError(
                    f"x: expected integer token ids (B, L) for encoder='embedding', got {got}"
                )
            if x.dim() != 2:
                raise ValueError(f"x: expected shape (B, L) of token ids, got {tuple(x.shape)}")
            if not ids:
                return
            v = x if mask is None else x[mask]
            if v.numel() and (bool((v < 0).any()) or bool((v >= self.d_input).any())):
                raise ValueError(
                    f"x: expected token ids in [0, {self.d_input}), got min {int(v.min())} "
                    f"max {int(v.max())}"
                )
            return
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(
                f"x: expected a floating-point tensor (B, L, {self.d_input}), got {got}"
            )
        if x.dim() != 3 or x.shape[-1] != self.d_input:
            raise ValueError(f"x: expected shape (B, L, {self.d_input}), got {tuple(x.shape)}")
        check_input_dtype(x, self.encoder.weight.dtype)

    def forward(
        self,
        x: Tensor,
        integration_timesteps: Optional[Tensor] = None,
        lengths: Optional[Tensor] = None,
        *,
        cu_seqlens: Optional[Tensor] = None,
    ) -> Tensor:
        """x (B, L, d_input) float, or (B, L) token ids -> logits (B, n_classes).

        Args:
            integration_timesteps: (B, L) elapsed times for event-driven mixers.
            lengths: (B,) valid lengths (>= 1); padding never changes the logits.
            cu_seqlens: int32/int64 offsets (S + 1,) of S sequences (each of length >= 1) packed in
                the one row of x (1, T, d_input) (or (1, T) ids); returns (S, n_classes),
                equal to classifying each sequence alone.  Not with ``lengths``.

        Raises:
            ValueError: bad shapes or lengths; ``cu_seqlens`` malformed, with an empty
                sequence, a batch other than 1, ``lengths``, or a mixer that does not take
                packed sequences.
        """
        if cu_seqlens is not None:
            return self._forward_packed(x, integration_timesteps, lengths, cu_seqlens)
        self._check_input(x, ids=False)
        B, L = x.shape[:2]
        if B and L == 0:
            raise ValueError(
                f"x: expected at least 1 step per sequence to classify, got shape {tuple(x.shape)}"
            )
        lengths = as_lengths(lengths, B, L, device=x.device)
        mask = lengths_mask(lengths, B, L, x.device)
        if lengths is not None and B and bool((lengths < 1).any()):
            raise ValueError(
                f"lengths: expected every length >= 1 to classify, got min {int(lengths.min())}"
            )
        self._check_input(x, mask)
        check_timesteps(integration_timesteps, B, L, mask)
        h = self._encode(x, mask)
        if mask is not None:
            h = zero_where_not(h, mask[..., None])
        ts = integration_timesteps
        if ts is not None and mask is not None:  # the padding's times may hold anything
            ts = zero_where_not(ts, mask)
        for i, block in enumerate(self.blocks):
            h = block(h, integration_timesteps=ts, lengths=lengths)
            if self.pool_between is not None and i < len(self.blocks) - 1:
                h, lengths, ts = pool_time(h, lengths, ts, *self.pool_between)
        h = self.norm_f(h)
        return self.decoder(self.drop(self._pool(h, lengths)))

    def _forward_packed(
        self, x: Tensor, ts: Optional[Tensor], lengths: Optional[Tensor], cu_seqlens: Tensor
    ) -> Tensor:
        """Packed sequences: (1, T, ...) -> (S, n_classes)."""
        self._check_input(x)
        h = self._encode(x)
        B, T, _ = h.shape
        cu = packed_offsets(cu_seqlens, lengths, B, T, f"x {tuple(x.shape)} (1, T, ...)")
        if bool((cu[1:] == cu[:-1]).any()):
            s = int((cu[1:] == cu[:-1]).nonzero()[0, 0])
            raise ValueError(
                f"cu_seqlens: expected every sequence to have length >= 1 to classify, got an "
                f"empty sequence {s} (cu_seqlens[{s}] = cu_seqlens[{s + 1}] = {int(cu[s])})"
            )
        check_timesteps(ts, B, T)
        for i, block in enumerate(self.blocks):
            h = block(h, integration_timesteps=ts, cu_seqlens=cu)
            if self.pool_between is not None and i < len(self.blocks) - 1:
                h, cu, ts = pool_time_packed(h, cu, ts, *self.pool_between)
        h = self.norm_f(h)
        seq = step_layout(cu.to(h.device), False)[0]
        pooled = _segment_reduce(h[0], seq, cu.shape[0] - 1, self.pooling)
        return self.decoder(self.drop(pooled))

    def _pool(self, h: Tensor, lengths: Optional[Tensor]) -> Tensor:
        """(B, L, D) -> (B, D) over the valid positions."""
        B, L, D = h.shape
        if L == 0:  # an empty batch (B = 0): nothing to pool, zero gradients for everything
            return empty_in_graph(h, (B, D), self)
        if self.pooling == "last":
            if lengths is None:
                return h[:, -1]
            return h.gather(1, (lengths - 1).view(B, 1, 1).expand(B, 1, D))[:, 0]
        valid = _valid_or_all(lengths, B, L, h.device)[..., None]
        if self.pooling == "mean":
            return zero_where_not(h, valid).sum(1) / valid.sum(1).to(h.dtype)
        return h.masked_fill(~valid, float("-inf")).amax(1)
