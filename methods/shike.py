"""SHIKE (Jin et al., CVPR 2023): MoE ResNet with Depth-wise Knowledge Fusion, trained with per-expert CE,
Dynamic Knowledge Transfer (L_nt) and mutual distillation (L_mu), then a balanced-softmax classifier re-training.
Every component is a switch, so the Table 4 ablation rows are this builder with switches turned off."""

from __future__ import annotations

from collections.abc import Sequence

from harness.method import LossTerm, MethodSpec, Stage, own_recipe
from harness.methods.losses import DKT, BalancedSoftmaxCE, ExpertCE, MutualKL
from harness.methods.models.moe import build_expert_resnet
from harness.registry import METHODS


def parse_sources(text: str) -> tuple[int, ...] | None:
    """"1,2,1" -> (1, 2, 1): which shallow stage (layer1 / layer2) each expert fuses; "" -> the official cycle."""
    return tuple(int(part) for part in text.split(",")) if text.strip() else None


def classifier_retraining(class_counts: Sequence[int], freeze_bn: bool) -> Stage:
    """Stage 2 (paper Eq. 11): fresh heads on the frozen model, balanced softmax per expert, summed; no KD.
    The official code keeps BN in train mode here (running statistics keep updating); freeze_bn turns that off."""
    bsce = LossTerm("bsce", 1.0, BalancedSoftmaxCE(class_counts))
    # official: 20 epochs, warm-up then cosine from a peak of 0.1 (cifarTrain.py:113-120)
    return Stage("classifier", (bsce,), epochs=20, peak_lr=0.1, trainable=("retrain_head",), head="retrain_head",
                 freeze_bn=freeze_bn)


@METHODS.register("shike")
@own_recipe()  # SHIKE's own recipe is the official code's: `--preset own` is shike-code
def shike(
    *,
    num_classes: int,
    class_counts: Sequence[int],
    experts: int = 3,
    dkf: bool = True,
    l_mu: bool = True,
    l_nt: bool = True,
    alpha: float = 0.1,
    beta: float = 0.01,
    kl_reduction: str = "batchmean",
    dkt_variant: str = "code",
    detach: bool = False,
    head: str = "cosine",
    scale: float = 30.0,
    shortcut: str = "B",
    dkf_sources: str = "",
    align_relu: str = "code",
    freeze_bn_stage2: bool = False,
    depth: int = 32,
    backbone: str = "resnet32",
    arrangement: str = "",
    pretrained: str = "",
    freeze: str = "none",
    split: str = "layer4",
    dkf_align: str = "conv3x3",
) -> MethodSpec:
    """SHIKE. Stage 1 (Eq. 10): sum_m CE(z^m, y) + alpha * L_nt + beta * L_mu; stage 2: Eq. 11.

    alpha weights DKT (L_nt, Eq. 5-9) and beta mutual KL (L_mu, Eq. 4), in the units of `kl_reduction`:
    batchmean (per sample; official = 0.1 / 0.01 on CIFAR-100) or mean (official literal: 10 / 1, over B*C).
    depth: the CIFAR ResNet depth of each expert's trunk (32 official; 8/14/20 for quick CPU runs).
    backbone: "resnet32" (CIFAR, official) or resnet50 | resnext50_32x4d | resnet152 (torchvision, Tables 2, 3, 5);
    arrangement: Table 5's depth string ("ABC", "ABCA", ...; sets the expert count); pretrained: "" (random),
    a torchvision state-dict path or "torchvision"; freeze: "none" | "trunk" (Places-LT); split, dkf_align: where
    the experts start and the aligner design (`build_expert_resnet`).
    A switched-off component is absent from the objective, not multiplied by zero.
    """
    model = build_expert_resnet(num_classes=num_classes, experts=experts, dkf=dkf, shortcut=shortcut, head=head,
                                scale=scale, dkf_sources=parse_sources(dkf_sources), align_relu=align_relu, depth=depth,
                                backbone=backbone, arrangement=arrangement, pretrained=pretrained or None,
                                freeze=freeze, split=split, dkf_align=dkf_align)
    terms = [LossTerm("ce", 1.0, ExpertCE())]
    if l_nt and alpha > 0:
        terms.append(LossTerm("nt", alpha, DKT(variant=dkt_variant, reduction=kl_reduction, detach=detach)))
    if l_mu and beta > 0 and model.num_experts > 1:  # an arrangement sets the expert count
        terms.append(LossTerm("mu", beta, MutualKL(reduction=kl_reduction, detach=detach)))
    representation = Stage("representation", tuple(terms), epochs=180, peak_lr=0.15)  # cifarTrain.py:105-112
    return MethodSpec(model, (representation, classifier_retraining(class_counts, freeze_bn_stage2)))
