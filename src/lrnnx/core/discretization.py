"""Discretization of a diagonal continuous-time system dx/dt = A x + B u.

Every rule maps the continuous eigenvalues ``A`` and a positive step ``delta`` to a pair
``(A_bar, gamma_bar)`` such that the discrete recurrence is

    x_k = A_bar * x_{k-1} + gamma_bar * (B u_k)

All functions are element-wise and broadcast ``A`` against ``delta``; real and complex ``A``
are both accepted.  ``gamma_bar`` may be the Python float ``1.0`` when the rule leaves ``B``
unscaled.

============================  ===================================  ==============================
name                          A_bar                                gamma_bar
============================  ===================================  ==============================
``zoh``                       exp(delta A)                         (exp(delta A) - 1) / A
``bilinear`` (Tustin)         (1 + delta A / 2) / (1 - delta A / 2)  delta / (1 - delta A / 2)
``dirac``                     exp(delta A)                         1
``async`` (Event-SSM)         exp(delta * dt_k * A)                (exp(delta A) - 1) / A
``simplified_zoh``            exp(delta A)                         delta
``no_discretization``         A                                    1
============================  ===================================  ==============================

For ``Re(A) < 0`` and ``delta > 0`` every rule but ``no_discretization`` gives ``|A_bar| < 1``.
Only the exponential rules forget over a long step, though: as ``delta -> inf`` their A_bar
tends to 0, while ``bilinear``'s tends to -1 (A-stable, not L-stable), so after a long gap in
event mode a bilinear state comes back with its sign flipped instead of decayed away.
``async`` is the asynchronous rule of Event-SSM (arXiv 2404.18508): the state decays over the
elapsed time ``dt_k`` (``integration_timesteps``) scaled by the learned step while the input is
integrated over the learned step alone, so ``dt_k = 1`` recovers ``zoh``.  Given
``integration_timesteps`` the other rules discretize over the step ``delta * dt_k`` (as the event
models use them), and ``no_discretization`` refuses them.
``simplified_zoh`` keeps the exact decay of ``zoh`` but integrates the input with one Euler step
(gamma_bar = delta, the first-order term of (exp(delta A) - 1) / A): the default of the official
Centaurus code and of Mamba (see :func:`simplified_zoh`).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

GammaBar = Union[Tensor, float]
Discretization = Callable[..., tuple[Tensor, GammaBar]]


def _phi1(z: Tensor, A: Tensor) -> Tensor:
    """(exp(z) - 1) / A, accurate in value and gradient for every z with Re z <= 0.

    Near 0 the numerator is expm1(z) (exp(z) - 1 would cancel).  For Re z < -1 it is
    exp(z) - 1 (no cancellation there), because autograd differentiates expm1 through its
    result, d expm1(z) = expm1(z) + 1, whose rounding (one ulp of 1, ~1e-7 in float32) is all
    that is left once exp(z) underflows; the event models multiply that gradient by long
    elapsed times (relative errors of 100% and more), while exp's gradient is exp(z) itself.
    """
    real = z.real if z.is_complex() else z
    return torch.where(real < -1, torch.exp(z) - 1, torch.expm1(z)) / A


def _step(delta: Tensor, integration_timesteps: Optional[Tensor]) -> Tensor:
    """The step a rule discretizes over: ``delta``, or ``delta * dt_k`` with elapsed times (the
    event models' time-varying step, for every rule but ``async``, which splits them)."""
    return delta if integration_timesteps is None else delta * integration_timesteps


def zoh(A: Tensor, delta: Tensor, integration_timesteps: Optional[Tensor] = None):
    """Zero-order hold: the input is held constant over each step (of ``delta * dt_k`` with
    ``integration_timesteps`` dt_k, broadcast against ``delta * A``)."""
    delta = _step(delta, integration_timesteps)
    dA = delta * A
    return torch.exp(dA), _phi1(dA, A)


def bilinear(A: Tensor, delta: Tensor, integration_timesteps: Optional[Tensor] = None):
    """Bilinear (Tustin) transform: A_bar = (1 + dA/2) / (1 - dA/2), B_bar = delta / (1 - dA/2)
    (the step is ``delta * dt_k`` with ``integration_timesteps``)."""
    delta = _step(delta, integration_timesteps)
    half = delta * A / 2
    inv = 1.0 / (1.0 - half)
    return (1.0 + half) * inv, delta * inv


def dirac(A: Tensor, delta: Tensor, integration_timesteps: Optional[Tensor] = None):
    """Dirac-delta input: the impulse enters the state unscaled, A_bar = exp(delta A) (the step
    is ``delta * dt_k`` with ``integration_timesteps``)."""
    return torch.exp(_step(delta, integration_timesteps) * A), 1.0


def async_(A: Tensor, delta: Tensor, integration_timesteps: Optional[Tensor] = None):
    """Asynchronous (event) rule: decay over ``delta * dt_k``, integrate the input over ``delta``."""
    if integration_timesteps is None:
        return zoh(A, delta)
    dA = delta * A
    return torch.exp(dA * integration_timesteps), _phi1(dA, A)


def simplified_zoh(A: Tensor, delta: Tensor, integration_timesteps: Optional[Tensor] = None):
    """Simplified zero-order hold: A_bar = exp(delta A), B_bar = delta B.

    The decay is ``zoh``'s; the input is integrated by the rectangle rule, gamma_bar = delta, which
    agrees with ``zoh``'s (exp(delta A) - 1) / A to first order in delta.  This is the rule of the
    official Centaurus layers (Brainchip-Inc/Centaurus, ``centaurus/ssm.py``,
    ``Kernelizer.discretize``: the B / E weights times dt, the kernel exp(dt A l)) and of Mamba
    (Gu & Dao, arXiv 2312.00752, Sec. 3.5; ``selective_scan_fn(discretization="mamba")``).

    With ``integration_timesteps`` dt_k the step is ``delta * dt_k``.

    Returns:
        A_bar with the broadcast shape of ``delta * A``, and gamma_bar = ``delta`` broadcast to
        that shape (real: the input gain has no phase).
    """
    delta = _step(delta, integration_timesteps)
    dA = delta * A
    return torch.exp(dA), torch.broadcast_to(delta, dA.shape)


def no_discretization(A: Tensor, delta=None, integration_timesteps: Optional[Tensor] = None):
    """The parameters are already discrete: A_bar = A, B_bar = B.

    Raises:
        ValueError: for ``integration_timesteps``: a discrete A has no elapsed time to scale
            (the event models read such an A as exp(Lambda) per unit of time themselves).
    """
    if integration_timesteps is not None:
        raise ValueError(
            "integration_timesteps: 'no_discretization' takes A as already discrete and cannot "
            "scale it by elapsed times; use a rule with a step ('zoh', 'async', ...)"
        )
    return A, 1.0


DISCRETIZATIONS: dict[str, Discretization] = {
    "zoh": zoh,
    "bilinear": bilinear,
    "dirac": dirac,
    "async": async_,
    "simplified_zoh": simplified_zoh,
    "no_discretization": no_discretization,
}


def get_discretization(name: str, allowed: Optional[tuple[str, ...]] = None) -> Discretization:
    """Look up a discretization rule by name, raising a ``ValueError`` that lists the valid names."""
    valid = tuple(DISCRETIZATIONS) if allowed is None else allowed
    if not isinstance(name, str) or name not in valid:
        raise ValueError(f"discretization: expected one of {list(valid)}, got {name!r}")
    return DISCRETIZATIONS[name]
