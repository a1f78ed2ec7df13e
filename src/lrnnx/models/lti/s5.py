"""S5: Simplified State Space Layers for Sequence Modeling (Smith, Warrington, Linderman, ICLR 2023).

One multi-input multi-output diagonal SSM per layer, in the eigenbasis V of HiPPO-N:

    Lambda, V = eig(HiPPO-N)        B_tilde = V^{-1} B        C_tilde = C V
    A_bar, gamma_bar = discretize(Lambda, Delta)               (Delta = exp(log_step), one per state)
    h_t = A_bar * h_{t-1} + gamma_bar * (B_tilde x_t)
    y_t = Re(C_tilde h_t) + D * x_t            (2 Re(.) with conj_sym: half of each conjugate pair)

``no_discretization`` learns the discrete eigenvalues directly as A_bar = exp(Lambda) (B unscaled),
initialised at the zero-order-hold image of the HiPPO spectrum; Re(Lambda) < 0 is kept for all
discretizations, so |A_bar| < 1 always (at most MAX_REAL_EIG; for ``no_discretization``, whose
Lambda is a continuous eigenvalue times a step, at most MAX_REAL_EIG * dt_min, so the initial
eigenvalues, down to -dt_min / 2, are inside the bound and train).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor

from lrnnx.core.checks import check_batch_size, check_bool, check_dt_range, check_positive_int
from lrnnx.core.hippo import dplr_hippo_legs
from lrnnx.models.lti.base import LTI_LRNN, cache_to_device, diagonal_powers

#: Re(Lambda) is kept at or below this, so every discretization stays strictly stable
MAX_REAL_EIG = -1e-4


def hippo_n_init(
    d_model: int, d_state: int, conj_sym: bool, dt_min: float, dt_max: float
) -> dict[str, Tensor]:
    """S5's initialisation, shared by the LTI and event-driven S5.

    Returns float32 tensors: Lambda_re, Lambda_im (P,), B (P, H, 2), C (H, P, 2), D (H,),
    log_step (P,), where P = d_state // 2 with conj_sym, else d_state.
    """
    if conj_sym and d_state % 2:
        raise ValueError(f"d_state: must be even with conj_sym=True, got {d_state}")
    Lambda, V, _, _ = dplr_hippo_legs(d_state)
    if conj_sym:
        # eigenvalues come in conjugate pairs; keep the half with positive imaginary part
        keep = Lambda.imag.argsort(descending=True)[: d_state // 2]
        Lambda, V = Lambda[keep], V[:, keep]
    P = Lambda.shape[0]
    Vinv = V.conj().transpose(0, 1)
    # B: LeCun-normal (fan-in H) in the HiPPO basis, then rotated into the eigenbasis
    B = torch.randn(d_state, d_model, dtype=torch.float64) / math.sqrt(d_model)
    B_tilde = Vinv @ B.to(Vinv.dtype)
    # C: complex normal with variance 1/d_state per part, rotated into the eigenbasis
    C = torch.complex(
        torch.randn(d_model, d_state, dtype=torch.float64),
        torch.randn(d_model, d_state, dtype=torch.float64),
    ) / math.sqrt(d_state)
    C_tilde = C @ V
    log_step = torch.rand(P, dtype=torch.float64) * (
        math.log(dt_max) - math.log(dt_min)
    ) + math.log(dt_min)
    return {
        "Lambda_re": Lambda.real.float(),
        "Lambda_im": Lambda.imag.float(),
        "B": torch.view_as_real(B_tilde).float(),
        "C": torch.view_as_real(C_tilde).float(),
        "D": torch.randn(d_model),
        "log_step": log_step.float(),
    }


class S5(LTI_LRNN):
    """Basic S5 state space model (LTI).

    Example:
        >>> model = S5(d_model=64, d_state=64, discretization="zoh")
        >>> y = model(torch.randn(2, 128, 64))  # (B, L, H) -> (B, L, H)
    """

    def __init__(
        self,
        d_model: int,
        d_state: int,
        discretization: str,
        conj_sym: bool = False,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        mode: str = "auto",
    ):
        super().__init__(discretization, mode=mode)
        d_model = check_positive_int("d_model", d_model)
        d_state = check_positive_int("d_state", d_state)
        conj_sym = check_bool("conj_sym", conj_sym)
        dt_min, dt_max = check_dt_range(dt_min, dt_max)
        self.d_model, self.d_state, self.conj_sym = d_model, d_state, conj_sym
        self.dt_min, self.dt_max = dt_min, dt_max
        #: the bound on Re(Lambda): Lambda_re above it is clamped (and gets no gradient)
        self.max_real = MAX_REAL_EIG
        if discretization == "no_discretization":
            self.max_real = MAX_REAL_EIG * dt_min  # scaled with the steps, as Lambda is
        self._init_parameters()
        self.out_scale = 2.0 if conj_sym else 1.0

    def _init_parameters(self) -> None:
        """HiPPO-N's spectrum and eigenbasis (:func:`hippo_n_init`): Lambda (P,), B (P, H),
        C (H, P), D (H,) and log_step (P,) log-uniform in [dt_min, dt_max]."""
        init = hippo_n_init(self.d_model, self.d_state, self.conj_sym, self.dt_min, self.dt_max)
        if self.discretization == "no_discretization":
            # learn log A_bar directly, starting from the ZOH image of the HiPPO spectrum
            step = init.pop("log_step").exp()  # (on the meta device under one: the spectrum too)
            init["Lambda_re"] = init["Lambda_re"].to(step.device) * step
            init["Lambda_im"] = init["Lambda_im"].to(step.device) * step
        for name in ("Lambda_re", "Lambda_im", "B", "C", "D", "log_step"):
            if name in init:
                self._set_parameter(name, init[name])

    @property
    def n_state(self) -> int:
        """Number of complex state channels (d_state, or d_state // 2 with conj_sym)."""
        return self.Lambda_re.shape[0]

    def _lambda(self) -> Tensor:
        return torch.complex(self.Lambda_re.clamp(max=self.max_real), self.Lambda_im)

    def discretize(self) -> tuple[Tensor, Union[Tensor, float], Tensor]:
        """A_bar (N,), gamma_bar (N,) or 1.0, and C_tilde (H, N) complex."""
        Lambda = self._lambda()
        if self.discretization == "no_discretization":
            A_bar, gamma_bar = torch.exp(Lambda), 1.0
        else:
            A_bar, gamma_bar = self.discretize_fn(Lambda, torch.exp(self.log_step))
        return A_bar, gamma_bar, torch.view_as_complex(self.C)

    def compute_kernel(
        self, L: int, A_bar: Tensor, gamma_bar: Union[Tensor, float]
    ) -> tuple[Tensor, Tensor]:
        """Powers A_bar^t (N, L) and the discrete input matrix B_bar = gamma_bar B_tilde (N, H)."""
        B_tilde = torch.view_as_complex(self.B)
        B_bar = B_tilde * (gamma_bar[:, None] if isinstance(gamma_bar, Tensor) else gamma_bar)
        return diagonal_powers(A_bar, L), B_bar

    def forward(
        self,
        x: Tensor,
        integration_timesteps: Optional[Tensor] = None,
        lengths: Optional[Tensor] = None,
        inference_cache: Optional[Dict[str, Any]] = None,
        *,
        cu_seqlens: Optional[Tensor] = None,
    ) -> Tensor:
        """(B, L, H) -> (B, L, H). ``lengths`` (B,) zeroes padded outputs; an ``inference_cache``
        supplies the initial state and receives the final one.

        ``cu_seqlens`` (S + 1,) int64: x is (1, T, H) holding S sequences back to back (fla's
        convention); the result equals running each alone.  They always run through the scan
        with resets (see :class:`LTI_LRNN`); a cache then holds one state per sequence (S, N).
        ValueError for ``lengths`` with ``cu_seqlens``, a batch other than 1 or bad offsets.
        """
        self._check_forward_args(x, integration_timesteps, lengths)
        A_bar, gamma_bar, C = self.discretize()
        L = x.shape[1]
        if cu_seqlens is None and self._use_fft(L, x.device):
            K, B_bar = self.compute_kernel(L, A_bar, gamma_bar)
        else:
            K, B_bar = None, self.compute_kernel(1, A_bar, gamma_bar)[1]
        return self._diagonal_ssm(
            x,
            A_bar,
            B_bar,
            C,
            self.D,
            lengths,
            inference_cache,
            self.out_scale,
            powers=K,
            cu_seqlens=cu_seqlens,
        )

    def allocate_inference_cache(
        self,
        batch_size: int,
        max_seqlen: int = 1,
        dtype: Optional[torch.dtype] = None,
        device: Optional[Union[torch.device, str]] = None,
    ) -> Dict[str, Any]:
        """Zero state (B, N) complex64 plus A_bar, B_bar, C and D.

        ``max_seqlen`` and ``dtype`` are unused; ``device``: where the cache is allocated
        (default: the parameters' device).
        """
        check_batch_size(batch_size)
        with torch.no_grad():  # the cache is for inference: constants, not graph nodes
            m = self._step_matrices()
        state = torch.zeros(
            batch_size, self.n_state, dtype=m["A_bar"].dtype, device=m["A_bar"].device
        )
        # copies, never the parameters themselves: the cache is a snapshot of the model, which
        # an optimizer step or load_state_dict after the allocation must not half-update
        cache = {"lrnn_state": state, **{k: v.detach().clone() for k, v in m.items()}}
        cache["seqlen_offset"] = 0
        return cache_to_device(cache, device)

    def _step_matrices(self) -> Dict[str, Tensor]:
        """A_bar (N,), B_bar (N, H), C (H, N) and D (H,) from the parameters as they are."""
        A_bar, gamma_bar, C = self.discretize()
        _, B_bar = self.compute_kernel(1, A_bar, gamma_bar)
        return {"A_bar": A_bar, "B_bar": B_bar, "C": C, "D": self.D}

    def step(self, x: Tensor, inference_cache: Dict[str, Any]) -> tuple[Tensor, Dict[str, Any]]:
        """x (B, H) -> y (B, H); the state in the cache advances by one step."""
        return self._diagonal_step(x, inference_cache, self.out_scale)
