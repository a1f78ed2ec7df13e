"""Tasks for training and comparing models: synthetic ones generated on the fly and offline data sets.

Every task is deterministic by seed and has a train and a test split::

    from lrnnx.tasks import make_task
    data = make_task("selective-copy", n_train=1024, n_test=256, seed=0)
    data.train.inputs.shape   # (1024, 128) token ids
    data.train.targets        # -100 where nothing is scored, else the token to predict

``TASKS`` lists them by name; ``make_task`` checks the name and options and builds one.

Importing this package is cheap (no torch, no generator modules): the listing behind
``lrnnx tasks`` is declared here, and a task's generator module is imported when it is built.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from lrnnx.tasks.base import IGNORE_INDEX, KINDS, Split, TaskData, split_generators
from lrnnx.tasks.offline import MNIST1D_MISSING, mnist1d_available

#: arguments every builder takes; the rest of its signature are the task's options
SIZE_ARGUMENTS = ("n_train", "n_test", "seq_len", "seed")

_TYPE_NAMES = {int: "an integer", float: "a float", str: "a string", bool: "true or false"}


@dataclass(frozen=True)
class TaskInfo:
    """A task's entry in :data:`TASKS`.

    Attributes:
        name: the name users type (``lrnnx train --task NAME``).
        kind: ``"lm"`` (an LM head over token ids) or ``"classification"``.
        target: ``"package.module:function"`` of the builder, imported when first needed;
            ``builder(n_train, n_test, seq_len, seed, **options) -> TaskData``.
        description: one line for listings.
        reference: where the task comes from.
        options: the task-specific options (beyond sizes and seed) and their defaults, in the
            builder's order; a default's type is the option's type (an int default takes
            integers, a float default any number).  Must match the builder's signature.
        needs_timesteps: whether its inputs come with ``integration_timesteps``.
        requires: the optional package the task needs, if any.
    """

    name: str
    kind: str
    target: str
    description: str
    reference: str
    options: Dict[str, Any] = field(default_factory=dict)
    needs_timesteps: bool = False
    requires: Optional[str] = None

    @property
    def builder(self) -> Callable[..., TaskData]:
        """The generator function (its module is imported on first use)."""
        module, _, func = self.target.partition(":")
        return getattr(importlib.import_module(module), func)

    @property
    def option_types(self) -> Dict[str, type]:
        """Option name -> the type its values must have."""
        return {k: type(v) for k, v in self.options.items()}

    @property
    def available(self) -> bool:
        """False when an optional package the task needs is missing (checked without importing
        it: importing mnist1d alone takes seconds)."""
        if self.requires is None:
            return True
        try:
            return importlib.util.find_spec(self.requires) is not None
        except (ImportError, ValueError):
            return False


TASKS: Dict[str, TaskInfo] = {
    t.name: t
    for t in (
        TaskInfo(
            "selective-copy",
            "lm",
            "lrnnx.tasks.synthetic:selective_copy",
            "copy the data tokens scattered among noise tokens, in order, after the markers "
            "(min_len > 0: variable lengths)",
            "Mamba, arXiv 2312.00752, sec. 4.1.1",
            options={"n_tokens": 16, "n_memorize": 8, "min_len": 0},
        ),
        TaskInfo(
            "induction-heads",
            "lm",
            "lrnnx.tasks.synthetic:induction_heads",
            "after the special token, recall the token that followed it earlier",
            "Mamba, arXiv 2312.00752, sec. 4.1.2",
            options={"n_tokens": 16},
        ),
        TaskInfo(
            "assoc-recall",
            "lm",
            "lrnnx.tasks.synthetic:assoc_recall",
            "key-value pairs then a query key: predict its value",
            "H3, arXiv 2212.14052, sec. 3.1",
            options={"n_keys": 32, "n_values": 32},
        ),
        TaskInfo(
            "mnist1d",
            "classification",
            "lrnnx.tasks.offline:mnist1d",
            "10-class MNIST-1D, length-40 sequences (needs `pip install mnist1d`)",
            "Greydanus & Kobak, arXiv 2011.14439",
            requires="mnist1d",
        ),
        TaskInfo(
            "irregular-sine",
            "classification",
            "lrnnx.tasks.synthetic:irregular_sine",
            "frequency of a sinusoid seen at Poisson times (uses integration_timesteps)",
            "lrnnx synthetic, event-driven sampling as in arXiv 2404.18508",
            options={
                "n_classes": 4,
                "f_min": 0.02,
                "f_max": 0.08,
                "rate_min": 0.5,
                "rate_max": 2.0,
                "noise": 0.1,
            },
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
        hint = difflib.get_close_matches(str(name), list(TASKS), n=1)
        mean = f"did you mean {hint[0]!r}? " if hint else ""
        raise ValueError(f"task: unknown task {name!r}; {mean}choose one of: {', '.join(TASKS)}")
    return TASKS[name]


def _unknown_option(info: TaskInfo, key: str) -> ValueError:
    valid = ", ".join(f"{k}={v!r}" for k, v in info.options.items()) or "none"
    hint = difflib.get_close_matches(key, list(info.options), n=1)
    mean = f"did you mean {hint[0]!r}? " if hint else ""
    return ValueError(f"{key}: {info.name} has no such option; {mean}valid options: {valid}")


def check_option(name: str, key: str, value: Any) -> Any:
    """``value`` checked against the declared type of option ``key`` of task ``name`` (an int
    given for a float option becomes a float).

    Raises:
        ValueError: unknown option, or a value of the wrong type:
            ``noise: expected a float, got 'abc'``.
    """
    info = get_task(name)
    if key not in info.options:
        raise _unknown_option(info, key)
    kind = info.option_types[key]
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ValueError(f"{key}: expected {_TYPE_NAMES.get(kind, kind.__name__)}, got {value!r}")
    if kind is float and not math.isfinite(value):  # would make the data NaN
        raise ValueError(f"{key}: expected a finite float, got {value!r}")
    return value


def parse_option(name: str, key: str, text: str) -> Any:
    """Read ``text`` (as typed after ``--task-option KEY=``) with the option's declared type.

    Raises:
        ValueError: unknown option or unreadable value (``noise: expected a float, got 'abc'``).
    """
    info = get_task(name)
    if key not in info.options:
        raise _unknown_option(info, key)
    kind = info.option_types[key]
    raw = text.strip()
    try:
        if kind is bool:
            value: Any = {"true": True, "1": True, "false": False, "0": False}[raw.lower()]
        elif kind is int:
            value = int(raw)
        elif kind is float:
            value = float(raw)
        else:
            value = kind(text)
    except (KeyError, ValueError):
        raise ValueError(
            f"{key}: expected {_TYPE_NAMES.get(kind, kind.__name__)}, got {text!r}"
        ) from None
    return check_option(name, key, value)


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
        ValueError: unknown task, unknown option (the message lists the valid ones), an option
            of the wrong type, or impossible sizes.
        ImportError: the task needs an optional package that is not installed.
    """
    info = get_task(name)
    unknown = sorted(set(options) - set(info.options))
    if unknown:
        valid = ", ".join(f"{k}={v!r}" for k, v in info.options.items()) or "none"
        hints = [h for k in unknown for h in difflib.get_close_matches(k, list(info.options), 1)]
        mean = f"; did you mean {', '.join(map(repr, hints))}?" if hints else ""
        raise ValueError(
            f"task option: {name} has no option {', '.join(unknown)}{mean}; valid options: {valid}"
        )
    options = {k: check_option(name, k, v) for k, v in options.items()}
    if name == "mnist1d" and not mnist1d_available():
        raise ImportError(MNIST1D_MISSING)
    sizes = {k: v for k, v in (("n_train", n_train), ("n_test", n_test)) if v is not None}
    return info.builder(seq_len=seq_len, seed=seed, **sizes, **options)


__all__ = [
    "IGNORE_INDEX",
    "KINDS",
    "MNIST1D_MISSING",
    "SIZE_ARGUMENTS",
    "TASKS",
    "Split",
    "TaskData",
    "TaskInfo",
    "check_option",
    "get_task",
    "make_task",
    "parse_option",
    "split_generators",
    "task_names",
]
