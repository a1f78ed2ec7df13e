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

Evaluation.  B_k and C_k are never formed.  With W_B (P, H, H) and W_C (H, P, H),

    B_k u_k = B u_k + [u_k^T W_B[p] u_k]_p               a quadratic form in u_k
    Re(C_k x_k) = Re(C x_k) + [sum_{p,i} Re(W_C[h, p, i] x_k[p]) u_k[i]]_h     bilinear in (x_k, u_k)

are evaluated exactly in chunks of tokens inside custom autograd functions: a chunk forms
T = u W^T (tokens, 2 P H) with one matrix product and contracts it with u (or with
(Re x, -Im x)); the backward recomputes T chunk by chunk.  Only the symmetric part of each
W_B[p] enters a quadratic form, which saves the backward one product; the imaginary part of
C_k x_k is never computed.  Nothing of size L H^2 or L P H outlives a chunk (about 8 MB,
``_CHUNK_ELEMENTS``), so memory is that of S5 plus the weights and one chunk.

Cost per token (real multiply-adds, forward; H = d_model, P complex states, r_dt = dt_rank):

    W_B term  2 P H^2      W_C term  2 P H^2      B u, Re(C x)  4 P H      D_k  H^2
    Delta_k   r_dt (H + P)          scan and discretization  O(P)

The two bilinear maps dominate: at H = 256, P = 16 about 4.3M multiply-adds per token forward
(about 15M forward and backward: 3 chunked products for W_B, 4 for W_C) against about 0.45M
(1.4M) for a Mamba layer of the same width (expand 2, N = 16).  The paper's parameterisation is
therefore about 10x Mamba's arithmetic: no implementation can run it at Mamba's speed.

