"""Centaurus (Pei, "Let SSMs be ConvNets: State-space Modeling with Optimal Tensor Contractions",
ICLR 2025, arXiv 2501.13230).

A Centaurus block is a bank of diagonal SSM *states* n = 1..N.  Each state owns M *sub-states*
(modes) with complex poles A_nm (Re < 0) that share one learned step dt_n, and the sub-states of a
state are mixed back into one real signal by the vector E_n (the paper's intra-state mode mixing):

    x'_nm(t) = A_nm x_nm(t) + v_n(t)                      (continuous time)
    x_nm[t]  = A_bar_nm x_nm[t-1] + gamma_nm v_n[t]       (A_bar, gamma) = discretize(A_nm, dt_n)
    z_n[t]   = sum_m E_nm Re(x_nm[t])

so z_n is the causal convolution of v_n with the latent kernel

    k_n[l] = sum_m E_nm Re(gamma_nm A_bar_nm^l),         l = 0..L-1.

The modes differ in how v is fed from the input u (B, L, H_in) and how y is read from z, borrowing
the connectivity of convolution layers:

    neck        v = B u  (B: N x H_in)       y = C z  (C: H_out x N)     bottleneck block
    pointwise   v_nm = (B u)_nm (B: NM x H_in), y = C Re(x) (C: H_out x NM): no E, every sub-state
    ("s5")      is its own SISO lane (dt_n shared by the M lanes of state n)
    dws         N = H_in, v_n = u_n, y = C z (C: H_out x N)          depthwise SSM, then pointwise
    full        one state per (output o, input i) pair: v_oi = u_i, y_o = sum_i z_oi, dt_o per output
                channel; a full convolution with kernel K_oi[l] (H_out = d_state outputs)

Training evaluates the block as tensor contractions and picks their order by cost, as the paper does
with optimal einsum paths: either project to the latent channels, convolve each with its kernel
(:func:`lrnnx.core.fftconv.causal_conv`) and read out, or contract B, k and C first into one
(H_out, H_in, L) kernel and convolve in the frequency domain.  Inference runs the recurrence on
the (B, N, M) sub-state tensor.

The step rule is one of :mod:`lrnnx.core.discretization`: ``zoh`` (the default, gamma =
(e^{dt A} - 1)/A), ``bilinear``, ``dirac`` (gamma = 1) or ``simplified_zoh`` (gamma = dt, the first
order term of zoh's gamma), which is the rule of the official code (Brainchip-Inc/Centaurus).
Initialisation follows the official code: Re(A) = -softplus(.) starting at -0.5, Im(A_nm) = pi m,
dt log-spaced in [1e-3, 1e-1].

Options that reproduce the official layers (:mod:`lrnnx.interop.centaurus` loads their weights):
``d_output`` (H_out != H_in for neck, pointwise, dws), ``dt_per_sub_state`` (one learned log_dt per
sub-state instead of one per state), a norm + activation between the depthwise SSM and the 1x1
mixing C of ``dws`` (``mix_norm``, ``mix_activation``) and on the block's output (``out_norm``,
``out_activation``).  With a ``"batch"`` norm in train mode the block is no longer causal nor
time-invariant (see :class:`CentaurusBase`); in eval mode it is.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any, Dict, Literal, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrnnx.core.base import empty_in_graph
from lrnnx.core.checks import (
    as_lengths,
    check_batch_size,
    check_inference_cache,
    check_packed_cache,
    check_positive_int,
    check_step_input,
    lengths_mask,
    packed_offsets,
    packed_seqlen_offset,
    step_output,
    zero_where_not,
)
from lrnnx.core.fftconv import causal_conv, causal_conv_mix, fft_length
from lrnnx.models.lti.base import LTI_LRNN, cache_to_device, diagonal_powers
from lrnnx.ops import linear_scan
from lrnnx.ops._dispatch import no_autocast

#: -Re(A) is kept at or above this, so every discretization stays strictly stable
MIN_NEG_REAL = 1e-4
#: how ``forward`` orders the contractions: by estimated cost, or forced
CONTRACTIONS = ("auto", "latent", "kernel")
#: per-position norms over the channel axis (BatchNorm with running statistics in eval mode)
NORMS = ("batch", "layer", "rms")
#: element-wise activations after a norm
ACTIVATIONS = {
    "relu": F.relu,
    "relu6": F.relu6,
    "silu": F.silu,
    "gelu": F.gelu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}

Weights = Dict[str, Tensor | None]


def _check_positive_int(name: str, value: Any) -> int:
    return check_positive_int(name, value)


def _check_choice(name: str, value: Any, choices: Tuple[Any, ...]) -> Any:
    if value is not None and (not isinstance(value, str) or value not in choices):
        raise ValueError(f"{name}: expected None or one of {list(choices)}, got {value!r}")
    return value


class ChannelNormAct(nn.Module):
    """A norm, then an element-wise activation, over the channel (last) axis of (..., C).

    Each position is normalised alone (``"layer"``: LayerNorm over C, ``"rms"``: RMSNorm over C),
    except ``"batch"`` (BatchNorm1d over C) in train mode, which normalises with the mean and
    variance of the batch's valid positions (all (sequence, step) pairs) and updates the running
    statistics; in eval mode, and always when ``running_stats`` is set, it is the per-channel
    affine map of the running statistics.  With neither a norm nor an activation it is the
    identity.

    Args:
        channels: C.
        norm: None, ``"batch"``, ``"layer"`` or ``"rms"`` (torch's default eps for each).
        activation: None or a key of :data:`ACTIVATIONS`.
        names: the names of ``norm`` and ``activation`` in error messages (the arguments the
            caller took them as, e.g. ``("out_norm", "out_activation")``).

    Raises:
        ValueError: an unknown norm or activation name.
    """

    def __init__(
        self,
        channels: int,
        norm: str | None = None,
        activation: str | None = None,
        names: Tuple[str, str] = ("norm", "activation"),
    ):
        super().__init__()
        _check_choice(names[0], norm, NORMS)
        self.activation = _check_choice(names[1], activation, tuple(ACTIVATIONS))
        layers = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm, "rms": nn.RMSNorm}
        self.norm = None if norm is None else layers[norm](channels)

    @property
    def is_identity(self) -> bool:
        return self.norm is None and self.activation is None

    def forward(self, x: Tensor, mask: Tensor | None = None, running_stats: bool = False) -> Tensor:
        """x (..., C) -> (..., C); ``mask`` (x.shape[:-1]) marks the positions BatchNorm's batch
        statistics are taken over (default: all); ``running_stats`` forces the eval-mode map."""
        if self.norm is not None:
            x = self._normalize(x, mask, running_stats)
        return x if self.activation is None else ACTIVATIONS[self.activation](x)

    def _normalize(self, x: Tensor, mask: Tensor | None, running_stats: bool) -> Tensor:
        bn = self.norm
        if not isinstance(bn, nn.BatchNorm1d):
            return bn(x)
        flat = x.reshape(-1, x.shape[-1])
        if running_stats or not bn.training:  # per-channel affine map, no statistics update
            stats = (bn.running_mean, bn.running_var, bn.weight, bn.bias)
            return F.batch_norm(flat, *stats, training=False, eps=bn.eps).view_as(x)
        if mask is None:
            return bn(flat).view_as(x)
        out = x.new_zeros(x.shape)  # padding is left out of the batch statistics
        out[mask] = bn(x[mask])
        return out

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class CentaurusBase(LTI_LRNN):
    """Common part of the Centaurus modes: poles, steps, discretization, kernel and recurrence.

    Internally the sub-states form an (S, M) grid of *rows* s (S = N, or N * H_in for ``full``)
    and M sub-states; each mode defines how the input drives the rows and how the outputs are read.

    With a norm or activation (``mix_*`` for dws, ``out_*``) the block is LTI followed by a
    per-position map, so causality, time invariance and step == forward hold in eval mode and for
    ``"layer"`` / ``"rms"`` norms in both modes.  A ``"batch"`` norm in train mode normalises with
    the statistics of the whole batch (every valid step of every sequence), so an output then
    depends on later steps and on the other sequences (neither causal nor time-invariant), and
    :meth:`step` (which always applies the running statistics, the eval-mode function) agrees with
    :meth:`forward` only in eval mode.

    Args:
        d_model: input width H_in.
        d_state: number of states N (for ``full``: output channels, see :class:`CentaurusFull`).
        sub_state_dim: sub-states M per state.
        discretization: ``"zoh"``, ``"bilinear"``, ``"dirac"`` or ``"simplified_zoh"`` (the
            official code's rule); see :mod:`lrnnx.core.discretization`.
        d_output: output width H_out for neck, pointwise and dws (default d_model); ``full``
            takes it from d_state (None or d_state only).
        dt_per_sub_state: learn one log_dt per sub-state, ``log_dt`` of shape (N, M) ((N * M,)
            for pointwise, like its B), instead of one per state, ``log_dt`` (N,).
        mix_norm, mix_activation: dws only; a norm (None, ``"batch"``, ``"layer"``, ``"rms"``)
            and then an activation (a key of :data:`ACTIVATIONS`) on the (B, L, N) output of the
            depthwise SSM, before the 1x1 mixing C (:class:`ChannelNormAct`).
        out_norm, out_activation: the same on the (B, L, H_out) output of the block.

    Raises:
        ValueError: a size below 1, an unknown rule, norm or activation, a ``mix_*`` option
            outside dws, or d_output != d_state for full.
        TypeError: a size that is not an int, or a non-bool ``dt_per_sub_state``.
    """

    allowed_discretizations = ("zoh", "bilinear", "dirac", "simplified_zoh")
    # the norms are part of the block's arithmetic: they keep float32 under .half() like A and dt
    _spectral_submodules = ("mix_act", "out_act")

    def __init__(
        self,
        d_model: int,
        d_state: int,
        sub_state_dim: int,
        discretization: Literal["zoh", "bilinear", "dirac", "simplified_zoh"] = "zoh",
        *,
        d_output: int | None = None,
        dt_per_sub_state: bool = False,
        mix_norm: str | None = None,
        mix_activation: str | None = None,
        out_norm: str | None = None,
        out_activation: str | None = None,
    ) -> None:
        super().__init__(discretization)
        self.d_model = _check_positive_int("d_model", d_model)
        self.d_state = _check_positive_int("d_state", d_state)
        self.sub_state_dim = _check_positive_int("sub_state_dim", sub_state_dim)
        self._d_output = d_model if d_output is None else _check_positive_int("d_output", d_output)
        self._check_sizes(d_output)
        if not isinstance(dt_per_sub_state, bool):
            raise TypeError(f"dt_per_sub_state: expected a bool, got {dt_per_sub_state!r}")
        self.dt_per_sub_state = dt_per_sub_state
        #: length of the kernel built by compute_kernel(); forward sets it to the input length
        self.kernel_length: int | None = None
        self.contraction = "auto"
        self._init_parameters()
        self._init_norm_acts(mix_norm, mix_activation, out_norm, out_activation)

    def _init_parameters(self) -> None:
        """The reference initialisation: Re(A) = -softplus(A_real_raw) = -0.5 and Im(A_nm) =
        pi m (S, M); log_dt evenly spaced over [log 1e-3, log 1e-1] across the states; then
        the mode's B, C, E (:meth:`_init_mode_parameters`)."""
        S, M = self.n_rows, self.sub_state_dim
        self._set_parameter("A_real_raw", torch.full((S, M), math.log(math.expm1(0.5))))
        self._set_parameter("A_imag", (math.pi * torch.arange(M, dtype=torch.float32)).repeat(S, 1))
        log_dt = torch.linspace(math.log(1e-3), math.log(1e-1), self.d_state)
        if self.dt_per_sub_state:  # the sub-states of a state start from the state's step
            log_dt = log_dt[:, None].expand(-1, M).reshape(self._log_dt_shape())
        self._set_parameter("log_dt", log_dt.contiguous())
        self._init_mode_parameters()

    def _init_norm_acts(
        self, mix_norm: Any, mix_activation: Any, out_norm: Any, out_activation: Any
    ) -> None:
        if (mix_norm is not None or mix_activation is not None) and not self._has_mix_act:
            raise ValueError(
                f"mix_norm, mix_activation: only the dws mode has a norm/activation between its "
                f"SSM and the mixing C, got mix_norm={mix_norm!r}, "
                f"mix_activation={mix_activation!r} for {type(self).__name__}"
            )
        self.mix_act = ChannelNormAct(
            self.n_rows, mix_norm, mix_activation, names=("mix_norm", "mix_activation")
        )
        self.out_act = ChannelNormAct(
            self.d_output, out_norm, out_activation, names=("out_norm", "out_activation")
        )

    # ----------------------------------------------------------------------------- mode interface
    def _check_sizes(self, d_output: int | None) -> None:
        """Mode-specific constraints on d_model / d_state / d_output (ValueError)."""

    #: whether the mode has a latent norm/activation slot between its SSM and C (dws)
    _has_mix_act = False

    @property
    def n_rows(self) -> int:
        """Rows S of the (S, M) sub-state grid."""
        return self.d_state

    @property
    def d_output(self) -> int:
        """Output width H_out."""
        return self._d_output

    def _log_dt_shape(self) -> Tuple[int, ...]:
        """Shape of ``log_dt`` with ``dt_per_sub_state``."""
        return (self.d_state, self.sub_state_dim)

    @abstractmethod
    def _init_mode_parameters(self) -> None:
        """Create (or draw again) the mode's input/output/mixing parameters B, C, E."""

    @abstractmethod
    def _weights(self) -> Weights:
        """The mode's non-discretized weights by name (B, C, E; None where the mode has none)."""

    @abstractmethod
    def _lanes(self, x: Tensor, w: Weights) -> Tensor:
        """Sub-state drive v from x (..., H_in): (..., S, 1) shared by the M sub-states, or (..., S, M)."""

    @abstractmethod
    def _latent_input(self, x: Tensor, w: Weights) -> Tensor:
        """Input of each latent kernel channel, (B, L, Z) for x (B, L, H_in)."""

    @abstractmethod
    def _readout(self, z: Tensor, w: Weights) -> Tensor:
        """(..., Z) latent outputs -> (..., H_out)."""

    @abstractmethod
    def _effective_kernel(self, k: Tensor, w: Weights) -> Tensor:
        """Latent kernel (Z, L) -> input-to-output kernel (H_out, H_in, L)."""

    @abstractmethod
    def _macs(self) -> Tuple[int, int, int]:
        """Multiply-adds per step of (input projection, readout, effective-kernel build)."""

    def _state_shape(self) -> Tuple[int, ...]:
        """Per-sequence layout of ``lrnnx_state`` in the inference cache."""
        return (self.n_rows, self.sub_state_dim)

    # ------------------------------------------------------------------------------ parameters
    @property
    def contraction(self) -> str:
        """``"auto"`` (cheapest by estimate), ``"latent"`` or ``"kernel"``: see :meth:`forward`."""
        return self._contraction

    @contraction.setter
    def contraction(self, value: str) -> None:
        if value not in CONTRACTIONS:
            raise ValueError(f"contraction: expected one of {list(CONTRACTIONS)}, got {value!r}")
        self._contraction = value

    def _continuous_A(self) -> Tensor:
        re = -F.softplus(self.A_real_raw).clamp(min=MIN_NEG_REAL)
        return torch.complex(re, self.A_imag)

    def _row_dt(self) -> Tensor:
        """Steps (S, 1), or (S, M) per sub-state: those of a state, repeated over its rows."""
        dt = torch.exp(self.log_dt).reshape(self.d_state, -1)
        return dt.repeat_interleave(self.n_rows // self.d_state, dim=0)

    def _mix_weight(self, w: Weights) -> Tensor | None:
        """E (S, M) mixing the sub-states of a row, or None where every sub-state is read alone."""
        return w.get("E")

    def _mix(self, h_real: Tensor, w: Weights) -> Tensor:
        """(..., S, M) real sub-states -> (..., Z) latent outputs."""
        E = self._mix_weight(w)
        return h_real.flatten(-2) if E is None else (h_real * E).sum(-1)

    def discretize(self) -> Tuple[Tensor, Tensor, Tensor]:
        """Discrete sub-state poles and input gains from the chosen rule.

        Returns:
            A_bar (S, M) complex, gamma_bar (S, M) complex (ones for ``dirac``), and the sub-state
            readout weights (S, M): E, or ones where the mode reads every sub-state alone.
        """
        A = self._continuous_A()
        A_bar, gamma = self.discretize_fn(A, self._row_dt())
        if not isinstance(gamma, Tensor):
            gamma = torch.full_like(A_bar, gamma)
        else:  # a real or (S, 1) gain, e.g. simplified_zoh's dt: one complex (S, M) layout
            gamma = gamma.to(A_bar.dtype).expand_as(A_bar).contiguous()
        E = self._mix_weight(self._weights())
        return A_bar, gamma, torch.ones_like(A.real) if E is None else E

    def _kernel(self, P: Tensor, gamma: Tensor, w: Weights) -> Tensor:
        """Latent kernel (Z, L) from the powers P (S, M, L)."""
        K = (gamma[..., None] * P).real  # (S, M, L)
        return self._mix(K.permute(2, 0, 1), w).transpose(0, 1)

    def compute_kernel(self, L: int | None = None) -> Tuple[Tensor, Tensor]:
        """Discrete-time latent convolution kernel with intra-state mode mixing.

        Args:
            L: kernel length; defaults to ``self.kernel_length``, the length of the last input seen
                by :meth:`forward`.

        Returns:
            k: (Z, L) real latent kernel, k[z, l] = sum_m E_zm Re(gamma_zm A_bar_zm^l) with one row
            per state channel: Z = N (neck, dws), N * M (pointwise: one per lane, no mixing) or
            N * H_in (full: row o * H_in + i is the (output o, input i) pair).
            empty: an empty tensor (the input matrix is not folded into the kernel).
        """
        L = self.kernel_length if L is None else L
        if L is None:
            raise ValueError("L: no kernel length yet; pass L or run forward on an input first")
        L = _check_positive_int("L", L)
        A_bar, gamma, _ = self.discretize()
        k = self._kernel(diagonal_powers(A_bar, L), gamma, self._weights())
        return k, k.new_empty(0)

    # --------------------------------------------------------------------------------- forward
    def _use_kernel_path(self, batch: int, L: int) -> bool:
        """Contract (B, k, C) first when that costs fewer flops than projecting and convolving."""
        if not self.mix_act.is_identity:  # a nonlinearity sits between k and C
            if self.contraction == "kernel":
                raise ValueError(
                    "contraction: 'kernel' folds C into the kernel, which the mix norm/activation "
                    "between the SSM and C forbids; use 'auto' or 'latent'"
                )
            return False
        if self.contraction != "auto":
            return self.contraction == "kernel"
        n = fft_length(2 * L)
        fft = 2.5 * n * math.log2(n)  # one real FFT of length n
        Hi, Ho, Z = self.d_model, self.d_output, self._latent_width()
        proj_in, proj_out, build = self._macs()
        latent = batch * L * (proj_in + proj_out) + (2 * batch * Z + Z) * fft + 2 * batch * Z * n
        kernel = build * L + (batch * Hi + Ho * Hi + batch * Ho) * fft + 2 * batch * Ho * Hi * n
        return kernel < latent

    def _latent_width(self) -> int:
        E = self._mix_weight(self._weights())
        return self.n_rows * (1 if E is not None else self.sub_state_dim)

    def _check_cache(self, cache: Any, batch: int) -> Tensor:
        shapes = {"lrnn_state": (batch,) + self._state_shape()}
        keys = ("lrnn_state", "A_bar", "gamma_bar")
        precision = dict.fromkeys(keys, self._precision)
        return check_inference_cache(
            cache, batch, keys, "Centaurus", shapes=shapes, precision=precision
        )["lrnn_state"]

    def forward(
        self,
        x: Tensor,
        integration_timesteps: Tensor | None = None,
        lengths: Tensor | None = None,
        inference_cache: Dict[str, Any] | None = None,
        *,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor:
        """Forward pass through a Centaurus LTI mode variant.

        Args:
            x: input sequence (B, L, H_in).
            integration_timesteps: (B, L), for one interface with the LTV models: checked like
                theirs and ignored, with a warning (the block is time-invariant).
            lengths: (B,) valid lengths; outputs past them are zero and padding never reaches the
                valid outputs, the state or a train-mode BatchNorm's statistics.
            inference_cache: from :meth:`allocate_inference_cache`; the sequence starts from its
                ``"lrnn_state"`` and the state at each sequence's end is written back, so
                forward(prompt) followed by :meth:`step` continues the sequence.  With
                ``cu_seqlens`` it holds one state per packed sequence (batch size S).
            cu_seqlens: packed sequences (fla's convention): int64 offsets (S + 1,) into the T
                steps of x (1, T, H_in), 0 first and T last (repeated offsets: zero-length
                sequences).  The result equals running each sequence alone (outputs, gradients,
                states) and is always computed by the scan with resets (an FFT convolution
                would carry one sequence's inputs into the next), whatever the mode.  A
                ``"batch"`` norm in train mode pools its statistics over all packed steps, as
                it pools over a padded batch.

        Returns:
            (B, L, H_out) in x's dtype; the sub-state arithmetic is float32/complex64 (or the
            parameters' wider dtype) even under autocast.

        Raises:
            ValueError: bad x / lengths / cache / cu_seqlens (with lengths, or a batch other
                than 1), or ``contraction == "kernel"`` with a dws mix norm/activation (C cannot
                be folded into the kernel past a nonlinearity).
        """
        self._check_forward_args(x, integration_timesteps, lengths)
        Bsz, L, _ = x.shape
        cu = packed_offsets(cu_seqlens, lengths, Bsz, L, f"x {tuple(x.shape)} = (1, T, H_in)")
        lengths = as_lengths(lengths, Bsz, L, x.device)
        mask = lengths_mask(lengths, Bsz, L, x.device)
        rows = Bsz if cu is None else cu.shape[0] - 1  # states: one per sequence
        h0 = None
        if inference_cache is not None:
            if cu is not None:
                check_packed_cache(inference_cache, rows, type(self).__name__)
            # a copy: the cache's tensor is overwritten in place with the final state below,
            # which must not change a value the autograd graph of this forward has saved
            h0 = self._check_cache(inference_cache, rows).clone()
        if x.numel() == 0:  # no batch or no steps: empty output, the cache stays
            return empty_in_graph(x, (Bsz, L, self.d_output), self)
        self.kernel_length = L
        S, M = self.n_rows, self.sub_state_dim
        w = self._weights()
        with no_autocast(x.device):
            xf = x.to(self.log_dt.dtype)
            if mask is not None:  # a select: padding may hold anything, NaN included
                xf = zero_where_not(xf, mask[..., None])
            A_bar, gamma, _ = self.discretize()
            h0f = None if h0 is None else h0.reshape(rows, S, M).to(A_bar.dtype)
            if cu is None and self._use_fft(L, x.device):
                P = diagonal_powers(A_bar, L)
                k = self._kernel(P, gamma, w)
                free = None if h0f is None else self._free_response(h0f, A_bar, P, w)
                if self._use_kernel_path(Bsz, L):  # only when the readout is linear
                    K = self._effective_kernel(k, w)
                    y = causal_conv_mix(xf.transpose(1, 2), K).transpose(1, 2)
                    if free is not None:
                        y = y + self._readout(free, w)
                    y = self.out_act(y, mask)
                else:
                    u = self._latent_input(xf, w)  # (B, L, Z)
                    z = causal_conv(u.transpose(1, 2), k).transpose(1, 2)
                    y = self._output(z if free is None else z + free, w, mask)
                final = None
                if inference_cache is not None:
                    final = self._final_state(xf, lengths, h0f, A_bar, gamma, P, w)
            else:
                v = gamma * self._lanes(xf, w)  # (B, L, S, M)
                if cu is None:
                    h = linear_scan(A_bar, v, initial_state=h0f)
                    final = None if inference_cache is None else self._gather_final(h, lengths, h0f)
                else:  # the recurrence restarts at each sequence; its final state is read there
                    h, final = linear_scan(
                        A_bar, v, initial_state=h0f, output_final_state=True, cu_seqlens=cu
                    )
                y = self._output(self._mix(h.real, w), w, mask)
            if mask is not None:
                y = zero_where_not(y, mask[..., None])
        if inference_cache is not None:
            inference_cache["lrnn_state"].copy_(final.reshape(h0.shape))
            advance = L if cu is None else packed_seqlen_offset(cu)
            inference_cache["seqlen_offset"] = inference_cache.get("seqlen_offset", 0) + advance
        return y.to(x.dtype)

    def _output(
        self, z: Tensor, w: Weights, mask: Tensor | None = None, running_stats: bool = False
    ) -> Tensor:
        """Latent outputs (..., Z) -> block outputs (..., H_out): mix norm/activation, the mode's
        readout, output norm/activation (``mask``, ``running_stats``: see :class:`ChannelNormAct`)."""
        z = self.mix_act(z, mask, running_stats)
        return self.out_act(self._readout(z, w), mask, running_stats)

    def _free_response(self, h0: Tensor, A_bar: Tensor, P: Tensor, w: Weights) -> Tensor:
        """Latent outputs (B, L, Z) of the initial state alone: Re(A_bar^{t+1} h0) mixed by E."""
        AP = A_bar[..., None] * P  # (S, M, L)
        E = self._mix_weight(w)
        if E is None:
            return torch.einsum("bsm,sml->blsm", h0, AP).real.flatten(-2)
        return torch.einsum("bsm,sml->bls", h0 * E.to(h0.dtype), AP).real

    def _drive_state(self, x_rev: Tensor, P: Tensor, w: Weights) -> Tensor:
        """sum_l P[..., l] * v[L-1-l] for time-reversed input x_rev (B, L, H_in) -> (B, S, M)."""
        v = self._lanes(x_rev, w).to(P.dtype)  # (B, L, S, 1 or M)
        if v.shape[-1] == 1:
            return torch.einsum("bls,sml->bsm", v[..., 0], P)
        return torch.einsum("blsm,sml->bsm", v, P)

    def _final_state(
        self,
        xf: Tensor,
        lengths: Tensor | None,
        h0: Tensor | None,
        A_bar: Tensor,
        gamma: Tensor,
        P: Tensor,
        w: Weights,
    ) -> Tensor:
        """Sub-states (B, S, M) after each sequence's last valid step (FFT path)."""
        Bsz, L, _ = xf.shape
        if lengths is None:
            x_rev = xf.flip(1)
            n_steps = torch.full((Bsz,), L, device=xf.device)
        else:
            # reversed input of each sequence from its own last valid step; zeros beyond its start
            n_steps = lengths.to(xf.device)
            idx = n_steps[:, None] - 1 - torch.arange(L, device=xf.device)[None, :]
            x_rev = xf.gather(1, idx.clamp(min=0)[..., None].expand(-1, -1, xf.shape[-1]))
            x_rev = x_rev * (idx >= 0)[..., None]
        h = gamma * self._drive_state(x_rev, P, w)
        if h0 is not None:
            # A_bar^len h0; the powers stop at L-1, so take A_bar * A_bar^(len-1) (len 0: h0 itself)
            AP = torch.cat([torch.ones_like(P[..., :1]), A_bar[..., None] * P], -1)  # (S, M, L+1)
            decay = AP.permute(2, 0, 1)[n_steps.long()]  # (B, S, M)
            h = h + decay * h0
        return h

    @staticmethod
    def _gather_final(h: Tensor, lengths: Tensor | None, h0: Tensor | None) -> Tensor:
        """State at each sequence's last valid step from the scanned states h (B, L, S, M)."""
        if lengths is None:
            return h[:, -1]
        lengths = lengths.to(h.device)
        idx = (lengths - 1).clamp(min=0).view(-1, 1, 1, 1).expand(-1, 1, *h.shape[2:])
        final = h.gather(1, idx)[:, 0]
        start = torch.zeros_like(final) if h0 is None else h0
        return torch.where((lengths == 0).view(-1, 1, 1), start, final)

    # ------------------------------------------------------------------------------- inference
    def allocate_inference_cache(
        self,
        batch_size: int,
        max_seqlen: int = 1,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> Dict[str, Any]:
        """Allocate initial streaming state and cache matrices.

        Args:
            batch_size: the batch size.
            max_seqlen: unused (the dynamics are time-invariant); kept for the common interface.
            dtype: unused; the state keeps the parameters' complex dtype.
            device: where the cache is allocated (default: the parameters' device).

        Returns:
            ``{"lrnn_state": zeros (B, N, M) complex (full: (B, H_out, H_in, M)), "A_bar",
            "gamma_bar": (S, M) discrete sub-state parameters, the mode's weights "B", "C", "E"
            (None where absent), "seqlen_offset": 0}``; all matrices are detached constants.
        """
        check_batch_size(batch_size)
        with torch.no_grad():  # inference constants, not graph nodes
            m = self._step_constants()
        A_bar, gamma = m["A_bar"], m["gamma_bar"]
        w = {k: (None if v is None else v.detach().clone()) for k, v in m["weights"].items()}
        state = torch.zeros(
            (batch_size,) + self._state_shape(), dtype=A_bar.dtype, device=A_bar.device
        )
        cache = {"lrnn_state": state, "A_bar": A_bar, "gamma_bar": gamma, **w, "seqlen_offset": 0}
        return cache_to_device(cache, device)

    def _step_constants(self) -> Dict[str, Any]:
        """A_bar, gamma_bar (S, M) and the mode's weights, from the parameters as they are."""
        A_bar, gamma, _ = self.discretize()
        return {"A_bar": A_bar, "gamma_bar": gamma, "weights": self._weights()}

    def step(self, x: Tensor, inference_cache: Dict[str, Any]) -> Tuple[Tensor, Dict[str, Any]]:
        """Single-timestep streaming update for a Centaurus variant.

        The sub-states advance, x_nm <- A_bar_nm x_nm + gamma_nm v_n, in the cached (B, N, M)
        layout ((B, H_out, H_in, M) for full): in place with the cache's constants, or, while
        autograd records, from the parameters with the graph carried through the state (a
        stepped sequence has the forward's gradients).  BatchNorms apply their running
        statistics (the eval-mode function) whatever the module's mode.

        Args:
            x: (B, H_in) (or (B, 1, H_in), giving y (B, 1, H_out)) input at the current
                timestep.
            inference_cache: from :meth:`allocate_inference_cache`; updated in place.

        Returns:
            y (B, H_out) real, and the cache.
        """
        layout, x = x, check_step_input(x, self.d_model)
        h_full = self._check_cache(inference_cache, x.shape[0])
        h = h_full.view(x.shape[0], self.n_rows, self.sub_state_dim)
        # while autograd records, the system comes from the parameters and the state is
        # computed out of place (see LTI_LRNN._diagonal_step_in_graph); else the cache's
        # constants and an in-place update
        graph = self._step_records_graph()
        if graph:
            m = self._step_constants()
            A_bar, gamma, w = m["A_bar"], m["gamma_bar"], m["weights"]
        else:
            A_bar, gamma = inference_cache["A_bar"], inference_cache["gamma_bar"]
            w = {k: inference_cache.get(k) for k in self._weights()}
        with no_autocast(x.device):
            xf = x.to(A_bar.real.dtype)
            v = gamma * self._lanes(xf, w)
            if graph:
                h_new = A_bar * h.clone() + v
                h.copy_(h_new)
            else:
                h_new = h.mul_(A_bar).add_(v)
            y = self._output(self._mix(h_new.real, w), w, running_stats=True)
        inference_cache["seqlen_offset"] = inference_cache.get("seqlen_offset", 0) + 1
        return step_output(y.to(x.dtype), layout), inference_cache


class Centaurus(CentaurusBase):
    """A Centaurus block of the given ``mode``; every mode class derives from this class.

    ``mode``: ``"neck"`` -> :class:`CentaurusNeck`, ``"pointwise"`` / ``"pw"`` / ``"s5"`` ->
    :class:`CentaurusPWNeck`, ``"dws"`` -> :class:`CentaurusDWS`, ``"full"`` ->
    :class:`CentaurusFull`.  ``Centaurus(...)`` returns an instance of that mode class, which is
    also a ``Centaurus`` (``isinstance(model, Centaurus)`` holds).  A mode class may be built
    directly; ``mode`` may then be left out, or must name that class's mode (else ValueError).

    Args:
        d_model, d_state, sub_state_dim, discretization: see :class:`CentaurusBase`.
        mode: the connectivity, as above; the built block keeps it as :attr:`connectivity`,
            while its ``.mode`` attribute is every LTI model's computation switch ("fft",
            "scan" or "auto", default "auto"; see :class:`lrnnx.models.lti.base.LTI_LRNN`).
        d_output, dt_per_sub_state, mix_norm, mix_activation, out_norm, out_activation:
            keyword-only options of :class:`CentaurusBase`.

    Example:
        >>> model = Centaurus(d_model=64, d_state=64, sub_state_dim=8, mode="neck")
        >>> model(torch.randn(2, 128, 64)).shape
        torch.Size([2, 128, 64])
        >>> isinstance(model, Centaurus), type(model).__name__
        (True, 'CentaurusNeck')
    """

    def __new__(
        cls,
        d_model: int,
        d_state: int,
        sub_state_dim: int,
        discretization: Literal["zoh", "bilinear", "dirac", "simplified_zoh"] = "zoh",
        mode: Literal["neck", "pointwise", "pw", "s5", "dws", "full"] = "neck",
        *,
        d_output: int | None = None,
        dt_per_sub_state: bool = False,
        mix_norm: str | None = None,
        mix_activation: str | None = None,
        out_norm: str | None = None,
        out_activation: str | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> Centaurus:
        if cls is Centaurus:
            cls = _mode_class(mode)
        return super().__new__(cls)

    def __init__(
        self,
        d_model: int,
        d_state: int,
        sub_state_dim: int,
        discretization: Literal["zoh", "bilinear", "dirac", "simplified_zoh"] = "zoh",
        mode: str | None = None,
        *,
        d_output: int | None = None,
        dt_per_sub_state: bool = False,
        mix_norm: str | None = None,
        mix_activation: str | None = None,
        out_norm: str | None = None,
        out_activation: str | None = None,
    ) -> None:
        # the options are spelled out (not **options) so that a misspelt one is an error that
        # names it, here and in build_mixer's argument check, which reads this signature
        if mode is not None and not isinstance(self, _mode_class(mode)):
            raise ValueError(
                f"mode: {type(self).__name__} is the {_mode_name(type(self))!r} mode, got "
                f"mode={mode!r}; use Centaurus(..., mode={mode!r}) for that mode"
            )
        super().__init__(
            d_model,
            d_state,
            sub_state_dim,
            discretization,
            d_output=d_output,
            dt_per_sub_state=dt_per_sub_state,
            mix_norm=mix_norm,
            mix_activation=mix_activation,
            out_norm=out_norm,
            out_activation=out_activation,
        )

    @property
    def connectivity(self) -> str:
        """The block's connectivity, the constructor's ``mode``: "neck", "pointwise", "dws" or
        "full" (``.mode`` is the fft / scan / auto switch of every LTI model)."""
        return _mode_name(type(self))

    def __getnewargs_ex__(self) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
        # copy / pickle rebuild the object with __new__(cls, *args): give it the sizes
        return (self.d_model, self.d_state, self.sub_state_dim), {}


class CentaurusNeck(Centaurus):
    """Bottleneck block with dense in/out projections.

    u (H_in) -B-> N states, each of M sub-states mixed by E_n -> z (N) -C-> y (H_out = d_output,
    default d_model).  B (N, H_in), C (H_out, N), E (N, M).

    Example:
        >>> model = CentaurusNeck(d_model=64, d_state=64, sub_state_dim=8)
        >>> model(torch.randn(2, 128, 64)).shape
        torch.Size([2, 128, 64])
    """

    def _init_mode_parameters(self) -> None:
        N, M, H, Ho = self.d_state, self.sub_state_dim, self.d_model, self.d_output
        self._set_parameter("B", torch.ones(N, H) / math.sqrt(H))
        self._set_parameter("C", torch.randn(Ho, N) * math.sqrt(2.0 / (N * M)))
        self._set_parameter("E", torch.randn(N, M) * math.sqrt(2.0))

    def _weights(self) -> Weights:
        return {"B": self.B, "C": self.C, "E": self.E}

    def _lanes(self, x: Tensor, w: Weights) -> Tensor:
        return (x @ w["B"].transpose(0, 1))[..., None]

    def _latent_input(self, x: Tensor, w: Weights) -> Tensor:
        return x @ w["B"].transpose(0, 1)

    def _readout(self, z: Tensor, w: Weights) -> Tensor:
        return z @ w["C"].transpose(0, 1)

    def _effective_kernel(self, k: Tensor, w: Weights) -> Tensor:
        # K_oi[l] = sum_n C_on k_n[l] B_ni
        return torch.einsum("on,nil->oil", w["C"], k[:, None, :] * w["B"][:, :, None])

    def _macs(self) -> Tuple[int, int, int]:
        N, Hi, Ho = self.d_state, self.d_model, self.d_output
        return Hi * N, N * Ho, N * Hi * (Ho + 1)


class CentaurusPWNeck(Centaurus):
    """Pointwise bottleneck (s5 in public implementations) that flattens (N, M) -> (N*M).

    This variant removes E-mixing and repeats delta over M sub-states per state, yielding
    independent SISO lanes aggregated in a single flattened axis: B (N*M, H_in), C (H_out, N*M),
    and with ``dt_per_sub_state`` log_dt (N*M,).

    Example:
        >>> model = CentaurusPWNeck(d_model=64, d_state=64, sub_state_dim=8)
        >>> model(torch.randn(2, 128, 64)).shape
        torch.Size([2, 128, 64])
    """

    def _init_mode_parameters(self) -> None:
        NM, H = self.d_state * self.sub_state_dim, self.d_model
        self._set_parameter("B", torch.ones(NM, H) / math.sqrt(H))
        self._set_parameter("C", torch.randn(self.d_output, NM) * math.sqrt(2.0 / NM))

    def _log_dt_shape(self) -> Tuple[int, ...]:
        return (self.d_state * self.sub_state_dim,)  # flat like B and C

    def _weights(self) -> Weights:
        return {"B": self.B, "C": self.C}

    def _lanes(self, x: Tensor, w: Weights) -> Tensor:
        v = x @ w["B"].transpose(0, 1)
        return v.unflatten(-1, (self.d_state, self.sub_state_dim))

    def _latent_input(self, x: Tensor, w: Weights) -> Tensor:
        return x @ w["B"].transpose(0, 1)

    def _readout(self, z: Tensor, w: Weights) -> Tensor:
        return z @ w["C"].transpose(0, 1)

    def _effective_kernel(self, k: Tensor, w: Weights) -> Tensor:
        return torch.einsum("on,nil->oil", w["C"], k[:, None, :] * w["B"][:, :, None])

    def _macs(self) -> Tuple[int, int, int]:
        NM, Hi, Ho = self.d_state * self.sub_state_dim, self.d_model, self.d_output
        return Hi * NM, NM * Ho, NM * Hi * (Ho + 1)


class CentaurusDWS(Centaurus):
    """Depthwise-separable block with one state per channel.

    Channel n drives its own M sub-states, mixed by E_n (the depthwise SSM), then the pointwise
    matrix C (H_out x N) mixes the channels.  Requires d_state == d_model.  ``mix_norm`` /
    ``mix_activation`` put a norm and an activation on the SSM's output before C (the official
    layer's default is BatchNorm + ReLU there); E (N, M).

    Example:
        >>> model = CentaurusDWS(d_model=64, d_state=64, sub_state_dim=8)
        >>> model(torch.randn(2, 128, 64)).shape
        torch.Size([2, 128, 64])
    """

    _has_mix_act = True

    def _check_sizes(self, d_output: int | None) -> None:
        if self.d_state != self.d_model:
            raise ValueError(
                f"d_state: the dws mode has one state per channel, so d_state must equal "
                f"d_model={self.d_model}, got {self.d_state}"
            )

    def _init_mode_parameters(self) -> None:
        N, M = self.d_state, self.sub_state_dim
        self._set_parameter("E", torch.ones(N, M) / math.sqrt(M))
        bound = 1.0 / math.sqrt(N)  # the default init of the reference's 1x1 convolution
        self._set_parameter("C", torch.empty(self.d_output, N).uniform_(-bound, bound))

    def _weights(self) -> Weights:
        return {"C": self.C, "E": self.E}

    def _lanes(self, x: Tensor, w: Weights) -> Tensor:
        return x[..., None]

    def _latent_input(self, x: Tensor, w: Weights) -> Tensor:
        return x

    def _readout(self, z: Tensor, w: Weights) -> Tensor:
        return z @ w["C"].transpose(0, 1)

    def _effective_kernel(self, k: Tensor, w: Weights) -> Tensor:
        return w["C"][:, :, None] * k[None]

    def _macs(self) -> Tuple[int, int, int]:
        return 0, self.d_state * self.d_output, self.d_model * self.d_output


class CentaurusFull(Centaurus):
    """Fully connected block with a state per (in, out) pair.

    Like a full convolution from H_in = d_model to H_out = d_state channels: output o and input i
    are connected by a state of M sub-states with its own poles and mixing E_oi, and the step dt_o
    is shared by the states of an output channel (with ``dt_per_sub_state``: dt_om, log_dt
    (H_out, M)).  E is (H_out * H_in, M), row o * H_in + i.  The inference state is
    (B, H_out, H_in, M).

    Example:
        >>> model = CentaurusFull(d_model=64, d_state=64, sub_state_dim=8)
        >>> model(torch.randn(2, 128, 64)).shape
        torch.Size([2, 128, 64])
    """

    @property
    def n_rows(self) -> int:
        return self.d_state * self.d_model

    @property
    def d_output(self) -> int:
        return self.d_state

    def _check_sizes(self, d_output: int | None) -> None:
        if d_output is not None and d_output != self.d_state:
            raise ValueError(
                f"d_output: the full mode has d_state={self.d_state} output channels, so "
                f"d_output must be None or {self.d_state}, got {d_output!r}"
            )

    def _state_shape(self) -> Tuple[int, ...]:
        return (self.d_state, self.d_model, self.sub_state_dim)

    def _init_mode_parameters(self) -> None:
        S, M = self.n_rows, self.sub_state_dim
        self._set_parameter("E", torch.ones(S, M) / math.sqrt(self.d_model))

    def _weights(self) -> Weights:
        return {"E": self.E}

    def _lanes(self, x: Tensor, w: Weights) -> Tensor:
        lead = x.shape[:-1]
        rows = self.d_state * self.d_model  # (not -1: a batch of 0 leaves it undetermined)
        return x[..., None, :].expand(*lead, self.d_state, self.d_model).reshape(*lead, rows, 1)

    def _latent_input(self, x: Tensor, w: Weights) -> Tensor:
        return self._lanes(x, w)[..., 0]

    def _readout(self, z: Tensor, w: Weights) -> Tensor:
        return z.unflatten(-1, (self.d_state, self.d_model)).sum(-1)

    def _effective_kernel(self, k: Tensor, w: Weights) -> Tensor:
        return k.view(self.d_state, self.d_model, -1)

    def _drive_state(self, x_rev: Tensor, P: Tensor, w: Weights) -> Tensor:
        # the input of pair (o, i) is u_i for every o: contract without materialising the copies
        Pv = P.view(self.d_state, self.d_model, self.sub_state_dim, -1)
        h = torch.einsum("bli,oiml->boim", x_rev.to(P.dtype), Pv)
        return h.reshape(x_rev.shape[0], self.n_rows, self.sub_state_dim)

    def _macs(self) -> Tuple[int, int, int]:
        return 0, self.n_rows, 0


_MODES = {
    "neck": CentaurusNeck,
    "pointwise": CentaurusPWNeck,
    "pw": CentaurusPWNeck,
    "s5": CentaurusPWNeck,
    "dws": CentaurusDWS,
    "full": CentaurusFull,
}


def _mode_class(mode: Any) -> type:
    if not isinstance(mode, str) or mode not in _MODES:
        raise ValueError(f"mode: expected one of {list(_MODES)}, got {mode!r}")
    return _MODES[mode]


def _mode_name(cls: type) -> str:
    return next((name for name, c in _MODES.items() if issubclass(cls, c)), cls.__name__)
