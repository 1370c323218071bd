"""Decoupled and post-hoc baselines on one CIFAR ResNet (Kang et al., ICLR 2020; Ren et al., NeurIPS 2020; Zhang et
al., CVPR 2021; Menon et al., ICLR 2021). Stage 1 is joint CE training with instance-balanced sampling and a
linear head (bias); what follows differs:

- crt: a fresh linear head re-trained with CE under class-balanced sampling, the backbone frozen.
- lws: the stage-1 head kept and frozen; only per-class scales f (z' = f * z, f = 1 at the start) learn, class-
  balanced sampling.
- tau-norm: no training; the head's rows divided by ||w_c||^tau, bias dropped (post-hoc).
- ncm: no training; nearest class mean of centred, normalised training features (post-hoc).
- disalign: the stage-1 head kept; only DisAlign's calibration (alpha, beta, confidence layer) learns, with
  generalised re-weighted CE, w_c proportional to (N / n_c)^rho (rho = 1.2, the ImageNet-LT config).
- balms-sampler-free: the stage-1 head fine-tuned with balanced softmax. BALMS's meta sampler (a bilevel, learned
  sampler) is not implemented: this is the sampler-free variant ("decoupled BS" in the BALMS repository's runs).
- la-posthoc: no second stage; logits minus tau * log prior at evaluation.

recipe "shike": SHIKE's 180 + 20 (or 200) epochs and warm-up + cosine schedule. "own": recipe A (LDAM-DRW's CIFAR
recipe) for stage 1, the decoupling paper's stage 2 (cRT 10 epochs, LWS 5, cosine; the papers give no CIFAR
recipe, so stage-2 peaks of 0.1 are the harness's choice, from the Places-LT configs). The stage-1 backbone's BN
keeps updating in stage 2 as in the official code; `freeze_bn_stage2` turns that off.
"""

from __future__ import annotations

from collections.abc import Sequence

from harness.method import LossTerm, MethodSpec, PostHoc, Stage, own_recipe
from harness.methods.losses import BalancedSoftmaxCE, ExpertCE
from harness.methods.losses_lt import WeightedCE, grw_weights
from harness.methods.models.moe import build_expert_resnet
from harness.methods.posthoc import NCM, LogitAdjust, TauNorm
from harness.methods.recipes import LDAM, RECIPE_A, SHIKE_CLASSIFIER, SHIKE_REPRESENTATION, SHIKE_SINGLE, cosine, pick
from harness.registry import METHODS


def _model(num_classes: int, shortcut: str, depth: int, retrain_head: bool = False, calibration: str = "none",
           net: dict | None = None):
    """net: the builder's backbone / pretrained / freeze switches (`build_expert_resnet`; pretrained "" = random)."""
    net = dict(net or {})
    net["pretrained"] = net.get("pretrained") or None
    return build_expert_resnet(num_classes=num_classes, experts=1, dkf=False, shortcut=shortcut, head="linear",
                               retrain_head=retrain_head, depth=depth, calibration=calibration, **net)


def _joint(recipe: str, single: bool) -> Stage:
    """Stage 1: CE, instance-balanced sampling, the whole network."""
    return Stage("representation", (LossTerm("ce", 1.0, ExpertCE()),),
                 **pick(recipe, SHIKE_SINGLE if single else SHIKE_REPRESENTATION, LDAM))


def _classifier(recipe: str, term: LossTerm, trainable: tuple[str, ...], head: str, sampler: str, own_epochs: int,
                freeze_bn: bool, own_peak: float = 0.1) -> Stage:
    return Stage("classifier", (term,), trainable=trainable, head=head, sampler=sampler, freeze_bn=freeze_bn,
                 **pick(recipe, SHIKE_CLASSIFIER, cosine(own_epochs, own_peak)))


def _one_stage_posthoc(num_classes: int, shortcut: str, depth: int, recipe: str, step: PostHoc,
                       net: dict | None = None) -> MethodSpec:
    return MethodSpec(_model(num_classes, shortcut, depth, net=net), (_joint(recipe, single=True),), posthoc=(step,))


@METHODS.register("crt")
@own_recipe(**RECIPE_A)
def crt(*, num_classes: int, class_counts: Sequence[int], recipe: str = "shike", shortcut: str = "B",
        freeze_bn_stage2: bool = False, depth: int = 32,
        backbone: str = "resnet32", pretrained: str = "", freeze: str = "none") -> MethodSpec:
    """Classifier re-training (Kang et al. 2020, Sec. 4, `cls_crt.yaml`): a re-initialised linear head, CE,
    class-balanced sampling, backbone frozen."""
    model = _model(num_classes, shortcut, depth, retrain_head=True,
                   net=dict(backbone=backbone, pretrained=pretrained, freeze=freeze))
    stage2 = _classifier(recipe, LossTerm("ce", 1.0, ExpertCE()), ("retrain_head",), "retrain_head",
                         "class-balanced", 10, freeze_bn_stage2)
    return MethodSpec(model, (_joint(recipe, single=False), stage2))


