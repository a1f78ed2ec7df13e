"""The tasks of lrnnx.tasks: shapes, determinism by seed, and that the labels are what each task
defines (checked by recomputing the answer from the inputs with a plain loop)."""

from __future__ import annotations

import math
import random
import sys

import numpy as np
import pytest
import torch

from lrnnx.tasks import IGNORE_INDEX, TASKS, get_task, make_task
from lrnnx.tasks.offline import mnist1d_available

SYNTHETIC = ["selective-copy", "induction-heads", "assoc-recall", "irregular-sine"]


def _splits_equal(a, b) -> bool:
    same = torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    ta, tb = a.integration_timesteps, b.integration_timesteps
    return same and ((ta is None and tb is None) or torch.equal(ta, tb))


@pytest.mark.parametrize("name", SYNTHETIC)
def test_shapes_and_determinism(name):
    d = make_task(name, n_train=64, n_test=16, seed=3)
    assert len(d.train) == 64 and len(d.test) == 16
    L = d.seq_len
    if d.kind == "lm":
        assert d.train.inputs.shape == (64, L) and d.train.inputs.dtype == torch.long
        assert d.train.targets.shape == (64, L)
        assert int(d.train.inputs.min()) >= 0 and int(d.train.inputs.max()) < d.vocab_size
        scored = d.train.targets[d.train.targets != IGNORE_INDEX]
        assert scored.numel() > 0 and int(scored.max()) < d.vocab_size
    else:
        assert d.train.inputs.shape == (64, L, d.d_input) and d.train.inputs.is_floating_point()
        assert d.train.targets.shape == (64,)
        assert set(d.train.targets.tolist()) <= set(range(d.n_classes))
    assert (d.train.integration_timesteps is not None) == d.needs_timesteps
    again = make_task(name, n_train=64, n_test=16, seed=3)
    assert _splits_equal(d.train, again.train) and _splits_equal(d.test, again.test)
    other = make_task(name, n_train=64, n_test=16, seed=4)
    assert not torch.equal(d.train.inputs, other.train.inputs)
    assert not torch.equal(d.train.inputs[:16], d.test.inputs)  # independent streams
    # the training set does not depend on the size of the test set
    assert _splits_equal(d.train, make_task(name, n_train=64, n_test=5, seed=3).train)


def test_selective_copy_targets_are_the_data_tokens_in_order():
    n_tokens, K, L = 6, 5, 40
    d = make_task("selective-copy", 32, 8, seq_len=L, seed=1, n_tokens=n_tokens, n_memorize=K)
    marker = n_tokens + 1
    assert d.vocab_size == n_tokens + 2
    for x, y in zip(d.train.inputs.tolist(), d.train.targets.tolist(), strict=True):
        context, cue = x[: L - K], x[L - K :]
        data = [t for t in context if t != 0]  # 0 is the noise token
        assert len(data) == K and all(1 <= t <= n_tokens for t in data)
        assert cue == [marker] * K
        assert y[L - K :] == data
        assert y[: L - K] == [IGNORE_INDEX] * (L - K)
    # positions really vary from sequence to sequence (the "selective" part)
    first = (d.train.inputs[:, : L - K] != 0).float().argmax(1)
    assert len(set(first.tolist())) > 1


def test_induction_heads_target_follows_the_special_token():
    n_tokens, L = 5, 30
    d = make_task("induction-heads", 64, 8, seq_len=L, seed=2, n_tokens=n_tokens)
    special = n_tokens
    assert d.vocab_size == n_tokens + 1
    for x, y in zip(d.train.inputs.tolist(), d.train.targets.tolist(), strict=True):
        where = [i for i, t in enumerate(x) if t == special]
        assert len(where) == 2 and where[1] == L - 1 and where[0] <= L - 3
        assert y[-1] == x[where[0] + 1] and y[-1] != special
        assert y[:-1] == [IGNORE_INDEX] * (L - 1)


