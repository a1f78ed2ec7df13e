"""``reset_parameters``: a model materialised from the meta device (``to_empty``, then torch's
initialisation idioms: the model's own ``reset_parameters``, one call on every module in
``modules()`` order or in ``apply``'s, or FSDP's breadth-first call on every module holding
tensors) gets its construction's initialisation, for every model, mode and architecture; a
reset is in place (identity, dtype) and discards what the model derived from the old values.

The expectation is a set of freshly built models: a tensor that is the same in all of them
(HiPPO spectra, Mamba's A and D, norms' gains) must come back exactly; a random one must have
the mean and spread of a fresh draw (within the range the fresh draws span, widened by twice
that range on each side: about 7 standard deviations of each statistic) and no more than twice
a fresh draw's largest magnitude.  Every tensor is filled with NaN after ``to_empty``, so one that no
reset reaches cannot pass for initialised memory.
"""

from __future__ import annotations

import functools
import warnings
from collections import deque

import pytest
import torch
from torch import nn

from _tol import assert_close_rel
from lrnnx.architectures import Classifier, LRNNLMHeadModel, UNet
from lrnnx.models.lti import LRU, S4, Centaurus
from lrnnx.models.registry import available_models, build_mixer

FRESH = 8  # fresh models spanning the expected statistics

BUILDERS = {name: functools.partial(build_mixer, name, 8, 8) for name in available_models()}
BUILDERS.update(
    {
        f"centaurus-{mode}": functools.partial(
            Centaurus, d_model=8, d_state=8, sub_state_dim=4, mode=mode
        )
        for mode in ("neck", "pointwise", "dws", "full")
    }
)
BUILDERS.update(
    {
        "s4-frozen-A": functools.partial(S4, d_model=8, d_state=8, lr={"A": 0.0}),
        "s4-l_max": functools.partial(S4, d_model=8, d_state=8, l_max=16),
        "s5-no-discretization": functools.partial(
            build_mixer, "s5", 8, 8, discretization="no_discretization"
        ),
        "event-s5-no-discretization": functools.partial(
            build_mixer, "event-s5", 8, 8, discretization="no_discretization"
        ),
        "mamba-bidirectional": functools.partial(build_mixer, "mamba", 8, 4, bidirectional=True),
        "lm": functools.partial(
            LRNNLMHeadModel,
            d_model=8,
            d_state=4,
            n_layer=len(available_models()) + 1,
            vocab_size=11,
            mixer_types=[*available_models(), "attn"],
            d_intermediate=16,
        ),
        "lm-untied-layernorm": functools.partial(
            LRNNLMHeadModel,
            d_model=8,
            d_state=4,
            n_layer=2,
            vocab_size=11,
            mixer_types=["rglru", "s7"],
            tie_embeddings=False,
            norm_type="layernorm",
        ),
        "classifier": functools.partial(Classifier, d_input=3, n_classes=4, d_model=8, d_state=8),
        "unet": functools.partial(UNet, d_input=3, d_output=2, d_model=8, d_state=8, depth=2),
    }
)


def _build(name: str) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BUILDERS[name]()


def _tensors(model: nn.Module) -> dict:
    """Every parameter and buffer by name (a tied tensor under its first name)."""
    named = dict(model.named_parameters())
    named.update(dict(model.named_buffers()))
    return {k: v for k, v in named.items() if v.is_floating_point() or v.is_complex()}


def _stats(t: torch.Tensor) -> dict:
    t = torch.view_as_real(t) if t.is_complex() else t
    t = t.detach().double().flatten()
    stats = {"mean": t.mean().item(), "max|x|": t.abs().max().item()}
    if t.numel() > 1:
        stats["std"] = t.std().item()
    return stats


@functools.cache
def _fresh(name: str):
    """Per tensor name: the value if every fresh model has the same one, else the range of
    each statistic over the fresh models."""
    draws = []
    for seed in range(FRESH):
        torch.manual_seed(seed)
        draws.append({k: v.detach().clone() for k, v in _tensors(_build(name)).items()})
    expected = {}
    for key, first in draws[0].items():
        if all(torch.equal(d[key], first) for d in draws[1:]):
            expected[key] = first
        else:
            stats = [_stats(d[key]) for d in draws]
            expected[key] = {
                s: (min(x[s] for x in stats), max(x[s] for x in stats)) for s in stats[0]
            }
    return expected


