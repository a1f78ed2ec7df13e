"""Mamba-1 checkpoints from transformers (``MambaForCausalLM``) and mamba_ssm
(``MambaLMHeadModel``) loaded into LRNNLMHeadModel.

The expectation is always transformers' own model, built with random weights moved off their
init (A_log, D, dt bias, norms and biases start at values a wrong mapping could reproduce) and
run in float64.  mamba_ssm needs CUDA, so its layout is produced from the same transformers
model: the state dict renamed to mamba_ssm's keys (its Mamba-1 math is transformers'), the
embedding padded with random rows as mamba_ssm pads it, and a mamba_ssm config.json.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _tol import assert_close_rel

pytest.importorskip("transformers")
from transformers import MambaConfig, MambaForCausalLM  # noqa: E402

from lrnnx.architectures.lm import LRNNLMHeadModel  # noqa: E402
from lrnnx.interop.mamba import (  # noqa: E402
    convert_mamba_state_dict,
    detect_layout,
    load_mamba_checkpoint,
    mamba_lm_config,
)
from lrnnx.utils.generation import generate  # noqa: E402

D, N, LAYERS, L = 32, 8, 2, 12


def hf_mamba(vocab=50, tie=True, use_bias=False, use_conv_bias=True, seed=0, **kwargs):
    """A random transformers MambaForCausalLM, every parameter moved off its init."""
    torch.manual_seed(seed)
    cfg = MambaConfig(
        vocab_size=vocab,
        hidden_size=D,
        state_size=N,
        num_hidden_layers=LAYERS,
        tie_word_embeddings=tie,
        use_bias=use_bias,
        use_conv_bias=use_conv_bias,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **kwargs,
    )
    model = MambaForCausalLM(cfg).eval()
    move_off_init(model)
    return model


def move_off_init(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))


def reference_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The source model's logits, computed in float64."""
    with torch.no_grad():
        return copy.deepcopy(model).double()(ids).logits


