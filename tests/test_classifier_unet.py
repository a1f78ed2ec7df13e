"""Classifier (padding invariance, hierarchical pooling) and UNet (shapes, causality, streaming)."""

import inspect
import math

import pytest
import torch

from lrnnx.architectures import Classifier, UNet
from lrnnx.architectures.classifier import POOL_BETWEEN, POOLINGS, pool_time
from lrnnx.models.registry import MODEL_REGISTRY, available_models

torch.manual_seed(0)
MIXERS = sorted(set(available_models()) | {"attn"})
EVENT = [n for n in available_models() if MODEL_REGISTRY[n].supports_timesteps]


# ------------------------------------------------------------------------------ pooling
def naive_pool(h, lengths, ts, kind, f):
    B, L, Dm = h.shape
    n = math.ceil(L / f)
    out = torch.zeros(B, n, Dm, dtype=h.dtype)
    ts_out = torch.zeros(B, n, dtype=h.dtype)
    for b in range(B):
        for k in range(math.ceil(lengths[b] / f)):
            idx = list(range(k * f, min(k * f + f, lengths[b])))
            w = h[b, idx]
            out[b, k] = w[-1] if kind == "stride" else (w.mean(0) if kind == "mean" else w.amax(0))
            ts_out[b, k] = ts[b, idx].sum()
    return out, ts_out


@pytest.mark.parametrize("kind", POOL_BETWEEN)
@pytest.mark.parametrize("f", [2, 3])
def test_pool_time_matches_loop(kind, f):
    h = torch.randn(3, 10, 4, dtype=torch.float64)
    ts = torch.rand(3, 10, dtype=torch.float64)
    lengths = torch.tensor([10, 7, 1])
    out, new_len, new_ts = pool_time(h, lengths, ts, kind, f)
    ref, ref_ts = naive_pool(h, lengths.tolist(), ts, kind, f)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(new_ts, ref_ts)
    assert new_len.tolist() == [math.ceil(n / f) for n in lengths.tolist()]
    out2, len2, ts2 = pool_time(h, None, ts, kind, f)  # no lengths: the whole (partial) tail
    ref2, ref_ts2 = naive_pool(h, [10] * 3, ts, kind, f)
    assert len2 is None
    torch.testing.assert_close(out2, ref2)
    torch.testing.assert_close(ts2, ref_ts2)


