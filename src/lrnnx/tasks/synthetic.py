"""Synthetic tasks, generated on the fly and deterministic by seed.

Token tasks (next-token prediction, scored only where the task defines an answer):

* ``selective-copy`` (Mamba, arXiv 2312.00752, section 4.1.1): K data tokens are scattered at
  random positions among noise tokens; after the context come K marker tokens, and at the i-th
  marker the model must output the i-th data token.  Because the spacing is random, a
  time-invariant convolution cannot pick the data out: the model has to select by content.

      input   3 0 0 5 0 1 0 0 M M M        (0 = noise, M = marker)
      target  . . . . . . . . 3 5 1

  With ``min_len`` > 0 the examples have variable lengths, log-uniform in [min_len, seq_len]
  (a long-tailed spread, as document lengths are): each is padded with noise tokens after its
  markers, nothing is scored there, and the split's ``lengths`` say where each one ends (the
  task for ``lrnnx train --pack``).

* ``induction-heads`` (Mamba section 4.1.2, after Olsson et al. 2022): a random token sequence
  contains a special token S once, followed by some token a; the sequence ends with S again and
  the model must predict a (associative recall of what followed S).

* ``assoc-recall`` (H3, arXiv 2212.14052, section 3.1): key-value pairs k1 v1 k2 v2 ... then a
  query key; the model must output the value paired with it.  Keys within a sequence are
  distinct, so the answer is unique.

Classification task on an irregular time grid:

* ``irregular-sine``: a sinusoid sin(2 pi f t + phi) + noise observed at the arrival times of a
  Poisson process; the label is the frequency class of f.  The sampling rate is drawn per
  sequence over a range as wide as the frequency range, so the samples alone cannot tell a fast
  sinusoid seen often from a slow one seen rarely: the elapsed times, passed to the model as
  ``integration_timesteps``, are needed.
"""

from __future__ import annotations

import math

import torch

from lrnnx.tasks.base import IGNORE_INDEX, Split, TaskData, split_generators


