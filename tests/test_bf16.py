"""bf16 autocast: the recurrence must run in float32, and these tests can tell if it does not.

A bf16 state loses about 2^-9 of itself at every step; over a long memory those losses add up
(and increments below half an ulp vanish), to several percent of the output.  A tolerance loose
enough for bf16 projections (~1%) can therefore still pass a bf16 recurrence on short,
fast-decaying sequences.  Here every model gets a long memory (|A_bar| within ~1e-3 of 1:
thousands of steps), no skip term D and L = 2048, and its autocast output is compared with

  (a) the float32 output: the relative error must stay within the case's allowance (the
      float32 tolerance for models that run their whole SSM outside autocast; two bf16
      roundings for Mamba and RG-LRU, whose input projections run in bf16), and
  (b) the same model stepped under autocast with its state rounded to bf16 after every step, a
      simulated bf16 recurrence: its error must exceed the allowance at least five times
      (observed: 8x for Mamba, 14x for RG-LRU, 80-280x for the others), so a model that
      accumulated in bf16 would fail (a).

S4 / S4D are convolutions in forward (no state is carried along the sequence); their bf16
check is the relative one in test_s4.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import test_rglru as tr
from _tol import rel_err, tol
from lrnnx.models.lti import LRU, S5, Centaurus
from lrnnx.models.ltv import RGLRU, Mamba
from lrnnx.models.ltv.s5 import S5 as EventS5
from lrnnx.models.ltv.s7 import S7

H, L = 8, 2048
F32 = tol(torch.float32, L)  # autocast leaves the model in float32
BF16 = 2 * tol(torch.bfloat16)  # bf16 input projections: a few roundings, nothing accumulated


def _no_skip(m: nn.Module) -> nn.Module:
    """D = 0 (and S7's input-dependent D): the output is the state's readout alone."""
    with torch.no_grad():
        for name in ("D", "D_proj"):
            if hasattr(m, name):
                getattr(m, name).zero_()
    return m


def _centaurus() -> nn.Module:
    m = Centaurus(H, 8, 4, mode="neck")
    with torch.no_grad():
        m.log_dt.fill_(math.log(1e-3))
    return m


def _mamba() -> nn.Module:
    m = Mamba(H, d_state=8)
    with torch.no_grad():  # |A| in [0.005, 0.02], delta <= 0.1: A_bar within 2e-3 of 1
        m.A_log.copy_(torch.log(0.005 + 0.015 * torch.rand_like(m.A_log)))
    return _no_skip(m)


# name -> (model factory, step input of x (B, L, H) at t, allowance for (a))
CASES = {
    "lru": (lambda: _no_skip(LRU(H, 16, r_min=0.999, r_max=0.9999)), lambda x, t: x[:, t], F32),
    "s5": (lambda: _no_skip(S5(H, 16, "zoh", dt_min=1e-4, dt_max=1e-3)), lambda x, t: x[:, t], F32),
    "centaurus": (_centaurus, lambda x, t: x[:, t], F32),
    "event-s5": (
        lambda: _no_skip(EventS5(H, 16, discretization="zoh", dt_min=1e-4, dt_max=1e-3)),
        lambda x, t: x[:, t : t + 1],
        F32,
    ),
    "s7": (
        lambda: _no_skip(S7(H, 16, J=2, discretization="zoh", step_rescale=0.01)),
        lambda x, t: x[:, t : t + 1],
        F32,
    ),
    "mamba": (_mamba, lambda x, t: x[:, t : t + 1], BF16),
    "rglru": (
        lambda: tr._randomize(RGLRU(H, num_heads=2), seed=3, ac_range=(0.999, 0.9999)),
        lambda x, t: x[:, t : t + 1],
        BF16,
    ),
}


@pytest.fixture(autouse=True)
def _one_thread():
    """2048 steps of tiny ops: handing each to a thread pool costs far more than the work
    (tens of seconds instead of a fraction of one on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _round_state_to_bf16(cache: dict) -> None:
    s = cache["lrnn_state"]
    if s.is_complex():
        s.copy_(torch.complex(s.real.bfloat16().float(), s.imag.bfloat16().float()))
    else:
        s.copy_(s.bfloat16().float())


@pytest.mark.parametrize("name", list(CASES))
def test_autocast_accumulates_in_float32(name):
    make, step_input, allow = CASES[name]
    torch.manual_seed(0)
    m = make()
    x = torch.randn(2, L, H, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y32 = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
            cache = m.allocate_inference_cache(2, L)
            assert cache["lrnn_state"].dtype in (torch.float32, torch.complex64)
            ys = []
            for t in range(L):
                ys.append(m.step(step_input(x, t), cache)[0].reshape(2, H))
                _round_state_to_bf16(cache)
    y_bf16_state = torch.stack(ys, 1)
    err, err_bf16_state = rel_err(y, y32), rel_err(y_bf16_state, y32)
    assert torch.isfinite(y).all()
    assert err <= allow, f"autocast output off by {err:.3g} of its scale (allowed {allow:.3g})"
    # the check above has teeth: a recurrence accumulated in bf16 misses it by 5x or more
    assert err_bf16_state >= 5 * allow, (err_bf16_state, allow)
