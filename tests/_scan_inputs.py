"""Random inputs for selective_scan_fn, shared by the selective-scan test files."""

from __future__ import annotations

import torch
from torch import Tensor


def make_scan_inputs(
    form: str,
    cplx: bool,
    extras: bool = True,
    deltaA: bool = False,
    b: int = 2,
    d: int = 4,
    n: int = 3,
    L: int = 37,
    g: int = 2,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
) -> dict:
    """Keyword arguments of selective_scan_fn for B/C ``form`` "shared" (d, n), "input" (b, n, L)
    or "grouped" (b, g, n, L); complex A (and complex B/C for the shared and grouped forms) with
    ``cplx``; D, z, delta_bias with softplus and an initial state with ``extras``."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*s: int) -> Tensor:
        return torch.randn(*s, generator=gen, dtype=dtype)

    A = -(torch.rand(d, n, generator=gen, dtype=dtype) + 0.3)
    if cplx:
        A = torch.complex(A, 2 * rnd(d, n))
    shapes = {"shared": (d, n), "input": (b, n, L), "grouped": (b, g, n, L)}

    def bc() -> Tensor:
        X = rnd(*shapes[form])
        return torch.complex(X, rnd(*shapes[form])) if cplx and form != "input" else X

    kw = dict(
        u=rnd(b, d, L),
        delta=0.05 + 0.5 * torch.rand(b, d, L, generator=gen, dtype=dtype),
        A=A,
        B=bc(),
        C=bc(),
    )
    if extras:
        h0 = torch.complex(rnd(b, d, n), rnd(b, d, n)) if cplx else rnd(b, d, n)
        kw.update(
            D=rnd(d),
            z=rnd(b, d, L),
            delta_bias=0.3 * rnd(d),
            delta_softplus=True,
            initial_state=h0,
            delta=rnd(b, d, L),  # softplus keeps the step positive
        )
    if deltaA:
        kw["deltaA"] = 0.05 + torch.rand(b, d, L, generator=gen, dtype=dtype)
    return kw
