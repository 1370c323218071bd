"""Re-weighting and re-margining baselines on one CIFAR ResNet: Focal (Lin et al., ICCV 2017), Class-Balanced loss
(Cui et al., CVPR 2019), LDAM-DRW (Cao et al., NeurIPS 2019), LADE (Hong et al., CVPR 2021), GCL (Li et al., CVPR
2022) and Weight Balancing (Alshammari et al., CVPR 2022). Loss equations: `methods/losses_lt.py`.

recipe "shike" (default): every method on SHIKE's schedule (200 epochs, or 180 + 20 for the two-stage GCL and WB).
recipe "own" (`--preset own`): the method's published CIFAR-100-LT recipe, as its builder's `own_recipe` and
stage values say (each from baselines.md); where the harness's backbone differs from the method's (LADE's 128-d
BBN ResNet-32, WB's ResNet-34), the harness keeps its CIFAR ResNet, so parameter counts stay comparable.
Switch names never reuse SHIKE's (`alpha`, `beta`): the presets set those for every builder that has them, which
would silently give CB a beta of 0.01 (`cb_beta`, `lade_alpha`; tests/harness/test_contract.py guards it).
"""

from __future__ import annotations

from collections.abc import Sequence

from harness.method import LossTerm, LossTermModule, MethodSpec, Stage, own_recipe
from harness.methods.constraints import MaxNorm
from harness.methods.losses import ExpertCE
from harness.methods.losses_lt import CBSoftmaxBCE, ClassBalancedCE, FocalLoss, GCLLoss, LADELoss, LDAMLoss
from harness.methods.models.moe import build_expert_resnet
from harness.methods.recipes import LDAM, RECIPE_A, SHIKE_CLASSIFIER, SHIKE_REPRESENTATION, SHIKE_SINGLE, cosine, pick
from harness.registry import METHODS

LOSS_BASES = ("ce", "focal")


def _single(num_classes: int, name: str, term: LossTermModule, recipe: str, *, head: str, shortcut: str,
            depth: int, own: dict | None = None, scale: float = 30.0, backbone: str = "resnet32",
            pretrained: str = "", freeze: str = "none") -> MethodSpec:
    """backbone, pretrained, freeze: every builder's network switches (`build_expert_resnet`; "" = random init)."""
    model = build_expert_resnet(num_classes=num_classes, experts=1, dkf=False, shortcut=shortcut, head=head,
                                scale=scale, retrain_head=False, depth=depth, backbone=backbone,
                                pretrained=pretrained or None, freeze=freeze)
    return MethodSpec(model, (Stage("end-to-end", (LossTerm(name, 1.0, term),),
                                    **pick(recipe, SHIKE_SINGLE, own or LDAM)),))


@METHODS.register("focal")
@own_recipe(**RECIPE_A)
def focal(*, num_classes: int, class_counts: Sequence[int], recipe: str = "shike", gamma: float = 1.0,
          shortcut: str = "B", depth: int = 32,
          backbone: str = "resnet32", pretrained: str = "", freeze: str = "none") -> MethodSpec:
    """Softmax focal loss -(1 - p_y)^gamma log p_y (Lin et al. 2017, Eq. 5 without alpha), gamma = 1 as the
    LDAM-DRW code's focal baseline; linear head."""
    return _single(num_classes, "focal", FocalLoss(gamma), recipe, head="linear", shortcut=shortcut, depth=depth,
                   backbone=backbone, pretrained=pretrained, freeze=freeze)


