"""Data sets generated offline by third-party packages.

* ``mnist1d`` (Greydanus & Kobak, arXiv 2011.14439): ten 1-D digit templates, each randomly
  padded, translated, sheared, scaled and corrupted with correlated and white noise, giving
  length-40 sequences in 10 classes.  The ``mnist1d`` package generates it locally
  (``make_dataset``); nothing is downloaded.
"""

from __future__ import annotations

import random

from lrnnx.tasks.base import Split, TaskData

#: shown when the optional ``mnist1d`` package is missing
MNIST1D_MISSING = (
    "task 'mnist1d' needs the mnist1d package, which is not installed: pip install mnist1d"
)


def mnist1d_available() -> bool:
    """Whether the ``mnist1d`` generator can be imported."""
    try:
        import mnist1d.data  # noqa: F401
    except ImportError:
        return False
    return True


def mnist1d(
    n_train: int = 4000,
    n_test: int = 1000,
    seq_len: int | None = None,
    seed: int = 0,
) -> TaskData:
    """MNIST-1D classification: inputs (N, seq_len, 1), 10 classes.

    The package's generator is called with its default arguments except ``num_samples`` (enough
    for both splits, rounded up to a multiple of the 10 classes), ``seed`` and, if given,
    ``final_seq_length`` (``seq_len``, default 40).  Its shuffled output is cut into the first
    ``n_train`` examples for training and the next ``n_test`` for testing.  The generator seeds
    numpy's and Python's global random state; both are restored afterwards.

    Raises:
        ImportError: if the ``mnist1d`` package is not installed.
    """
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    if seq_len is not None and (not isinstance(seq_len, int) or seq_len < 1):
        raise ValueError(f"seq_len: expected an int >= 1, got {seq_len!r}")
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise ImportError(MNIST1D_MISSING) from e
    import numpy as np
    import torch

    args = get_dataset_args()
    total = n_train + n_test
    args.num_samples = -(-total // 10) * 10
    args.train_split = 1.0
    args.seed = int(seed)
    if seq_len is not None:
        args.final_seq_length = seq_len
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    x = np.concatenate([data["x"], data["x_test"]])[:total]
    y = np.concatenate([data["y"], data["y_test"]])[:total]
    inputs = torch.from_numpy(np.ascontiguousarray(x)).float()[..., None]
    labels = torch.from_numpy(np.ascontiguousarray(y)).long()
    return TaskData(
        name="mnist1d",
        kind="classification",
        train=Split(inputs[:n_train], labels[:n_train]),
        test=Split(inputs[n_train:], labels[n_train:]),
        seq_len=inputs.shape[1],
        d_input=1,
        n_classes=10,
        params={"num_samples": args.num_samples, "seed": seed},
    )
