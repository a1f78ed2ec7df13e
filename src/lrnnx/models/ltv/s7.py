"""S7: Selective and Simplified State Space Layers for Sequence Modeling (Soydan, Zubić,
Messikommer, Mishra, Scaramuzza, arXiv 2410.03464).

S7 makes S5's diagonal MIMO system input-dependent (selective) while keeping its structure, its
HiPPO-N initialisation and a stable reparameterisation of the state matrix (paper, section 3):

    x_k = A_bar_k x_{k-1} + B_bar_k u_k          y_k = C_bar_k x_k + D_bar_k u_k

with every matrix a function of the current input u_k.  The paper leaves the form of these
functions open; as in the authors' implementation (github.com/TaylanSoydan/S7) the transition
depends on u_k through a selective step Delta_k and B, C are linear in u_k (D_bar_k, fixed in
that code, is made input-dependent the same way, as the paper's equation writes it):

    Delta_k   = step_rescale * softplus(W_dt (W_r u_k) + b_dt)          (P,)   selective step
    Lambda    = -1 / (a w^2 + b) + i theta                                      stable Re(Lambda)
    A_bar_k, gamma_bar_k = rule(Lambda, Delta_k * dt_k)                 zoh / bilinear / dirac
    A_bar_k = exp(Lambda Delta_k dt_k),  gamma_bar_k = (exp(Lambda Delta_k) - 1) / Lambda   async
    B_k = B + W_B u_k  (P, H)     C_k = C + W_C u_k  (H, P)     D_k = D + W_D u_k  (H,)
    x_k = A_bar_k * x_{k-1} + gamma_bar_k * (B_k u_k)
    y_k = Re(C_k x_k) + D_k * u_k                      (2 Re(.) with conj_sym)

dt_k (``integration_timesteps``) is the time elapsed before element k, for event streams
(paper section 3.4, the asynchronous discretization of Event-SSM, arXiv 2404.18508); None means
dt_k = 1.  The real part of Lambda uses the StableSSM reparameterisation f(w) = -1 / (a w^2 + b)
(Wang & Li, arXiv 2311.14495; the authors' a = 1, b = 0.5) that the paper adopts: for every w,
Re(Lambda) lies in [-1/b, 0), so with Delta_k > 0 and dt_k > 0 every rule gives |A_bar_k| < 1,
and the gradient with respect to w stays bounded.  The imaginary part theta is free.

Initialisation (the paper follows S5; its open details follow the authors' code):

- Lambda: the HiPPO-N eigenvalues in J blocks of size d_state / J, imaginary parts included
  (Re = -1/2, so w = sqrt((2 - b) / a); theta = the HiPPO frequencies).
- Delta: b_dt = softplus^{-1}(dt) with dt log-uniform in [dt_min, dt_max], W_dt uniform in
  +-rank^{-1/2}, W_r LeCun normal; rank = ceil(H / 16) (as Mamba and the authors).
- B, C: S5's V^{-1} B (LeCun) and C V (complex normal); D ~ N(0, 1).
- W_B, W_C, W_D: Gaussian, scaled so that for unit-variance inputs the input-dependent part of
  each matrix has the variance of its constant part (the paper does not specify these).

The recurrence over (B, L, P) complex states runs through :func:`lrnnx.ops.linear_scan` in
complex64 (complex128 for a float64 model), also under autocast.  B_k u_k and C_k x_k are
evaluated without forming B_k, C_k, but through the (B, L, H^2) products u_k u_k^T and the
(B, L, P H) products x_k u_k^T: memory grows as B L H max(H, P).  The scan, the step, the
inference cache and their checks are event-driven S5's (:class:`lrnnx.models.ltv.s5._EventSSM`);
this module defines only S7's parameters and its input-dependent Delta_k, B_k, C_k, D_k.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrnnx.core.checks import ArgumentTypeError, check_positive_float, check_positive_int
from lrnnx.core.hippo import dplr_hippo_legs
from lrnnx.models.ltv.s5 import GammaBar, _EventSSM, check_step_size, param_dtype

#: the selective step is floored at this value when it is initialised (as Mamba and the authors)
_DT_INIT_FLOOR = 1e-4


def hippo_blocks(d_state: int, J: int, conj_sym: bool) -> Tuple[Tensor, Tensor]:
    """HiPPO-N eigen-decomposition repeated in J diagonal blocks (S5's block initialisation).

    Returns:
        Lambda (P,) complex128 with its imaginary parts, and V (d_state, P) block-diagonal
        complex128 eigenvectors, where P = d_state (or d_state // 2 with conj_sym: the
        eigenvalue of each conjugate pair with positive imaginary part).
    """
    n = d_state // J
    Lambda, V, _, _ = dplr_hippo_legs(n)
    if conj_sym:
        keep = Lambda.imag.argsort(descending=True)[: n // 2]
        Lambda, V = Lambda[keep], V[:, keep]
    return Lambda.repeat(J), torch.block_diag(*([V] * J))


def stable_real(w: Tensor, a: float, b: float) -> Tensor:
    """StableSSM's reparameterisation f(w) = -1 / (a w^2 + b): values in [-1/b, 0) for all w."""
    return -1.0 / (a * w * w + b)


class S7(_EventSSM):
    """S7: selective (input-dependent) S5 with a stable reparameterisation, for event streams too.

    Example:
        >>> model = S7(d_model=64, d_state=64, J=4)
        >>> x, dt = torch.randn(2, 128, 64), torch.rand(2, 128)
        >>> y = model(x, integration_timesteps=dt)  # (B, L, H) -> (B, L, H)

    Args:
        d_model: model width H (input and output features).
        d_state: state size P of the HiPPO-N initialisation (with ``conj_sym`` the model keeps
            d_state // 2 complex states, one per conjugate pair).
        J: number of HiPPO-N blocks on the diagonal (the paper's J); must divide d_state.
        discretization: ``"zoh"``, ``"bilinear"``, ``"dirac"`` or ``"async"`` (default; it equals
            ``"zoh"`` when no ``integration_timesteps`` are given).  See the module docstring.
        conj_sym: keep one eigenvalue of each conjugate pair and output 2 Re(C x).
        dt_min, dt_max: the selective step Delta_k is initialised around values log-uniform in
            [dt_min, dt_max] (through the bias b_dt).
        step_rescale: factor multiplying every step Delta_k (S5 / Event-SSM convention).
        dt_rank: rank of the step projection W_dt W_r; ``"auto"`` is ceil(d_model / 16).
        reparam_a, reparam_b: the a > 0 and 0 < b < 2 of f(w) = -1 / (a w^2 + b); Re(Lambda)
            stays in [-1/b, 0).  b < 2 so that HiPPO-N's Re(Lambda) = -1/2 is reachable.
        use_fast_path: if True, :func:`lrnnx.ops.linear_scan` dispatches to the fastest fused
            scan backend available for the device; if False, the portable pure-torch scan is
            used.  Both give the same result up to rounding.
        layer_idx: index of this layer in a stack, for callers that key caches by layer.
        device, dtype: factory arguments for the parameters (float32 or float64).

    The inference cache of :meth:`allocate_inference_cache` holds, besides ``"lrnn_state"``
    and ``"seqlen_offset"``, detached ``"Lambda"``, ``"B"``, ``"B_proj"``, ``"C"``,
    ``"C_proj"``, ``"D"``, ``"D_proj"``, ``"dt_down"``, ``"dt_proj_weight"`` and
    ``"dt_proj_bias"``.
    """

    allowed_discretizations = ("zoh", "bilinear", "dirac", "async")
    #: Delta_k comes from these projections: part of the recurrence, kept in float32 under a
    #: 16-bit whole-model cast like the other dynamics parameters
    _spectral_submodules = ("dt_down", "dt_proj")

    def __init__(
        self,
        d_model: int,
        d_state: int,
        J: int = 1,
        discretization: str = "async",
        conj_sym: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        step_rescale: float = 1.0,
        dt_rank: Union[int, str] = "auto",
        reparam_a: float = 1.0,
        reparam_b: float = 0.5,
        use_fast_path: bool = True,
        layer_idx: Optional[int] = None,
        device=None,
        dtype=None,
    ) -> None:
        if isinstance(discretization, bool):
            raise ArgumentTypeError(
                f"discretization: expected a name such as 'async', got {discretization!r}; the "
                f"4th positional argument of S7 is discretization here, while the original "
                f"lrnnx's is use_fast_path: pass use_fast_path (and what follows J) by keyword"
            )
        super().__init__(d_model, d_state, discretization, conj_sym, use_fast_path)
        d_model, d_state = self.d_model, self.d_state
        J = check_positive_int("J", J)
        if d_state % J:
            raise ValueError(f"J: expected a positive int dividing d_state={d_state}, got {J!r}")
        if conj_sym and (d_state // J) % 2:
            raise ValueError(
                f"d_state: with conj_sym=True each of the J={J} blocks must have an even size, "
                f"got d_state={d_state}"
            )
        check_step_size(dt_min, dt_max, step_rescale)
        if isinstance(dt_rank, str) and dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        dt_rank = check_positive_int("dt_rank", dt_rank)
        check_positive_float("reparam_a", reparam_a)
        if not 0 < check_positive_float("reparam_b", reparam_b) < 2:
            raise ValueError(
                f"reparam_b: expected 0 < b < 2 (Re(Lambda) = -1/2 of HiPPO-N must be reachable), "
                f"got {reparam_b!r}"
            )
        real = param_dtype(dtype)
        self.J = J
        self.dt_min, self.dt_max = float(dt_min), float(dt_max)
        self.step_rescale = float(step_rescale)
        self.dt_rank = dt_rank
        self.reparam_a, self.reparam_b = float(reparam_a), float(reparam_b)
        self.layer_idx = layer_idx
        P = d_state // 2 if conj_sym else d_state
        H = d_model
        fk = {"device": device, "dtype": real}

        self.Lambda_w = nn.Parameter(torch.empty(P, **fk))  # Re(Lambda) = -1 / (a w^2 + b)
        self.Lambda_im = nn.Parameter(torch.empty(P, **fk))  # Im(Lambda) = theta
        self.B = nn.Parameter(torch.empty(P, H, 2, **fk))  # constant part of B_k (complex)
        self.B_proj = nn.Parameter(torch.empty(P, H, H, 2, **fk))  # W_B[p, h, i]: u_i -> B_k[p, h]
        self.C = nn.Parameter(torch.empty(H, P, 2, **fk))  # constant part of C_k (complex)
        self.C_proj = nn.Parameter(torch.empty(H, P, H, 2, **fk))  # W_C[h, p, i]: u_i -> C_k[h, p]
        self.D = nn.Parameter(torch.empty(H, **fk))  # constant part of D_k
        self.D_proj = nn.Parameter(torch.empty(H, H, **fk))  # W_D[h, i]: u_i -> D_k[h]
        self.dt_down = nn.Linear(H, dt_rank, bias=False, **fk)  # W_r
        self.dt_proj = nn.Linear(dt_rank, P, bias=True, **fk)  # W_dt, b_dt
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as described in the module docstring (HiPPO-N spectrum, S5's B and C)."""
        H, P, N = self.d_model, self.n_state, self.d_state
        f64 = torch.float64
        Lambda, V = hippo_blocks(N, self.J, self.conj_sym)
        w = torch.sqrt((1.0 / (-Lambda.real) - self.reparam_b) / self.reparam_a)
        B = torch.randn(N, H, dtype=f64) / math.sqrt(H)  # LeCun normal, rotated into the eigenbasis
        B_tilde = V.conj().transpose(0, 1) @ B.to(V.dtype)
        C = torch.complex(torch.randn(H, N, dtype=f64), torch.randn(H, N, dtype=f64)) / math.sqrt(N)
        C_tilde = C @ V
        dt = torch.exp(
            torch.rand(P, dtype=f64) * (math.log(self.dt_max) - math.log(self.dt_min))
            + math.log(self.dt_min)
        ).clamp(min=_DT_INIT_FLOOR)
        inv_softplus_dt = dt + torch.log(-torch.expm1(-dt))
        with torch.no_grad():
            self.Lambda_w.copy_(w)
            self.Lambda_im.copy_(Lambda.imag)
            self.B.copy_(torch.view_as_real(B_tilde))
            self.C.copy_(torch.view_as_real(C_tilde))
            nn.init.normal_(self.D)
            # input-dependent parts: same variance as the constant parts for unit-variance u
            nn.init.normal_(self.B_proj, std=1.0 / (H * math.sqrt(2.0)))
            nn.init.normal_(self.C_proj, std=1.0 / math.sqrt(N * H))
            nn.init.normal_(self.D_proj, std=1.0 / math.sqrt(H))
            nn.init.normal_(self.dt_down.weight, std=1.0 / math.sqrt(H))
            bound = self.dt_rank**-0.5
            nn.init.uniform_(self.dt_proj.weight, -bound, bound)
            self.dt_proj.bias.copy_(inv_softplus_dt)

    # ------------------------------------------------------------------------------------------
    # _EventSSM's hooks; ``p`` holds the live parameters (forward) or the cache's copies (step)

    def _tensors(self) -> Dict[str, Tensor]:
        """Lambda (P,), B (P, H), W_B (P, H*H), C (H, P), W_C (H, P*H) complex; D, W_D, step weights."""
        P, H = self.n_state, self.d_model
        Lambda = torch.complex(
            stable_real(self.Lambda_w, self.reparam_a, self.reparam_b), self.Lambda_im
        )
        return {
            "Lambda": Lambda,
            "B": torch.view_as_complex(self.B),
            "B_proj": torch.view_as_complex(self.B_proj).reshape(P, H * H),
            "C": torch.view_as_complex(self.C),
            "C_proj": torch.view_as_complex(self.C_proj).reshape(H, P * H),
            "D": self.D,
            "D_proj": self.D_proj,
            "dt_down": self.dt_down.weight,
            "dt_proj_weight": self.dt_proj.weight,
            "dt_proj_bias": self.dt_proj.bias,
        }

    def _step_size(self, p: Dict[str, Tensor], u: Tensor) -> Tensor:
        """Selective step Delta_k (..., P) > 0 for inputs u (..., H)."""
        z = F.linear(F.linear(u, p["dt_down"]), p["dt_proj_weight"], p["dt_proj_bias"])
        return self.step_rescale * F.softplus(z)

    def _input(
        self, p: Dict[str, Tensor], u: Tensor, dtype: Optional[torch.dtype] = None
    ) -> Tensor:
        """B_k u_k = B u_k + W_B (u_k outer u_k), (..., P) complex.

        Computed in the parameters' precision with real products; ``dtype`` (the state's, in
        :meth:`step`) is reached by the in-place state update.
        """
        uu = (u[..., :, None] * u[..., None, :]).flatten(-2)  # (..., H*H), kept real
        B, W = p["B"], p["B_proj"]
        re = F.linear(u, B.real) + F.linear(uu, W.real)
        im = F.linear(u, B.imag) + F.linear(uu, W.imag)
        return torch.complex(re, im)

    def _output(self, p: Dict[str, Tensor], h: Tensor, u: Tensor) -> Tensor:
        """Re(C_k x_k) (times 2 with conj_sym) + D_k * u_k, (..., H) real."""
        hu = (h[..., :, None] * u[..., None, :].to(h.dtype)).flatten(-2)  # (..., P*H)
        Ch = h @ p["C"].to(h.dtype).transpose(0, 1) + hu @ p["C_proj"].to(h.dtype).transpose(0, 1)
        D_k = p["D"] + F.linear(u, p["D_proj"])
        return self.out_scale * Ch.real.to(u.dtype) + D_k * u

    # ------------------------------------------------------------------------------------------

    def discretize(
        self, x: Tensor, integration_timesteps: Optional[Tensor] = None
    ) -> Tuple[Tensor, GammaBar]:
        """The input-dependent transition for a sequence x (B, L, H).

        Returns:
            A_bar (B, L, P) complex and gamma_bar (B, L, P) (or 1.0 for ``dirac``).
        """
        self._check_forward_args(x, integration_timesteps, None)
        ts = self._timesteps(integration_timesteps)
        return self._discretize(self._tensors(), x.to(self.Lambda_w.dtype), ts)
