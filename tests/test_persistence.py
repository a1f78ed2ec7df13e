"""save_pretrained -> from_pretrained round trips: every architecture with every registered
mixer, extra state (S4's kernel length, custom modules), the weights checksum, eval mode and
the device / dtype arguments.

Tolerances follow the project's rule: parameters are copied, so they must be exactly equal;
outputs are recomputed, so they are compared relative to their magnitude (float64: 1e-12,
float32: 1e-5 * sqrt(L)), never bitwise.
"""

import json
import math

import pytest
import torch

from lrnnx.architectures import Classifier, LRNNLMHeadModel, UNet
from lrnnx.architectures._common import (
    CHECKSUM_KEY,
    CONFIG_NAME,
    WEIGHTS_NAME,
    ChecksumError,
)
from lrnnx.models.lti.lru import LRU
from lrnnx.models.registry import MODEL_REGISTRY, model_status

D, N, V, L = 16, 8, 37, 9
MIXERS = list(MODEL_REGISTRY)  # every registered mixer, attention included


def skip_unavailable(name):
    if model_status()[name] != "available":
        pytest.skip(f"{name}: {model_status()[name]}")


def assert_rel_close(got, ref, rel):
    """max |got - ref| <= rel * max |ref| (relative to the output's magnitude)."""
    assert got.shape == ref.shape and got.dtype == ref.dtype
    scale = ref.abs().max().item()
    err = (got - ref).abs().max().item()
    assert err <= rel * max(scale, torch.finfo(ref.dtype).tiny), (err, scale, rel)


def assert_same_parameters(loaded, model):
    a, b = loaded.state_dict(), model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if torch.is_tensor(b[k]):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:  # a module's extra state
            assert a[k] == b[k], k


