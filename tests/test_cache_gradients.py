"""Autograd around caches and empty inputs, for every model of the registry: a forward that
fills a cache backpropagates like one without (the cache's tensors are written after the graph
has read copies of them), every model's ``step`` carries the graph through its state and
reads the parameters while autograd records (gradients of a stepped sequence equal the parallel
forward's, for the input and every parameter), as attention's steps do through the keys and
values they recorded, empty inputs give empty outputs inside the graph, and caches for a batch
of 0 are allocated by the wrappers as by the models."""

from __future__ import annotations

import pytest
import torch

from _tol import assert_close_rel
from lrnnx.architectures import LRNNLMHeadModel
from lrnnx.models.registry import available_models, build_mixer

MODELS = available_models()


def _out(y):
    return y[0] if isinstance(y, tuple) else y


@pytest.mark.parametrize("name", MODELS)
def test_forward_that_fills_a_cache_backpropagates(name):
    torch.manual_seed(0)
    model = build_mixer(name, 4, 4).double()
    x = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    params = [p for p in model.parameters() if p.requires_grad]
    plain = torch.autograd.grad(_out(model(x)).pow(2).sum(), [x, *params], allow_unused=True)
    cache = model.allocate_inference_cache(2)
    y = _out(model(x, inference_cache=cache))  # the cache starts at zero: the same result
    cached = torch.autograd.grad(y.pow(2).sum(), [x, *params], allow_unused=True)
    for a, b in zip(plain, cached, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close_rel(b, a, dtype=torch.float64)


def _step_vs_forward(model, x, ts=None):
    """Gradients of a stepped sequence and of the parallel forward, for x and every parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    kw = {} if ts is None else {"integration_timesteps": ts}
    y = _out(model(x, **kw))
    want = torch.autograd.grad(y.pow(2).sum(), [x, *params])
    cache = model.allocate_inference_cache(x.shape[0], x.shape[1])
    steps = []
    for t in range(x.shape[1]):
        kw = {} if ts is None else {"integration_timesteps": ts[:, t]}
        steps.append(model.step(x[:, t], cache, **kw)[0].reshape(x.shape[0], -1))
    steps = torch.stack(steps, 1)
    assert_close_rel(steps, y, dtype=torch.float64)
    got = torch.autograd.grad(steps.pow(2).sum(), [x, *params])
    for a, b in zip(want, got, strict=True):
        assert_close_rel(b, a, dtype=torch.float64)


@pytest.mark.parametrize("name", [*MODELS, "attn"])
def test_step_gradients_equal_the_forward(name):
    torch.manual_seed(0)
    model = build_mixer(name, 4, 4, num_heads=2) if name == "attn" else build_mixer(name, 4, 4)
    x = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    _step_vs_forward(model.double(), x)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("shape", [(2, 0, 4), (0, 5, 4)])
def test_empty_input_output_is_in_the_graph(name, shape):
    torch.manual_seed(0)
    model = build_mixer(name, 4, 4)
    x = torch.randn(*shape, requires_grad=True)
    y = _out(model(x))
    assert y.shape[:2] == shape[:2] and y.numel() == 0 and y.requires_grad
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert all(p.grad is None or (p.grad == 0).all() for p in model.parameters())


@pytest.mark.parametrize("name", [*MODELS, "attn"])
def test_caches_for_no_batch(name):
    kwargs = {"num_heads": 2} if name == "attn" else {}
    mixer = build_mixer(name, 8, 4, **kwargs)
    y, _ = mixer.step(torch.randn(0, 8), mixer.allocate_inference_cache(0, 4))
    assert y.shape == (0, 8)
    if name == "attn":
        return
    lm = LRNNLMHeadModel(d_model=8, d_state=4, n_layer=1, vocab_size=11, mixer_types=name)
    logits, _ = lm.step(torch.zeros(0, dtype=torch.long), lm.allocate_inference_cache(0))
    assert logits.shape == (0, 11)


def test_attention_prefill_then_steps_carry_the_graph():
    """A prefill and steps of attention while autograd records: keys and values of every
    recorded call reach the gradient (the KV cache itself holds detached copies); a call under
    no_grad ends the recorded prefix, whose tokens are then constants."""
    torch.manual_seed(0)
    model = build_mixer("attn", 8, None, num_heads=2).double()
    x = torch.randn(2, 7, 8, dtype=torch.float64, requires_grad=True)
    y = model(x)
    want = torch.autograd.grad(y.pow(2).sum(), x)[0]
    cache = model.allocate_inference_cache(2, max_seqlen=7)
    first = model(x[:, :4], inference_cache=cache)
    rest = [model.step(x[:, t], cache)[0] for t in range(4, 7)]
    got = torch.cat([first, torch.stack(rest, 1)], 1)
    assert_close_rel(got, y, dtype=torch.float64)
    assert_close_rel(torch.autograd.grad(got.pow(2).sum(), x)[0], want, dtype=torch.float64)
    cache = model.allocate_inference_cache(2, max_seqlen=7)
    with torch.no_grad():
        model(x[:, :4], inference_cache=cache)
    last = model.step(x[:, 4], cache)[0]
    g = torch.autograd.grad(last.pow(2).sum(), x)[0]
    assert torch.all(g[:, :4] == 0) and torch.any(g[:, 4] != 0)


@pytest.mark.parametrize("name", ["stream", "event-s5", "s7"])
def test_step_gradients_with_timesteps(name):
    torch.manual_seed(0)
    model = build_mixer(name, 4, 4).double()
    x = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    ts = torch.rand(2, 6, dtype=torch.float64) + 0.1
    _step_vs_forward(model, x, ts)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "pointwise"},
        {"mode": "dws"},
        {"mode": "full"},
        {"mode": "neck", "dt_per_sub_state": True, "out_norm": "layer", "out_activation": "gelu"},
    ],
    ids=["pointwise", "dws", "full", "neck-options"],
)
def test_centaurus_step_gradients(kwargs):
    from lrnnx.models.lti import Centaurus

    torch.manual_seed(0)
    model = Centaurus(d_model=4, d_state=4, sub_state_dim=2, **kwargs).double()
    _step_vs_forward(model, torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True))


def test_s4_block_options_step_gradients():
    from lrnnx.models.lti import S4, S4D

    torch.manual_seed(0)
    for model in (
        S4(4, d_state=4, transposed=False, gate=2, bottleneck=2, channels=2),
        S4D(4, d_state=4, transposed=False, channels=2, disc="bilinear", is_real=True),
    ):
        model = model.double()
        x = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
        _step_vs_forward(model, x)


@pytest.mark.parametrize("name", [*MODELS, "attn"])
def test_prefill_then_steps_have_the_forward_gradients(name):
    """A forward that fills a cache stores its final state with its graph while autograd
    records, so steps after a prefill (and a second prefill) continue the forward's graph."""
    torch.manual_seed(0)
    model = build_mixer(name, 4, 4, num_heads=2) if name == "attn" else build_mixer(name, 4, 4)
    model = model.double()
    x = torch.randn(2, 7, 4, dtype=torch.float64, requires_grad=True)
    params = [p for p in model.parameters() if p.requires_grad]
    y = _out(model(x))
    want = torch.autograd.grad(y.pow(2).sum(), [x, *params])
    cache = model.allocate_inference_cache(2, 7)
    parts = [_out(model(x[:, :2], inference_cache=cache))]
    parts.append(_out(model(x[:, 2:4], inference_cache=cache)))
    parts += [model.step(x[:, t], cache)[0].reshape(2, 1, -1) for t in range(4, 7)]
    got_y = torch.cat(parts, 1)
    assert_close_rel(got_y, y, dtype=torch.float64)
    got = torch.autograd.grad(got_y.pow(2).sum(), [x, *params])
    for a, b in zip(want, got, strict=True):
        assert_close_rel(b, a, dtype=torch.float64)


@pytest.mark.parametrize("name", ["s4", "s4d", "s5", "lru", "centaurus", "event-s5", "s7"])
def test_steps_under_truncated_backpropagation_and_weight_changes(name):
    """A backward after each step (truncated backpropagation, reinforcement learning), an
    optimizer step between steps, weights changed in place: every step's value and gradient
    are those of the model as it is at that step."""
    import copy

    torch.manual_seed(0)
    model = build_mixer(name, 4, 4).double()
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.1)
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    cache = model.allocate_inference_cache(2)
    state = None
    for t in range(5):
        # the model steps through its cache; the twin recomputes each step from a fresh cache
        # holding the state the model reached (constants derived now, nothing shared)
        y = model.step(x[:, t], cache)[0]
        fresh = twin.allocate_inference_cache(2)
        if state is not None:
            fresh["lrnn_state"].copy_(state)
        y_twin = twin.step(x[:, t], fresh)[0]
        assert_close_rel(y, y_twin, dtype=torch.float64)
        y.pow(2).sum().backward()
        y_twin.pow(2).sum().backward()
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            if p.grad is not None or q.grad is not None:
                assert_close_rel(p.grad, q.grad, dtype=torch.float64)
        if t % 2:  # an update every other step: the others reuse what the backward freed
            opt.step()
            opt_twin.step()
        opt.zero_grad()
        opt_twin.zero_grad()
        cache["lrnn_state"].detach_()  # truncated backpropagation: the next graph starts here
        state = cache["lrnn_state"].clone()
    # weights changed in place without any backward (a load, a manual update): the next
    # recorded step derives the system from them
    model.step(x[:, 0], cache)
    with torch.no_grad():
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            p.mul_(0.9)
            q.mul_(0.9)
    fresh = twin.allocate_inference_cache(2)
    fresh["lrnn_state"].copy_(cache["lrnn_state"].detach())
    y, y_twin = model.step(x[:, 1], cache)[0], twin.step(x[:, 1], fresh)[0]
    assert_close_rel(y, y_twin, dtype=torch.float64)
    copy.deepcopy(model)  # nothing recorded is kept in the module itself


