"""K complete networks trained jointly (NCL's "3N", Li et al., CVPR 2022): nothing shared, each a one-expert CIFAR
ResNet (or a torchvision ResNet-50-family network, `backbone`); forward stacks their logits as `expert_logits`
(K, B, C) and averages them for inference (NCL's ensemble)."""

from __future__ import annotations

import torch
from torch import nn

from harness.method import LTModel, ModelOutput
from harness.methods.models.moe import build_expert_resnet


class NetworkEnsemble(LTModel):
    def __init__(self, *, networks: int, num_classes: int, head: str, shortcut: str, depth: int,
                 scale: float = 30.0, backbone: str = "resnet32", pretrained: str | None = None,
                 freeze: str = "none") -> None:
        super().__init__()
        if networks < 1:
            raise ValueError(f"networks must be >= 1, got {networks}")
        self.num_classes = num_classes
        self.networks = nn.ModuleList(
            build_expert_resnet(num_classes=num_classes, experts=1, dkf=False, shortcut=shortcut, head=head,
                                scale=scale, retrain_head=False, depth=depth, backbone=backbone,
                                pretrained=pretrained, freeze=freeze) for _ in range(networks))

    def architecture(self) -> dict[str, object]:
        first = self.networks[0].architecture()
        return {**first, "networks": len(self.networks), "experts": len(self.networks)}

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        groups: dict[str, list[nn.Parameter]] = {"backbone": [], "head": []}
        for network in self.networks:
            for name, params in network.parameter_groups().items():
                groups.setdefault(name, []).extend(params)  # "trunk" too, where frozen
        return groups

    def classifiers(self) -> list[nn.Module]:
        return [head for network in self.networks for head in network.classifiers()]

    def forward(self, x: torch.Tensor) -> ModelOutput:
        outs = [network(x) for network in self.networks]
        expert_logits = torch.cat([o.expert_logits for o in outs])
        features = torch.cat([o.features for o in outs]) if all(o.features is not None for o in outs) else None
        return ModelOutput(logits=expert_logits.mean(dim=0), expert_logits=expert_logits, features=features)
