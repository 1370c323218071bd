"""The depth-preference probe behind SHIKE's Figure 1: a ResNet-32 with branches from its shared stages.

Paper, Sec. 1 and the Fig. 1 caption: "a ResNet-32 model with two shallow branches and a deep branch", jointly
trained on CIFAR-100-LT; "each branch contains an independent classifier after feature alignment, and all
classifiers are re-trained with balanced softmax cross entropy"; the figure keeps, per class, the best branch.

Here a branch from layer1 or layer2 is aligned to 64x8x8 by the same strided convs SHIKE's DKF uses
(`ShallowAligner`), average-pooled and classified; the deep branch is layer3, pooled, as in a plain ResNet-32.
The model's `expert_logits` stack the branches (shallow ones first, deep last), so the evaluator's per-expert
per-class accuracy is exactly what Fig. 1 plots. `logits` (inference, top-1) is the deep branch alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from harness.errors import HarnessError
from harness.method import LossTerm, LTModel, MethodSpec, ModelOutput, Stage
from harness.methods.losses import ExpertCE
from harness.methods.models.heads import make_head
from harness.methods.models.moe import STAGE_WIDTHS, ShallowAligner
from harness.methods.models.resnet_cifar import Stem, blocks_per_stage, init_weights, make_stage
from harness.methods.shike import classifier_retraining, parse_sources
from harness.registry import METHODS


class BranchResNet(LTModel):
    """CIFAR ResNet-32 with one classifier per branch: each shallow stage in `shallow` (1 = layer1, 2 = layer2,
    aligned to 64x8x8) and the deep stage (layer3). With `joint` False the shallow branches see detached features,
    so their losses train only their own aligner and head and the trunk is a plain ResNet-32."""

    def __init__(self, *, num_classes: int, shallow: tuple[int, ...], joint: bool, shortcut: str, head: str,
                 scale: float, align_relu: str, in_channels: int = 3, depth: int = 32) -> None:
        super().__init__()
        self.shallow, self.joint = tuple(shallow), joint
        self.num_experts = len(self.shallow) + 1
        self.active_head = "head"
        self.stem = Stem(in_channels, STAGE_WIDTHS[0])
        blocks = blocks_per_stage(depth)
        self.layer1 = make_stage(STAGE_WIDTHS[0], STAGE_WIDTHS[0], blocks, stride=1, option=shortcut)
        self.layer2 = make_stage(STAGE_WIDTHS[0], STAGE_WIDTHS[1], blocks, stride=2, option=shortcut)
        self.layer3 = make_stage(STAGE_WIDTHS[1], STAGE_WIDTHS[2], blocks, stride=2, option=shortcut)
        width = STAGE_WIDTHS[2]
        self.heads = nn.ModuleList(make_head(head, width, num_classes, scale) for _ in range(self.num_experts))
        self.retrain_heads = nn.ModuleList(make_head(head, width, num_classes, scale)
                                           for _ in range(self.num_experts))
        self.apply(init_weights)
        # As in SHIKE's model, the aligner convs keep PyTorch's default init (built after init_weights).
        self.aligners = nn.ModuleList(ShallowAligner(s, align_relu) for s in self.shallow)

    def architecture(self) -> dict[str, object]:
        sources = ",".join(f"layer{s}" for s in self.shallow)
        return {"experts": self.num_experts, "dkf": False, "dkf_sources": f"branches:{sources},layer3",
                "head": type(self.heads[0]).__name__}

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        trunk = (self.stem, self.layer1, self.layer2, self.layer3, self.aligners)
        return {"backbone": [p for m in trunk for p in m.parameters()], "head": list(self.heads.parameters()),
                "retrain_head": list(self.retrain_heads.parameters())}

    def forward(self, x: torch.Tensor) -> ModelOutput:
        out1 = self.layer1(self.stem(x))
        out2 = self.layer2(out1)
        stages = (out1, out2)
        maps = [aligner(stages[s - 1] if self.joint else stages[s - 1].detach())
                for s, aligner in zip(self.shallow, self.aligners, strict=True)]
        maps.append(self.layer3(out2))
        heads = self.retrain_heads if self.active_head == "retrain_head" else self.heads
        features = torch.stack([m.mean(dim=(2, 3)) for m in maps])
        expert_logits = torch.stack([head(f) for head, f in zip(heads, features, strict=True)])
        return ModelOutput(logits=expert_logits[-1], expert_logits=expert_logits, features=features)


def branch_names(shallow: Sequence[int]) -> tuple[str, ...]:
    """Display names of the branches, in `expert_logits` order: ("layer1", "layer2", "layer3 (deep)")."""
    return (*(f"layer{s}" for s in shallow), "layer3 (deep)")


@METHODS.register("branches")
def branches(
    *,
    num_classes: int,
    class_counts: Sequence[int],
    shallow: str = "1,2",
    joint: bool = True,
    head: str = "cosine",
    scale: float = 30.0,
    shortcut: str = "B",
    align_relu: str = "code",
    freeze_bn_stage2: bool = False,
    depth: int = 32,
    backbone: str = "resnet32",
) -> MethodSpec:
    """SHIKE Fig. 1 probe: ResNet-32 with a classifier on each of its branches.

    shallow: the shared stages that get a branch ("1,2": the paper's two shallow branches; "2": layer2 only).
    joint: the paper's "jointly trained" (every branch's CE reaches the trunk); False detaches the shallow
    features, so the trunk is a plain CE ResNet-32 and the shallow branches are probes of it.
    Stage 1: CE summed over branches. Stage 2 (Eq. 11): fresh heads for every branch, balanced softmax, trunk
    and aligners frozen.
    backbone: "resnet32" only (Fig. 1 is a CIFAR ResNet-32 figure; this probe has its own model, not
    `build_expert_resnet`, so the torchvision backbones are refused rather than silently ignored).
    """
    if backbone != "resnet32":
        raise HarnessError(f"branches is the CIFAR ResNet-32 probe of Fig. 1; backbone '{backbone}' is not built for "
                           "it (use backbone=resnet32)")
    sources = parse_sources(shallow) or ()
    model = BranchResNet(num_classes=num_classes, shallow=sources, joint=joint, shortcut=shortcut, head=head,
                         scale=scale, align_relu=align_relu, depth=depth)
    representation = Stage("representation", (LossTerm("ce", 1.0, ExpertCE()),), epochs=200, peak_lr=0.15)
    return MethodSpec(model, (representation, classifier_retraining(class_counts, freeze_bn_stage2)),
                      notes={"branches": ",".join(branch_names(sources))})
