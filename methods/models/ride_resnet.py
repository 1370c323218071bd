"""RIDE- and TLC-style multi-expert CIFAR ResNets: a shared stem (and shared early stages), then per-expert copies
of the later stages, each ending in its own cosine head (s * cos, no bias).

- RIDE (Wang et al., ICLR 2021; `model/ldam_drw_resnets/ride_resnet_cifar.py`, `reduce_dimension=True`): stem and
  layer1 (16 ch) shared; each expert owns layer2 and layer3 narrowed to 24 / 48 channels. Optional expert router
  ("EA", `ea_resnet_cifar.py`), trained in a stage of its own, stops adding experts per sample at inference.
- TLC (Li et al., CVPR 2022; `model/ResnetCifar.py: ResNet_s`): only the stem shared; each expert owns a full
  16/32/64 layer1..layer3. Inference fuses the experts with weights from their evidential uncertainty.

The router / teacher (`RideRouting`) and TLC's fusion (`TLCFusion`) are mixins over the network, so the torchvision
versions (`tv_experts.TorchvisionRide`, `TorchvisionTLC`) reuse them with the same forward contract.

Both official files use zero-padding (option A) shortcuts that pad (planes - in_planes) // 2 channels on each side,
which also covers RIDE's 16 -> 24 and 24 -> 48 widenings (the harness's `PadShortcut` assumes a doubling).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.method import LTModel, ModelOutput
from harness.methods.losses_moe import tlc_engagement
from harness.methods.models.heads import CosineHead
from harness.methods.models.resnet_cifar import Stem, blocks_per_stage, init_weights, make_stage

RIDE_WIDTHS = (16, 24, 48)  # reduce_dimension=True: layer2 / layer3 at 24 / 48 (ride_resnet_cifar.py)
FULL_WIDTHS = (16, 32, 64)  # the LDAM ResNet-32 widths (TLC's experts, RIDE with reduce_dimension=False)


class ChannelPadShortcut(nn.Module):
    """Option-A shortcut for any widening: subsample by `stride` and zero-pad (planes - in_planes) // 2 channels on
    each side (the official `LambdaLayer` of RIDE and TLC)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        if (planes - in_planes) % 2 or planes < in_planes:
            raise ValueError(f"option A pads an even number of channels, got {in_planes} -> {planes}")
        self.pad, self.stride = (planes - in_planes) // 2, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)


def expert_stage(in_planes: int, planes: int, blocks: int, stride: int, option: str) -> nn.Sequential:
    """`make_stage`, but option A may widen by any even amount (RIDE's 16 -> 24 -> 48)."""
    if option != "A" or (stride == 1 and in_planes == planes):
        return make_stage(in_planes, planes, blocks, stride, option)
    stage = make_stage(in_planes, planes, blocks, stride, "B")
    stage[0].shortcut = ChannelPadShortcut(in_planes, planes, stride)  # drop the 1x1 projection: parameter-free
    return stage


@dataclass
class RoutedOutput(ModelOutput):
    """ModelOutput plus what RIDE's extra terms read in training: `router_logits` (K-1, B), the router's "the next
    expert helps" logit after each of the first K-1 experts; `teacher_logits` (B, C), a frozen teacher's output."""

    router_logits: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None


