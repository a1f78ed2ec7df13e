"""Tasks for training and comparing models: synthetic ones generated on the fly and offline data sets.

Every task is deterministic by seed and has a train and a test split::

    from lrnnx.tasks import make_task
    data = make_task("selective-copy", n_train=1024, n_test=256, seed=0)
    data.train.inputs.shape   # (1024, 128) token ids
    data.train.targets        # -100 where nothing is scored, else the token to predict

``TASKS`` lists them by name; ``make_task`` checks the name and options and builds one.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, List

from lrnnx.tasks.base import IGNORE_INDEX, KINDS, Split, TaskData, split_generators
from lrnnx.tasks.offline import MNIST1D_MISSING, mnist1d, mnist1d_available
from lrnnx.tasks.synthetic import assoc_recall, induction_heads, irregular_sine, selective_copy


@dataclass(frozen=True)
class TaskInfo:
    """A task's entry in :data:`TASKS`.

    Attributes:
        name: the name users type (``lrnnx train --task NAME``).
        kind: ``"lm"`` (an LM head over token ids) or ``"classification"``.
        builder: ``builder(n_train, n_test, seq_len, seed, **options) -> TaskData``.
        description: one line for listings.
        reference: where the task comes from.
        needs_timesteps: whether its inputs come with ``integration_timesteps``.
    """

    name: str
    kind: str
    builder: Callable[..., TaskData]
    description: str
    reference: str
    needs_timesteps: bool = False

    @property
    def options(self) -> Dict[str, Any]:
        """The task-specific options (beyond sizes and seed) and their defaults."""
        common = {"n_train", "n_test", "seq_len", "seed"}
        return {
            name: p.default
            for name, p in inspect.signature(self.builder).parameters.items()
            if name not in common
        }

    @property
    def available(self) -> bool:
        """False when an optional package the task needs is missing."""
        return self.name != "mnist1d" or mnist1d_available()


TASKS: Dict[str, TaskInfo] = {
    t.name: t
    for t in (
        TaskInfo(
            "selective-copy",
            "lm",
            selective_copy,
            "copy the data tokens scattered among noise tokens, in order, after the markers",
            "Mamba, arXiv 2312.00752, sec. 4.1.1",
        ),
        TaskInfo(
            "induction-heads",
            "lm",
            induction_heads,
            "after the special token, recall the token that followed it earlier",
            "Mamba, arXiv 2312.00752, sec. 4.1.2",
        ),
        TaskInfo(
            "assoc-recall",
            "lm",
            assoc_recall,
            "key-value pairs then a query key: predict its value",
            "H3, arXiv 2212.14052, sec. 3.1",
        ),
        TaskInfo(
            "mnist1d",
            "classification",
            mnist1d,
            "10-class MNIST-1D, length-40 sequences (needs `pip install mnist1d`)",
            "Greydanus & Kobak, arXiv 2011.14439",
        ),
        TaskInfo(
            "irregular-sine",
            "classification",
            irregular_sine,
            "frequency of a sinusoid seen at Poisson times (uses integration_timesteps)",
            "lrnnx synthetic, event-driven sampling as in arXiv 2404.18508",
            needs_timesteps=True,
        ),
    )
}


def task_names() -> List[str]:
    """Names of every task, available or not."""
    return list(TASKS)


def get_task(name: str) -> TaskInfo:
    """The :class:`TaskInfo` of ``name``; a ValueError lists the valid names otherwise."""
    if name not in TASKS:
        raise ValueError(f"task: unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[name]


def make_task(
    name: str,
    n_train: int | None = None,
    n_test: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
    **options: Any,
) -> TaskData:
    """Generate task ``name``; None sizes take the task's defaults.

    Raises:
        ValueError: unknown task, unknown option (the message lists the valid ones) or
            impossible sizes.
        ImportError: the task needs an optional package that is not installed.
    """
    info = get_task(name)
    unknown = sorted(set(options) - set(info.options))
    if unknown:
        valid = ", ".join(f"{k}={v!r}" for k, v in info.options.items()) or "none"
        raise ValueError(
            f"task option: {name} has no option {', '.join(unknown)}; valid options: {valid}"
        )
    if name == "mnist1d" and not mnist1d_available():
        raise ImportError(MNIST1D_MISSING)
    sizes = {k: v for k, v in (("n_train", n_train), ("n_test", n_test)) if v is not None}
    return info.builder(seq_len=seq_len, seed=seed, **sizes, **options)


__all__ = [
    "IGNORE_INDEX",
    "KINDS",
    "MNIST1D_MISSING",
    "TASKS",
    "Split",
    "TaskData",
    "TaskInfo",
    "get_task",
    "make_task",
    "split_generators",
    "task_names",
]
