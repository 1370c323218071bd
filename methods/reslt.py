"""ResLT (Cui et al., TPAMI 2023, "ResLT: Residual Learning for Long-Tailed Recognition"; jiequancui/ResLT): one
ResNet-32 trunk, three BN branches H / M / T sharing a linear head (`harness.methods.models.reslt_resnet`), trained
with `harness.methods.losses_moe.reslt_loss`: beta * (per-branch CE over its class group, normalised by the total
group membership) + (1 - beta) * CE(z_H + z_M + z_T). Groups are class-index cuts: H all classes, M = ids >= c1,
T = ids >= c2, so class ids must be sorted by decreasing count (every harness LT builder is).

Group cuts: 35 / 70 on CIFAR-100 (`cifarTrain_reslt_cifar100.py`). For another class count C the harness scales
them, c = round(0.35 C), round(0.70 C), halves rounded up (4 / 7 on 10 classes); the official CIFAR-10 script
instead uses 2 / 4 (`--set method.group_cuts=2,4`).

recipe "shike": SHIKE's 200 epochs and warm-up + cosine. "own" (`CIFAR/sh/CIFAR100/*_beta0.9950.sh` and the
script's `lr_schedule_multistep`): 200 epochs, batch 128, lr 0.1, weight decay 5e-4, 5-epoch warm-up, x0.1 from
epoch 160 and x0.01 from 180, crop + flip, zero-padding shortcuts. Differences kept: the official warm-up starts
at lr / 3 (the harness's step schedule ramps (e + 1) / 5 from 0) and its SGD is Nesterov.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from harness.errors import HarnessError
from harness.method import LossTerm, LossTermModule, MethodSpec, ModelOutput, Stage, own_recipe
from harness.methods.losses_moe import reslt_loss
from harness.methods.models.moe import require_cifar_backbone
from harness.methods.models.reslt_resnet import ResLTResNet
from harness.methods.recipes import SHIKE_SINGLE, pick
from harness.registry import METHODS

CUT_PERCENT = (35, 70)  # CIFAR-100's cuts, as a share of the classes
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
    """`reslt_loss` on `out.expert_logits` = (z_H, z_M, z_T): beta * L_group + (1 - beta) * CE(sum) (Eq. 6-8)."""

    def __init__(self, beta: float, cuts: tuple[int, int]) -> None:
        super().__init__()
        self.beta, self.cuts = beta, cuts

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        return reslt_loss(out.expert_logits, target, beta=self.beta, group_cuts=self.cuts)


@METHODS.register("reslt")
@own_recipe(optim__batch_size=128, optim__weight_decay=5e-4, optim__lr=0.1, data__augment="basic",
            method__shortcut="A")
def reslt(*, num_classes: int, class_counts: Sequence[int], recipe: str = "shike", reslt_beta: float = 0.995,
          group_cuts: str = "", shortcut: str = "B", depth: int = 32, backbone: str = "resnet32") -> MethodSpec:
    """ResLT ("3E" in SHIKE's table: the three branches). reslt_beta: 0.995 as the IF-100 script (0.99 at IF 50,
    0.72 at IF 10). group_cuts: "" scales CIFAR-100's 35,70 to the class count, or "c1,c2" explicitly."""
    require_cifar_backbone("reslt", backbone)
    if any(a < b for a, b in zip(class_counts, class_counts[1:])):
        raise HarnessError("ResLT's groups are class-id cuts: it needs classes sorted by decreasing training count")
    cuts = reslt_group_cuts(num_classes, group_cuts)
    model = ResLTResNet(num_classes=num_classes, depth=depth, shortcut=shortcut)
    term = LossTerm("reslt", 1.0, ResLTLoss(reslt_beta, cuts))
    return MethodSpec(model, (Stage("end-to-end", (term,), **pick(recipe, SHIKE_SINGLE, RESLT_OWN)),))

