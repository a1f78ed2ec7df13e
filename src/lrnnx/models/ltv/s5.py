"""Event-driven S5: S5 with per-event discretization (Event-SSM; Schöne et al., "Scalable
Event-by-event Processing of Neuromorphic Sensory Signals With Deep State-Space Models",
arXiv 2404.18508), built on S5 (Smith, Warrington, Linderman, ICLR 2023).

The continuous system of S5, in the eigenbasis V of HiPPO-N, is discretized anew for every
element k with the time dt_k elapsed since the previous one (``integration_timesteps``):

    Lambda, V = eig(HiPPO-N)      B_tilde = V^{-1} B      C_tilde = C V
    Delta = step_rescale * exp(log_step)                            (one learned step per state)
    zoh, bilinear, dirac:  (A_bar_k, gamma_bar_k) = rule(Lambda, Delta * dt_k)
    async (Event-SSM):     A_bar_k = exp(Lambda Delta dt_k),   gamma_bar = (exp(Lambda Delta) - 1) / Lambda
    h_k = A_bar_k * h_{k-1} + gamma_bar_k * (B_tilde u_k)
    y_k = Re(C_tilde h_k) + D * u_k                  (2 Re(.) with conj_sym: half of each pair)

``async`` lets the state decay over the whole elapsed time while each event's input is
integrated over the learned step alone (the event is a Dirac impulse, normalised as ZOH over
Delta), so dt_k = 1 for all k gives exactly the synchronous ZOH system.  The other rules treat
dt_k as a time-varying step.  Without ``integration_timesteps`` every dt_k is 1 and the model is
the (time-invariant) S5.  ``no_discretization`` learns log A_bar = Lambda per unit of time
directly (B unscaled): A_bar_k = exp(Lambda dt_k).

The recurrence over (B, L, P) complex states runs through :func:`lrnnx.ops.linear_scan` in
complex64 (complex128 for a float64 model), also under autocast.  The scan, the step, the
inference cache and their checks live in the private base :class:`_EventSSM`, which S7
(:mod:`lrnnx.models.ltv.s7`, S5 with input-dependent Delta, B, C, D) shares.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from lrnnx.core.checks import (
    check_batch_size,
    check_bool,
    check_dt_range,
    check_dtype_argument,
    check_inference_cache,
    check_no_kwargs,
    check_packed_cache,
    check_positive_float,
    check_positive_int,
    check_step_input,
    check_step_timesteps,
    merge_alias,
    packed_offsets,
    packed_seqlen_offset,
    zero_where_not,
)
from lrnnx.models.lti.s5 import MAX_REAL_EIG, hippo_n_init
from lrnnx.models.ltv.base import LTV_LRNN
from lrnnx.ops import linear_scan
from lrnnx.ops._dispatch import no_autocast

GammaBar = Union[Tensor, float]


def param_dtype(dtype: Optional[torch.dtype]) -> torch.dtype:
    """Real dtype of the recurrence's own parameters for a model built with ``dtype``: float64
    for float64, else float32 (16-bit dtypes too: the precision policy of whole-model casts,
    under which these tensors stay float32).  With no ``dtype``, torch's default dtype
    (float32 while a model is built under a 16-bit default, see
    :func:`lrnnx.core.base.LRNN._settle`).

    Raises:
        TypeError: ``dtype`` not a floating-point torch.dtype.
    """
    dtype = torch.get_default_dtype() if check_dtype_argument(dtype) is None else dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_step_size(dt_min: float, dt_max: float, step_rescale: float) -> None:
    """Validate the step-size initialisation range and the step rescale factor."""
    check_dt_range(dt_min, dt_max)
    check_positive_float("step_rescale", step_rescale)


def event_discretize(
    name: str,
    rule: Optional[Callable],
    Lambda: Tensor,
    step: Optional[Tensor],
    timesteps: Optional[Tensor],
) -> Tuple[Tensor, GammaBar]:
    """(A_bar, gamma_bar) for continuous eigenvalues and a step, with optional elapsed times.

    Args:
        name: the discretization's name; ``rule`` its function from
            :mod:`lrnnx.core.discretization` (unused for ``"no_discretization"``).
        Lambda: (P,) complex continuous eigenvalues (for ``no_discretization``: log A_bar per
            unit of time).
        step: the learned step Delta, broadcastable against Lambda ((P,) or (..., P)).
        timesteps: elapsed times dt_k shaped to broadcast against the state, e.g. (B, L, 1)
            or (B, 1); None means dt_k = 1 (synchronous).

    Returns:
        A_bar and gamma_bar, each broadcastable to the (..., P) state (gamma_bar may be 1.0).
    """
    if name == "no_discretization":
        return torch.exp(Lambda if timesteps is None else Lambda * timesteps), 1.0
    # async: decay over Delta * dt_k, input integrated over Delta (Event-SSM); the other rules:
    # the time-varying step Delta * dt_k for A_bar and gamma_bar
    return rule(Lambda, step, timesteps)


def check_cache(
    cache: Any,
    batch: int,
    n_state: int,
    owner: str = "S5",
    precision: torch.dtype = torch.float32,
) -> Tensor:
    """Return the cache's state after checking it fits a batch of ``batch`` sequences and holds
    at least the model's ``precision`` (see :func:`lrnnx.core.checks.check_inference_cache`)."""
    shapes = {"lrnn_state": (batch, n_state)}
    return check_inference_cache(
        cache, batch, ("lrnn_state",), owner, shapes=shapes, precision={"lrnn_state": precision}
    )["lrnn_state"]


