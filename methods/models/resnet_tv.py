"""SHIKE's multi-expert model on torchvision's ResNet-50 family (ImageNet-LT, iNaturalist 2018, Places-LT; paper
Sec. 4.2, Tables 2, 3 and 5), built from torchvision's own definitions (`resnet50`, `resnext50_32x4d`,
`resnet152` with weights=None): their stem (conv1, bn1, relu, maxpool) and stages are taken as modules.

Split (`split`, the first stage each expert owns):
- "layer4" (default): stem + layer1-3 shared (S = 3), each expert owns a copy of layer4. The paper (Sec. 3.1) makes
  "only the last stage" exclusive, and S = 3 gives three distinct DKF depths A/B/C for Table 5's three experts
  (M <= S, Sec. 3.2); reference/large-scale-lt.md 2.5 and 3.3.
- "layer3": stem + layer1-2 shared, each expert owns layer3 + layer4 at full width (RIDE/SADE's split without their
  width reduction); only depths A and B remain shared.

Expert m: f_m = its stages applied to the last shared output (2048x7x7 at 224x224, post-ReLU); with DKF (Eq. 3)
f_m * Align_m(shared output of depth d(m)) with `dkf_align`'s design (`dkf_align.py`); then global average pooling
and the expert's head (cosine s = 30 or linear, `heads.py`). Inference: the mean of the expert logits.

Initialisation: the trunk and expert 0's stages come from one torchvision model; every further expert gets stages
built by torchvision's own `ResNet` class with the same block, groups and widths (fresh, independent init, without
paying for another full trunk). `pretrained` loads a torchvision-format state dict into the trunk and copies its
stages into every expert (SADE's Places recipe; reference 2.3); aligners and heads stay random.
`freeze="trunk"` keeps the shared part fixed (Places-LT, Sec. 4.2): its parameters are in their own group "trunk"
that no stage trains, its BN layers stay in eval mode, and it runs under no_grad (reference 2.5).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import resnet as tv_resnet

from harness.errors import HarnessError
from harness.method import LTModel, ModelOutput
from harness.methods.models.dkf_align import arrangement_name, make_aligner
from harness.methods.models.heads import CALIBRATIONS, make_head

TV_BACKBONES: dict[str, Callable[..., tv_resnet.ResNet]] = {
    "resnet50": torchvision.models.resnet50,
    "resnext50_32x4d": torchvision.models.resnext50_32x4d,
    "resnet152": torchvision.models.resnet152,
}
STAGES = ("layer1", "layer2", "layer3", "layer4")
SPLITS = ("layer4", "layer3")
FREEZE_MODES = ("none", "trunk")
PRETRAINED_TAG = "IMAGENET1K_V1"  # NCL's and PaCo's Places weights (reference 2.3, 2.5); torchvision's DEFAULT is V2


def stage_width(stage: nn.Sequential) -> int:
    """Output channels of a torchvision ResNet stage (its last block's last conv)."""
    block = stage[-1]
    return (block.conv3 if hasattr(block, "conv3") else block.conv2).out_channels


def fresh_stages(net: tv_resnet.ResNet, names: Sequence[str]) -> list[nn.Sequential]:
    """New, independently initialised stages `names` shaped like `net`'s, from torchvision's `ResNet` class with the
    same block type, groups and base width (every other stage one block, discarded)."""
    block = type(net.layer4[0])
    layers = [len(getattr(net, n)) if n in names else 1 for n in STAGES]
    fresh = tv_resnet.ResNet(block, layers, groups=net.groups, width_per_group=net.base_width, num_classes=1)
    return [getattr(fresh, n) for n in names]


def _check_hash(path: Path) -> None:
    """torchvision's file names end in the first hex digits of the file's SHA-256 (`resnet152-394f9c45.pth`)."""
    match = re.search(r"-([0-9a-f]{8,})\.pth?$", path.name)
    if match is None:
        return
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(match.group(1)):
        raise HarnessError(f"{path}: SHA-256 {digest[:8]} does not match the '{match.group(1)}' in its name; the file "
                           "is damaged or not the one named")


def pretrained_state(source: str, backbone: str) -> dict[str, torch.Tensor]:
    """The state dict `source` names: "torchvision" (torchvision's IMAGENET1K_V1 weights, downloaded once into the
    torch hub cache) or the path of a torchvision-format state dict."""
    if source == "torchvision":
        weights = torchvision.models.get_model_weights(backbone)[PRETRAINED_TAG]
        notes = io.StringIO()  # torch.hub's "Downloading: ..." line, shown only if the download works
        try:
            with contextlib.redirect_stdout(notes):
                state = weights.get_state_dict(progress=False, check_hash=True)
        except OSError as error:  # URLError is an OSError: offline or blocked
            raise HarnessError(f"could not download torchvision's {backbone} {PRETRAINED_TAG} weights ({error}); "
                               f"fetch {weights.url} elsewhere and set method.pretrained=PATH") from None
        sys.stdout.write(notes.getvalue())
        return state
    path = Path(source).expanduser()
    if not path.is_file():
        raise HarnessError(f"pretrained weights '{source}' not found; give a torchvision state-dict file or "
                           "'torchvision'")
    _check_hash(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise HarnessError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def load_pretrained(net: tv_resnet.ResNet, source: str, backbone: str) -> None:
    """Load `source` into `net`, every key but the classifier (`fc.*`, sized for ImageNet's 1,000 classes)."""
    state = {k: v for k, v in pretrained_state(source, backbone).items() if not k.startswith("fc.")}
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise HarnessError(f"pretrained '{source}' does not fit torchvision's {backbone}: "
                           f"{str(error).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise HarnessError(f"pretrained '{source}' is not a torchvision {backbone} state dict (missing "
                           f"{missing[:2]}, unexpected {unexpected[:2]})")


class TorchvisionExperts(LTModel):
    """Shared torchvision trunk, per-expert last stage(s), optional DKF aligners, per-expert heads.

    forward(x) -> ModelOutput(logits = mean of expert logits, expert_logits (M, B, C), features (M, B, 2048)).
    `input_size` is the resolution the backbone is meant for (`harness describe` counts FLOPs at it).
    """

    input_size = 224

    def __init__(self, *, backbone: str, stem: nn.Module, shared: Sequence[nn.Module],
                 expert_stages: Sequence[nn.Module], aligners: Sequence[nn.Module], sources: tuple[int, ...],
                 heads: Sequence[nn.Module], retrain_heads: Sequence[nn.Module] | None,
                 calibrations: Sequence[nn.Module] | None, freeze: str, facts: dict[str, object]) -> None:
        super().__init__()
        self.backbone, self.freeze, self.dkf_sources = backbone, freeze, sources
        self.num_experts = len(expert_stages)
        self.stem, self.shared = stem, nn.ModuleList(shared)
        self.expert_stages = nn.ModuleList(expert_stages)
        self.aligners = nn.ModuleList(aligners)
        self.heads = nn.ModuleList(heads)
        self.retrain_heads = nn.ModuleList(retrain_heads) if retrain_heads is not None else None
        self.calibrations = nn.ModuleList(calibrations) if calibrations is not None else None
        self.feature_dim = stage_width(expert_stages[0][-1])
        self._facts = facts
        self.active_head = "head"
        if freeze == "trunk":
            for p in self.trunk_parameters():
                p.requires_grad_(False)
            self.train(self.training)

    def trunk_parameters(self) -> list[nn.Parameter]:
        return [*self.stem.parameters(), *self.shared.parameters()]

    def train(self, mode: bool = True) -> TorchvisionExperts:
        """A frozen trunk stays in eval mode (its BN running statistics fixed) whatever the stage asks."""
        super().train(mode)
        if self.freeze == "trunk":
            self.stem.eval()
            self.shared.eval()
        return self

    def architecture(self) -> dict[str, object]:
        return dict(self._facts)

    def classifiers(self) -> list[nn.Module]:
        heads = self.retrain_heads if self.active_head == "retrain_head" else self.heads
        assert heads is not None
        return list(heads)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        experts = [*self.expert_stages.parameters(), *self.aligners.parameters()]
        trunk = self.trunk_parameters()
        # A frozen trunk is its own group, which no stage lists in `trainable`, so the trainer keeps it frozen.
        groups = {"backbone": experts if self.freeze == "trunk" else trunk + experts,
                  "head": list(self.heads.parameters())}
        if self.freeze == "trunk":
            groups["trunk"] = trunk
        if self.retrain_heads is not None:
            groups["retrain_head"] = list(self.retrain_heads.parameters())
        if self.calibrations is not None:
            groups["calibration"] = list(self.calibrations.parameters())
        return groups

    def _trunk(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs, out = [], self.stem(x)
        for stage in self.shared:
            out = stage(out)
            outs.append(out)
        return outs

    def forward(self, x: torch.Tensor) -> ModelOutput:
        if self.freeze == "trunk":
            with torch.no_grad():
                shared = self._trunk(x)
        else:
            shared = self._trunk(x)
        heads = self.retrain_heads if self.active_head == "retrain_head" else self.heads
        assert heads is not None
        features, logits = [], []
        for m, (stages, head) in enumerate(zip(self.expert_stages, heads, strict=True)):
            fused = stages(shared[-1])
            if self.dkf_sources:  # paper Eq. 3: Hadamard product with the aligned shallower map
                fused = fused * self.aligners[m](shared[self.dkf_sources[m] - 1])
            pooled = fused.mean(dim=(2, 3))
            features.append(pooled)
            z = head(pooled)
            logits.append(z if self.calibrations is None else self.calibrations[m](z, pooled))
        expert_logits = torch.stack(logits)
        return ModelOutput(logits=expert_logits.mean(dim=0), expert_logits=expert_logits,
                           features=torch.stack(features))


def _check_switches(backbone: str, split: str, freeze: str, calibration: str, in_channels: int) -> None:
    if backbone not in TV_BACKBONES:
        raise HarnessError(f"unknown torchvision backbone '{backbone}'; known: {', '.join(TV_BACKBONES)}")
    if split not in SPLITS:
        raise HarnessError(f"unknown split '{split}' (the first stage each expert owns); known: {', '.join(SPLITS)}")
    if freeze not in FREEZE_MODES:
        raise HarnessError(f"unknown freeze '{freeze}'; known: {', '.join(FREEZE_MODES)}")
    if calibration != "none" and calibration not in CALIBRATIONS:
        raise HarnessError(f"unknown calibration '{calibration}'; known: none, {', '.join(CALIBRATIONS)}")
    if in_channels != 3:
        raise HarnessError(f"torchvision backbones take 3-channel images, got in_channels={in_channels}")


def build_tv_experts(*, backbone: str, num_classes: int, experts: int, sources: tuple[int, ...] = (),
                     head: str = "cosine", scale: float = 30.0, split: str = "layer4", dkf_align: str = "conv3x3",
                     align_relu: str = "code", retrain_head: bool = True, pretrained: str | None = None,
                     freeze: str = "none", calibration: str = "none", in_channels: int = 3) -> TorchvisionExperts:
    """Build the model; `sources` (one shared depth 1..S per expert, from `dkf_align.parse_arrangement`) turns DKF
    on, () leaves it off. See the module docstring for the other switches."""
    _check_switches(backbone, split, freeze, calibration, in_channels)
    if experts < 1:
        raise HarnessError(f"experts must be >= 1, got {experts}")
    shared_count = STAGES.index(split)
    if sources and (len(sources) != experts or not all(1 <= s <= shared_count for s in sources)):
        raise HarnessError(f"DKF sources {sources} do not fit {experts} experts over {shared_count} shared stages")
    net = TV_BACKBONES[backbone](weights=None)
    if pretrained:
        load_pretrained(net, pretrained, backbone)
    own = STAGES[shared_count:]
    stage_sets = [[getattr(net, n) for n in own]] + [fresh_stages(net, own) for _ in range(experts - 1)]
    if pretrained:  # every expert starts from the pretrained stages (SADE's copy of layer3/4 into each expert)
        for stages in stage_sets[1:]:
            for name, stage in zip(own, stages, strict=True):
                stage.load_state_dict(getattr(net, name).state_dict())
    widths = [stage_width(getattr(net, n)) for n in STAGES]
    aligners = [make_aligner(dkf_align, widths[s - 1:], align_relu) for s in sources]
    feature_dim = widths[-1]
    heads = [make_head(head, feature_dim, num_classes, scale) for _ in range(experts)]
    facts: dict[str, object] = {
        "backbone": backbone, "experts": experts, "dkf": bool(sources),
        "dkf_sources": ",".join(f"layer{s}" for s in sources) or "none",
        "arrangement": arrangement_name(sources) if sources else "none", "split": split,
        "dkf_align": dkf_align if sources else "none", "pretrained": pretrained or "none", "freeze": freeze,
        "head": type(heads[0]).__name__}
    calibrations = None
    if calibration != "none":
        calibrations = [CALIBRATIONS[calibration](feature_dim, num_classes) for _ in range(experts)]
        facts["calibration"] = type(calibrations[0]).__name__
    return TorchvisionExperts(
        backbone=backbone, stem=nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool),
        shared=[getattr(net, n) for n in STAGES[:shared_count]],
        expert_stages=[nn.Sequential(*stages) for stages in stage_sets], aligners=aligners, sources=sources,
        heads=heads,
        retrain_heads=[make_head(head, feature_dim, num_classes, scale) for _ in range(experts)]
        if retrain_head else None,
        calibrations=calibrations, freeze=freeze, facts=facts)
