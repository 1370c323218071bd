"""RIDE (Wang et al., ICLR 2021, "Long-tailed Recognition by Routing Diverse Distribution-Aware Experts";
frank-xwang/RIDE-LongTailRecognition): K experts sharing stem + layer1, each with its own narrowed layer2/layer3
(24/48 channels) and cosine head (s 30), trained with the distribution-aware diversity loss (LDAM-DRW per expert
plus a negative-weighted KL to the detached ensemble; `harness.methods.losses_moe.RIDELoss`); inference is the
mean of the expert logits. Model: `harness.methods.models.ride_resnet.RideResNet`; on the torchvision backbones
(ImageNet-LT, iNat 2018, Places-LT), `tv_experts.TorchvisionRide`, the official `RIDEResNet.py` / `RIDEResNeXt.py`:
stem + layer1 + layer2 shared, each expert its own layer3 + layer4 (192 / 384 planes with reduce_dimension: 768 /
1,536 channels) and cosine head. The ImageNet configs' own recipe (100 epochs, steps at 60 / 80, DRW and the
temperature from epoch 80 with reweight factor 0.02, batch 256, lr 0.1, wd 2e-4) is not an `own` recipe here: "own"
is the CIFAR one, and the large-scale presets give SHIKE's schedule.

Optional parts, both off by default:
- router (expert assignment, "EA"): a second stage that trains only the router (BCE, pos_weight 100) with the
  rest frozen (BN in eval mode), class-balanced sampling, 5 epochs cosine from 0.01; at inference each sample adds
  experts until the router says stop. Off because RIDE's CIFAR numbers (paper 48.0 for 3E; model zoo 48.6, and the
  SHIKE-quoted 48.3) come from `config_imbalance_cifar100_ride.json`, which has no router; the EA config is a
  separate, optional step, and it can cost accuracy (4E: 49.58 without vs 49.1 with it, RIDE#6). The official EA
  stage uses batch 512; here it runs at `optim.batch_size` (a stage cannot set its own batch size).
- teacher (distillation, `RIDELossWithDistill`): the path of a saved RIDE model state dict (a run's
  `final_weights.pt`; the official teacher has 6 experts). Adds T^2 * KL(teacher || student mean) at T 1.5; as
  coded, the loss loop runs once per expert around the whole RIDE loss, so both terms are weighted K. The teacher
  runs in eval mode (BN running statistics); the official code leaves it in train mode (batch statistics).

recipe "shike": SHIKE's 200 epochs and warm-up + cosine. "own" (`config_imbalance_cifar100_ride.json`): 200 epochs,
batch 128, lr 0.1, weight decay 5e-4, 5-epoch warm-up (20 with a teacher, the distill config), x0.01 from epoch 160
and x1e-4 from 180, crop + flip, zero-padding shortcuts. The official optimiser is Nesterov SGD; the harness's SGD
is not. The router stage is RIDE's own in both recipes (SHIKE has none).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from harness.errors import HarnessError
from harness.method import LossTerm, LossTermModule, LTModel, MethodSpec, ModelOutput, Stage, own_recipe
from harness.methods.losses import softmax_kl
from harness.methods.losses_moe import RIDELoss
from harness.methods.models.resnet_tv import TV_BACKBONES
from harness.methods.models.ride_resnet import FULL_WIDTHS, RIDE_WIDTHS, ExpertRouter, RideResNet
from harness.methods.models.tv_experts import (
    FULL_TV_PLANES,
    RIDE_TV_PLANES,
    TorchvisionRide,
    network_for,
    refuse_torchvision_switches,
)
from harness.methods.recipes import LDAM, SHIKE_SINGLE, cosine, pick
from harness.registry import METHODS

ROUTER_STAGE = cosine(5, 0.01)  # config_imbalance_cifar100_ride_ea.json: 5 epochs, CosineAnnealingLR from 0.01
DISTILL_WARMUP = 20  # config_imbalance_cifar100_distill_ride.json


class RouterBCE(LossTermModule):
    """RIDE's router loss (`ea_resnet_cifar.py`, training branch). For k = 0..K-2, with the running ensemble
    zbar_k = mean of experts 0..k: target t_k = [argmax zbar_k != y and argmax zbar_j == y for some j > k] ("the
    ensemble is wrong now but a later expert fixes it"); loss = mean_k BCE-with-logits(r_k, t_k, pos_weight), each a
    batch mean. Reads `out.router_logits` (K-1, B) of a `RideResNet` with a router."""

    pos_weight: torch.Tensor

    def __init__(self, pos_weight: float = 100.0) -> None:
        super().__init__()
        self.register_buffer("pos_weight", torch.tensor([float(pos_weight)]))

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        router_logits = getattr(out, "router_logits", None)
        if router_logits is None:
            raise ValueError("RouterBCE needs a model with a router in training mode (out.router_logits)")
        correct = out.expert_logits.detach().cumsum(dim=0).argmax(dim=-1) == target  # (K, B); sum ~ mean for argmax
        later = correct.flip(0).cumsum(dim=0).flip(0) > 0  # later[k]: some j >= k is correct
        helps = (~correct[:-1] & later[1:]).to(router_logits.dtype)
        pos_weight = self.pos_weight.to(router_logits.dtype)
        losses = [F.binary_cross_entropy_with_logits(r, t, pos_weight=pos_weight) for r, t in zip(router_logits, helps)]
        return torch.stack(losses).mean()


class DistillKL(LossTermModule):
    """RIDE's distillation term (`RIDELossWithDistill`): T^2 * KL(softmax(z_teacher / T) || softmax(zbar / T)),
    batch mean, zbar the student's output (mean of its experts), the teacher detached; T = 1.5 (CIFAR config)."""

    def __init__(self, temperature: float = 1.5) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        teacher = getattr(out, "teacher_logits", None)
        if teacher is None:
            raise ValueError("DistillKL needs a model with a teacher in training mode (out.teacher_logits)")
        t = self.temperature
        return t * t * softmax_kl(teacher.detach() / t, out.logits / t).mean()


def _teacher_shape(state: dict[str, torch.Tensor]) -> dict[str, object]:
    """Experts, widths, shared stages, depth and shortcut of a saved `RideResNet` state dict, read off its keys."""
    experts = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("expert_stages."))
    shared = len({k.split(".")[1] for k in state if k.startswith("shared_stages.")})
    blocks = len({k.split(".")[3] for k in state if k.startswith("expert_stages.0.0.")})
    widths = (state["stem.conv.weight"].shape[0], state["expert_stages.0.0.0.conv1.weight"].shape[0],
              state["heads.0.weight"].shape[0]) if shared == 1 else None
    shortcut = "B" if any(".shortcut.0.weight" in k for k in state) else "A"
    return {"experts": experts, "shared": shared, "depth": 6 * blocks + 2, "shortcut": shortcut, "widths": widths,
            "num_classes": state["heads.0.weight"].shape[1]}