def state_dtype(real: torch.dtype, dtype: Optional[torch.dtype]) -> torch.dtype:
    """Complex dtype of a cached state: complex64, or complex128 for float64 models/requests."""
    wide = real == torch.float64 or dtype in (torch.float64, torch.complex128)
    return torch.complex128 if wide else torch.complex64


def masked_scan(
    a: Tensor,
    b: Tensor,
    mask: Optional[Tensor],
    h0: Optional[Tensor],
    backend: Optional[str],
    cu_seqlens: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """h_k = a_k h_{k-1} + b_k over (B, L, P); padded positions (mask False) keep the state.

    Returns h (B, L, P) and the final state: (B, P) at step L - 1 (padding carries each
    sequence's state there), or with packed ``cu_seqlens`` (S + 1,) (then B = 1 and the state
    restarts at each sequence's first step, from ``h0`` (S, P)) each sequence's own, (S, P).
    """
    if mask is not None:
        valid = mask[..., None]
        a = torch.where(valid, a, torch.ones_like(a))  # broadcasts a (P,) to (B, L, P)
        b = torch.where(valid, b, torch.zeros_like(b))
    return linear_scan(
        a, b, initial_state=h0, backend=backend, output_final_state=True, cu_seqlens=cu_seqlens
    )


class _EventSSM(LTV_LRNN):
    """What event-driven S5 and S7 share: a diagonal complex state h (B, P) with

        (A_bar_k, gamma_bar_k) = event_discretize(Lambda, Delta_k, dt_k)
        h_k = A_bar_k * h_{k-1} + gamma_bar_k * (B_k u_k)
        y_k = out_scale * Re(C_k h_k) + D_k * u_k

    run by a masked scan in :meth:`forward` and in place in :meth:`step`.  Subclasses register
    a ``Lambda_im`` (P,) parameter (it gives the state size, the parameters' dtype and device)
    and define the hooks :meth:`_tensors`, :meth:`_step_size`, :meth:`_input` and
    :meth:`_output`.  Each hook takes ``p``: the live tensors of :meth:`_tensors` in
    :meth:`forward`, their detached copies (the inference cache) in :meth:`step`.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int,
        discretization: str,
        conj_sym: bool,
        use_fast_path: bool,
    ) -> None:
        if discretization is None:  # (LRNN takes None from models that discretize inside)
            raise ValueError(
                f"discretization: expected one of {list(self.allowed_discretizations)}, got None"
            )
        super().__init__(discretization)
        d_model = check_positive_int("d_model", d_model)
        d_state = check_positive_int("d_state", d_state)
        conj_sym = check_bool("conj_sym", conj_sym)
        use_fast_path = check_bool("use_fast_path", use_fast_path)
        self.d_model, self.d_state, self.conj_sym = d_model, d_state, conj_sym
        self.use_fast_path = use_fast_path
        self.out_scale = 2.0 if conj_sym else 1.0

    @property
    def n_state(self) -> int:
        """Number of complex states P (d_state, or d_state // 2 with conj_sym)."""
        return self.Lambda_im.shape[0]

    @property
    def _backend(self) -> Optional[str]:
        return None if self.use_fast_path else "torch"

    # ------------------------------------------------------------------------------------------
    # hooks: what S5 and S7 compute differently

    @abstractmethod
    def _tensors(self) -> Dict[str, Optional[Tensor]]:
        """The continuous system from the parameters (differentiable); "Lambda" (P,) and "D"."""

    @abstractmethod
    def _step_size(self, p: Dict[str, Any], u: Optional[Tensor]) -> Optional[Tensor]:
        """The step Delta, (P,) or (..., P) for inputs u (..., H); None without discretization."""

    @abstractmethod
    def _input(self, p: Dict[str, Any], u: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        """B_k u_k (..., P) complex for u (..., H); ``dtype`` is the state's in :meth:`step`."""

    @abstractmethod
    def _output(self, p: Dict[str, Any], h: Tensor, u: Tensor) -> Tensor:
        """out_scale * Re(C_k h_k) + D_k * u_k (..., H), in u's dtype."""

    def _step_discretize(
        self, cache: Dict[str, Any], u: Tensor, timesteps: Optional[Tensor]
    ) -> Tuple[Tensor, GammaBar]:
        """(A_bar, gamma_bar) of one step from the cache's constants."""
        return self._discretize(cache, u, timesteps)

    def _step_constants(self) -> Dict[str, Any]:
        """The constants :meth:`step` reads, from the parameters as they are (differentiable)."""
        constants = dict(self._tensors())
        self._extend_cache(constants)
        return constants

    def _extend_cache(self, cache: Dict[str, Any]) -> None:
        """Add the constants derived from the model's tensors to :meth:`_step_constants`."""

    # ------------------------------------------------------------------------------------------

    def _timesteps(self, integration_timesteps: Optional[Tensor]) -> Optional[Tensor]:
        """(B, L) elapsed times -> (B, L, 1) in the parameters' dtype, to broadcast on (B, L, P)."""
        if integration_timesteps is None:
            return None
        return integration_timesteps.to(self.Lambda_im.dtype)[..., None]

    def _discretize(
        self, p: Dict[str, Any], u: Optional[Tensor], timesteps: Optional[Tensor]
    ) -> Tuple[Tensor, GammaBar]:
        step = self._step_size(p, u)
        return event_discretize(
            self.discretization, self.discretize_fn, p["Lambda"], step, timesteps
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
        """x (B, L, H) -> y (B, L, H), in x's dtype.

        Args:
            x: input sequence (B, L, d_model); ``hidden_states`` is another name for it (that
                of the original lrnnx's S7).
            integration_timesteps: (B, L) time elapsed before each element (>= 0), for event
                streams; None means 1 everywhere (for S5: the synchronous S5).
            lengths: (B,) valid lengths; outputs past them are zero, padded inputs never reach
                valid outputs, and each sequence's final state is its state at its own length.
            inference_cache: from :meth:`allocate_inference_cache`; the scan starts from its
                ``"lrnn_state"`` and the final states are written back (``seqlen_offset``
                advances by L), so :meth:`step` continues the sequence.
            cu_seqlens: packed sequences (fla's convention): int32/int64 offsets (S + 1,) into the
                T steps of x (1, T, H) and of ``integration_timesteps`` (1, T), 0 first and T
                last (repeated offsets: zero-length sequences).  The result equals running each
                sequence alone (outputs, gradients, states): the state restarts at each
                sequence's first event, whose elapsed time is the one given at that position
                (it only matters for a cached initial state, as when run alone).  A cache then
                holds one state per sequence (batch size S) and ``seqlen_offset`` advances by
                the longest length.  ValueError for ``lengths`` with it, a batch other than 1
                or bad offsets.
        """
        x = merge_alias("x", x, "hidden_states", hidden_states)
        mask = self._check_forward_args(x, integration_timesteps, lengths)
        cu = packed_offsets(
            cu_seqlens, lengths, x.shape[0], x.shape[1], f"x {tuple(x.shape)} = (1, T, H)"
        )
        h0 = None
        if inference_cache is not None:
            h0 = self._cached_state(inference_cache, x.shape[0], cu)
        if x.numel() == 0:  # no batch or no steps: empty output, the cache stays
            return self._empty_output(x)
        if mask is not None:  # a select: padding may hold anything, NaN included
            x = zero_where_not(x, mask[..., None])
            if integration_timesteps is not None:
                integration_timesteps = zero_where_not(integration_timesteps, mask)
        with no_autocast(x.device):
            u = x.to(self.Lambda_im.dtype)
            ts = self._timesteps(integration_timesteps)
            p = self._tensors()
            A_bar, gamma_bar = self._discretize(p, u, ts)
            Bu = self._input(p, u)  # (B, L, P)
            h0c = None if h0 is None else h0.to(Bu.dtype, copy=True)
            h, final = masked_scan(A_bar, gamma_bar * Bu, mask, h0c, self._backend, cu)
            y = self._output(p, h, u)
            if mask is not None:
                y = zero_where_not(y, mask[..., None])
        if inference_cache is not None:
            # padded steps carry the state unchanged, so the final state is each length's
            h0.copy_(final)
            advance = x.shape[1] if cu is None else packed_seqlen_offset(cu)
            inference_cache["seqlen_offset"] = inference_cache.get("seqlen_offset", 0) + advance
        return y.to(x.dtype)

    def _cached_state(self, cache: Dict[str, Any], batch: int, cu: Optional[Tensor]) -> Tensor:
        """The validated state of a cache: (B, P), or (S, P), one per sequence, when packed.

        The cache's own tensor: the forward writes the final state into it in place (the scan
        reads a copy, so a forward under autograd keeps a graph that this write cannot break)."""
        owner = type(self).__name__
        if cu is None:
            return check_cache(cache, batch, self.n_state, owner, self._precision)
        check_packed_cache(cache, cu.shape[0] - 1, owner)
        return check_cache(cache, cu.shape[0] - 1, self.n_state, owner, self._precision)

    def step(
        self,
        x: Optional[Tensor] = None,
        inference_cache: Optional[Dict[str, Any]] = None,
        integration_timesteps: Optional[Union[Tensor, float]] = None,
        *,
        hidden_states: Optional[Tensor] = None,
        **kwargs: Any,
    ) -> Tuple[Tensor, Dict[str, Any]]:
        """One element: x (B, 1, H) or (B, H) -> y of the same shape.

        Args:
            x: the input at this step (``hidden_states``: another name for it, that of the
                original lrnnx's S7).
            inference_cache: from :meth:`allocate_inference_cache` (or a forward that filled
                it); its state is updated in place and ``seqlen_offset`` advances by one.
            integration_timesteps: time elapsed since the previous element, (B,) or (B, 1)
                (or a number); None means 1, as in :meth:`forward`.

            **kwargs: the base class's interface; any key raises a TypeError.

        Returns:
            (y, inference_cache).
        """
        check_no_kwargs(f"{type(self).__name__}.step", kwargs)
        x = merge_alias("x", x, "hidden_states", hidden_states)
        u_in = check_step_input(x, self.d_model)
        Bsz = u_in.shape[0]
        h = check_cache(inference_cache, Bsz, self.n_state, type(self).__name__, self._precision)
        real = inference_cache["D"].dtype
        ts = check_step_timesteps(integration_timesteps, Bsz, real, h.device)
        # while autograd records (a parameter requires grad), the constants come from the
        # parameters and the state is computed out of place, then written back (copy_ carries
        # the graph): a stepped sequence has the forward's gradients; else the cache's copies
        # and an in-place update
        graph = self._step_records_graph()
        consts = inference_cache
        if graph:
            consts = {**inference_cache, **self._step_constants()}
        with no_autocast(u_in.device):
            u = u_in.to(real)
            A_bar, gamma_bar = self._step_discretize(consts, u, ts)
            Bu = self._input(consts, u, h.dtype)
            if graph:
                h_new = A_bar * h.clone() + gamma_bar * Bu
                h.copy_(h_new)
            else:
                h_new = h.mul_(A_bar).add_(gamma_bar * Bu)
            y = self._output(consts, h_new, u)
        inference_cache["seqlen_offset"] = inference_cache.get("seqlen_offset", 0) + 1
        return y.to(x.dtype).reshape(x.shape), inference_cache

    def allocate_inference_cache(
        self,
        batch_size: int,
        max_seqlen: int = 1,
        dtype: Optional[torch.dtype] = None,
        device: Optional[Union[torch.device, str]] = None,
        **kwargs,
    ) -> Dict[str, Any]:
        """Zero state plus detached copies of the model's constants (its class lists them), on
        ``device`` (default: the parameters' device).

        Returns:
            ``"lrnn_state"`` (B, P) complex64 (complex128 for a float64 model or
            ``dtype=torch.float64``), ``"seqlen_offset"`` 0, and the constants that
            :meth:`step` reads.  ``max_seqlen`` is unused: the state does not grow.  Other
            keyword arguments raise a TypeError.
        """
        check_no_kwargs(f"{type(self).__name__}.allocate_inference_cache", kwargs)
        check_batch_size(batch_size)
        with torch.no_grad():  # inference constants, not graph nodes
            # copies, never the parameters themselves: the cache is a snapshot of the model,
            # which an optimizer step or load_state_dict after the allocation must not half-update
            cache = {
                k: (v.detach().clone() if isinstance(v, Tensor) else v)
                for k, v in self._step_constants().items()
            }
        cdtype = state_dtype(self.Lambda_im.dtype, dtype)
        cache["lrnn_state"] = torch.zeros(
            batch_size, self.n_state, dtype=cdtype, device=self.Lambda_im.device
        )
        cache["seqlen_offset"] = 0
        if device is not None:
            cache = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in cache.items()}
        return cache


class S5(_EventSSM):
    """Event-driven S5 (Event-SSM): S5 discretized per element with the elapsed time.

    Example:
        >>> model = S5(d_model=64, d_state=64, discretization="async")
        >>> x, dt = torch.randn(2, 128, 64), torch.rand(2, 128)
        >>> y = model(x, integration_timesteps=dt)  # (B, L, H) -> (B, L, H)

    Args:
        d_model: model width H (input and output features).
        d_state: state size of the HiPPO-N initialisation (P in the paper; with ``conj_sym``
            the model keeps d_state // 2 complex states, one per conjugate pair).
        discretization: ``"zoh"``, ``"bilinear"``, ``"dirac"``, ``"async"``,
            ``"simplified_zoh"`` or ``"no_discretization"`` (see the module docstring and
            :mod:`lrnnx.core.discretization`).
        conj_sym: keep one eigenvalue of each conjugate pair and output 2 Re(C h).
        dt_min, dt_max: the learned steps Delta are initialised log-uniform in [dt_min, dt_max].
        step_rescale: factor multiplying every step Delta (S5 / Event-SSM convention, e.g. to
            run a trained model at another sampling rate).  ``no_discretization`` uses it only
            for its initial value, the ZOH image of HiPPO-N with the rescaled steps.
        use_fast_path: if True, :func:`lrnnx.ops.linear_scan` dispatches to the fastest fused
            scan backend available for the device; if False, the portable pure-torch scan is
            used.  Both give the same result up to rounding.
        device, dtype: factory arguments for the parameters (float32 or float64).

    The inference cache of :meth:`allocate_inference_cache` holds, besides ``"lrnn_state"``
    and ``"seqlen_offset"``, detached ``"Lambda"``, ``"step"``, ``"B_tilde"``, ``"C_tilde"``,
    ``"D"``, ``"A_bar"`` and ``"gamma_bar"`` (the dt = 1 system, used by steps without
    ``integration_timesteps``).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int,
        discretization: str = "zoh",
        conj_sym: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        step_rescale: float = 1.0,
        use_fast_path: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(d_model, d_state, discretization, conj_sym, use_fast_path)
        check_step_size(dt_min, dt_max, step_rescale)
        real = param_dtype(dtype)
        self.step_rescale = float(step_rescale)
        self.dt_min, self.dt_max = float(dt_min), float(dt_max)
        #: the bound on Re(Lambda): Lambda_re above it is clamped (and gets no gradient)
        self.max_real = MAX_REAL_EIG
        if discretization == "no_discretization":  # scaled with the steps, as Lambda is
            self.max_real = MAX_REAL_EIG * dt_min * self.step_rescale
        self._init_parameters(device=device, dtype=real)

    def _init_parameters(self, **factory: Any) -> None:
        """HiPPO-N's spectrum and eigenbasis (:func:`hippo_n_init`): Lambda (P,), B_tilde
        (P, H) and C_tilde (H, P) as (real, imag), D (H,), log_step (P,) log-uniform in
        [dt_min, dt_max]; ``factory``: the device and dtype of a construction."""
        init = hippo_n_init(self.d_model, self.d_state, self.conj_sym, self.dt_min, self.dt_max)
        if self.discretization == "no_discretization":
            # learn log A_bar (per unit of time) directly, starting at the ZOH image of HiPPO-N
            step = init.pop("log_step").exp() * self.step_rescale  # (see the LTI S5)
            init["Lambda_re"] = init["Lambda_re"].to(step.device) * step
            init["Lambda_im"] = init["Lambda_im"].to(step.device) * step
        for name in ("Lambda_re", "Lambda_im", "B", "C", "D", "log_step"):
            if name in init:
                self._set_parameter(name, init[name].to(**factory))

    def _tensors(self) -> Dict[str, Optional[Tensor]]:
        """The continuous system: Lambda (P,), step Delta (P,) or None, B_tilde (P, H), C (H, P), D."""
        # Re(Lambda) < 0 is kept so every rule gives |A_bar| < 1 for dt_k > 0
        Lambda = torch.complex(self.Lambda_re.clamp(max=self.max_real), self.Lambda_im)
        step = None
        if self.discretization != "no_discretization":
            step = self.step_rescale * torch.exp(self.log_step)
        return {
            "Lambda": Lambda,
            "step": step,
            "B_tilde": torch.view_as_complex(self.B),
            "C_tilde": torch.view_as_complex(self.C),
            "D": self.D,
        }

    def _step_size(self, p: Dict[str, Any], u: Optional[Tensor]) -> Optional[Tensor]:
        return p["step"]  # one learned step per state, the same for every input

    def _input(self, p: Dict[str, Any], u: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
        B_tilde = p["B_tilde"] if dtype is None else p["B_tilde"].to(dtype)
        return u.to(B_tilde.dtype) @ B_tilde.transpose(0, 1)

    def _output(self, p: Dict[str, Any], h: Tensor, u: Tensor) -> Tensor:
        y = self.out_scale * (h @ p["C_tilde"].to(h.dtype).transpose(0, 1)).real
        return y.to(u.dtype) + p["D"] * u

    def _step_discretize(
        self, cache: Dict[str, Any], u: Tensor, timesteps: Optional[Tensor]
    ) -> Tuple[Tensor, GammaBar]:
        if timesteps is None:  # the dt = 1 system does not depend on the input: precomputed
            return cache["A_bar"], cache["gamma_bar"]
        return self._discretize(cache, u, timesteps)

    def _extend_cache(self, cache: Dict[str, Any]) -> None:
        cache["A_bar"], cache["gamma_bar"] = self._discretize(cache, None, None)

    def discretize(
        self, integration_timesteps: Optional[Tensor] = None
    ) -> Tuple[Tensor, GammaBar, Tensor]:
        """The discrete system.

        Args:
            integration_timesteps: optional (B, L) elapsed times.

        Returns:
            A_bar ((P,), or (B, L, P) with timesteps), gamma_bar ((P,), (B, L, P) or 1.0) and
            C_tilde (H, P) complex.
        """
        p = self._tensors()
        A_bar, gamma_bar = self._discretize(p, None, self._timesteps(integration_timesteps))
        return A_bar, gamma_bar, p["C_tilde"]
