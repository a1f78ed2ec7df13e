"""S4D: On the Parameterization and Initialization of Diagonal State Space Models
(Gu, Gupta, Goel, Re, NeurIPS 2022, arXiv 2206.11893).

Each of the H features runs a diagonal SSM; one state of each conjugate pair is kept:

    x'(t) = A x(t) + B u(t),   A = diag(A_n),  Re(A_n) < 0
    dA, dB = discretize(A, Delta) B        zoh:      dA = exp(Delta A),  dB = (exp(Delta A) - 1)/A B
                                           bilinear: dA = (1 + Delta A/2)/(1 - Delta A/2),
                                                     dB = Delta/(1 - Delta A/2) B
                                           dirac:    dA = exp(Delta A),  dB = B
    K_l = 2 Re( sum_n C_n dB_n dA_n^l )    (a Vandermonde product; no factor 2 when ``is_real``)
    y = K * u + D u

Initialisations (``init``): S4D-LegS ('legs' / 'diag-legs': the diagonal of the normal part of
HiPPO-LegS with its B), S4D-Inv ('diag-inv': A_n = -1/2 + i N/pi (N/(2n+1) - 1)), S4D-Lin
('diag-lin': A_n = -1/2 + i pi n), S4D-Real ('diag-real' with ``is_real``: A_n = -(n+1)) and the
other names of :func:`lrnnx.models.lti._s4_block.ssm_init` (the low-rank term is dropped).
The recurrent mode is the same diagonal recurrence x_t = dA x_{t-1} + dB u_t.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lrnnx.core.checks import merge_alias
from lrnnx.core.hippo import NPLR_MEASURES
from lrnnx.models.lti._s4_block import (
    KERNEL_MAX_ELEMENTS,
    S4BlockBase,
    check_kernel_name,
    check_original_init_options,
)
from lrnnx.ops import linear_scan


def vandermonde(v: Tensor, x: Tensor, L: int, max_elements: Optional[int] = None) -> Tensor:
    """out[..., h, l] = sum_n v[..., h, n] exp(l x[h, n])  for l = 0..L-1.

    Computed without the (H, N, L) Vandermonde matrix and with O(sqrt(L)) exponentials per
    (h, n) instead of L: with l = q b + r (0 <= r < b, b ~ sqrt(L)),
    exp(l x) = exp(r x) exp(q b x), so out[..., h, q b + r] = sum_n (v exp(r x))[..., h, n, r]
    exp(q b x)[h, n, q], one batched matrix product over h (:func:`_vandermonde_block`).  The
    split is exact up to rounding (two exponentials and one product per term instead of one
    exponential; the phase l Im(x) is formed as r Im(x) + q b Im(x)).  The steps are taken in
    chunks whose (H, N, steps) Vandermonde block would hold at most ``max_elements`` entries
    (default :data:`KERNEL_MAX_ELEMENTS`), recomputed chunk by chunk under autograd.

    Args:
        v: (..., H, N).  x: (H, N) (log of the discrete eigenvalues).  Real or complex.
    Returns:
        (..., H, L) in the promoted dtype.
    """
    dtype = torch.promote_types(v.dtype, x.dtype)
    v, x = v.to(dtype), x.to(dtype)
    H, N = x.shape
    budget = KERNEL_MAX_ELEMENTS if max_elements is None else max_elements
    chunk = max(1, budget // max(H * N, 1))
    if chunk >= L:
        return _vandermonde_block(v, x, 0, L)
    recompute = torch.is_grad_enabled() and (v.requires_grad or x.requires_grad)
    out = []
    for s in range(0, L, chunk):
        n = min(chunk, L - s)
        if recompute:
            out.append(checkpoint(_vandermonde_block, v, x, s, n, use_reentrant=False))
        else:
            out.append(_vandermonde_block(v, x, s, n))
    return torch.cat(out, dim=-1)


def _vandermonde_block(v: Tensor, x: Tensor, start: int, length: int) -> Tensor:
    """Steps start .. start + length - 1 of :func:`vandermonde`: (..., H, length)."""
    b = 1 << max(0, math.ceil(math.log2(max(length, 1)) / 2))  # ~ sqrt(length), a power of 2
    q_count = -(-length // b)
    real = x.real.dtype
    r = torch.arange(start, start + b, dtype=real, device=x.device)
    q = torch.arange(q_count, dtype=real, device=x.device) * b
    inner = v[..., None] * torch.exp(x[..., None] * r)  # (..., H, N, b): v exp((start + r) x)
    outer = torch.exp(x[..., None] * q)  # (H, N, Q): exp(q b x)
    out = torch.einsum("...hnr,hnq->...hqr", inner, outer)  # (..., H, Q, b)
    return out.reshape(*out.shape[:-2], q_count * b)[..., :length]


class S4D(S4BlockBase):
    """S4D block: diagonal SSM kernel via a Vandermonde product.

    Note: the second positional argument is ``bottleneck``, not ``d_state`` (the order of the
    original lrnnx and of state-spaces/s4): ``S4D(64, 16)`` builds a block whose SSM runs on
    64 // 16 = 4 features, and warns (UserWarning) that ``S4D(64, d_state=16)`` was probably
    meant.  Pass the state size by keyword.

    Same arguments as :class:`lrnnx.models.lti.s4.S4` (``rank`` only matters for inits that need
    it, as the low-rank term is dropped; ``kernel`` is None or 's4d', the diagonal Vandermonde
    kernel) plus the discretization, 'zoh' (default), 'bilinear' or 'dirac', given as ``disc``
    (the original lrnnx's name) or ``discretization`` (the name every other lrnnx model uses);
    both given with different values raise ValueError.

    Example:
        >>> model = S4D(d_model=64, d_state=64, l_max=1024)
        >>> y, _ = model(torch.randn(2, 64, 1024))  # transposed: (B, H, L) -> (B, H, L)
    """

    _name = "S4D"
    allowed_discretizations = ("zoh", "bilinear", "dirac")

    def __init__(
        self,
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
        disc: Optional[str] = None,
        *,
        discretization: Optional[str] = None,
        kernel: Optional[str] = None,
        swap_channels: bool = False,
        drop_kernel: float = 0.0,
        B_clip: float = 2.0,
        diagonalize_precision: bool = True,
        real_random: bool = False,
        real_scale: float = 1.0,
        imag_random: bool = False,
        imag_scale: float = 1.0,
        B_random: bool = False,
        B_init: str = "constant",
        B_scale: float = 1.0,
        P_scale: float = 1.0,
        normalize: bool = False,
    ):
        disc = merge_alias("disc", disc, "discretization", discretization, default="zoh")
        if disc not in self.allowed_discretizations:
            raise ValueError(
                f"disc: expected one of {list(self.allowed_discretizations)}, got {disc!r}"
            )
        check_kernel_name("S4D", kernel)
        check_original_init_options(
            dict(
                B_clip=B_clip,
                diagonalize_precision=diagonalize_precision,
                real_random=real_random,
                real_scale=real_scale,
                imag_random=imag_random,
                imag_scale=imag_scale,
                B_random=B_random,
                B_init=B_init,
                B_scale=B_scale,
                P_scale=P_scale,
                normalize=normalize,
            )
        )
        super().__init__(
            disc,
            d_model,
            bottleneck=bottleneck,
            gate=gate,
            final_act=final_act,
            postact=postact,
            dropout=dropout,
            tie_dropout=tie_dropout,
            transposed=transposed,
            l_max=l_max,
            channels=channels,
            d_state=d_state,
            dt_min=dt_min,
            dt_max=dt_max,
            dt_tie=dt_tie,
            dt_transform=dt_transform,
            dt_fast=dt_fast,
            rank=rank,
            n_ssm=n_ssm,
            init=init,
            deterministic=deterministic,
            real_transform=real_transform,
            imag_transform=imag_transform,
            is_real=is_real,
            lr=lr,
            wd=wd,
            verbose=verbose,
            swap_channels=swap_channels,
            drop_kernel=drop_kernel,
        )
        self.disc = disc

    def _init_ssm(self) -> None:
        # the low-rank term is dropped, so build the init with whatever rank it needs
        A, _, B, C = self._init_abc(max(self.rank, max(NPLR_MEASURES.values())))
        self._register_abc(A, B, C)

    @property
    def state_dim(self) -> int:
        """Kept states per feature: d_state // 2 (complex) or d_state (real)."""
        return self.N

    def discretize(self) -> Tuple[Tensor, Tensor, Tensor]:
        """dA (H, N), dB (H, N) and C (channels, H, N) of the diagonal system."""
        dt, A = self._dt(), self._A_diag()
        dA, gamma = self.discretize_fn(A, dt)
        return dA, gamma * self._B(), self._C()

    def _log_dA(self, dA: Tensor) -> Tensor:
        if self.disc in ("zoh", "dirac"):
            return self._dt() * self._A_diag()  # exact: dA = exp(Delta A)
        # bilinear: dA may be a negative real for real SSMs, so take the complex logarithm
        cdtype = torch.complex128 if dA.real.dtype == torch.float64 else torch.complex64
        return torch.log(dA.to(cdtype))

    def compute_kernel(
        self, L: int, state: Optional[Tensor] = None
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Kernel K (channels, H, L) and the response C dA^{l+1} x_{-1} to a state (B, C, H, L)."""
        dA, dB, C = self.discretize()
        v = (C * dB)[None]
        if state is not None:
            v = torch.cat([v, C[None] * (dA * state.to(dA.dtype))[:, None]], dim=0)
        K = vandermonde(v, self._log_dA(dA), L, self.kernel_max_elements)
        K = K.real if self.is_real else 2 * K.real
        return K[0], (K[1:] if state is not None else None)

    def _state_matrices(self) -> Tuple[Tensor, Tensor]:
        dA, dB, _ = self.discretize()
        return dA.to(self.state_dtype), dB.to(self.state_dtype)

    def _step_system(self) -> Dict[str, Tensor]:
        """dA, dB (H, N) and dC (channels, H, N) of the diagonal recurrence."""
        dA, dB, dC = self.discretize()
        return {"dA": dA.to(self.state_dtype), "dB": dB.to(self.state_dtype), "dC": dC}

    def _packed_ssm(
        self, uf: Tensor, h0: Optional[Tensor], cu: Tensor
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Packed sequences (uf (1, H, T), offsets ``cu`` (S + 1,), ``h0`` (S, H, N)) through
        the diagonal recurrence x_t = dA x_{t-1} + dB u_t with resets at the sequence starts
        (:func:`lrnnx.ops.linear_scan` with ``cu_seqlens``): y (1, C, H, T) and the final
        states (S, H, N) (or None).

        The block's convolution is that recurrence with its kernel cut at ``l_max`` and, while
        training, kernel dropout; when either applies (a sequence longer than ``l_max``, or
        ``drop_kernel`` > 0 in training) the padded-batch convolution of the base class runs
        instead, so the result is always each sequence as if run alone."""
        kernel_dropout = self.training and isinstance(self.kernel_dropout, nn.Dropout)
        too_long = self.l_max is not None and int((cu[1:] - cu[:-1]).max()) > self.l_max
        if kernel_dropout or too_long:
            return super()._packed_ssm(uf, h0, cu)
        dA, dB, C = self.discretize()
        b = dB * uf[0].transpose(0, 1)[..., None].to(dB.dtype)  # (T, H, N)
        h, final = linear_scan(
            dA, b[None], initial_state=h0, output_final_state=True, cu_seqlens=cu
        )
        y = torch.einsum("chn,thn->cht", C.to(h.dtype), h[0])
        y = (y.real if self.is_real else 2 * y.real)[None] + self.D[..., None] * uf[:, None]
        if h0 is None:  # as the convolution path: a final state only for a given initial one
            return y, None
        return y, final

    def _ssm_step(self, u: Tensor, cache: Dict[str, Any], graph: bool = False) -> Tensor:
        x = cache["lrnn_state"]
        if graph:
            x_new = cache["dA"] * x.clone() + cache["dB"] * u[..., None]
            x.copy_(x_new)
        else:
            x_new = x.mul_(cache["dA"]).add_(cache["dB"] * u[..., None])
        y = (cache["dC"] * x_new[:, None]).sum(-1)  # (B, C, H)
        return y if self.is_real else 2 * y.real
