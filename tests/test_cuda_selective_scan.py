"""The fused Triton selective scan against the reference loop (float64, CPU) and the torch backend.

Skipped on machines without a GPU (CI); run them where one is present.  Each case checks the
output, the last state and the gradient of every tensor input.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lrnnx.ops import _dispatch, selective_scan_fn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DISCS = ("mamba", "zoh", "bilinear", "dirac")
GRAD_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "deltaA", "initial_state")


@pytest.fixture
def triton_backend():
    pytest.importorskip("triton")
    from lrnnx.ops.selective_scan import triton as backend

    assert backend.is_available()
    return backend


@pytest.fixture
def launches(triton_backend, monkeypatch):
    """Counts the Triton forward and backward launches, so a test knows the kernels ran."""
    count = {"forward": 0, "backward": 0}
    for name in count:

        def spy(self, *args, _orig=getattr(triton_backend._Plan, name), _name=name, **kwargs):
            count[_name] += 1
            return _orig(self, *args, **kwargs)

        monkeypatch.setattr(triton_backend._Plan, name, spy)
    return count


def _inputs(
    form: str,
    cplx: bool,
    extras: bool = True,
    deltaA: bool = False,
    b: int = 2,
    d: int = 4,
    n: int = 3,
    L: int = 37,
    g: int = 2,
    seed: int = 0,
) -> dict:
    """float32 keyword arguments of selective_scan_fn on the CPU; complex B/C except "input"."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*s):
        return torch.randn(*s, generator=gen)

    A = -(torch.rand(d, n, generator=gen) + 0.3)
    if cplx:
        A = torch.complex(A, 2 * rnd(d, n))
    shape = {"shared": (d, n), "input": (b, n, L), "grouped": (b, g, n, L)}[form]

    def bc() -> Tensor:
        return torch.complex(rnd(*shape), rnd(*shape)) if cplx and form != "input" else rnd(*shape)

    kw = dict(
        u=rnd(b, d, L), delta=0.05 + 0.5 * torch.rand(b, d, L, generator=gen), A=A, B=bc(), C=bc()
    )
    if extras:
        h0 = torch.complex(rnd(b, d, n), rnd(b, d, n)) if cplx else rnd(b, d, n)
        kw.update(D=rnd(d), z=rnd(b, d, L), delta_bias=0.3 * rnd(d), delta_softplus=True)
        kw.update(delta=rnd(b, d, L), initial_state=h0)
    if deltaA:
        kw["deltaA"] = 0.05 + torch.rand(b, d, L, generator=gen)
    return kw


def _run(kw: dict, disc: str, backend: str, device: str, double: bool = False, wanted=None):
    """y, last state and {name: gradient} of a loss touching y and the state, all on the CPU."""

    def prep(k, v):
        if not isinstance(v, Tensor):
            return v
        if double:
            v = v.to(torch.complex128 if v.is_complex() else torch.float64)
        return v.to(device).requires_grad_(wanted is None or k in wanted)

    args = {k: prep(k, v) for k, v in kw.items()}
    y, h = selective_scan_fn(**args, discretization=disc, return_last_state=True, backend=backend)
    w = torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype, device=y.device)
    loss = (y * w).sum() + (h * h.conj()).real.sum() + h.real.sum()
    names = [k for k in GRAD_NAMES if k in args and args[k].requires_grad]
    got = torch.autograd.grad(loss, [args[k] for k in names], allow_unused=True)
    # an input the rule never reads (delta under dirac with deltaA) has a zero gradient
    got = [torch.zeros_like(args[k]) if g is None else g for k, g in zip(names, got, strict=True)]
    return y.cpu(), h.cpu(), {k: g.cpu() for k, g in zip(names, got, strict=True)}


def _close(got: Tensor, ref: Tensor, name: str, tol: float = 1e-4) -> None:
    """float32 against a float64 (or float32) reference, relative to the reference's scale."""
    assert got.shape == ref.shape, name
    assert got.is_complex() == ref.is_complex(), name
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(got.to(ref.dtype), ref, rtol=tol, atol=tol * scale, msg=name)


def _compare(kw: dict, disc: str, launches: dict, tol: float = 1e-4) -> None:
    before = dict(launches)
    y, h, g = _run(kw, disc, "triton", "cuda")
    assert launches["forward"] == before["forward"] + 1
    assert launches["backward"] == before["backward"] + 1
    y0, h0, g0 = _run(kw, disc, "reference", "cpu", double=True)
    _close(y, y0, "y", tol)
    _close(h, h0, "last_state", tol)
    assert set(g) == set(g0)
    for name in g0:
        _close(g[name], g0[name], name, tol)


@pytest.mark.parametrize("form", ["shared", "input", "grouped"])
@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
@pytest.mark.parametrize("disc", DISCS)
def test_matches_reference(launches, disc, cplx, form):
    """D, z, delta_bias + softplus and initial_state on; deltaA for the input-dependent forms.

    L = 37 is one full 32-step tile plus a partial one; n = 3 pads the state to 4.
    """
    _compare(_inputs(form, cplx, deltaA=form != "shared"), disc, launches)


