"""Layers (RMSNorm, GatedMLP, MHA, Block) against float64 formulas, and the model registry."""

import math

import pytest
import torch
from torch import nn

from lrnnx.layers import MHA, Block, GatedMLP, RMSNorm
from lrnnx.models import registry
from lrnnx.models.registry import (
    MODEL_REGISTRY,
    MixerAdapter,
    ModelSpec,
    available_models,
    build_mixer,
    get_model_class,
    model_status,
    resolve_name,
)

torch.manual_seed(0)
D, N = 16, 16
MIXERS = sorted(set(available_models()) | {"attn"})


# ------------------------------------------------------------------------------ norm and MLP
def test_rmsnorm_formula_and_checks():
    norm = RMSNorm(D, eps=1e-5).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, D, dtype=torch.float64)
    ref = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), ref)
    with pytest.raises(ValueError, match=r"x: expected shape \(\.\.\., 16\)"):
        norm(torch.randn(2, 3, D + 1))
    with pytest.raises(ValueError, match="dim"):
        RMSNorm(0)


def test_rmsnorm_bf16_keeps_dtype():
    norm = RMSNorm(D)
    x = torch.randn(2, 4, D)
    y = norm(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), norm(x), atol=2e-2, rtol=2e-2)


def test_gated_mlp_formula_and_hidden():
    mlp = GatedMLP(D, hidden=24).double()
    x = torch.randn(2, 7, D, dtype=torch.float64)
    W1, W2 = mlp.fc1.weight, mlp.fc2.weight
    a, g = (x @ W1[:24].T), (x @ W1[24:].T)
    torch.testing.assert_close(mlp(x), (a * g * torch.sigmoid(g)) @ W2.T)
    assert GatedMLP(48).hidden == 128  # 8/3 * 48 = 128
    assert GatedMLP(64).hidden == 256  # 170 rounded up to a multiple of 128
    assert GatedMLP(64, multiple_of=8).hidden == 176
    with pytest.raises(ValueError, match="hidden"):
        GatedMLP(D, hidden=0)
    with pytest.raises(ValueError, match=r"x: expected shape"):
        mlp(torch.randn(2, 3, D + 2, dtype=torch.float64))


