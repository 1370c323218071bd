"""The `branches` method (SHIKE Fig. 1): one classifier per ResNet-32 branch, joint or detached shallow branches,
and a classifier re-training stage that touches only the fresh heads."""

from __future__ import annotations

import pytest
import torch

from harness.config import RunConfig
from harness.methods.branches import BranchResNet, branch_names
from harness.registry import METHODS
from harness.trainer import enter_stage

COUNTS = (50, 20, 8, 3)


def build(**switches):
    torch.manual_seed(0)
    return METHODS.get("branches")(num_classes=len(COUNTS), class_counts=COUNTS, **switches)


def grads(model, loss) -> dict[str, bool]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    parts = {"stem": model.stem, "layer1": model.layer1, "layer2": model.layer2, "layer3": model.layer3,
             "aligners": model.aligners, "heads": model.heads}
    return {name: any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
            for name, part in parts.items()}


@pytest.mark.parametrize("shallow, names", [("1,2", ("layer1", "layer2", "layer3 (deep)")),
                                            ("2", ("layer2", "layer3 (deep)")), ("", ("layer3 (deep)",))])
def test_one_classifier_per_branch_and_inference_is_the_deep_branch(shallow, names):
    spec = build(shallow=shallow)
    model = spec.model
    out = model(torch.randn(3, 3, 32, 32))
    assert isinstance(model, BranchResNet) and model.num_experts == len(names)
    assert out.expert_logits.shape == (len(names), 3, 4) and out.features.shape == (len(names), 3, 64)
    assert torch.equal(out.logits, out.expert_logits[-1])
    assert branch_names(model.shallow) == names and spec.notes["branches"] == ",".join(names)
    assert set(model.parameter_groups()) == {"backbone", "head", "retrain_head"}


def test_detached_shallow_branches_do_not_train_the_trunk():
    model = build(joint=False).model
    shallow_loss = model(torch.randn(4, 3, 32, 32)).expert_logits[:2].pow(2).sum()
    assert grads(model, shallow_loss) == {"stem": False, "layer1": False, "layer2": False, "layer3": False,
                                          "aligners": True, "heads": True}


def test_jointly_trained_shallow_branches_reach_the_trunk_as_in_the_paper():
    model = build(joint=True).model
    shallow_loss = model(torch.randn(4, 3, 32, 32)).expert_logits[:2].pow(2).sum()
    assert grads(model, shallow_loss) == {"stem": True, "layer1": True, "layer2": True, "layer3": False,
                                          "aligners": True, "heads": True}


def test_the_deep_branch_does_not_depend_on_the_shallow_branches():
    model = build().model.eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x).logits
    with torch.no_grad():
        for p in model.aligners.parameters():
            p.add_(1.0)
    assert torch.equal(model(x).logits, before)


def test_stages_are_ce_on_every_branch_then_balanced_softmax_on_fresh_heads_only():
    spec = build()
    model = spec.model
    first, second = spec.stages
    assert [t.name for t in first.losses] == ["ce"] and first.trainable == ("backbone", "head")
    assert [t.name for t in second.losses] == ["bsce"] and second.trainable == ("retrain_head",)
    x, y = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 3] * 2)
    model.use_head("head")
    stage1_logits = model(x).expert_logits
    optimizer = enter_stage(spec, second, RunConfig())
    backbone = [p.detach().clone() for p in model.parameter_groups()["backbone"]]
    heads = [p.detach().clone() for p in model.parameter_groups()["retrain_head"]]
    model.eval()  # BN statistics fixed, so only the optimizer could move the backbone
    for _ in range(3):
        loss = second.losses[0].fn(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(backbone, model.parameter_groups()["backbone"]))
    assert not any(torch.equal(a, b) for a, b in zip(heads, model.parameter_groups()["retrain_head"]))
    assert model.active_head == "retrain_head" and not torch.equal(model(x).expert_logits, stage1_logits)
