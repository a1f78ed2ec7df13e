"""Containers shared by every task: a split of examples and a task's data set with its metadata.

torch is imported where it is used, so that listing the tasks (``lrnnx tasks``) stays fast.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Optional

if TYPE_CHECKING:
    import torch
    from torch import Tensor

#: target value that the language-modelling loss and accuracy skip (torch's cross_entropy default)
IGNORE_INDEX = -100

#: the two kinds of task: next-token prediction on token ids, or one label per sequence
KINDS = ("lm", "classification")


@dataclass
class Split:
    """One split (train or test) of a task.

    Attributes:
        inputs: (N, L) long token ids for ``"lm"`` tasks, (N, L, d_input) float for
            ``"classification"`` tasks.
        targets: (N, L) long next-token targets (``IGNORE_INDEX`` where nothing is scored) for
            ``"lm"`` tasks, (N,) long class labels for ``"classification"`` tasks.
        integration_timesteps: (N, L) float elapsed time before each element, for irregularly
            sampled tasks; None for uniformly sampled ones.
        lengths: (N,) long valid length of each example, for variable-length tasks (the
            inputs are padded after it, and no target is scored there); None when every
            example is L long.
    """

    inputs: Tensor
    targets: Tensor
    integration_timesteps: Optional[Tensor] = None
    lengths: Optional[Tensor] = None

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, index: Any) -> Split:
        ts, n = self.integration_timesteps, self.lengths
        return Split(
            self.inputs[index],
            self.targets[index],
            None if ts is None else ts[index],
            None if n is None else n[index],
        )

    def to(self, device: Any) -> Split:
        ts, n = self.integration_timesteps, self.lengths
        return Split(
            self.inputs.to(device),
            self.targets.to(device),
            None if ts is None else ts.to(device),
            None if n is None else n.to(device),
        )


@dataclass
class TaskData:
    """A generated task: train and test splits plus what a model needs to know about them.

    Attributes:
        name: the task's name in :data:`lrnnx.tasks.TASKS`.
        kind: ``"lm"`` (token inputs, per-position targets) or ``"classification"``.
        train, test: the two splits, generated from independent streams of the same seed.
        seq_len: length L of every sequence.
        vocab_size: number of token ids (``"lm"`` tasks), else None.
        d_input: features per element (``"classification"`` tasks), else None.
        n_classes: number of labels (``"classification"`` tasks), else None.
        needs_timesteps: whether the splits carry ``integration_timesteps`` the model must use.
        params: the generator's parameters (recorded in metrics and checkpoints).
        n_choices: how many answers are possible at a scored position, all equally likely by
            construction (default: ``n_classes``); sets the chance level
            (:attr:`chance_acc`, :attr:`chance_loss`).
    """

    name: str
    kind: str
    train: Split
    test: Split
    seq_len: int
    vocab_size: Optional[int] = None
    d_input: Optional[int] = None
    n_classes: Optional[int] = None
    needs_timesteps: bool = False
    params: Dict[str, Any] = field(default_factory=dict)
    n_choices: Optional[int] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {list(KINDS)}, got {self.kind!r}")
        if self.n_choices is None:
            self.n_choices = self.n_classes

    @property
    def chance_acc(self) -> Optional[float]:
        """Accuracy of guessing uniformly among the possible answers (None if unknown)."""
        return None if not self.n_choices else 1.0 / self.n_choices

    @property
    def chance_loss(self) -> Optional[float]:
        """Cross-entropy of that uniform guess, log(n_choices) nats (None if unknown): a loss
        that stays there has learned nothing."""
        return None if not self.n_choices else math.log(self.n_choices)


def split_generators(seed: int) -> tuple[torch.Generator, torch.Generator]:
    """Independent generators for the train and test splits of ``seed``.

    Train uses stream 2*seed and test 2*seed + 1, so the train set does not depend on the test
    set's size (and vice versa) and no two seeds share a stream.

    Raises:
        ValueError: ``seed`` not an int.
    """
    import torch

    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):  # numpy ints too
        raise ValueError(f"seed: expected an int, got {seed!r}")

    return (
        torch.Generator().manual_seed(2 * int(seed)),
        torch.Generator().manual_seed(2 * int(seed) + 1),
    )
