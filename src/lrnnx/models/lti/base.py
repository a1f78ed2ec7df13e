"""Base class for LTI models: fixed dynamics, FFT convolution for training, recurrence for inference."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from lrnnx.core.base import LRNN
from lrnnx.core.checks import check_sequence, check_step_input, lengths_mask
from lrnnx.core.fftconv import causal_conv
from lrnnx.ops import linear_scan

#: how a forward pass evaluates the recurrence
MODES = ("fft", "scan", "auto")
#: "auto" uses the scan below this length and the FFT convolution from it on
AUTO_FFT_MIN_LEN = 64


def diagonal_powers(A_bar: Tensor, L: int) -> Tensor:
    """A_bar^t for t = 0..L-1, shape (..., L) for A_bar of shape (...).

    exp(t log A_bar) costs one complex exp per entry and its backward is a product, several times
    cheaper than complex pow; A^0 = 1 is set apart so that A_bar = 0 stays finite.
    """
    t = torch.arange(1, L, device=A_bar.device, dtype=A_bar.real.dtype)
    P = torch.exp(torch.log(A_bar)[..., None] * t)
    return torch.cat([torch.ones_like(A_bar)[..., None], P], dim=-1)


class LTI_LRNN(LRNN):
    """Base class for all LTI LRNN models.

    LTI models do not support the ``async`` discretization, which needs time-varying dynamics;
    event-driven models live in :mod:`lrnnx.models.ltv`.

    ``mode`` selects how ``forward`` runs the recurrence: ``"fft"`` (causal convolution with the
    kernel A^t, O(L log L)), ``"scan"`` (the recurrence via :func:`lrnnx.ops.linear_scan`) or
    ``"auto"``.  Both give the same result up to floating-point rounding.
    """

    allowed_discretizations = ("zoh", "bilinear", "dirac", "no_discretization")

    def __init__(self, discretization: str, mode: str = "fft"):
        if discretization == "async":
            raise ValueError(
                "discretization: 'async' needs time-varying dynamics and is not supported by LTI "
                "models; use a model from lrnnx.models.ltv, or one of "
                f"{list(self.allowed_discretizations)}"
            )
        super().__init__(discretization)
        self.mode = mode

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode: expected one of {list(MODES)}, got {value!r}")
        self._mode = value

    def _use_fft(self, L: int) -> bool:
        if self.mode == "auto":
            return L >= AUTO_FFT_MIN_LEN
        return self.mode == "fft"

    @abstractmethod
    def discretize(self) -> Tuple[Tensor, Any, Tensor]:
        """Discrete (A_bar, B_bar or its normaliser, C) from the continuous parameters."""

    @abstractmethod
    def compute_kernel(self, *args) -> Tuple[Tensor, Tensor]:
        """What the convolution needs: powers of A_bar (or A_bar itself) and the input matrix."""

    @abstractmethod
    def step(self, x: Tensor, inference_cache: Dict[str, Any]) -> Tuple[Tensor, Dict[str, Any]]:
        """One timestep: x (B, H) -> y (B, H); the cache's state is updated in place."""

    @abstractmethod
    def allocate_inference_cache(
        self, batch_size: int, max_seqlen: int = 1, dtype: Optional[torch.dtype] = None
    ) -> Dict[str, Any]:
        """Zero state plus the precomputed discrete matrices."""

    def _check_forward_args(self, x: Tensor, integration_timesteps: Optional[Tensor]) -> None:
        check_sequence(x, self.d_model)
        if integration_timesteps is not None:
            raise ValueError(
                f"integration_timesteps: {type(self).__name__} is time-invariant and cannot use "
                "irregular timesteps; pass None, or use an LTV model (lrnnx.models.ltv)"
            )

    def _diagonal_ssm(
        self,
        x: Tensor,
        A_bar: Tensor,
        B_bar: Tensor,
        C: Tensor,
        D: Optional[Tensor],
        lengths: Optional[Tensor] = None,
        inference_cache: Optional[Dict[str, Any]] = None,
        out_scale: float = 1.0,
        powers: Optional[Tensor] = None,
    ) -> Tensor:
        """Run the diagonal system h_t = A_bar h_{t-1} + B_bar x_t, y_t = out_scale Re(C h_t) + D x_t.

        Args:
            x: (B, L, H) real input.
            A_bar: (N,) complex discrete eigenvalues.  B_bar: (N, H).  C: (H, N).  D: (H,) or None.
            lengths: (B,) valid lengths; outputs past them are zero and the state stops there.
            inference_cache: if given, the scan starts from its ``"lrnn_state"`` (B, N) and the
                state at each sequence's end is written back (``seqlen_offset`` advances by L).
            out_scale: 2 for conjugate-symmetric models that keep half of each eigenvalue pair.
            powers: A_bar^t (N, L) when the caller already has them.

        Returns:
            y (B, L, H) in x's dtype; state arithmetic is float32/complex64 (or wider) always.
        """
        Bsz, L, _ = x.shape
        mask = lengths_mask(lengths, Bsz, L, x.device)
        h0 = None if inference_cache is None else inference_cache["lrnn_state"]
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
            u = xf.to(B_bar.dtype) @ B_bar.transpose(0, 1)  # (B, L, N)
            if mask is not None:
                u = u * mask[..., None]
            if self._use_fft(L):
                K = diagonal_powers(A_bar, L) if powers is None else powers
                h = causal_conv(u.transpose(1, 2), K).transpose(1, 2)  # (B, L, N)
                if h0 is not None:
                    h = h + (A_bar * K.transpose(0, 1))[None] * h0[:, None, :]
            else:
                h = linear_scan(A_bar, u, initial_state=h0)
            y = (h @ C.transpose(0, 1)).real * out_scale
            if D is not None:
                y = y + xf * D
            if mask is not None:
                y = y * mask[..., None]
        if inference_cache is not None:
            self._store_final_state(inference_cache, h, lengths)
        return y.to(x.dtype)

    def _diagonal_step(
        self, x: Tensor, cache: Dict[str, Any], out_scale: float = 1.0
    ) -> Tuple[Tensor, Dict[str, Any]]:
        """One step of h = A_bar h + B_bar x, y = out_scale Re(C h) + D x with the cached matrices.

        x is (B, H) (or (B, 1, H)); the state is updated in place, so no per-step allocation
        beyond the products themselves.
        """
        x = check_step_input(x, self.d_model)
        h = cache["lrnn_state"]
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        h.mul_(cache["A_bar"]).add_(xf.to(h.dtype) @ cache["B_bar"].transpose(0, 1))
        y = (h @ cache["C"].transpose(0, 1)).real * out_scale
        if cache.get("D") is not None:
            y = y + xf * cache["D"]
        cache["seqlen_offset"] = cache.get("seqlen_offset", 0) + 1
        return y.to(x.dtype), cache

    @staticmethod
    def _store_final_state(cache: Dict[str, Any], h: Tensor, lengths: Optional[Tensor]) -> None:
        """Write each sequence's state at its own last valid step into the cache."""
        if lengths is None:
            final = h[:, -1]
        else:
            # padded inputs were zeroed, so the state past a sequence's end only decays: read the
            # state at length-1 directly (length 0 keeps the incoming state).
            idx = (lengths.to(h.device) - 1).clamp(min=0)
            final = h.gather(1, idx.view(-1, 1, 1).expand(-1, 1, h.shape[-1]))[:, 0]
            final = torch.where((lengths == 0).to(h.device)[:, None], cache["lrnn_state"], final)
        cache["lrnn_state"].copy_(final.detach())
        cache["seqlen_offset"] = cache.get("seqlen_offset", 0) + h.shape[1]