def assert_same_logits(lm: LRNNLMHeadModel, model: nn.Module, vocab: int, msg: str) -> None:
    ids = torch.randint(0, vocab, (2, L), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = lm(ids)
    assert logits.shape == (2, L, vocab)
    assert_close_rel(logits, reference_logits(model, ids), dtype=torch.float32, length=L, msg=msg)


# ----------------------------------------------------------------------------- transformers
@pytest.mark.parametrize(
    "vocab,tie,use_bias,use_conv_bias,rank,eps",
    [
        (50, True, False, True, "auto", 1e-5),
        (51, False, True, False, "auto", 1e-5),
        (51, True, True, True, 3, 1e-5),
        (50, False, False, False, 5, 1e-3),  # eps 1e-3 moves the logits by ~1e-2 relative
    ],
)
def test_transformers_safetensors(tmp_path, vocab, tie, use_bias, use_conv_bias, rank, eps):
    hf = hf_mamba(vocab, tie, use_bias, use_conv_bias, time_step_rank=rank, layer_norm_epsilon=eps)
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    lm = LRNNLMHeadModel.from_pretrained(tmp_path)
    assert not lm.training
    assert (lm.lm_head.weight is lm.embedding.weight) == tie
    mixer = lm.layers[1].mixer.model
    assert mixer.dt_rank == (2 if rank == "auto" else rank)  # "auto" = ceil(32 / 16)
    assert (mixer.in_proj.bias is not None) == use_bias
    assert (mixer.conv1d.bias is not None) == use_conv_bias
    # copied tensors are equal; the padded vocabulary rows are zero
    src = hf.state_dict()
    assert torch.equal(mixer.A_log, src["backbone.layers.1.mixer.A_log"])
    assert torch.equal(lm.embedding.weight[:vocab], src["backbone.embeddings.weight"])
    assert lm.embedding.weight.shape[0] == 56 and not lm.embedding.weight[vocab:].any()
    assert_same_logits(lm, hf, vocab, f"tie={tie} bias={use_bias} conv_bias={use_conv_bias}")


def test_transformers_sharded_safetensors_and_bin(tmp_path):
    hf = hf_mamba(51, tie=False, use_bias=True)
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    assert_same_logits(LRNNLMHeadModel.from_pretrained(sharded), hf, 51, "sharded safetensors")

    as_bin = tmp_path / "bin"
    hf.config.save_pretrained(as_bin)
    torch.save(hf.state_dict(), as_bin / "pytorch_model.bin")
    assert_same_logits(LRNNLMHeadModel.from_pretrained(as_bin), hf, 51, "pytorch_model.bin")

    # sharded .bin: two files and an index
    state = hf.state_dict()
    keys = sorted(state)
    shards = {
        "pytorch_model-00001-of-00002.bin": keys[:5],
        "pytorch_model-00002-of-00002.bin": keys[5:],
    }
    sharded_bin = tmp_path / "sharded_bin"
    hf.config.save_pretrained(sharded_bin)
    for name, names in shards.items():
        torch.save({k: state[k] for k in names}, sharded_bin / name)
    index = {"weight_map": {k: name for name, names in shards.items() for k in names}}
    (sharded_bin / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    assert_same_logits(load_mamba_checkpoint(sharded_bin), hf, 51, "sharded .bin")


def test_device_and_dtype_are_honoured(tmp_path):
    hf = hf_mamba(50)
    hf.save_pretrained(tmp_path)
    lm = LRNNLMHeadModel.from_pretrained(tmp_path, device="cpu", torch_dtype="float64")
    assert {p.dtype for p in lm.parameters()} == {torch.float64}
    assert {p.device.type for p in lm.parameters()} == {"cpu"}
    assert not lm.training
    assert_same_logits(
        lm, hf, 50, "float64"
    )  # transformers' float64 run rounds to float32 in places
    with pytest.raises(ValueError, match="disagree"):
        LRNNLMHeadModel.from_pretrained(tmp_path, "cpu", device="meta")
    with pytest.raises(ValueError, match="disagree"):
        LRNNLMHeadModel.from_pretrained(tmp_path, dtype="float32", torch_dtype="float64")


def test_imported_model_round_trips_through_save_pretrained(tmp_path):
    hf = hf_mamba(51, tie=False, use_bias=True)
    hf.save_pretrained(tmp_path / "hf")
    lm = LRNNLMHeadModel.from_pretrained(tmp_path / "hf")
    assert lm.config["residual_in_fp32"] and lm.config["norm_type"] == "rmsnorm"
    lm.save_pretrained(tmp_path / "lrnnx")
    assert detect_layout(json.loads((tmp_path / "lrnnx" / "config.json").read_text())) == "lrnnx"
    again = LRNNLMHeadModel.from_pretrained(tmp_path / "lrnnx")
    assert again.config == lm.config
    assert_same_logits(again, hf, 51, "re-saved by lrnnx")


def test_greedy_generate_matches_transformers(tmp_path):
    hf = hf_mamba(51, tie=False, use_bias=True, seed=3)
    hf.save_pretrained(tmp_path)
    lm = LRNNLMHeadModel.from_pretrained(tmp_path)
    prompt = torch.randint(0, 51, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=6, do_sample=False)
    got = generate(lm, prompt, max_new_tokens=6)
    assert got.shape == expected.shape == (2, 11)
    assert torch.equal(got, expected)  # token ids (argmax), not floating-point values


def test_residual_in_fp32_keeps_the_stream_in_float32(tmp_path):
    hf = hf_mamba(50)
    hf.save_pretrained(tmp_path)
    lm = LRNNLMHeadModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert lm.residual_in_fp32 and lm.embedding.weight.dtype == torch.bfloat16
    stream = []
    hooks = [b.register_forward_hook(lambda m, i, o: stream.append(o.dtype)) for b in lm.layers]
    ids = torch.randint(0, 50, (2, L), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = lm(ids)
    for h in hooks:
        h.remove()
    assert stream == [torch.float32] * LAYERS and logits.dtype == torch.bfloat16
    ref = reference_logits(hf, ids)
    assert_close_rel(logits, ref, length=L, msg="bf16 weights, float32 residual")
    # decoding one token at a time follows the same stream
    cache = lm.allocate_inference_cache(2)
    steps = torch.stack([lm.step(ids[:, t], cache)[0] for t in range(L)], dim=1)
    assert_close_rel(steps, ref, dtype=torch.bfloat16, length=L, msg="step")


# -------------------------------------------------------------------------------- mamba_ssm
def to_mamba_ssm(tmp_path, hf, *, rms_norm=True, d_intermediate=0, mlp=None, pad_multiple=8):
    """Write ``hf``'s weights as mamba_ssm's MambaLMHeadModel saves them."""
    cfg = hf.config
    vocab = cfg.vocab_size
    rows = -(-vocab // pad_multiple) * pad_multiple
    state = {}
    for k, v in hf.state_dict().items():
        state[k.replace("backbone.embeddings.", "backbone.embedding.")] = v.clone()
    gen = torch.Generator().manual_seed(7)
    # mamba_ssm's padded rows hold (trained or random) values; lrnnx must ignore them
    for k in ("backbone.embedding.weight", "lm_head.weight"):
        extra = torch.randn(rows - vocab, D, generator=gen)
        state[k] = torch.cat([state[k], extra])
    if cfg.tie_word_embeddings:  # mamba_ssm saves the tied head under both names
        state["lm_head.weight"] = state["backbone.embedding.weight"]
    for i, (fc1, fc2, norm2) in enumerate(mlp or []):
        state[f"backbone.layers.{i}.mlp.fc1.weight"] = fc1
        state[f"backbone.layers.{i}.mlp.fc2.weight"] = fc2
        state[f"backbone.layers.{i}.norm2.weight"] = norm2
    ssm_cfg = {"d_state": N, "bias": cfg.use_bias, "conv_bias": cfg.use_conv_bias}
    config = {
        "d_model": D,
        "d_intermediate": d_intermediate,
        "n_layer": LAYERS,
        "vocab_size": vocab,
        "ssm_cfg": ssm_cfg,
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": rms_norm,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": pad_multiple,
        "tie_embeddings": cfg.tie_word_embeddings,
    }
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    torch.save(state, tmp_path / "pytorch_model.bin")
    return config


@pytest.mark.parametrize("tie,use_bias", [(True, False), (False, True)])
def test_mamba_ssm_layout(tmp_path, tie, use_bias):
    hf = hf_mamba(51, tie=tie, use_bias=use_bias)
    config = to_mamba_ssm(tmp_path, hf)
    assert detect_layout(config) == "mamba_ssm"
    lm = LRNNLMHeadModel.from_pretrained(tmp_path)
    # mamba_ssm's logits have the padded width 56; lrnnx returns the real vocabulary's 51
    assert lm.padded_vocab_size == 56 and lm.vocab_size == 51
    assert (lm.lm_head.weight is lm.embedding.weight) == tie
    assert_same_logits(lm, hf, 51, f"mamba_ssm tie={tie}")


def test_mamba_ssm_layernorm(tmp_path):
    """rms_norm=False: LayerNorm with bias; the reference swaps transformers' norms for it."""
    hf = hf_mamba(51)
    for block in hf.backbone.layers:
        block.norm = nn.LayerNorm(D, eps=1e-5)
    hf.backbone.norm_f = nn.LayerNorm(D, eps=1e-5)
    move_off_init(hf)
    to_mamba_ssm(tmp_path, hf, rms_norm=False)
    lm = LRNNLMHeadModel.from_pretrained(tmp_path)
    assert lm.config["norm_type"] == "layernorm" and lm.norm_f.bias is not None
    assert_same_logits(lm, hf, 51, "LayerNorm")


def test_mamba_ssm_mlp(tmp_path):
    """d_intermediate > 0: a SwiGLU MLP after each mixer, hidden width rounded up to 128."""
    hf = hf_mamba(50)
    gen = torch.Generator().manual_seed(5)
    mlp = [
        (
            0.2 * torch.randn(2 * 128, D, generator=gen),
            0.1 * torch.randn(D, 128, generator=gen),
            1 + 0.1 * torch.randn(D, generator=gen),
        )
        for _ in range(LAYERS)
    ]
    to_mamba_ssm(tmp_path, hf, d_intermediate=100, mlp=mlp)
    lm = LRNNLMHeadModel.from_pretrained(tmp_path)
    assert lm.config["d_intermediate"] == 128

    ids = torch.randint(0, 50, (2, L), generator=torch.Generator().manual_seed(1))
    ref = copy.deepcopy(hf).double()
    eps = hf.config.layer_norm_epsilon
    with torch.no_grad():  # mamba_ssm's Block: x + mixer(norm(x)), then x + mlp(norm2(x))
        h = ref.backbone.embeddings(ids)
        for block, (fc1, fc2, g) in zip(ref.backbone.layers, mlp, strict=True):
            h = block(h)
            n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * g.double()
            a, gate = F.linear(n, fc1.double()).chunk(2, dim=-1)
            h = h + F.linear(a * F.silu(gate), fc2.double())
        expected = ref.lm_head(ref.backbone.norm_f(h))
        got = lm(ids)
    assert_close_rel(got, expected, dtype=torch.float32, length=L, msg="with MLP")


# ----------------------------------------------------------------------------------- errors
def write_config(path, config):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))


def test_unknown_and_unsupported_layouts_are_refused(tmp_path):
    cases = {
        "gpt2": ({"model_type": "gpt2", "n_embd": 8}, r"model_type 'gpt2'"),
        "mamba2": ({"model_type": "mamba2", "hidden_size": 8}, r"Mamba-2"),
        "falcon": ({"model_type": "falcon_mamba"}, r"falcon_mamba"),
        "empty": ({}, r"expected an lrnnx config"),
        "ssm2": ({"d_model": 8, "n_layer": 1, "ssm_cfg": {"layer": "Mamba2"}}, r"'Mamba2'"),
        "attn": ({"d_model": 8, "n_layer": 2, "attn_layer_idx": [1]}, r"attn_layer_idx"),
        "ssm_key": ({"d_model": 8, "n_layer": 1, "ssm_cfg": {"ngroups": 1}}, r"ngroups"),
        "act": ({"model_type": "mamba", "hidden_act": "gelu"}, r"hidden_act 'gelu'"),
    }
    for name, (config, match) in cases.items():
        write_config(tmp_path / name, config)
        with pytest.raises(ValueError, match=match):
            LRNNLMHeadModel.from_pretrained(tmp_path / name)
    with pytest.raises(TypeError, match="config"):
        detect_layout(["d_model"])
    with pytest.raises(ValueError, match="layout"):
        mamba_lm_config({"d_model": 8, "n_layer": 1}, layout="lrnnx")
    swish = mamba_lm_config({"model_type": "mamba", "hidden_act": "swish"})  # silu's alias
    assert swish == mamba_lm_config({"model_type": "mamba", "hidden_act": "silu"})


def test_broken_checkpoints_are_refused(tmp_path):
    hf = hf_mamba(50, tie=False)
    hf.save_pretrained(tmp_path / "ok")
    config = json.loads((tmp_path / "ok" / "config.json").read_text())

    write_config(tmp_path / "no_weights", config)
    with pytest.raises(FileNotFoundError, match="no weights"):
        LRNNLMHeadModel.from_pretrained(tmp_path / "no_weights")

    state = hf.state_dict()
    head = state.pop("lm_head.weight")
    with pytest.raises(ValueError, match="no 'lm_head.weight'"):
        convert_mamba_state_dict(state, config)
    tied = {**config, "tie_word_embeddings": True}
    with pytest.raises(ValueError, match="differs from the embedding"):
        convert_mamba_state_dict({**state, "lm_head.weight": head}, tied)

    wrong = tmp_path / "wrong_shape"
    write_config(wrong, {**config, "state_size": N + 1})
    torch.save(hf.state_dict(), wrong / "pytorch_model.bin")
    with pytest.raises(RuntimeError, match="A_log: expected shape"):
        LRNNLMHeadModel.from_pretrained(wrong)

    # a config whose vocabulary outgrows the embedding: ids the checkpoint never had
    grown = tmp_path / "grown_vocab"
    write_config(grown, {**config, "vocab_size": 60})
    torch.save(hf.state_dict(), grown / "pytorch_model.bin")
    with pytest.raises(ValueError, match="lm_head.weight: has 50 rows.* is 60"):
        LRNNLMHeadModel.from_pretrained(grown)


def test_lm_norm_options_are_checked():
    with pytest.raises(ValueError, match="norm_type"):
        LRNNLMHeadModel(D, N, 1, 10, "mamba", norm_type="batchnorm")
    with pytest.raises(TypeError, match="residual_in_fp32"):
        LRNNLMHeadModel(D, N, 1, 10, "mamba", residual_in_fp32="yes")