def _materialise(name: str, idiom: str) -> nn.Module:
    with torch.device("meta"):
        model = _build(name)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in _tensors(model).values():
            t.fill_(float("nan"))
    torch.manual_seed(1234)
    if idiom == "model":
        model.reset_parameters()
    elif idiom == "modules":  # pre-order: parents before their children
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    elif idiom == "apply":  # post-order: children before their parents
        model.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    else:  # FSDP's materialisation: breadth first, the modules that hold tensors themselves
        queue = deque([model])
        while queue:
            module = queue.popleft()
            queue.extend(module.children())
            own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
            if own:
                module.reset_parameters()
    return model


@pytest.mark.parametrize("idiom", ["model", "modules", "apply", "fsdp"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_materialised_model_has_its_construction_initialisation(name, idiom):
    if idiom == "model" and not hasattr(_build(name), "reset_parameters"):
        pytest.skip("a wrapper without its own reset_parameters")
    expected = _fresh(name)
    got = _tensors(_materialise(name, idiom))
    assert got.keys() == expected.keys()
    for key, want in expected.items():
        value = got[key]
        assert torch.isfinite(torch.view_as_real(value) if value.is_complex() else value).all(), (
            f"{name}/{idiom}: {key} was not initialised"
        )
        if isinstance(want, torch.Tensor):
            assert_close_rel(value, want, dtype=torch.float32)
            continue
        for stat, x in _stats(value).items():
            lo, hi = want[stat]
            margin = 2 * (hi - lo) + 1e-6 * max(abs(lo), abs(hi), 1e-6)
            if stat == "max|x|":  # an extreme: bounded above only (no garbage magnitudes)
                lo, margin = -float("inf"), hi + margin
            assert lo - margin <= x <= hi + margin, (
                f"{name}/{idiom}: {key}'s {stat} {x:.4g} is outside a fresh model's "
                f"[{lo:.4g}, {hi:.4g}]"
            )


@pytest.mark.parametrize("name", sorted(set(available_models())))
def test_reset_is_in_place_and_discards_derived_state(name):
    torch.manual_seed(0)
    model = _build(name).double()
    x = torch.randn(2, 12, 8, dtype=torch.float64)
    model(x)  # S4 attunes C to the length; caches of step constants fill
    cache = model.allocate_inference_cache(2)
    model.step(x[:, 0], cache)
    before = {k: (id(v), v.dtype) for k, v in _tensors(model).items()}
    model.reset_parameters()
    assert {k: (id(v), v.dtype) for k, v in _tensors(model).items()} == before
    twin = _build(name).double()
    twin.load_state_dict(model.state_dict())
    out = model(x)
    want = twin(x)
    out, want = (out[0], want[0]) if isinstance(out, tuple) else (out, want)
    assert_close_rel(out, want, dtype=torch.float64, length=12)
    steps = [m.step(x[:, 0], m.allocate_inference_cache(2))[0] for m in (model, twin)]
    assert_close_rel(steps[0], steps[1], dtype=torch.float64)


def test_reset_keeps_the_precision_policy_and_draws_in_float32():
    torch.manual_seed(0)
    model = LRU(d_model=16, d_state=16).to(torch.bfloat16)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model.reset_parameters()
    finally:
        torch.set_default_dtype(default)
    assert model.B_re.dtype == torch.float32  # the spectral tensors stay float32
    rounded = model.B_re.to(torch.bfloat16).float()
    assert (rounded != model.B_re).float().mean() > 0.9  # drawn in float32, not in bfloat16


def test_mamba_dt_projection_resets_to_its_step_range():
    torch.manual_seed(0)
    mixer = build_mixer("mamba", 16, 4, dt_min=0.01, dt_max=0.05)
    dt_proj = mixer.model.dt_proj
    with torch.no_grad():
        dt_proj.bias.fill_(0.0)
    dt_proj.reset_parameters()  # alone, as torch's per-module initialisation calls it
    dt = torch.nn.functional.softplus(dt_proj.bias.double())
    assert (dt >= 0.01 * (1 - 1e-6)).all() and (dt <= 0.05 * (1 + 1e-6)).all()
    assert dt_proj.weight.abs().max() <= dt_proj.in_features**-0.5


def test_lm_keeps_its_tie_through_to_empty_and_assign_loads():
    """torch gives each module its own parameter when it moves a model off the meta device
    and when load_state_dict assigns: the LM ties its head to the embedding again (one
    parameter: one gradient, one optimizer entry)."""
    kw = dict(d_model=8, d_state=4, n_layer=1, vocab_size=11, mixer_types="mamba")
    with torch.device("meta"):
        lm = LRNNLMHeadModel(**kw)
    lm.to_empty(device="cpu")
    assert lm.lm_head.weight is lm.embedding.weight
    source = LRNNLMHeadModel(**kw)
    lm.load_state_dict(source.state_dict(), assign=True)
    assert lm.lm_head.weight is lm.embedding.weight
    assert len(list(lm.parameters())) == len(list(source.parameters()))
    untied = LRNNLMHeadModel(**kw, tie_embeddings=False)
    untied.to_empty(device="cpu")
    assert untied.lm_head.weight is not untied.embedding.weight
    # FSDP1 materialises module by module, the LM itself (holding no tensor) never
    with torch.device("meta"):
        lm = LRNNLMHeadModel(**kw)
    for module in lm.modules():
        module.to_empty(device="cpu", recurse=False)
    assert lm.lm_head.weight is lm.embedding.weight


def test_lm_leaves_a_head_the_user_untied_or_loaded_apart():
    kw = dict(d_model=8, d_state=4, n_layer=1, vocab_size=11, mixer_types="s5")
    torch.manual_seed(0)
    lm = LRNNLMHeadModel(**kw)
    head = torch.randn_like(lm.lm_head.weight)
    lm.load_state_dict({"lm_head.weight": head.clone()}, strict=False, assign=True)
    assert torch.equal(lm.lm_head.weight, head)  # the loaded head, untied
    lm = LRNNLMHeadModel(**kw)
    lm.lm_head.weight = torch.nn.Parameter(head.clone())
    lm.double()
    assert lm.lm_head.weight is not lm.embedding.weight
    assert torch.equal(lm.lm_head.weight, head.double())


@pytest.mark.parametrize(
    "make",
    [
        lambda: build_mixer("mamba", 8, 4, dtype=torch.float64),
        lambda: S4(8, d_state=8).double(),
        lambda: Centaurus(8, 8, sub_state_dim=4).double(),
    ],
    ids=["mamba-dtype", "s4-double", "centaurus-double"],
)
def test_a_float64_model_resets_in_float64(make):
    """The deterministic initial values come back to float64 precision, not float32's."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model = make()
    finally:
        torch.set_default_dtype(default)
    want = {k: v.clone() for k, v in _tensors(model).items()}
    model.reset_parameters()
    for key, value in _tensors(model).items():
        if key.endswith(("A_log", "A_real", "A_imag", "A_real_raw", "log_dt")):
            assert_close_rel(value, want[key], dtype=torch.float64, msg=key)


def test_a_subclass_that_draws_its_own_tensors_only_in_init_says_so():
    from lrnnx.models.ltv.base import LTV_LRNN

    class Decay(LTV_LRNN):
        def __init__(self, d_model):
            super().__init__(discretization=None)
            self.d_model = d_model
            self.log_a = nn.Parameter(torch.full((d_model,), -0.1))

        def forward(self, x):
            return x

        def step(self, x, cache):
            return x, cache

        def allocate_inference_cache(self, batch_size, max_seqlen=1, dtype=None):
            return {}

    with pytest.raises(NotImplementedError, match="log_a.*_init_parameters"):
        Decay(4).reset_parameters()
