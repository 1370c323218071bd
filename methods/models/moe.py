"""SHIKE's multi-expert CIFAR ResNet-32 with Depth-wise Knowledge Fusion (official `networks.py:86-124`, `:138-216`).

Shared stem + layer1 + layer2; each expert m owns a copy of layer3 and a head. With DKF (paper Eq. 3), expert m
multiplies its 64x8x8 layer3 output element-wise with a shallow feature map aligned to 64x8x8 by strided convs.
experts=1, dkf=False is a plain ResNet-32. `build_expert_resnet(backbone=...)` also builds the same model on
torchvision's ResNet-50 family (`resnet_tv.py`), through the `BACKBONES` registry.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from harness.errors import HarnessError
from harness.method import LTModel, ModelOutput
from harness.methods.models.dkf_align import parse_arrangement
from harness.methods.models.heads import CALIBRATIONS, make_head
from harness.methods.models.resnet_cifar import Stem, blocks_per_stage, init_weights, make_stage
from harness.methods.models.resnet_tv import STAGES as STAGES_TV
from harness.methods.models.resnet_tv import TV_BACKBONES, build_tv_experts

STAGE_WIDTHS = (16, 32, 64)
ALIGN_RELU_MODES = ("code", "all")


class StridedConv(nn.Sequential):
    """3x3 conv (stride 2, pad 1, no bias), BN, then an optional ReLU (official `StridedConv`, `networks.py:86-108`)."""

    def __init__(self, in_planes: int, planes: int, use_relu: bool) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_planes, planes, kernel_size=3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(planes),
        ]
        if use_relu:
            layers.append(nn.ReLU())
        super().__init__(*layers)
        self.use_relu = use_relu


class ShallowAligner(nn.Sequential):
    """Aligns the output of shared stage `source` (1 or 2) to 64x8x8 (official `ShallowExpert`, `networks.py:111-124`).

    Stacks 3 - source StridedConvs, conv k mapping w*2^k -> w*2^(k+1) channels, w = the source's width.
    align_relu "code": conv k has a ReLU iff k != 1 (`:119`), so the depth-2 stack (from layer1) ends signed and the
    depth-1 stack (from layer2) ends non-negative (reference section 5 item 8); "all": a ReLU after every conv.
    """

    def __init__(self, source: int, align_relu: str = "code") -> None:
        if source not in (1, 2):
            raise ValueError(f"DKF source must be 1 (layer1) or 2 (layer2), got {source}")
        if align_relu not in ALIGN_RELU_MODES:
            raise ValueError(f"unknown align_relu '{align_relu}'; known: {ALIGN_RELU_MODES}")
        width, depth = STAGE_WIDTHS[source - 1], len(STAGE_WIDTHS) - source
        convs = [
            StridedConv(width * 2**k, width * 2 ** (k + 1), use_relu=(k != 1) if align_relu == "code" else True)
            for k in range(depth)
        ]
        super().__init__(*convs)
        self.source = source


def default_dkf_sources(experts: int) -> tuple[int, ...]:
    """Official assignment `[out1, out2][i % 2]` (`networks.py:199-203`): (1, 2, 1) for 3 experts, (1, 2, 1, 2) for 4."""
    return tuple((1, 2)[i % 2] for i in range(experts))


class ExpertResNet(LTModel):
    """Multi-expert CIFAR ResNet-32 with optional DKF; see `build_expert_resnet` for the switches.

    forward(x) -> ModelOutput(logits = mean of expert logits, expert_logits (M, B, C), features (M, B, 64)), where
    features are the pooled (fused, if DKF) maps that feed each head. `active_head` picks "head" or "retrain_head".
    """

    def __init__(
        self,
        *,
        num_classes: int,
        experts: int,
        dkf: bool,
        shortcut: str,
        head: str,
        scale: float,
        dkf_sources: tuple[int, ...],
        align_relu: str,
        retrain_head: bool,
        in_channels: int,
        depth: int = 32,
        calibration: str = "none",
    ) -> None:
        super().__init__()
        if experts < 1:
            raise ValueError(f"experts must be >= 1, got {experts}")
        self.num_experts = experts
        self.num_classes = num_classes
        self.feature_dim = STAGE_WIDTHS[2]
        self.dkf = dkf
        self.depth = depth
        blocks = blocks_per_stage(depth)
        self.dkf_sources = tuple(dkf_sources) if dkf else ()
        self.active_head = "head"
        # Construction order follows the official __init__ (stem, layer1, layer2, layer3s, classifiers,
        # rt_classifiers, then _weights_init, then the aligners), so a seeded run draws the same initial weights.
        self.stem = Stem(in_channels, STAGE_WIDTHS[0])
        self.layer1 = make_stage(STAGE_WIDTHS[0], STAGE_WIDTHS[0], blocks, stride=1, option=shortcut)
        self.layer2 = make_stage(STAGE_WIDTHS[0], STAGE_WIDTHS[1], blocks, stride=2, option=shortcut)
        self.layer3s = nn.ModuleList(
            make_stage(STAGE_WIDTHS[1], STAGE_WIDTHS[2], blocks, stride=2, option=shortcut) for _ in range(experts)
        )
        self.heads = nn.ModuleList(make_head(head, self.feature_dim, num_classes, scale) for _ in range(experts))
        self.retrain_heads: nn.ModuleList | None = None
        if retrain_head:
            self.retrain_heads = nn.ModuleList(
                make_head(head, self.feature_dim, num_classes, scale) for _ in range(experts)
            )
        self.apply(init_weights)  # networks.py:172; cosine heads keep their own init (not nn.Linear)
        # Built after the init, so the aligner convs keep PyTorch's default init (networks.py:178-179).
        self.aligners = nn.ModuleList(ShallowAligner(s, align_relu) for s in self.dkf_sources)
        if calibration != "none" and calibration not in CALIBRATIONS:
            raise ValueError(f"unknown calibration '{calibration}'; known: none, {', '.join(CALIBRATIONS)}")
        # Identity at initialisation; its own parameter group, so a stage can train it alone (LWS, DisAlign).
        self.calibrations = nn.ModuleList(
            CALIBRATIONS[calibration](self.feature_dim, num_classes) for _ in range(experts)
        ) if calibration != "none" else None

    def backbone_modules(self) -> list[nn.Module]:
        """Everything but the heads: stem, shared stages, expert stages and DKF aligners."""
        return [self.stem, self.layer1, self.layer2, self.layer3s, self.aligners]

    def architecture(self) -> dict[str, object]:
        sources = ",".join(f"layer{s}" for s in self.dkf_sources)
        facts = {"depth": self.depth, "experts": self.num_experts, "dkf": self.dkf, "dkf_sources": sources or "none",
                 "head": type(self.heads[0]).__name__}
        if self.calibrations is not None:
            facts["calibration"] = type(self.calibrations[0]).__name__
        return facts

    def classifiers(self) -> list[nn.Module]:
        heads = self.retrain_heads if self.active_head == "retrain_head" else self.heads
        assert heads is not None
        return list(heads)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = {
            "backbone": [p for m in self.backbone_modules() for p in m.parameters()],
            "head": list(self.heads.parameters()),
        }
        if self.retrain_heads is not None:
            groups["retrain_head"] = list(self.retrain_heads.parameters())
        if self.calibrations is not None:
            groups["calibration"] = list(self.calibrations.parameters())
        return groups

    def forward(self, x: torch.Tensor) -> ModelOutput:
        out1 = self.layer1(self.stem(x))
        out2 = self.layer2(out1)
        shallow = (out1, out2)
        heads = self.retrain_heads if self.active_head == "retrain_head" else self.heads
        assert heads is not None
        features, logits = [], []
        for m, (layer3, head) in enumerate(zip(self.layer3s, heads, strict=True)):
            fused = layer3(out2)
            if self.dkf:  # paper Eq. 3: Hadamard product with the aligned shallow map (networks.py:205-206)
                fused = fused * self.aligners[m](shallow[self.dkf_sources[m] - 1])
            pooled = fused.mean(dim=(2, 3))  # global average pool over 8x8 (networks.py:207-208)
            features.append(pooled)
            z = head(pooled)
            logits.append(z if self.calibrations is None else self.calibrations[m](z, pooled))
        expert_logits = torch.stack(logits)
        return ModelOutput(
            logits=expert_logits.mean(dim=0), expert_logits=expert_logits, features=torch.stack(features)
        )


def build_expert_resnet(
    *,
    num_classes: int,
    experts: int = 3,
    dkf: bool = True,
    shortcut: str = "B",
    head: str = "cosine",
    scale: float = 30.0,
    dkf_sources: tuple[int, ...] | None = None,
    align_relu: str = "code",
    retrain_head: bool = True,
    in_channels: int = 3,
    depth: int = 32,
    calibration: str = "none",
    backbone: str = "resnet32",
    arrangement: str = "",
    pretrained: str | None = None,
    freeze: str = "none",
    split: str = "layer4",
    dkf_align: str = "conv3x3",
) -> LTModel:
    """Build SHIKE's multi-expert model on `backbone` (a name of `BACKBONES`); the defaults are the official
    code (`networks.py`, `resnet32(use_norm=True, num_exps=3)`).

    experts: number of per-expert last stages (M). dkf: fuse shallow features (paper Eq. 3); False gives a plain MoE.
    head: "cosine" (official, logits scaled by `scale`) or "linear" (paper wording).
    arrangement: Table 5's depth string ("ABC", "ABCA", ...): one expert per letter, A/B/C = the output of shared
    stage 1/2/3; when given it sets the number of experts (`experts` is then unused) and each expert's DKF source.
    dkf_sources: the same per expert as stage numbers (1 = layer1, ...); None and no arrangement: the official cycle.
    align_relu: "code" or "all" (see `ShallowAligner`). retrain_head: also build the separate, fresh heads used
    after classifier re-training (official `rt_classifiers`). calibration: "none", "lws" (per-class scales) or
    "disalign" (adaptive calibration) after each head, in the parameter group "calibration"; both are the identity
    until a stage trains them.
    CIFAR knobs (backbone "resnet32"): shortcut "B" (official, 1x1 projection) or "A" (zero padding); depth 6n+2
    (32 = 5 blocks per stage, the official; 8 = 1 block, 20 = 3, 56 = 9).
    torchvision knobs (resnet50, resnext50_32x4d, resnet152; `resnet_tv.py`): pretrained (a state-dict path or
    "torchvision"), freeze ("none" | "trunk"), split (the first stage experts own: "layer4" | "layer3"), dkf_align
    ("conv3x3" | "chain1x1" | "pool1x1", `dkf_align.py`).
    """
    if backbone not in BACKBONES:
        raise HarnessError(f"unknown backbone '{backbone}'; known: {', '.join(BACKBONES)}")
    return BACKBONES[backbone](
        backbone=backbone, num_classes=num_classes, experts=experts, dkf=dkf, shortcut=shortcut, head=head,
        scale=scale, dkf_sources=dkf_sources, align_relu=align_relu, retrain_head=retrain_head,
        in_channels=in_channels, depth=depth, calibration=calibration, arrangement=arrangement,
        pretrained=pretrained, freeze=freeze, split=split, dkf_align=dkf_align)


def _cifar_experts(
    *,
    num_classes: int,
    experts: int,
    dkf: bool,
    shortcut: str,
    head: str,
    scale: float,
    dkf_sources: tuple[int, ...] | None,
    align_relu: str,
    retrain_head: bool,
    in_channels: int,
    depth: int,
    calibration: str,
    arrangement: str,
    **torchvision_only: object,
) -> ExpertResNet:
    """The CIFAR ResNet-32 family (`ExpertResNet`); an arrangement may use A (layer1) and C (layer2, the stage before
    the experts' own), Table 5's letters on this network (`CIFAR_DEPTH_LETTERS`)."""
    unused = {k: v for k, v in torchvision_only.items() if k != "backbone" and v != CIFAR_FIXED[k]}
    if unused:
        raise HarnessError(f"{', '.join(sorted(unused))} apply to the torchvision backbones only "
                           f"({', '.join(TV_BACKBONES)}), not to resnet32")
    if arrangement:
        dkf_sources = parse_arrangement(arrangement, cifar=True)
        experts = len(dkf_sources)
    sources = default_dkf_sources(experts) if dkf_sources is None else tuple(int(s) for s in dkf_sources)
    if dkf and len(sources) != experts:
        raise ValueError(f"dkf_sources has {len(sources)} entries for {experts} experts")
    if dkf and any(s not in (1, 2) for s in sources):
        raise ValueError(f"dkf_sources values must be 1 or 2, got {sources}")
    return ExpertResNet(
        num_classes=num_classes,
        experts=experts,
        dkf=dkf,
        shortcut=shortcut,
        head=head,
        scale=scale,
        dkf_sources=sources,
        align_relu=align_relu,
        retrain_head=retrain_head,
        in_channels=in_channels,
        depth=depth,
        calibration=calibration,
    )


# What the CIFAR model takes as fixed (the torchvision-only switches at their defaults).
CIFAR_FIXED = {"pretrained": None, "freeze": "none", "split": "layer4", "dkf_align": "conv3x3"}


def _torchvision_experts(*, backbone: str, experts: int, dkf: bool, dkf_sources: tuple[int, ...] | None,
                         arrangement: str, split: str, shortcut: str, depth: int, **kwargs: object) -> LTModel:
    """torchvision's ResNet-50 family (`resnet_tv.py`); `shortcut` and `depth` are CIFAR knobs and do not apply.
    Without an arrangement or dkf_sources, expert m fuses depth "ABC"[m % 3] (3 experts: ABC, Fig. 3)."""
    shared = STAGES_TV.index(split) if split in STAGES_TV else 3
    if arrangement:
        sources = parse_arrangement(arrangement, shared_stages=shared)
    elif dkf_sources is not None:
        sources = tuple(int(s) for s in dkf_sources)
    else:
        sources = tuple(1 + m % shared for m in range(experts))
    return build_tv_experts(backbone=backbone, experts=len(sources), sources=sources if dkf else (), split=split,
                            **kwargs)  # type: ignore[arg-type]


# backbone name -> model builder; every builder takes build_expert_resnet's keywords.
BACKBONES: dict[str, Callable[..., LTModel]] = {
    "resnet32": _cifar_experts,
    **dict.fromkeys(TV_BACKBONES, _torchvision_experts),
}
