"""LRNNLMHeadModel: step == forward for every mixer (attention included), prefill, padding,
event-driven timesteps, save/load and configuration."""

import inspect

import pytest
import torch

from lrnnx.architectures import LRNNLMHeadModel
from lrnnx.layers import MHA
from lrnnx.models.registry import MODEL_REGISTRY, available_models

torch.manual_seed(0)
D, N, V = 16, 16, 37
MIXERS = sorted(set(available_models()) | {"attn"})
EVENT = [n for n in available_models() if MODEL_REGISTRY[n].supports_timesteps]


def make(mixer_types, n_layer=2, **kw):
    torch.manual_seed(0)
    return LRNNLMHeadModel(D, N, n_layer, V, mixer_types, **kw).double().eval()


def run_steps(lm, ids, cache, ts=None):
    out = []
    for t in range(ids.shape[1]):
        logits, cache = lm.step(
            ids[:, t], cache, integration_timesteps=None if ts is None else ts[:, t]
        )
        out.append(logits)
    return torch.stack(out, 1)


@pytest.mark.parametrize("mixer", MIXERS)
def test_step_and_prefill_match_forward(mixer):
    lm = make(mixer)
    ids = torch.randint(0, V, (2, 10))
    full = lm(ids)
    assert full.shape == (2, 10, V)
    cache = lm.allocate_inference_cache(2, max_seqlen=10)
    torch.testing.assert_close(run_steps(lm, ids, cache), full, atol=1e-6, rtol=1e-6)
    assert cache["seqlen_offset"] == 10
    cache = lm.allocate_inference_cache(2, max_seqlen=10)
    head = lm(ids[:, :6], inference_cache=cache)
    tail = run_steps(lm, ids[:, 6:], cache)
    torch.testing.assert_close(torch.cat([head, tail], 1), full, atol=1e-6, rtol=1e-6)


def test_mixed_stack_with_attention_is_stepped():
    types = ["s5", "attn", "lru"]
    lm = make(types, n_layer=3, d_intermediate=24)
    assert [type(b.mixer).__name__ for b in lm.layers][1] == "MHA"
    ids = torch.randint(0, V, (3, 12))
    full = lm(ids)
    cache = lm.allocate_inference_cache(3, max_seqlen=12)
    head = lm(ids[:, :5], inference_cache=cache)
    tail = run_steps(lm, ids[:, 5:], cache)
    torch.testing.assert_close(torch.cat([head, tail], 1), full)
    # the attention layer really ran in step: its KV cache holds all 12 tokens
    assert cache[1]["cache_seqlens"].tolist() == [12, 12, 12]
    assert cache[1]["k_cache"][:, :, 11].abs().sum() > 0
    # and it matters: the same stack with attention's step skipped would disagree
    cache = lm.allocate_inference_cache(3, max_seqlen=12)
    lm(ids[:, :5], inference_cache=cache)
    x = lm.embedding(ids[:, 5])
    x, _ = lm.layers[0].step(x, cache[0])
    x, _ = lm.layers[2].step(x, cache[2])
    skipped = lm.lm_head(lm.norm_f(x))[..., :V]
    assert not torch.allclose(skipped, full[:, 5], atol=1e-4)