class SharedTrunkExperts:
    """The forward of a model with a shared trunk (`stem`, `shared_stages`), per-expert `expert_stages` and `heads`:
    each expert pools its last map and applies its head; the output is `aggregate` (the mean here) of the logits.
    `trunk(x)` is the shared part's output (a frozen trunk runs it without gradients: `tv_experts.FrozenTrunk`)."""

    stem: nn.Module
    shared_stages: nn.Module
    expert_stages: nn.ModuleList
    heads: nn.ModuleList

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared_stages(self.stem(x))

    def experts_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features (K, B, D) and logits (K, B, C) of every expert."""
        shared = self.trunk(x)
        features = torch.stack([stages(shared).mean(dim=(2, 3)) for stages in self.expert_stages])
        logits = torch.stack([head(f) for head, f in zip(self.heads, features, strict=True)])
        return features, logits

    def aggregate(self, expert_logits: torch.Tensor) -> torch.Tensor:
        return expert_logits.mean(dim=0)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        features, expert_logits = self.experts_forward(x)
        return ModelOutput(self.aggregate(expert_logits), expert_logits, features)


class MultiExpertResNet(SharedTrunkExperts, LTModel):
    """stem -> the first `shared` stages (shared) -> per expert: the remaining stages, average pool, cosine head.

    forward(x) -> ModelOutput(logits = `aggregate(expert_logits)` (the mean here), expert_logits (K, B, C),
    features (K, B, widths[2])). Parameter groups: "backbone" (stem, shared and expert stages), "head" (the K heads).
    """

    def __init__(self, *, num_classes: int, experts: int, widths: tuple[int, int, int], shared: int, depth: int,
                 shortcut: str, scale: float, in_channels: int = 3) -> None:
        super().__init__()
        if experts < 1 or shared not in (0, 1, 2):
            raise ValueError(f"need experts >= 1 and 0 <= shared <= 2, got {experts}, {shared}")
        blocks = blocks_per_stage(depth)
        self.num_classes, self.num_experts, self.depth = num_classes, experts, depth
        self.widths, self.shared = tuple(widths), shared
        self.feature_dim = widths[2]
        ins = (widths[0], *widths[:2])  # stage j maps ins[j] -> widths[j]; layer1 keeps the stem's width
        strides = (1, 2, 2)

        def stages(indices: range) -> nn.Sequential:
            return nn.Sequential(*(expert_stage(ins[j], widths[j], blocks, strides[j], shortcut) for j in indices))

        self.stem = Stem(in_channels, widths[0])
        self.shared_stages = stages(range(shared))
        self.expert_stages = nn.ModuleList(stages(range(shared, 3)) for _ in range(experts))
        self.heads = nn.ModuleList(CosineHead(self.feature_dim, num_classes, scale) for _ in range(experts))
        self.apply(init_weights)  # official `_weights_init`: Kaiming on convs; the cosine heads keep their own init

    def architecture(self) -> dict[str, object]:
        shared = "+".join(["stem", *(f"layer{j + 1}" for j in range(self.shared))])
        return {"depth": self.depth, "experts": self.num_experts, "widths": ",".join(map(str, self.widths)),
                "shared": shared, "head": type(self.heads[0]).__name__}

    def classifiers(self) -> list[nn.Module]:
        return list(self.heads)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        backbone = [*self.stem.parameters(), *self.shared_stages.parameters(), *self.expert_stages.parameters()]
        return {"backbone": backbone, "head": list(self.heads.parameters())}



class ExpertRouter(nn.Module):
    """RIDE's expert assignment module (`ea_resnet_cifar.py: pred_expert_help`). After expert k (k < K-1): a hidden
    FC (D -> 16, ReLU) of expert k's L2-normalised pooled feature, concatenated after the top-`top_choices` logits
    of the running ensemble (the mean of experts 0..k), into one FC shared by all k -> the logit of "expert k+1
    helps". CIFAR config (`config_imbalance_cifar100_ride_ea.json`): top 30; at most C values on fewer classes."""

    def __init__(self, experts: int, feature_dim: int, num_classes: int, top_choices: int = 30,
                 hidden: int = 16) -> None:
        super().__init__()
        self.top_choices = min(top_choices, num_classes)
        self.hidden = nn.ModuleList(nn.Linear(feature_dim, hidden) for _ in range(experts - 1))
        self.decide = nn.Linear(hidden + self.top_choices, 1)
        self.apply(init_weights)  # the official model's `_weights_init` reaches these Linear layers too

    def forward(self, k: int, feature: torch.Tensor, running_logits: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.hidden[k](F.normalize(feature, dim=1)))
        top = running_logits.topk(self.top_choices, dim=1).values
        return self.decide(torch.cat([top, hidden], dim=1)).squeeze(1)


