"""torch.compile: models compile (fused scan backends stay opaque calls) and match eager."""

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
        pytest.param(lambda: Mamba(8, d_state=4), id="mamba"),
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
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        y = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        (g,) = torch.autograd.grad(
            y.square().sum(),
            model.out_proj.weight if hasattr(model, "out_proj") else next(model.parameters()),
        )
    assert (g - g_eager).abs().max() <= 1e-4 * g_eager.abs().max()


def test_fullgraph_with_mamba_use_fast_path_false():
    """use_fast_path=False pins the torch backends of every op Mamba calls (the scan and the
    causal convolution), so the model is one graph without the environment variable."""
    torch._dynamo.reset()
    model = Mamba(8, d_state=4, use_fast_path=False)
    x = torch.randn(2, 24, 8)
    with torch.no_grad():
        y = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
        assert_close_rel(y, model(x), length=24)
