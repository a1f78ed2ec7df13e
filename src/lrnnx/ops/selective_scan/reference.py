"""Reference selective scan (S6, Mamba): the recurrence written as a loop. Slow; the specification.

For batch b, channel i, state index k and time t, with delta' = softplus(delta + delta_bias)
(or delta + delta_bias without softplus):

    A_bar, gamma_bar = discretize(A[i, k], delta'[b, i, t])     (A_bar from deltaA if given)
    h_t[k] = A_bar * h_{t-1}[k] + gamma_bar * B_t[k] * u_t
    y_t    = sum_k C_t[k] * h_t[k]          (2 * Re(...) when A is complex)
    y_t   += D[i] * u_t;   y_t *= silu(z_t)

With ``reverse`` time runs from the last step to the first: h_t = A_bar_t h_{t+1} + ..., the
initial state is h_L and the returned state is h_0 (the state after processing t = 0).

The helpers :func:`effective_delta` and :func:`discretize` are shared with the other backends,
so the formulas live in one place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lrnnx.core.discretization import DISCRETIZATIONS as _RULES
from lrnnx.core.discretization import GammaBar, dirac
from lrnnx.ops.linear_scan.packing import step_layout

#: discretization rules the selective scan accepts
DISCRETIZATIONS: tuple[str, ...] = ("mamba", "zoh", "bilinear", "dirac")


def effective_delta(delta: Tensor, delta_bias: Tensor | None, delta_softplus: bool) -> Tensor:
    """delta' = softplus(delta + bias) or delta + bias, for delta (b, d, L) and bias (d,)."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    return F.softplus(delta) if delta_softplus else delta


def discretize(
    A: Tensor, delta: Tensor, deltaA: Tensor | None, discretization: str
) -> tuple[Tensor, GammaBar]:
    """Element-wise (A_bar, gamma_bar) for ``A`` broadcast against ``delta`` (and ``deltaA``).

    ``"mamba"`` is exp(delta A) with gamma_bar = delta (B_bar = delta B, the Mamba paper's
    simplification of zoh); the others are the rules of :mod:`lrnnx.core.discretization`.
    ``deltaA`` (event mode) replaces ``delta`` in A_bar only; gamma_bar always uses ``delta``.
    """
    step_A = delta if deltaA is None else deltaA
    if discretization == "mamba":
        return dirac(A, step_A)[0], delta
    rule = _RULES[discretization]
    A_bar, gamma_bar = rule(A, delta)
    if deltaA is not None:
        A_bar = rule(A, deltaA)[0]
    return A_bar, gamma_bar


def _per_step(X: Tensor, batch: int, d: int) -> Tensor:
    """B or C as (b, d, L, n) or, when time-invariant, (d, 1, n) (broadcasts over b and L)."""
    if X.dim() == 2:  # (d, n)
        return X[:, None, :]
    g = X.shape[1]  # (b, g, n, L): channel i reads group i // (d // g)
    return X.repeat_interleave(d // g, dim=1).transpose(2, 3).expand(batch, d, -1, -1)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    discretization: str,
    deltaA: Tensor | None,
    initial_state: Tensor | None,
    reverse: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Loop over time (from the last step to the first with ``reverse``); autograd flows
    through it.

    Args (already validated and cast to one compute dtype by :func:`lrnnx.ops.selective_scan_fn`):
        u, delta: (b, d, L).  A: (d, n) real or complex.
        B, C: (d, n) time-invariant, or (b, g, n, L) with g dividing d.
        D, delta_bias: (d,) or None.  z, deltaA: (b, d, L) or None.
        initial_state: (b, d, n) (complex when A is) or None for zeros; h_L with ``reverse``.
        reverse: h_t = A_bar_t h_{t+1} + gamma_bar_t B_t u_t, from t = L - 1 down to 0.
        cu_seqlens: int64 offsets (S + 1,) of packed sequences (b = 1; validated by the
            dispatcher); initial_state is then (S, d, n).  Where a sequence's scan begins the
            state is replaced by its initial state (A_bar_t multiplies h0_s, not the carried
            state); where it ends its final state is recorded.

    Returns:
        y (b, d, L) real, and the state after the last processed step (b, d, n): h_{L-1}, or
        h_0 with ``reverse``; with ``cu_seqlens`` one per sequence, (S, d, n).
    """
    batch, d, _ = u.shape
    dt = effective_delta(delta, delta_bias, delta_softplus)
    A_bar, gamma_bar = discretize(
        A[:, None, :],
        dt[..., None],
        None if deltaA is None else deltaA[..., None],
        discretization,
    )  # A_bar (b, d, L, n); gamma_bar broadcasts to it
    Bu = gamma_bar * _per_step(B, batch, d) * u[..., None]  # (b, d, L, n)
    C_t = _per_step(C, batch, d).expand(batch, d, u.shape[2], -1)
    A_bar = A_bar.expand(Bu.shape)

    state_dtype = torch.promote_types(A_bar.dtype, Bu.dtype)
    nstates = batch if cu_seqlens is None else cu_seqlens.shape[0] - 1
    h = Bu.new_zeros(nstates, d, A.shape[1]) if initial_state is None else initial_state
    h = h.to(state_dtype)
    ys = []
    # unbind gives one view per step, so backward stays linear in L (x[..., t] would not)
    steps = list(zip(A_bar.unbind(2), Bu.unbind(2), C_t.unbind(2), strict=True))
    order = range(len(steps) - 1, -1, -1) if reverse else range(len(steps))
    if cu_seqlens is None:
        for t in order:
            a_t, bu_t, c_t = steps[t]
            h = a_t * h + bu_t
            ys.append((h * c_t).sum(-1))
    else:  # packed sequences, batch 1: restart from h0_s where sequence s begins
        seq, begins, ends = (x.tolist() for x in step_layout(cu_seqlens, reverse))
        h0s, finals = h.unbind(0), list(h.unbind(0))  # a zero-length sequence keeps its h0
        for t in order:
            a_t, bu_t, c_t = steps[t]
            if begins[t]:
                h = h0s[seq[t]][None]
            h = a_t * h + bu_t
            ys.append((h * c_t).sum(-1))
            if ends[t]:
                finals[seq[t]] = h[0]
        h = torch.stack(finals)
    if reverse:
        ys.reverse()  # ys[t] is step t again
    y = torch.stack(ys, dim=-1)
    if A.is_complex():  # conjugate-pair convention: the other half of the spectrum is implied
        y = 2 * y.real
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y, h