class RideRouting:
    """RIDE's expert router and teacher on top of any multi-expert network with `experts_forward(x)` -> (features
    (K, B, D), logits (K, B, C)) and `num_experts` (the CIFAR `MultiExpertResNet` here, the torchvision one in
    `tv_experts.py`); list it before that network's class.

    With a `router`: in training the output carries `router_logits` (K-1, B), computed on the running means of the
    first k+1 experts; at inference each sample adds experts in order while the router says sigmoid > 0.5 (official
    test-time loop), and `logits` is the mean over the experts it used. Every expert is still computed for every
    sample, so `expert_logits` stays (K, B, C) for the per-expert diagnostics and the FLOP count is the full model's
    (an upper bound of the routed cost). `experts_used` (K,) counts, over the eval-mode forwards since the last
    `reset_routing()`, the samples that used 1..K experts; `mean_experts_used()` summarises it.

    `teacher`: a frozen RIDE model (distillation): run in eval mode on each training batch and returned as
    `teacher_logits`. It is kept outside the module tree (not a submodule), so it is not in `parameters()`,
    `state_dict()` or any parameter group; `.to()` and the like move it with the student (`_apply`).
    """

    experts_used: torch.Tensor
    num_experts: int
    router: ExpertRouter | None

    def __init__(self, *, router: ExpertRouter | None = None, teacher: nn.Module | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.router = router
        self._teacher = (teacher.eval().requires_grad_(False),) if teacher is not None else ()
        self.register_buffer("experts_used", torch.zeros(self.num_experts, dtype=torch.long), persistent=False)

    @property
    def teacher(self) -> nn.Module | None:
        return self._teacher[0] if self._teacher else None

    def architecture(self) -> dict[str, object]:
        facts = {**super().architecture(), "router": self.router is not None}
        if self.teacher is not None:
            facts["teacher_experts"] = self.teacher.num_experts
        return facts

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = super().parameter_groups()
        if self.router is not None:
            groups["router"] = list(self.router.parameters())
        return groups

    def reset_routing(self) -> None:
        self.experts_used.zero_()

    def mean_experts_used(self) -> float:
        """Mean number of experts per sample over the routed eval forwards counted (nan before any)."""
        counts = self.experts_used.double()
        total = counts.sum()
        ks = torch.arange(1, self.num_experts + 1, dtype=torch.float64, device=counts.device)
        return float((counts * ks).sum() / total) if total > 0 else float("nan")

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - torch's signature
        """`.to()`, `.cuda()`, `.half()`, ... reach the teacher too (it is no submodule)."""
        super()._apply(fn, recurse)
        for teacher in self._teacher:
            teacher._apply(fn, recurse)
        return self

    def _teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._teacher[0].eval()(x).logits.float()

    def _router_logits(self, features: torch.Tensor, expert_logits: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(1, self.num_experts + 1, device=expert_logits.device, dtype=expert_logits.dtype)
        running = expert_logits.cumsum(dim=0) / steps[:, None, None]
        return torch.stack([self.router(k, features[k], running[k]) for k in range(self.num_experts - 1)])

    def _routed(self, features: torch.Tensor, expert_logits: torch.Tensor) -> torch.Tensor:
        """Official test-time loop: start from expert 0; expert k joins while every earlier router said "helps"."""
        total, used = expert_logits[0], torch.ones_like(expert_logits[0, :, 0])
        active = torch.ones_like(used, dtype=torch.bool)
        for k in range(1, self.num_experts):
            active = active & (self.router(k - 1, features[k - 1], total / used[:, None]) > 0)  # sigmoid > 0.5
            total = total + active[:, None] * expert_logits[k]
            used = used + active
        self.experts_used += torch.bincount(used.long() - 1, minlength=self.num_experts)
        return total / used[:, None]

    def forward(self, x: torch.Tensor) -> RoutedOutput:
        features, expert_logits = self.experts_forward(x)
        out = RoutedOutput(expert_logits.mean(dim=0), expert_logits, features)
        if self.router is not None and self.training:
            out.router_logits = self._router_logits(features, expert_logits)
        elif self.router is not None:
            out.logits = self._routed(features, expert_logits)
        if self.teacher is not None and self.training:
            out.teacher_logits = self._teacher_logits(x)
        return out


class RideResNet(RideRouting, MultiExpertResNet):
    """RIDE: stem + layer1 shared, per-expert layer2/layer3 (24/48 with reduce_dimension), cosine heads s = 30,
    output the mean of the expert logits; router and teacher as `RideRouting`."""


def fuse_over_experts(weights: torch.Tensor, eta: float) -> torch.Tensor:
    """softmax_k(w_k / eta) per sample: the paper's fusion weights (TLC Eq. 9; baselines.md section 17)."""
    return (weights / eta).softmax(dim=0)


def fuse_over_batch(weights: torch.Tensor, eta: float) -> torch.Tensor:
    """The official `ResNet_s.forward`: exp(w_k / eta) normalised over the *batch* for each expert, so a sample's
    prediction depends on the rest of its batch."""
    return (weights / eta).softmax(dim=1)


TLC_FUSIONS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {"paper": fuse_over_experts,
                                                                         "code": fuse_over_batch}


class TLCFusion:
    """TLC's output rule on top of any multi-expert network (list it before that network's class): in training (the
    diversity target of TLC's loss) and at inference alike, sum_k a_k * z_k with a = `fusion` of the engagement
    weights w (`tlc_engagement`: w_0 = 1, w_{k+1} = w_k u_k / (1 - c_k), detached), eta 0.2."""

    def __init__(self, *, eta: float = 0.2, fusion: str = "paper", **kwargs) -> None:
        if fusion not in TLC_FUSIONS:
            raise ValueError(f"unknown TLC fusion '{fusion}'; known: {', '.join(TLC_FUSIONS)}")
        super().__init__(**kwargs)
        self.eta, self.fusion = eta, fusion

    def architecture(self) -> dict[str, object]:
        return {**super().architecture(), "fusion": self.fusion}

    def aggregate(self, expert_logits: torch.Tensor) -> torch.Tensor:
        # float64: with s = 30, 1 - conflict falls to ~e^-30 when two experts confidently disagree, which float32
        # rounds to 0 (w -> inf, the fusion NaN); the exact w is always in [0, 1].
        weights = TLC_FUSIONS[self.fusion](tlc_engagement(expert_logits.double()), self.eta)
        return (weights.to(expert_logits.dtype)[..., None] * expert_logits).sum(dim=0)


class TLCResNet(TLCFusion, MultiExpertResNet):
    """TLC: only the stem shared, each expert a full 16/32/64 ResNet trunk with a cosine head (s = 30); output as
    `TLCFusion`."""
