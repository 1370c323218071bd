"""ResLT (Cui et al., TPAMI 2023, "ResLT: Residual Learning for Long-Tailed Recognition"; jiequancui/ResLT): one
ResNet-32 trunk, three BN branches H / M / T sharing a linear head (`harness.methods.models.reslt_resnet`), trained
with `harness.methods.losses_moe.reslt_loss`: beta * (per-branch CE over its class group, normalised by the total
group membership) + (1 - beta) * CE(z_H + z_M + z_T). Groups are class-index cuts: H all classes, M = ids >= c1,
T = ids >= c2 in the classes ranked by decreasing count (the CIFAR builders' ids already are; other lists are
ranked by the loss, as the official ImageNet loader relabels them). On the torchvision backbones the network is
the official ImageNet one (`reslt_resnet.TorchvisionResLT`).

Group cuts: 35 / 70 on CIFAR-100 (`cifarTrain_reslt_cifar100.py`). For another class count C the harness scales
them, c = round(0.35 C), round(0.70 C), halves rounded up (4 / 7 on 10 classes); the official CIFAR-10 script
instead uses 2 / 4 (`--set method.group_cuts=2,4`).

recipe "shike": SHIKE's 200 epochs and warm-up + cosine. "own" (`CIFAR/sh/CIFAR100/*_beta0.9950.sh` and the
script's `lr_schedule_multistep`): 200 epochs, batch 128, lr 0.1, weight decay 5e-4, 5-epoch warm-up, x0.1 from
epoch 160 and x0.01 from 180, crop + flip, zero-padding shortcuts. Differences kept: the official warm-up starts
at lr / 3 (the harness's step schedule ramps (e + 1) / 5 from 0) and its SGD is Nesterov.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from harness.errors import HarnessError
from harness.method import LossTerm, LossTermModule, LTModel, MethodSpec, ModelOutput, Stage, own_recipe
from harness.methods.losses_moe import reslt_loss
from harness.methods.models.reslt_resnet import ResLTResNet, TorchvisionResLT
from harness.methods.models.resnet_tv import TV_BACKBONES
from harness.methods.models.tv_experts import network_for, refuse_torchvision_switches
from harness.methods.recipes import SHIKE_SINGLE, pick
from harness.registry import METHODS

CUT_PERCENT = (35, 70)  # CIFAR-100's cuts, as a share of the classes
EVAL_GAMMA = 0.7  # ImageNet-LT ResNeXt-50 script (`ImageNetLT/sh/X50.sh`, --gamma 0.7)
RESLT_OWN = {"epochs": 200, "peak_lr": 0.1, "schedule": "step", "warmup_epochs": 5,
             "lr_steps": ((0.8, 0.1), (0.9, 0.01))}


def reslt_group_cuts(num_classes: int, text: str = "") -> tuple[int, int]:
    """"" -> CIFAR-100's 35 / 70 scaled to `num_classes` (round half up, in integers); "c1,c2" -> those cuts."""
    if not text.strip():
        return tuple((p * num_classes + 50) // 100 for p in CUT_PERCENT)  # type: ignore[return-value]
    try:
        first, second = (int(part) for part in text.split(","))
    except ValueError:
        raise HarnessError(f"method.group_cuts expects two class ids 'c1,c2' (e.g. 35,70), got '{text}'") from None
    if not 0 <= first <= second <= num_classes:
        raise HarnessError(f"method.group_cuts needs 0 <= c1 <= c2 <= {num_classes} classes, got '{text}'")
    return first, second


class ResLTLoss(LossTermModule):
    """`reslt_loss` on `out.expert_logits` = (z_H, z_M, z_T): beta * L_group + (1 - beta) * CE(sum) (Eq. 6-8).

    The groups are cuts in the classes ranked by decreasing training count. With `class_counts` not sorted that
    way (ImageNet-LT's, iNat's and Places-LT's list labels), the logit columns and the labels are permuted to that
    rank first, as the official ImageNet / iNat loader relabels classes by count (`ImageNetLT/datasets/dataset.py`,
    `class_map` from an argsort of the counts); CE is the same under a permutation of both. Sorted counts (every
    CIFAR builder) leave everything as it was: no permutation, no buffer."""

    order: torch.Tensor
    rank: torch.Tensor

    def __init__(self, beta: float, cuts: tuple[int, int], class_counts: Sequence[int] = ()) -> None:
        super().__init__()
        self.beta, self.cuts = beta, cuts
        order = sorted(range(len(class_counts)), key=lambda c: -class_counts[c])  # stable: ties keep id order
        self.ranked = order != sorted(order)
        if self.ranked:
            self.register_buffer("order", torch.tensor(order))
            self.register_buffer("rank", torch.argsort(self.order))

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        logits = out.expert_logits
        if self.ranked:
            logits, target = logits[..., self.order], self.rank[target]
        return reslt_loss(logits, target, beta=self.beta, group_cuts=self.cuts)


def _cifar_network(*, num_classes: int, depth: int, shortcut: str, eval_gamma: float, branch_order: str,
                   backbone: str, pretrained: str, freeze: str) -> ResLTResNet:
    """ResLT's CIFAR ResNet-32 with three BN branches (`reslt_resnet.ResLTResNet`)."""
    refuse_torchvision_switches(pretrained, freeze, eval_gamma=(eval_gamma, EVAL_GAMMA),
                                branch_order=(branch_order, "code"))
    return ResLTResNet(num_classes=num_classes, depth=depth, shortcut=shortcut)


def _torchvision_network(*, num_classes: int, eval_gamma: float, branch_order: str, backbone: str, pretrained: str,
                         freeze: str, **cifar_only: object) -> TorchvisionResLT:
    """ResLT's ImageNet network (`reslt_resnet.TorchvisionResLT`): the whole ResNet shared, a 1x1 conv branch block
    D -> 3D, one linear head; `depth` and `shortcut` are CIFAR knobs and do not apply."""
    return TorchvisionResLT(backbone=backbone, num_classes=num_classes, eval_gamma=eval_gamma,
                            branch_order=branch_order, pretrained=pretrained or None, freeze=freeze)


# backbone name -> ResLT's network on it
NETWORKS: dict[str, Callable[..., LTModel]] = {"resnet32": _cifar_network,
                                               **dict.fromkeys(TV_BACKBONES, _torchvision_network)}


@METHODS.register("reslt")
@own_recipe(optim__batch_size=128, optim__weight_decay=5e-4, optim__lr=0.1, data__augment="basic",
            method__shortcut="A")
def reslt(*, num_classes: int, class_counts: Sequence[int], recipe: str = "shike", reslt_beta: float = 0.995,
          group_cuts: str = "", shortcut: str = "B", depth: int = 32, backbone: str = "resnet32",
          pretrained: str = "", freeze: str = "none", eval_gamma: float = EVAL_GAMMA,
          branch_order: str = "code") -> MethodSpec:
    """ResLT ("3E" in SHIKE's table: the three branches). reslt_beta: 0.995 as the IF-100 script (0.99 at IF 50,
    0.72 at IF 10; ImageNet-LT X50 0.99, iNat R50 0.85). group_cuts: "" scales CIFAR-100's 35,70 to the class
    count, or "c1,c2" explicitly, in classes ranked by decreasing count (the official ImageNet-LT cuts are 175,780;
    iNat's, two groups, 1542,8142). backbone: "resnet32" (CIFAR) or resnet50 / resnext50_32x4d / resnet152
    (`NETWORKS`); for those only: pretrained, freeze, eval_gamma (the head's rows / ||w||^gamma at evaluation,
    bias dropped: 0.7 ImageNet-LT, 0.3 iNat) and branch_order ("code" | "pool-first" | "block-first")."""
    cuts = reslt_group_cuts(num_classes, group_cuts)
    model = network_for("reslt", NETWORKS, backbone)(
        num_classes=num_classes, depth=depth, shortcut=shortcut, eval_gamma=eval_gamma, branch_order=branch_order,
        backbone=backbone, pretrained=pretrained, freeze=freeze)
    term = LossTerm("reslt", 1.0, ResLTLoss(reslt_beta, cuts, class_counts))
    return MethodSpec(model, (Stage("end-to-end", (term,), **pick(recipe, SHIKE_SINGLE, RESLT_OWN)),))

