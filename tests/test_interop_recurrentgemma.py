"""transformers' RecurrentGemma recurrent block -> lrnnx RGLRU, against the block itself.

Each test builds a small RecurrentGemma block or model with random weights (moved off their
init: the init makes the conv tiny and a ~ 1) and compares outputs within float32 tolerance.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from _tol import assert_close_rel, rel_err, tol
from lrnnx.interop.recurrentgemma import (
    load_recurrentgemma_recurrent_layers,
    recurrentgemma_layers_from_state_dict,
    rglru_from_recurrentgemma,
)

transformers = pytest.importorskip("transformers")
from transformers import RecurrentGemmaConfig, RecurrentGemmaForCausalLM  # noqa: E402
from transformers.models.recurrent_gemma.modeling_recurrent_gemma import (  # noqa: E402
    RecurrentGemmaRecurrentBlock,
)

H = 12


def _config(lru_width=16, **kw) -> RecurrentGemmaConfig:
    base = dict(
        vocab_size=32,
        hidden_size=H,
        lru_width=lru_width,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=16,
        num_hidden_layers=3,  # block types: recurrent, recurrent, attention
        attention_window_size=8,
        conv1d_width=4,
    )
    base.update(kw)
    return RecurrentGemmaConfig(**base)


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random; recurrent_param so that a^8 = exp(-8 softplus(p)) spreads over
    [0.3, 0.99] (fast and slow channels)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("recurrent_param"):
                ac = 0.3 + 0.69 * torch.rand(p.shape, generator=g, dtype=torch.float64)
                sp = -torch.log(ac) / 8  # softplus(p)
                p.copy_(torch.log(torch.expm1(sp)))
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=torch.float64))
    return module


def _block(config: RecurrentGemmaConfig, seed: int = 0) -> RecurrentGemmaRecurrentBlock:
    return _randomize(RecurrentGemmaRecurrentBlock(config, layer_idx=0), seed).eval()


def _positions(B: int, start: int, L: int) -> torch.Tensor:
    return (torch.arange(L) + start)[None].expand(B, L)


def _run_block(block, x: torch.Tensor, start: int = 0, use_cache: bool = False) -> torch.Tensor:
    """The block on x at positions start..start+L-1 (transformers 5.x signature)."""
    B, L, _ = x.shape
    pos = _positions(B, start, L)
    return block(x, position_ids=pos, attention_mask=None, use_cache=use_cache)[0]


@pytest.mark.parametrize(
    "cfg",
    [dict(), dict(lru_width=None), dict(hidden_activation="gelu", conv1d_width=3)],
    ids=["rect", "square", "erf-gelu"],
)
def test_block_forward_matches(cfg):
    torch.manual_seed(0)
    config = _config(**cfg)
    block = _block(config, seed=1)
    m = rglru_from_recurrentgemma(block)
    assert m.reset_at_start and m.c == 8.0 and m.lru_width == config.lru_width
    assert m.gelu_approximate == ("none" if cfg.get("hidden_activation") == "gelu" else "tanh")
    B, L = 3, 24
    x = torch.randn(B, L, H)
    with torch.no_grad():
        y_ref = _run_block(block, x)
        y = m(x)
        y_sd = rglru_from_recurrentgemma(block.state_dict(), config)(x)
    assert_close_rel(y, y_ref, length=L, msg="module")
    assert_close_rel(y_sd, y_ref, length=L, msg="state_dict + config")
    # the option matters: the paper's update at t = 0 gives other first outputs
    paper = copy.deepcopy(m)
    paper.reset_at_start = False
    with torch.no_grad():
        y_paper = paper(x)
    assert rel_err(y_paper[:, :2], y_ref[:, :2]) > 100 * tol(torch.float32, L)


@pytest.mark.parametrize("cfg, prompt_len", [(dict(lru_width=None), 0), (dict(), 5)])
def test_decode_matches_block_cache(cfg, prompt_len):
    """Prefill (if any) and token-by-token decoding, the block's own cache against step."""
    torch.manual_seed(0)
    block = _block(_config(**cfg), seed=2)
    m = rglru_from_recurrentgemma(block)
    B, L = 2, 12
    x = torch.randn(B, L, H)
    cache = m.allocate_inference_cache(B, L)
    ref, got = [], []
    with torch.no_grad():
        if prompt_len:
            ref.append(_run_block(block, x[:, :prompt_len], use_cache=True))
            got.append(m(x[:, :prompt_len], inference_cache=cache))
        for t in range(prompt_len, L):
            ref.append(_run_block(block, x[:, t : t + 1], start=t, use_cache=True))
            got.append(m.step(x[:, t : t + 1], cache)[0])
        y_whole = _run_block(block, x)
    ref, got = torch.cat(ref, 1), torch.cat(got, 1)
    assert_close_rel(got, ref, length=L)
    assert_close_rel(got, y_whole, length=L, msg="decode vs whole")
    assert_close_rel(cache["lrnn_state"], block.rg_lru.recurrent_states, length=L, msg="state")


