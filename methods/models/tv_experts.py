"""The multi-expert and two-branch baselines on torchvision's ResNet-50 family (ImageNet-LT, iNaturalist 2018,
Places-LT: SHIKE Tables 2 and 3): a torchvision ResNet (`resnet_tv.TV_BACKBONES`, weights=None) cut into a shared
trunk and per-expert copies of its later stages at a chosen width. The copies are built from torchvision's own
`Bottleneck` with the network's groups and width_per_group (ResNeXt-50's 32x4d carries over), and initialised as
torchvision initialises its ResNets (Kaiming-normal fan-out convs, BN 1 / 0), which is also the official RIDE and
TLC ImageNet init (normal(0, sqrt(2 / (k^2 out_channels)))).

Switches every builder passes through (as `ncl.py` does for its networks):
- pretrained: a torchvision-format state dict (path) or "torchvision" (`resnet_tv.load_pretrained`), loaded into
  the torchvision network before it is cut; an expert stage at the network's own width starts as a copy of the
  pretrained stage (SADE's Places recipe, large-scale-lt.md 2.3), a narrowed one (RIDE's `reduce_dimension`) starts
  random, as do the heads.
- freeze: "none" or "trunk": the shared part fixed, as SHIKE's Places-LT setting (Sec. 4.2; reference 2.5): its
  parameters are their own group "trunk" that no stage trains, its BN layers stay in eval mode and it runs under
  no_grad (`FrozenTrunk`, the same rule as `resnet_tv.TorchvisionExperts`).

Here: RIDE and TLC (`TorchvisionRide`, `TorchvisionTLC`). ResLT's and BBN's torchvision networks live next to
their CIFAR ones (`reslt_resnet.py`, `bbn_resnet.py`) and use `tv_network`, `make_stage` and `FrozenTrunk`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from harness.errors import HarnessError
from harness.method import LTModel
from harness.methods.models.heads import CosineHead
from harness.methods.models.resnet_tv import FREEZE_MODES, STAGES, TV_BACKBONES, load_pretrained, stage_width
from harness.methods.models.ride_resnet import RideRouting, SharedTrunkExperts, TLCFusion

# RIDE's `reduce_dimension` on ResNet-50 (`model/fb_resnets/RIDEResNet.py`): layer3 / layer4 planes 192 / 384
# (768 / 1,536 output channels) instead of torchvision's 256 / 512.
RIDE_TV_PLANES = (192, 384)
FULL_TV_PLANES = (256, 512)


def tv_network(backbone: str, pretrained: str | None, freeze: str) -> tv_resnet.ResNet:
    """torchvision's `backbone` (weights=None), with `pretrained` loaded (all but its fc); switches checked."""
    if backbone not in TV_BACKBONES:
        raise HarnessError(f"unknown torchvision backbone '{backbone}'; known: {', '.join(TV_BACKBONES)}")
    if freeze not in FREEZE_MODES:
        raise HarnessError(f"unknown freeze '{freeze}'; known: {', '.join(FREEZE_MODES)}")
    net = TV_BACKBONES[backbone](weights=None)
    if pretrained:
        load_pretrained(net, pretrained, backbone)
    return net


def init_like_torchvision(module: nn.Module) -> None:
    """torchvision's ResNet init (`ResNet.__init__`): Kaiming-normal fan-out convs, BN weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def make_stage(net: tv_resnet.ResNet, stage: str, planes: int, in_channels: int) -> nn.Sequential:
    """A fresh stage shaped like `net`'s `stage` (its block type, block count, groups, base width and stride) but
    `planes` wide, reading `in_channels`: torchvision's `_make_layer` rule (a 1x1 projection + BN on the first block
    where the stride or the width changes), torchvision's init."""
    block = type(getattr(net, stage)[0])
    blocks, stride = len(getattr(net, stage)), 1 if stage == "layer1" else 2
    out = planes * block.expansion
    downsample = None
    if stride != 1 or in_channels != out:
        downsample = nn.Sequential(tv_resnet.conv1x1(in_channels, out, stride), nn.BatchNorm2d(out))
    layers = [block(in_channels, planes, stride, downsample, net.groups, net.base_width)]
    layers += [block(out, planes, groups=net.groups, base_width=net.base_width) for _ in range(1, blocks)]
    fresh = nn.Sequential(*layers)
    init_like_torchvision(fresh)
    return fresh


def expert_copy(net: tv_resnet.ResNet, names: Sequence[str], planes: Sequence[int], copy_weights: bool) -> nn.Sequential:
    """One expert's own stages `names` (consecutive, after the shared ones), stage i `planes[i]` wide; with
    `copy_weights`, a stage at `net`'s own width starts as a copy of `net`'s (the pretrained weights)."""
    first = STAGES.index(names[0])
    in_channels = stage_width(getattr(net, STAGES[first - 1])) if first else net.conv1.out_channels
    stages = []
    for name, width in zip(names, planes, strict=True):
        stage = make_stage(net, name, width, in_channels)
        if copy_weights and stage_width(stage) == stage_width(getattr(net, name)):
            stage.load_state_dict(getattr(net, name).state_dict())
        stages.append(stage)
        in_channels = stage_width(stage)
    return nn.Sequential(*stages)


