"""Runs the Triton ops on CPU tensors under Triton's interpreter; driven by
test_triton_interpret.py in a subprocess.

``triton.jit`` decides at decoration time (when ``lrnnx.ops.*.triton`` is imported) whether a
kernel is compiled for a GPU or interpreted with numpy, so ``TRITON_INTERPRET=1`` has to be in
the environment before anything in the process imports those modules.  A fresh interpreter
guarantees that whatever other test modules imported first.

Importing this module imports neither Triton nor the Triton backends (the parent reads the case
names from it).  Usage: ``TRITON_INTERPRET=1 python _triton_interpret_worker.py OUT.pt``.  Writes
``{case_id: {"L": int, "launches": {...}, "pairs": {name: (triton float32, reference float64)}}}``
with torch.save; the parent test asserts on it.  Exits with status 3 (message on stderr) when
Triton cannot be imported, so the parent can skip.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import Tensor

from _scan_inputs import make_scan_inputs
from lrnnx.ops import _dispatch, linear_scan, selective_scan_fn

LAUNCHES = {"linear_scan": 0, "ss_forward": 0, "ss_backward": 0}
#: the ``reverse`` of each selective-scan forward launch (native reverse: the kernels' REVERSE)
SS_REVERSE: list = []


def _count_launches() -> None:
    """Wrap the kernel launchers so each case can prove the kernels (not a fallback) ran."""
    from lrnnx.ops.linear_scan import triton as ls_triton
    from lrnnx.ops.selective_scan import triton as ss_triton

    assert ls_triton.INTERPRET and ss_triton.INTERPRET
    kernel = ls_triton.scan_kernel

    def scan_kernel(*args, **kwargs):
        LAUNCHES["linear_scan"] += 1
        return kernel(*args, **kwargs)

    ls_triton.scan_kernel = scan_kernel  # looked up at call time by ls_triton.linear_scan
    for name in ("forward", "backward"):
        orig = getattr(ss_triton._Plan, name)

        def spy(self, *args, _orig=orig, _name=name, **kwargs):
            LAUNCHES["ss_" + _name] += 1
            if _name == "forward":
                SS_REVERSE.append(self.reverse)
            return _orig(self, *args, **kwargs)

        setattr(ss_triton._Plan, name, spy)


def _wide(t: Tensor) -> Tensor:
    return t.to(torch.complex128 if t.is_complex() else torch.float64)


# ---------------------------------------------------------------------------------------------
# linear_scan: h_t = a_t h_{t-1} + b_t, with an initial state, forward or reverse


# The interpreter runs tl.associative_scan one element at a time (about 0.1 ms per element of a
# 64 x 16 tile, 3x that for complex), so the shapes are as small as the kernel's structure allows:
# L = 70 is a full 64-step tile plus a partial one (the carry between tiles), 21 channels are a
# full 16-wide channel block and a masked one, B = 2 checks the batch offsets.
LS_CASES = {
    "linear_scan-float32-fwd-L70": dict(dtype=torch.float32, reverse=False, shape=(2, 70, 3, 7)),
    "linear_scan-float32-rev-L1": dict(dtype=torch.float32, reverse=True, shape=(2, 1, 3, 7)),
    "linear_scan-complex64-fwd-L70": dict(dtype=torch.complex64, reverse=False, shape=(2, 70, 9)),
    "linear_scan-complex64-rev-L70": dict(dtype=torch.complex64, reverse=True, shape=(1, 70, 21)),
}


def run_linear_scan(dtype: torch.dtype, reverse: bool, shape: tuple, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    L, state_shape = shape[1], (shape[0],) + shape[2:]
    a = 1.8 * torch.rand(shape, generator=gen, dtype=torch.float64) - 0.9
    if dtype.is_complex:
        a = a * torch.exp(6.28j * torch.rand(shape, generator=gen, dtype=torch.float64))
    wide = torch.complex128 if dtype.is_complex else torch.float64
    b = torch.randn(shape, generator=gen, dtype=wide)
    h0 = torch.randn(state_shape, generator=gen, dtype=wide)
    w = torch.randn(shape, generator=gen, dtype=wide)  # a fixed projection of the output
    wl = torch.randn(state_shape, generator=gen, dtype=wide)  # and of the final state
    # both sides start from the same float32 values
    inputs = [t.to(dtype) for t in (a, b, h0)]
    w, wl = w.to(dtype), wl.to(dtype)

    def run(backend: str, cast) -> tuple[Tensor, Tensor, list[Tensor]]:
        args = [cast(t).requires_grad_() for t in inputs]
        h, last = linear_scan(*args, reverse=reverse, return_final_state=True, backend=backend)
        loss = (h * cast(w)).real.sum() + (last * cast(wl)).real.sum()
        return h, last, list(torch.autograd.grad(loss, args))

    before = LAUNCHES["linear_scan"]
    h, last, g = run("triton", lambda t: t)
    launches = LAUNCHES["linear_scan"] - before  # forward and backward are each one launch
    h0_, last0, g0 = run("reference", _wide)
    pairs = {"h": (h, h0_), "final_state": (last, last0)}
    pairs.update({f"grad_{k}": (x, y) for k, x, y in zip(("a", "b", "h0"), g, g0, strict=True)})
    return dict(L=L, launches={"forward+backward": launches}, pairs=pairs)


# ---------------------------------------------------------------------------------------------
# selective_scan_fn: every discretization, real and complex, the three B/C forms, with and
# without D, z, delta_bias + softplus, deltaA and an initial state; the last state returned

SS_GRADS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "deltaA", "initial_state")
SS_CASES = {
    # L = 37: one full 32-step tile (a checkpoint) and a partial one; n = 3 pads the state to 4
    "ss-mamba-real-input-extras-deltaA": dict(disc="mamba", cplx=False, form="input", deltaA=True),
    "ss-zoh-complex-shared-extras": dict(disc="zoh", cplx=True, form="shared"),
    "ss-zoh-real-grouped-extras-deltaA": dict(disc="zoh", cplx=False, form="grouped", deltaA=True),
    "ss-bilinear-complex-input-extras": dict(disc="bilinear", cplx=True, form="input"),
    "ss-bilinear-real-shared-bare": dict(disc="bilinear", cplx=False, form="shared", extras=False),
    "ss-dirac-complex-grouped-extras-deltaA": dict(
        disc="dirac", cplx=True, form="grouped", deltaA=True
    ),
    # L = 64: exactly two tiles
    "ss-mamba-real-grouped-bare-L64": dict(
        disc="mamba", cplx=False, form="grouped", extras=False, L=64
    ),
    "ss-dirac-real-input-bare-L1": dict(disc="dirac", cplx=False, form="input", extras=False, L=1),
    # reverse=True: the kernels walk time backwards (no flipped copies)
    "ss-zoh-complex-grouped-extras-deltaA-rev": dict(
        disc="zoh", cplx=True, form="grouped", deltaA=True, reverse=True
    ),
}


def run_selective_scan(
    disc: str,
    cplx: bool,
    form: str,
    extras: bool = True,
    deltaA: bool = False,
    L: int = 37,
    reverse: bool = False,
) -> dict:
    kw = make_scan_inputs(form, cplx, extras=extras, deltaA=deltaA, L=L, dtype=torch.float32)

    def run(backend: str, cast) -> tuple[Tensor, Tensor, dict]:
        args = {k: cast(v).requires_grad_() if isinstance(v, Tensor) else v for k, v in kw.items()}
        y, h = selective_scan_fn(
            **args, discretization=disc, return_last_state=True, backend=backend, reverse=reverse
        )
        gen = torch.Generator().manual_seed(1)  # a fixed projection of y and the last state
        w = torch.randn(y.shape, generator=gen).to(y.dtype)
        wh = torch.randn(h.shape, generator=gen).to(h.real.dtype)
        loss = (y * w).sum() + (h.real * wh).sum()
        if h.is_complex():
            loss = loss + (h.imag * wh).sum()
        names = [k for k in SS_GRADS if k in args]
        got = torch.autograd.grad(loss, [args[k] for k in names], allow_unused=True)
        # an input a rule never reads (delta's A_bar path under dirac + deltaA) gets zero
        got = [
            torch.zeros_like(args[k]) if g is None else g for k, g in zip(names, got, strict=True)
        ]
        return y, h, dict(zip(names, got, strict=True))

    before = dict(LAUNCHES)
    y, h, g = run("triton", lambda t: t)
    launches = {k: LAUNCHES[k] - before[k] for k in ("ss_forward", "ss_backward")}
    y0, h0, g0 = run("reference", _wide)
    pairs = {"y": (y, y0), "last_state": (h, h0)}
    pairs.update({f"grad_{k}": (g[k], g0[k]) for k in g0})
    return dict(L=L, launches=launches, pairs=pairs)


# ---------------------------------------------------------------------------------------------
# selective_scan_fn(reverse=True) runs natively in the kernels; it must equal the forward kernels
# on time-flipped inputs (y flipped back), with and without packed sequences (whose order the
# flip reverses: offsets T - cu.flip(0), initial and final states flipped along S)

FLIP_CASES = {
    "ss-flip-real-grouped-zoh-packed": dict(
        cplx=False, form="grouped", disc="zoh", cu=[0, 3, 3, 20, 37]
    ),
    "ss-flip-complex-input-bilinear-deltaA": dict(cplx=True, form="input", disc="bilinear"),
}


def _flip_time(kw: dict) -> dict:
    """The time-varying inputs (u, delta, z, deltaA, per-step B/C) flipped along time."""
    return {
        k: v.flip(-1) if isinstance(v, Tensor) and v.dim() >= 3 and k != "initial_state" else v
        for k, v in kw.items()
    }


def run_reverse_vs_flip(cplx: bool, form: str, disc: str, cu: list | None = None) -> dict:
    b = 2 if cu is None else 1  # packed: one batch row
    kw = make_scan_inputs(form, cplx, extras=True, deltaA=cplx, b=b, L=37, dtype=torch.float32)
    if cu is not None:  # one initial state per sequence
        gen = torch.Generator().manual_seed(3)
        h0 = torch.randn(len(cu) - 1, 4, 3, generator=gen)
        kw["initial_state"] = (
            torch.complex(h0, torch.randn(h0.shape, generator=gen)) if cplx else h0
        )
    leaves = {k: v.clone().requires_grad_() if isinstance(v, Tensor) else v for k, v in kw.items()}
    names = [k for k in SS_GRADS if k in leaves]
    T = kw["u"].shape[-1]
    cu_t = None if cu is None else torch.tensor(cu)

    def grads(y: Tensor, h: Tensor) -> list:
        gen = torch.Generator().manual_seed(1)  # a fixed projection of y and the final states
        w = torch.randn(y.shape, generator=gen)
        wh = torch.randn(h.shape, generator=gen)
        h = torch.view_as_real(h).sum(-1) if h.is_complex() else h  # Re + Im: both parts count
        return list(torch.autograd.grad((y * w).sum() + (h * wh).sum(), [leaves[k] for k in names]))

    before = len(SS_REVERSE)
    y, h = selective_scan_fn(
        **leaves, discretization=disc, output_final_state=True, backend="triton", reverse=True,
        cu_seqlens=cu_t,
    )  # fmt: skip
    g = grads(y, h)
    flipped = _flip_time(leaves)
    if cu is not None:
        flipped["initial_state"] = flipped["initial_state"].flip(0)
    y1, h1 = selective_scan_fn(
        **flipped, discretization=disc, output_final_state=True, backend="triton",
        cu_seqlens=None if cu is None else T - cu_t.flip(0),
    )  # fmt: skip
    y1 = y1.flip(-1)
    h1 = h1 if cu is None else h1.flip(0)
    g1 = grads(y1, h1)
    pairs = {"y": (y, y1), "last_state": (h, h1)}
    pairs.update({f"grad_{k}": (a, b) for k, a, b in zip(names, g, g1, strict=True)})
    return dict(L=T, reverse_flags=SS_REVERSE[before:], pairs=pairs)


def main(out: str) -> None:
    if os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("TRITON_INTERPRET=1 must be set before this process starts")
    try:
        import triton  # noqa: F401
    except Exception as e:  # a missing or broken installation: the parent skips
        print(f"triton is not importable: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(3)
    torch.manual_seed(0)
    _count_launches()
    cpu = torch.device("cpu")
    for op in ("linear_scan", "selective_scan"):  # the dispatcher really hands out the kernels
        assert _dispatch.select(op, cpu, "triton")[0] == "triton", op
    results = {}
    for case, kw in LS_CASES.items():
        results[case] = run_linear_scan(**kw)
    for case, kw in SS_CASES.items():
        results[case] = run_selective_scan(**kw)
    for case, kw in FLIP_CASES.items():
        results[case] = run_reverse_vs_flip(**kw)
    for r in results.values():
        r["pairs"] = {k: (a.detach(), e.detach()) for k, (a, e) in r["pairs"].items()}
    torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1])
