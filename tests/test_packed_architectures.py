"""Packed sequences (``cu_seqlens``) through the layers and architectures: Block, Bidirectional,
LRNNLMHeadModel (with :func:`packed_lm_loss`), Classifier, RG-LRU, and ``lrnnx train --pack``.

The expectation is always each sequence run alone through the same module's unpacked path
(outputs concatenated, or stacked per sequence), in float64 at the 1e-12-type tolerance of
``_tol.py``, for the outputs and the gradients of the input and of every parameter.  The
offsets hold empty sequences (first and next to another) and a sequence of length 1.  The layer
tests run over the whole registry: a mixer whose forward does not take ``cu_seqlens`` yet must
raise a ValueError naming it, and the test is then marked xfail with that reason (issue #12),
so it can neither pass silently nor be forgotten.  The training path: a packed batch gives the
padded batch's loss, accuracy and gradients, and a few ``train`` steps give the same history.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from _tol import assert_close_rel
from lrnnx.architectures import Classifier, LRNNLMHeadModel, UNet
from lrnnx.architectures.lm import IGNORE_INDEX, packed_lm_loss, packed_next_token_labels
from lrnnx.layers import Block, GatedMLP
from lrnnx.layers.bidirectional import Bidirectional
from lrnnx.models.ltv.rglru import RGLRU
from lrnnx.models.registry import MODEL_REGISTRY, build_mixer

D, N = 8, 4
#: empty sequences first and in the middle, a length-1 sequence; S = 6, T = 14
CU = [0, 0, 5, 6, 6, 11, 14]
T = CU[-1]
NAMES = list(MODEL_REGISTRY)


def pieces(cu: list[int]) -> list[tuple[int, int]]:
    return list(zip(cu[:-1], cu[1:], strict=True))


def randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def projection_loss(y: Tensor) -> Tensor:
    """A fixed random projection of y (every entry gets its own gradient)."""
    return (y * randn(*y.shape, seed=99)).sum()


def grads(loss: Tensor, leaves: list[Tensor]) -> list[Tensor]:
    got = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [torch.zeros_like(v) if g is None else g for v, g in zip(leaves, got, strict=True)]


def timesteps_for(name: str) -> Tensor | None:
    """Positive elapsed times (1, T) for the event-driven models, None for the others."""
    if not MODEL_REGISTRY[name].supports_timesteps:
        return None
    return torch.rand(1, T, generator=torch.Generator().manual_seed(7), dtype=torch.float64) + 0.1


def make_mixer(name: str, bidirectional: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = {"causal": False} if name == "attn" and bidirectional else {}
    d_state = None if not MODEL_REGISTRY[name].uses_d_state else N
    return build_mixer(name, D, d_state, bidirectional=bidirectional, **kw).double()


def xfail_if_unsupported(run) -> None:
    """Run the packed call; a mixer without packing must say so clearly, then xfail."""
    try:
        run()
    except ValueError as e:
        if "does not take packed sequences" not in str(e):
            raise
        assert "cu_seqlens" in str(e)
        pytest.xfail(f"not wired for packed sequences yet (issue #12): {e}")


def check_packed_equals_alone(module, x: Tensor, ts: Tensor | None, call) -> None:
    """Outputs and gradients (input, parameters) of ``call(module, x, ts, cu)`` packed equal
    the same call on each sequence alone."""
    params = [p for p in module.parameters() if p.requires_grad]
    x = x.requires_grad_()
    cu = torch.tensor(CU)
    y = call(module, x, ts, cu)
    ys = [call(module, x[:, a:b], None if ts is None else ts[:, a:b], None) for a, b in pieces(CU)]
    ref = torch.cat(ys, 1)
    assert_close_rel(y, ref, length=T, msg="output")
    g = grads(projection_loss(y), [x, *params])
    g_ref = grads(projection_loss(ref), [x, *params])
    for i, (a, b) in enumerate(zip(g, g_ref, strict=True)):
        assert_close_rel(a, b, length=T, msg=f"gradient {i}")


def mixer_call(module, x, ts, cu):
    kw = {} if ts is None else {"integration_timesteps": ts}
    if cu is None:
        return module(x, **kw)
    return module(x, cu_seqlens=cu, **kw)


# ---------------------------------------------------------------------------------------------
# layers over the registry


@pytest.mark.parametrize("name", NAMES)
def test_block_packed_equals_each_alone(name):
    mixer = make_mixer(name)
    block = Block(D, mixer, mlp=GatedMLP(D, hidden=16), activation="gelu").double()
    x, ts = randn(1, T, D, seed=1), timesteps_for(name)
    xfail_if_unsupported(lambda: block(x, cu_seqlens=torch.tensor(CU)))
    check_packed_equals_alone(block, x, ts, mixer_call)


@pytest.mark.parametrize("name", NAMES)
def test_bidirectional_packed_equals_each_alone(name):
    bi = make_mixer(name, bidirectional=True)
    if name != "attn":
        assert isinstance(bi, Bidirectional)
    x, ts = randn(1, T, D, seed=2), timesteps_for(name)
    xfail_if_unsupported(lambda: bi(x, cu_seqlens=torch.tensor(CU)))
    check_packed_equals_alone(bi, x, ts, mixer_call)


@pytest.mark.parametrize("name", NAMES)
def test_lm_packed_logits_and_gradients_equal_each_alone(name):
    torch.manual_seed(0)
    lm = LRNNLMHeadModel(D, N, 2, 11, name, d_intermediate=16).double()
    ids = torch.randint(0, 11, (1, T), generator=torch.Generator().manual_seed(3))
    xfail_if_unsupported(lambda: lm(ids, cu_seqlens=torch.tensor(CU)))
    params = list(lm.parameters())
    logits = lm(ids, cu_seqlens=torch.tensor(CU))
    ref = torch.cat([lm(ids[:, a:b]) for a, b in pieces(CU)], 1)
    assert_close_rel(logits, ref, length=T, msg="logits")
    loss = packed_lm_loss(logits, ids, torch.tensor(CU))
    # each document alone: sum of its n - 1 next-token losses, averaged over all predictions
    total, count = 0.0, 0
    for a, b in pieces(CU):
        if b - a > 1:
            lg = lm(ids[:, a:b])[0, :-1]
            total = total + torch.nn.functional.cross_entropy(
                lg, ids[0, a + 1 : b], reduction="sum"
            )
            count += b - a - 1
    ref_loss = total / count
    assert_close_rel(loss, ref_loss, length=T, msg="loss")
    for i, (g, g_ref) in enumerate(zip(grads(loss, params), grads(ref_loss, params), strict=True)):
        assert_close_rel(g, g_ref, length=T, msg=f"gradient {i}")


def test_packed_labels_never_cross_a_boundary():
    ids = torch.arange(10, 10 + T)[None]
    labels = packed_next_token_labels(ids, torch.tensor(CU))
    for a, b in pieces(CU):
        for t in range(a, b):
            want = ids[0, t + 1].item() if t + 1 < b else IGNORE_INDEX
            assert labels[0, t].item() == want, (t, a, b)


@pytest.mark.parametrize("name", ["s5", "mamba", "rglru", "attn", "event-s5"])
@pytest.mark.parametrize(
    "pooling,pool_between,bidirectional",
    [("mean", None, False), ("last", ("stride", 2), True), ("max", ("mean", 3), True)],
)
def test_classifier_packed_equals_each_alone(name, pooling, pool_between, bidirectional):
    torch.manual_seed(0)
    clf = Classifier(
        3, 5, D, N, 3, name, pooling=pooling, pool_between=pool_between,
        bidirectional=bidirectional,
    ).double()  # fmt: skip
    cu = [0, 4, 5, 12, 14]  # classification: every sequence non-empty
    x = randn(1, cu[-1], 3, seed=4).requires_grad_()
    ts = timesteps_for(name)
    ts = None if ts is None else ts[:, : cu[-1]]
    kw = {} if ts is None else {"integration_timesteps": ts}
    logits = clf(x, cu_seqlens=torch.tensor(cu), **kw)
    ref = torch.cat(
        [clf(x[:, a:b], **({} if ts is None else {"integration_timesteps": ts[:, a:b]}))
         for a, b in pieces(cu)]
    )  # fmt: skip
    assert logits.shape == (len(cu) - 1, 5)
    assert_close_rel(logits, ref, length=cu[-1], msg="logits")
    leaves = [x, *clf.parameters()]
    g, g_ref = grads(projection_loss(logits), leaves), grads(projection_loss(ref), leaves)
    for i, (a, b) in enumerate(zip(g, g_ref, strict=True)):
        assert_close_rel(a, b, length=cu[-1], msg=f"gradient {i}")


# ---------------------------------------------------------------------------------------------
# RG-LRU


@pytest.mark.parametrize("reset_at_start", [False, True])
@pytest.mark.parametrize("use_fast_path", [True, False])
def test_rglru_packed_states_and_gradients_equal_each_alone(reset_at_start, use_fast_path):
    torch.manual_seed(0)
    m = RGLRU(D, d_conv=4, reset_at_start=reset_at_start, use_fast_path=use_fast_path).double()
    x = randn(1, T, D, seed=5).requires_grad_()
    S = len(CU) - 1
    gen = torch.Generator().manual_seed(6)
    h0 = torch.randn(S, m.lru_width, generator=gen, dtype=torch.float64)
    conv0 = torch.randn(S, m.lru_width, 3, generator=gen, dtype=torch.float64)

    def cache_from(rows: slice):
        c = m.allocate_inference_cache(rows.stop - rows.start)
        c["lrnn_state"].copy_(h0[rows])
        c["conv_state"].copy_(conv0[rows])
        return c

    cache = cache_from(slice(0, S))
    y = m(x, inference_cache=cache, cu_seqlens=torch.tensor(CU))
    ys, alone = [], []
    for s, (a, b) in enumerate(pieces(CU)):
        c = cache_from(slice(s, s + 1))
        ys.append(m(x[:, a:b], inference_cache=c))
        alone.append(c)
    ref = torch.cat(ys, 1)
    assert_close_rel(y, ref, length=T, msg="output")
    for key in ("lrnn_state", "conv_state"):
        want = torch.cat([c[key] for c in alone])
        assert_close_rel(cache[key], want, length=T, msg=key)
    assert cache["started"].tolist() == [bool(c["started"]) for c in alone]
    assert cache["seqlen_offset"] == max(b - a for a, b in pieces(CU))
    leaves = [x, *m.parameters()]
    g, g_ref = grads(projection_loss(y), leaves), grads(projection_loss(ref), leaves)
    for i, (a, b) in enumerate(zip(g, g_ref, strict=True)):
        assert_close_rel(a, b, length=T, msg=f"gradient {i}")


def test_rglru_packed_reset_applies_at_every_sequence_start():
    """Without a cache, Griffin's reset makes each sequence's first output independent of
    everything before it in the row: equal to the sequence alone, and different from the
    same row run unpacked (which resets at t = 0 only)."""
    torch.manual_seed(0)
    m = RGLRU(D, reset_at_start=True).double()
    x = randn(1, T, D, seed=8)
    y = m(x, cu_seqlens=torch.tensor(CU))
    whole = m(x)
    for a, b in pieces(CU):
        if b > a:
            assert_close_rel(y[:, a:b], m(x[:, a:b]), length=T, msg=f"sequence {a}:{b}")
    assert (y[:, 5:6] - whole[:, 5:6]).abs().max() > 1e-3  # a boundary that is not t = 0


# ---------------------------------------------------------------------------------------------
# errors


def test_errors_name_the_argument():
    cu = torch.tensor(CU)
    lm = LRNNLMHeadModel(D, N, 1, 11, "s5")
    ids = torch.zeros(1, T, dtype=torch.long)
    with pytest.raises(ValueError, match="lengths, cu_seqlens"):
        lm(ids, lengths=torch.tensor([T]), cu_seqlens=cu)
    with pytest.raises(ValueError, match="batch size 1"):
        lm(torch.zeros(2, T, dtype=torch.long), cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] = T"):
        lm(ids, cu_seqlens=torch.tensor([0, 3]))
    clf = Classifier(3, 2, D, N, 1, "s5")
    with pytest.raises(ValueError, match="empty sequence 0"):
        clf(torch.randn(1, T, 3), cu_seqlens=cu)
    bi = build_mixer("s5", D, N, bidirectional=True)
    with pytest.raises(ValueError, match="lengths, cu_seqlens"):
        bi(torch.randn(1, T, D), lengths=torch.tensor([T]), cu_seqlens=cu)
    unet = UNet(2, 2, d_model=D, d_state=N, depth=1)
    with pytest.raises(ValueError, match="cu_seqlens: the U-Net cannot run packed"):
        unet(torch.randn(1, T, 2), cu_seqlens=cu)

    class PlainMixer(torch.nn.Module):
        def forward(self, x, **kw):
            return x

    with pytest.raises(ValueError, match="cu_seqlens: the block's mixer PlainMixer"):
        Block(D, PlainMixer())(torch.randn(1, T, D), cu_seqlens=cu)


# ---------------------------------------------------------------------------------------------
# training: --pack equals padded


def _prepared(model: str, pack: bool):
    from lrnnx.train import TrainConfig, prepare

    cfg = TrainConfig(
        task="selective-copy",
        model=model,
        d_model=16,
        d_state=8,
        layers=2,
        seq_len=48,
        n_train=32,
        n_test=16,
        batch_size=6,
        steps=3,
        eval_batch_size=8,
        task_options={"min_len": 16, "n_memorize": 4},
        pack=pack,
        plot=False,
        device="cpu",
    )
    return cfg, prepare(cfg)


@pytest.mark.parametrize("model", ["s5", "mamba", "rglru", "attn"])
def test_packed_batch_equals_padded_batch(model):
    from lrnnx.train import forward_batch

    _, prep = _prepared(model, pack=True)
    net = prep.model.double()
    batch = prep.data.train[torch.arange(6)]
    assert batch.lengths is not None and len(set(batch.lengths.tolist())) > 1
    params = list(net.parameters())
    loss_pad, correct_pad, n_pad = forward_batch(net, batch, "lm", pack=False)
    loss_pack, correct_pack, n_pack = forward_batch(net, batch, "lm", pack=True)
    assert n_pack == n_pad == 6 * 4 and int(correct_pack) == int(correct_pad)
    assert_close_rel(loss_pack, loss_pad, length=48, msg="loss")
    for i, (a, b) in enumerate(zip(grads(loss_pack, params), grads(loss_pad, params), strict=True)):
        assert_close_rel(a, b, length=48, msg=f"gradient {i}")


def test_train_pack_gives_the_padded_history():
    from lrnnx.train import train

    runs = {}
    for pack in (False, True):
        cfg, prep = _prepared("s5", pack)
        runs[pack] = train(cfg, log=lambda m: None, prepared=prep).metrics["history"]
    for split in ("train", "eval"):
        for a, b in zip(runs[False][split], runs[True][split], strict=True):
            assert a["step"] == b["step"]
            assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"]), (split, a, b)
            assert a["acc"] == b["acc"]


class NoPackMixer(torch.nn.Module):
    """A causal mixer (a pointwise projection) whose forward has no ``cu_seqlens``."""

    def __init__(self, d_model: int, d_state: int | None = None) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        return self.proj(x)

    def step(self, x: Tensor, inference_cache: dict) -> tuple[Tensor, dict]:
        return self.proj(x), inference_cache

    def allocate_inference_cache(self, batch_size: int) -> dict:
        return {}


def test_pack_needs_variable_lengths_and_packing_mixers():
    from lrnnx.tasks import make_task
    from lrnnx.train import ConfigError, TrainConfig, _check_packing, prepare

    with pytest.raises(ConfigError, match="pack: task 'assoc-recall' has fixed-length"):
        prepare(TrainConfig(task="assoc-recall", model="s5", n_train=4, n_test=4, pack=True))
    data = make_task("selective-copy", n_train=4, n_test=4, seq_len=32, min_len=16)
    lm = LRNNLMHeadModel(D, N, 1, 18, f"{__name__}:NoPackMixer")
    with pytest.raises(ConfigError, match="pack: model 'nopack' does not take packed"):
        _check_packing(data, lm, "nopack")
    with pytest.raises(ValueError, match="cu_seqlens: the mixer 'NoPackMixer'"):
        lm(torch.zeros(1, 5, dtype=torch.long), cu_seqlens=torch.tensor([0, 2, 5]))


def test_cli_pack_flag_reaches_the_config():
    from lrnnx.cli import _config_from_args, build_parser

    args = build_parser().parse_args(
        ["train", "--task", "selective-copy", "--model", "s5", "--pack",
         "--task-option", "min_len=32"]
    )  # fmt: skip
    config = _config_from_args(args)
    assert config.pack is True and config.task_options == {"min_len": 32}
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "--pack" in help_text and "cu_seqlens" in help_text


# ---------------------------------------------------------------------------------------------
# the variable-length task


def test_selective_copy_variable_lengths():
    from lrnnx.tasks import make_task
    from lrnnx.tasks.base import split_generators
    from lrnnx.tasks.synthetic import selective_copy_split

    data = make_task("selective-copy", n_train=400, n_test=8, seq_len=256, min_len=16)
    split, K, marker = data.train, 8, 17
    n = split.lengths
    assert int(n.min()) >= 16 and int(n.max()) <= 256
    # log-uniform: about as many examples in [16, 64) as in [64, 256]
    short = int((n < 64).sum())
    assert 140 < short < 260, short
    pos = torch.arange(256)[None, :]
    pad = pos >= n[:, None]
    assert (split.inputs[pad] == 0).all() and (split.targets[pad] == IGNORE_INDEX).all()
    markers = (pos >= (n - K)[:, None]) & ~pad
    assert (split.inputs[markers] == marker).all()
    assert ((split.targets != IGNORE_INDEX) == markers).all()
    # the targets are the data tokens of the context, in order
    for i in range(5):
        ctx = split.inputs[i, : int(n[i]) - K]
        assert ctx[ctx != 0].tolist() == split.targets[i][markers[i]].tolist()
    # without min_len: the fixed-length generator, unchanged
    fixed = make_task("selective-copy", n_train=4, n_test=4, seq_len=32)
    again = selective_copy_split(4, 32, 16, 8, split_generators(0)[0])
    assert fixed.train.lengths is None and torch.equal(fixed.train.inputs, again.inputs)
    with pytest.raises(ValueError, match="min_len: expected 0"):
        make_task("selective-copy", n_train=4, n_test=4, seq_len=32, min_len=8)


# ---------------------------------------------------------------------------------------------
# the packed-vs-padded benchmark


def test_bench_packing_lengths_and_rows():
    from lrnnx.bench_packing import bench_packing, markdown, sample_lengths

    n = sample_lengths(20000, mean_len=256, max_len=2048, seed=1)
    assert int(n.min()) >= 1 and int(n.max()) <= 2048
    assert abs(n.double().mean().item() - 256) < 0.05 * 256  # the clip removes ~1% of the mean
    assert 0 < int((n == 2048).sum()) < 0.02 * len(n)  # a long tail, rarely clipped
    lines = []
    rows = bench_packing(["s5", "attn"], n_seqs=3, mean_len=8, max_len=16, d_model=8, d_state=4,
                         repeats=1, log=lines.append)  # fmt: skip
    lengths = sample_lengths(3, 8, 16)
    assert [r.model for r in rows] == ["s5", "attn"] and len(lines) == 2
    for r in rows:
        assert r.tokens == int(lengths.sum()) and r.padded_len == int(lengths.max())
        assert r.padded_ms > 0 and r.packed_ms > 0
        assert r.ratio == pytest.approx(r.packed_tok_s / r.padded_tok_s)
    assert "| s5 |" in markdown(rows, "title")