class FrozenTrunk:
    """Mixin (before `LTModel`) for a torchvision network whose `trunk_modules()` are its shared part: with
    freeze == "trunk" they get no gradients, stay in eval mode whatever the stage asks (their BN running statistics
    fixed) and run under no_grad (`run_trunk`); `with_trunk_group` moves their parameters out of every group into
    their own "trunk". `input_size` is what `harness describe` counts FLOPs at."""

    input_size = 224
    freeze: str = "none"

    def trunk_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def trunk_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.trunk_modules() for p in m.parameters()]

    def freeze_trunk(self, freeze: str) -> None:
        self.freeze = freeze
        if freeze == "trunk":
            for p in self.trunk_parameters():
                p.requires_grad_(False)
        self.train(self.training)  # type: ignore[attr-defined]

    def train(self, mode: bool = True):  # noqa: ANN201 - nn.Module's signature
        super().train(mode)  # type: ignore[misc]
        if self.freeze == "trunk":
            for module in self.trunk_modules():
                module.eval()
        return self

    def run_trunk(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if self.freeze == "trunk":
            with torch.no_grad():
                return fn(x)
        return fn(x)

    def with_trunk_group(self, groups: dict[str, list[nn.Parameter]]) -> dict[str, list[nn.Parameter]]:
        if self.freeze != "trunk":
            return groups
        trunk = self.trunk_parameters()
        ids = {id(p) for p in trunk}
        return {**{name: [p for p in ps if id(p) not in ids] for name, ps in groups.items()}, "trunk": trunk}


class TorchvisionMultiExpert(SharedTrunkExperts, FrozenTrunk, LTModel):
    """stem + the first `shared` torchvision stages (the trunk) -> per expert: its own copies of the remaining
    stages at `planes`, global average pooling (the official `AvgPool2d(7)` at 224), a cosine head s * cos.

    The torchvision counterpart of `ride_resnet.MultiExpertResNet`, with the same forward contract:
    forward(x) -> ModelOutput(logits = `aggregate(expert_logits)` (the mean here), expert_logits (K, B, C),
    features (K, B, D)); groups "backbone" (trunk and expert stages), "head", and "trunk" when frozen."""

    def __init__(self, *, backbone: str, num_classes: int, experts: int, shared: int, planes: Sequence[int],
                 scale: float = 30.0, pretrained: str | None = None, freeze: str = "none") -> None:
        super().__init__()
        own = STAGES[shared:]
        if experts < 1 or not 1 <= shared < len(STAGES) or len(planes) != len(own):
            raise ValueError(f"need experts >= 1, 1 <= shared <= 3 and one width per own stage, got {experts}, "
                             f"{shared}, {tuple(planes)}")
        net = tv_network(backbone, pretrained, freeze)
        self.backbone, self.pretrained = backbone, pretrained or "none"
        self.num_classes, self.num_experts = num_classes, experts
        self.shared = "+".join(["stem", *STAGES[:shared]])
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.shared_stages = nn.Sequential(*(getattr(net, n) for n in STAGES[:shared]))
        self.expert_stages = nn.ModuleList(expert_copy(net, own, planes, bool(pretrained)) for _ in range(experts))
        self.widths = tuple(stage_width(stage) for stage in self.expert_stages[0])
        self.feature_dim = self.widths[-1]
        self.heads = nn.ModuleList(CosineHead(self.feature_dim, num_classes, scale) for _ in range(experts))
        self.freeze_trunk(freeze)

    def trunk_modules(self) -> list[nn.Module]:
        return [self.stem, self.shared_stages]

    def architecture(self) -> dict[str, object]:
        return {"backbone": self.backbone, "experts": self.num_experts, "shared": self.shared,
                "widths": ",".join(map(str, self.widths)), "head": type(self.heads[0]).__name__,
                "pretrained": self.pretrained, "freeze": self.freeze}

    def classifiers(self) -> list[nn.Module]:
        return list(self.heads)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        backbone = [*self.stem.parameters(), *self.shared_stages.parameters(), *self.expert_stages.parameters()]
        return self.with_trunk_group({"backbone": backbone, "head": list(self.heads.parameters())})

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_trunk(lambda t: self.shared_stages(self.stem(t)), x)


class TorchvisionRide(RideRouting, TorchvisionMultiExpert):
    """RIDE on ResNet-50 / ResNeXt-50 / ResNet-152 (`model/fb_resnets/RIDEResNet.py`, `RIDEResNeXt.py`): stem +
    layer1 + layer2 shared; each expert owns layer3 + layer4 (192 / 384 planes with `reduce_dimension`, the
    ImageNet-LT and iNat configs; torchvision v1.5 bottlenecks, stride on the 3x3 conv) and a cosine head s = 30;
    router ("EA", on the experts' pooled features as `EAResNet.py`) and teacher as `RideRouting`."""


class TorchvisionTLC(TLCFusion, TorchvisionMultiExpert):
    """TLC on ResNet-50 (`model/ResnetImagenet.py` at lblaoke/TLC HEAD): stem + layer1-3 shared at full width, each
    expert owns a full-width layer4 (512 planes, 2,048 channels) and a cosine head s = 30; output as `TLCFusion`."""


CIFAR_BACKBONE = "resnet32"


def network_for(method: str, networks: dict[str, Callable[..., LTModel]], backbone: str) -> Callable[..., LTModel]:
    """The model builder a method registers for `backbone` (its `NETWORKS`: resnet32 and the torchvision names)."""
    if backbone not in networks:
        raise HarnessError(f"{method}: unknown backbone '{backbone}'; known: {', '.join(networks)}")
    return networks[backbone]


def refuse_torchvision_switches(pretrained: str, freeze: str, **others: tuple[object, object]) -> None:
    """The CIFAR networks have no pretrained weights or frozen trunk (nor the torchvision-only `others`, given as
    name=(value, default)): a value asked for is refused, never ignored."""
    switches = {"pretrained": (pretrained, ""), "freeze": (freeze, "none"), **others}
    asked = [name for name, (value, default) in switches.items() if value != default]
    if asked:
        raise HarnessError(f"{', '.join(asked)} apply to the torchvision backbones only ({', '.join(TV_BACKBONES)}), "
                           f"not to {CIFAR_BACKBONE}")