# ------------------------------------------------------------------------------------ MHA
def naive_mha(m: MHA, x: torch.Tensor, lengths=None) -> torch.Tensor:
    """The attention equations, looped in float64: RoPE as complex rotations of (2i, 2i+1)."""
    B, L, Dm = x.shape
    H, hd = m.num_heads, m.head_dim
    qkv = x.double() @ m.qkv.weight.double().T
    q, k, v = (qkv[..., i * Dm : (i + 1) * Dm].reshape(B, L, H, hd) for i in range(3))
    if m.rotary:
        theta = m.rotary_base ** (-2.0 * torch.arange(hd // 2, dtype=torch.float64) / hd)
        rot = torch.exp(1j * torch.arange(L, dtype=torch.float64)[:, None] * theta)  # (L, hd/2)

        def rope(t):
            z = torch.complex(t[..., 0::2], t[..., 1::2]) * rot[None, :, None, :]
            return torch.stack((z.real, z.imag), -1).reshape(t.shape)

        q, k = rope(q), rope(k)
    lens = [L] * B if lengths is None else lengths.tolist()
    out = torch.zeros(B, L, H, hd, dtype=torch.float64)
    for b in range(B):
        for t in range(lens[b]):
            keys = range(t + 1) if m.causal else range(lens[b])
            for h in range(H):
                s = torch.stack([q[b, t, h] @ k[b, j, h] for j in keys]) / math.sqrt(hd)
                p = torch.softmax(s, 0)
                out[b, t, h] = sum(p[i] * v[b, j, h] for i, j in enumerate(keys))
    return out.reshape(B, L, Dm) @ m.out_proj.weight.double().T


@pytest.mark.parametrize("rotary", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_mha_matches_naive_loop(rotary, causal):
    m = MHA(D, num_heads=4, rotary=rotary, causal=causal).double()
    x = torch.randn(2, 9, D, dtype=torch.float64)
    torch.testing.assert_close(m(x), naive_mha(m, x))
    lengths = torch.tensor([9, 4])
    y = m(x, lengths=lengths)
    torch.testing.assert_close(y, naive_mha(m, x, lengths))
    assert y[1, 4:].abs().max() == 0


def test_mha_rope_is_relative():
    """Scores depend on relative positions only: R(t) q . R(s) k == R(t+c) q . R(s+c) k."""
    m = MHA(D, num_heads=2).double()
    q = torch.randn(1, 2, 1, m.head_dim, dtype=torch.float64)
    k = torch.randn(1, 2, 1, m.head_dim, dtype=torch.float64)
    for t, s, c in [(5, 2, 7), (3, 3, 100), (0, 9, 41)]:
        a = (m.rotate(q, torch.tensor([t])) * m.rotate(k, torch.tensor([s]))).sum(-1)
        b = (m.rotate(q, torch.tensor([t + c])) * m.rotate(k, torch.tensor([s + c]))).sum(-1)
        torch.testing.assert_close(a, b)
    # and the rotation is not the identity
    assert not torch.allclose(m.rotate(q, torch.tensor([3])), q)


def test_mha_step_prefill_and_chunks_match_forward():
    m = MHA(D, num_heads=4).double()
    x = torch.randn(2, 11, D, dtype=torch.float64)
    y = m(x)
    cache = m.allocate_inference_cache(2, max_seqlen=11)
    ys = [m.step(x[:, t], cache)[0] for t in range(11)]
    torch.testing.assert_close(torch.stack(ys, 1), y)
    assert cache["seqlen_offset"] == 11 and cache["cache_seqlens"].tolist() == [11, 11]
    cache = m.allocate_inference_cache(2, max_seqlen=16)
    parts = [m(x[:, :4], inference_cache=cache), m(x[:, 4:7], inference_cache=cache)]
    parts += [m.step(x[:, t : t + 1], cache)[0] for t in range(7, 11)]  # (B, 1, D) each
    torch.testing.assert_close(torch.cat(parts, 1), y)
    cache = m.allocate_inference_cache(2, max_seqlen=16)  # lengths as one int: the same
    torch.testing.assert_close(m(x[:, :6], lengths=4, inference_cache=cache)[:, :4], y[:, :4])
    assert cache["cache_seqlens"].tolist() == [4, 4]


def test_mha_prefill_with_lengths_continues_each_sequence():
    m = MHA(D, num_heads=2).double()
    x = torch.randn(2, 8, D, dtype=torch.float64)
    nxt = torch.randn(2, 3, D, dtype=torch.float64)
    lengths = torch.tensor([8, 5])
    cache = m.allocate_inference_cache(2, max_seqlen=12)
    m(x, lengths=lengths, inference_cache=cache)
    steps = torch.stack([m.step(nxt[:, t], cache)[0] for t in range(3)], 1)
    for b, n in enumerate(lengths.tolist()):
        whole = m(torch.cat([x[b : b + 1, :n], nxt[b : b + 1]], 1))
        torch.testing.assert_close(steps[b], whole[0, n:])


def test_mha_gradient_through_prefill():
    m = MHA(D, num_heads=2)
    x = torch.randn(1, 5, D, requires_grad=True)
    cache = m.allocate_inference_cache(1, max_seqlen=8)
    m(x, inference_cache=cache).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert not cache["k_cache"].requires_grad


def test_mha_errors():
    with pytest.raises(ValueError, match="num_heads: must divide dim"):
        MHA(D, num_heads=3)
    with pytest.raises(ValueError, match="even head width"):
        MHA(6, num_heads=2, rotary=True)
    m = MHA(D, num_heads=4)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, L, 16\)"):
        m(torch.randn(2, 3, 8))
    cache = m.allocate_inference_cache(1, max_seqlen=2)
    m.step(torch.randn(1, D), cache)
    m.step(torch.randn(1, D), cache)
    with pytest.raises(ValueError, match="max_seqlen = 2"):
        m.step(torch.randn(1, D), cache)
    with pytest.raises(ValueError, match="max_seqlen = 2"):
        m(torch.randn(1, 3, D), inference_cache=m.allocate_inference_cache(1, max_seqlen=2))
    with pytest.raises(ValueError, match="k_cache"):
        m.step(torch.randn(3, D), m.allocate_inference_cache(2, max_seqlen=4))
    with pytest.raises(ValueError, match="non-causal"):
        MHA(D, 4, causal=False).step(torch.randn(1, D), cache)


# ---------------------------------------------------------------------------------- Block
def test_block_formula_step_and_lengths():
    torch.manual_seed(1)
    mixer = build_mixer("lru", D, N)
    block = Block(D, mixer, mlp=GatedMLP(D, hidden=24), activation="gelu").double()
    x = torch.randn(2, 10, D, dtype=torch.float64)
    h = x + torch.nn.functional.gelu(block.mixer(block.norm(x)))
    torch.testing.assert_close(block(x), h + block.mlp(block.norm2(h)))
    cache = block.allocate_inference_cache(2, 10)
    ys = torch.stack([block.step(x[:, t], cache)[0] for t in range(10)], 1)
    torch.testing.assert_close(ys, block(x))
    # a (B, 1, D) step gives (B, 1, D), through the block and its mixer (an LTI model)
    cache = block.allocate_inference_cache(2, 10)
    ys = torch.cat([block.step(x[:, t : t + 1], cache)[0] for t in range(10)], 1)
    torch.testing.assert_close(ys, block(x))
    assert mixer.step(x[:, :1], mixer.allocate_inference_cache(2, 1))[0].shape == (2, 1, D)
    y = block(x, lengths=torch.tensor([10, 6]))
    torch.testing.assert_close(y[1, :6], block(x[1:, :6])[0])
    assert y[1, 6:].abs().max() == 0
    with pytest.raises(ValueError, match="activation"):
        Block(D, mixer, activation="swishy")
    with pytest.raises(TypeError, match="mixer"):
        Block(D, "lru")


# ------------------------------------------------------------------------------- registry
def test_names_and_aliases():
    expected = {
        "s4": "s4",
        "S4D": "s4d",
        "s5": "s5",
        "event-s5": "event-s5",
        "s5-event": "event-s5",
        "Event_S5": "event-s5",
        "LRU": "lru",
        "centaurus": "centaurus",
        "mamba": "mamba",
        "S6": "mamba",
        "stream": "stream",
        "s7": "s7",
        "rglru": "rglru",
        "RG-LRU": "rglru",
        "rg_lru": "rglru",
        "attn": "attn",
        "MHA": "attn",
    }
    for alias, canonical in expected.items():
        assert resolve_name(alias) == canonical
    with pytest.raises(ValueError, match=r"unknown name 'transformerxl'.*'lru'"):
        resolve_name("transformerxl")
    with pytest.raises(ValueError, match="unknown name"):
        build_mixer("nope", D, N)
    for spec in MODEL_REGISTRY.values():
        assert spec.family in ("LTI", "LTV", "attention") and spec.url.startswith(
            "https://arxiv.org/abs/"
        )
        assert ":" in spec.target and spec.paper


def test_available_models_and_status():
    status = model_status()
    assert set(status) == set(MODEL_REGISTRY)
    avail = available_models()
    assert "attn" not in avail and "attn" in available_models(include_attention=True)
    assert {"lru", "s5"} <= set(avail)
    for name in avail:
        assert status[name] == "available"
        assert isinstance(get_model_class(name), type)


def test_unavailable_model_is_listed_as_such(monkeypatch):
    ghost = ModelSpec(
        "ghost", "lrnnx.models.lti.does_not_exist:Ghost", "LTI", "Ghost", "0000.00000", False
    )
    monkeypatch.setitem(MODEL_REGISTRY, "ghost", ghost)
    monkeypatch.setitem(registry.MODEL_ALIASES, "ghost", "ghost")
    assert not ghost.available
    assert "ghost" not in available_models()
    assert model_status()["ghost"].startswith("unavailable")
    with pytest.raises(ImportError, match="ghost"):
        get_model_class("ghost")


@pytest.mark.parametrize("name", MIXERS)
def test_build_mixer_follows_protocol(name):
    torch.manual_seed(0)
    m = build_mixer(name, D, N).double()
    assert isinstance(m, MHA if name == "attn" else MixerAdapter)
    x = torch.randn(2, 9, D, dtype=torch.float64)
    y = m(x)
    assert y.shape == (2, 9, D)
    cache = m.allocate_inference_cache(2, 9)
    ys = torch.stack([m.step(x[:, t], cache)[0] for t in range(9)], 1)
    torch.testing.assert_close(ys, y, atol=1e-6, rtol=1e-6)  # Mamba keeps a float32 state
    cache = m.allocate_inference_cache(2, 9)
    head = m(x[:, :5], inference_cache=cache)
    tail = torch.stack([m.step(x[:, t], cache)[0] for t in range(5, 9)], 1)
    torch.testing.assert_close(torch.cat([head, tail], 1), y, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", [n for n in MIXERS if n != "attn"])
def test_build_mixer_errors(name):
    with pytest.raises(ValueError, match="given twice"):
        build_mixer(name, D, N, dim=D)
    with pytest.raises(ValueError, match=r"does not accept \['bogus_arg'\]"):
        build_mixer(name, D, N, bogus_arg=1)
    m = build_mixer(name, D, N)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, L, 16\)"):
        m(torch.randn(2, 5, D + 1))
    ts = torch.rand(2, 5)
    if MODEL_REGISTRY[name].supports_timesteps:
        assert m(torch.randn(2, 5, D), integration_timesteps=ts).shape == (2, 5, D)
    else:
        with pytest.raises(ValueError, match="integration_timesteps"):
            m(torch.randn(2, 5, D), integration_timesteps=ts)


def test_build_mixer_from_class_and_path():
    from lrnnx.models.lti.lru import LRU

    torch.manual_seed(3)
    a = build_mixer(LRU, D, N)
    torch.manual_seed(3)
    b = build_mixer("lrnnx.models.lti.lru:LRU", D, N)
    x = torch.randn(1, 6, D)
    torch.testing.assert_close(a(x), b(x))
    assert isinstance(a.model, LRU) and a.model.d_state == N
    assert isinstance(build_mixer(MHA, D, num_heads=2), MHA)
    with pytest.raises(ImportError, match="cannot import"):
        build_mixer("lrnnx.models.lti.lru:NoSuchClass", D, N)
    with pytest.raises(TypeError, match="expected a mixer name or a class"):
        build_mixer(LRU(D, N), D, N)


class _TinyRNN(nn.Module):
    """A causal LRNN whose forward takes neither lengths nor a cache: h_t = a h_{t-1} + x_t."""

    def __init__(self, d_model, d_state=4):
        super().__init__()
        self.d_model = d_model
        self.a = nn.Parameter(torch.rand(d_model) * 0.9)

    def forward(self, x):
        h, ys = torch.zeros_like(x[:, 0]), []
        for t in range(x.shape[1]):
            h = self.a * h + x[:, t]
            ys.append(h)
        return torch.stack(ys, 1)

    def step(self, x, cache):
        cache["h"].mul_(self.a).add_(x)
        return cache["h"].clone(), cache

    def allocate_inference_cache(self, batch_size):
        return {"h": torch.zeros(batch_size, self.d_model, dtype=self.a.dtype)}


def test_adapter_for_a_model_without_cache_or_lengths():
    m = build_mixer(_TinyRNN, D, 4).double()
    x = torch.randn(2, 8, D, dtype=torch.float64)
    y = m(x)
    cache = m.allocate_inference_cache(2, 8)
    head = m(x[:, :5], inference_cache=cache)  # prefill through step()
    tail = torch.stack([m.step(x[:, t], cache)[0] for t in range(5, 8)], 1)
    torch.testing.assert_close(torch.cat([head, tail], 1), y)
    lengths = torch.tensor([8, 3])
    yl = m(x, lengths=lengths)
    torch.testing.assert_close(yl[1, :3], y[1, :3])
    assert yl[1, 3:].abs().max() == 0
    cache = m.allocate_inference_cache(2, 8)
    m(x, lengths=lengths, inference_cache=cache)  # state frozen at each length
    torch.testing.assert_close(cache["h"], torch.stack([y[0, 7], y[1, 2]]))


@pytest.mark.skipif("s4" not in available_models(), reason="S4 not available")
def test_adapter_transposes_bhl_models():
    torch.manual_seed(5)
    m = build_mixer("s4", D, N, transposed=True)
    assert m.model.transposed
    x = torch.randn(2, 7, D)
    ref = m.model(x.transpose(1, 2))[0].transpose(1, 2)
    torch.testing.assert_close(m(x), ref)
