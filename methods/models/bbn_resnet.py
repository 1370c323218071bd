"""BBN's bilateral-branch CIFAR ResNet (Zhou et al., CVPR 2020, Sec. 3.1; megvii-research/BBN
`lib/backbone/resnet_cifar.py: BBN_ResNet_Cifar`, `lib/net/network.py`, `lib/core/combiner.py: bbn_mix`).

A shared trunk (stem, layer1, layer2, layer3 without its last block), then two copies of that last block: the
conventional branch `cb_block` and the re-balancing branch `rb_block` (BBN-ResNet-32: layer3 has 4 blocks plus the
2 branch blocks). Each branch's map is average-pooled; one linear classifier (with bias) reads the 2 x 64 features.

Training (Eq. 1 of the paper, `bbn_mix`): the batch is two views stacked view-major, (2B, C, H, W) = [uniform draw;
reversed-sampler draw] (`harness.method.View`). The trunk runs on each half separately, as the official two forward
passes do (so BN normalises each half with its own batch statistics and updates its running statistics twice per
step), the conventional branch on the first half and the re-balancing branch on the second, and the classifier reads
z = W [2 alpha f_c ; 2 (1 - alpha) f_r] + b, (B, C). alpha, the cumulative-learning weight, is a buffer set from the
epoch alone by `start_epoch` (`bbn_alpha`), so a resumed run sees the same value.

Evaluation (`lib/core/function.py: valid_model`): both branches on the same images, z = W [f_c ; f_r] + b, which is
the training mixture at alpha = 1/2.

`TorchvisionBBN` is the same on torchvision's ResNet-50 family (BBN's `bbn_res50`).
"""

from __future__ import annotations

import torch
from torch import nn

from harness.method import LTModel, ModelOutput
from harness.methods.losses_moe import bbn_alpha
from harness.methods.models.heads import LinearHead
from harness.methods.models.resnet_cifar import BasicBlock, Stem, blocks_per_stage, init_weights, make_stage
from harness.methods.models.resnet_tv import stage_width
from harness.methods.models.tv_experts import FrozenTrunk, init_like_torchvision, tv_network

WIDTHS = (16, 32, 64)
EVAL_ALPHA = 0.5  # the official test concatenates [f_c ; f_r] without weights: the mixture at alpha = 1/2


def pool(feature_map: torch.Tensor) -> torch.Tensor:
    """Global average pooling (the official `GAP` module), (B, D, H, W) -> (B, D)."""
    return feature_map.mean(dim=(2, 3))


class BilateralBranches:
    """BBN's two-branch forward and cumulative-learning weight on top of a network (list it before the network's
    class) with `trunk(x)`, `cb_block`, `rb_block`, `classifier`, `round_divisor` and an `alpha` buffer."""

    alpha: torch.Tensor
    round_divisor: bool
    training: bool
    cb_block: nn.Module
    rb_block: nn.Module
    classifier: nn.Module

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def start_epoch(self, epoch: int, epochs: int) -> None:
        self.alpha.fill_(bbn_alpha(epoch, epochs, round_divisor=self.round_divisor))

    def classifiers(self) -> list[nn.Module]:
        return [self.classifier]

    def branch_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f_c, f_r), each (B, D): in training the conventional branch on the first half of the batch and the
        re-balancing branch on the second (two trunk passes); in evaluation both branches on the whole batch."""
        if not self.training:
            shared = self.trunk(x)
            return pool(self.cb_block(shared)), pool(self.rb_block(shared))
        if len(x) % 2:
            raise ValueError(f"BBN trains on two stacked views [uniform; reversed], got an odd batch of {len(x)}; "
                             "its stage needs views=(View(sampler='reversed'),)")
        conventional, rebalancing = x.chunk(2)
        return pool(self.cb_block(self.trunk(conventional))), pool(self.rb_block(self.trunk(rebalancing)))

    def forward(self, x: torch.Tensor) -> ModelOutput:
        f_c, f_r = self.branch_features(x)
        alpha = self.alpha if self.training else EVAL_ALPHA
        mixed = 2 * torch.cat((alpha * f_c, (1 - alpha) * f_r), dim=1)  # bbn_mix; = [f_c ; f_r] at alpha = 1/2
        logits = self.classifier(mixed)
        return ModelOutput(logits=logits, expert_logits=logits[None], features=mixed[None])


class BBNResNet(BilateralBranches, LTModel):
    """BBN-ResNet of CIFAR depth 6n+2 (32: the paper's BBN-ResNet-32). The last block of the last stage is the one
    duplicated into the two branches; at depth 8 (one block per stage) that block is layer3's first, so the branches
    themselves do the stride-2 widening 32 -> 64 and the trunk's layer3 is empty."""

    def __init__(self, *, num_classes: int, shortcut: str = "B", depth: int = 32, in_channels: int = 3,
                 round_divisor: bool = True) -> None:
        super().__init__()
        blocks = blocks_per_stage(depth)
        self.num_classes, self.depth, self.shortcut, self.round_divisor = num_classes, depth, shortcut, round_divisor
        self.feature_dim = 2 * WIDTHS[2]
        self.stem = Stem(in_channels, WIDTHS[0])
        self.layer1 = make_stage(WIDTHS[0], WIDTHS[0], blocks, stride=1, option=shortcut)
        self.layer2 = make_stage(WIDTHS[0], WIDTHS[1], blocks, stride=2, option=shortcut)
        self.layer3 = (make_stage(WIDTHS[1], WIDTHS[2], blocks - 1, stride=2, option=shortcut) if blocks > 1
                       else nn.Sequential())
        branch_in, branch_stride = (WIDTHS[2], 1) if blocks > 1 else (WIDTHS[1], 2)
        self.cb_block = BasicBlock(branch_in, WIDTHS[2], branch_stride, shortcut)
        self.rb_block = BasicBlock(branch_in, WIDTHS[2], branch_stride, shortcut)
        self.apply(init_weights)  # BBN_ResNet_Cifar's `_weights_init` (Kaiming-normal convs) on the backbone only
        # Built after the init: the official classifier is a plain `nn.Linear(128, C, bias=True)` with PyTorch's
        # default init (network.py `_get_classifer`, no `_weights_init` on it).
        self.classifier = LinearHead(self.feature_dim, num_classes)
        # The cumulative-learning weight; 1 (conventional branch only) until the trainer's first start_epoch.
        self.register_buffer("alpha", torch.tensor(1.0))

    def backbone_modules(self) -> list[nn.Module]:
        return [self.stem, self.layer1, self.layer2, self.layer3, self.cb_block, self.rb_block]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"backbone": [p for m in self.backbone_modules() for p in m.parameters()],
                "head": list(self.classifier.parameters())}

    def architecture(self) -> dict[str, object]:
        # the keys every CIFAR ResNet logs (one expert, no DKF), plus BBN's two branches
        return {"depth": self.depth, "experts": 1, "dkf": False, "dkf_sources": "none",
                "head": type(self.classifier).__name__, "branches": "cb,rb"}

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer3(self.layer2(self.layer1(self.stem(x))))


