"""NCL's three complete networks: nothing shared, logits stacked as the K networks and averaged for inference, and
the method's loss is NIL + NBOD over them (golden values for the loss itself: tests/methods/test_moe_losses.py)."""

from __future__ import annotations

import torch

from harness.methods.losses_moe import ncl_loss
from harness.methods.models.moe import build_expert_resnet
from harness.registry import METHODS

COUNTS = (40, 20, 10, 5)


def test_three_networks_share_nothing_and_infer_with_their_mean():
    spec = METHODS.get("ncl")(num_classes=4, class_counts=COUNTS, depth=8)
    model = spec.model
    single = sum(p.numel() for p in build_expert_resnet(num_classes=4, experts=1, dkf=False, head="linear",
                                                        retrain_head=False, depth=8).parameters())
    assert sum(p.numel() for p in model.parameters()) == 3 * single
    ids = [{id(p) for p in network.parameters()} for network in model.networks]
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2])
    model.eval()
    x = torch.randn(5, 3, 32, 32)
    out = model(x)
    alone = torch.stack([network(x).logits for network in model.networks])
    assert out.expert_logits.shape == (3, 5, 4) and torch.allclose(out.expert_logits, alone)
    assert torch.allclose(out.logits, alone.mean(dim=0))
    target = torch.tensor([0, 1, 2, 3, 0])
    term = spec.stages[0].losses[0].fn
    assert torch.allclose(term(out, target), ncl_loss(out.expert_logits, target, COUNTS))


def test_ncl_builds_its_own_recipe():
    stage = METHODS.get("ncl")(num_classes=4, class_counts=COUNTS, recipe="own", depth=8).stages[0]
    assert (stage.epochs, stage.peak_lr, stage.schedule, stage.lr_steps) == (400, 0.1, "step", ((0.8, 0.1), (0.9, 0.01)))