@METHODS.register("cb")
@own_recipe(**RECIPE_A)
def cb(*, num_classes: int, class_counts: Sequence[int], recipe: str = "shike", loss: str = "focal",
       cb_beta: float = 0.9999, gamma: float = 1.0, shortcut: str = "B", depth: int = 32,
       backbone: str = "resnet32", pretrained: str = "", freeze: str = "none") -> MethodSpec:
    """Class-balanced loss (Cui et al. 2019, Eq. 2-4): weights (1 - beta) / (1 - beta^n_c), summing to C, on softmax
    CE (`loss=ce`) or focal (`loss=focal`, the official script's beta 0.9999, gamma 1); per-sample weights averaged
    over the batch, as the official TF code."""
    if loss not in LOSS_BASES:
        raise ValueError(f"unknown cb loss '{loss}'; known: {', '.join(LOSS_BASES)}")
    term = (FocalLoss(gamma, class_counts, cb_beta) if loss == "focal"
            else ClassBalancedCE(class_counts, cb_beta, reduction="batchmean"))
    return _single(num_classes, f"cb_{loss}", term, recipe, head="linear", shortcut=shortcut, depth=depth,
                   backbone=backbone, pretrained=pretrained, freeze=freeze)


@METHODS.register("ldam-drw")
@own_recipe(**RECIPE_A)
def ldam_drw(*, num_classes: int, class_counts: Sequence[int], recipe: str = "shike", max_margin: float = 0.5,
             scale: float = 30.0, drw: bool = True, drw_beta: float = 0.9999, shortcut: str = "B",
             depth: int = 32, backbone: str = "resnet32", pretrained: str = "", freeze: str = "none") -> MethodSpec:
    """LDAM (Cao et al. 2019, Eq. 13): CE(s (cos - m_y e_y)) with m_c proportional to n_c^-1/4, max m = 0.5,
    s = 30, cosine head; DRW (Alg. 1): class weights CB(0.9999) from 80 % of the stage (epoch 160 of 200),
    PyTorch's weighted mean as the official `F.cross_entropy(weight=)`."""
    term = LDAMLoss(class_counts, max_margin=max_margin, scale=scale, drw_beta=drw_beta,
                    drw_start=0.8 if drw else None, reduction="weighted")
    return _single(num_classes, "ldam", term, recipe, head="cosine", scale=scale, shortcut=shortcut, depth=depth,
                   backbone=backbone, pretrained=pretrained, freeze=freeze)


LADE_STEPS = ((0.6, 0.01), (0.8, 1e-4))


@METHODS.register("lade")
@own_recipe(optim__batch_size=256, optim__weight_decay=5e-4, optim__lr=0.2, data__augment="basic",
            method__shortcut="A")
def lade(*, num_classes: int, class_counts: Sequence[int], recipe: str = "shike", lade_alpha: float = 0.1,
         remine_lambda: float = 0.01, shortcut: str = "B", depth: int = 32,
         backbone: str = "resnet32", pretrained: str = "", freeze: str = "none") -> MethodSpec:
    """LADE (Hong et al. 2021, Eq. 11-13): balanced softmax (PriorCE) + alpha * L_LADER on the same linear head;
    CIFAR alpha 0.1, lambda 0.01. Own recipe: batch 256, lr 0.2, warm-up 5, x0.01 at 60 % and x1e-4 at 80 %."""
    own = {"epochs": 200, "peak_lr": 0.2, "schedule": "step", "warmup_epochs": 5, "lr_steps": LADE_STEPS}
    return _single(num_classes, "lade", LADELoss(class_counts, lade_alpha, remine_lambda), recipe, head="linear",
                   shortcut=shortcut, depth=depth, own=own, backbone=backbone, pretrained=pretrained, freeze=freeze)


GCL_STEPS = ((0.8, 0.1), (0.9, 0.01))


@METHODS.register("gcl")
@own_recipe(optim__batch_size=64, optim__weight_decay=2e-4, optim__lr=0.1, data__augment="basic",
            method__shortcut="A")