def _teacher_from(path: str, num_classes: int, make: Callable[[dict[str, torch.Tensor]], LTModel]) -> LTModel:
    """`make(state)` on the state dict saved at `path` (a RIDE run's final_weights.pt), loaded without the router
    (the teacher's output is its mean); any mismatch is one line."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise HarnessError(f"method.teacher: no file at {file}; give a RIDE run's final_weights.pt")
    state = torch.load(file, map_location="cpu", weights_only=True)
    try:
        teacher = make(state)
        teacher.load_state_dict({k: v for k, v in state.items() if not k.startswith("router.")})
    except (KeyError, ValueError, RuntimeError, TypeError):
        raise HarnessError(f"method.teacher: {file} is not a RIDE model state dict for {num_classes} classes "
                           "(expected a RIDE run's final_weights.pt)") from None
    return teacher


def load_teacher(path: str, num_classes: int, scale: float) -> RideResNet:
    """A frozen RIDE teacher from a saved `RideResNet` state dict (a RIDE run's final_weights.pt), its experts,
    widths, depth and shortcut read off the keys; the router, if any, is dropped (the teacher's output is its mean)."""

    def make(state: dict[str, torch.Tensor]) -> RideResNet:
        shape = _teacher_shape(state)
        if shape["shared"] != 1 or shape["num_classes"] != num_classes:
            raise ValueError
        return RideResNet(num_classes=num_classes, experts=shape["experts"], widths=shape["widths"], shared=1,
                          depth=shape["depth"], shortcut=shape["shortcut"], scale=scale)

    return _teacher_from(path, num_classes, make)  # type: ignore[return-value]


def load_tv_teacher(path: str, backbone: str, num_classes: int, scale: float) -> TorchvisionRide:
    """A frozen RIDE teacher on torchvision `backbone` (the student's) from a saved `TorchvisionRide` state dict:
    its experts and the planes of its layer3 / layer4 (192 / 384 or 256 / 512) read off the keys (the official
    teacher has 6 experts at the student's width, `config_imagenet_lt_resnet50_distill_ride.json`)."""

    def make(state: dict[str, torch.Tensor]) -> TorchvisionRide:
        experts = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("expert_stages."))
        planes = tuple(state[f"expert_stages.0.{i}.0.conv3.weight"].shape[0] // 4 for i in (0, 1))
        if state["heads.0.weight"].shape[1] != num_classes:
            raise ValueError
        return TorchvisionRide(backbone=backbone, num_classes=num_classes, experts=experts, shared=2, planes=planes,
                               scale=scale)

    return _teacher_from(path, num_classes, make)  # type: ignore[return-value]


def _cifar_network(*, num_classes: int, experts: int, reduce_dimension: bool, scale: float, router: bool,
                   router_top: int, teacher: str, depth: int, shortcut: str, backbone: str, pretrained: str,
                   freeze: str) -> RideResNet:
    """RIDE's CIFAR ResNet-32 (`ride_resnet.RideResNet`): stem + layer1 shared, per-expert layer2/3 at 24/48."""
    refuse_torchvision_switches(pretrained, freeze)
    widths = RIDE_WIDTHS if reduce_dimension else FULL_WIDTHS
    assign = ExpertRouter(experts, widths[2], num_classes, top_choices=router_top) if router else None
    frozen = load_teacher(teacher, num_classes, scale) if teacher else None
    return RideResNet(num_classes=num_classes, experts=experts, widths=widths, shared=1, depth=depth,
                      shortcut=shortcut, scale=scale, router=assign, teacher=frozen)


def _torchvision_network(*, num_classes: int, experts: int, reduce_dimension: bool, scale: float, router: bool,
                         router_top: int, teacher: str, backbone: str, pretrained: str, freeze: str,
                         **cifar_only: object) -> TorchvisionRide:
    """RIDE's ImageNet network (`tv_experts.TorchvisionRide`): stem + layer1 + layer2 shared, per-expert layer3/4
    at 192/384 planes (256/512 without reduce_dimension); `depth` and `shortcut` are CIFAR knobs and do not apply."""
    planes = RIDE_TV_PLANES if reduce_dimension else FULL_TV_PLANES
    feature_dim = planes[-1] * 4  # the bottleneck's expansion
    assign = ExpertRouter(experts, feature_dim, num_classes, top_choices=router_top) if router else None
    frozen = load_tv_teacher(teacher, backbone, num_classes, scale) if teacher else None
    return TorchvisionRide(backbone=backbone, num_classes=num_classes, experts=experts, shared=2, planes=planes,
                           scale=scale, pretrained=pretrained or None, freeze=freeze, router=assign, teacher=frozen)


# backbone name -> RIDE's network on it
NETWORKS: dict[str, Callable[..., LTModel]] = {"resnet32": _cifar_network,
                                               **dict.fromkeys(TV_BACKBONES, _torchvision_network)}


@METHODS.register("ride")
@own_recipe(optim__batch_size=128, optim__weight_decay=5e-4, optim__lr=0.1, data__augment="basic",
            method__shortcut="A", optim__nesterov=True)
def ride(*, num_classes: int, class_counts: Sequence[int], recipe: str = "shike", experts: int = 3,
         reduce_dimension: bool = True, diversity_factor: float = -0.45, diversity_temperature: float = 1.0,
         max_margin: float = 0.5, scale: float = 30.0, drw: bool = True, drw_beta: float = 0.9999,
         reweight_factor: float = 0.05, router: bool = False, router_top: int = 30, router_pos_weight: float = 100.0,
         teacher: str = "", distill_temperature: float = 1.5, shortcut: str = "B", depth: int = 32,
         backbone: str = "resnet32", pretrained: str = "", freeze: str = "none") -> MethodSpec:
    """RIDE with `experts` experts (3: "RIDE (3E)"), widths 24/48 (`reduce_dimension`; False: 32/64). Loss per
    expert (Eq. 4-5 on LDAM-DRW): LDAM (max margin 0.5, s 30) with CB(0.9999) DRW weights from 80 % of the stage
    (epoch 160 of 200) + diversity_factor * Tbar^2 * KL(ensemble || expert), -0.45 as the current CIFAR config
    (-0.2 at older commits), per-class temperature (reweight factor 0.05) from the DRW epoch.
    router: add the expert-assignment stage (top `router_top` logits, BCE pos_weight `router_pos_weight`).
    teacher: "" (none) or the path of a saved RIDE state dict to distil from at `distill_temperature`.
    backbone: "resnet32" (CIFAR) or resnet50 / resnext50_32x4d / resnet152 (`NETWORKS`; ImageNet-LT and iNat:
    192/384-plane experts with reduce_dimension, the official EA config takes router_top 50); pretrained ("" or a
    torchvision state-dict path or "torchvision") and freeze ("none" | "trunk") apply to the torchvision ones."""
    if router and experts < 2:
        raise HarnessError(f"method.router needs method.experts >= 2 (got {experts}): it decides whether to add one")
    model = network_for("ride", NETWORKS, backbone)(
        num_classes=num_classes, experts=experts, reduce_dimension=reduce_dimension, scale=scale, router=router,
        router_top=router_top, teacher=teacher, depth=depth, shortcut=shortcut, backbone=backbone,
        pretrained=pretrained, freeze=freeze)
    frozen = model.teacher
    loss = RIDELoss(class_counts, max_margin=max_margin, scale=scale, drw_beta=drw_beta,
                    drw_start=0.8 if drw else None, diversity_factor=diversity_factor,
                    diversity_temperature=diversity_temperature, reweight_factor=reweight_factor)
    # RIDELossWithDistill adds (RIDE loss + KD) once per expert: both terms weigh K under distillation.
    weight = float(experts) if frozen is not None else 1.0
    terms = [LossTerm("ride", weight, loss)]
    own = dict(LDAM)
    if frozen is not None:
        terms.append(LossTerm("distill", weight, DistillKL(distill_temperature)))
        own["warmup_epochs"] = DISTILL_WARMUP
    stages = [Stage("representation", tuple(terms), **pick(recipe, SHIKE_SINGLE, own))]
    if model.router is not None:
        stages.append(Stage("router", (LossTerm("router", 1.0, RouterBCE(router_pos_weight)),), trainable=("router",),
                            sampler="class-balanced", freeze_bn=True, **ROUTER_STAGE))
    return MethodSpec(model, tuple(stages))