# --------------------------------------------------------------------------- classifier
def padded_vs_single(clf, x, lengths, ts=None):
    logits = clf(x, lengths=lengths, integration_timesteps=ts)
    for b, n in enumerate(lengths.tolist()):
        one = clf(x[b : b + 1, :n], integration_timesteps=None if ts is None else ts[b : b + 1, :n])
        torch.testing.assert_close(logits[b], one[0], atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("mixer", MIXERS)
def test_classifier_padding_changes_nothing(mixer):
    torch.manual_seed(0)
    clf = Classifier(
        3, 4, d_model=16, d_state=16, n_layers=2, mixer=mixer, pool_between=("stride", 2)
    )
    clf = clf.double().eval()
    x = torch.randn(3, 11, 3, dtype=torch.float64)
    lengths = torch.tensor([11, 6, 3])
    garbage = x.clone()
    garbage[1, 6:], garbage[2, 3:] = 1e3, -1e3  # padding content must not matter
    for kind in (None,) + POOL_BETWEEN:
        clf.pool_between = None if kind is None else (kind, 2)
        for pooling in POOLINGS:
            clf.pooling = pooling
            padded_vs_single(clf, x, lengths)
            torch.testing.assert_close(clf(garbage, lengths=lengths), clf(x, lengths=lengths))


def test_classifier_bidirectional_attention_padding():
    torch.manual_seed(0)
    clf = Classifier(
        3,
        4,
        d_model=16,
        d_state=16,
        n_layers=2,
        mixer="attn",
        mixer_kwargs={"causal": False},
        pooling="max",
    )
    clf = clf.double().eval()
    padded_vs_single(clf, torch.randn(2, 9, 3, dtype=torch.float64), torch.tensor([9, 5]))


@pytest.mark.skipif(not EVENT, reason="no event-driven model available")
def test_classifier_timesteps_with_hierarchical_pooling():
    torch.manual_seed(0)
    clf = Classifier(
        3, 4, d_model=16, d_state=16, n_layers=3, mixer=EVENT[0], pool_between=("mean", 2)
    )
    clf = clf.double().eval()
    x = torch.randn(3, 13, 3, dtype=torch.float64)
    ts = torch.rand(3, 13, dtype=torch.float64) + 0.5
    padded_vs_single(clf, x, torch.tensor([13, 8, 5]), ts)
    assert not torch.allclose(clf(x, integration_timesteps=ts), clf(x))


@pytest.mark.parametrize("mixer", MIXERS)
def test_classifier_dims_passed_once(mixer):
    clf = Classifier(5, 3, d_model=16, d_state=8, n_layers=1, mixer=mixer, d_intermediate=12)
    inner = clf.blocks[0].mixer
    if MODEL_REGISTRY[mixer].uses_d_state:
        assert inner.model.d_state == 8
    assert clf(torch.randn(2, 6, 5)).shape == (2, 3)
    with pytest.raises(ValueError, match="'d_state' is given twice"):
        Classifier(5, 3, d_model=16, d_state=8, mixer=mixer, mixer_kwargs={"d_state": 4})
    with pytest.raises(ValueError, match="'d_model' is given twice"):
        Classifier(5, 3, d_model=16, d_state=8, mixer=mixer, mixer_kwargs={"d_model": 4})


def test_classifier_embedding_encoder_and_errors():
    clf = Classifier(
        20, 3, d_model=16, d_state=16, n_layers=1, encoder="embedding", pooling="last"
    ).double()
    ids = torch.randint(0, 20, (2, 7))
    padded_vs_single(clf, ids, torch.tensor([7, 4]))
    with pytest.raises(TypeError, match="integer token ids"):
        clf(torch.randn(2, 7))
    with pytest.raises(ValueError, match=r"token ids in \[0, 20\)"):
        clf(torch.full((1, 3), 20))
    lin = Classifier(3, 2, d_model=16, d_state=16, n_layers=1)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, L, 3\)"):
        lin(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="lengths: expected every length >= 1"):
        lin(torch.randn(2, 5, 3), lengths=torch.tensor([5, 0]))
    assert lin(torch.randn(2, 5, 3), lengths=[5, 2]).shape == (2, 2)  # a list is accepted
    with pytest.raises(ValueError, match=r"lengths: expected shape \(2,\)"):
        lin(torch.randn(2, 5, 3), lengths=torch.tensor([5]))
    with pytest.raises(ValueError, match="pooling: expected one of"):
        Classifier(3, 2, pooling="median")
    with pytest.raises(ValueError, match="encoder: expected one of"):
        Classifier(3, 2, encoder="conv")
    with pytest.raises(ValueError, match="pool_between"):
        Classifier(3, 2, pool_between=("sum", 2))
    with pytest.raises(ValueError, match="unknown name"):
        Classifier(3, 2, mixer="lstm")
    with pytest.raises(ValueError, match="integration_timesteps"):
        lin(torch.randn(2, 5, 3), integration_timesteps=torch.rand(2, 5))


def test_classifier_save_load(tmp_path):
    clf = Classifier(
        3, 4, d_model=16, d_state=16, n_layers=2, mixer="lru", pool_between=("max", 2)
    ).eval()
    factory = {"self", "device", "dtype"}  # torch's factory arguments: not in the config
    assert set(clf.config) == set(inspect.signature(Classifier.__init__).parameters) - factory
    clf.save_pretrained(tmp_path)
    loaded = Classifier.from_pretrained(tmp_path)
    assert not loaded.training
    x = torch.randn(2, 9, 3)
    ref = clf(x)  # float32 over L = 9 steps: relative 1e-5 * sqrt(L), never bitwise
    assert (loaded(x) - ref).abs().max() <= 1e-5 * math.sqrt(9) * ref.abs().max()


# -------------------------------------------------------------------------------- UNet
def make_unet(mixer, **kw):
    torch.manual_seed(0)
    kw = {"d_model": 8, "d_state": 8, "depth": 2, "factor": 2, **kw}
    return UNet(2, 3, mixer=mixer, **kw).double().eval()


