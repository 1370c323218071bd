"""TLC (Li et al., CVPR 2022, "Trustworthy Long-Tailed Classification"; lblaoke/TLC): K experts sharing only the
stem, each a full 16/32/64 CIFAR ResNet with a cosine head (s 30) (on the torchvision backbones: stem + layer1-3
shared, each expert its own layer4, `tv_experts.TorchvisionTLC`), trained with the evidential loss of
`harness.methods.losses_moe.TLCLoss` (LDAM-margined NLL with CB DRW weights from 80 % of the stage, the annealed
Dirichlet KL, a RIDE-style diversity term at 0.01, and dynamic engagement: a sample trains expert k only where
w_k / max w_k > tau = 0.54). Inference fuses the experts, sum_k softmax_k(w_k / eta) * z_k with eta 0.2
(`harness.methods.models.ride_resnet.TLCResNet`); the same fusion is the loss's (detached) diversity target.

recipe "shike": SHIKE's 200 epochs and warm-up + cosine. "own" (`configs/cifar100_lt.json`): 200 epochs, batch
128, lr 0.1, weight decay 5e-4, 5-epoch warm-up, x0.01 from epoch 160 and x1e-4 from 180 (RIDE's CustomLR), crop +
flip, zero-padding shortcuts (the only kind in TLC's code). TLC's Nesterov SGD is plain SGD here. TLC trains on its
own CIFAR-LT decay (11,123 images, tail 6; baselines.md section 17); the harness's datasets are used as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from harness.method import LossTerm, LTModel, MethodSpec, ModelOutput, Stage, own_recipe
from harness.methods.losses_moe import TLCLoss
from harness.methods.models.resnet_tv import TV_BACKBONES
from harness.methods.models.ride_resnet import FULL_WIDTHS, TLCResNet
from harness.methods.models.tv_experts import FULL_TV_PLANES, TorchvisionTLC, network_for, refuse_torchvision_switches
from harness.methods.recipes import LDAM, SHIKE_SINGLE, pick
from harness.registry import METHODS


class TLCLoss64(TLCLoss):
    """`TLCLoss` evaluated on float64 logits (the result cast back to the logits' dtype). With s = 30 the engagement
    recursion divides by 1 - conflict, which falls to ~e^-30 when two experts confidently disagree: float32 rounds
    it to 0, w_k becomes inf and the engagement mask NaN (measured: the 8-class learning test went NaN at epoch 5).
    In float64 the same maths is finite (w stays in [0, 1]); the official float32 code has the same hazard."""

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        wide = ModelOutput(out.logits.double(), out.expert_logits.double(), out.features)
        return super().forward(wide, target).to(out.expert_logits.dtype)


def _cifar_network(*, num_classes: int, experts: int, scale: float, eta: float, fusion: str, depth: int,
                   shortcut: str, backbone: str, pretrained: str, freeze: str) -> TLCResNet:
    """TLC's CIFAR network (`model/ResnetCifar.py`): only the stem shared, each expert a full 16/32/64 ResNet."""
    refuse_torchvision_switches(pretrained, freeze)
    return TLCResNet(num_classes=num_classes, experts=experts, widths=FULL_WIDTHS, shared=0, depth=depth,
                     shortcut=shortcut, scale=scale, eta=eta, fusion=fusion)


def _torchvision_network(*, num_classes: int, experts: int, scale: float, eta: float, fusion: str, backbone: str,
                         pretrained: str, freeze: str, **cifar_only: object) -> TorchvisionTLC:
    """TLC's ImageNet network (`model/ResnetImagenet.py` at HEAD, e06d40c): stem + layer1-3 shared at full width,
    each expert a full-width layer4 (512 planes) and cosine head. (Its first release, 3743008, narrowed the shared
    layer3 to 192 planes and the experts to 384, RIDE's widths; HEAD restored torchvision's.) `depth` and
    `shortcut` are CIFAR knobs and do not apply."""
    return TorchvisionTLC(backbone=backbone, num_classes=num_classes, experts=experts, shared=3,
                          planes=FULL_TV_PLANES[1:], scale=scale, pretrained=pretrained or None, freeze=freeze,
                          eta=eta, fusion=fusion)


# backbone name -> TLC's network on it
NETWORKS: dict[str, Callable[..., LTModel]] = {"resnet32": _cifar_network,
                                               **dict.fromkeys(TV_BACKBONES, _torchvision_network)}


@METHODS.register("tlc")
@own_recipe(optim__batch_size=128, optim__weight_decay=5e-4, optim__lr=0.1, data__augment="basic",
            method__shortcut="A", optim__nesterov=True)
def tlc(*, num_classes: int, class_counts: Sequence[int], recipe: str = "shike", experts: int = 4,
        tau: float = 0.54, engagement: bool = True, eta: float = 0.2, fusion: str = "paper", max_margin: float = 0.5,
        scale: float = 30.0, drw: bool = True, drw_beta: float = 0.9999, reweight_factor: float = 0.05,
        annealing: float = 500.0, diversity_factor: float = 0.01, shortcut: str = "B", depth: int = 32,
        backbone: str = "resnet32", pretrained: str = "", freeze: str = "none") -> MethodSpec:
    """TLC with `experts` experts: 4 by default, as SHIKE's "TLC (4E)" row and TLC's reported 49.8; the official
    CIFAR config (`configs/cifar100_lt.json`) has 3 (`--set method.experts=3`).
    tau: dynamic-engagement threshold (`engagement=False` keeps every sample). eta: fusion temperature.
    fusion: "paper" (softmax over experts per sample, Eq. 9) or "code" (the official forward: exp(w_k / eta)
    normalised over the batch). KL annealing weight (epoch + 1) / ((drw epoch + annealing) / reweight_factor) =
    epoch / 13,200 on the 200-epoch recipe; DRW CB(drw_beta) and the per-class diversity temperature from 80 %.
    backbone: "resnet32" (CIFAR) or resnet50 / resnext50_32x4d / resnet152 (`NETWORKS`); the official ImageNet-LT
    config (`configs/imagenet_lt.json`) has 3 experts and its model's fusion temperature is 0.5 (`--set
    method.experts=3 --set method.eta=0.5`); pretrained and freeze apply to the torchvision ones."""
    model = network_for("tlc", NETWORKS, backbone)(
        num_classes=num_classes, experts=experts, scale=scale, eta=eta, fusion=fusion, depth=depth, shortcut=shortcut,
        backbone=backbone, pretrained=pretrained, freeze=freeze)
    loss = TLCLoss64(class_counts, max_margin=max_margin, scale=scale, drw_beta=drw_beta,
                   drw_start=0.8 if drw else None, reweight_factor=reweight_factor, annealing=annealing,
                   diversity_factor=diversity_factor, tau=tau if engagement else None)
    return MethodSpec(model, (Stage("end-to-end", (LossTerm("tlc", 1.0, loss),), **pick(recipe, SHIKE_SINGLE, LDAM)),))
