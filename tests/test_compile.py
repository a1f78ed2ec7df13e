"""torch.compile: models compile (fused scan backends stay opaque calls) and match eager."""

import contextlib

import pytest
import torch

from _tol import assert_close_rel
from lrnnx.models.lti import LRU
from lrnnx.models.ltv import Mamba


@pytest.mark.parametrize(
    "make",
    [
        # inductor's fallback for complex ops takes ~5 s here: make test-slow
        pytest.param(lambda: LRU(8, 8), id="lru", marks=pytest.mark.slow),
        # (~8 s: make test-slow; the RG-LRU graph below stays in make test)
        pytest.param(lambda: Mamba(8, d_state=4), id="mamba", marks=pytest.mark.slow),
    ],
)
def test_compiled_model_matches_eager(make):
    torch._dynamo.reset()
    model = make()
    x = torch.randn(2, 40, 8)
    compiled = torch.compile(model)
    y = compiled(x)
    (g_compiled,) = torch.autograd.grad(y.square().sum(), next(model.parameters()))
    y_eager = model(x)
    (g_eager,) = torch.autograd.grad(y_eager.square().sum(), next(model.parameters()))
    assert_close_rel(y, y_eager, length=40, msg="y")
    assert_close_rel(g_compiled, g_eager, length=40, msg="grad")


@pytest.mark.slow  # torch.compile of a whole model (seconds): make test-slow
@pytest.mark.parametrize(
    "make", [lambda: LRU(8, 8), lambda: Mamba(8, d_state=4)], ids=["lru", "mamba"]
)
def test_fullgraph_with_the_torch_backend(make, monkeypatch):
    """With the pure-torch backend the whole model is one graph (fullgraph=True), for inference
    and for training; the fused numba/Triton kernels are opaque calls instead (a graph break
    each).  The selective scan's backward recomputes its chunks with torch.autograd.grad, which
    Dynamo traces only with ``trace_autograd_ops`` on."""
    monkeypatch.setenv("LRNNX_BACKEND", "torch")
    model = make()
    x = torch.randn(2, 24, 8)
    y_eager = model(x)
    (g_eager,) = torch.autograd.grad(
        y_eager.square().sum(),
        model.out_proj.weight if hasattr(model, "out_proj") else next(model.parameters()),
    )
    torch._dynamo.reset()
    with torch.no_grad():
        y = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    assert (y - y_eager).abs().max() <= 1e-5 * y_eager.abs().max()
    torch._dynamo.reset()
    if hasattr(torch._dynamo.config, "trace_autograd_ops"):
        tracing_grad = torch._dynamo.config.patch(trace_autograd_ops=True)
    elif isinstance(model, Mamba):
        # torch 2.4's Dynamo has no such option and cannot trace that backward
        # ("Unsupported Tensor.requires_grad_"); LRU's traces without it
        pytest.skip("this torch's Dynamo cannot trace the selective scan's backward")
    else:
        tracing_grad = contextlib.nullcontext()
    with tracing_grad:
        y = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        (g,) = torch.autograd.grad(
            y.square().sum(),
            model.out_proj.weight if hasattr(model, "out_proj") else next(model.parameters()),
        )
    assert (g - g_eager).abs().max() <= 1e-4 * g_eager.abs().max()


@pytest.mark.slow  # torch.compile of a whole model (seconds): make test-slow
def test_fullgraph_with_mamba_use_fast_path_false():
    """use_fast_path=False pins the torch backends of every op Mamba calls (the scan and the
    causal convolution), so the model is one graph without the environment variable."""
    torch._dynamo.reset()
    model = Mamba(8, d_state=4, use_fast_path=False)
    x = torch.randn(2, 24, 8)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ts = torch.rand(2, 24)
    with torch.no_grad():
        assert_close_rel(compiled(x), model(x), length=24)
        # event mode (STREAM) too: the timesteps' values are checked in eager runs only
        assert_close_rel(
            compiled(x, integration_timesteps=ts), model(x, integration_timesteps=ts), length=24
        )


def test_fullgraph_with_rglru_use_fast_path_false():
    """As Mamba's: use_fast_path=False pins the torch scan and causal convolution."""
    from lrnnx.models.ltv import RGLRU

    torch._dynamo.reset()
    model = RGLRU(8, use_fast_path=False)
    x = torch.randn(2, 24, 8)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_close_rel(compiled(x), model(x), length=24)


@pytest.mark.slow  # compiling S4 takes ~15 s here
def test_compiled_s4_over_two_lengths_in_one_graph_is_with_respect_to_one_C():
    """Compiled, S4 sees a short and a longer input in one graph: the first forward attunes C~
    (in place, nothing is built on it yet), the longer one out of place, so the gradient is
    eager's, with respect to the C~ attuned to the first length."""
    import copy

    from lrnnx.models.lti import S4

    torch._dynamo.reset()
    torch.manual_seed(0)
    base = S4(8, d_state=8, verbose=False)
    a, b = torch.randn(2, 8, 16), torch.randn(2, 8, 32)

    def grads(model, f):
        (f(a)[0].pow(2).sum() + f(b)[0].pow(2).sum()).backward()
        return [p.grad for p in model.parameters()]

    eager = copy.deepcopy(base)
    want = grads(eager, eager)
    compiled = copy.deepcopy(base)
    got = grads(compiled, torch.compile(compiled, backend="aot_eager"))
    assert compiled.l_kernel == eager.l_kernel == 16
    for g, w in zip(got, want, strict=True):
        assert_close_rel(g, w, length=32, factor=10)