@pytest.mark.parametrize(
    "disc,cplx,form", [("mamba", False, "input"), ("zoh", True, "shared"),
                       ("bilinear", False, "grouped"), ("dirac", True, "input")]
)  # fmt: skip
def test_bare_inputs(launches, disc, cplx, form):
    """No D, z, bias, softplus or initial state; L = 1 and L = 64 (exact tiles) too."""
    for L in (1, 64, 45):
        _compare(_inputs(form, cplx, extras=False, L=L), disc, launches)


@pytest.mark.parametrize("cplx", [False, True], ids=["real", "complex"])
def test_wide_channel_blocks(triton_backend, launches, monkeypatch, cplx):
    """Several channels per program: B's groups (2 channels; 1 for complex, whose blocks are
    narrower) split a block, C's one group spans it; the reductions and atomics must add up."""
    monkeypatch.setattr(triton_backend, "_sm_count", lambda device: 1)
    b, d, n, L, g = 2, 16, 16, 70, 16 if cplx else 8
    kw = _inputs("grouped", cplx, deltaA=True, b=b, d=d, n=n, L=L, g=g, seed=1)
    kw["C"] = _inputs("input", cplx, b=b, d=d, n=n, L=L, seed=2)["C"]
    args = [kw[k].cuda() for k in GRAD_NAMES[:9]]
    args[4] = args[4].unsqueeze(1)  # C as (b, 1, n, L), as the front end passes it
    plan = triton_backend._Plan(*args, None, True, "zoh")
    assert min(plan.bd_fwd, plan.bd_bwd) > d // g  # the blocks do straddle B's groups
    _compare(kw, "zoh", launches)


@pytest.mark.parametrize("wanted", [("C", "D", "z"), ("initial_state",), ("A", "delta")])
def test_gradient_subsets(launches, wanted):
    """Only some inputs need a gradient; the others get none."""
    kw = _inputs("input", True, deltaA=True)
    y, h, g = _run(kw, "mamba", "triton", "cuda", wanted=wanted)
    assert launches["backward"] == 1
    y0, h0, g0 = _run(kw, "mamba", "reference", "cpu", double=True, wanted=wanted)
    assert set(g) == set(wanted)
    for name in wanted:
        _close(g[name], g0[name], name)


def test_long_sequence_matches_torch_backend(launches):
    """L = 2048 (64 tiles), Mamba's layout, against the chunked torch backend on the GPU."""
    kw = _inputs("input", False, b=2, d=64, n=16, L=2048, seed=3)
    y, h, g = _run(kw, "mamba", "triton", "cuda")
    assert launches["backward"] == 1
    y0, h0, g0 = _run(kw, "mamba", "torch", "cuda")
    _close(y, y0, "y", 1e-3)
    _close(h, h0, "last_state", 1e-3)
    for name in g0:
        _close(g[name], g0[name], name, 1e-3)


def test_inference_and_low_precision(launches):
    """Without autograd no checkpoints are kept; bf16 inputs accumulate in float32."""
    kw = {k: (v.cuda() if isinstance(v, Tensor) else v) for k, v in _inputs("input", False).items()}
    with torch.no_grad():
        y, h = selective_scan_fn(**kw, return_last_state=True, backend="triton")
        assert launches == {"forward": 1, "backward": 0}
        y0, h0 = selective_scan_fn(**kw, return_last_state=True, backend="torch")
        _close(y, y0, "y")
        _close(h, h0, "last_state")
        low = {k: (v.bfloat16() if isinstance(v, Tensor) else v) for k, v in kw.items()}
        yl, hl = selective_scan_fn(**low, return_last_state=True, backend="triton")
        assert yl.dtype == torch.bfloat16 and hl.dtype == torch.float32
        up = {k: (v.float() if isinstance(v, Tensor) else v) for k, v in low.items()}
        y32, h32 = selective_scan_fn(**up, return_last_state=True, backend="torch")
        _close(hl, h32, "bf16 state")
        _close(yl.float(), y32, "bf16 y", 1e-2)


def test_keeps_checkpoints_not_states(launches):
    """Autograd holds the inputs and one (b, d, n) state per 32-step tile, never (b, d, n, L)."""
    b, d, n, L = 1, 8, 16, 512
    kw = _inputs("input", False, extras=False, b=b, d=d, n=n, L=L)
    kw = {k: v.cuda().requires_grad_() for k, v in kw.items()}
    saved = []

    def pack(x: Tensor) -> Tensor:
        saved.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        y = selective_scan_fn(**kw, backend="triton")
    y.sum().backward()
    assert launches == {"forward": 1, "backward": 1}
    assert sum(saved) < b * d * n * L / 2
    assert all(v.grad is not None for v in kw.values())


def test_float64_goes_to_torch_backend(launches):
    kw = {
        k: (v.double().cuda() if isinstance(v, Tensor) and not v.is_complex() else v)
        for k, v in _inputs("input", False).items()
    }
    y = selective_scan_fn(**kw, backend="triton")
    assert y.dtype == torch.float64
    assert torch.equal(y, selective_scan_fn(**kw, backend="torch"))
    assert launches["forward"] == 0  # the kernels compute in float32 only


def test_dispatch_prefers_triton_on_cuda(triton_backend, monkeypatch):
    monkeypatch.delenv("LRNNX_BACKEND", raising=False)  # a user's override is not the default
    assert _dispatch.select("selective_scan", torch.device("cuda"))[0] == "triton"
