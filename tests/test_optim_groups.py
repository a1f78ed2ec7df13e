"""lrnnx.utils.param_groups: the models' optimizer hints (S4/S4D's ``_optim``, Mamba's and
RG-LRU's ``_no_weight_decay``) become parameter groups, as state-spaces/s4's setup_optimizer
makes them; ``lrnnx train`` uses them."""

from __future__ import annotations

import pytest
import torch

from lrnnx.architectures import LRNNLMHeadModel
from lrnnx.models.lti import S4
from lrnnx.models.ltv import RGLRU, Mamba
from lrnnx.utils import param_groups


def _group_of(groups, p):
    found = [g for g in groups if any(q is p for q in g["params"])]
    assert len(found) == 1, "every parameter in exactly one group"
    return found[0]


def test_s4_hints_become_groups():
    model = S4(8, d_state=4, transposed=False, lr={"dt": 1e-3, "A": 1e-3, "B": 2e-3}, wd=0.0)
    groups = param_groups(model, weight_decay=0.1)
    for name, p in model.named_parameters():
        g = _group_of(groups, p)
        hint = getattr(p, "_optim", None)
        if hint:
            assert g["weight_decay"] == hint.get("weight_decay", 0.0)
            assert g.get("lr") == hint.get("lr"), name
        elif p.dim() >= 2:
            assert g["weight_decay"] == 0.1 and "lr" not in g, name
        else:
            assert g["weight_decay"] == 0.0, name
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # the groups drive an optimizer: a step with decay leaves the hinted SSM undecayed
    opt = torch.optim.AdamW(groups, lr=1e-2)
    assert {g.get("lr") for g in opt.param_groups} == {1e-2, 1e-3, 2e-3}


@pytest.mark.parametrize("make", [lambda: Mamba(8, 4), lambda: RGLRU(8)])
def test_no_weight_decay_flags_are_honoured(make):
    model = make()
    groups = param_groups(model, weight_decay=0.5)
    for name, p in model.named_parameters():
        flagged = getattr(p, "_no_weight_decay", False)
        expect = 0.0 if flagged or p.dim() < 2 else 0.5
        assert _group_of(groups, p)["weight_decay"] == expect, name


def test_frozen_parameters_are_left_out_and_bad_decay_is_named():
    lm = LRNNLMHeadModel(d_model=8, d_state=4, n_layer=1, vocab_size=10, mixer_types="s4")
    lm.embedding.weight.requires_grad_(False)
    groups = param_groups(lm, 0.01)
    assert not any(p is lm.embedding.weight for g in groups for p in g["params"])
    with pytest.raises(ValueError, match="^weight_decay"):
        param_groups(lm, -1.0)


def test_lrnnx_train_groups_by_the_hints(monkeypatch, tmp_path):
    """lrnnx train's AdamW gets param_groups' groups (S4's SSM parameters were decayed)."""
    from lrnnx.train import TrainConfig, train

    seen = []
    real = torch.optim.AdamW

    def spy(groups, **kwargs):
        seen.append([dict(g) for g in groups])
        return real(groups, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    config = TrainConfig(
        task="selective-copy", model="s4", steps=2, batch_size=4, seq_len=16, d_model=8,
        d_state=4, layers=1, weight_decay=0.1, eval_every=2, n_test=8, threads=1,
        task_options={"n_tokens": 4, "n_memorize": 2}, out=str(tmp_path / "run"),
    )  # fmt: skip
    train(config, log=lambda m: None)
    groups = seen[0]
    ssm = [g for g in groups if g["params"] and all(hasattr(p, "_optim") for p in g["params"])]
    assert ssm and all(g["weight_decay"] == 0.0 for g in ssm)
    assert any(g["weight_decay"] == 0.1 and g["params"] for g in groups)