def _check_int(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return value


def _check_sizes(n_train: int, n_test: int) -> None:
    _check_int("n_train", n_train, 1)
    _check_int("n_test", n_test, 1)


# ----------------------------------------------------------------------------- selective copy


def selective_copy_split(
    n: int, seq_len: int, n_tokens: int, n_memorize: int, generator: torch.Generator
) -> Split:
    """``n`` selective-copy examples of total length ``seq_len``.

    Token ids: 0 = noise, 1..n_tokens = data, n_tokens + 1 = marker.  The context is the first
    ``seq_len - n_memorize`` positions; the last ``n_memorize`` positions hold markers and are
    the only scored ones, with targets the data tokens in their order of appearance.
    """
    ctx = seq_len - n_memorize
    marker = n_tokens + 1
    # K distinct positions per row, sorted so targets follow the order of appearance
    pos = torch.rand(n, ctx, generator=generator).argsort(dim=1)[:, :n_memorize].sort(dim=1).values
    data = torch.randint(1, n_tokens + 1, (n, n_memorize), generator=generator)
    inputs = torch.zeros(n, seq_len, dtype=torch.long)
    inputs.scatter_(1, pos, data)
    inputs[:, ctx:] = marker
    targets = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    targets[:, ctx:] = data
    return Split(inputs, targets)


def log_uniform_lengths(
    n: int, min_len: int, max_len: int, generator: torch.Generator
) -> torch.Tensor:
    """``n`` integer lengths, log-uniform in [min_len, max_len] (long-tailed: as many examples
    between 64 and 128 tokens as between 1024 and 2048)."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    lo, hi = math.log(min_len), math.log(max_len + 1)
    return torch.exp(lo + u * (hi - lo)).floor().long().clamp(min_len, max_len)


def selective_copy_varlen_split(
    n: int,
    seq_len: int,
    n_tokens: int,
    n_memorize: int,
    min_len: int,
    generator: torch.Generator,
) -> Split:
    """``n`` selective-copy examples of lengths log-uniform in [min_len, seq_len], padded to
    ``seq_len``: example i has its context in the first ``lengths[i] - n_memorize`` positions,
    its markers (the scored positions) right after, and noise tokens (0) as padding, where
    nothing is scored."""
    lengths = log_uniform_lengths(n, min_len, seq_len, generator)
    ctx = lengths - n_memorize  # (n,) context length of every example
    marker = n_tokens + 1
    # random keys, +inf past each context: the K smallest are K distinct context positions
    keys = torch.rand(n, seq_len, generator=generator)
    keys = keys.masked_fill(torch.arange(seq_len)[None, :] >= ctx[:, None], math.inf)
    pos = keys.argsort(dim=1)[:, :n_memorize].sort(dim=1).values
    data = torch.randint(1, n_tokens + 1, (n, n_memorize), generator=generator)
    inputs = torch.zeros(n, seq_len, dtype=torch.long)
    inputs.scatter_(1, pos, data)
    at_markers = ctx[:, None] + torch.arange(n_memorize)[None, :]
    inputs.scatter_(1, at_markers, marker)
    targets = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    targets.scatter_(1, at_markers, data)
    return Split(inputs, targets, lengths=lengths)


def selective_copy(
    n_train: int = 4096,
    n_test: int = 512,
    seq_len: int | None = None,
    seed: int = 0,
    n_tokens: int = 16,
    n_memorize: int = 8,
    min_len: int = 0,
) -> TaskData:
    """Selective copying (Mamba, section 4.1.1).

    Args:
        n_train, n_test: number of sequences per split.
        seq_len: total length (context + ``n_memorize`` markers); default 128.  With
            ``min_len`` the longest length.
        seed: the same seed gives the same data.
        n_tokens: number of distinct data tokens (the paper uses 16).
        n_memorize: K, the number of data tokens to copy (the paper uses 16).
        min_len: 0 (default): every example is ``seq_len`` long.  Else variable lengths,
            log-uniform in [min_len, seq_len] (needs 2 K <= min_len <= seq_len); the splits
            carry ``lengths``.
    """
    _check_sizes(n_train, n_test)
    seq_len = 128 if seq_len is None else seq_len
    _check_int("n_tokens", n_tokens, 1)
    _check_int("n_memorize", n_memorize, 1)
    _check_int("seq_len", seq_len, 2)
    _check_int("min_len", min_len, 0)
    if seq_len < 2 * n_memorize:
        raise ValueError(
            f"seq_len: selective-copy needs room for {n_memorize} data tokens and {n_memorize} "
            f"markers (seq_len >= {2 * n_memorize}), got {seq_len}"
        )
    if min_len and not 2 * n_memorize <= min_len <= seq_len:
        raise ValueError(
            f"min_len: expected 0 (fixed length) or {2 * n_memorize} <= min_len <= seq_len = "
            f"{seq_len} (room for {n_memorize} data tokens and markers), got {min_len}"
        )
    g_train, g_test = split_generators(seed)
    args = (seq_len, n_tokens, n_memorize)
    if min_len:
        train = selective_copy_varlen_split(n_train, *args, min_len, g_train)
        test = selective_copy_varlen_split(n_test, *args, min_len, g_test)
    else:  # the fixed-length generator, unchanged: same data for the same seed as before
        train = selective_copy_split(n_train, *args, g_train)
        test = selective_copy_split(n_test, *args, g_test)
    params = {"n_tokens": n_tokens, "n_memorize": n_memorize, "seed": seed}
    if min_len:
        params["min_len"] = min_len
    return TaskData(
        name="selective-copy",
        kind="lm",
        train=train,
        test=test,
        seq_len=seq_len,
        vocab_size=n_tokens + 2,
        params=params,
        n_choices=n_tokens,  # every answer is one of the n_tokens data tokens, uniformly drawn
    )


# ----------------------------------------------------------------------------- induction heads


def induction_heads_split(n: int, seq_len: int, n_tokens: int, generator: torch.Generator) -> Split:
    """``n`` induction-head examples.

    Ordinary tokens are 0..n_tokens-1 and the special token is ``n_tokens``.  It appears at a
    random position p <= seq_len - 3 and at the last position; the target at the last position
    is the token at p + 1, and nothing else is scored.
    """
    special = n_tokens
    inputs = torch.randint(0, n_tokens, (n, seq_len), generator=generator)
    p = torch.randint(0, seq_len - 2, (n,), generator=generator)
    rows = torch.arange(n)
    inputs[rows, p] = special
    inputs[:, -1] = special
    targets = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    targets[:, -1] = inputs[rows, p + 1]
    return Split(inputs, targets)


def induction_heads(
    n_train: int = 4096,
    n_test: int = 512,
    seq_len: int | None = None,
    seed: int = 0,
    n_tokens: int = 16,
) -> TaskData:
    """Induction heads (Mamba, section 4.1.2).

    Args:
        n_train, n_test: number of sequences per split.
        seq_len: sequence length (default 256, the paper's training length).
        seed: the same seed gives the same data.
        n_tokens: number of ordinary tokens (the paper uses a vocabulary of 16).
    """
    _check_sizes(n_train, n_test)
    seq_len = 256 if seq_len is None else seq_len
    _check_int("n_tokens", n_tokens, 1)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 4:
        raise ValueError(
            f"seq_len: induction-heads needs a special token, its successor, one more token and "
            f"the final special token (seq_len >= 4), got {seq_len!r}"
        )
    g_train, g_test = split_generators(seed)
    return TaskData(
        name="induction-heads",
        kind="lm",
        train=induction_heads_split(n_train, seq_len, n_tokens, g_train),
        test=induction_heads_split(n_test, seq_len, n_tokens, g_test),
        seq_len=seq_len,
        vocab_size=n_tokens + 1,
        params={"n_tokens": n_tokens, "seed": seed},
        n_choices=n_tokens,  # the token after the special one: any of the n_tokens ordinary ones
    )


# ----------------------------------------------------------------------------- associative recall


def assoc_recall_split(
    n: int, seq_len: int, n_keys: int, n_values: int, generator: torch.Generator
) -> Split:
    """``n`` associative-recall examples: (seq_len - 1) / 2 key-value pairs and a query key.

    Keys are ids 0..n_keys-1 (distinct within a sequence), values n_keys..n_keys+n_values-1.
    The target at the last position (the query) is the value that followed the queried key.
    """
    n_pairs = (seq_len - 1) // 2
    keys = torch.rand(n, n_keys, generator=generator).argsort(dim=1)[:, :n_pairs]
    values = n_keys + torch.randint(0, n_values, (n, n_pairs), generator=generator)
    q = torch.randint(0, n_pairs, (n,), generator=generator)
    rows = torch.arange(n)
    inputs = torch.empty(n, seq_len, dtype=torch.long)
    inputs[:, 0:-1:2] = keys
    inputs[:, 1:-1:2] = values
    inputs[:, -1] = keys[rows, q]
    targets = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.long)
    targets[:, -1] = values[rows, q]
    return Split(inputs, targets)


def assoc_recall(
    n_train: int = 4096,
    n_test: int = 512,
    seq_len: int | None = None,
    seed: int = 0,
    n_keys: int = 32,
    n_values: int = 32,
) -> TaskData:
    """Associative recall (H3, section 3.1).

    Args:
        n_train, n_test: number of sequences per split.
        seq_len: 2 * (number of pairs) + 1, so odd (default 33: 16 pairs and the query).
        seed: the same seed gives the same data.
        n_keys: key vocabulary; must be >= the number of pairs (keys are distinct).
        n_values: value vocabulary.
    """
    _check_sizes(n_train, n_test)
    seq_len = 33 if seq_len is None else seq_len
    _check_int("n_keys", n_keys, 1)
    _check_int("n_values", n_values, 1)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 3 or seq_len % 2 == 0:
        raise ValueError(
            "seq_len: assoc-recall sequences are key-value pairs plus one query key, so seq_len "
            f"must be odd and >= 3, got {seq_len!r}"
        )
    n_pairs = (seq_len - 1) // 2
    if n_pairs > n_keys:
        raise ValueError(
            f"seq_len: {n_pairs} pairs need at least that many distinct keys, but n_keys={n_keys}; "
            f"use seq_len <= {2 * n_keys + 1} or a larger n_keys"
        )
    g_train, g_test = split_generators(seed)
    args = (seq_len, n_keys, n_values)
    return TaskData(
        name="assoc-recall",
        kind="lm",
        train=assoc_recall_split(n_train, *args, g_train),
        test=assoc_recall_split(n_test, *args, g_test),
        seq_len=seq_len,
        vocab_size=n_keys + n_values,
        params={"n_keys": n_keys, "n_values": n_values, "n_pairs": n_pairs, "seed": seed},
        n_choices=n_values,  # the queried value: any of the n_values, uniformly drawn
    )


# ----------------------------------------------------------------------------- irregular sine


def sine_frequencies(n_classes: int, f_min: float, f_max: float) -> torch.Tensor:
    """The class frequencies: ``n_classes`` evenly spaced values in [f_min, f_max]."""
    return torch.linspace(f_min, f_max, n_classes, dtype=torch.float64)


def irregular_sine_split(
    n: int,
    seq_len: int,
    freqs: torch.Tensor,
    rate_min: float,
    rate_max: float,
    noise: float,
    generator: torch.Generator,
) -> Split:
    """``n`` sinusoids observed at Poisson arrival times.

    Per sequence: label c, rate r log-uniform in [rate_min, rate_max], phase phi uniform; the
    gaps dt_k ~ Exponential(r), t_k = dt_1 + ... + dt_k, and x_k = sin(2 pi f_c t_k + phi) +
    noise * N(0, 1).  ``integration_timesteps`` are the gaps dt_k (dt_1 counts from t = 0).
    """
    labels = torch.randint(0, len(freqs), (n,), generator=generator)
    u = torch.rand(n, 1, generator=generator, dtype=torch.float64)
    rate = torch.exp(math.log(rate_min) + u * (math.log(rate_max) - math.log(rate_min)))
    phase = 2 * math.pi * torch.rand(n, 1, generator=generator, dtype=torch.float64)
    # Exponential(r) gaps by inversion; 1 - U lies in (0, 1] so the log is finite
    uniform = torch.rand(n, seq_len, generator=generator, dtype=torch.float64)
    dt = -torch.log1p(-uniform) / rate
    t = dt.cumsum(dim=1)
    x = torch.sin(2 * math.pi * freqs[labels][:, None] * t + phase)
    x = x + noise * torch.randn(n, seq_len, generator=generator, dtype=torch.float64)
    return Split(x.float()[..., None], labels, dt.float())


def irregular_sine(
    n_train: int = 4096,
    n_test: int = 512,
    seq_len: int | None = None,
    seed: int = 0,
    n_classes: int = 4,
    f_min: float = 0.02,
    f_max: float = 0.08,
    rate_min: float = 0.5,
    rate_max: float = 2.0,
    noise: float = 0.1,
) -> TaskData:
    """Frequency classification of an irregularly sampled sinusoid.

    The mean gap 1 / rate is about one time unit, so models see the same scale of steps as on a
    regular grid.  With the defaults, f / rate (cycles per sample) ranges over [0.01, 0.16] and
    the classes overlap in it; only the elapsed times separate them.

    Args:
        n_train, n_test: number of sequences per split.
        seq_len: number of observations per sequence (default 128).
        seed: the same seed gives the same data.
        n_classes: number of frequency classes, evenly spaced in [f_min, f_max].
        rate_min, rate_max: range of the per-sequence Poisson rate (observations per time unit).
        noise: standard deviation of the additive Gaussian observation noise.
    """
    _check_sizes(n_train, n_test)
    seq_len = 128 if seq_len is None else seq_len
    _check_int("seq_len", seq_len, 1)
    _check_int("n_classes", n_classes, 2)
    if not 0 < f_min < f_max:
        raise ValueError(f"f_min, f_max: expected 0 < f_min < f_max, got {f_min}, {f_max}")
    if not 0 < rate_min <= rate_max:
        raise ValueError(
            f"rate_min, rate_max: expected 0 < rate_min <= rate_max, got {rate_min}, {rate_max}"
        )
    if not noise >= 0:
        raise ValueError(f"noise: expected a standard deviation >= 0, got {noise}")
    freqs = sine_frequencies(n_classes, f_min, f_max)
    g_train, g_test = split_generators(seed)
    args = (seq_len, freqs, rate_min, rate_max, noise)
    return TaskData(
        name="irregular-sine",
        kind="classification",
        train=irregular_sine_split(n_train, *args, g_train),
        test=irregular_sine_split(n_test, *args, g_test),
        seq_len=seq_len,
        d_input=1,
        n_classes=n_classes,
        needs_timesteps=True,
        params={
            "frequencies": [float(f) for f in freqs],
            "rate_min": rate_min,
            "rate_max": rate_max,
            "noise": noise,
            "seed": seed,
        },
    )
