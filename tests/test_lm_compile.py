"""torch.compile(LRNNLMHeadModel, fullgraph=True): no graph break in the LM itself.

The id range check of the forward reads the ids' values (a host synchronisation and a
data-dependent branch); it runs in eager mode only.  S4D (an LTI recurrent mixer, convolution
mode in the forward: no numba/Triton op) and attention compile without a break; mixers that call
the fused scan ops (``lrnnx.ops``) do not yet: those ops are wrapped in
``torch.compiler.disable`` (a deliberate graph break), which ``fullgraph=True`` rejects.
"""

import pytest
import torch

from lrnnx.architectures import LRNNLMHeadModel

V = 29


@pytest.mark.slow  # torch.compile of a whole model (seconds): make test-slow
def test_lm_compiles_with_fullgraph():
    torch._dynamo.reset()
    torch.manual_seed(0)
    lm = LRNNLMHeadModel(16, 8, 2, V, ["s4d", "attn"], d_intermediate=16).eval()
    ids = torch.randint(0, V, (2, 12))
    compiled = torch.compile(lm, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager = lm(ids)
        torch.testing.assert_close(compiled(ids), eager)
        out = compiled(ids, return_dict=True)
    torch.testing.assert_close(out.logits, eager)
    # the eager forward still checks the ids' range
    with pytest.raises(ValueError, match="token ids"):
        lm(torch.full((1, 3), V))
