"""torch.compile: models compile (fused scan backends stay opaque calls) and match eager."""

import pytest
import torch

from lrnnx.models.lti import LRU
from lrnnx.models.ltv import Mamba


@pytest.mark.parametrize(
    "make", [lambda: LRU(8, 8), lambda: Mamba(8, d_state=4)], ids=["lru", "mamba"]
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
    assert torch.allclose(y, y_eager, atol=1e-5)
    assert torch.allclose(g_compiled, g_eager, atol=1e-4, rtol=1e-4)
