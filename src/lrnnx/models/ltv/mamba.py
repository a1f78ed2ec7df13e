"""Mamba: the selective state space (S6) block (Gu & Dao, arXiv 2312.00752), with an event mode
for irregularly timed inputs (STREAM, arXiv 2411.12603; Event-SSM, arXiv 2404.18508).

For x (B, L, H), with E = expand * H inner channels and N states per channel:

    [x', z] = in_proj(x)                                  (B, L, 2E)
    u       = SiLU(causal depthwise conv_{d_conv}(x'))      (B, L, E)
    [dt, B_t, C_t] = x_proj(u)                            dt: rank R, B_t, C_t: (N,)
    delta   = softplus(dt_proj(dt))                        (B, L, E), dt_proj's bias inside
    A       = -exp(A_log)                                  (E, N), S4D-real init A[:, n] = -(n + 1)
    h_t     = A_bar_t * h_{t-1} + gamma_bar_t * B_t * u_t   (per channel, per state)
    y_t     = (C_t . h_t + D * u_t) * SiLU(z_t);   out = out_proj(y)

``discretization`` picks (A_bar, gamma_bar): ``"mamba"`` (exp(delta A), delta: the paper's
simplified ZOH), ``"zoh"``, ``"bilinear"`` or ``"dirac"``.

Event mode: ``integration_timesteps`` dt_k (B, L) >= 0 is the time elapsed since the previous
element.  The state decays over that time, A_bar = rule(A, delta * dt_k), while the input is
integrated with the learned step delta; dt_k = 1 everywhere gives the synchronous model.  (Under
"bilinear" a very long gap gives A_bar near -1, not 0: see :mod:`lrnnx.core.discretization`.
The depthwise convolution before the scan mixes the last d_conv inputs whatever their times.)

Packed sequences: ``forward(x, cu_seqlens=...)`` with x (1, T, H) holding S sequences back to
back (fla's / flash-attn's offsets (S + 1,)): the conv windows and the scan restart at every
sequence start, so each sequence's output (and gradient) equals running it alone.  With an
inference cache of S rows this is a varlen prefill (as mamba_ssm's): row s starts from its
state and receives sequence s's conv and SSM states.

Parameter names and shapes match mamba_ssm's ``Mamba`` module, so its checkpoints load as they are.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrnnx.core.checks import (
    as_lengths,
    check_batch_size,
    check_bool,
    check_dt_range,
    check_dtype_argument,
    check_inference_cache,
    check_input_dtype,
    check_no_kwargs,
    check_positive_float,
    check_positive_int,
    check_step_input,
    check_step_timesteps,
    merge_alias,
    packed_offsets,
    zero_where_not,
)
from lrnnx.core.conv import causal_depthwise_conv, window_tail
from lrnnx.layers.linear import Linear, dt_projection
from lrnnx.models.ltv.base import LTV_LRNN
from lrnnx.ops import selective_scan_fn
from lrnnx.ops.linear import linear
from lrnnx.ops.selective_scan import DISCRETIZATIONS, discretize


class Mamba(LTV_LRNN):
    """The Mamba (S6) block.

    Example:
        >>> model = Mamba(d_model=64, d_state=16)
        >>> x = torch.randn(2, 128, 64)
        >>> y = model(x)                                             # (B, L, H) -> (B, L, H)
        >>> y = model(x, integration_timesteps=torch.rand(2, 128))   # event mode

    Args:
        d_model: model width H.
        d_state: states per inner channel N.
        d_conv: width of the causal depthwise convolution.
        expand: inner width E = expand * d_model.
        dt_rank: rank R of the step projection; ``"auto"`` is ceil(d_model / 16).
        dt_min, dt_max: the initial steps softplus(dt_proj.bias) are log-uniform in this range.
        dt_init: ``"random"`` (uniform +-dt_rank^-0.5 * dt_scale) or ``"constant"`` dt_proj weights.
        dt_scale: scale of the dt_proj weight init.
        dt_init_floor: lower clamp of the initial steps.
        conv_bias: bias in the depthwise convolution.
        bias: bias in in_proj and out_proj.
        use_fast_path: run the selective scan and the causal convolution on the fastest
            backend for the device (fused CPU or GPU kernels); False pins their plain torch
            backends (chunked scan, ``F.conv1d``), which torch.compile traces into one graph.
        layer_idx: position in a stack (kept for caches keyed by layer).
        device, dtype: factory arguments for the parameters.
        discretization: ``"mamba"``, ``"zoh"``, ``"bilinear"`` or ``"dirac"``.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: Union[int, str] = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,
        layer_idx: Optional[int] = None,
        device=None,
        dtype=None,
        discretization: str = "mamba",
    ):
        super().__init__(discretization=None)
        if discretization not in DISCRETIZATIONS:
            raise ValueError(
                f"discretization: expected one of {list(DISCRETIZATIONS)}, got {discretization!r}"
            )
        if dt_init not in ("random", "constant"):
            raise ValueError(f"dt_init: expected 'random' or 'constant', got {dt_init!r}")
        d_model = check_positive_int("d_model", d_model)
        d_state = check_positive_int("d_state", d_state)
        d_conv = check_positive_int("d_conv", d_conv)
        check_positive_float("expand", expand)
        if int(expand * d_model) < 1:
            raise ValueError(
                f"expand: the inner width int(expand * d_model) must be >= 1, got expand={expand!r} "
                f"with d_model={d_model}"
            )
        if dt_rank != "auto":
            dt_rank = check_positive_int("dt_rank", dt_rank)
        dt_min, dt_max = check_dt_range(dt_min, dt_max)
        dt_scale = check_positive_float("dt_scale", dt_scale, allow_zero=True)
        dt_init_floor = check_positive_float("dt_init_floor", dt_init_floor)
        for name, flag in (
            ("conv_bias", conv_bias),
            ("bias", bias),
            ("use_fast_path", use_fast_path),
        ):
            check_bool(name, flag)
        check_dtype_argument(dtype)
        self.discretization = discretization
        fk = {"device": device, "dtype": dtype}
        # the recurrence's own tensors (A_log, D): float64 for a float64 model, else float32
        # (the precision policy of whole-model casts)
        own = torch.float64 if dtype == torch.float64 else torch.float32
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = E = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_fast_path, self.layer_idx = use_fast_path, layer_idx

        self.in_proj = Linear(d_model, 2 * E, bias=bias, **fk)
        self.conv1d = nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1, bias=conv_bias, **fk)
        self.x_proj = Linear(E, self.dt_rank + 2 * d_state, bias=False, **fk)
        self.dt_proj = Linear(self.dt_rank, E, bias=True, **fk)
        self.out_proj = Linear(E, d_model, bias=bias, **fk)

        self.dt_proj.init_fn = functools.partial(
            dt_projection,
            dt_min=dt_min,
            dt_max=dt_max,
            dt_init=dt_init,
            dt_scale=dt_scale,
            dt_init_floor=dt_init_floor,
        )
        self.dt_proj.reset_parameters()
        self.dt_proj.bias._no_reinit = True
        self._init_parameters(device, own)
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True

    def _init_parameters(self, device=None, dtype: Optional[torch.dtype] = None) -> None:
        """A_log (E, N) of S4D-real's A[:, n] = -(n + 1) and D (E,) = 1 (``dtype``: float32
        under 16-bit module dtypes, the precision policy of the recurrence's own tensors)."""
        dtype = torch.get_default_dtype() if dtype is None else dtype  # (a reset: the model's)
        A = torch.arange(1, self.d_state + 1, dtype=dtype, device=device).repeat(self.d_inner, 1)
        self._set_parameter("A_log", torch.log(A))
        self._set_parameter("D", torch.ones(self.d_inner, device=device, dtype=dtype))

    @property
    def _backend(self) -> Optional[str]:
        """The ops' backend: None (lrnnx's choice) on the fast path, else ``"torch"``."""
        return None if self.use_fast_path else "torch"

    @property
    def _acc_dtype(self) -> torch.dtype:
        """The recurrence's dtype: float32, or float64 for a float64 model."""
        return torch.promote_types(self.A_log.dtype, torch.float32)

    def _ssm_params(self, u: Tensor, raw: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
        """delta (..., E), B_t (..., N), C_t (..., N) from conv features u (..., E), in the
        recurrence's dtype (float32 at least).  ``raw``: delta before dt_proj's bias and the
        softplus, which the scan then applies itself (``delta_bias``, ``delta_softplus``)."""
        acc = self._acc_dtype
        dt, Bt, Ct = torch.split(self.x_proj(u), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        # dt (..., R) @ W^T (R, E) with W^T made row-major: torch's mm backward keeps each
        # gradient in its operand's layout, so dW^T is then formed as dt^T @ g ((R, N) @ (N, E))
        # rather than F.linear's g^T @ dt ((E, N) @ (N, R)), whose R-wide output ran 3-6x
        # slower on the 2-core AMD EPYC (0.73 ms against 0.12 at N = 4352, E = 128, R = 4)
        delta = torch.matmul(dt, self.dt_proj.weight.t().contiguous()).to(acc)
        if not raw:
            delta = F.softplus(delta + self.dt_proj.bias.to(acc))
        return delta, Bt.to(acc), Ct.to(acc)

    def _in_proj_halves(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """x' and z of in_proj (B, L, H) -> (B, L, E) each, as two products with the weight's
        halves: each is contiguous, and their gradients reach the weight and x without the
        (B, L, 2E) concatenation that chunk's backward makes (~1 ms of a 33 ms training step
        of the 2-layer d_model 64 LM at B=64 L=68 on 2 CPU cores)."""
        E, w, b = self.d_inner, self.in_proj.weight, self.in_proj.bias
        return (
            linear(x, w[:E], None if b is None else b[:E]),
            linear(x, w[E:], None if b is None else b[E:]),
        )

    def _check_cache(self, cache: Any, batch: int) -> Dict[str, Any]:
        E, K, N = self.d_inner, self.d_conv, self.d_state
        return check_inference_cache(
            cache,
            batch,
            ("conv_state", "lrnn_state"),
            "Mamba",
            batch_keys=("conv_state", "lrnn_state"),
            shapes={"conv_state": (batch, E, K), "lrnn_state": (batch, E, N)},
            precision={"lrnn_state": self._acc_dtype},
        )

    def forward(
        self,
        x: Optional[Tensor] = None,
        integration_timesteps: Optional[Tensor] = None,
        lengths: Optional[Tensor] = None,
        inference_cache: Optional[Dict[str, Any]] = None,
        *,
        hidden_states: Optional[Tensor] = None,
        cu_seqlens: Optional[Tensor] = None,
    ) -> Tensor:
        """(B, L, H) -> (B, L, H); see the module docstring for the event mode and the cache.

        Args:
            x: input (B, L, H); (1, T, H) with ``cu_seqlens``.  ``hidden_states``: another
                name of ``x`` (that of the original lrnnx and mamba_ssm).
            integration_timesteps: (B, L) (or (1, T)) time since the previous element, >= 0.
            lengths: (B,) valid lengths of a padded batch; outputs past them are 0 and the
                cache receives each sequence's state at its own length.
            inference_cache: from :meth:`allocate_inference_cache` (batch B, or S with
                ``cu_seqlens``); the forward starts from its states and writes the final ones
                back (``seqlen_offset`` advances by L, or by the longest packed sequence).
            cu_seqlens: int32/int64 offsets (S + 1,) of S sequences packed along time (0 first, T
                last, repeats are empty sequences): the result equals running each alone.

        Raises:
            ValueError: ``cu_seqlens`` malformed, with a batch other than 1, or together with
                ``lengths``; a cache of the wrong size.
        """
        x = merge_alias("x", x, "hidden_states", hidden_states)
        mask = self._check_forward_args(x, integration_timesteps, lengths)
        lengths = as_lengths(lengths, x.shape[0], x.shape[1], x.device)  # (B,) (a list, an int)
        check_input_dtype(x, self.in_proj.weight.dtype)
        cu = packed_offsets(
            cu_seqlens, lengths, x.shape[0], x.shape[1], f"x {tuple(x.shape)} (1, T, H)"
        )
        cache = inference_cache
        if cache is not None:
            self._check_cache(cache, x.shape[0] if cu is None else cu.shape[0] - 1)
        if x.numel() == 0:  # no batch or no steps: empty output, the cache stays
            return self._empty_output(x)
        if mask is not None:  # a select, not a product: padding may hold NaN
            x = zero_where_not(x, mask[..., None])
        xi, z = self._in_proj_halves(x)  # (B, L, E) each
        xi = xi.transpose(1, 2)  # (B, E, L)
        if mask is not None:
            xi = zero_where_not(xi, mask[:, None, :])  # padding must not reach the conv state
        # (a copy: the cache's tensor is overwritten in place at the end, see initial_state)
        history = None if cache is None else cache["conv_state"][..., 1:].clone()
        u, window = causal_depthwise_conv(  # silu(conv(xi)) (B, E, L)
            xi, self.conv1d.weight, self.conv1d.bias, history, cu_seqlens=cu,
            activation="silu", keep_window=cache is not None, backend=self._backend,
        )  # fmt: skip
        # the scan adds dt_proj's bias and takes the softplus itself (fused, as mamba_ssm's
        # kernels do) unless delta is needed after them: scaled by the timesteps, or zeroed
        fused_dt = integration_timesteps is None and mask is None
        delta, Bt, Ct = self._ssm_params(u.transpose(1, 2), raw=fused_dt)
        delta = delta.transpose(1, 2)  # (B, E, L)
        deltaA = None
        if integration_timesteps is not None:
            ts = integration_timesteps
            if mask is not None:  # a select first: padding's NaN times a zero gradient is NaN
                ts = zero_where_not(ts, mask)
            deltaA = delta * ts[:, None, :].to(delta.dtype)
        u_scan = u
        if mask is not None:
            # on padding: no input and a zero step, so A_bar = 1 and the state is carried as is
            m = mask[:, None, :]
            delta, u_scan = zero_where_not(delta, m), zero_where_not(u, m)
            deltaA = None if deltaA is None else zero_where_not(deltaA, m)
        acc = self._acc_dtype
        y, last = selective_scan_fn(
            u_scan,
            delta,
            -torch.exp(self.A_log.to(acc)),
            Bt.transpose(1, 2),
            Ct.transpose(1, 2),
            self.D.to(acc),
            z=z.transpose(1, 2),
            delta_bias=self.dt_proj.bias.to(acc) if fused_dt else None,
            delta_softplus=fused_dt,
            return_last_state=True,
            discretization=self.discretization,
            deltaA=deltaA,
            # a copy: the final state is written into the cache's tensor in place, which must
            # not change a value the scan keeps for its backward
            initial_state=None if cache is None else cache["lrnn_state"].clone(),
            backend=self._backend,
            cu_seqlens=cu,
        )
        out = self.out_proj(y.transpose(1, 2).to(x.dtype))
        if mask is not None:
            out = zero_where_not(out, mask[..., None])
        if cache is not None:
            self._write_cache(cache, last, window, lengths, cu, x.shape[1])
        return out

    def _write_cache(
        self,
        cache: Dict[str, Any],
        last: Tensor,
        window: Tensor,
        lengths: Optional[Tensor],
        cu: Optional[Tensor],
        length: int,
    ) -> None:
        """Store the final states of a forward: the SSM state and the last d_conv conv inputs
        of every sequence (at its own length; per packed sequence with ``cu``)."""
        K = self.d_conv
        tail = window_tail(window, K, K - 1, lengths, cu_seqlens=cu)
        if cu is not None:
            # an empty sequence leaves its row as it was, as a forward of no steps does
            # (window_tail zeroes the oldest entry, which lies before its window)
            empty = (cu[1:] == cu[:-1]).to(tail.device)[:, None, None]
            tail = torch.where(empty, cache["conv_state"].to(tail.dtype), tail)
        # with their graph while autograd records (copy_ carries it; the forward read copies of
        # the cache's tensors): steps after a prefill then have the forward's gradients
        cache["lrnn_state"].copy_(last)
        cache["conv_state"].copy_(tail)
        # packed: every row advanced by its own length; the longest is what a padded batch of
        # the same sequences would add
        steps = length if cu is None else int((cu[1:] - cu[:-1]).max())
        cache["seqlen_offset"] = cache.get("seqlen_offset", 0) + steps

    def step(
        self,
        x: Tensor,
        inference_cache: Dict[str, Any],
        integration_timesteps: Optional[Tensor] = None,
        **kwargs,
    ) -> Tuple[Tensor, Dict[str, Any]]:
        """One timestep: x (B, 1, H) or (B, H) -> y of the same shape.

        ``integration_timesteps`` (B,), (B, 1) or a number: time elapsed since the previous element.
        Other keyword arguments raise a TypeError (``**kwargs`` is the base class's interface).
        """
        check_no_kwargs("Mamba.step", kwargs)
        x2 = check_step_input(x, self.d_model)
        check_input_dtype(x2, self.in_proj.weight.dtype)
        Bsz = x2.shape[0]
        cache = self._check_cache(inference_cache, Bsz)
        conv_state, h = cache["conv_state"], cache["lrnn_state"]
        acc = h.dtype  # float32, or float64 for a float64 model
        xi, z = self.in_proj(x2).chunk(2, dim=-1)  # (B, E) each
        # with autograd recording, the step computes from copies of the cache's tensors and
        # writes the new values back at the end: the graph then runs through the state from
        # step to step (gradients equal the forward's), and nothing autograd keeps is
        # overwritten in place by the next step; without it, the state advances in place
        graph = torch.is_grad_enabled()
        if graph:
            window = torch.cat([conv_state[..., 1:], xi.to(conv_state.dtype)[..., None]], -1)
            h_prev = h.clone()
        else:
            window = conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
            window[..., -1] = xi.to(conv_state.dtype)
        conv = (window * self.conv1d.weight[:, 0, :]).sum(-1)
        if self.conv1d.bias is not None:
            conv = conv + self.conv1d.bias
        u = F.silu(conv).to(self.conv1d.weight.dtype)  # (a wider cache computes it wider)
        delta, Bt, Ct = self._ssm_params(u)  # (B, E), (B, N), (B, N)
        deltaA = None
        ts = check_step_timesteps(integration_timesteps, Bsz, acc, x2.device)  # (B, 1)
        if ts is not None:
            deltaA = (delta * ts)[..., None]
        delta, Bt, Ct = delta.to(acc), Bt.to(acc), Ct.to(acc)
        A = -torch.exp(self.A_log.to(acc))
        A_bar, gamma_bar = discretize(A, delta[..., None], deltaA, self.discretization)
        uf = u.to(acc)
        # h = A_bar h + (gamma_bar u) B_t in place, and y = C_t . h as a batched matrix-vector
        # product: no (B, E, N) temporaries beside the state (at B = 32, E = 512, N = 16: 1 MB each)
        if graph:
            h_new = torch.addcmul(A_bar * h_prev, gamma_bar * uf[..., None], Bt[:, None, :])
        else:
            h_new = h.mul_(A_bar).addcmul_(gamma_bar * uf[..., None], Bt[:, None, :])
        y = torch.matmul(h_new, Ct[:, :, None])[..., 0]
        y = torch.addcmul(y, self.D.to(acc), uf) * F.silu(z.to(acc))
        out = self.out_proj(y.to(x2.dtype))
        if graph:  # the new values into the cache's tensors (copy_ carries the graph)
            conv_state.copy_(window)
            h.copy_(h_new)
        cache["seqlen_offset"] = cache.get("seqlen_offset", 0) + 1
        return out.reshape(x.shape), cache

    def allocate_inference_cache(
        self,
        batch_size: int,
        max_seqlen: int = 1,
        dtype: Optional[torch.dtype] = None,
        device: Optional[Union[torch.device, str]] = None,
        **kwargs,
    ) -> Dict[str, Any]:
        """``"conv_state"`` (B, E, d_conv): the last d_conv conv inputs; ``"lrnn_state"``
        (B, E, N) float32 (float64 for a float64 model); ``"seqlen_offset"``.  ``device``: where
        the cache is allocated (default: the parameters' device).  Other keyword arguments raise
        a TypeError."""
        check_no_kwargs("Mamba.allocate_inference_cache", kwargs)
        check_batch_size(batch_size)
        w = self.conv1d.weight
        device = w.device if device is None else device
        return {
            "conv_state": torch.zeros(
                batch_size, self.d_inner, self.d_conv, device=device, dtype=dtype or w.dtype
            ),
            "lrnn_state": torch.zeros(
                batch_size, self.d_inner, self.d_state, device=device, dtype=self._acc_dtype
            ),
            "seqlen_offset": 0,
        }