def test_stack_of_every_available_mixer():
    types = MIXERS
    lm = make(types, n_layer=len(types))
    ids = torch.randint(0, V, (2, 8))
    cache = lm.allocate_inference_cache(2, max_seqlen=8)
    head = lm(ids[:, :3], inference_cache=cache)
    tail = run_steps(lm, ids[:, 3:], cache)
    torch.testing.assert_close(torch.cat([head, tail], 1), lm(ids), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("mixer", ["s5", "attn"] + [m for m in ("mamba", "rglru") if m in MIXERS])
def test_padding_changes_nothing(mixer):
    lm = make(mixer)
    ids = torch.randint(0, V, (3, 9))
    lengths = torch.tensor([9, 4, 1])
    logits = lm(ids, lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(logits[b, :n], lm(ids[b : b + 1, :n])[0])
        if n < 9:
            assert logits[b, n:].abs().max() == 0
    # prefill with lengths, then step: each sequence continues from its own length
    cache = lm.allocate_inference_cache(3, max_seqlen=12)
    lm(ids, lengths=lengths, inference_cache=cache)
    nxt = torch.randint(0, V, (3, 2))
    steps = run_steps(lm, nxt, cache)
    for b, n in enumerate(lengths.tolist()):
        whole = lm(torch.cat([ids[b : b + 1, :n], nxt[b : b + 1]], 1))
        torch.testing.assert_close(steps[b], whole[0, n:], atol=1e-6, rtol=1e-6)


@pytest.mark.skipif(not EVENT, reason="no event-driven model available")
def test_event_driven_timesteps_in_step_and_forward():
    types = [EVENT[0], "attn"]
    lm = make(types)
    ids = torch.randint(0, V, (2, 7))
    ts = torch.rand(2, 7, dtype=torch.float64) + 0.1
    full = lm(ids, integration_timesteps=ts)
    assert not torch.allclose(full, lm(ids), atol=1e-6)  # the timesteps are used
    cache = lm.allocate_inference_cache(2, max_seqlen=7)
    head = lm(ids[:, :3], integration_timesteps=ts[:, :3], inference_cache=cache)
    tail = run_steps(lm, ids[:, 3:], cache, ts[:, 3:])
    torch.testing.assert_close(torch.cat([head, tail], 1), full, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="integration_timesteps"):
        make("s5")(ids, integration_timesteps=ts)


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_round_trip(tmp_path, tie):
    lm = make(
        ["s5", "attn"],
        mixer_kwargs={"s5": {"conj_sym": True}},
        tie_embeddings=tie,
        d_intermediate=8,
    )
    with torch.no_grad():  # move off the init so a fresh model would differ
        for p in lm.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert (lm.lm_head.weight is lm.embedding.weight) == tie
    lm.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    loaded = LRNNLMHeadModel.from_pretrained(tmp_path)
    assert (loaded.lm_head.weight is loaded.embedding.weight) == tie
    assert loaded.config == lm.config
    assert not loaded.training  # from_pretrained returns eval mode
    loaded_state = loaded.state_dict()
    for k, v in lm.state_dict().items():  # copied: exactly equal
        assert torch.equal(loaded_state[k], v), k
    ids = torch.randint(0, V, (2, 9))
    # recomputed: equal relative to the logits' magnitude (float64), not bitwise (another CPU's
    # kernels may round differently)
    ref = lm(ids)
    assert (loaded(ids) - ref).abs().max() <= 1e-12 * ref.abs().max()
    assert loaded.embedding.weight.dtype == torch.float64
    fresh = make(
        ["s5", "attn"],
        mixer_kwargs={"s5": {"conj_sym": True}},
        tie_embeddings=tie,
        d_intermediate=8,
    )
    assert not torch.allclose(fresh(ids), lm(ids))


def test_load_rejects_mismatched_weights(tmp_path):
    make("s5").save_pretrained(tmp_path)
    import json

    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["d_intermediate"] = 8  # the config now wants MLP weights the file does not hold
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match=r"missing \['layers.0.mlp.fc1.weight'"):
        LRNNLMHeadModel.from_pretrained(tmp_path)
    cfg["d_intermediate"], cfg["vocab_size"] = 0, 80
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match=r"embedding.weight: expected shape \(80, 16\)"):
        LRNNLMHeadModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        LRNNLMHeadModel.from_pretrained(tmp_path / "nowhere")


def test_config_holds_every_constructor_argument():
    params = set(inspect.signature(LRNNLMHeadModel.__init__).parameters) - {"self"}
    params -= {"device", "dtype"}  # torch's factory arguments: where and how, not what
    lm = LRNNLMHeadModel(D, N, 2, V, "S5", mixer_kwargs={"conj_sym": True}, num_heads=2)
    assert set(lm.config) == params
    assert lm.config["mixer_types"] == ["s5", "s5"]  # canonical names
    assert lm.config["mixer_kwargs"] == {"conj_sym": True}
    rebuilt = LRNNLMHeadModel(**lm.config)
    assert rebuilt.config == lm.config


def test_vocab_padding_and_mixer_kwargs_routing():
    lm = make(
        ["s5", "attn"], mixer_kwargs={"S5": {"conj_sym": True}, "mha": {"rotary_base": 500.0}}
    )
    assert lm.padded_vocab_size == 40 and lm.embedding.weight.shape[0] == 40
    assert lm(torch.randint(0, V, (1, 3))).shape == (1, 3, V)
    assert lm.layers[0].mixer.model.conj_sym and lm.layers[1].mixer.rotary_base == 500.0
    flat = make(["s5", "attn"], mixer_kwargs={"conj_sym": True})
    assert flat.layers[0].mixer.model.conj_sym and isinstance(flat.layers[1].mixer, MHA)


