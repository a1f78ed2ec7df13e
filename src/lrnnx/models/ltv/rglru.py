"""RG-LRU recurrent block of Griffin / Hawk (De et al., "Griffin: Mixing Gated Linear Recurrences
with Local Attention for Efficient Language Models", arXiv 2402.19427, section 2.4 and figure 2).

The block maps x (B, L, H) through two branches of width D = ``lru_width``:

    g_t = GeLU(W_gate x_t)                                   gate branch
    u_t = W_in x_t,   x'_t = Conv1D(u)_t                     causal depthwise conv, width d_conv, bias
    r_t = sigmoid(W_a x'_t + b_a)                            recurrence gate
    i_t = sigmoid(W_x x'_t + b_x)                            input gate
    log a_t = c * r_t * log a,   a = sigmoid(Lambda)         i.e. a_t = a^(c r_t), c = 8
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x'_t)     the RG-LRU, one real state per channel
    y_t = W_out (g_t * h_t)

Segment reset (``reset_at_start=True``): Griffin's reference code (DeepMind's recurrentgemma,
and transformers' RecurrentGemma) restarts the recurrence where a segment begins
(``segment_pos == 0``).  There the decay is a_0 = 0 and the input is not normalised:

    h_0 = i_0 * x'_0                                         first step of a sequence only

so the initial state is ignored at that step and the first output is not shrunk by
sqrt(1 - a_0^2).  The paper's equation above applies at every later step.  The default
(``False``) applies the paper's update at t = 0 too; the same weights then give different
outputs at the start of a sequence, so weights trained with the reset (all published Griffin /
RecurrentGemma checkpoints, see :mod:`lrnnx.interop.recurrentgemma`) need it.  The reset is
folded into the coefficients (log a_0 := -inf, hence a_0 = 0 and sqrt(1 - a_0^2) = 1 exactly),
so every scan backend and the gradients see an ordinary step.

W_a and W_x are block-diagonal with ``num_heads`` blocks (as in DeepMind's recurrentgemma;
``num_heads=1`` gives the dense gates written in the paper).  Lambda is initialised so that a^c
is uniform in [0.9, 0.999] (the paper's choice), i.e. at r_t = 1 the decay per step lies there.

The decay is kept in log space (log a = logsigmoid(Lambda)), so a_t never rounds to 1 from
below where it matters, and the input normaliser is sqrt(1 - a_t^2) = sqrt(-expm1(2 log a_t)),
which is accurate when a_t is close to 1.  GeLU is the tanh approximation by default (that of
recurrentgemma, "gelu_pytorch_tanh" in transformers); ``gelu_approximate="none"`` gives the
exact erf GeLU.  The recurrence runs through
:func:`lrnnx.ops.linear_scan` in float32 (or wider), also under autocast.

Packed sequences (``forward(x, cu_seqlens=...)``, fla's convention: x (1, T, H) holds S
sequences back to back, int32/int64 offsets (S + 1,)): the convolution windows start at each
sequence's own start (:func:`lrnnx.core.conv.causal_depthwise_conv` with ``cu_seqlens``), the
recurrence restarts there (:func:`lrnnx.ops.linear_scan` with ``cu_seqlens``), and with
``reset_at_start`` Griffin's reset applies at each sequence's first step; the result equals
running each sequence alone.  A cache then holds one state per sequence (batch size S).
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrnnx.core.base import assign_
from lrnnx.core.checks import (
    as_lengths,
    check_batch_size,
    check_bool,
    check_dtype_argument,
    check_inference_cache,
    check_input_dtype,
    check_no_kwargs,
    check_packed_cache,
    check_positive_float,
    check_positive_int,
    check_step_input,
    merge_alias,
    packed_offsets,
    packed_seqlen_offset,
    zero_where_not,
)
from lrnnx.core.conv import causal_depthwise_conv, window_tail
from lrnnx.layers.linear import Conv1d, Linear, lecun_normal, normal
from lrnnx.models.ltv.base import LTV_LRNN
from lrnnx.ops import linear_scan
from lrnnx.ops._dispatch import no_autocast

#: values of ``gelu_approximate`` (F.gelu's ``approximate`` argument)
_GELU_APPROXIMATIONS = ("tanh", "none")

#: 1 - a_t^2 is floored here before the square root, so its derivative stays finite even if
#: a_t rounds to exactly 1 (r_t or softplus(-Lambda) underflowing); far below any a_t reachable
#: with a^c <= 0.999 and a gate that has not saturated to 0.
_MIN_ONE_MINUS_A_SQ = 1e-12


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for the recurrence: float32, or float64 for a float64 model."""
    return torch.promote_types(dtype, torch.float32)