@pytest.mark.parametrize("shard", [False, True], ids=["single", "sharded"])
def test_load_checkpoint_directory(tmp_path, shard):
    torch.manual_seed(0)
    config = _config()
    model = RecurrentGemmaForCausalLM(config)
    for layer in model.model.layers:
        _randomize(layer.temporal_block, seed=3)
    kw = {"max_shard_size": "4KB"} if shard else {}
    model.save_pretrained(tmp_path, **kw)
    assert (tmp_path / "model.safetensors.index.json").exists() == shard

    layers = load_recurrentgemma_recurrent_layers(tmp_path)
    assert sorted(layers) == [0, 1]  # layer 2 is attention
    x = torch.randn(2, 16, H)
    for i, m in layers.items():
        assert m.layer_idx == i and m.Lambda.dtype == torch.float32
        block = model.model.layers[i].temporal_block
        with torch.no_grad():
            assert_close_rel(m(x), _run_block(block, x), length=16, msg=f"layer {i}")

    # the same from the in-memory state_dict (keys prefixed "model.")
    from_sd = recurrentgemma_layers_from_state_dict(model.state_dict(), config)
    assert sorted(from_sd) == [0, 1]
    with torch.no_grad():
        assert_close_rel(from_sd[1](x), layers[1](x), length=16)


def test_bad_inputs_name_the_problem(tmp_path):
    config = _config()
    block = _block(config)
    sd = block.state_dict()
    with pytest.raises(ValueError, match=r"missing entries \['rg_lru.recurrent_param'\]"):
        rglru_from_recurrentgemma({k: v for k, v in sd.items() if "recurrent_param" not in k})
    bad = dict(sd, **{"linear_y.bias": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"state_dict\['linear_y.bias'\]: expected shape \(16,\)"):
        rglru_from_recurrentgemma(bad)
    with pytest.raises(ValueError, match="hidden_activation: .*'relu'"):
        rglru_from_recurrentgemma(sd, {"hidden_activation": "relu"})
    with pytest.raises(ValueError, match="config hidden_size=8 but the weights have 12"):
        rglru_from_recurrentgemma(sd, {"hidden_size": 8})
    with pytest.raises(TypeError, match="^block: "):
        rglru_from_recurrentgemma(torch.zeros(3))
    for bad in (sd["linear_x.bias"].long(), sd["linear_x.bias"].to(torch.complex64), [0.0]):
        with pytest.raises(TypeError, match=r"state_dict\['linear_x.bias'\]: expected a real"):
            rglru_from_recurrentgemma(dict(sd, **{"linear_x.bias": bad}))
    # mixed dtypes: the widest, nothing rounded
    mixed = dict(sd, **{"linear_x.weight": sd["linear_x.weight"].bfloat16()})
    assert rglru_from_recurrentgemma(mixed).in_proj.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="recurrentgemma_layers_from_state_dict"):
        rglru_from_recurrentgemma({f"model.layers.0.temporal_block.{k}": v for k, v in sd.items()})
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_recurrentgemma_recurrent_layers(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ValueError, match="model_type 'mamba'"):
        load_recurrentgemma_recurrent_layers(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_recurrentgemma_recurrent_layers(tmp_path)
    # block types that disagree with the weights
    full = {f"model.layers.2.temporal_block.{k}": v for k, v in sd.items()}
    with pytest.raises(ValueError, match=r"layers \[0, 1\] recurrent.*layers \[2\]"):
        recurrentgemma_layers_from_state_dict(full, config)
    # a recurrent layer missing its recurrent_param is named, not taken for attention
    two = {f"model.layers.{i}.temporal_block.{k}": v for i in (0, 1) for k, v in sd.items()}
    del two["model.layers.1.temporal_block.rg_lru.recurrent_param"]
    with pytest.raises(ValueError, match=r"missing entries \['rg_lru.recurrent_param'\]"):
        recurrentgemma_layers_from_state_dict(two)
    with pytest.raises(ValueError, match=r"unexpected entries \['rg_lru.a_param'\]"):
        rglru_from_recurrentgemma(dict(sd, **{"rg_lru.a_param": sd["rg_lru.recurrent_param"]}))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match="weight_map"):
        load_recurrentgemma_recurrent_layers(tmp_path)
