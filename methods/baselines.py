"""Single-model baselines on the same ResNet-32: CE, plain decoupled (Table 4 row 1), balanced softmax, logit
adjustment. They share the SHIKE model builder with one expert and no DKF, so heads and shortcuts match."""

from __future__ import annotations

from collections.abc import Sequence

from harness.method import LossTerm, LossTermModule, MethodSpec, Stage, own_recipe
from harness.methods.losses import BalancedSoftmaxCE, ExpertCE, LogitAdjustedCE
from harness.methods.models.moe import build_expert_resnet
from harness.methods.recipes import LDAM, RECIPE_A, SHIKE_SINGLE, pick
from harness.methods.shike import classifier_retraining
from harness.registry import METHODS


def _one_stage(num_classes: int, term: LossTermModule, name: str, head: str, scale: float, shortcut: str,
               depth: int, recipe: str, backbone: str = "resnet32", pretrained: str = "", freeze: str = "none"):
    model = build_expert_resnet(num_classes=num_classes, experts=1, dkf=False, shortcut=shortcut, head=head,
                                scale=scale, retrain_head=False, depth=depth, backbone=backbone,
                                pretrained=pretrained or None, freeze=freeze)
    return MethodSpec(model, (Stage("end-to-end", (LossTerm(name, 1.0, term),), **pick(recipe, SHIKE_SINGLE, LDAM)),))


@METHODS.register("ce")
@own_recipe(**RECIPE_A)
def ce(*, num_classes: int, class_counts: Sequence[int], head: str = "linear", scale: float = 30.0,
       shortcut: str = "B", depth: int = 32, recipe: str = "shike", backbone: str = "resnet32", pretrained: str = "",
       freeze: str = "none") -> MethodSpec:
    """Plain ResNet-32 with instance-balanced cross-entropy, one stage (the whole budget, 200 epochs by default).
    backbone, pretrained, freeze: the network (`build_expert_resnet`; "resnet32" is the CIFAR one)."""
    return _one_stage(num_classes, ExpertCE(), "ce", head, scale, shortcut, depth, recipe, backbone, pretrained,
                      freeze)


@METHODS.register("bsce")
@own_recipe(**RECIPE_A)
def bsce(*, num_classes: int, class_counts: Sequence[int], head: str = "linear", scale: float = 30.0,
         shortcut: str = "B", depth: int = 32, recipe: str = "shike", backbone: str = "resnet32",
         pretrained: str = "", freeze: str = "none") -> MethodSpec:
    """Balanced softmax (Ren et al., NeurIPS 2020; SHIKE Eq. 11) end to end, one stage."""
    return _one_stage(num_classes, BalancedSoftmaxCE(class_counts), "bsce", head, scale, shortcut, depth,
                      recipe, backbone, pretrained, freeze)


@METHODS.register("la")
@own_recipe(**RECIPE_A)
def la(*, num_classes: int, class_counts: Sequence[int], tau: float = 1.0, head: str = "linear", scale: float = 30.0,
       shortcut: str = "B", depth: int = 32, recipe: str = "shike", backbone: str = "resnet32", pretrained: str = "",
       freeze: str = "none") -> MethodSpec:
    """Logit-adjusted loss (Menon et al., ICLR 2021), one stage; tau = 1 by default."""
    return _one_stage(num_classes, LogitAdjustedCE(class_counts, tau=tau), "la", head, scale, shortcut, depth,
                      recipe, backbone, pretrained, freeze)


@METHODS.register("plain")
@own_recipe()
def plain(*, num_classes: int, class_counts: Sequence[int], head: str = "linear", scale: float = 30.0,
          shortcut: str = "B", freeze_bn_stage2: bool = False, depth: int = 32, backbone: str = "resnet32",
          pretrained: str = "", freeze: str = "none") -> MethodSpec:
    """SHIKE Table 4 row 1: a plain ResNet-32 trained with CE, then a fresh classifier re-trained with balanced
    softmax on the frozen backbone (decoupled training, as every row of the table). backbone: "resnet32" or a
    torchvision ResNet-50-family name (Table 5's single model), with pretrained / freeze (`build_expert_resnet`)."""
    model = build_expert_resnet(num_classes=num_classes, experts=1, dkf=False, shortcut=shortcut, head=head,
                                scale=scale, depth=depth, backbone=backbone, pretrained=pretrained or None,
                                freeze=freeze)
    representation = Stage("representation", (LossTerm("ce", 1.0, ExpertCE()),), epochs=180, peak_lr=0.15)
    return MethodSpec(model, (representation, classifier_retraining(class_counts, freeze_bn_stage2)))