class BlockDiagonalLinear(nn.Module):
    """y = x W + b with W block-diagonal: ``num_blocks`` independent (width/num_blocks)^2 blocks.

    Args:
        width: input and output features D.
        num_blocks: number of diagonal blocks; must divide ``width``.
        device, dtype: factory arguments for the parameters.

    Shapes: x (..., D) -> (..., D).  ``weight`` is (num_blocks, D/num_blocks, D/num_blocks),
    ``bias`` is (D,).
    """

    def __init__(self, width: int, num_blocks: int, device=None, dtype=None) -> None:
        super().__init__()
        if width % num_blocks:
            raise ValueError(f"num_heads: must divide the RG-LRU width {width}, got {num_blocks}")
        self.width, self.num_blocks = width, num_blocks
        self.block_width = width // num_blocks
        bw = self.block_width
        self.weight = nn.Parameter(torch.empty(num_blocks, bw, bw, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(width, device=device, dtype=dtype))
        self.reset_parameters()

    def extra_repr(self) -> str:
        return f"width={self.width}, num_blocks={self.num_blocks}"

    def reset_parameters(self) -> None:
        # LeCun normal over each block's fan-in, zero bias (as recurrentgemma)
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.block_width))
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        xs = x.unflatten(-1, (self.num_blocks, self.block_width))
        y = torch.einsum("...hi,hij->...hj", xs, self.weight.to(x.dtype))
        return y.flatten(-2) + self.bias.to(x.dtype)