@pytest.mark.parametrize("L,factor,depth", [(13, 2, 3), (10, 3, 2), (1, 2, 2), (16, 2, 2)])
def test_unet_shapes(L, factor, depth):
    net = make_unet("s5", factor=factor, depth=depth)
    assert net.multiple == factor**depth
    assert net(torch.randn(2, L, 2, dtype=torch.float64)).shape == (2, L, 3)


@pytest.mark.parametrize("mixer", MIXERS)
def test_unet_causal_and_streaming(mixer):
    net = make_unet(mixer)
    L = 13
    x = torch.randn(2, L, 2, dtype=torch.float64)
    y = net(x)
    for t in (0, 4, 9):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :])
        y2 = net(x2)
        torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], atol=1e-10, rtol=0)
        assert not torch.allclose(y2[:, t + 1 :], y[:, t + 1 :])
    cache = net.allocate_inference_cache(2, max_seqlen=L)
    ys = torch.stack([net.step(x[:, t], cache)[0] for t in range(L)], 1)
    torch.testing.assert_close(ys, y, atol=1e-6, rtol=1e-6)  # zero latency: exactly forward
    assert cache["seqlen_offset"] == L


def test_unet_deeper_streaming_with_factor_3():
    net = make_unet("lru", depth=3, factor=3, n_blocks=2)
    x = torch.randn(1, 31, 2, dtype=torch.float64)
    cache = net.allocate_inference_cache(1)
    ys = torch.stack([net.step(x[:, t], cache)[0] for t in range(31)], 1)
    torch.testing.assert_close(ys, net(x))
    cache = net.allocate_inference_cache(1)  # (B, 1, d_input) steps give (B, 1, d_output)
    ys = torch.cat([net.step(x[:, t : t + 1], cache)[0] for t in range(31)], 1)
    torch.testing.assert_close(ys, net(x))


def test_unet_non_causal():
    net = make_unet("s5", causal=False)
    x = torch.randn(1, 12, 2, dtype=torch.float64)
    y = net(x)
    x2 = x.clone()
    x2[:, 8:] += 1.0
    assert not torch.allclose(net(x2)[:, :8], y[:, :8])  # sees the future, as intended
    with pytest.raises(ValueError, match="causal=True"):
        net.allocate_inference_cache(1)
    attn = make_unet("attn", causal=False)
    assert not attn.level.enc[0].mixer.causal
    assert attn(x).shape == (1, 12, 3)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("mixer", ["s5", "mamba", "attn"])
def test_unet_lengths_give_each_sequence_its_result_alone(mixer, causal):
    """A padded batch with lengths: each row equals its sequence run alone (padded at its own
    end inside forward), whatever the padding holds; padded outputs and gradients are 0;
    an empty batch or sequence gives an empty output."""
    net = make_unet(mixer, causal=causal)
    lengths = torch.tensor([11, 5, 1])
    x = torch.randn(3, 11, 2, dtype=torch.float64)
    with torch.no_grad():
        x[1, 5:] = float("nan")
        x[2, 1:] = float("inf")
    x.requires_grad_()
    y = net(x, lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        alone = net(x[b : b + 1, :n].detach())
        assert (y[b, :n] - alone[0]).abs().max() <= 1e-12 * alone.abs().max(), (b, n)
        assert torch.equal(y[b, n:], torch.zeros_like(y[b, n:]))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[1, 5:], torch.zeros_like(x.grad[1, 5:]))
    for p in net.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    assert net(torch.randn(2, 0, 2, dtype=torch.float64)).shape == (2, 0, 3)
    assert net(torch.randn(0, 4, 2, dtype=torch.float64)).shape == (0, 4, 3)


