"""lrnnx.hf: the transformers integration (Auto classes, generate, Trainer).

Every expectation comes from lrnnx itself, computed independently of transformers: the
checkpoint's own ``LRNNLMHeadModel`` (logits, ``lrnnx.utils.generation.generate``), each row
run alone, or the cross-entropy written out here.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from packaging.version import Version  # noqa: E402
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    Trainer,
    TrainingArguments,
)

import lrnnx.hf  # noqa: E402
from _tol import assert_close_rel  # noqa: E402
from lrnnx.architectures.lm import LRNNLMHeadModel  # noqa: E402
from lrnnx.utils.generation import generate  # noqa: E402

#: from_pretrained's dtype keyword: "torch_dtype" before transformers 4.56 ("dtype" there is
#: not read), "dtype" since (the old name warns)
DTYPE_KW = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"

V = 40
MIXES = {
    "s5-attn-mamba": dict(mixer_types=["s5", "attn", "mamba"], d_intermediate=48),
    "lru-rglru": dict(mixer_types=["lru", "rglru"], tie_embeddings=False),
    "event-s5-s7-s4": dict(mixer_types=["event-s5", "s7", "s4"]),
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(MIXES))
def checkpoint(request, tmp_path_factory):
    """A directory written by LRNNLMHeadModel.save_pretrained, and that model."""
    torch.manual_seed(0)
    kw = MIXES[request.param]
    lm = LRNNLMHeadModel(d_model=32, d_state=8, n_layer=len(kw["mixer_types"]), vocab_size=V, **kw)
    with torch.no_grad():  # a non-trivial head: larger logits, distinct greedy choices
        lm.embedding.weight.normal_(0, 1.0)
    path = tmp_path_factory.mktemp(request.param)
    lm.save_pretrained(path)
    return path, lm.eval()


def prompts(B=3, L=9, seed=1):
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "version,refused",
    [
        ("4.46.0", True),
        ("4.48.3", True),
        ("4.49.0", False),
        ("4.50.0.dev0", False),
        ("5.24.0", False),
    ],
)
def test_transformers_before_4_49_is_refused(version, refused):
    """Before 4.49 from_pretrained renamed checkpoint keys containing "gamma" to "weight": an
    LRU's gamma_log loaded re-initialised, silently (found with 4.46); those releases are refused
    with the reason, the others pass."""
    from lrnnx.hf import check_transformers_version

    if refused:
        with pytest.raises(ImportError, match=r"transformers>=4\.49.*gamma_log"):
            check_transformers_version(version)
    else:
        check_transformers_version(version)


@pytest.mark.slow  # a fresh process importing every module: make test-slow
def test_import_lrnnx_never_imports_transformers():
    # every module but lrnnx.hf, listed from the files (pkgutil would import lrnnx.hf itself)
    code = (
        "import sys, importlib, pathlib, lrnnx\n"
        "root = pathlib.Path(lrnnx.__file__).parent\n"
        "for p in sorted(root.rglob('*.py')):\n"
        "    parts = ('lrnnx',) + p.relative_to(root).with_suffix('').parts\n"
        "    if parts[1] == 'hf':\n"
        "        continue\n"
        "    try:\n"
        "        importlib.import_module('.'.join(parts).removesuffix('.__init__'))\n"
        "    except ImportError:\n"
        "        pass  # an optional backend (e.g. triton) that is not installed\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] == 'transformers'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_auto_classes_load_an_lrnnx_directory(checkpoint):
    path, lm = checkpoint
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "lrnnx"
    assert isinstance(AutoConfig.from_pretrained(path), lrnnx.hf.LRNNConfig)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(model, lrnnx.hf.LRNNForCausalLM) and not model.training
    # the same keys, less S4's non-tensor extra state (it travels in the config)
    tensors = [k for k, v in lm.state_dict().items() if isinstance(v, torch.Tensor)]
    assert list(model.state_dict()) == tensors
    tied = lm.lm_head.weight is lm.embedding.weight
    assert (model.lm_head.weight is model.embedding.weight) == tied
    ids = prompts()
    with torch.no_grad():
        out = model(ids)
        assert_close_rel(out.logits, lm(ids), length=ids.shape[1], msg="logits")
        # a left-padded row gives the logits of that row alone, zeros at the padding
        mask = torch.ones_like(ids)
        mask[0, :3] = 0
        padded = model(ids, attention_mask=mask).logits
        assert_close_rel(padded[0, 3:], lm(ids[:1, 3:])[0], length=6, msg="padded row")
        assert torch.equal(padded[0, :3], torch.zeros_like(padded[0, :3]))
        assert_close_rel(padded[1:], out.logits[1:], length=9, msg="unpadded rows")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_auto_loading_in_a_dtype_follows_the_precision_policy(checkpoint, dtype):
    """from_pretrained(dtype=...) builds under that default dtype, which only some tensors
    follow on their own: every tensor must have lrnnx's dtype and value for that dtype
    (float64 everywhere; the recurrences' own tensors float32 under bf16), as
    LRNNLMHeadModel.from_pretrained(dtype=...) gives them."""
    path, _ = checkpoint
    model = AutoModelForCausalLM.from_pretrained(path, **{DTYPE_KW: dtype}).eval()
    ours = LRNNLMHeadModel.from_pretrained(path, dtype=dtype)
    theirs, expect = model.state_dict(), ours.state_dict()
    for key, value in expect.items():
        if isinstance(value, torch.Tensor):
            assert theirs[key].dtype == value.dtype, (key, theirs[key].dtype, value.dtype)
            if value.is_floating_point() or value.is_complex():
                assert_close_rel(theirs[key], value, dtype=value.dtype, msg=key)
            else:  # S4's kernel length
                assert torch.equal(theirs[key], value), key
    ids = prompts()
    with torch.no_grad():
        assert_close_rel(model(ids).logits, ours(ids), dtype=dtype, length=9, msg="logits")


def test_a_transformers_directory_loads_in_lrnnx(checkpoint, tmp_path):
    path, lm = checkpoint
    model = AutoModelForCausalLM.from_pretrained(path)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "lrnnx" and "transformers_version" in config
    back = LRNNLMHeadModel.from_pretrained(tmp_path)
    assert back.config == lm.config
    tied = lm.lm_head.weight is lm.embedding.weight
    assert (back.lm_head.weight is back.embedding.weight) == tied
    ids = prompts()
    with torch.no_grad():
        assert_close_rel(back(ids), lm(ids), length=ids.shape[1], msg="logits")
    # and back into transformers: the tie (or its absence) survives the second trip
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (again.lm_head.weight is again.embedding.weight) == tied


def test_extra_state_travels_both_ways(tmp_path):
    """S4's kernel length (extra state, a 0-d tensor) that its C parameter depends on travels
    among the weights through transformers and back (lrnnx lists it in the weights' metadata,
    transformers stores it under its state_dict key)."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    lm = LRNNLMHeadModel(d_model=16, d_state=4, n_layer=1, vocab_size=V, mixer_types="s4").eval()
    ids = prompts(B=2, L=40)
    with torch.no_grad():
        expected = lm(ids)  # the first call attunes C to length 40
    lm.save_pretrained(tmp_path / "lrnnx")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lrnnx")
    model.save_pretrained(tmp_path / "hf")
    back = LRNNLMHeadModel.from_pretrained(tmp_path / "hf")
    assert int(back.state_dict()["layers.0.mixer.model._extra_state"]) == 40
    assert model.config.lrnnx_extra_state == {}  # not in the config: among the weights
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    assert weights["layers.0.mixer.model._extra_state"] == 40
    # what reads the weights file alone (the Trainer's resume_from_checkpoint) gets it too,
    # and the model's own state_dict loads back in strict mode
    fresh = AutoModelForCausalLM.from_config(model.config)
    fresh.load_state_dict(weights, strict=False)
    assert fresh.layers[0].mixer.model.l_kernel == 40
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert_close_rel(model(ids).logits, expected, length=40, msg="transformers")
        assert_close_rel(back(ids), expected, length=40, msg="back in lrnnx")


def test_missing_keys_get_the_models_initialisation(tmp_path):
    """A checkpoint without some tensors (transformers reports them as newly initialised):
    those are drawn by their module's own scheme (S4D-real A, S5's HiPPO-N spectrum, dt in
    [dt_min, dt_max], unit gains, S4's attuned C with its length), never left as the
    uninitialised memory of a meta-device load; every loaded tensor keeps its value."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    kw = dict(d_model=16, d_state=4, n_layer=3, vocab_size=V, mixer_types=["mamba", "s5", "s4"])
    lm = LRNNLMHeadModel(**kw).eval()
    lm(prompts(B=1, L=20))  # S4 attunes C to length 20 (extra state kept when C is loaded)
    lm.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    missing = ["layers.0.mixer.model.A_log", "layers.0.mixer.model.dt_proj.bias"]
    missing += ["layers.1.mixer.model.Lambda_re", "norm_f.weight"]
    save_file(
        {k: v for k, v in weights.items() if k not in missing}, tmp_path / "model.safetensors"
    )
    config = json.loads((tmp_path / "config.json").read_text())
    del config["_weights_sha256"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    fresh = LRNNLMHeadModel(**kw)
    got, original = model.state_dict(), lm.state_dict()
    for key in missing[0:1] + missing[2:]:  # deterministic initial values
        assert_close_rel(got[key], fresh.state_dict()[key], msg=key)
    dt = F.softplus(got["layers.0.mixer.model.dt_proj.bias"])
    assert (dt >= 0.001 * (1 - 1e-6)).all() and (dt <= 0.1 * (1 + 1e-6)).all()
    for key, value in original.items():
        if key not in missing and isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key
    assert model.layers[2].mixer.model.l_kernel == 20


def test_config_without_lrnnx_model_type_is_rejected(checkpoint, tmp_path):
    path, lm = checkpoint
    lm.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type"):
        LRNNLMHeadModel.from_pretrained(tmp_path)


class CallCounter:
    """Counts LRNNLMHeadModel.forward calls (with their lengths) and step calls."""

    def __init__(self, monkeypatch):
        self.forward_lengths, self.steps = [], 0
        forward, step = LRNNLMHeadModel.forward, LRNNLMHeadModel.step

        def counted_forward(lm, input_ids, *a, **k):
            self.forward_lengths.append(input_ids.shape[1])
            return forward(lm, input_ids, *a, **k)

        def counted_step(lm, *a, **k):
            self.steps += 1
            return step(lm, *a, **k)

        monkeypatch.setattr(LRNNLMHeadModel, "forward", counted_forward)
        monkeypatch.setattr(LRNNLMHeadModel, "step", counted_step)


def test_greedy_generate_prefills_once_and_steps_once_per_token(checkpoint, monkeypatch):
    path, lm = checkpoint
    model = AutoModelForCausalLM.from_pretrained(path)
    ids, n = prompts(), 7
    expected = generate(lm, ids, max_new_tokens=n)
    counter = CallCounter(monkeypatch)
    got = model.generate(ids, max_new_tokens=n, do_sample=False)
    assert counter.forward_lengths == [ids.shape[1]] and counter.steps == n - 1
    assert torch.equal(got, expected)
    # left-padded prompts of different lengths, and an end-of-sequence token
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :2] = 0
    eos = int(expected[1, ids.shape[1] + 2])
    kw = dict(max_new_tokens=n, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(model.generate(ids, do_sample=False, **kw), generate(lm, ids, **kw))
    # without the cache (use_cache=False) transformers re-runs the whole sequence: same ids
    assert torch.equal(model.generate(ids, max_new_tokens=3, use_cache=False), expected[:, :-4])


def test_sampling_matches_lrnnx(checkpoint):
    path, lm = checkpoint
    model = AutoModelForCausalLM.from_pretrained(path)
    ids, n = prompts(), 6
    kw = dict(max_new_tokens=n, do_sample=True, temperature=0.7, top_k=12, top_p=1.0)
    torch.manual_seed(5)
    got = model.generate(ids, **kw, output_scores=True, return_dict_in_generate=True)
    torch.manual_seed(5)
    expected = generate(lm, ids, **kw, output_scores=True)
    # both draw with torch.multinomial from softmax of the same processed scores
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.scores) == len(expected.scores) == n
    for a, b in zip(got.scores, expected.scores, strict=True):
        assert torch.equal(torch.isinf(a), torch.isinf(b))
        assert_close_rel(a[~torch.isinf(a)], b[~torch.isinf(b)], length=ids.shape[1])
    # top_k=1 sampling is greedy decoding
    greedy = generate(lm, ids, max_new_tokens=n)
    assert torch.equal(model.generate(ids, max_new_tokens=n, do_sample=True, top_k=1), greedy)


def test_samples_follow_the_processed_distribution(checkpoint):
    path, _ = checkpoint
    model = AutoModelForCausalLM.from_pretrained(path)
    N = 2000
    ids = prompts(B=1).expand(N, -1)
    torch.manual_seed(0)
    out = model.generate(
        ids, max_new_tokens=1, do_sample=True, temperature=1.5, top_k=8, top_p=1.0,
        output_scores=True, return_dict_in_generate=True,
    )  # fmt: skip
    p = out.scores[0][0].softmax(-1).double()
    freq = torch.bincount(out.sequences[:, -1], minlength=V).double() / N
    assert int((p > 0).sum()) == 8 and bool((freq[p == 0] == 0).all())
    # binomial standard error, 5 sigma
    assert bool(((freq - p).abs() <= 5 * (p * (1 - p) / N).sqrt() + 1e-12).all())


def test_generate_rejects_right_padding_and_embeddings(checkpoint):
    path, _ = checkpoint
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = prompts()
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    with pytest.raises(ValueError, match="left"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="num_beams"):
        model.generate(ids, num_beams=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.zeros(1, 3, 32))
    with pytest.raises(TypeError, match="^labels: expected an integer tensor"):
        model(ids, labels=ids.float())
    with pytest.raises(NotImplementedError, match="^resize_token_embeddings"):
        model.resize_token_embeddings(V + 6)
    assert model.get_input_embeddings().weight.shape[0] >= V  # untouched


def test_loss_is_the_shifted_cross_entropy(checkpoint):
    path, _ = checkpoint
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = prompts()
    labels = ids.clone()
    labels[:, :2] = -100
    out = model(ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, V)
    target = labels[:, 1:].reshape(-1)
    keep = target != -100
    expected = F.cross_entropy(logits[keep].double(), target[keep])
    assert_close_rel(out.loss.double(), expected, dtype=torch.float32, length=V)


class CountingDataset(torch.utils.data.Dataset):
    """Sequences that count up modulo V from a random start: learnable from one token."""

    def __init__(self, n: int, L: int = 12) -> None:
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, V, (n, 1), generator=g)
        self.ids = (start + torch.arange(L)) % V

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_trains(tmp_path):
    torch.manual_seed(0)
    config = lrnnx.hf.LRNNConfig(
        d_model=32, d_state=8, n_layer=2, vocab_size=V, mixer_types=["rglru", "attn"]
    )
    model = lrnnx.hf.LRNNForCausalLM(config)
    data = CountingDataset(256)
    batch = data.ids[:64]

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(model(batch, labels=batch).loss)

    before = loss()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        max_steps=30,
        per_device_train_batch_size=16,
        learning_rate=1e-2,
        logging_steps=10,
        save_strategy="no",
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=data).train()
    after = loss()
    assert after < 0.5 * before, (before, after)
    model.save_pretrained(tmp_path / "ckpt")
    assert os.path.isfile(tmp_path / "ckpt" / "model.safetensors")
    back = LRNNLMHeadModel.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        assert_close_rel(back(batch), model(batch).logits, length=batch.shape[1])


def test_a_model_built_from_the_config_keeps_its_extra_state_and_seeded_values(tmp_path):
    """from_config (then weights loaded by hand, as init_empty_weights flows do): the S4
    kernel length comes with the weights (a config of earlier checkpoints carrying it: that
    survives transformers' post_init), and the model draws its tensors once, as
    LRNNLMHeadModel does for the same seed; a checkpoint lacking one of S4's own tensors keeps
    the loaded C with the length it was attuned to."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    kw = dict(d_model=16, d_state=4, n_layer=1, vocab_size=V, mixer_types="s4")
    lm = LRNNLMHeadModel(**kw).eval()
    ids = prompts(B=1, L=20)
    with torch.no_grad():
        want = lm(ids)
    lm.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)
    assert model.layers[0].mixer.model.l_kernel == 20
    with torch.no_grad():
        assert_close_rel(model(ids).logits, want, length=20)
    config.lrnnx_extra_state = {"layers.0.mixer.model._extra_state": {"l_kernel": 20}}
    assert AutoModelForCausalLM.from_config(config).layers[0].mixer.model.l_kernel == 20
    torch.manual_seed(1)
    built = lrnnx.hf.LRNNForCausalLM(lrnnx.hf.LRNNConfig(**kw))
    torch.manual_seed(1)
    plain = LRNNLMHeadModel(**kw)
    for key, value in plain.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(built.state_dict()[key], value), key
    weights = load_file(tmp_path / "model.safetensors")
    del weights["layers.0.mixer.model.D"]
    save_file(weights, tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    del config["_weights_sha256"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    partial = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    s4 = partial.layers[0].mixer.model
    assert s4.l_kernel == 20 and torch.equal(s4.C, lm.layers[0].mixer.model.C)
    with torch.no_grad():
        lm.layers[0].mixer.model.D.copy_(s4.D)
        assert_close_rel(partial(ids).logits, lm(ids), length=20)


def test_trainer_resumes_s4_with_its_kernel_length(tmp_path):
    """The Trainer's resume_from_checkpoint loads only the weights file into a model built
    from the config: S4's kernel length travels there (a tensor extra state), so the resumed
    model computes what the checkpointed one did."""
    torch.manual_seed(0)
    kw = dict(d_model=16, d_state=4, n_layer=1, vocab_size=V, mixer_types="s4")
    data = CountingDataset(64)
    args = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=2,
                per_device_train_batch_size=16, save_strategy="steps", save_steps=2,
                disable_tqdm=True)  # fmt: skip
    model = lrnnx.hf.LRNNForCausalLM(lrnnx.hf.LRNNConfig(**kw))
    Trainer(model=model, args=TrainingArguments(**args), train_dataset=data).train()
    model.eval()
    assert model.layers[0].mixer.model.l_kernel == data.ids.shape[1]
    resumed = lrnnx.hf.LRNNForCausalLM(lrnnx.hf.LRNNConfig(**kw))  # the script run again
    trainer = Trainer(model=resumed, args=TrainingArguments(**args), train_dataset=data)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    resumed.eval()
    assert resumed.layers[0].mixer.model.l_kernel == data.ids.shape[1]
    ids = data.ids[:4]
    with torch.no_grad():
        assert_close_rel(resumed(ids).logits, model(ids).logits, length=ids.shape[1])


def test_a_directory_with_the_length_in_its_config_loads_without_a_missing_report(tmp_path):
    """transformers directories written while S4's kernel length travelled in the config (no
    ``_extra_state`` among the weights) load with that length, and transformers does not
    report the key as missing (newly initialised)."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    lm = LRNNLMHeadModel(d_model=16, d_state=4, n_layer=1, vocab_size=V, mixer_types="s4").eval()
    ids = prompts(B=1, L=24)
    with torch.no_grad():
        want = lm(ids)
    lm.save_pretrained(tmp_path / "lrnnx")
    AutoModelForCausalLM.from_pretrained(tmp_path / "lrnnx").save_pretrained(tmp_path)
    key = "layers.0.mixer.model._extra_state"
    weights = load_file(tmp_path / "model.safetensors")
    del weights[key]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["lrnnx_extra_state"] = {key: {"l_kernel": 24}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert key not in info["missing_keys"], info
    assert model.layers[0].mixer.model.l_kernel == 24
    with torch.no_grad():
        assert_close_rel(model.eval()(ids).logits, want, length=24)