class RGLRU(LTV_LRNN):
    """Griffin's recurrent block: gated GeLU branch times (Linear -> Conv1D -> RG-LRU), then Linear.

    Example:
        >>> model = RGLRU(d_model=64, d_conv=4)
        >>> y = model(torch.randn(2, 128, 64))  # (B, L, H) -> (B, L, H)

    Args:
        d_model: model width H (input and output features).
        d_conv: temporal width of the causal depthwise convolution (Griffin uses 4).
        expand: the recurrent width is ``int(expand * d_model)`` unless ``lru_width`` is given.
        c: the fixed scalar c in a_t = a^(c r_t) (8 in the paper).
        a_init_range: ``(lo, hi)`` with 0 < lo <= hi < 1: Lambda is initialised so that a^c is
            uniform in [lo, hi] (the paper's [0.9, 0.999]).  Note this is the range of a^c, the
            decay at a fully open recurrence gate, not of a itself.
        conv_bias: whether the convolution has a bias (Griffin: yes).
        bias: whether the three dense projections (gate branch, input, output) have biases.
            The gate projections W_a, W_x always have theirs (b_a, b_x).
        d_state: accepted for the lrnnx model signature; the RG-LRU keeps one real state per
            channel, so only None or 1 are valid (the state is (B, lru_width)).
        use_fast_path: if True (default), the recurrence runs through the fastest
            :func:`lrnnx.ops.linear_scan` backend for the device (fused CPU / Triton kernels);
            False pins the portable pure-torch scan and causal convolution (as Mamba's), which
            torch.compile traces into one graph.  Both give the same result up to rounding.
            (The original lrnnx selects its fused CUDA kernel with it.)
        lru_width: recurrent width D_rnn; overrides ``expand`` (then ``expand`` must stay 1).
        num_heads: number of diagonal blocks of the gate matrices W_a, W_x; must divide D_rnn.
            1 (default) gives the dense gates of the paper's equations; recurrentgemma uses
            blocks of width D_rnn / num_heads = 256.
        layer_idx: index of this layer in a stack, for callers that key caches by layer.
        device, dtype: factory arguments for the parameters (Lambda is at least float32).
        reset_at_start: Griffin's segment reset (see the module docstring): at the first step
            of each sequence a_t = 0 and the input is not scaled by sqrt(1 - a_t^2), so
            h_0 = i_0 * x'_0 whatever the initial state.  "First step" means t = 0 of a
            forward without a cache, and the first step a cache row ever takes (its
            ``"started"`` entry is False) with a cache: a prefill followed by :meth:`step`
            calls continues without a reset.  False (default) applies the paper's update at
            every step.  Checkpoints of recurrentgemma / transformers need True.
        gelu_approximate: the gate branch's GeLU, as F.gelu's ``approximate``: "tanh"
            (default, recurrentgemma's) or "none" (exact erf GeLU).

    Raises:
        ValueError: a size or range argument out of its domain (the message names it).
        TypeError: ``reset_at_start`` not a bool, or a size that is not an int.
    """

    def __init__(
        self,
        d_model: int,
        d_conv: int = 4,
        expand: float = 1,
        c: float = 8.0,
        a_init_range: Tuple[float, float] = (0.9, 0.999),
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,
        layer_idx: int | None = None,
        device=None,
        dtype=None,
        *,
        d_state: int | None = None,
        lru_width: int | None = None,
        num_heads: int = 1,
        reset_at_start: bool = False,
        gelu_approximate: str = "tanh",
    ) -> None:
        super().__init__(discretization=None)  # RG-LRU is parameterised in discrete time
        d_model = check_positive_int("d_model", d_model)
        d_conv = check_positive_int("d_conv", d_conv)
        check_positive_float("c", c)
        pair = isinstance(a_init_range, (tuple, list)) and len(a_init_range) == 2
        if not pair or not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) for v in a_init_range
        ):
            raise TypeError(
                f"a_init_range: expected a pair (lo, hi) of floats, got {a_init_range!r}"
            )
        lo, hi = a_init_range
        if not 0 < lo <= hi < 1:
            raise ValueError(f"a_init_range: expected 0 < lo <= hi < 1, got {a_init_range!r}")
        if d_state is not None and check_positive_int("d_state", d_state) != 1:
            raise ValueError(
                f"d_state: the RG-LRU has one real state per channel; expected None or 1, "
                f"got {d_state!r} (use lru_width or expand to widen the recurrence)"
            )
        if lru_width is None:
            check_positive_float("expand", expand)
            lru_width = int(expand * d_model)
            if lru_width < 1:
                raise ValueError(
                    f"expand: the width int(expand * d_model) must be >= 1, got expand={expand!r} "
                    f"with d_model={d_model}"
                )
        elif expand != 1:
            raise ValueError(
                f"expand: give either lru_width or expand, got lru_width={lru_width} and "
                f"expand={expand}"
            )
        lru_width = check_positive_int("lru_width", lru_width)
        num_heads = check_positive_int("num_heads", num_heads)
        if lru_width % num_heads:
            raise ValueError(
                f"num_heads: expected a positive int dividing lru_width={lru_width}, "
                f"got {num_heads!r}"
            )
        for name, flag in (
            ("reset_at_start", reset_at_start),
            ("conv_bias", conv_bias),
            ("bias", bias),
            ("use_fast_path", use_fast_path),
        ):
            check_bool(name, flag)
        if gelu_approximate not in _GELU_APPROXIMATIONS:
            raise ValueError(
                f"gelu_approximate: expected one of {_GELU_APPROXIMATIONS}, "
                f"got {gelu_approximate!r}"
            )
        fk = {"device": device, "dtype": check_dtype_argument(dtype)}
        self.reset_at_start, self.gelu_approximate = reset_at_start, gelu_approximate
        self.d_model, self.d_conv, self.expand, self.c = d_model, d_conv, expand, float(c)
        self.a_init_range = (float(lo), float(hi))
        self.d_inner = self.lru_width = lru_width
        self.d_state = 1
        self.num_heads = num_heads
        self.layer_idx = layer_idx
        self.use_fast_path = use_fast_path
        D = lru_width

        self.gate_proj = Linear(d_model, D, bias=bias, **fk)  # W_gate (GeLU branch)
        self.in_proj = Linear(d_model, D, bias=bias, **fk)  # W_in (recurrent branch)
        # depthwise causal conv; forward/step do the causal padding with the cached inputs
        self.conv1d = Conv1d(D, D, d_conv, groups=D, bias=conv_bias, **fk)
        # recurrentgemma's Conv1D: variance 0.01 / d_conv, zero bias
        self.conv1d.init_fn = functools.partial(normal, std=math.sqrt(0.01 / d_conv))
        self.recurrent_gate_proj = BlockDiagonalLinear(D, num_heads, **fk)  # W_a, b_a
        self.input_gate_proj = BlockDiagonalLinear(D, num_heads, **fk)  # W_x, b_x
        lam_dtype = None if dtype is None else _acc_dtype(dtype)
        self.Lambda = nn.Parameter(torch.empty(D, device=device, dtype=lam_dtype))
        self.Lambda._no_weight_decay = True
        self.out_proj = Linear(D, d_model, bias=bias, **fk)  # W_out
        for lin in (self.gate_proj, self.in_proj, self.out_proj):
            lin.init_fn = lecun_normal
        self.reset_parameters()

    def _reset_parameters(self) -> None:
        """Initialise as Griffin: LeCun-normal projections, small conv, a^c ~ U[a_init_range]."""
        for layer in (self.gate_proj, self.in_proj, self.out_proj, self.conv1d):
            layer.reset_parameters()
        self.recurrent_gate_proj.reset_parameters()
        self.input_gate_proj.reset_parameters()
        with torch.no_grad():
            lo, hi = self.a_init_range
            ac = torch.empty(self.lru_width, dtype=torch.float64).uniform_(lo, hi)  # a^c
            log_a = torch.log(ac) / self.c
            # Lambda = logit(a) = log a - log(1 - a), with 1 - a from expm1 (a is close to 1)
            assign_(self.Lambda, log_a - torch.log(-torch.expm1(log_a)))

    # ------------------------------------------------------------------------------------------
    # pieces shared by forward and step

    def _gate(self, x: Tensor) -> Tensor:
        """The GeLU gate branch g_t = GeLU(W_gate x_t)."""
        return F.gelu(self.gate_proj(x), approximate=self.gelu_approximate)

    def _decay_and_input(self, xc: Tensor, reset: Tensor | None = None) -> Tuple[Tensor, Tensor]:
        """RG-LRU coefficients for conv features xc (..., D) in the accumulation dtype.

        ``reset`` (bool, xc's shape without D): where True, Griffin's segment start, a_t = 0
        and no sqrt(1 - a_t^2) scaling.

        Returns (a_t, sqrt(1 - a_t^2) * i_t * xc), both (..., D), so h_t = a_t h_{t-1} + b_t.
        """
        r = torch.sigmoid(self.recurrent_gate_proj(xc))
        i = torch.sigmoid(self.input_gate_proj(xc))
        log_a = self.c * r * F.logsigmoid(self.Lambda.to(xc.dtype))  # c r_t log a  (< 0)
        if reset is not None:
            # log a_t = -inf gives a_t = 0 and sqrt(1 - a_t^2) = 1 exactly, with zero gradient
            # into the gates there (where routes none to the unused branch)
            log_a = torch.where(reset[..., None], log_a.new_full((), -math.inf), log_a)
        a_t = torch.exp(log_a)
        # sqrt(1 - a_t^2) from log a_t: no cancellation when a_t is close to 1
        mult = torch.sqrt((-torch.expm1(2.0 * log_a)).clamp(min=_MIN_ONE_MINUS_A_SQ))
        return a_t, mult * (i * xc)

    def rg_lru(
        self,
        xc: Tensor,
        initial_state: Tensor | None = None,
        mask: Tensor | None = None,
        reset: Tensor | None = None,
        *,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor:
        """The RG-LRU recurrence alone, on conv features.

        Args:
            xc: (B, L, D_rnn) conv-branch features x'_t; (1, T, D_rnn) with ``cu_seqlens``.
            initial_state: (B, D_rnn) h_{-1}; zero when None; (S, D_rnn) with ``cu_seqlens``.
            mask: (B, L) bool, True at valid positions; the state passes padded positions
                unchanged (a_t = 1, input 0), so h[:, -1] is each sequence's state at its end.
                A padded position is never reset.
            reset: (B, L) bool, True where a segment starts (Griffin's reset: a_t = 0, no
                sqrt(1 - a_t^2) scaling, so h_t = i_t * x'_t).  None: t = 0 of every row (the
                first step of every packed sequence) when ``reset_at_start``, else nowhere.
            cu_seqlens: int32/int64 offsets (S + 1,) of S sequences packed along time: the
                recurrence restarts at each one's first step (fla's convention).

        Returns:
            h (B, L, D_rnn) in float32 (float64 for a float64 model), also under autocast.
        """
        cu = packed_offsets(cu_seqlens, None, xc.shape[0], xc.shape[1], "xc (1, T, D_rnn)")
        return self._scan(xc, initial_state, mask, reset, cu)[0]

    def _scan(
        self,
        xc: Tensor,
        initial_state: Tensor | None,
        mask: Tensor | None,
        reset: Tensor | None,
        cu: Tensor | None,
    ) -> Tuple[Tensor, Tensor]:
        """:meth:`rg_lru` with validated offsets ``cu``; returns (h, final state (B or S,
        D_rnn)), the final state being each row's (each packed sequence's) last state."""
        with no_autocast(xc.device):
            xf = xc.to(_acc_dtype(self.Lambda.dtype))
            if reset is None and self.reset_at_start:
                reset = self._first_step(xc.shape[0], xc.shape[1], None, xc.device, cu)
            a_t, b_t = self._decay_and_input(xf, reset)
            if mask is not None:
                valid = mask[..., None]
                a_t = torch.where(valid, a_t, torch.ones_like(a_t))
                b_t = torch.where(valid, b_t, torch.zeros_like(b_t))
            h0 = None if initial_state is None else initial_state.to(xf.dtype)
            backend = None if self.use_fast_path else "torch"
            return linear_scan(
                a_t, b_t, initial_state=h0, backend=backend, output_final_state=True, cu_seqlens=cu
            )

    @staticmethod
    def _first_step(
        batch: int, seqlen: int, started: Tensor | None, device, cu: Tensor | None = None
    ) -> Tensor:
        """(B, L) reset mask: True at t = 0 of the rows that have not started yet; with packed
        offsets ``cu`` (S + 1,), (1, T) True at the first step of every non-empty sequence
        that has not started (``started`` (S,) then)."""
        reset = torch.zeros(batch, seqlen, dtype=torch.bool, device=device)
        if cu is None:
            reset[:, 0] = True if started is None else ~started.to(device)
            return reset
        nonempty = cu[1:] > cu[:-1]
        starts = cu[:-1][nonempty].to(device)
        fresh = torch.ones(starts.shape[0], dtype=torch.bool, device=device)
        if started is not None:
            fresh = ~started.to(device)[nonempty.to(device)]
        reset[0, starts] = fresh
        return reset

    def _check_cache(self, cache: Any, batch: int) -> Dict[str, Any]:
        check_inference_cache(
            cache,
            batch,
            ("lrnn_state", "conv_state", "started"),
            "RGLRU",
            batch_keys=("lrnn_state", "conv_state", "started"),
            shapes={
                "lrnn_state": (batch, self.lru_width),
                "conv_state": (batch, self.lru_width, self.d_conv - 1),
                "started": (batch,),
            },
            precision={"lrnn_state": _acc_dtype(self.Lambda.dtype)},
        )
        started = cache["started"]
        if not isinstance(started, Tensor) or started.dtype != torch.bool:
            got = started.dtype if isinstance(started, Tensor) else type(started).__name__
            raise TypeError(
                f"inference_cache['started']: expected a (B,) torch.bool tensor, got {got}; "
                f"allocate one with RGLRU.allocate_inference_cache(batch_size={batch})"
            )
        return cache

    # ------------------------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor | None = None,
        integration_timesteps: Tensor | None = None,
        lengths: Tensor | None = None,
        inference_cache: Dict[str, Any] | None = None,
        *,
        hidden_states: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
    ) -> Tensor:
        """x (B, L, H) -> y (B, L, H), in x's dtype; (1, T, H) -> (1, T, H) packed.

        Args:
            x: input sequence (B, L, d_model); ``hidden_states`` is another name for it (that of
                the original lrnnx).
            integration_timesteps: not supported (the RG-LRU has no continuous time); must be
                None, else ValueError.
            lengths: (B,) valid lengths; outputs past them are zero, padded inputs never reach
                valid outputs, and the cache receives each sequence's state at its own length.
            inference_cache: from :meth:`allocate_inference_cache`; the conv and the recurrence
                start from its state, and the final states are written back (``seqlen_offset``
                advances by L), so :meth:`step` continues the sequence.  With
                ``reset_at_start``, the rows whose ``"started"`` is still False take Griffin's
                reset at t = 0 (and are marked started); without a cache every row does.
            cu_seqlens: int32/int64 offsets (S + 1,) of S sequences packed in x's one row (0 first,
                T last, repeats: empty sequences): conv windows, the recurrence and Griffin's
                reset restart at each sequence's start, so the result equals running each
                alone.  A cache then holds one state per sequence (batch size S) and
                ``seqlen_offset`` advances by the longest sequence.

        Raises:
            ValueError: bad shapes, ``integration_timesteps``; ``cu_seqlens`` malformed, with
                a batch other than 1 or with ``lengths``; a cache of the wrong batch size.
        """
        x = merge_alias("x", x, "hidden_states", hidden_states)
        mask = self._check_forward_args(x, integration_timesteps, lengths, supports_timesteps=False)
        lengths = as_lengths(lengths, x.shape[0], x.shape[1], x.device)  # (B,) (a list, an int)
        check_input_dtype(x, self.in_proj.weight.dtype)
        Bsz, L, _ = x.shape
        cu = packed_offsets(cu_seqlens, lengths, Bsz, L, f"x {tuple(x.shape)} (1, T, H)")
        if inference_cache is not None:
            if cu is not None:
                check_packed_cache(inference_cache, cu.shape[0] - 1, "RGLRU")
            self._check_cache(inference_cache, Bsz if cu is None else cu.shape[0] - 1)
        if x.numel() == 0:  # no batch or no steps: empty output, the cache stays
            return self._empty_output(x)
        xin = x if mask is None else zero_where_not(x, mask[..., None])

        gate = self._gate(xin)
        u = self.in_proj(xin).transpose(1, 2)  # (B, D, L)
        history = h0 = None
        if inference_cache is not None:
            # copies: the ops may save them for backward, and the cache is overwritten below
            history = inference_cache["conv_state"].clone()
            h0 = inference_cache["lrnn_state"].clone()
        xc, window = causal_depthwise_conv(
            u, self.conv1d.weight, self.conv1d.bias, history, cu_seqlens=cu,
            keep_window=inference_cache is not None,
            backend=None if self.use_fast_path else "torch",
        )  # fmt: skip
        reset = None
        if self.reset_at_start and inference_cache is not None:  # only rows not started yet
            reset = self._first_step(Bsz, L, inference_cache["started"], x.device, cu)
        # (B, L, D) and the final states (B or S, D)
        h, final = self._scan(xc.transpose(1, 2), h0, mask, reset, cu)

        y = self.out_proj(gate * h.to(gate.dtype))
        if mask is not None:
            y = zero_where_not(y, mask[..., None])

        if inference_cache is not None:
            self._write_cache(inference_cache, window, final, mask, lengths, cu, L)
        return y.to(x.dtype)

    def _write_cache(
        self,
        cache: Dict[str, Any],
        window: Tensor,
        final: Tensor,
        mask: Tensor | None,
        lengths: Tensor | None,
        cu: Tensor | None,
        length: int,
    ) -> None:
        """Store a forward's final states: the last d_conv - 1 conv inputs and the recurrent
        state of each row (each packed sequence with ``cu``), at its own length."""
        K = self.d_conv
        # with their graph while autograd records (copy_ carries it; the forward read copies of
        # the cache's tensors): steps after a prefill then have the forward's gradients.
        # An empty packed sequence's tail is its own history: its row stays as it was
        cache["conv_state"].copy_(window_tail(window, K - 1, K - 1, lengths, cu_seqlens=cu))
        # padded positions carry the state unchanged, so it is each row's state at its end
        cache["lrnn_state"].copy_(final)
        with torch.no_grad():
            # a row has started once it took a valid step (a length-0 row has not)
            started = cache["started"]
            if cu is not None:
                started.logical_or_((cu[1:] > cu[:-1]).to(started.device))
            elif mask is None:
                started.fill_(True)
            else:
                started.logical_or_(mask[:, 0].to(started.device))
        steps = length if cu is None else packed_seqlen_offset(cu)
        cache["seqlen_offset"] = cache.get("seqlen_offset", 0) + steps

    def step(
        self,
        x: Tensor | None = None,
        inference_cache: Dict[str, Any] | None = None,
        *,
        hidden_states: Tensor | None = None,
        **kwargs,
    ) -> Tuple[Tensor, Dict[str, Any]]:
        """One timestep: x (B, 1, H) or (B, H) -> y of the same shape.

        The cache's ``conv_state`` and ``lrnn_state`` are updated in place, ``started`` becomes
        True and ``seqlen_offset`` advances by one; the cache is returned too.  With
        ``reset_at_start`` the rows not started yet take Griffin's reset step.  ``hidden_states`` is
        another name for ``x`` (that of the original lrnnx).  ``integration_timesteps`` raises a
        ValueError as in :meth:`forward` (no event-driven mode), other keyword arguments a
        TypeError.
        """
        self._refuse_timesteps(kwargs.pop("integration_timesteps", None))
        check_no_kwargs("RGLRU.step", kwargs)
        x = merge_alias("x", x, "hidden_states", hidden_states)
        xin = check_step_input(x, self.d_model)
        check_input_dtype(xin, self.in_proj.weight.dtype)
        Bsz = xin.shape[0]
        self._check_cache(inference_cache, Bsz)
        conv_state, state = inference_cache["conv_state"], inference_cache["lrnn_state"]

        gate = self._gate(xin)
        u = self.in_proj(xin)  # (B, D)
        window = torch.cat([conv_state.to(u.dtype), u[..., None]], dim=-1)  # (B, D, K)
        xc = (window * self.conv1d.weight[:, 0, :]).sum(-1)
        if self.conv1d.bias is not None:
            xc = xc + self.conv1d.bias
        with no_autocast(xin.device):
            xf = xc.to(_acc_dtype(self.Lambda.dtype))
            started = inference_cache["started"]
            reset = ~started if self.reset_at_start else None  # on the device: graph-capturable
            a_t, b_t = self._decay_and_input(xf, reset)
            # a copy: autograd keeps it for a_t's gradient, and the cache is overwritten below
            h = a_t * state.to(xf.dtype, copy=True) + b_t
        y = self.out_proj(gate * h.to(gate.dtype))

        # the new values into the cache's tensors; with autograd recording, copy_ carries the
        # graph, so it runs through the state from step to step (gradients equal the forward's)
        # while what autograd keeps are copies (above; cat made window), never overwritten
        conv_state.copy_(window[..., 1:])
        state.copy_(h)
        started.fill_(True)
        inference_cache["seqlen_offset"] = inference_cache.get("seqlen_offset", 0) + 1
        return y.to(x.dtype).reshape(x.shape), inference_cache

    def allocate_inference_cache(
        self,
        batch_size: int,
        max_seqlen: int = 1,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        **kwargs,
    ) -> Dict[str, Any]:
        """Zero states for ``batch_size`` sequences, on ``device`` (default: the parameters').

        Returns:
            ``"lrnn_state"`` (B, D_rnn) in float32 (float64 for a float64 model) whatever
            ``dtype``; ``"conv_state"`` (B, D_rnn, d_conv - 1), the last d_conv - 1 conv inputs,
            in ``dtype`` (default: the projection weights' dtype); ``"started"`` (B,) bool,
            False: whether each row has taken a step (the first one takes Griffin's reset when
            ``reset_at_start``); ``"seqlen_offset"`` 0.
            ``max_seqlen`` is unused: the state does not grow with the sequence.  Other keyword
            arguments raise a TypeError.
        """
        check_no_kwargs("RGLRU.allocate_inference_cache", kwargs)
        check_batch_size(batch_size)
        device = self.Lambda.device if device is None else device
        conv_dtype = self.in_proj.weight.dtype if dtype is None else dtype
        return {
            "lrnn_state": torch.zeros(
                batch_size, self.lru_width, device=device, dtype=_acc_dtype(self.Lambda.dtype)
            ),
            "conv_state": torch.zeros(
                batch_size, self.lru_width, self.d_conv - 1, device=device, dtype=conv_dtype
            ),
            "started": torch.zeros(batch_size, device=device, dtype=torch.bool),
            "seqlen_offset": 0,
        }
