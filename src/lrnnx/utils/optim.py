"""Optimizer parameter groups that honour the models' own hints.

Two kinds of hint ride on parameters, as in state-spaces/s4 and mamba_ssm:

- ``param._optim = {"lr": ..., "weight_decay": ...}``: S4 and S4D put it on their SSM
  parameters (dt, A, P, B and C, from their ``lr``/``wd`` constructor arguments), whose
  learning rate is usually smaller than the network's and whose weight decay is usually 0;
- ``param._no_weight_decay = True``: Mamba's ``A_log`` and ``D``, RG-LRU's ``Lambda``.

:func:`param_groups` turns them into groups for any ``torch.optim`` optimizer, the way
state-spaces/s4's ``setup_optimizer`` does: one group per distinct hint, the rest split into
decayed matrices and undecayed vectors (biases, norms' scales, every parameter with fewer than
two dimensions).
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from torch import nn

from lrnnx.core.checks import check_positive_float

__all__ = ["param_groups"]


def param_groups(model: nn.Module, weight_decay: float = 0.0) -> List[Dict[str, Any]]:
    """Parameter groups of ``model`` for ``torch.optim`` (trainable parameters only).

    Args:
        model: any module.
        weight_decay: for the parameters without a hint that have at least two dimensions
            (>= 0).

    Returns:
        A list of ``{"params": [...], "weight_decay": ...}`` groups, with ``"lr"`` where a hint
        sets one (the optimizer's ``lr`` applies to the others): always the decayed and the
        undecayed (either may be empty), then one per distinct ``_optim`` hint.  Every
        trainable parameter is in exactly one group.

    Raises:
        TypeError, ValueError: ``weight_decay`` is not a finite number >= 0.

    Example:
        >>> opt = torch.optim.AdamW(param_groups(model, weight_decay=0.1), lr=1e-3)
    """
    wd = check_positive_float("weight_decay", weight_decay, allow_zero=True)
    decay, no_decay = [], []
    hinted: Dict[Tuple[Tuple[str, Any], ...], List[nn.Parameter]] = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        hint = getattr(p, "_optim", None)
        if hint:
            hinted.setdefault(tuple(sorted(hint.items())), []).append(p)
        elif getattr(p, "_no_weight_decay", False) or p.dim() < 2:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    for hint, params in hinted.items():
        # an SSM parameter is not decayed unless its hint says so
        groups.append({"params": params, "weight_decay": 0.0, **dict(hint)})
    return groups
