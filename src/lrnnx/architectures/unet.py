"""1-D U-Net of LRNN blocks for sequence-to-sequence tasks such as denoising, after aTENNuate
(Pei et al., "Real-time Speech Enhancement on Raw Signals with Deep State-space Modeling",
arXiv 2409.03377): strided down-sampling, LRNN blocks at every resolution, up-sampling and
additive skip connections.

With widths w_i = d_model * channel_mult^i, f = factor, and level i running at 1/f^i the rate:

    encoder   h_i = Blocks_i(x_i);        x_{i+1} = Down_i(h_i)   (linear on f stacked steps)
    bottom    d_D = Blocks_D(x_D)
    decoder   u_i = Up_i(d_{i+1})          (each coarse step -> f fine steps, linear)
              d_i = Blocks'_i(h_i + shift(u_i))

Causal mode (``causal=True``): the mixers are causal and ``shift`` delays the up-sampled
sequence by one coarse step (f fine steps), so fine step t only sees coarse step
floor(t / f) - 1, whose window ends at or before t - 1.  Output t then depends on inputs <= t
only, and the network streams with **zero latency**: :meth:`UNet.step` reproduces
:meth:`UNet.forward` exactly, one sample at a time (each level runs its coarse step when its
window of f samples is complete, and its up-sampled output is consumed over the next f samples).

Non-causal mode (``causal=False``, or equivalently ``bidirectional=True``): recurrent mixers
are :class:`lrnnx.layers.Bidirectional` (a forward mixer plus a second one on the time-reversed
sequence, summed), attention is unmasked, and there is no shift; the same rule as
``Classifier(bidirectional=True)``.  ``forward`` pads L to a multiple of
factor^depth with zeros at the end and crops the output back to L.

Packed sequences (``cu_seqlens``) are refused (ValueError): the down-sampling stacks f
consecutive steps into one coarse step, counted from the start of the row, so a window
straddles two sequences wherever a boundary is not a multiple of f^depth, and a sequence run
alone is zero-padded at its own end to a multiple of f^depth, which a packed row cannot
reproduce in place.  The causal shift also carries each sequence's last coarse step into the
next one.  Run variable-length signals as a padded batch with ``lengths`` instead: each row
then gives its sequence's output alone.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

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
from lrnnx.core.base import with_factory_arguments
from lrnnx.core.checks import (
    as_lengths,
    check_input_dtype,
    check_sequence,
    check_step_input,
    lengths_mask,
    step_output,
    zero_where_not,
)
from lrnnx.layers import Block, RMSNorm
from lrnnx.layers.block import ACTIVATIONS
from lrnnx.layers.linear import Linear


class _Level(nn.Module):
    """One resolution of the U-Net and, recursively, everything below it."""

    def __init__(
        self, widths, i: int, factor: int, n_blocks: int, causal: bool, make_block
    ) -> None:
        super().__init__()
        w = widths[i]
        self.width, self.factor, self.causal = w, factor, causal
        self.enc = nn.ModuleList(make_block(w) for _ in range(n_blocks))
        self.inner: Optional[_Level] = None
        if i + 1 < len(widths):
            self.down = Linear(factor * w, widths[i + 1])
            self.inner = _Level(widths, i + 1, factor, n_blocks, causal, make_block)
            self.up = Linear(widths[i + 1], factor * w)
            self.dec = nn.ModuleList(make_block(w) for _ in range(n_blocks))

    def forward(self, x: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        """(B, L, w) -> (B, L, w); L is a multiple of factor^(levels below), and so are the
        ``lengths`` (B,) (each sequence's own padded length), which every block gets: a
        sequence's steps past it are padding (zero outputs, never read by valid ones)."""
        for block in self.enc:
            x = block(x, lengths=lengths)
        if self.inner is None:
            return x
        B, L, w = x.shape
        f = self.factor
        coarse_lengths = None if lengths is None else lengths // f
        coarse = self.inner(self.down(x.reshape(B, L // f, f * w)), coarse_lengths)
        u = self.up(coarse).reshape(B, L, w)  # coarse step k -> fine steps kf .. kf+f-1
        if self.causal:
            u = F.pad(u, (0, 0, f, 0))[:, :L]  # fine t <- coarse floor(t/f) - 1
        y = x + u
        for block in self.dec:
            y = block(y, lengths=lengths)
        return y

    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: int, dtype, ref: Tensor
    ) -> Dict[str, Any]:
        cache: Dict[str, Any] = {
            "enc": [
                b.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype) for b in self.enc
            ],
            "seqlen_offset": 0,
        }
        if self.inner is not None:
            f, w = self.factor, self.width
            cache["dec"] = [
                b.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype) for b in self.dec
            ]
            cache["window"] = torch.zeros(batch_size, f, w, dtype=ref.dtype, device=ref.device)
            cache["pending"] = torch.zeros(batch_size, f, w, dtype=ref.dtype, device=ref.device)
            coarse_len = max(1, -(-max_seqlen // f))
            cache["inner"] = self.inner.allocate_inference_cache(batch_size, coarse_len, dtype, ref)
        return cache

    def step(self, x: Tensor, cache: Dict[str, Any]) -> Tensor:
        """One sample at this level's rate: (B, w) -> (B, w)."""
        for block, c in zip(self.enc, cache["enc"], strict=True):
            x, _ = block.step(x, c)
        t = cache["seqlen_offset"]
        cache["seqlen_offset"] = t + 1
        if self.inner is None:
            return x
        B = x.shape[0]
        f, r = self.factor, t % self.factor
        # pending holds Up(coarse output of the previous window): fine step r of this window
        y = x + cache["pending"][:, r]
        for block, c in zip(self.dec, cache["dec"], strict=True):
            y, _ = block.step(y, c)
        cache["window"][:, r].copy_(x)
        if r == f - 1:  # window complete: one coarse step, its output serves the next window
            coarse = self.inner.step(
                self.down(cache["window"].reshape(B, f * self.width)), cache["inner"]
            )
            cache["pending"].copy_(self.up(coarse).reshape(B, f, self.width))
        return y


class UNet(PretrainedMixin, nn.Module):
    """1-D U-Net of LRNN blocks (see the module docstring for the exact causal design).

    Example:
        >>> net = UNet(d_input=1, d_output=1, d_model=16, d_state=16, depth=3, mixer="s5")
        >>> y = net(torch.randn(2, 1000, 1))                 # (B, L, 1) -> (B, L, 1), any L
        >>> cache = net.allocate_inference_cache(2)
        >>> y_t, cache = net.step(torch.randn(2, 1), cache)  # streaming, == forward

    Args:
        d_input, d_output: input and output features.
        d_model: width of the top level (level i has d_model * channel_mult^i).
        d_state: state size of every mixer.
        depth: number of down-sampling stages (levels: depth + 1).
        factor: down-sampling stride per stage.
        mixer: registry name, class or ``"module:Class"``; mixer_kwargs: its extra arguments.
        causal: causal, streamable network (see the module docstring); else bidirectional.
            Default True (unless ``bidirectional=True`` is given).
        bidirectional: the opposite of ``causal``, the name ``Classifier`` uses; give either
            (both only if they agree).  Saved configs store both.
        device, dtype: torch's factory arguments (not part of the config): the model is built,
            then moved and cast as ``.to(device, dtype)`` does (the mixers' precision policy
            included).
        n_blocks: blocks per level on each of the encoder and decoder paths.
        channel_mult: width growth per level.
        activation: pointwise nonlinearity after each mixer (None for none).
    """

    @with_factory_arguments
    def __init__(
        self,
        d_input: int,
        d_output: int,
        d_model: int = 32,
        d_state: int = 32,
        depth: int = 3,
        factor: int = 2,
        mixer: Union[str, type] = "s5",
        mixer_kwargs: Optional[Dict[str, Any]] = None,
        causal: Optional[bool] = None,
        n_blocks: int = 1,
        channel_mult: int = 2,
        activation: Optional[str] = "gelu",
        bidirectional: Optional[bool] = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("d_input", d_input),
            ("d_output", d_output),
            ("d_model", d_model),
            ("d_state", d_state),
            ("n_blocks", n_blocks),
            ("channel_mult", channel_mult),
        ):
            positive_int(name, value)
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 0:
            raise ValueError(f"depth: expected an int >= 0, got {depth!r}")
        if not isinstance(factor, int) or isinstance(factor, bool) or factor < 2:
            raise ValueError(f"factor: expected an int >= 2, got {factor!r}")
        if activation is not None and activation not in ACTIVATIONS:
            raise ValueError(
                f"activation: expected None or one of {list(ACTIVATIONS)}, got {activation!r}"
            )
        if mixer_kwargs is not None and not isinstance(mixer_kwargs, dict):
            raise TypeError(
                f"mixer_kwargs: expected None or a dict, got {type(mixer_kwargs).__name__}"
            )
        check_no_dims(mixer_kwargs or {})
        if bidirectional is not None and not isinstance(bidirectional, bool):
            raise TypeError(f"bidirectional: expected a bool, got {bidirectional!r}")
        if causal is not None and bidirectional is not None and bool(causal) == bidirectional:
            raise ValueError(
                f"causal={causal}, bidirectional={bidirectional}: contradictory; bidirectional "
                "is the opposite of causal, give one of them"
            )
        if causal is None:
            causal = not bidirectional if bidirectional is not None else True
        name = mixer_name(mixer)
        self.config: Dict[str, Any] = {
            "d_input": d_input,
            "d_output": d_output,
            "d_model": d_model,
            "d_state": d_state,
            "depth": depth,
            "factor": factor,
            "mixer": name,
            "mixer_kwargs": mixer_kwargs,
            "causal": causal,
            "n_blocks": n_blocks,
            "channel_mult": channel_mult,
            "activation": activation,
            "bidirectional": not causal,
        }
        self.d_input, self.d_output, self.depth, self.factor = d_input, d_output, depth, factor
        self.causal = bool(causal)
        self.has_attention = name == "attn"
        kwargs = dict(mixer_kwargs or {})
        if name == "attn" and "causal" in kwargs:
            raise ValueError("mixer_kwargs: pass causal once, as the UNet's causal argument")

        def make_block(w: int) -> Block:
            mixer_w = build_layer_mixer(mixer, name, w, d_state, kwargs, not self.causal, "UNet")
            return Block(w, mixer_w, activation=activation)

        widths = [d_model * channel_mult**i for i in range(depth + 1)]
        self.in_proj = Linear(d_input, d_model)
        self.level = _Level(widths, 0, factor, n_blocks, self.causal, make_block)
        self.norm_f = RMSNorm(d_model)
        self.out_proj = Linear(d_model, d_output)

    @property
    def multiple(self) -> int:
        """forward pads L to a multiple of this (factor ** depth)."""
        return self.factor**self.depth

    def forward(
        self, x: Tensor, lengths: Optional[Tensor] = None, *, cu_seqlens: Optional[Tensor] = None
    ) -> Tensor:
        """(B, L, d_input) -> (B, L, d_output), any L (L = 0: an empty output).

        Args:
            x: the signals, zero-padded at the end to a multiple of factor^depth inside.
            lengths: (B,) valid lengths of a padded batch: each row's output equals that
                sequence's output alone (the sequence padded at its own end, as ``forward``
                pads a single one), whatever the padding holds (NaN included); outputs at
                padded positions are 0.
            cu_seqlens: refused (see below).

        Raises:
            ValueError: any ``cu_seqlens`` (packed sequences; the module docstring says why
                the U-Net cannot keep them apart), bad ``lengths``.
        """
        if cu_seqlens is not None:
            raise ValueError(
                "cu_seqlens: the U-Net cannot run packed sequences: its down-sampling stacks "
                f"factor = {self.factor} consecutive steps (from the row's start) into one, so "
                "windows would straddle sequence boundaries, and each sequence alone is padded "
                f"at its own end to a multiple of {self.multiple}; pass a padded batch (B, L, "
                f"{self.d_input}) without cu_seqlens"
            )
        check_sequence(x, self.d_input)
        check_input_dtype(x, self.in_proj.weight.dtype)
        B, L = x.shape[:2]
        mask = lengths_mask(lengths, B, L, x.device)
        if L == 0 or B == 0:
            return self.out_proj(self.norm_f(self.in_proj(x)))  # empty, in the graph
        if mask is not None:  # padding never reaches a value or a gradient (a select)
            x = zero_where_not(x, mask[..., None])
        h = self.in_proj(x)
        m = self.multiple
        padded = None
        if mask is not None:  # each sequence zero-padded at its own end, as when alone
            h = zero_where_not(h, mask[..., None])
            padded = -(-as_lengths(lengths, B, L, x.device) // m) * m
        h = F.pad(
            h, (0, 0, 0, -L % m)
        )  # zeros at the end: no effect on outputs <= L in causal mode
        h = self.level(h, padded)[:, :L]
        y = self.out_proj(self.norm_f(h))
        return y if mask is None else zero_where_not(y, mask[..., None])

    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: Optional[int] = None, dtype: Optional[torch.dtype] = None
    ) -> Dict[str, Any]:
        """Streaming state for :meth:`step`.

        ``max_seqlen`` (samples to stream) is needed only with attention mixers, whose KV
        caches it sizes; recurrent mixers keep a constant-size state.
        """
        if not self.causal:
            raise ValueError(
                "allocate_inference_cache: streaming needs causal=True (this UNet is bidirectional)"
            )
        positive_int("batch_size", batch_size)
        if max_seqlen is None:
            if self.has_attention:
                raise ValueError(
                    "max_seqlen: attention mixers need max_seqlen to size their KV caches"
                )
            max_seqlen = 1
        positive_int("max_seqlen", max_seqlen)
        ref = self.in_proj.weight
        return {
            "levels": self.level.allocate_inference_cache(batch_size, max_seqlen, dtype, ref),
            "seqlen_offset": 0,
        }

    def step(self, x: Tensor, inference_cache: Dict[str, Any]) -> tuple[Tensor, Dict[str, Any]]:
        """One sample: x (B, d_input) -> (y (B, d_output), cache) (x (B, 1, d_input) -> y (B,
        1, d_output)); zero latency, == forward."""
        if not self.causal:
            raise ValueError("step: streaming needs causal=True (this UNet is bidirectional)")
        layout, x = x, check_step_input(x, self.d_input)
        check_input_dtype(x, self.in_proj.weight.dtype)
        if not isinstance(inference_cache, dict) or "levels" not in inference_cache:
            raise ValueError(
                "inference_cache: expected the dict returned by allocate_inference_cache"
            )
        y = self.level.step(self.in_proj(x), inference_cache["levels"])
        inference_cache["seqlen_offset"] = inference_cache.get("seqlen_offset", 0) + 1
        return step_output(self.out_proj(self.norm_f(y)), layout), inference_cache