def test_assoc_recall_target_is_the_queried_value():
    n_keys, n_values, L = 10, 7, 17
    d = make_task("assoc-recall", 64, 8, seq_len=L, seed=5, n_keys=n_keys, n_values=n_values)
    assert d.vocab_size == n_keys + n_values
    for x, y in zip(d.train.inputs.tolist(), d.train.targets.tolist(), strict=True):
        keys, values, query = x[0:-1:2], x[1:-1:2], x[-1]
        assert len(keys) == (L - 1) // 2 and len(set(keys)) == len(keys)
        assert all(0 <= k < n_keys for k in keys)
        assert all(n_keys <= v < n_keys + n_values for v in values)
        pairs = dict(zip(keys, values, strict=True))
        assert y[-1] == pairs[query]
        assert y[:-1] == [IGNORE_INDEX] * (L - 1)


def test_irregular_sine_is_a_sinusoid_of_the_labelled_frequency():
    d = make_task("irregular-sine", 48, 8, seq_len=64, seed=0, noise=0.0)
    freqs = torch.tensor(d.params["frequencies"], dtype=torch.float64)
    assert d.n_classes == len(freqs) == 4 and d.needs_timesteps
    dt = d.train.integration_timesteps.double()
    assert dt.shape == (48, 64) and bool((dt > 0).all())
    t = dt.cumsum(1)
    x = d.train.inputs[..., 0].double()
    for i in range(48):
        fits = []
        for f in freqs:
            # least squares fit x = a sin(2 pi f t) + b cos(2 pi f t): exact only for the label
            basis = torch.stack(
                [torch.sin(2 * math.pi * f * t[i]), torch.cos(2 * math.pi * f * t[i])], 1
            )
            coef = torch.linalg.lstsq(basis, x[i][:, None]).solution
            fits.append((float((basis @ coef - x[i][:, None]).abs().max()), coef))
        label = int(d.train.targets[i])
        err, coef = fits[label]
        assert err < 1e-4, (i, err)
        assert abs(float(coef.norm()) - 1) < 1e-3  # unit amplitude
        assert min(e for j, (e, _) in enumerate(fits) if j != label) > 1e-2
    # the sampling rate varies between sequences: the gaps alone carry information
    mean_gap = dt.mean(1)
    assert float(mean_gap.max() / mean_gap.min()) > 2


def test_irregular_sine_classes_overlap_in_cycles_per_sample():
    """Without the elapsed times, fast-sampled slow sinusoids look like slow-sampled fast ones."""
    d = make_task("irregular-sine", 2048, 8, seed=0)
    freqs = torch.tensor(d.params["frequencies"])
    cycles_per_sample = freqs[d.train.targets] * d.train.integration_timesteps.mean(1)
    lo = [float(cycles_per_sample[d.train.targets == c].min()) for c in range(d.n_classes)]
    hi = [float(cycles_per_sample[d.train.targets == c].max()) for c in range(d.n_classes)]
    for c in range(d.n_classes - 1):
        assert hi[c] > lo[c + 1]


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("selective-copy", {"seq_len": 10, "n_memorize": 8}, "seq_len"),
        ("assoc-recall", {"seq_len": 32}, "odd"),
        ("assoc-recall", {"seq_len": 41, "n_keys": 8}, "n_keys"),
        ("induction-heads", {"seq_len": 3}, "seq_len"),
        ("irregular-sine", {"f_min": 0.1, "f_max": 0.05}, "f_min"),
        ("selective-copy", {"n_train": 0}, "n_train"),
    ],
)
def test_impossible_sizes_raise(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_task(name, **{"n_train": 4, "n_test": 4, **kwargs})


def test_unknown_task_and_option_list_the_valid_ones():
    with pytest.raises(ValueError) as e:
        make_task("copy")
    for name in TASKS:
        assert name in str(e.value)
    with pytest.raises(ValueError, match="n_memorize"):
        make_task("selective-copy", n_train=4, n_test=4, n_memorise=3)
    assert set(get_task("assoc-recall").options) == {"n_keys", "n_values"}


def test_mnist1d_missing_package_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "mnist1d", None)
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    assert not TASKS["mnist1d"].available
    with pytest.raises(ImportError, match="pip install mnist1d"):
        make_task("mnist1d", n_train=10, n_test=10)


