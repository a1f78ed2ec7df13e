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


#: HiPPO measures with a normal-plus-low-rank (NPLR) form, and the rank each one needs
NPLR_MEASURES = {"legs": 1, "legt": 2, "fout": 1}
_MEASURE_ALIASES = {"fourier": "fout"}


def _measure_name(measure: str) -> str:
    name = _MEASURE_ALIASES.get(measure, measure)
    if name not in NPLR_MEASURES:
        valid = sorted(NPLR_MEASURES) + sorted(_MEASURE_ALIASES)
        raise ValueError(f"measure: expected one of {valid}, got {measure!r}")
    return name


def hippo_legt(N: int) -> tuple[np.ndarray, np.ndarray]:
    """HiPPO-LegT (translated Legendre) in the normalisation of the S4 code base.

    With R[n] = sqrt(2n+1): A[n, k] = -R[n] R[k] / 2 for n >= k and -(-1)^(n-k) R[n] R[k] / 2
    for n < k; B[n] = R[n] / 2 (both halved so the window has unit length on S4's timescale).
    """
    R = np.sqrt(2 * np.arange(N) + 1.0)
    n, k = np.meshgrid(np.arange(N), np.arange(N), indexing="ij")
    sign = np.where(n >= k, 1.0, (-1.0) ** (n - k))
    return -0.5 * np.outer(R, R) * sign, 0.5 * R


def hippo_fout(N: int) -> tuple[np.ndarray, np.ndarray]:
    """HiPPO-FouT (truncated Fourier basis) as in S4: a rotation per frequency minus B B^T.

    State 0 is the constant, states (2j, 2j+1) for j >= 1 the (cos, sin) pair of frequency j;
    state 1 (the sine of frequency 0) is identically zero.  N must be even.
    """
    if N % 2:
        raise ValueError(f"N: HiPPO-FouT needs an even state size, got {N}")
    freqs = np.zeros(N - 1)
    freqs[2::2] = np.arange(1, N // 2)  # coupling (2j, 2j+1) has frequency j
    rot = np.pi * (np.diag(freqs, -1) - np.diag(freqs, 1))
    B = np.zeros(N)
    B[0::2] = np.sqrt(2.0)
    B[0] = 1.0
    return rot - np.outer(B, B), B


def hippo_transition(measure: str, N: int) -> tuple[np.ndarray, np.ndarray]:
    """(A (N, N), B (N,)) float64 for measure 'legs', 'legt' or 'fout' (alias 'fourier')."""
    name = _measure_name(measure)
    return {"legs": hippo_legs, "legt": hippo_legt, "fout": hippo_fout}[name](N)


def hippo_rank_correction(measure: str, N: int, rank: int = 1) -> np.ndarray:
    """P (rank, N) such that A + sum_r P_r P_r^T is a multiple of I plus a skew-symmetric matrix.

    Rows beyond the measure's own rank (1 for LegS and FouT, 2 for LegT) are zero.
    """
    name = _measure_name(measure)
    need = NPLR_MEASURES[name]
    if rank < need:
        raise ValueError(f"rank: HiPPO-{name} needs a low-rank term of rank >= {need}, got {rank}")
    P = np.zeros((rank, N))
    if name == "legs":
        P[0] = np.sqrt(np.arange(N) + 0.5)
    elif name == "legt":
        # A + P P^T cancels the entries whose indices have the same parity
        R = np.sqrt(0.5 * (2 * np.arange(N) + 1.0))
        P[0, 1::2] = R[1::2]
        P[1, 0::2] = R[0::2]
    else:
        P[0] = hippo_fout(N)[1]
    return P


def nplr(
    measure: str, N: int, rank: int = 1, B_clip: float | None = None, tol: float = 1e-8
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normal-plus-low-rank form of a HiPPO matrix, keeping one eigenvalue of each conjugate pair.

    A = V_full (diag(W_full) - P_full P_full^*) V_full^*  and  B = V_full B_full, where
    ``X_full = [X, conj(X)]`` stacks the kept half with its conjugates and V_full is unitary.
    The free phase of each eigenvector is chosen so that B is real and non-negative (the S4 code
    base leaves it to the eigensolver, which makes its clipping of Im(B) basis dependent).

    Args:
        measure: 'legs', 'legt' or 'fout' ('fourier').
        N: state size (even).
        rank: rows of the low-rank term (at least the measure's own rank).
        B_clip: if given, clip Im(B) to [-B_clip, B_clip] (a no-op in the gauge used here, where
            B is real; kept for parity with the S4 code base, which uses 2.0).
        tol: eigenvalues of the skew part with |imag| below this count as zero.

    Returns:
        W (N/2,) complex128 with Im(W) <= 0 (most negative first); P (rank, N/2); B (N/2,);
        V (N, N/2), all complex128.
    """
    if N % 2:
        raise ValueError(f"N: the conjugate-pair NPLR form needs an even state size, got {N}")
    A, B = hippo_transition(measure, N)
    P = hippo_rank_correction(measure, N, rank)
    S = A + P.T @ P
    shift = float(np.mean(np.diag(S)))
    skew = S - shift * np.eye(N)
    err = np.abs(skew + skew.T).max()
    if err > 1e-8 * max(1.0, np.abs(skew).max()):
        raise RuntimeError(f"HiPPO-{measure}: A + P P^T is not normal (asymmetry {err:.2e})")
    # -i * skew is Hermitian: eigh gives the imaginary parts and a unitary basis exactly
    lam, U = np.linalg.eigh(-1j * skew)
    neg = lam < -tol
    zero = np.abs(lam) <= tol
    n_zero = int(zero.sum())
    if n_zero % 2 or int(neg.sum()) + n_zero // 2 != N // 2:
        raise RuntimeError(f"HiPPO-{measure}: eigenvalues do not come in conjugate pairs")
    V, W_im = [U[:, neg]], [lam[neg]]
    if n_zero:
        # a real orthonormal basis (a_i, b_i) of the null space gives the conjugate pairs
        # (a_i + i b_i) / sqrt(2) and (a_i - i b_i) / sqrt(2)
        Z = U[:, zero]
        Q, s, _ = np.linalg.svd(np.concatenate([Z.real, Z.imag], axis=1), full_matrices=False)
        Q = Q[:, :n_zero]
        V.append((Q[:, 0::2] + 1j * Q[:, 1::2]) / np.sqrt(2.0))
        W_im.append(np.zeros(n_zero // 2))
    V = np.concatenate(V, axis=1)
    W = shift + 1j * np.concatenate(W_im)
    # eigenvectors are defined up to a phase: fix it so that B = V^* B is real and >= 0
    B_t = V.conj().T @ B
    mag = np.abs(B_t)
    V = V * np.where(mag > tol, B_t / np.maximum(mag, tol), 1.0)[None, :]
    B_t = V.conj().T @ B
    P_t = P @ V.conj()  # (rank, N/2): row r is V^* P_r
    if B_clip is not None:
        B_t = B_t.real + 1j * np.clip(B_t.imag, -B_clip, B_clip)
    return tuple(torch.from_numpy(np.ascontiguousarray(t)) for t in (W, P_t, B_t, V))
