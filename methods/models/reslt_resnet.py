"""ResLT's CIFAR model (Cui et al., TPAMI 2023; jiequancui/ResLT `CIFAR/networks/resnet_cifar.py: ResLTResNet32`):
one ResNet-32 trunk (16/32/64), three BatchNorm "branches" H, M, T on its final 64x8x8 map, each average-pooled and
classified by one shared linear head (with bias) -> z_H, z_M, z_T; the prediction is z_H + z_M + z_T.
No ReLU after the branch BNs, as in the official forward. Its ImageNet model on the torchvision backbones:
`TorchvisionResLT`."""

from __future__ import annotations

import torch
from torch import nn

from harness.errors import HarnessError
from harness.method import LTModel, ModelOutput
from harness.methods.models.heads import LinearHead
from harness.methods.models.resnet_cifar import Stem, blocks_per_stage, init_weights, make_stage
from harness.methods.models.tv_experts import FrozenTrunk, init_like_torchvision, tv_network

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


def pool_first(block: nn.Module, maps: torch.Tensor) -> torch.Tensor:
    """The branch block on the pooled map (B, D, 1, 1) -> (B, 3D)."""
    return block(maps.mean(dim=(2, 3), keepdim=True)).flatten(1)


def block_first(block: nn.Module, maps: torch.Tensor) -> torch.Tensor:
    """The branch block at every position, then pooled -> (B, 3D)."""
    return block(maps).mean(dim=(2, 3))


# branch_order -> (rule in training, rule in evaluation). "code": the official forward with `--after_1x1conv` (every
# ImageNet-LT / iNat script passes it): per position in training, but on the pooled map in evaluation (its `else`
# branch), which is not the same function (the ReLU comes after pooling). "pool-first": the official forward without
# the flag; "block-first": the training rule in both.
BRANCH_ORDERS = {"code": (block_first, pool_first), "pool-first": (pool_first, pool_first),
                 "block-first": (block_first, block_first)}


class TorchvisionResLT(FrozenTrunk, LTModel):
    """ResLT's ImageNet model (jiequancui/ResLT `ImageNetLT/networks/reslt_imagenet.py: ResNet_ResLT`): a whole
    torchvision ResNet (stem + layer1-4, the shared trunk; ResNeXt-50 32x4d as its `resnext50_32x4d_reslt`), then the
    branch block, a 1x1 conv D -> 3D (no bias) + BN + ReLU whose three D-channel slices are the H, M, T branch
    features, and one linear head (with bias) shared by the branches -> z_H, z_M, z_T; the prediction is their sum.

    Evaluation as the official forward: the head's rows divided by ||w_c||^eval_gamma and the bias dropped (its
    `gamma`: 0.7 in the ImageNet-LT ResNeXt-50 script `sh/X50.sh`, 0.3 in the iNat ResNet-50 one, 0.5 the parser's
    default); `branch_order` as `BRANCH_ORDERS`. Init as the official: torchvision's (Kaiming fan-out) on every conv,
    the branch block's included; the head keeps PyTorch's Linear default.

    forward(x) -> ModelOutput(logits = z_H + z_M + z_T, expert_logits (3, B, C), features (3, B, D)), the contract of
    `ResLTResNet`. Groups "backbone" (trunk, branch block), "head", and "trunk" when frozen."""

    def __init__(self, *, backbone: str, num_classes: int, eval_gamma: float = 0.7, branch_order: str = "code",
                 pretrained: str | None = None, freeze: str = "none") -> None:
        super().__init__()
        if branch_order not in BRANCH_ORDERS:
            raise HarnessError(f"unknown ResLT branch_order '{branch_order}'; known: {', '.join(BRANCH_ORDERS)}")
        net = tv_network(backbone, pretrained, freeze)
        self.backbone, self.pretrained, self.num_classes = backbone, pretrained or "none", num_classes
        self.eval_gamma, self.branch_order = eval_gamma, branch_order
        self.trunk = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
                                   net.layer4)
        self.feature_dim = width = net.fc.in_features
        self.branch_block = nn.Sequential(nn.Conv2d(width, len(BRANCHES) * width, 1, bias=False),
                                          nn.BatchNorm2d(len(BRANCHES) * width), nn.ReLU(inplace=True))
        init_like_torchvision(self.branch_block)
        self.head = LinearHead(width, num_classes)
        self.freeze_trunk(freeze)

    def trunk_modules(self) -> list[nn.Module]:
        return [self.trunk]

    def architecture(self) -> dict[str, object]:
        return {"backbone": self.backbone, "experts": len(BRANCHES), "branches": "1x1conv-" + ",".join(BRANCHES),
                "branch_order": self.branch_order, "eval_gamma": self.eval_gamma, "head": type(self.head).__name__,
                "pretrained": self.pretrained, "freeze": self.freeze}

    def classifiers(self) -> list[nn.Module]:
        return [self.head] * len(BRANCHES)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return self.with_trunk_group({"backbone": [*self.trunk.parameters(), *self.branch_block.parameters()],
                                      "head": list(self.head.parameters())})

    def forward(self, x: torch.Tensor) -> ModelOutput:
        maps = self.run_trunk(self.trunk, x)
        rule = BRANCH_ORDERS[self.branch_order][0 if self.training else 1]
        features = rule(self.branch_block, maps).unflatten(1, (len(BRANCHES), -1)).transpose(0, 1)  # (3, B, D)
        if self.training:
            branch_logits = self.head(features)
        else:  # official eval: w_c / ||w_c||^gamma, no bias
            weight = self.head.weight / self.head.weight.norm(dim=1, keepdim=True).pow(self.eval_gamma)
            branch_logits = features @ weight.t()
        return ModelOutput(branch_logits.sum(dim=0), branch_logits, features)