Low-rank option (``bc_rank=r``; ours, not the paper's).  W_B and W_C are replaced by rank-r CP
factorisations of the same bilinear maps, W_B[p, h, i] = sum_s U_B[p, s] R_B[s, h] V_B[s, i]
and W_C[h, p, i] = sum_s U_C[h, s] V_C[s, p] R_C[s, i]:

    B_k u_k = B u_k + U_B ((R_B u_k) * (V_B u_k))        R_B, V_B (r, H) real, U_B (P, r) complex
    C_k x_k = C x_k + U_C ((R_C u_k) * (V_C x_k))        R_C (r, H) real, V_C (r, P), U_C (H, r)
                                                          complex

at 5 r H + 6 r P multiply-adds per token instead of 4 P H^2 (r = 16 at H = 256, P = 16: 22K
instead of 4.2M; the layer then costs about 0.25x Mamba's arithmetic).  Its factors are
Gaussian, scaled so that for unit-variance inputs the input-dependent parts have the variance
of the paper version's (E|entry|^2: R, V 1/H; V_C 1/P; U_B 1/r; U_C 2 P / (d_state r)).  Every
W_B, W_C has a CP rank of at most P H, so r = P H holds the paper's model; r = H / 16
(``bc_rank="auto"``) is our suggested default, chosen for speed.

The recurrence over (B, L, P) complex states runs through :func:`lrnnx.ops.linear_scan` in
complex64 (complex128 for a float64 model), also under autocast.  The scan, the step, the
inference cache and their checks are event-driven S5's (:class:`lrnnx.models.ltv.s5._EventSSM`);
this module defines only S7's parameters and its input-dependent Delta_k, B_k, C_k, D_k.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Dict, Iterator, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lrnnx.core.autograd import graph_by_formula, transformed
from lrnnx.core.base import assign_
from lrnnx.core.checks import ArgumentTypeError, check_positive_float, check_positive_int
from lrnnx.core.hippo import dplr_hippo_legs
from lrnnx.layers.linear import Linear, dt_projection, normal
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


def _auto_rank(name: str, rank: Union[int, str], d_model: int) -> int:
    """A rank argument: a positive int, or ``"auto"`` for ceil(d_model / 16)."""
    if isinstance(rank, str) and rank == "auto":
        return math.ceil(d_model / 16)
    return check_positive_int(name, rank)


def _stack_rows(w: Tensor) -> Tensor:
    """(R, ..., 2) real pairs of a complex (R, ...) tensor -> (2R, ...) = [Re; Im]."""
    return torch.cat([w[..., 0], w[..., 1]], dim=0)


def _stack_columns(w: Tensor) -> Tensor:
    """(R, K, ..., 2) real pairs of a complex (R, K, ...) tensor -> (R, 2K, ...) = [Re, Im]."""
    return torch.cat([w[..., 0], w[..., 1]], dim=1)


# ----------------------------------------------------------------------------------------------
# The paper's bilinear maps, evaluated exactly in chunks of tokens (module docstring: "Evaluation")

#: a chunk has about this many elements in its (rows, O * J) intermediate (8 MB in float32)
_CHUNK_ELEMENTS = 1 << 21


def _row_chunks(n: int, width: int) -> Iterator[slice]:
    """Slices of ``n`` rows whose (rows, width) intermediates hold about _CHUNK_ELEMENTS."""
    rows = max(1, _CHUNK_ELEMENTS // max(1, width))
    return (slice(s, min(s + rows, n)) for s in range(0, n, rows))


def _contract(T: Tensor, a: Tensor) -> Tensor:
    """z[n, o] = sum_j T[n, o, j] a[n, j] for T (n, O * J) and a (n, J)."""
    # vecdot, not bmm: a batch of matrix-vector products runs ~10x slower through bmm on CPU
    return torch.linalg.vecdot(T.view(a.shape[0], -1, a.shape[1]), a[:, None, :])


def _contract_grad(T: Tensor, dz: Tensor, J: int) -> Tensor:
    """da[n, j] = sum_o dz[n, o] T[n, o, j] for T (n, O * J) and dz (n, O)."""
    return torch.bmm(dz[:, None, :], T.view(dz.shape[0], dz.shape[1], J)).squeeze(1)


def _outer(dz: Tensor, a: Tensor) -> Tensor:
    """dT[n, o * J + j] = dz[n, o] a[n, j]: the gradient of T in z = _contract(T, a)."""
    return (dz[:, :, None] * a[:, None, :]).flatten(1)


def _form_forward(a: Tensor, b: Tensor, W: Tensor) -> Tensor:
    """z[n, o] = sum_{j, i} W[o, j, i] a[n, j] b[n, i] for a (n, J), b (n, I), W (O, J, I), in
    chunks of rows (:func:`_row_chunks`): T = b W^T (rows, O * J) contracted with a."""
    Wm = W.reshape(-1, W.shape[-1])
    z = a.new_empty(a.shape[0], W.shape[0])
    for s in _row_chunks(a.shape[0], Wm.shape[0]):
        z[s] = _contract(b[s] @ Wm.T, a[s])
    return z


class _BilinearForm(torch.autograd.Function):
    """z[n, o] = sum_{j, i} W[o, j, i] a[n, j] b[n, i] for a (n, J), b (n, I), W (O, J, I).

    Each chunk of rows forms T = b W^T (rows, O * J), then contracts it with a; the backward
    recomputes T.  Nothing of size n * J * I or n * O * J outlives a chunk.
    """

    @staticmethod
    def forward(ctx: Any, a: Tensor, b: Tensor, W: Tensor) -> Tensor:
        ctx.save_for_backward(a, b, W)
        return _form_forward(a, b, W)

    @staticmethod
    @graph_by_formula(lambda ctx: (_bilinear_formula, ctx.saved_tensors))
    def backward(ctx: Any, dz: Tensor) -> Tuple[Optional[Tensor], ...]:
        a, b, W = ctx.saved_tensors
        need_a, need_b, need_W = ctx.needs_input_grad
        Wm = W.reshape(-1, W.shape[-1])
        da = torch.empty_like(a) if need_a else None
        db = torch.empty_like(b) if need_b else None
        dWm = torch.zeros_like(Wm) if need_W else None
        for s in _row_chunks(a.shape[0], Wm.shape[0]):
            if need_a:
                da[s] = _contract_grad(b[s] @ Wm.T, dz[s], a.shape[1])
            dT = _outer(dz[s], a[s])
            if need_b:
                db[s] = dT @ Wm
            if need_W:
                dWm.addmm_(dT.T, b[s])
        return da, db, None if dWm is None else dWm.view_as(W)


def _bilinear_formula(a: Tensor, b: Tensor, W: Tensor) -> Tensor:
    """:class:`_BilinearForm`'s z in one einsum (differentiable at every order; its (n, O, J)
    intermediate is for second derivatives only)."""
    return torch.einsum("oji,nj,ni->no", W, a, b)


class _QuadraticForm(torch.autograd.Function):
    """z[n, o] = u[n]^T S[o] u[n] for u (n, H) and a symmetric S (O, H, H).

    As :class:`_BilinearForm` with a = b = u, but symmetry gives du = 2 sum_o dz[o] S[o] u from
    the recomputed T = u S^T alone: three chunked matrix products in all instead of four.
    """

    @staticmethod
    def forward(ctx: Any, u: Tensor, S: Tensor) -> Tensor:
        ctx.save_for_backward(u, S)
        return _form_forward(u, u, S)

    @staticmethod
    @graph_by_formula(lambda ctx: (_quadratic_formula, ctx.saved_tensors))
    def backward(ctx: Any, dz: Tensor) -> Tuple[Optional[Tensor], ...]:
        u, S = ctx.saved_tensors
        need_u, need_S = ctx.needs_input_grad
        Sm = S.reshape(-1, S.shape[-1])
        du = torch.empty_like(u) if need_u else None
        dSm = torch.zeros_like(Sm) if need_S else None
        for s in _row_chunks(u.shape[0], Sm.shape[0]):
            if need_u:
                du[s] = 2.0 * _contract_grad(u[s] @ Sm.T, dz[s], u.shape[1])
            if need_S:
                dSm.addmm_(_outer(dz[s], u[s]).T, u[s])
        return du, None if dSm is None else dSm.view_as(S)


def _quadratic_formula(u: Tensor, S: Tensor) -> Tensor:
    """:class:`_QuadraticForm`'s z as :func:`_bilinear_formula` with a = b = u."""
    return _bilinear_formula(u, u, S)


def bilinear_form(a: Tensor, b: Tensor, W: Tensor) -> Tensor:
    """z[..., o] = sum_{j, i} W[o, j, i] a[..., j] b[..., i], differentiable, in bounded memory.

    Evaluated in chunks of rows (:class:`_BilinearForm`): neither a (..., J * I) outer product
    nor a (..., O * J) intermediate is formed beyond a chunk of about ``_CHUNK_ELEMENTS``.

    Args:
        a: (..., J) and b: (..., I) real tensors with the same leading shape, in W's dtype.
        W: (O, J, I) real.

    Returns:
        z (..., O).
    """
    lead = a.shape[:-1]
    a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    # torch.func transforms and forward AD take the one-einsum formula (no vmap/jvp rules)
    z = _bilinear_formula(a2, b2, W) if transformed(a, b, W) else _BilinearForm.apply(a2, b2, W)
    return z.reshape(*lead, W.shape[0])


def quadratic_form(u: Tensor, S: Tensor) -> Tensor:
    """z[..., o] = u[...]^T S[o] u[...], differentiable, in bounded memory (no (..., H * H)).

    Args:
        u: (..., H) real, in S's dtype.
        S: (O, H, H) real and symmetric in its last two dimensions (the gradient with respect
            to u assumes it: pass the symmetric part (W + W^T) / 2 of a general W).

    Returns:
        z (..., O).
    """
    u2 = u.reshape(-1, u.shape[-1])
    z = _quadratic_formula(u2, S) if transformed(u, S) else _QuadraticForm.apply(u2, S)
    return z.reshape(*u.shape[:-1], S.shape[0])


class S7(_EventSSM):
    """S7: selective (input-dependent) S5 with a stable reparameterisation, for event streams too.

    Example:
        >>> model = S7(d_model=64, d_state=64, J=4)
        >>> x, dt = torch.randn(2, 128, 64), torch.rand(2, 128)
        >>> y = model(x, integration_timesteps=dt)  # (B, L, H) -> (B, L, H)
        >>> fast = S7(d_model=256, d_state=16, bc_rank="auto")  # low-rank W_B, W_C (r = 16)

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
        bc_rank: None (default) for the paper's full maps W_B (P, H, H) and W_C (H, P, H);
            an int r (or ``"auto"``: ceil(d_model / 16)) for our rank-r factorisation of both
            (not the paper's; see the module docstring: 5 r H + 6 r P instead of 4 P H^2
            multiply-adds per token).
        use_fast_path: if True, :func:`lrnnx.ops.linear_scan` dispatches to the fastest fused
            scan backend available for the device; if False, the portable pure-torch scan is
            used.  Both give the same result up to rounding.
        layer_idx: index of this layer in a stack, for callers that key caches by layer.
        device, dtype: factory arguments for the parameters (float32 or float64).

    Parameters (complex ones stored as (..., 2) real pairs): ``Lambda_w``, ``Lambda_im`` (P,);
    ``B`` (P, H, 2); ``C`` (H, P, 2); ``D`` (H,); ``D_proj`` (H, H); ``dt_down``, ``dt_proj``;
    with ``bc_rank=None`` ``B_proj`` (P, H, H, 2) = W_B and ``C_proj`` (H, P, H, 2) = W_C;
    with a rank r ``B_proj_in`` (2, r, H) = (R_B, V_B), ``B_proj_out`` (P, r, 2) = U_B,
    ``C_proj_in`` (r, H) = R_C, ``C_proj_state`` (r, P, 2) = V_C, ``C_proj_out`` (H, r, 2) = U_C.

    The inference cache of :meth:`allocate_inference_cache` holds, besides ``"lrnn_state"``
    and ``"seqlen_offset"``, detached real forms of these (``"Lambda"``, ``"B"``, ``"C"``,
    ``"D"``, ``"D_proj"``, ``"dt_down"``, ``"dt_proj_weight"``, ``"dt_proj_bias"`` and the
    ``"B_proj*"``, ``"C_proj*"`` entries of :meth:`_tensors`).

    Raises:
        ValueError / TypeError: a bad argument (named in the message), e.g. ``J`` not dividing
            ``d_state`` or ``bc_rank`` neither None, ``"auto"`` nor a positive int.
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
        bc_rank: Union[int, str, None] = None,
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
        dt_rank = _auto_rank("dt_rank", dt_rank, d_model)
        bc_rank = None if bc_rank is None else _auto_rank("bc_rank", bc_rank, d_model)
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
        self.dt_rank, self.bc_rank = dt_rank, bc_rank
        self.reparam_a, self.reparam_b = float(reparam_a), float(reparam_b)
        self.layer_idx = layer_idx
        P = d_state // 2 if conj_sym else d_state
        H = d_model
        fk = {"device": device, "dtype": real}

        self.Lambda_w = nn.Parameter(torch.empty(P, **fk))  # Re(Lambda) = -1 / (a w^2 + b)
        self.Lambda_im = nn.Parameter(torch.empty(P, **fk))  # Im(Lambda) = theta
        self.B = nn.Parameter(torch.empty(P, H, 2, **fk))  # constant part of B_k (complex)
        self.C = nn.Parameter(torch.empty(H, P, 2, **fk))  # constant part of C_k (complex)
        if bc_rank is None:
            # W_B[p, h, i]: u_i -> B_k[p, h];  W_C[h, p, i]: u_i -> C_k[h, p]  (complex)
            self.B_proj = nn.Parameter(torch.empty(P, H, H, 2, **fk))
            self.C_proj = nn.Parameter(torch.empty(H, P, H, 2, **fk))
        else:
            self.B_proj_in = nn.Parameter(torch.empty(2, bc_rank, H, **fk))  # R_B, V_B
            self.B_proj_out = nn.Parameter(torch.empty(P, bc_rank, 2, **fk))  # U_B (complex)
            self.C_proj_in = nn.Parameter(torch.empty(bc_rank, H, **fk))  # R_C
            self.C_proj_state = nn.Parameter(torch.empty(bc_rank, P, 2, **fk))  # V_C (complex)
            self.C_proj_out = nn.Parameter(torch.empty(H, bc_rank, 2, **fk))  # U_C (complex)
        self.D = nn.Parameter(torch.empty(H, **fk))  # constant part of D_k
        self.D_proj = nn.Parameter(torch.empty(H, H, **fk))  # W_D[h, i]: u_i -> D_k[h]
        self.dt_down = Linear(H, dt_rank, bias=False, **fk)  # W_r
        self.dt_down.init_fn = functools.partial(normal, std=1.0 / math.sqrt(H))
        self.dt_proj = Linear(dt_rank, P, bias=True, **fk)  # W_dt, b_dt
        self.dt_proj.init_fn = functools.partial(
            dt_projection, dt_min=self.dt_min, dt_max=self.dt_max, dt_init_floor=_DT_INIT_FLOOR
        )
        self.reset_parameters()

    def _reset_parameters(self) -> None:
        """Initialise as described in the module docstring (HiPPO-N spectrum, S5's B and C);
        the dt projections as their own ``init_fn`` does."""
        H, N = self.d_model, self.d_state
        f64 = torch.float64
        Lambda, V = hippo_blocks(N, self.J, self.conj_sym)
        w = torch.sqrt((1.0 / (-Lambda.real) - self.reparam_b) / self.reparam_a)
        B = torch.randn(N, H, dtype=f64) / math.sqrt(H)  # LeCun normal, rotated into the eigenbasis
        B_tilde = V.conj().transpose(0, 1) @ B.to(V.dtype)
        C = torch.complex(torch.randn(H, N, dtype=f64), torch.randn(H, N, dtype=f64)) / math.sqrt(N)
        C_tilde = C @ V
        with torch.no_grad():
            assign_(self.Lambda_w, w)
            assign_(self.Lambda_im, Lambda.imag)
            assign_(self.B, torch.view_as_real(B_tilde))
            assign_(self.C, torch.view_as_real(C_tilde))
            nn.init.normal_(self.D)
            self._reset_input_dependent()
            nn.init.normal_(self.D_proj, std=1.0 / math.sqrt(H))
            self.dt_down.reset_parameters()
            self.dt_proj.reset_parameters()

    def _reset_input_dependent(self) -> None:
        """W_B, W_C (or their factors): for unit-variance u, E|W_B (u x u)|^2 = E|B u|^2 ~ 1 and
        E|W_C (x x u)|^2 = (2 P / d_state) E|x|^2, the constant parts' variances."""
        H, P, N, r = self.d_model, self.n_state, self.d_state, self.bc_rank
        if r is None:
            nn.init.normal_(self.B_proj, std=1.0 / (H * math.sqrt(2.0)))  # E|W_B|^2 = 1 / H^2
            nn.init.normal_(self.C_proj, std=1.0 / math.sqrt(N * H))  # E|W_C|^2 = 2 / (N H)
            return
        # R u, V u, V_C x have the variance of one u_i (of x_p); U sums r unit-variance products
        nn.init.normal_(self.B_proj_in, std=1.0 / math.sqrt(H))
        nn.init.normal_(self.B_proj_out, std=1.0 / math.sqrt(2.0 * r))
        nn.init.normal_(self.C_proj_in, std=1.0 / math.sqrt(H))
        nn.init.normal_(self.C_proj_state, std=1.0 / math.sqrt(2.0 * P))
        nn.init.normal_(self.C_proj_out, std=math.sqrt(P / (N * r)))

    # ------------------------------------------------------------------------------------------
    # _EventSSM's hooks; ``p`` holds the live parameters (forward) or the cache's copies (step)

    def _tensors(self) -> Dict[str, Tensor]:
        """The real forms the hooks compute with (complex matrices as stacked real parts).

        Lambda (P,) complex; B (2P, H) = [Re B; Im B]; C (H, 2P) = [Re C, Im C], so that
        Re(C x) = C [Re x; -Im x]; D, D_proj, the step weights; with the paper's maps B_proj
        (2P, H, H) = the symmetric part of [Re W_B; Im W_B] and C_proj (H, 2P, H) =
        [Re W_C, Im W_C] along p; with a rank r B_proj_in (2r, H) = [R_B; V_B], B_proj_out
        (2P, r) = [Re U_B; Im U_B], C_proj_in (r, H), C_proj_state (r, P) complex and
        C_proj_out (H, 2r) = [Re U_C, Im U_C].
        """
        Lambda = torch.complex(
            stable_real(self.Lambda_w, self.reparam_a, self.reparam_b), self.Lambda_im
        )
        p = {
            "Lambda": Lambda,
            "B": _stack_rows(self.B),
            "C": _stack_columns(self.C),
            "D": self.D,
            "D_proj": self.D_proj,
            "dt_down": self.dt_down.weight,
            "dt_proj_weight": self.dt_proj.weight,
            "dt_proj_bias": self.dt_proj.bias,
        }
        if self.bc_rank is None:
            W_B = _stack_rows(self.B_proj)  # (2P, H, H)
            p["B_proj"] = 0.5 * (W_B + W_B.transpose(1, 2))  # u^T W u = u^T sym(W) u
            p["C_proj"] = _stack_columns(self.C_proj)
        else:
            p["B_proj_in"] = self.B_proj_in.flatten(0, 1)
            p["B_proj_out"] = _stack_rows(self.B_proj_out)
            p["C_proj_in"] = self.C_proj_in
            p["C_proj_state"] = torch.view_as_complex(self.C_proj_state)
            p["C_proj_out"] = _stack_columns(self.C_proj_out)
        return p

    def _step_size(self, p: Dict[str, Tensor], u: Tensor) -> Tensor:
        """Selective step Delta_k (..., P) > 0 for inputs u (..., H)."""
        z = F.linear(F.linear(u, p["dt_down"]), p["dt_proj_weight"], p["dt_proj_bias"])
        return self.step_rescale * F.softplus(z)

    def _input(
        self, p: Dict[str, Tensor], u: Tensor, dtype: Optional[torch.dtype] = None
    ) -> Tensor:
        """B_k u_k (..., P) complex: B u_k + [u_k^T W_B[p] u_k]_p (chunked quadratic forms), or
        with a rank r B u_k + U_B ((R_B u_k) * (V_B u_k)).

        Computed in the parameters' precision with real products; ``dtype`` (the state's, in
        :meth:`step`) is reached by the in-place state update.
        """
        if self.bc_rank is None:
            z = quadratic_form(u, p["B_proj"])
        else:
            Ru, Vu = F.linear(u, p["B_proj_in"]).chunk(2, dim=-1)
            z = F.linear(Ru * Vu, p["B_proj_out"])
        re, im = (F.linear(u, p["B"]) + z).chunk(2, dim=-1)
        return torch.complex(re, im)

    def _output(self, p: Dict[str, Tensor], h: Tensor, u: Tensor) -> Tensor:
        """Re(C_k x_k) (times 2 with conj_sym) + D_k * u_k, (..., H) real, for states h = x_k.

        Re(C_k x_k) is Re(C x_k) plus the chunked bilinear form of W_C, or with a rank r
        Re(U_C ((R_C u_k) * (V_C x_k))); computed in the state's real precision (wider than
        u's for a float64 step cache)."""
        a = torch.cat([h.real, -h.imag], dim=-1)  # Re(M x) = [Re M, Im M] @ a for complex M
        uh = u.to(a.dtype)
        if self.bc_rank is None:
            z = bilinear_form(a, uh, p["C_proj"].to(a.dtype))
        else:
            w = F.linear(uh, p["C_proj_in"].to(a.dtype)) * (h @ p["C_proj_state"].to(h.dtype).T)
            z = F.linear(torch.cat([w.real, -w.imag], dim=-1), p["C_proj_out"].to(a.dtype))
        Ch = F.linear(a, p["C"].to(a.dtype)) + z
        D_k = p["D"] + F.linear(u, p["D_proj"])
        return self.out_scale * Ch.to(u.dtype) + D_k * u

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