def gcl(*, num_classes: int, class_counts: Sequence[int], recipe: str = "shike", noise_mul: float = 0.5,
        mixup: float = 1.0, margin_stage2: float = 0.1, scale_stage2: float = 20.0, gamma_stage2: float = 1.0,
        shortcut: str = "B", depth: int = 32,
        backbone: str = "resnet32", pretrained: str = "", freeze: str = "none") -> MethodSpec:
    """GCL (Li et al. 2022, Eq. 6-9; Keke921/GCLLoss): stage 1 Gaussian-clouded logits on a cosine head (s 30,
    no margin, noise 0.5) with mixup; stage 2 keeps and fine-tunes that head on the frozen backbone (BN in eval
    mode) with class-balanced re-sampling, GCL with margin 0.1, s 20 and a focal factor (gamma 1), mixup.
    Own recipe: batch 64, stage 1 lr 0.1, warm-up 5, x0.1 at 160, x0.01 at 180; stage 2 30 epochs cosine from
    0.002 (0.01 * lr0 * (1 + cos))."""
    model = build_expert_resnet(num_classes=num_classes, experts=1, dkf=False, shortcut=shortcut, head="cosine",
                                scale=30.0, retrain_head=False, depth=depth, backbone=backbone,
                                pretrained=pretrained or None, freeze=freeze)
    stage1_loss = GCLLoss(class_counts, scale=30.0, margin=0.0, noise_mul=noise_mul)
    stage2_loss = GCLLoss(class_counts, scale=scale_stage2, margin=margin_stage2, noise_mul=noise_mul,
                          gamma=gamma_stage2, head_scale=30.0)
    own1 = {"epochs": 200, "peak_lr": 0.1, "schedule": "step", "warmup_epochs": 5, "lr_steps": GCL_STEPS}
    stage1 = Stage("representation", (LossTerm("gcl", 1.0, stage1_loss),), mixup=mixup,
                   **pick(recipe, SHIKE_REPRESENTATION, own1))
    stage2 = Stage("classifier", (LossTerm("gcl", 1.0, stage2_loss),), trainable=("head",), head="head",
                   sampler="class-balanced", freeze_bn=True, mixup=mixup,
                   **pick(recipe, SHIKE_CLASSIFIER, cosine(30, 0.002)))
    return MethodSpec(model, (stage1, stage2))


@METHODS.register("wb")
@own_recipe(optim__batch_size=64, optim__lr=0.01, data__augment="basic", method__shortcut="A")
def wb(*, num_classes: int, class_counts: Sequence[int], recipe: str = "shike", weight_decay: float = 5e-3,
       weight_decay_stage2: float = 0.1, cb_beta: float = 0.9999, thresh: float = 0.1, shortcut: str = "B",
       depth: int = 32, backbone: str = "resnet32", pretrained: str = "", freeze: str = "none") -> MethodSpec:
    """Weight Balancing (Alshammari et al. 2022): stage 1 CE with a tuned weight decay (5e-3, the demo's); stage 2
    keeps the head and trains it alone with WB's class-balanced softmax-BCE loss (beta 0.9999), weight decay 0.1
    and MaxNorm (thresholds from the stage-1 weights, thresh 0.1) projected once per epoch; BN keeps updating.
    Own recipe: batch 64, stage 1 320 epochs cosine from 0.01 (the released demo; the paper says 200), stage 2
    10 epochs cosine from 0.01. The demo's backbone is a ResNet-34; the harness keeps its CIFAR ResNet."""
    model = build_expert_resnet(num_classes=num_classes, experts=1, dkf=False, shortcut=shortcut, head="linear",
                                retrain_head=False, depth=depth, backbone=backbone, pretrained=pretrained or None,
                                freeze=freeze)
    stage1 = Stage("representation", (LossTerm("ce", 1.0, ExpertCE()),), weight_decay=weight_decay,
                   **pick(recipe, SHIKE_REPRESENTATION, cosine(320, 0.01)))
    stage2 = Stage("classifier", (LossTerm("cb_bce", 1.0, CBSoftmaxBCE(class_counts, cb_beta)),), trainable=("head",),
                   head="head", weight_decay=weight_decay_stage2, constraints=(MaxNorm(1, thresh, every="epoch"),),
                   **pick(recipe, SHIKE_CLASSIFIER, cosine(10, 0.01)))
    return MethodSpec(model, (stage1, stage2))
