"""BBN (Zhou et al., CVPR 2020, "Bilateral-Branch Network with Cumulative Learning"; megvii-research/BBN): a shared
CIFAR ResNet trunk with a conventional and a re-balancing branch (`harness.methods.models.bbn_resnet`). Every step
draws a second, independent batch from the reversed sampler (p_c proportional to 1 / n_c, `View(sampler="reversed")`);
the conventional branch sees the uniform batch, the re-balancing branch the reversed one, and one classifier reads
[2 alpha f_c ; 2 (1 - alpha) f_r]. The loss (Eq. 2) is alpha CE(z, y_c) + (1 - alpha) CE(z, y_r) with the parabolic
cumulative-learning weight alpha = 1 - (epoch / T)^2 (Eq. 1, `bbn_alpha`). Inference uses both branches on the same
image, [f_c ; f_r] (alpha = 1/2).

recipe "shike": SHIKE's 200 epochs and schedule. "own" (`configs/cifar100.yaml`): 200 epochs, batch 128, lr 0.1,
weight decay 2e-4, 5 warm-up epochs, x0.01 at epoch 120 and again at 160 (lr 1e-3, then 1e-5), crop + flip,
zero-padding shortcuts (`resnet_cifar.py` BasicBlock's default option "A"), no pre-training. The shipped config is
IF 50 (`RATIO: 0.02`); the harness runs whatever `--if` says. On the torchvision backbones the network is
`bbn_resnet.TorchvisionBBN` (BBN's `bbn_res50`; its iNat 2018 config: batch 128, lr 0.05, wd 1e-4, 180 epochs, x0.1
at 120 and 160, from scratch; not an `own` recipe here, the large-scale presets give SHIKE's schedule).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from harness.method import LossTerm, LossTermModule, LTModel, MethodSpec, ModelOutput, Stage, View, own_recipe
from harness.methods.losses_moe import bbn_alpha, bbn_mixed_loss
from harness.methods.models.bbn_resnet import BBNResNet, TorchvisionBBN
from harness.methods.models.resnet_tv import TV_BACKBONES
from harness.methods.models.tv_experts import network_for, refuse_torchvision_switches
from harness.methods.recipes import SHIKE_SINGLE, pick
from harness.registry import METHODS

# The official WarmupMultiStepLR is stepped at the start of each 1-based epoch, so its milestones 120 and 160 (gamma
# 0.01) already apply to 1-based epochs 120 and 160, i.e. 0-based epochs 119 and 159 of 200; the step schedule's
# factors are absolute (0.01, then 0.01^2).
BBN_STEPS = ((119 / 200, 0.01), (159 / 200, 1e-4))
BBN_OWN = {"epochs": 200, "peak_lr": 0.1, "schedule": "step", "warmup_epochs": 5, "lr_steps": BBN_STEPS}


class BBNLoss(LossTermModule):
    """BBN's bilateral loss (Eq. 2, `bbn_mix`): alpha CE(z, y_c) + (1 - alpha) CE(z, y_r), both batch means, on the
    labels of the two stacked views, target = [y_c ; y_r] (2B,), and the model's mixed logits z (B, C).

    alpha is this term's own buffer, set by `start_epoch` with the same function of the epoch as the model's
    (`BBNResNet.start_epoch`), so the loss never reads the model's state."""

    def __init__(self, round_divisor: bool = True) -> None:
        super().__init__()
        self.round_divisor = round_divisor
        self.register_buffer("alpha", torch.tensor(1.0))

    def start_epoch(self, epoch: int, epochs: int) -> None:
        self.alpha.fill_(bbn_alpha(epoch, epochs, round_divisor=self.round_divisor))

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        if len(target) != 2 * len(out.logits):
            raise ValueError(f"BBN's loss needs the labels of two stacked views, [y_c; y_r] ({2 * len(out.logits)},), "
                             f"got {len(target)}; its stage needs views=(View(sampler='reversed'),)")
        conventional, rebalancing = target.chunk(2)
        return bbn_mixed_loss(out.logits, conventional, rebalancing, self.alpha.to(out.logits.dtype))


def _cifar_network(*, num_classes: int, depth: int, shortcut: str, round_divisor: bool, backbone: str,
                   pretrained: str, freeze: str) -> BBNResNet:
    """BBN-ResNet-32 (`bbn_resnet.BBNResNet`): layer3's last block duplicated into the two branches."""
    refuse_torchvision_switches(pretrained, freeze)
    return BBNResNet(num_classes=num_classes, shortcut=shortcut, depth=depth, round_divisor=round_divisor)


def _torchvision_network(*, num_classes: int, round_divisor: bool, backbone: str, pretrained: str, freeze: str,
                         **cifar_only: object) -> TorchvisionBBN:
    """BBN's `bbn_res50` on the torchvision backbone (`bbn_resnet.TorchvisionBBN`): layer4's last bottleneck
    duplicated into the two branches; `depth` and `shortcut` are CIFAR knobs and do not apply."""
    return TorchvisionBBN(backbone=backbone, num_classes=num_classes, round_divisor=round_divisor,
                          pretrained=pretrained or None, freeze=freeze)


# backbone name -> BBN's network on it
NETWORKS: dict[str, Callable[..., LTModel]] = {"resnet32": _cifar_network,
                                               **dict.fromkeys(TV_BACKBONES, _torchvision_network)}


@METHODS.register("bbn")
@own_recipe(optim__batch_size=128, optim__weight_decay=2e-4, optim__lr=0.1, data__augment="basic",
            method__shortcut="A")
def bbn(*, num_classes: int, class_counts: Sequence[int], recipe: str = "shike", depth: int = 32,
        shortcut: str = "B", round_divisor: bool = True, backbone: str = "resnet32", pretrained: str = "",
        freeze: str = "none") -> MethodSpec:
    """BBN: BBN-ResNet (`depth` 32: layer3 = 4 blocks + the two branch blocks), the reversed sampler as a second view
    of every batch, cumulative learning alpha = 1 - (epoch / T)^2 in both the model and the loss. `round_divisor`:
    T is the stage length, but 90 and 180 round up to 100 and 200 as the official `Combiner` does.
    backbone: "resnet32" (CIFAR) or resnet50 / resnext50_32x4d / resnet152 (`NETWORKS`: BBN-ResNet-50, the iNat
    model, from scratch by default); pretrained and freeze apply to the torchvision ones."""
    model = network_for("bbn", NETWORKS, backbone)(
        num_classes=num_classes, depth=depth, shortcut=shortcut, round_divisor=round_divisor, backbone=backbone,
        pretrained=pretrained, freeze=freeze)
    term = LossTerm("bbn", 1.0, BBNLoss(round_divisor=round_divisor))
    stage = Stage("end-to-end", (term,), views=(View(sampler="reversed"),), **pick(recipe, SHIKE_SINGLE, BBN_OWN))
    return MethodSpec(model, (stage,))
