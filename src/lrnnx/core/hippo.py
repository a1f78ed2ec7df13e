"""HiPPO matrices and their diagonal-plus-low-rank (DPLR) forms (Gu et al. 2020-2022; S5, Smith et al. 2023)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def hippo_legs(N: int) -> tuple[np.ndarray, np.ndarray]:
    """HiPPO-LegS: A[n, k] = -sqrt(2n+1) sqrt(2k+1) for n > k, -(n+1) for n == k, 0 above.

    Returns (A (N, N), B (N,)) with B[n] = sqrt(2n+1).
    """
    q = np.sqrt(2 * np.arange(N) + 1.0)
    A = -np.tril(np.outer(q, q), -1) - np.diag(np.arange(N) + 1.0)
    return A, q.copy()


def dplr_hippo_legs(N: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Diagonalise the normal part of HiPPO-LegS (HiPPO-N).

    A = S - P P^T with P[n] = sqrt(n + 1/2) and S = -I/2 + (skew-symmetric); S = V diag(Lambda) V^*.

    Returns:
        Lambda (N,) complex128, real parts all -1/2; V (N, N) unitary complex128;
        P (N,) float64; B (N,) float64 (the LegS input vector).
    """
    A, B = hippo_legs(N)
    P = np.sqrt(np.arange(N) + 0.5)
    S = A + np.outer(P, P)
    lam_re = np.full(N, np.mean(np.diag(S)))
    # S + I/2 is skew-symmetric, so -i S is Hermitian up to the real shift: eigh is exact and stable
    lam_im, V = np.linalg.eigh(-1j * (S - np.diag(np.diag(S))))
    Lambda = lam_re + 1j * lam_im
    return (
        torch.from_numpy(Lambda),
        torch.from_numpy(V),
        torch.from_numpy(P),
        torch.from_numpy(B),
    )