@pytest.mark.parametrize("name", MODELS)
def test_independent_step_sequences_and_checkpointing(name):
    """Two sequences stepped through their own caches before either backward build two
    graphs (as two forwards do); a cast between recorded steps is seen; a step loop under
    non-reentrant activation checkpointing has eager's gradients."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model = build_mixer(name, 4, 4).double()
    xa, xb = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)

    def roll(x):
        cache = model.allocate_inference_cache(2)
        return torch.stack([model.step(x[:, t], cache)[0].reshape(2, -1) for t in range(3)], 1)

    la, lb = roll(xa).pow(2).sum(), roll(xb).pow(2).sum()
    la.backward()
    lb.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    x = xa.clone().requires_grad_()
    want = torch.autograd.grad(roll(x).pow(2).sum(), [x, *params])
    got = torch.autograd.grad(checkpoint(roll, x, use_reentrant=False).pow(2).sum(), [x, *params])
    for a, b in zip(want, got, strict=True):
        assert_close_rel(b, a, dtype=torch.float64)
    roll(xa)  # recorded, no backward
    model.float()
    y = roll(xa.float())
    assert y.dtype == torch.float32
    y.pow(2).sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in params if p.grad is not None)


@pytest.mark.parametrize("is_real", [False, True])
def test_s4_steps_and_a_longer_forward_in_one_graph(is_real):
    """Recorded steps read C~ as S4's recorded forwards do: a longer forward in the same graph
    attunes out of place, so the gradient is with respect to one C~."""
    import copy

    from lrnnx.models.lti import S4

    torch.manual_seed(0)
    model = S4(4, d_state=4, transposed=False, is_real=is_real).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    longer = torch.randn(2, 16, 4, dtype=torch.float64)

    def step_loss(m):
        cache = m.allocate_inference_cache(2)
        return sum(m.step(x[:, t], cache)[0].pow(2).sum() for t in range(3))

    a, b = copy.deepcopy(model), copy.deepcopy(model)
    step_loss(a).backward()
    b.C.grad = torch.zeros_like(b.C)  # a pending gradient: b attunes out of place
    b(longer)[0].pow(2).sum().backward()
    (step_loss(model) + model(longer)[0].pow(2).sum()).backward()
    assert model.l_kernel == 0
    assert_close_rel(model.C.grad, a.C.grad + b.C.grad, dtype=torch.float64)


@pytest.mark.parametrize("name", [*MODELS, "attn", "lm"])
def test_truncated_backpropagation_over_chunks_with_detach_cache(name):
    """Training over chunks of a stream through one cache: each chunk's backward, then
    detach_cache, for every model, attention and an LM's cache of layer caches: no backward
    runs into an earlier chunk's freed graph, and nothing in the cache keeps a graph."""
    from lrnnx.utils import detach_cache

    torch.manual_seed(0)
    if name == "lm":
        model = LRNNLMHeadModel(
            d_model=8, d_state=4, n_layer=3, vocab_size=8, mixer_types=["s5", "attn", "mamba"]
        ).double()
        x = torch.randint(0, 8, (2, 9))
    else:
        model = build_mixer(name, 4, 4, num_heads=2) if name == "attn" else build_mixer(name, 4, 4)
        model = model.double()
        x = torch.randn(2, 9, 4, dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    cache = model.allocate_inference_cache(2, 9)
    for k in range(3):
        chunk = x[:, 3 * k : 3 * k + 3]
        loss = _out(model(chunk, inference_cache=cache)).pow(2).sum()
        got = torch.autograd.grad(loss, params, allow_unused=True)
        assert all(g is None or torch.isfinite(g).all() for g in got)
        detach_cache(cache)

    # after detaching, nothing in the cache keeps a graph
    def graphs(c):
        if isinstance(c, dict):
            return any(graphs(v) for v in c.values())
        return isinstance(c, torch.Tensor) and c.grad_fn is not None

    assert not graphs(cache)
