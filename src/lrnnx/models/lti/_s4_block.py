"""Machinery shared by S4 (:mod:`lrnnx.models.lti.s4`) and S4D (:mod:`lrnnx.models.lti.s4d`).

Both models are the block of the state-spaces/s4 code base around a convolution kernel:

    (gate branch)   v = W_g x                                   (if ``gate``; width H' * gate)
    (bottleneck)    u = W_in x                                  (if ``bottleneck``; H' = H // bottleneck)
    (SSM)           y[c] = K[c] * u + D[c] u,  c = 1..channels  (causal convolution per feature)
                    y = GELU(dropout(y))                        (C * H' features)
    (gate)          y = (W_og y) * v                            (if ``gate``, as in GSS)
    (output)        y = final_act(W_out dropout(y))             (if ``final_act`` is not None)

where the kernel K_l = C dA^l dB (l = 0..L-1) of the discretised SSM x_t = dA x_{t-1} + dB u_t,
y_t = C x_t comes from the subclass.  This module holds everything that is not the kernel: the
parameter transforms, the initialisations of (A, P, B) (HiPPO-NPLR and the diagonal S4D inits),
the step size dt, the optimizer hints (``_optim``), the block layers, input checks, ``lengths``,
state handling and the generic computation of the final recurrent state.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import numbers
import warnings
from abc import abstractmethod
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrnnx.core.base import empty_in_graph
from lrnnx.core.checks import (
    as_lengths,
    check_batch_size,
    check_bool,
    check_dt_range,
    check_inference_cache,
    check_input_dtype,
    check_optional_positive_int,
    check_packed_cache,
    check_positive_float,
    check_positive_int,
    check_step_input,
    lengths_mask,
    packed_offsets,
    packed_seqlen_offset,
    step_output,
    user_stacklevel,
    zero_where_not,
)
from lrnnx.core.fftconv import bit_length, causal_conv
from lrnnx.core.hippo import nplr
from lrnnx.layers.linear import Linear
from lrnnx.models.lti.base import LTI_LRNN
from lrnnx.ops._dispatch import no_autocast
from lrnnx.ops.linear_scan.packing import step_layout

log = logging.getLogger(__name__)

TRANSFORMS = ("none", "exp", "relu", "sigmoid", "softplus")
ACTIVATIONS = (
    "id",
    "identity",
    "linear",
    "tanh",
    "relu",
    "gelu",
    "elu",
    "swish",
    "silu",
    "glu",
    "sigmoid",
    "softplus",
)
#: inits whose NPLR form comes from a HiPPO measure
NPLR_INITS = ("legs", "legt", "fout", "fourier")
#: keyword options that the original lrnnx's S4 / S4D pass on to its HiPPO-NPLR / DPLR init
#: helpers, with their defaults; accepted here at these values only (see
#: :func:`check_original_init_options`)
ORIGINAL_INIT_OPTIONS: Dict[str, Any] = {
    "B_clip": 2.0,
    "diagonalize_precision": True,
    "real_random": False,
    "real_scale": 1.0,
    "imag_random": False,
    "imag_scale": 1.0,
    "B_random": False,
    "B_init": "constant",
    "B_scale": 1.0,
    "P_scale": 1.0,
    "normalize": False,
}
#: values of the original lrnnx's ``kernel`` argument for each block: the kernel it computes
KERNEL_NAMES = {"S4": "s4", "S4D": "s4d"}
#: diagonal inits, used as ``diag-<name>`` (P = 0) or ``dplr-<name>`` (random P)
DIAG_INITS = (
    "lin",
    "linear",
    "inv",
    "inverse",
    "inv2",
    "inverse2",
    "quad",
    "quadratic",
    "rand",
    "random",
    "real",
    "legs",
    "hippo",
)
#: names that expand to several inits, split evenly over the n_ssm copies
INIT_COMBINATIONS = {
    "hippo": ("legs", "fourier"),
    "diag": ("diag-inv", "diag-lin"),
    "all": ("legs", "fourier", "diag-inv", "diag-lin"),
}
#: bound on the (H, N, chunk) intermediate of the Cauchy / Vandermonde products, in elements
KERNEL_MAX_ELEMENTS = 2**22
#: time chunk of the final-state computation
STATE_CHUNK = 256


# --------------------------------------------------------------------------------------------
# parameter transforms


def inv_transform(param: Tensor, transform: str = "none", name: str = "transform") -> Tensor:
    """Raw value whose :func:`param_transform` is ``param`` (positive; clamped at 1e-4).

    Raises:
        ValueError: ``transform`` "sigmoid" (whose values lie in (0, 1)) for a ``param`` that
            reaches 1 or more, which has no preimage (its logit would be NaN); ``name``
            names the argument that chose the transform.
    """
    param = torch.clamp(param, min=1e-4)
    if transform in ("none", "relu"):
        return param
    if transform == "exp":
        return torch.log(param)
    if transform == "sigmoid":
        if param.numel() and bool((param >= 1).any()):
            raise ValueError(
                f"{name}: 'sigmoid' gives values in (0, 1), but the initial values it must "
                f"produce reach {float(param.max()):.4g}; choose 'exp', 'softplus' or 'relu' "
                "(or an init / dt range below 1)"
            )
        return torch.logit(param)
    if transform == "softplus":
        return param + torch.log(-torch.expm1(-param))  # log(exp(p) - 1), stable
    raise ValueError(f"transform: expected one of {list(TRANSFORMS)}, got {transform!r}")


def param_transform(param: Tensor, transform: str = "none") -> Tensor:
    """Positive value from a raw parameter."""
    if transform == "none":
        return param
    if transform == "exp":
        return torch.exp(param)
    if transform == "relu":
        return F.relu(param) + 1e-4  # keep it away from 0
    if transform == "sigmoid":
        return torch.sigmoid(param)
    if transform == "softplus":
        return F.softplus(param)
    raise ValueError(f"transform: expected one of {list(TRANSFORMS)}, got {transform!r}")


# --------------------------------------------------------------------------------------------
# initialisation of (A, P, B)


def _diag_init(
    kind: str, N: int, rank: int, S: int, P_scale: float
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """A diagonal (plus random low-rank) initialisation, conjugate half kept (S4D paper).

    A_n = -1/2 - i * imag_n for n < N/2 with imag_n from ``kind``:
    'lin' pi n (S4D-Lin); 'inv' N/pi (N/(2n+1) - 1) (S4D-Inv); 'inv2' N/pi (N/(n+1) - 1);
    'quad' (2n+1)^2 / pi; 'rand' exp(N(0,1)); 'real' 0 with A_n = -(n+1) (S4D-Real);
    'legs' the eigenvalues of the normal part of HiPPO-LegS (S4D-LegS, with its B).
    B = 1 except for 'legs'; P ~ CN(0, 1) * P_scale (0 for ``diag-``).
    """
    half = N // 2
    n = torch.arange(half, dtype=torch.float64)
    real = torch.full((half,), 0.5, dtype=torch.float64)
    B = torch.ones(half, dtype=torch.complex128)
    if kind in ("lin", "linear"):
        imag = math.pi * n
    elif kind in ("inv", "inverse"):
        imag = N / math.pi * (N / (1 + 2 * n) - 1)
    elif kind in ("inv2", "inverse2"):
        imag = N / math.pi * (N / (1 + n) - 1)
    elif kind in ("quad", "quadratic"):
        imag = (1 + 2 * n) ** 2 / math.pi
    elif kind in ("rand", "random"):
        imag = torch.exp(torch.randn(half, dtype=torch.float64))
    elif kind == "real":
        imag, real = torch.zeros(half, dtype=torch.float64), 1 + n
    elif kind in ("legs", "hippo"):
        W, _, B, _ = nplr("legs", N, 1)
        imag = -W.imag
    else:
        raise ValueError(
            f"init: unknown diagonal init {kind!r}; expected one of {list(DIAG_INITS)}"
        )
    A = torch.complex(-real, -imag)
    P = torch.randn(rank, half, dtype=torch.complex128) * P_scale
    V = torch.eye(N, dtype=torch.complex128)[:, :half]
    return (
        A.expand(S, half),
        P[:, None].expand(rank, S, half),
        B.expand(S, half),
        V.expand(S, N, half),
    )


def _single_init(init: str, N: int, rank: int, S: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if init in NPLR_INITS:
        W, P, B, V = nplr(init, N, rank)
        return W.expand(S, -1), P[:, None].expand(-1, S, -1), B.expand(S, -1), V.expand(S, -1, -1)
    for prefix, P_scale in (("diag", 0.0), ("dplr", 1.0)):
        if init == prefix:
            return _diag_init("legs", N, rank, S, P_scale)
        if init.startswith(prefix + "-"):
            return _diag_init(init[len(prefix) + 1 :], N, rank, S, P_scale)
    valid = list(NPLR_INITS) + [f"diag-{k}" for k in DIAG_INITS] + ["dplr-<...>"]
    valid += list(INIT_COMBINATIONS)
    raise ValueError(f"init: expected one of {valid}, got {init!r}")


def ssm_init(init: str, N: int, rank: int, S: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(A, P, B, V) for S independent SSMs of state size N (conjugate half kept), complex128.

    Returns A (S, N/2) with Re(A) <= 0 and Im(A) <= 0, P (rank, S, N/2), B (S, N/2) and the basis
    V (S, N, N/2) that maps the kept half back to the original (HiPPO) coordinates.
    A combination name splits the S copies evenly between its inits.
    """
    inits = INIT_COMBINATIONS.get(init, (init,))
    if S % len(inits):
        raise ValueError(
            f"n_ssm: init {init!r} combines {len(inits)} inits and needs n_ssm divisible by "
            f"{len(inits)}, got {S}"
        )
    parts = [_single_init(i, N, rank, S // len(inits)) for i in inits]
    A, P, B, V = (torch.cat([p[j] for p in parts], dim=1 if j == 1 else 0) for j in range(4))
    return A.clone(), P.clone(), B.clone(), V.clone()


def init_log_dt(H: int, width: int, dt_min: float, dt_max: float, deterministic: bool) -> Tensor:
    """log(dt) of shape (H, width): log-uniform in [dt_min, dt_max], or evenly log-spaced over H."""
    lo, hi = math.log(dt_min), math.log(dt_max)
    if deterministic:
        return torch.linspace(lo, hi, H)[:, None].expand(H, width).clone()
    return torch.rand(H, width) * (hi - lo) + lo


# --------------------------------------------------------------------------------------------
# small modules


def Activation(name: Optional[str], dim: int = -1) -> nn.Module:
    """Activation by name (None / 'id' for identity)."""
    if name in (None, "id", "identity", "linear"):
        return nn.Identity()
    table = {
        "tanh": nn.Tanh,
        "relu": nn.ReLU,
        "gelu": nn.GELU,
        "elu": nn.ELU,
        "swish": nn.SiLU,
        "silu": nn.SiLU,
        "sigmoid": nn.Sigmoid,
        "softplus": nn.Softplus,
    }
    if name == "glu":
        return nn.GLU(dim=dim)
    if name in table:
        return table[name]()
    raise ValueError(f"activation: expected None or one of {list(ACTIVATIONS)}, got {name!r}")


def _check_hints(name: str, value: Any) -> Any:
    """``lr`` / ``wd``: None, a finite number >= 0, or a mapping of the keys 'dt', 'A', 'B', 'C'
    to such numbers or None (see :meth:`S4BlockBase.register`)."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        unknown = sorted(set(map(str, value)) - {"dt", "A", "B", "C"})
        if unknown:
            raise ValueError(f"{name}: expected keys among 'dt', 'A', 'B', 'C', got {unknown}")
        return {k: None if v is None else check_positive_float(f"{name}[{k!r}]", v, True)
                for k, v in value.items()}  # fmt: skip
    return check_positive_float(name, value, allow_zero=True)


class DropoutNd(nn.Module):
    """Dropout on (B, L, F) whose mask is shared along L when ``tie`` (like nn.Dropout1d)."""

    def __init__(self, p: float = 0.5, tie: bool = True):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {p}")
        self.p, self.tie = p, tie

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],) if self.tie else x.shape
        mask = torch.rand(shape, device=x.device) < 1 - self.p
        return x * mask / (1 - self.p)


# --------------------------------------------------------------------------------------------
# final state of a linear recurrence


def _apply(M: Tensor, x: Tensor) -> Tensor:
    """M x for a diagonal M (H, N) or a dense M (H, N, N), x (..., H, N)."""
    if M.dim() == 2:
        return M * x
    return torch.einsum("hmn,...hn->...hm", M, x)


def ssm_final_state(
    dA: Tensor,
    dB: Tensor,
    u: Tensor,
    h0: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    chunk: int = STATE_CHUNK,
) -> Tensor:
    """State x_{n-1} of x_t = dA x_{t-1} + dB u_t after each sequence's n = length steps.

    x_{n-1} = dA^n x_{-1} + sum_{j<n} dA^{n-1-j} dB u_j, computed chunk by chunk:
    x <- dA^T x + sum_{i<T} (dA^{T-1-i} dB) u_{t0+i}, with the T vectors dA^i dB built by doubling.
    Memory O(H N (N + T) + B H N T), no per-timestep Python loop.

    Args:
        dA: (H, N) diagonal or (H, N, N) dense.  dB: (H, N).  u: (B, H, L) real input.
        h0: (B, H, N) initial state x_{-1} (zero if None).
        lengths: (B,) valid lengths (L if None); the inputs past them are ignored.

    Returns:
        (B, H, N) in dA's dtype.
    """
    Bsz, H, L = u.shape
    N = dB.shape[-1]
    u = u.to(dA.dtype)
    if lengths is not None:
        # right-align every sequence so that it ends at L-1 (zeros in front change nothing)
        idx = torch.arange(L, device=u.device)[None] - (L - lengths.to(u.device))[:, None]
        gathered = u.gather(2, idx.clamp(min=0)[:, None].expand(Bsz, H, L))
        u = gathered * (idx >= 0)[:, None]
    T = min(1 << bit_length(max(L - 1, 0)), chunk)
    if L % T:
        u = F.pad(u, (T - L % T, 0))
    S, power = dB[..., None], dA  # S[..., i] = dA^i dB; power = dA^(width of S)
    while S.shape[-1] < T:
        S = torch.cat([S, power[..., None] * S if dA.dim() == 2 else power @ S], dim=-1)
        power = power * power if dA.dim() == 2 else power @ power
    S = S.flip(-1)  # S[..., i] = dA^(T-1-i) dB
    x = torch.zeros(Bsz, H, N, dtype=dA.dtype, device=dA.device)
    for t0 in range(0, u.shape[-1], T):
        x = _apply(power, x) + torch.einsum("hnt,bht->bhn", S, u[..., t0 : t0 + T])
    if h0 is not None:
        n = torch.full((Bsz,), L, device=u.device) if lengths is None else lengths.to(u.device)
        decay, p = h0.to(dA.dtype), dA
        for bit in range(bit_length(max(L, 1))):
            take = ((n >> bit) & 1).bool()[:, None, None]
            decay = torch.where(take, _apply(p, decay), decay)
            p = p * p if dA.dim() == 2 else p @ p
        x = x + decay
    return x


# --------------------------------------------------------------------------------------------
# the block


class S4BlockBase(LTI_LRNN):
    """The S4 block (see module docstring) around an SSM kernel supplied by a subclass.

    Subclasses set up the SSM parameters in ``_init_ssm`` and implement ``compute_kernel``,
    ``discretize``, ``setup_step``, ``_state_matrices`` and ``_ssm_step``.  State shape:
    (B, H', state_dim) in ``state_dtype``.
    """

    # the S4 code base's block convolves with its kernel (cut at l_max, with kernel dropout):
    # "auto" and "fft" are that; there is no scan mode to choose
    modes = ("auto", "fft")
    _modes_note = (
        " (S4 and S4D always convolve with their kernel, as the S4 code base does; S5, LRU "
        "and Centaurus also scan)"
    )

    #: model name used in log messages
    _name = "S4"

    def __new__(cls, *args: Any, **kwargs: Any):
        _warn_positional_bottleneck(cls, args, kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        discretization: str,
        d_model: int,
        bottleneck: Optional[int] = None,
        gate: Optional[int] = None,
        final_act: Optional[str] = "glu",
        postact: Optional[str] = None,
        dropout: float = 0.0,
        tie_dropout: bool = False,
        transposed: bool = True,
        l_max: Optional[int] = None,
        channels: int = 1,
        d_state: int = 64,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_tie: bool = True,
        dt_transform: str = "exp",
        dt_fast: bool = False,
        rank: int = 1,
        n_ssm: Optional[int] = None,
        init: str = "legs",
        deterministic: bool = False,
        real_transform: str = "exp",
        imag_transform: str = "none",
        is_real: bool = False,
        lr: Union[float, Mapping[str, float], None] = None,
        wd: Union[float, Mapping[str, float], None] = 0.0,
        verbose: bool = True,
        swap_channels: bool = False,
        drop_kernel: float = 0.0,
    ):
        super().__init__(discretization)
        d_model = check_positive_int("d_model", d_model)
        channels = check_positive_int("channels", channels)
        d_state = check_positive_int("d_state", d_state)
        rank = check_positive_int("rank", rank)
        bottleneck = check_optional_positive_int("bottleneck", bottleneck)
        gate = check_optional_positive_int("gate", gate)
        l_max = check_optional_positive_int("l_max", l_max)
        for name, flag in (
            ("tie_dropout", tie_dropout),
            ("transposed", transposed),
            ("dt_tie", dt_tie),
            ("dt_fast", dt_fast),
            ("deterministic", deterministic),
            ("is_real", is_real),
            ("verbose", verbose),
            ("swap_channels", swap_channels),
        ):
            check_bool(name, flag)
        dropout = check_positive_float("dropout", dropout, allow_zero=True)
        lr, wd = _check_hints("lr", lr), _check_hints("wd", wd)
        if bottleneck is not None and d_model // bottleneck < 1:
            raise ValueError(f"bottleneck: must be <= d_model = {d_model}, got {bottleneck}")
        dt_min, dt_max = check_dt_range(dt_min, dt_max)
        for name, value in (
            ("dt_transform", dt_transform),
            ("real_transform", real_transform),
            ("imag_transform", imag_transform),
        ):
            if value not in TRANSFORMS:
                raise ValueError(f"{name}: expected one of {list(TRANSFORMS)}, got {value!r}")
        if postact is not None:
            log.warning("%s: 'postact' is deprecated, use 'final_act'", self._name)
            final_act = postact
        if final_act is not None and final_act not in ACTIVATIONS:
            raise ValueError(
                f"final_act: expected None or one of {list(ACTIVATIONS)}, got {final_act!r}"
            )

        self.d_model = d_model
        self.transposed = transposed
        self.bottleneck, self.gate, self.final_act = bottleneck, gate, final_act
        self.channels, self.l_max = channels, l_max
        self._warned_l_max = False
        self.H = d_model // bottleneck if bottleneck is not None else d_model
        self.d_state = d_state
        self.is_real = bool(is_real)
        n_ssm = self.H if n_ssm is None else check_positive_int("n_ssm", n_ssm)
        if self.H % n_ssm:
            raise ValueError(f"n_ssm: must divide the SSM width H = {self.H}, got {n_ssm}")
        self.n_ssm = n_ssm
        if not self.is_real and d_state % 2:
            raise ValueError(
                f"d_state: complex SSMs keep one state per conjugate pair and need an even "
                f"d_state, got {d_state}"
            )
        # kept states: one per conjugate pair (complex), or d_state real states
        self.N = d_state if self.is_real else d_state // 2
        self.dt_tie, self.dt_transform, self.dt_fast = dt_tie, dt_transform, dt_fast
        self.real_transform, self.imag_transform = real_transform, imag_transform
        self.rank, self.init, self.deterministic = rank, init, deterministic
        self.lr, self.wd, self.verbose = lr, wd, verbose
        self.kernel_max_elements = KERNEL_MAX_ELEMENTS
        # order of the C * H' SSM outputs: (channel, feature) or, swapped, (feature, channel)
        self.swap_channels = bool(swap_channels)
        drop_kernel = check_positive_float("drop_kernel", drop_kernel, allow_zero=True)
        if drop_kernel >= 1:
            raise ValueError(f"drop_kernel: expected a probability in [0, 1), got {drop_kernel}")
        # dropout on the convolution kernel while training (the recurrent step has none)
        self.kernel_dropout = nn.Dropout(drop_kernel) if drop_kernel > 0 else nn.Identity()

        # the gate branch, bottleneck and output layers (GSS-style when gate / bottleneck are set)
        d_gate = self.H * gate if gate is not None else None
        d_conv = self.H * channels
        if bottleneck is not None:
            self.input_linear = Linear(d_model, self.H)
        if gate is not None:
            self.input_gate = Linear(d_model, d_gate)
            self.output_gate = Linear(d_conv, d_gate)
        self.D = nn.Parameter(torch.randn(channels, self.H))
        self.conv_dropout = _dropout(dropout, tie_dropout)
        self.activation = nn.GELU()
        self.dropout = _dropout(dropout, tie_dropout)
        d_inner = d_gate if gate is not None else d_conv
        if final_act is None:
            self.output_linear = nn.Identity()
            self._d_output = d_inner
        else:
            d_out = 2 * d_model if final_act == "glu" else d_model
            self.output_linear = nn.Sequential(Linear(d_inner, d_out), Activation(final_act))
            self._d_output = d_model

        self.dt_min, self.dt_max = dt_min, dt_max
        self._init_dt()
        self._init_ssm()
        if verbose:
            log.info(
                "%s: constructing (H, N, L) = (%d, %d, %s), init=%r, channels=%d, n_ssm=%d, "
                "rank=%d, is_real=%s",
                self._name,
                self.H,
                d_state,
                l_max,
                init,
                channels,
                n_ssm,
                rank,
                self.is_real,
            )

    # ---- parameters -------------------------------------------------------------------------

    def _init_parameters(self) -> None:
        """D (channels, H) ~ N(0, 1), the step sizes and the SSM (A, B, C, ...)."""
        self._set_parameter("D", torch.randn(self.channels, self.H))
        self._init_dt()
        self._init_ssm()

    def _init_dt(self) -> None:
        """The step sizes: (H, 1) tied across the state, or (H, N), log-uniform in [dt_min,
        dt_max] (evenly log-spaced over H when ``deterministic``), under ``dt_transform``."""
        width = 1 if self.dt_tie else self.N
        log_dt = init_log_dt(self.H, width, self.dt_min, self.dt_max, self.deterministic)
        if self.dt_transform == "exp":
            raw = log_dt
        else:
            raw = inv_transform(log_dt.exp(), self.dt_transform, "dt_transform")
        if self.dt_fast:
            raw = torch.asinh(raw)  # the parameter moves through sinh: fast saturating updates
        self.register("inv_dt", raw, "dt")

    def _hint(self, value, key: str, default_keys: Tuple[str, ...] = ("dt", "A", "B")):
        if value is None or isinstance(value, numbers.Real):
            return value if key in default_keys else None
        return value.get(key)

    def register(self, name: str, tensor: Tensor, key: str) -> None:
        """Register ``tensor`` as a parameter carrying optimizer hints for group ``key``.

        ``key`` is 'dt', 'A' (also P), 'B' or 'C'.  A number ``lr``/``wd`` applies to dt, A and B;
        a mapping applies per key.  The hints go to ``param._optim = {"lr": .., "weight_decay": ..}``
        (entries that are None are left out); ``lr == 0`` makes the tensor a frozen buffer.
        """
        if name in self._parameters or name in self._buffers:  # a reset: new values in place
            self._set_parameter(name, tensor)
            return
        lr, wd = self._hint(self.lr, key), self._hint(self.wd, key)
        if lr == 0.0:
            self.register_buffer(name, tensor)
            return
        self.register_parameter(name, nn.Parameter(tensor))
        optim = {}
        if lr is not None:
            optim["lr"] = lr
        if wd is not None:
            optim["weight_decay"] = wd
        if optim:
            getattr(self, name)._optim = optim

    def _register_abc(self, A: Tensor, B: Tensor, C: Tensor) -> None:
        """Register A (S, N), B (S, N), C (channels, H, N) (complex) under the transforms."""
        dtype = torch.get_default_dtype()
        A_real = inv_transform(-A.real, self.real_transform, "real_transform")
        self.register("A_real", A_real.to(dtype), "A")
        if self.is_real:
            self.register("B", B.real.to(dtype).contiguous(), "B")
            self.register("C", C.real.to(dtype).contiguous(), "C")
        else:
            A_imag = inv_transform(-A.imag, self.imag_transform, "imag_transform")
            self.register("A_imag", A_imag.to(dtype), "A")
            self.register("B", torch.view_as_real(B.contiguous()).to(dtype), "B")
            self.register("C", torch.view_as_real(C.contiguous()).to(dtype), "C")

    def _init_abc(self, rank: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(A, P, B, C) complex128 from ``init``; C (channels, H, N) random or deterministic."""
        # real SSMs start from the complex init of twice the size and keep real parts (as S4D-Real)
        A, P, B, V = ssm_init(self.init, 2 * self.N, rank, self.n_ssm)
        if self.deterministic:
            # C reads the first coordinate of the original basis: y = e_0^T V_full x
            C = V[:, 0, :][None].expand(self.channels, -1, -1)
            C = C.repeat(1, self.H // self.n_ssm, 1)
        else:
            C = torch.randn(self.channels, self.H, self.N, dtype=torch.complex128)
        return A, P, B, C

    def _dt(self) -> Tensor:
        """dt, shape (H, 1) or (H, N)."""
        raw = torch.sinh(self.inv_dt) if self.dt_fast else self.inv_dt
        return param_transform(raw, self.dt_transform)

    def _A_diag(self) -> Tensor:
        """Diagonal part of A, (H, N): -f(A_real) - i f(A_imag), repeated from the n_ssm copies."""
        re = -param_transform(self.A_real, self.real_transform)
        if self.is_real:
            A = re
        else:
            A = torch.complex(re, -param_transform(self.A_imag, self.imag_transform))
        return A.repeat(self.H // self.n_ssm, 1)

    def _B(self) -> Tensor:
        B = self.B if self.is_real else torch.view_as_complex(self.B)
        return B.repeat(self.H // self.n_ssm, 1)

    def _C(self) -> Tensor:
        # (contiguous: a 4-D parameter takes channels_last strides from model.to(memory_format=
        # torch.channels_last), which view_as_complex refuses; a no-op otherwise)
        return self.C if self.is_real else torch.view_as_complex(self.C.contiguous())

    @property
    def state_dtype(self) -> torch.dtype:
        dtype = self.A_real.dtype
        if self.is_real:
            return dtype
        return torch.complex128 if dtype == torch.float64 else torch.complex64

    @property
    def d_output(self) -> int:
        """Feature size of the output (d_model unless final_act is None)."""
        return self._d_output

    # ---- hooks for the subclasses --------------------------------------------------------------

    @abstractmethod
    def _init_ssm(self) -> None:
        """Create the SSM parameters (A, B, C, ...)."""

    @property
    @abstractmethod
    def state_dim(self) -> int:
        """Size of the recurrent state per feature."""

    @abstractmethod
    def compute_kernel(
        self, L: int, state: Optional[Tensor] = None
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Kernel (channels, H, L) and the response to ``state`` (B, channels, H, L) (or None)."""

    @abstractmethod
    def _state_matrices(self) -> Tuple[Tensor, Tensor]:
        """(dA, dB) of the state recurrence in ``state_dtype``, differentiable."""

    def setup_step(self) -> Dict[str, Tensor]:
        """Discrete dA, dB, dC for :meth:`step` (inference constants: copies, no graph)."""
        with torch.no_grad():
            return {k: t.clone() for k, t in self._step_system().items()}

    @abstractmethod
    def _step_system(self) -> Dict[str, Tensor]:
        """dA, dB, dC of the recurrence :meth:`step` runs, in ``state_dtype``, from the
        parameters as they are (differentiable)."""

    @abstractmethod
    def _ssm_step(self, u: Tensor, cache: Dict[str, Any], graph: bool = False) -> Tensor:
        """Advance cache["lrnn_state"] by input u (B, H) and return C x (B, channels, H): in
        place, or with ``graph`` (autograd records through the cache's matrices) computed out
        of place and written back (copy_ carries the graph)."""

    # ---- interface ---------------------------------------------------------------------------

    def default_state(self, *batch_shape: int, device=None) -> Tensor:
        """Zero state of shape (*batch_shape, H, state_dim).

        With ``batch_shape = (B,)`` it is the state of the state-spaces/s4 convention:
        ``y, state = model.step(x, state)`` (see :meth:`step`) and ``model(x, state=state)``.
        """
        device = self.A_real.device if device is None else device
        return torch.zeros(
            *batch_shape, self.H, self.state_dim, dtype=self.state_dtype, device=device
        )

    def allocate_inference_cache(
        self,
        batch_size: int,
        max_seqlen: int = 1,
        dtype: Optional[torch.dtype] = None,
        device: Optional[Union[torch.device, str]] = None,
    ) -> Dict[str, Any]:
        """Zero state plus the discrete dA, dB, dC from :meth:`setup_step`.

        ``max_seqlen`` and ``dtype`` are unused (the state is kept in float32/complex64 or the
        parameters' precision).  ``device``: where the cache is allocated (default: the
        parameters' device).
        """
        check_batch_size(batch_size)
        with torch.no_grad():
            cache = dict(self.setup_step())
        if device is not None:
            cache = {k: v.to(device) for k, v in cache.items()}
        cache["lrnn_state"] = self.default_state(batch_size, device=device)
        cache["seqlen_offset"] = 0
        return cache

    def _check_input(self, x: Tensor) -> Tensor:
        """Validate x and return it as (B, L, H)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
        axis, layout = (1, "(B, H, L)") if self.transposed else (2, "(B, L, H)")
        if x.dim() != 3 or x.shape[axis] != self.d_model:
            raise ValueError(
                f"x: expected shape {layout} with H = d_model = {self.d_model} "
                f"(transposed={self.transposed}), got {tuple(x.shape)}"
            )
        x = x.transpose(1, 2) if self.transposed else x
        proj = self._projection_dtype()
        if proj is not None:
            check_input_dtype(x, proj)
        return x

    def _projection_dtype(self) -> Optional[torch.dtype]:
        """The dtype of the block's projection layers (None without any): the weight of the
        first one, in the order the constructor registers them."""
        # named, not found through named_parameters(): Dynamo 2.4 cannot trace that in a module
        # it treats as mutable (an S4 compiled once: "non-const NNModule method named_modules"),
        # nor next() with a default, and fullgraph=True and torch.export reject the graph break
        if self.bottleneck is not None:
            return self.input_linear.weight.dtype
        if self.gate is not None:
            return self.input_gate.weight.dtype
        if self.final_act is not None:
            return self.output_linear[0].weight.dtype
        return None

    def _check_cache(self, cache: Any, batch: int) -> Dict[str, Any]:
        """The shared cache validation, then the state's own shape and dtype."""
        keys = ("lrnn_state", "dA", "dB", "dC")
        precision = dict.fromkeys(keys, self._precision)
        check_inference_cache(cache, batch, keys, type(self).__name__, precision=precision)
        self._check_state(cache["lrnn_state"], batch, 'inference_cache["lrnn_state"]')
        return cache

    def _check_state(self, state: Tensor, batch: int, name: str) -> Tensor:
        expected = (batch, self.H, self.state_dim)
        if not isinstance(state, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(state).__name__}")
        if tuple(state.shape) != expected:
            raise ValueError(
                f"{name}: expected shape {expected} = (B, H, N), got {tuple(state.shape)}"
            )
        if self.is_real and not state.is_floating_point():
            raise TypeError(
                f"{name}: expected a real floating-point state, got dtype {state.dtype}"
            )
        if not self.is_real and not state.is_complex():
            raise TypeError(f"{name}: expected a complex state, got dtype {state.dtype}")
        return state.to(self.state_dtype)

    def _lengths(self, lengths, batch: int, L: int, device) -> Optional[Tensor]:
        if lengths is None:
            return None
        if isinstance(lengths, numbers.Integral) and not isinstance(lengths, bool) and lengths == L:
            return None  # every sequence whole: no mask (other ints: as_lengths, as every model)
        if isinstance(lengths, Tensor) and lengths.shape == (1,) and batch != 1:
            lengths = lengths.expand(batch)  # one length for the whole batch
        return as_lengths(lengths, batch, L, device)  # validates type, shape and range

    def forward(
        self,
        x: Tensor,
        lengths: Union[Tensor, int, None] = None,
        state: Optional[Tensor] = None,
        inference_cache: Optional[Dict[str, Any]] = None,
        rate: float = 1.0,
        *,
        cu_seqlens: Optional[Tensor] = None,
        integration_timesteps: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Run the block over a whole sequence.

        Args:
            x: (B, H, L) if ``transposed`` else (B, L, H); with ``cu_seqlens``, (1, H, T) or
                (1, T, H).
            lengths: (B,) valid lengths (or one int); padded outputs are zero and padding never
                affects the valid outputs or the returned state.
            state: initial recurrent state (B, H', N) (e.g. from :meth:`default_state`); with
                ``cu_seqlens`` one per sequence, (S, H', N).
            inference_cache: a cache from :meth:`allocate_inference_cache`; its state is the
                initial state and receives the final one (``seqlen_offset`` advances by L).
                With ``cu_seqlens`` it holds one state per sequence (batch size S) and
                ``seqlen_offset`` advances by the longest sequence's length.
            rate: sampling-rate factor of the original lrnnx / state-spaces FFT convolution
                (dt scaled by ``rate``); only 1.0 is supported (ValueError otherwise).
            cu_seqlens: packed sequences (fla's convention): int64 offsets (S + 1,) into the
                T steps of the one batch row, 0 first and T last, repeated offsets for
                zero-length sequences.  The result equals running each sequence alone
                (outputs, gradients, states), see :meth:`_packed_ssm` for how.  ValueError for
                ``lengths`` with it, a batch other than 1 or bad offsets.
            integration_timesteps: (B, L) as the LTV models take them, for one interface
                across models: checked like theirs and ignored, with a warning (the kernel of
                a time-invariant model is fixed).

        Returns:
            y of x's shape (with d_output features) and the state after each sequence's last valid
            step when ``state`` or ``inference_cache`` is given (else None).
        """
        _check_rate(rate)
        x = self._check_input(x)
        Bsz, L, _ = x.shape
        if state is not None and inference_cache is not None:
            raise ValueError("state, inference_cache: pass at most one of them")
        layout = "(1, H, T)" if self.transposed else "(1, T, H)"
        cu = packed_offsets(cu_seqlens, lengths, Bsz, L, f"x {layout}")
        lengths = self._lengths(lengths, Bsz, L, x.device)
        self._ignore_timesteps(x, integration_timesteps, lengths)
        mask = None if lengths is None else lengths_mask(lengths, Bsz, L, x.device)
        h0 = self._initial_state(state, inference_cache, Bsz if cu is None else cu.shape[0] - 1, cu)
        if x.numel() == 0:  # no batch or no steps: empty output, the state stays
            return self._empty_block_output(x, h0, inference_cache)
        if mask is not None:  # a select: padding may hold anything, NaN included
            x = zero_where_not(x, mask[..., None])
        v = self.input_gate(x) if self.gate is not None else None
        u = self.input_linear(x) if self.bottleneck is not None else x
        # the final state carries the graph while autograd records: into a given state's
        # return, and into a cache's state, from which steps and later forwards continue
        with no_autocast(x.device):
            uf = u.transpose(1, 2).to(self.A_real.dtype)  # (B, H', L)
            if mask is not None:
                uf = zero_where_not(uf, mask[:, None])
            if cu is None:
                y, next_state = self._ssm(uf, h0, lengths)
            else:
                y, next_state = self._packed_ssm(uf, h0, cu)
            y = y.transpose(1, 2) if self.swap_channels else y  # (B, H', C, L)
            # (B, L, C*H') in its own memory order: the activation's backward on a transposed
            # view ran ~9x slower on the CPU (torch's gelu_backward), and the linear layer
            # after it copies a transposed input anyway
            y = y.reshape(Bsz, -1, L).transpose(1, 2).to(x.dtype).contiguous()
        y = self.activation(self.conv_dropout(y))
        if v is not None:
            y = self.output_gate(y) * v
        y = self.output_linear(self.dropout(y))
        if mask is not None:
            y = zero_where_not(y, mask[..., None])
        if self.transposed:
            y = y.transpose(1, 2)
        if inference_cache is not None:
            inference_cache["lrnn_state"].copy_(next_state)  # with its graph (steps continue it)
            advance = L if cu is None else packed_seqlen_offset(cu)
            inference_cache["seqlen_offset"] = inference_cache.get("seqlen_offset", 0) + advance
            next_state = inference_cache["lrnn_state"]
        return y, next_state

    def _initial_state(
        self,
        state: Optional[Tensor],
        cache: Optional[Dict[str, Any]],
        rows: int,
        cu: Optional[Tensor],
    ) -> Optional[Tensor]:
        """The validated initial state (rows, H', N): from ``state``, from the cache, or None.

        ``rows`` is the batch size, or the number of sequences S with the offsets ``cu``."""
        if state is not None:
            name = "state" if cu is None else "state (one per packed sequence)"
            return self._check_state(state, rows, name)
        if cache is None:
            return None
        if cu is not None:
            check_packed_cache(cache, rows, type(self).__name__)
        # a copy: the final state is written into the cache's tensor in place, which must not
        # change a value saved by the graph of a forward under autograd
        return self._check_cache(cache, rows)["lrnn_state"].to(self.state_dtype, copy=True)

    def _ssm(
        self, uf: Tensor, h0: Optional[Tensor], lengths: Optional[Tensor]
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """The SSM of a batch by the FFT convolution with the kernel: uf (B, H', L) ->
        y (B, C, H', L) (D included), and the final state (B, H', N) when ``h0`` is given.

        ``lengths`` (B,): the state is read at each sequence's length (padding zeroed by the
        caller)."""
        L = uf.shape[-1]
        Lk = L if self.l_max is None else min(L, self.l_max)
        if Lk < L and not self._warned_l_max:
            self._warned_l_max = True
            warnings.warn(
                f"{type(self).__name__}: an input of L = {L} steps is longer than l_max = "
                f"{self.l_max}: the convolution kernel is cut at l_max taps (as state-spaces/s4's "
                "FFTConv), so outputs from step l_max on forget the inputs more than l_max steps "
                "back, unlike step(), whose recurrence never forgets; pass l_max=None (or >= L) "
                "for the full kernel (warned once per module)",
                UserWarning,
                stacklevel=user_stacklevel(),
            )
        k, k_state = self.compute_kernel(Lk, h0)
        k = self.kernel_dropout(k)
        # D u is the convolution's tap 0: D added to k_0 (after the kernel's dropout, which
        # never drops D) saves the (B, C, H', L) product and sum each way
        k = torch.cat([k[..., :1] + self.D[..., None].to(k.dtype), k[..., 1:]], dim=-1)
        y = causal_conv(uf[:, None], k)  # (B, C, H', L), D u included
        if k_state is not None:
            y = y + F.pad(k_state, (0, L - Lk))
        next_state = None
        if h0 is not None:
            dA, dB = self._state_matrices()
            next_state = ssm_final_state(dA, dB, uf, h0, lengths)
        return y, next_state

    def _packed_ssm(
        self, uf: Tensor, h0: Optional[Tensor], cu: Tensor
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """:meth:`_ssm` for S sequences packed along the T steps of uf (1, H', T) at the int64
        offsets ``cu`` (S + 1,); ``h0`` (S, H', N).  Returns y (1, C, H', T) and the final
        states (S, H', N) (or None).

        The kernel of a dense (DPLR) state matrix has no scan with resets, so the sequences are
        laid out as a padded batch (S, H', max length), run through :meth:`_ssm` with their
        lengths, and gathered back: exactly each sequence alone, with the block's own kernel
        (l_max and kernel dropout included), at the memory of that padded batch,
        O(S * max length * H' * channels).  Diagonal subclasses override this with the scan."""
        lens = cu[1:] - cu[:-1]
        T, longest, dev = uf.shape[-1], int(lens.max()), uf.device
        pos = torch.arange(longest)
        src = (cu[:-1, None] + pos).clamp(max=T - 1)  # (S, max length) packed step of each slot
        valid = (pos[None] < lens[:, None]).to(dev)
        u_pad = zero_where_not(uf[0][:, src.to(dev)].transpose(0, 1), valid[:, None])
        short = None if bool((lens == longest).all()) else lens.to(dev)
        y_pad, next_state = self._ssm(u_pad, h0, short)  # (S, C, H', max length)
        seq, _, _ = step_layout(cu, reverse=False)
        y = y_pad[seq.to(dev), :, :, (torch.arange(T) - cu[seq]).to(dev)]  # (T, C, H')
        return y.permute(1, 2, 0)[None], next_state

    def step(
        self, x: Tensor, inference_cache: Union[Dict[str, Any], Tensor]
    ) -> Tuple[Tensor, Union[Dict[str, Any], Tensor]]:
        """One timestep: x (B, d_model) -> y (B, d_output) (x (B, 1, d_model) -> y (B, 1,
        d_output)); the cache's state advances in place.

        ``inference_cache`` may also be a bare state (B, H', N), e.g. from
        :meth:`default_state` (the state-spaces/s4 convention): then the state is not modified
        and ``(y, next_state)`` is returned.
        """
        if isinstance(inference_cache, Tensor):
            return self._step_state(x, inference_cache)
        layout, x = x, check_step_input(x, self.d_model)
        proj = self._projection_dtype()
        if proj is not None:
            check_input_dtype(x, proj)
        self._check_cache(inference_cache, x.shape[0])
        v = self.input_gate(x) if self.gate is not None else None
        u = self.input_linear(x) if self.bottleneck is not None else x
        # while autograd records, the recurrence comes from the parameters (a stepped sequence
        # then has the forward's gradients); else from the cache's constants
        graph = self._step_records_graph()
        ssm_cache = {**inference_cache, **self._step_system()} if graph else inference_cache
        with no_autocast(x.device):
            uf = u.to(self.A_real.dtype)
            y = self._ssm_step(uf, ssm_cache, graph) + self.D * uf[:, None]  # (B, C, H')
            y = y.transpose(1, 2) if self.swap_channels else y  # (B, H', C)
            y = y.reshape(x.shape[0], y.shape[1] * y.shape[2]).to(x.dtype)  # (B = 0 too)
        y = self.activation(self.conv_dropout(y))
        if v is not None:
            y = self.output_gate(y) * v
        y = self.output_linear(self.dropout(y))
        inference_cache["seqlen_offset"] = inference_cache.get("seqlen_offset", 0) + 1
        return step_output(y, layout), inference_cache

    def _empty_block_output(
        self, x: Tensor, h0: Optional[Tensor], cache: Optional[Dict[str, Any]]
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """forward's result for x (B, L, H) with B = 0 or L = 0: an empty y and the state as it
        was (the cache's own state tensor when a cache is given)."""
        y = empty_in_graph(x, (x.shape[0], x.shape[1], self._d_output), self)
        y = y.transpose(1, 2) if self.transposed else y
        if cache is not None:
            return y, cache["lrnn_state"]
        return y, h0

    def _step_state(self, x: Tensor, state: Tensor) -> Tuple[Tensor, Tensor]:
        """:meth:`step` on a bare state (the state-spaces/s4 convention): (y, next_state)."""
        batch = check_step_input(x, self.d_model).shape[0]
        state = self._check_state(state, batch, "state").clone()
        cache = {**self._step_constants(), "lrnn_state": state, "seqlen_offset": 0}
        y, cache = self.step(x, cache)
        return y, cache["lrnn_state"]

    def _step_constants(self) -> Dict[str, Tensor]:
        """:meth:`setup_step`'s matrices, recomputed only after a parameter or buffer changed
        (in place, e.g. by an optimizer step, or by being moved), or on leaving inference mode
        (matrices made under it are inference tensors, which autograd cannot save)."""
        try:
            key = (torch.is_inference_mode_enabled(),) + tuple(
                (id(t), t._version, t.device, t.dtype)
                for t in itertools.chain(self.parameters(), self.buffers())
            )
        except RuntimeError:  # inference tensors have no version counter: always recompute
            key = None
        cached = self.__dict__.get("_step_constants_cache")
        if key is None or cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, dict(self.setup_step()))
            self.__dict__["_step_constants_cache"] = cached  # a plain attribute, not state
        return cached[1]


def _warn_positional_bottleneck(cls: type, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
    """Warn when S4(64, 16) / S4D(64, 16) is probably meant as d_state=16.

    The second positional argument of S4 and S4D is ``bottleneck`` (the order of the original
    lrnnx and of state-spaces/s4), which silently shrinks the SSM to d_model // bottleneck
    features.  No warning when d_state is also given, by keyword or by position.
    """
    if len(args) < 2 or args[1] is None or "d_state" in kwargs:
        return
    params = list(inspect.signature(cls.__init__).parameters)[1:]  # without self
    if params[1:2] != ["bottleneck"] or "d_state" not in params:
        return
    if len(args) > params.index("d_state"):
        return
    name = cls.__name__
    warnings.warn(
        f"{name}({args[0]!r}, {args[1]!r}, ...): the second positional argument of {name} is "
        f"bottleneck (the SSM then runs on d_model // bottleneck features), not the state "
        f"size; if you meant the state size, use {name}({args[0]!r}, d_state={args[1]!r}); "
        f"to keep the bottleneck without this warning, pass bottleneck={args[1]!r} by keyword",
        UserWarning,
        stacklevel=user_stacklevel(),
    )


def check_original_init_options(options: Mapping[str, Any]) -> None:
    """Accept the original lrnnx's init options (:data:`ORIGINAL_INIT_OPTIONS`) at their
    defaults; any other value raises ValueError, as the initialisation here has no such knob."""
    for name, value in options.items():
        default = ORIGINAL_INIT_OPTIONS[name]
        if isinstance(default, bool) or isinstance(value, bool):
            same = value is default
        else:
            try:
                same = bool(value == default)
            except Exception:  # e.g. a tensor of several values
                same = False
        if not same:
            raise ValueError(
                f"{name}: an option of the original lrnnx's HiPPO / DPLR initialisation, "
                f"supported here only at its default {default!r} (choose the initialisation "
                f"with init=...), got {value!r}"
            )


def check_kernel_name(owner: str, kernel: Optional[str]) -> None:
    """``kernel`` of the original lrnnx: the kernel algorithm, fixed by the class here."""
    expected = KERNEL_NAMES[owner]
    if kernel is None or kernel == expected:
        return
    other = {v: k for k, v in KERNEL_NAMES.items()}.get(kernel)
    hint = f"; use the {other} class for kernel={kernel!r}" if other else ""
    raise ValueError(
        f"kernel: {owner} always computes the {expected!r} kernel; expected None or "
        f"{expected!r}, got {kernel!r}{hint}"
    )


def _check_rate(rate: Any) -> None:
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or rate != 1.0:
        raise ValueError(
            f"rate: only 1.0 is supported (a kernel resampled to another sampling rate, as the "
            f"original lrnnx / state-spaces FFT convolution allows, is not implemented), "
            f"got {rate!r}"
        )


def _dropout(p: float, tie: bool) -> nn.Module:
    if not 0 <= p < 1:
        raise ValueError(f"dropout: expected a probability in [0, 1), got {p}")
    if p == 0:
        return nn.Identity()
    return DropoutNd(p, tie=True) if tie else nn.Dropout(p)