def perturb(model):
    """Move off the initialisation, so that a freshly built model would differ."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def make_lm(mixer, **kw):
    return LRNNLMHeadModel(D, N, 2, V, mixer, d_intermediate=8, **kw)


def make_classifier(mixer, **kw):
    return Classifier(3, 4, d_model=D, d_state=N, n_layers=2, mixer=mixer, **kw)


def make_unet(mixer, causal=True):
    return UNet(2, 3, d_model=D, d_state=N, depth=1, mixer=mixer, causal=causal)


ARCHS = {
    "lm": (LRNNLMHeadModel, make_lm, lambda dt: torch.randint(0, V, (2, L))),
    "classifier": (Classifier, make_classifier, lambda dt: torch.randn(2, L, 3, dtype=dt)),
    "unet": (UNet, make_unet, lambda dt: torch.randn(2, L, 2, dtype=dt)),
    "unet-bidirectional": (
        UNet,
        lambda m: make_unet(m, causal=False),
        lambda dt: torch.randn(2, L, 2, dtype=dt),
    ),
}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("mixer", MIXERS)
def test_round_trip_every_architecture_and_mixer(tmp_path, arch, mixer):
    skip_unavailable(mixer)
    cls, make, inputs = ARCHS[arch]
    model = perturb(make(mixer).double()).eval()
    x = inputs(torch.float64)
    y = model(x)  # before saving: S4 attunes its C to this length (extra state)
    model.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    assert not loaded.training
    assert loaded.config == model.config
    assert_same_parameters(loaded, model)
    with torch.no_grad():
        assert_rel_close(loaded(x), y, 1e-12)
        x2 = inputs(torch.float64)[:, :5]  # another (shorter) input, then a longer one
        assert_rel_close(loaded(x2), model(x2), 1e-12)
        x3 = torch.cat([x, x], 1)
        assert_rel_close(loaded(x3), model(x3), 1e-12)


def test_s4_extra_state_is_restored(tmp_path):
    model = perturb(make_lm("s4").double()).eval()
    ids = torch.randint(0, V, (2, L))
    y = model(ids)
    model.save_pretrained(tmp_path)
    loaded = LRNNLMHeadModel.from_pretrained(tmp_path)
    for a, b in zip(loaded.layers, model.layers, strict=True):
        assert a.mixer.model.l_kernel == b.mixer.model.l_kernel == L
    assert_rel_close(loaded(ids), y, 1e-12)
    # the extra state travels in the weights file (a tensor the metadata lists), covered by
    # the checksum
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    key = "layers.0.mixer.model._extra_state"
    path = str(tmp_path / WEIGHTS_NAME)
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["lrnnx_extra_state"])
    assert key in meta["tensors"] and load_file(path)[key] == L
    # files written while it was a JSON value in the metadata still load
    weights = load_file(path)
    del weights[key]
    legacy = {"json": {key: {"l_kernel": L}}, "tensors": []}
    save_file(weights, path, metadata={"lrnnx_extra_state": json.dumps(legacy)})
    config = json.loads((tmp_path / "config.json").read_text())
    del config["_weights_sha256"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    old = LRNNLMHeadModel.from_pretrained(tmp_path)
    assert old.layers[0].mixer.model.l_kernel == L
    assert_rel_close(old(ids), y, 1e-12)


def test_float32_round_trip(tmp_path):
    model = perturb(make_lm(["s5", "attn"])).eval()
    ids = torch.randint(0, V, (2, L))
    y = model(ids)
    model.save_pretrained(tmp_path)
    loaded = LRNNLMHeadModel.from_pretrained(tmp_path)
    assert loaded.embedding.weight.dtype == torch.float32
    assert_same_parameters(loaded, model)
    assert_rel_close(loaded(ids), y, 1e-5 * math.sqrt(L))


def test_loaded_tensors_are_fresh_allocations(tmp_path):
    model = make_lm("s5").double()
    model.save_pretrained(tmp_path)
    loaded = LRNNLMHeadModel.from_pretrained(tmp_path)
    for k, v in loaded.state_dict().items():
        if torch.is_tensor(v) and v.numel():
            assert v.is_contiguous() and v.data_ptr() % 64 == 0, k
    assert loaded.lm_head.weight is loaded.embedding.weight  # ties survive


# ------------------------------------------------------------------------------ checksum
def data_region(path):
    """(start, end) byte offsets of the tensor data in a safetensors file (after its header)."""
    raw = path.read_bytes()
    start = 8 + int.from_bytes(raw[:8], "little")
    return start, len(raw)


def test_corrupted_weights_raise(tmp_path):
    make_lm("s5").save_pretrained(tmp_path)
    w = tmp_path / WEIGHTS_NAME
    expected = json.loads((tmp_path / CONFIG_NAME).read_text())[CHECKSUM_KEY]
    start, end = data_region(w)
    raw = bytearray(w.read_bytes())
    mid = (start + end) // 2
    for i in range(mid, mid + 16):
        raw[i] ^= 0xFF
    w.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match="sha256 mismatch") as info:
        LRNNLMHeadModel.from_pretrained(tmp_path)
    msg = str(info.value)
    assert str(w) in msg and expected in msg
    import hashlib

    assert hashlib.sha256(bytes(raw)).hexdigest() in msg
    assert isinstance(info.value, ValueError)


def test_config_without_checksum_still_loads(tmp_path):
    model = perturb(make_classifier("lru").double()).eval()
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert set(cfg) == set(model.config) | {CHECKSUM_KEY}
    del cfg[CHECKSUM_KEY]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    loaded = Classifier.from_pretrained(tmp_path)
    assert_same_parameters(loaded, model)
    x = torch.randn(2, L, 3, dtype=torch.float64)
    assert_rel_close(loaded(x), model(x), 1e-12)


# ------------------------------------------------------------------------------ device / dtype
def test_device_and_dtype_arguments(tmp_path):
    model = perturb(make_lm(["s5", "attn"]).double()).eval()
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, V, (2, L))
    y = model(ids)
    for kw in ({"device": "cpu"}, {"map_location": "cpu", "device": torch.device("cpu")}):
        loaded = LRNNLMHeadModel.from_pretrained(tmp_path, **kw)
        assert loaded.embedding.weight.device.type == "cpu"
        assert_rel_close(loaded(ids), y, 1e-12)
    with pytest.raises(ValueError, match="disagree"):
        LRNNLMHeadModel.from_pretrained(tmp_path, map_location="cpu", device="meta")
    for kw in (
        {"dtype": torch.float32},
        {"torch_dtype": torch.float32},
        {"torch_dtype": "float32"},
        {"dtype": "torch.float32", "torch_dtype": torch.float32},
    ):
        loaded = LRNNLMHeadModel.from_pretrained(tmp_path, **kw)
        assert not loaded.training
        assert all(p.dtype == torch.float32 for p in loaded.parameters())
        assert loaded.lm_head.weight is loaded.embedding.weight
        assert_rel_close(loaded(ids).double(), y, 1e-5 * math.sqrt(L))
    kept = LRNNLMHeadModel.from_pretrained(tmp_path, dtype="auto")
    assert all(p.dtype == torch.float64 for p in kept.parameters())
    with pytest.raises(ValueError, match="disagree"):
        LRNNLMHeadModel.from_pretrained(tmp_path, dtype=torch.float32, torch_dtype=torch.float64)
    with pytest.raises(ValueError, match="floating-point"):
        LRNNLMHeadModel.from_pretrained(tmp_path, dtype=torch.int64)
    with pytest.raises(ValueError, match="unknown dtype"):
        LRNNLMHeadModel.from_pretrained(tmp_path, dtype="float99")


def rewrite_weights(path, convert):
    """Replace every tensor t of a save_pretrained directory's file by convert(key, t), with
    the config's checksum updated (a file converted by another tool)."""
    from safetensors.torch import load_file, save_file

    from lrnnx.architectures._common import _sha256

    w = path / WEIGHTS_NAME
    save_file({k: convert(k, v) for k, v in load_file(w).items()}, w, metadata={"format": "pt"})
    cfg = json.loads((path / CONFIG_NAME).read_text())
    cfg[CHECKSUM_KEY] = _sha256(str(w))
    (path / CONFIG_NAME).write_text(json.dumps(cfg))