def test_unet_errors_and_save_load(tmp_path):
    with pytest.raises(ValueError, match="factor: expected an int >= 2"):
        UNet(1, 1, factor=1)
    with pytest.raises(ValueError, match="depth"):
        UNet(1, 1, depth=-1)
    net = make_unet("lru")
    with pytest.raises(ValueError, match=r"x: expected shape \(B, L, 2\)"):
        net(torch.randn(1, 5, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_seqlen"):
        make_unet("attn").allocate_inference_cache(1)
    with pytest.raises(ValueError, match="causal once"):
        UNet(1, 1, d_model=8, mixer="attn", mixer_kwargs={"causal": False})
    factory = {"self", "device", "dtype"}  # torch's factory arguments: not in the config
    assert set(net.config) == set(inspect.signature(UNet.__init__).parameters) - factory
    net.save_pretrained(tmp_path)
    loaded = UNet.from_pretrained(tmp_path)
    assert not loaded.training
    x = torch.randn(1, 7, 2, dtype=torch.float64)
    ref = net(x)  # float64: relative 1e-12, never bitwise
    assert (loaded(x) - ref).abs().max() <= 1e-12 * ref.abs().max()


@pytest.mark.parametrize("arch", ["classifier", "unet"])
def test_input_of_another_dtype_than_the_weights_is_named(arch):
    """As the mixers do: a float32 input into a half() model is a TypeError naming x and both
    dtypes, not torch's "mat1 and mat2 must have the same dtype" from inside the encoder."""
    if arch == "classifier":
        model = Classifier(d_input=2, n_classes=3, d_model=16, d_state=8, n_layers=1)
    else:
        model = UNet(d_input=2, d_output=2, d_model=8, d_state=8, depth=1)
    model = model.half()
    with pytest.raises(TypeError, match=r"x: expected dtype torch.float16 .* got torch.float32"):
        model(torch.randn(2, 12, 2))


def test_unet_step_names_an_input_of_another_dtype():
    model = UNet(d_input=3, d_output=2, d_model=8, d_state=8, depth=1, causal=True)
    model = model.to(torch.bfloat16)
    with pytest.raises(TypeError, match=r"x: expected dtype torch.bfloat16 .* got torch.float32"):
        model.step(torch.randn(2, 3), model.allocate_inference_cache(2))


@pytest.mark.parametrize("arch", ["lm", "classifier", "unet"])
def test_architectures_take_torch_factory_arguments(arch):
    """LRNNLMHeadModel, Classifier and UNet take ``device`` and ``dtype`` as torch layers (and
    mamba_ssm's LM) do: the model ``.to(device, dtype)`` gives, with the same tensors' dtypes
    (the mixers' own tensors float32 under bfloat16), never stored in the config."""
    from lrnnx.architectures import LRNNLMHeadModel

    build = {
        "lm": lambda **kw: LRNNLMHeadModel(8, 4, 2, 20, ["s5", "mamba"], **kw),
        "classifier": lambda **kw: Classifier(3, 2, d_model=8, d_state=4, n_layers=1, **kw),
        "unet": lambda **kw: UNet(2, 3, d_model=8, d_state=4, depth=1, **kw),
    }[arch]
    for dtype in (torch.float64, torch.bfloat16):
        built, cast = build(dtype=dtype), build().to(dtype)
        assert {k: v.dtype for k, v in built.state_dict().items()} == {
            k: v.dtype for k, v in cast.state_dict().items()
        }
        assert "dtype" not in built.config and "device" not in built.config
    assert {p.device.type for p in build(device="meta").parameters()} == {"meta"}
    with torch.device("meta"):  # an explicit device wins over the default one
        assert {p.device.type for p in build(device="cpu").parameters()} == {"cpu"}
    with pytest.raises(TypeError, match="dtype"):
        build(dtype="float32")
    with pytest.raises(ValueError, match="device"):
        build(device="no-such-device")
    with pytest.raises(ValueError, match="mixer_kwargs: 'dtype' belongs to the whole model"):
        build(mixer_kwargs={"dtype": torch.float64})  # (saved in the config, unlike dtype=)


def test_attention_takes_torch_factory_arguments():
    from lrnnx.layers import MHA
    from lrnnx.models.registry import build_mixer

    assert MHA(8, 2, dtype=torch.float64).out_proj.weight.dtype == torch.float64
    mixer = build_mixer("attn", 8, num_heads=2, dtype=torch.bfloat16)
    assert {p.dtype for p in mixer.parameters()} == {torch.bfloat16}
