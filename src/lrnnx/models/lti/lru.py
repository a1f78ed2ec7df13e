"""Linear Recurrent Unit (Orvieto et al., "Resurrecting Recurrent Neural Networks for Long
Sequences", arXiv 2303.06349).

    h_t = Lambda * h_{t-1} + gamma * (B x_t)        Lambda = exp(-exp(nu_log) + i exp(theta_log))
    y_t = Re(C h_t) + D * x_t                        gamma  = exp(gamma_log) = sqrt(1 - |Lambda|^2)

The eigenvalues are initialised uniformly on the ring r_min <= |Lambda| <= r_max with phase in
[0, max_phase]; the exponential parameterisation keeps |Lambda| < 1 throughout training.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor

from lrnnx.core.checks import check_batch_size, check_positive_float, check_positive_int
from lrnnx.models.lti.base import LTI_LRNN, cache_to_device


class LRU(LTI_LRNN):
    """Linear Recurrent Unit (LRU) layer.

    Example:
        >>> model = LRU(d_model=64, d_state=64)
        >>> y = model(torch.randn(2, 128, 64))  # (B, L, H) -> (B, L, H)
    """

    def __init__(
        self,
        d_model: int,
        d_state: int,
        r_min: float = 0,
        r_max: float = 1,
        max_phase: float = 2 * math.pi,
        mode: str = "auto",
    ) -> None:
        super().__init__("no_discretization", mode=mode)
        d_model = check_positive_int("d_model", d_model)
        d_state = check_positive_int("d_state", d_state)
        r_min = check_positive_float("r_min", r_min, allow_zero=True)
        r_max = check_positive_float("r_max", r_max)
        max_phase = check_positive_float("max_phase", max_phase)
        if not 0 <= r_min < r_max <= 1:
            raise ValueError(
                f"r_min, r_max: expected 0 <= r_min < r_max <= 1, got {r_min}, {r_max}"
            )
        self.d_model, self.d_state = d_model, d_state
        self.r_min, self.r_max, self.max_phase = r_min, r_max, max_phase
        self._init_parameters()

    def _init_parameters(self) -> None:
        """Lambda uniform on the ring r_min <= |Lambda| <= r_max with phase in [0, max_phase]
        (as nu_log, theta_log), gamma_log = log sqrt(1 - |Lambda|^2), complex normal B (N, H)
        and C (H, N) with variances 1/(2H) and 1/N per part, D (H,) ~ N(0, 1) (Orvieto et
        al., arXiv 2303.06349)."""
        H, N = self.d_model, self.d_state
        r_min, r_max = self.r_min, self.r_max
        u1, u2 = torch.rand(N), torch.rand(N)
        # |Lambda|^2 uniform in [r_min^2, r_max^2]: uniform density on the ring
        radius_sq = u1 * (r_max**2 - r_min**2) + r_min**2
        nu = -0.5 * torch.log(radius_sq.clamp(min=1e-12))
        theta = self.max_phase * u2
        self._set_parameter("nu_log", torch.log(nu.clamp(min=1e-12)))
        self._set_parameter("theta_log", torch.log(theta.clamp(min=1e-12)))
        gamma = torch.sqrt((1 - radius_sq).clamp(min=1e-12))
        self._set_parameter("gamma_log", torch.log(gamma))
        self._set_parameter("B_re", torch.randn(N, H) / math.sqrt(2 * H))
        self._set_parameter("B_im", torch.randn(N, H) / math.sqrt(2 * H))
        self._set_parameter("C_re", torch.randn(H, N) / math.sqrt(N))
        self._set_parameter("C_im", torch.randn(H, N) / math.sqrt(N))
        self._set_parameter("D", torch.randn(H))

    def _lambda(self) -> Tensor:
        return torch.exp(torch.complex(-torch.exp(self.nu_log), torch.exp(self.theta_log)))

    def _matrices(self) -> tuple[Tensor, Tensor, Tensor]:
        """Lambda (N,), B (N, H) and C (H, N), complex."""
        return (
            self._lambda(),
            torch.complex(self.B_re, self.B_im),
            torch.complex(self.C_re, self.C_im),
        )

    def discretize(self) -> tuple[Tensor, Tensor, Tensor]:
        """LRU is parameterised in discrete time; this assembles its matrices.

        Returns:
            A (N, N) diagonal matrix of Lambda, B (N, H) complex, C (H, N) complex.
        """
        Lambda, B, C = self._matrices()
        return torch.diag(Lambda), B, C

    def compute_kernel(self, L: int, Lambda: Tensor, B_complex: Tensor) -> tuple[Tensor, Tensor]:
        """Lambda (N,) and the gamma-normalised input matrix B_norm (N, H)."""
        return Lambda, B_complex * torch.exp(self.gamma_log)[:, None]

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
        # the diagonal is used as a vector: no (N, N) matrix on the training path
        Lambda, B, C = self._matrices()
        Lambda, B_norm = self.compute_kernel(x.shape[1], Lambda, B)
        return self._diagonal_ssm(
            x, Lambda, B_norm, C, self.D, lengths, inference_cache, cu_seqlens=cu_seqlens
        )

    def allocate_inference_cache(
        self,
        batch_size: int,
        max_seqlen: int = 1,
        dtype: Optional[torch.dtype] = None,
        device: Optional[Union[torch.device, str]] = None,
    ) -> Dict[str, Any]:
        """``{"lrnn_state": zeros (B, N) complex64 (complex128 for a float64 model),
        "A_bar": Lambda (N,), "B_bar": gamma-normalised B (N, H), "C": (H, N), "D": (H,),
        "seqlen_offset": 0}``: copies of the parameters as they are now.

        ``max_seqlen`` and ``dtype`` are unused; ``device``: where the cache is allocated
        (default: the parameters' device).
        """
        check_batch_size(batch_size)
        with torch.no_grad():  # the cache is for inference: constants, not graph nodes
            m = self._step_matrices()
        state = torch.zeros(
            batch_size, self.d_state, dtype=m["A_bar"].dtype, device=m["A_bar"].device
        )
        # copies, never the parameters themselves (see S5.allocate_inference_cache)
        cache = {"lrnn_state": state, **{k: v.detach().clone() for k, v in m.items()}}
        cache["seqlen_offset"] = 0
        return cache_to_device(cache, device)

    def _step_matrices(self) -> Dict[str, Tensor]:
        """A_bar = Lambda (N,), the gamma-normalised B_bar (N, H), C (H, N) and D (H,) from
        the parameters as they are."""
        Lambda, B, C = self._matrices()
        Lambda, B_norm = self.compute_kernel(1, Lambda, B)
        return {"A_bar": Lambda, "B_bar": B_norm, "C": C, "D": self.D}

    def step(self, x: Tensor, inference_cache: Dict[str, Any]) -> tuple[Tensor, Dict[str, Any]]:
        """x (B, H) -> y (B, H); the state in the cache advances by one step."""
        return self._diagonal_step(x, inference_cache)