def test_a_file_in_16_bits_loads_as_a_cast_model(tmp_path):
    """Every tensor stored in bf16: the model comes back as model.to(bf16) would be (the
    recurrences' own tensors widened to float32, the rest bf16) and runs."""
    model = make_lm(["s5", "mamba"]).eval()
    model.save_pretrained(tmp_path)
    rewrite_weights(tmp_path, lambda k, t: t.bfloat16())
    loaded = LRNNLMHeadModel.from_pretrained(tmp_path)
    cast = model.to(torch.bfloat16)
    got = {k: v.dtype for k, v in loaded.state_dict().items() if isinstance(v, torch.Tensor)}
    assert got == {k: v.dtype for k, v in cast.state_dict().items() if isinstance(v, torch.Tensor)}
    ids = torch.randint(0, V, (2, L))
    with torch.no_grad():
        y = loaded(ids)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert_rel_close(y.float(), cast(ids).float(), 0.05)


def test_a_tensor_of_the_wrong_kind_is_named(tmp_path):
    make_lm("s5").save_pretrained(tmp_path)
    rewrite_weights(tmp_path, lambda k, t: t.long() if k.endswith("log_step") else t)
    with pytest.raises(TypeError, match=r"log_step: expected a floating-point tensor .*int64"):
        LRNNLMHeadModel.from_pretrained(tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_onto_cuda(tmp_path):
    model = perturb(make_lm(["s5", "attn"]).double()).eval()
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, V, (2, L))
    loaded = LRNNLMHeadModel.from_pretrained(tmp_path, device="cuda", dtype=torch.float32)
    assert all(p.is_cuda and p.dtype == torch.float32 for p in loaded.parameters())
    torch.testing.assert_close(loaded(ids.cuda()).cpu().double(), model(ids), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ extra state
class CountingLRU(LRU):
    """An LRU that also keeps a JSON extra state (not a tensor)."""

    def __init__(self, d_model, d_state):
        super().__init__(d_model, d_state)
        self.seen = {"calls": 0, "lengths": []}

    def get_extra_state(self):
        return self.seen

    def set_extra_state(self, state):
        self.seen = state


class TensorStateLRU(LRU):
    """An LRU whose extra state is a tensor."""

    def __init__(self, d_model, d_state):
        super().__init__(d_model, d_state)
        self.stats = torch.zeros(3, dtype=torch.float64)

    def get_extra_state(self):
        return self.stats

    def set_extra_state(self, state):
        self.stats = state


class TupleStateLRU(LRU):
    """Extra state that JSON would change (a tuple becomes a list): refused on save."""

    def get_extra_state(self):
        return (1, 2)

    def set_extra_state(self, state):
        pass


def test_extra_state_of_any_module(tmp_path):
    model = make_lm([CountingLRU, TensorStateLRU])
    model.layers[0].mixer.model.seen = {"calls": 3, "lengths": [5, 7, 9]}
    model.layers[1].mixer.model.stats = torch.tensor([1.5, -2.0, 3.25], dtype=torch.float64)
    model.save_pretrained(tmp_path)
    loaded = LRNNLMHeadModel.from_pretrained(tmp_path)
    assert loaded.layers[0].mixer.model.seen == {"calls": 3, "lengths": [5, 7, 9]}
    assert torch.equal(loaded.layers[1].mixer.model.stats, model.layers[1].mixer.model.stats)
    assert_same_parameters(loaded, model)
    with pytest.raises(TypeError, match="JSON round trip"):
        make_lm(TupleStateLRU).save_pretrained(tmp_path / "tuple")


def test_missing_extra_state_is_an_error(tmp_path):
    """An S4 checkpoint without its extra state would silently re-apply the C transform."""
    from safetensors.torch import load_file, save_file

    model = make_lm("s4")
    model(torch.randint(0, V, (1, L)))
    model.save_pretrained(tmp_path)
    w = str(tmp_path / WEIGHTS_NAME)
    weights = load_file(w)
    del weights["layers.0.mixer.model._extra_state"]
    save_file(weights, w, metadata={"format": "pt"})  # drop the extra state
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    del cfg[CHECKSUM_KEY]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match=r"missing \['layers.0.mixer.model._extra_state'"):
        LRNNLMHeadModel.from_pretrained(tmp_path)
