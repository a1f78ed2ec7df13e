"""Tolerances for comparing a computed tensor with a reference, shared by the test files.

The rule: an error is measured against the magnitude of the expected values, never against a
fixed absolute bound, and the allowance comes from the precision the result was computed in::

    max |actual - expected|  <=  factor * tol(dtype, L) * max |expected|

    tol(float32 / complex64, L)   = 1e-5 * sqrt(L)    (eps = 1.2e-7)
    tol(float64 / complex128, L)  = 1e-12 * sqrt(L)   (eps = 2.2e-16)
    tol(bfloat16, L)              = 1e-2 * sqrt(L)    (eps = 7.8e-3)
    tol(float16, L)               = 2e-3 * sqrt(L)    (eps = 9.8e-4)

``L`` is the number of steps a rounding error can accumulate over (a recurrence's length; 1 for
a result that is only rounded once), whose errors grow like a random walk, hence sqrt(L).
``factor`` widens the allowance for a computation known to amplify rounding (say, a gradient
through a long product); a test that needs a large factor should say why.

Never assert bitwise equality between results of separately built, cast or loaded models, or
of different code paths (chunked vs. whole, batched vs. single row): another CPU's vector width
or thread count reorders reductions.  Exact equality is only for values that are copied or
masked (zeros in padding, a state passed through untouched).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: relative tolerance of a result rounded once, per dtype
BASE = {
    torch.float32: 1e-5,
    torch.complex64: 1e-5,
    torch.float64: 1e-12,
    torch.complex128: 1e-12,
    torch.bfloat16: 1e-2,
    torch.float16: 2e-3,
}


def tol(dtype: torch.dtype, length: int = 1) -> float:
    """Relative tolerance for a result computed in ``dtype`` over ``length`` steps."""
    return BASE[dtype] * math.sqrt(max(1, length))


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected| (compared in the wider of the two dtypes)."""
    dtype = torch.promote_types(actual.dtype, expected.dtype)
    a, e = actual.detach().to(dtype), expected.detach().to(dtype)
    scale = e.abs().max().item() if e.numel() else 0.0
    err = (a - e).abs().max().item() if e.numel() else 0.0
    if scale == 0.0:
        return 0.0 if err == 0.0 else math.inf
    return err / scale


def assert_close_rel(
    actual: Tensor,
    expected: Tensor,
    *,
    dtype: torch.dtype | None = None,
    length: int = 1,
    factor: float = 1.0,
    msg: str = "",
) -> None:
    """Assert ``max|actual - expected| <= factor * tol(dtype, length) * max|expected|``.

    ``dtype`` is the precision ``actual`` was computed in (default: its dtype); ``expected`` is
    usually the same quantity from a float64 reference.  Shapes must match exactly.
    """
    assert actual.shape == expected.shape, f"{msg}: shape {actual.shape} != {expected.shape}"
    assert actual.is_complex() == expected.is_complex(), f"{msg}: complex vs real"
    dtype = actual.dtype if dtype is None else dtype
    assert torch.isfinite(actual).all(), f"{msg}: non-finite values"
    bound = factor * tol(dtype, length)
    err = rel_err(actual, expected)
    assert err <= bound, (
        f"{msg}: relative error {err:.3g} > {bound:.3g} "
        f"(= {factor} * tol({dtype}, L={length})), scale {expected.abs().max().item():.3g}"
    )