class TorchvisionBBN(BilateralBranches, FrozenTrunk, LTModel):
    """BBN on ResNet-50 / ResNeXt-50 / ResNet-152 (`lib/backbone/resnet.py: bbn_res50`, the iNat 2018 model): the
    shared trunk is the torchvision network up to layer4 without its last bottleneck (stem, layer1-3, layer4's first
    blocks, the stride-2 one among them); the conventional and re-balancing branches each own a copy of that last
    bottleneck (2048 -> 512 planes -> 2048, stride 1, identity shortcut), then GAP and one linear classifier (with
    bias) on the 4,096 concatenated features. Forward, alpha and the two trunk passes in training: as `BBNResNet`.

    Init: BBN's own `bbn_res50` keeps PyTorch's default conv init (its `ResNet` applies none); torchvision's
    Kaiming fan-out init is used here for the whole network, as for the other torchvision baselines (BBN trains from
    scratch by default, `BACKBONE.PRETRAINED_MODEL: ""`). With `pretrained`, the conventional branch is the
    pretrained last bottleneck and the re-balancing branch starts as a copy of it (the official loader would copy
    nothing into `cb_block` / `rb_block`, whose names are not torchvision's). Groups: "backbone" (trunk and both
    branches), "head", and "trunk" when frozen."""

    def __init__(self, *, backbone: str, num_classes: int, round_divisor: bool = True, pretrained: str | None = None,
                 freeze: str = "none") -> None:
        super().__init__()
        net = tv_network(backbone, pretrained, freeze)
        self.backbone, self.pretrained, self.num_classes = backbone, pretrained or "none", num_classes
        self.round_divisor = round_divisor
        last = net.layer4[-1]
        self.shared = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
                                    net.layer4[:-1])
        self.cb_block = last
        width = stage_width(net.layer4)
        self.rb_block = type(last)(width, width // last.expansion, groups=net.groups, base_width=net.base_width)
        init_like_torchvision(self.rb_block)
        if pretrained:
            self.rb_block.load_state_dict(last.state_dict())
        self.feature_dim = 2 * width
        self.classifier = LinearHead(self.feature_dim, num_classes)
        self.register_buffer("alpha", torch.tensor(1.0))
        self.freeze_trunk(freeze)

    def trunk_modules(self) -> list[nn.Module]:
        return [self.shared]

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_trunk(self.shared, x)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        backbone = [*self.shared.parameters(), *self.cb_block.parameters(), *self.rb_block.parameters()]
        return self.with_trunk_group({"backbone": backbone, "head": list(self.classifier.parameters())})

    def architecture(self) -> dict[str, object]:
        return {"backbone": self.backbone, "experts": 1, "branches": "cb,rb", "head": type(self.classifier).__name__,
                "pretrained": self.pretrained, "freeze": self.freeze}