@METHODS.register("lws")
@own_recipe(**RECIPE_A)
def lws(*, num_classes: int, class_counts: Sequence[int], recipe: str = "shike", shortcut: str = "B",
        freeze_bn_stage2: bool = False, depth: int = 32,
        backbone: str = "resnet32", pretrained: str = "", freeze: str = "none") -> MethodSpec:
    """Learnable weight scaling (Kang et al. 2020, Sec. 4, `cls_lws.yaml`): z'_c = f_c (w_c x + b_c); only f
    learns (5 epochs, class-balanced sampling, CE)."""
    model = _model(num_classes, shortcut, depth, calibration="lws",
                   net=dict(backbone=backbone, pretrained=pretrained, freeze=freeze))
    stage2 = _classifier(recipe, LossTerm("ce", 1.0, ExpertCE()), ("calibration",), "head", "class-balanced", 5,
                         freeze_bn_stage2)
    return MethodSpec(model, (_joint(recipe, single=False), stage2))


@METHODS.register("disalign")
@own_recipe(**RECIPE_A)
def disalign(*, num_classes: int, class_counts: Sequence[int], recipe: str = "shike", rho: float = 1.2,
             shortcut: str = "B", freeze_bn_stage2: bool = False, depth: int = 32,
        backbone: str = "resnet32", pretrained: str = "", freeze: str = "none") -> MethodSpec:
    """DisAlign (Zhang et al. 2021, Eq. 3-6): adaptive calibration of the kept head, trained alone with GRW CE
    (w_c proportional to (N / n_c)^rho, normalised to sum C; rho 1.2 as the ImageNet-LT config)."""
    model = _model(num_classes, shortcut, depth, calibration="disalign",
                   net=dict(backbone=backbone, pretrained=pretrained, freeze=freeze))
    term = LossTerm("grw_ce", 1.0, WeightedCE(grw_weights(class_counts, rho)))
    stage2 = _classifier(recipe, term, ("calibration",), "head", "instance", 10, freeze_bn_stage2)
    return MethodSpec(model, (_joint(recipe, single=False), stage2))


@METHODS.register("balms-sampler-free")
@own_recipe(**RECIPE_A)
def balms(*, num_classes: int, class_counts: Sequence[int], recipe: str = "shike", shortcut: str = "B",
          freeze_bn_stage2: bool = False, depth: int = 32,
        backbone: str = "resnet32", pretrained: str = "", freeze: str = "none") -> MethodSpec:
    """BALMS without its meta sampler (Ren et al. 2020, Eq. 4): the stage-1 head fine-tuned with balanced softmax,
    instance-balanced sampling. The meta sampler's bilevel update is not implemented, so the method is named
    `balms-sampler-free` (Table 1's BALMS row runs it and says so in a footnote)."""
    model = _model(num_classes, shortcut, depth, net=dict(backbone=backbone, pretrained=pretrained, freeze=freeze))
    term = LossTerm("bsce", 1.0, BalancedSoftmaxCE(class_counts))
    stage2 = _classifier(recipe, term, ("head",), "head", "instance", 10, freeze_bn_stage2)
    return MethodSpec(model, (_joint(recipe, single=False), stage2))


@METHODS.register("tau-norm")
@own_recipe(**RECIPE_A)
def tau_norm(*, num_classes: int, class_counts: Sequence[int], recipe: str = "shike", tau: float = 1.0,
             shortcut: str = "B", depth: int = 32,
        backbone: str = "resnet32", pretrained: str = "", freeze: str = "none") -> MethodSpec:
    """tau-normalised classifier (Kang et al. 2020, Eq. 3, `tau_norm.py`): joint CE, then w_c / ||w_c||^tau with
    the bias dropped. The paper picks tau on a validation split (`harness tune` with `method.tau`)."""
    return _one_stage_posthoc(num_classes, shortcut, depth, recipe, TauNorm(tau),
                              dict(backbone=backbone, pretrained=pretrained, freeze=freeze))


@METHODS.register("ncm")
@own_recipe(**RECIPE_A)
def ncm(*, num_classes: int, class_counts: Sequence[int], recipe: str = "shike", shortcut: str = "B",
        depth: int = 32,
        backbone: str = "resnet32", pretrained: str = "", freeze: str = "none") -> MethodSpec:
    """Nearest class mean (Kang et al. 2020, Sec. 4, `KNNClassifier.py` "cl2n"): joint CE, then class means of
    centred, L2-normalised features from a non-augmented pass over the training split."""
    return _one_stage_posthoc(num_classes, shortcut, depth, recipe, NCM(),
                              dict(backbone=backbone, pretrained=pretrained, freeze=freeze))


@METHODS.register("la-posthoc")
@own_recipe(**RECIPE_A)
def la_posthoc(*, num_classes: int, class_counts: Sequence[int], recipe: str = "shike", tau: float = 1.0,
               shortcut: str = "B", depth: int = 32,
        backbone: str = "resnet32", pretrained: str = "", freeze: str = "none") -> MethodSpec:
    """Post-hoc logit adjustment (Menon et al. 2021, Eq. 8): CE training, then argmax of z - tau log pi."""
    return _one_stage_posthoc(num_classes, shortcut, depth, recipe, LogitAdjust(class_counts, tau),
                              dict(backbone=backbone, pretrained=pretrained, freeze=freeze))