@pytest.mark.skipif(not mnist1d_available(), reason="pip install mnist1d")
def test_mnist1d():
    np.random.seed(123)
    random.seed(123)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    d = make_task("mnist1d", n_train=150, n_test=50, seed=1)
    # the package seeds the global generators; the task must leave them as they were
    assert np.array_equal(np.random.get_state()[1], np_before) and random.getstate() == py_before
    assert d.train.inputs.shape == (150, 40, 1) and d.test.inputs.shape == (50, 40, 1)
    assert d.train.inputs.dtype == torch.float32 and d.n_classes == 10
    assert (
        set(d.train.targets.tolist()) <= set(range(10)) and len(set(d.train.targets.tolist())) > 5
    )
    again = make_task("mnist1d", n_train=150, n_test=50, seed=1)
    assert _splits_equal(d.train, again.train) and _splits_equal(d.test, again.test)
    assert not torch.equal(d.train.inputs, make_task("mnist1d", 150, 50, seed=2).train.inputs)
    # examples of one class resemble each other more than examples of different classes
    x, y = d.train.inputs[..., 0], d.train.targets
    same, diff = [], []
    for i in range(60):
        for j in range(i + 1, 60):
            c = float(torch.corrcoef(torch.stack([x[i], x[j]]))[0, 1])
            (same if y[i] == y[j] else diff).append(c)
    assert sum(same) / len(same) > sum(diff) / len(diff)


# ----------------------------------------------------------------------------- declared options


def test_declared_options_match_the_builders():
    """TASKS declares each task's options (so listing them needs no torch); they must be the
    builder's own keyword arguments and defaults, in order."""
    import inspect

    from lrnnx.tasks import SIZE_ARGUMENTS

    for info in TASKS.values():
        params = inspect.signature(info.builder).parameters
        assert list(params)[: len(SIZE_ARGUMENTS)] == list(SIZE_ARGUMENTS), info.name
        declared = {k: p.default for k, p in params.items() if k not in SIZE_ARGUMENTS}
        assert declared == info.options, info.name
        assert all(type(v) is type(declared[k]) for k, v in info.options.items()), info.name


def test_options_are_parsed_and_checked_with_their_declared_types():
    from lrnnx.tasks import parse_option

    assert parse_option("irregular-sine", "noise", "0.3") == 0.3
    assert parse_option("irregular-sine", "noise", "1") == 1.0
    assert parse_option("selective-copy", "n_tokens", "4") == 4
    cases = [
        (("irregular-sine", "noise", "abc"), "noise: expected a float, got 'abc'"),
        (("selective-copy", "n_tokens", "4.5"), "n_tokens: expected an integer, got '4.5'"),
        (("selective-copy", "n_memorise", "3"), "did you mean 'n_memorize'"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError) as e:
            parse_option(*args)
        assert message in str(e.value)
    # the Python API checks the same way, instead of failing inside the generator
    with pytest.raises(ValueError, match="noise: expected a float, got 'abc'"):
        make_task("irregular-sine", n_train=4, n_test=4, noise="abc")
    with pytest.raises(ValueError, match="n_tokens: expected an integer, got True"):
        make_task("selective-copy", n_train=4, n_test=4, n_tokens=True)
    d = make_task("irregular-sine", n_train=4, n_test=4, seq_len=8, noise=0)
    assert d.params["noise"] == 0.0


@pytest.mark.parametrize(
    "name, options, n_choices",
    [
        ("selective-copy", {"n_tokens": 5}, 5),
        ("induction-heads", {"n_tokens": 6}, 6),
        ("assoc-recall", {"n_values": 7}, 7),
        ("irregular-sine", {"n_classes": 3}, 3),
    ],
)
def test_chance_level_is_one_over_the_possible_answers(name, options, n_choices):
    d = make_task(name, n_train=256, n_test=16, seed=0, **options)
    assert d.n_choices == n_choices
    assert d.chance_acc == pytest.approx(1 / n_choices)
    assert d.chance_loss == pytest.approx(math.log(n_choices))
    targets = d.train.targets
    answers = targets[targets != IGNORE_INDEX].unique()
    assert len(answers) == n_choices  # every possible answer occurs, and no other


def test_importing_the_tasks_is_light():
    """`lrnnx tasks` reads TASKS: importing it must not pull in torch, numpy or mnist1d."""
    import subprocess

    code = (
        "import sys, lrnnx.tasks as t; t.TASKS['mnist1d'].available; "
        "print(sorted(m for m in ('torch', 'numpy', 'mnist1d') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_bad_seed_is_named():
    with pytest.raises(ValueError, match="^seed: expected an int, got 'a'"):
        make_task("selective-copy", n_train=8, n_test=8, seed="a")
