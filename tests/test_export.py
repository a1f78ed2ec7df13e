"""torch.export and torch.jit.trace: a recorded program computes what the eager model does, on
every call, and leaves the model as it was.

While a program is recorded the ops take their pure-torch backends (the fused kernels read raw
memory, which export's fake tensors and the tracer's recording do not have), and S4 attunes its
C~ out of place (an in-place rewrite recorded into the program would be replayed, compounding,
at each call).  The expectation is the eager model itself, run before and after.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from _tol import assert_close_rel
from lrnnx.architectures import LRNNLMHeadModel
from lrnnx.core import checks
from lrnnx.models.lti import S4
from lrnnx.models.registry import available_models, build_mixer


class _First(nn.Module):
    """The output of a model that returns (y, state) (S4, S4D), or its output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        y = self.model(x)
        return y[0] if isinstance(y, tuple) else y


def _mixer(name: str) -> nn.Module:
    torch.manual_seed(0)
    return _First(build_mixer(name, 8, 8)).eval()


def _record(how: str, model: nn.Module, x: torch.Tensor):
    """``how``: "export" (torch.export's default strictness), "export-strict",
    "export-nonstrict" or "trace" (torch.jit.trace)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values it fixes
        if how.startswith("export"):
            kw = {} if how == "export" else {"strict": how == "export-strict"}
            return torch.export.export(model, (x,), **kw).module()
        return torch.jit.trace(model, (x,), check_trace=False)


#: recorded in make test; the rest of the registry in make test-slow (a second each)
FAST = {"s4", "s5", "mamba"}


@pytest.mark.parametrize("how", ["export", "trace"])
@pytest.mark.parametrize(
    "name",
    [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in available_models()],
)
def test_recorded_program_matches_eager_on_every_call(name, how):
    model = _mixer(name)
    x = torch.randn(2, 12, 8)
    with torch.no_grad():
        want = copy.deepcopy(model)(x)
    program = _record(how, model, x)
    with torch.no_grad():
        for _ in range(3):
            assert_close_rel(program(x), want, length=12)
        assert_close_rel(model(x), want, length=12)  # the model itself is unchanged


@pytest.mark.slow  # torch.export of a whole model (seconds): make test-slow
@pytest.mark.parametrize(
    "how, is_exporting",
    [("export", True), ("trace", True), ("export-strict", False), ("export-nonstrict", False)],
)
def test_s4_recorded_beyond_its_kernel_length_leaves_the_model_alone(
    how, is_exporting, monkeypatch
):
    """Recorded at a length the kernel is not attuned to yet (a fresh S4, then a longer one):
    C~ is computed in the program, never written into the shared parameter.  Also as with
    torch 2.4, which has no torch.compiler.is_exporting (is_exporting False)."""
    if not is_exporting:
        monkeypatch.setattr(checks, "_IS_EXPORTING", None)
    torch.manual_seed(0)
    model = _First(S4(8, d_state=8, transposed=False)).eval()
    with torch.no_grad():
        model(torch.randn(2, 12, 8))  # attuned to 12
    x = torch.randn(2, 30, 8)
    with torch.no_grad():
        want = copy.deepcopy(model)(x)
    C = model.model.C.detach().clone()
    program = _record(how, model, x)
    with torch.no_grad():
        for _ in range(2):
            assert_close_rel(program(x), want, length=30)
    assert torch.equal(model.model.C, C) and model.model.l_kernel == 12


class _Recording(nn.Module):
    """x + 1 where lrnnx sees a program recorded, else x - 1."""

    def forward(self, x):
        return x + 1 if checks.recording_program() else x - 1


@pytest.mark.parametrize("strict", [True, False])
def test_export_is_told_from_compile_without_is_exporting(monkeypatch, strict):
    """torch 2.4 has no torch.compiler.is_exporting: there an export (strict, through Dynamo,
    or not) is told from a torch.compile by is_compiling()'s flag, which only export sets
    outside Dynamo, and by Dynamo's own tracer."""
    monkeypatch.setattr(checks, "_IS_EXPORTING", None)
    x = torch.zeros(2)
    assert torch.equal(_Recording()(x), x - 1)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(_Recording(), fullgraph=True, backend="eager")(x), x - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(_Recording(), (x,), strict=strict).module()
    assert torch.equal(program(x), x + 1)


@pytest.mark.slow  # torch.export of a whole model (seconds): make test-slow
def test_mixed_lm_exports():
    torch.manual_seed(0)
    lm = LRNNLMHeadModel(
        d_model=8, d_state=4, n_layer=3, vocab_size=11, mixer_types=["s4", "attn", "rglru"]
    ).eval()
    ids = torch.randint(0, 11, (2, 10))
    with torch.no_grad():
        want = copy.deepcopy(lm)(ids)
    program = _record("export", lm, ids)
    with torch.no_grad():
        for _ in range(2):
            assert_close_rel(program(ids), want, length=10)