def test_errors():
    with pytest.raises(
        ValueError, match=r"mixer_types: expected one name or a list of n_layer = 3"
    ):
        LRNNLMHeadModel(D, N, 3, V, ["s5", "lru"])
    with pytest.raises(ValueError, match=r"unknown name 'gru'.*'s5'"):
        LRNNLMHeadModel(D, N, 1, V, "gru")
    with pytest.raises(ValueError, match="mixes mixer names"):
        LRNNLMHeadModel(D, N, 1, V, "s5", mixer_kwargs={"s5": {}, "conj_sym": True})
    with pytest.raises(ValueError, match="no layer uses"):
        LRNNLMHeadModel(D, N, 1, V, "s5", mixer_kwargs={"lru": {}})
    with pytest.raises(ValueError, match="given twice"):
        LRNNLMHeadModel(D, N, 1, V, "s5", mixer_kwargs={"d_state": 8})
    with pytest.raises(ValueError, match="num_heads once"):
        LRNNLMHeadModel(D, N, 1, V, "attn", mixer_kwargs={"attn": {"num_heads": 2}})
    with pytest.raises(ValueError, match="rotary once"):
        LRNNLMHeadModel(D, N, 1, V, "attn", mixer_kwargs={"attn": {"rotary": False}})
    with pytest.raises(ValueError, match="d_model"):
        LRNNLMHeadModel(0, N, 1, V, "s5")
    lm = make("s5")
    with pytest.raises(TypeError, match="input_ids: expected an integer tensor"):
        lm(torch.rand(2, 4))
    with pytest.raises(ValueError, match=r"input_ids: expected token ids in \[0, 37\)"):
        lm(torch.full((1, 3), V))
    with pytest.raises(ValueError, match=r"input_ids: expected shape \(B, L\)"):
        lm(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids: expected shape \(B,\) or \(B, 1\)"):
        lm.step(torch.zeros(2, 2, dtype=torch.long), lm.allocate_inference_cache(2, 4))
    with pytest.raises(ValueError, match="inference_cache"):
        lm.step(torch.zeros(2, dtype=torch.long), {"seqlen_offset": 0})


def test_residual_output_projections_are_scaled_by_depth():
    """mamba_ssm's rescale_prenorm_residual: the residual branches' output projections
    (out_proj of Mamba, RG-LRU and attention, the MLP's fc2) start at torch's Linear
    initialisation divided by sqrt(n_residuals n_layer), so the residual stream's spread at
    initialisation does not grow with depth; every other tensor is drawn as without it, and a
    reset (the model's own, or module by module as FSDP does) draws the same distribution."""
    import math

    def lm(n_layer, **kw):
        torch.manual_seed(0)
        return LRNNLMHeadModel(d_model=64, d_state=8, n_layer=n_layer, vocab_size=50,
                               mixer_types=["mamba", "rglru", "attn"] * (n_layer // 3),
                               d_intermediate=128, **kw)  # fmt: skip

    def projections(model):
        names = ("out_proj.weight", "fc2.weight")
        return {n: p for n, p in model.named_parameters() if n.endswith(names)}

    torch_std = {128: 1 / math.sqrt(3 * 128), 64: 1 / math.sqrt(3 * 64)}  # U(+-1/sqrt(fan_in))
    ids = torch.randint(0, 50, (4, 32))
    spread = {}
    for n in (3, 24):
        scaled, plain = lm(n), lm(n, rescale_prenorm_residual=False)
        for name, p in projections(scaled).items():
            q = projections(plain)[name]
            assert torch.allclose(p, q / math.sqrt(2 * n)), name  # the same draw, scaled
        others = dict(plain.named_parameters())
        for name, p in scaled.named_parameters():
            if name not in projections(scaled):
                assert torch.equal(p, others[name]), name
        for reset in ("model", "modules"):
            if reset == "model":
                scaled.reset_parameters()
            else:
                for m in scaled.modules():
                    if hasattr(m, "reset_parameters"):
                        m.reset_parameters()
            for name, p in projections(scaled).items():
                mixer = scaled.mixer_types[int(name.split(".")[1])]
                lecun = mixer == "rglru" and ".mixer." in name  # RG-LRU's own scheme
                std = 1 / math.sqrt(p.shape[1]) if lecun else torch_std[p.shape[1]]
                want = std / math.sqrt(2 * n)
                assert abs(p.std().item() / want - 1) < 0.15, (reset, name, p.std().item(), want)
        with torch.no_grad():
            h = scaled._embed(ids)
            for layer in scaled.layers:
                h = layer(h)
        spread[n] = h.std().item()
    assert spread[24] < 1.5 * spread[3], spread


class _LinearMixer(torch.nn.Module):
    """A custom mixer ending in a torch nn.Linear named out_proj."""

    def __init__(self, d_model, d_state=None):
        super().__init__()
        self.out_proj = torch.nn.Linear(d_model, d_model, bias=False)

    def forward(self, x, **kwargs):
        return self.out_proj(x)

    def step(self, x, inference_cache, **kwargs):
        return self.out_proj(x), inference_cache

    def allocate_inference_cache(self, batch_size, max_seqlen=1, dtype=None):
        return {}


def test_a_custom_mixers_out_proj_is_scaled_too():
    """mamba_ssm scales by name, whatever the layer's class: a custom mixer's torch Linear
    named out_proj starts divided by sqrt(n_layer) too."""
    import math

    weights = {}
    for rescale in (True, False):
        torch.manual_seed(0)
        lm = LRNNLMHeadModel(d_model=16, d_state=4, n_layer=4, vocab_size=20,
                             mixer_types=_LinearMixer, rescale_prenorm_residual=rescale)  # fmt: skip
        weights[rescale] = lm.layers[0].mixer.model.out_proj.weight
    assert torch.allclose(weights[True], weights[False] / math.sqrt(4))
