"""ResLT's CIFAR model (Cui et al., TPAMI 2023; jiequancui/ResLT `CIFAR/networks/resnet_cifar.py: ResLTResNet32`):
one ResNet-32 trunk (16/32/64), three BatchNorm "branches" H, M, T on its final 64x8x8 map, each average-pooled and
classified by one shared linear head (with bias) -> z_H, z_M, z_T; the prediction is z_H + z_M + z_T.
No ReLU after the branch BNs, as in the official forward."""

from __future__ import annotations

import torch
from torch import nn

from harness.method import LTModel, ModelOutput
from harness.methods.models.heads import LinearHead
from harness.methods.models.resnet_cifar import Stem, blocks_per_stage, init_weights, make_stage

WIDTHS = (16, 32, 64)
BRANCHES = ("H", "M", "T")  # head (all classes), medium + tail, tail


class ResLTResNet(LTModel):
    """forward(x) -> ModelOutput(logits = z_H + z_M + z_T, expert_logits (3, B, C) = (z_H, z_M, z_T), features
    (3, B, 64) the pooled branch maps). Groups: "backbone" (trunk and the three branch BNs), "head" (the linear).

    Initialisation as the official: Kaiming on the trunk's convs (`ResNet_Cifar` applies `_weights_init`), while
    the branch BNs and the linear head keep PyTorch's defaults (`ResLTResNet32` never applies it)."""

    def __init__(self, *, num_classes: int, depth: int = 32, shortcut: str = "B", in_channels: int = 3) -> None:
        super().__init__()
        blocks = blocks_per_stage(depth)
        self.num_classes, self.depth = num_classes, depth
        self.trunk = nn.Sequential(
            Stem(in_channels, WIDTHS[0]),
            make_stage(WIDTHS[0], WIDTHS[0], blocks, stride=1, option=shortcut),
            make_stage(WIDTHS[0], WIDTHS[1], blocks, stride=2, option=shortcut),
            make_stage(WIDTHS[1], WIDTHS[2], blocks, stride=2, option=shortcut),
        )
        self.trunk.apply(init_weights)
        self.branches = nn.ModuleList(nn.BatchNorm2d(WIDTHS[2]) for _ in BRANCHES)
        self.head = LinearHead(WIDTHS[2], num_classes)

    def architecture(self) -> dict[str, object]:
        return {"depth": self.depth, "experts": len(BRANCHES), "branches": "BN-" + ",".join(BRANCHES),
                "widths": ",".join(map(str, WIDTHS)), "head": type(self.head).__name__}

    def classifiers(self) -> list[nn.Module]:
        """One per branch, as the contract asks: the same shared linear head three times."""
        return [self.head] * len(BRANCHES)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"backbone": [*self.trunk.parameters(), *self.branches.parameters()],
                "head": list(self.head.parameters())}

    def forward(self, x: torch.Tensor) -> ModelOutput:
        trunk = self.trunk(x)
        features = torch.stack([bn(trunk).mean(dim=(2, 3)) for bn in self.branches])
        branch_logits = self.head(features)
        return ModelOutput(branch_logits.sum(dim=0), branch_logits, features)
