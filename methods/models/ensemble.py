"""K complete networks trained jointly (NCL's "3N", Li et al., CVPR 2022): nothing shared, each a one-expert CIFAR
ResNet (or a torchvision ResNet-50-family network, `backbone`); forward stacks their logits as `expert_logits`
(K, B, C) and averages them for inference (NCL's ensemble). `MoCoEnsemble` adds NCL's optional MoCo branch."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import HarnessError
from harness.method import LTModel, ModelOutput
from harness.methods.models.contrastive import TRAINING_ONLY, KeyQueue, MoCoOutput, ProjectionMLP, ema_update
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


class MoCoEnsemble(NetworkEnsemble):
    """NCL's networks with the optional MoCo branch (`cifar100_im100_NCL_with_contrastive.yaml`, `lib/net/network.py:
    multi_Network_MOCO`, `lib/core/combiner.py: multi_network_default_CON`): each network k gets a projection MLP
    (feature -> feature -> `projection_dim`, Linear-ReLU-Linear with bias: `SEMI_TYPE 'mlp'`, `MOCO_DIM 64`), a
    momentum-averaged copy of its network and projection (`backbone_MA` + `classifier_MA`, `MA_MODEL_ALPHA 0.999`)
    and an unlabelled `KeyQueue` of `queue_size` keys (`MOCO_K 1024`).

    Training forward on [view 0; view 1] (the query view, then the key view): every network classifies view 0 (what
    NIL + NBOD see) and projects it to a query; then, under no_grad, each momentum copy moves k <- m k + (1 - m) q
    (`ema_update`, before the keys are computed, as PaCo's MoCo does), computes the keys of view 1, and the queues
    are snapshotted and then given the keys (unlabelled, so the model enqueues them itself; the loss sees the queue
    as it was before this batch, as NCL's `l_neg` uses `queue.clone().detach()` before `_dequeue_and_enqueue`).
    Evaluation: the plain ensemble on plain batches. Momentum copies and queues are in no parameter group: they
    never train, `inference_parameter_count` leaves them out, and they are saved in the model's state.

    Not reproduced: NCL's `shuffle_BN` of the key batch (a BN trick), and its momentum networks' independent random
    initialisation (`backbone_MA` is built separately in `network.py`; here, as in MoCo and PaCo, they start as
    exact copies of the query networks)."""

    def __init__(self, *, networks: int, num_classes: int, head: str, shortcut: str, depth: int,
                 scale: float = 30.0, backbone: str = "resnet32", pretrained: str | None = None,
                 freeze: str = "none", projection_dim: int = 64, queue_size: int = 1024,
                 momentum: float = 0.999) -> None:
        super().__init__(networks=networks, num_classes=num_classes, head=head, shortcut=shortcut, depth=depth,
                         scale=scale, backbone=backbone, pretrained=pretrained, freeze=freeze)
        if not 0.0 <= momentum <= 1.0:
            raise HarnessError(f"NCL's MoCo momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        width = self.networks[0].feature_dim
        self.projections = nn.ModuleList(ProjectionMLP(width, width, projection_dim, batch_norm=False)
                                         for _ in self.networks)
        self.key_networks = copy.deepcopy(self.networks)
        self.key_projections = copy.deepcopy(self.projections)
        for p in self.key_parameters():
            p.requires_grad_(False)
        self.queues = nn.ModuleList(KeyQueue(queue_size, projection_dim, normalise="key") for _ in self.networks)

    def architecture(self) -> dict[str, object]:
        return {**super().architecture(), "views": 2, "queue": self.queues[0].size, "momentum": self.momentum}

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {**super().parameter_groups(), "contrastive": list(self.projections.parameters())}

    def inference_parameter_count(self) -> int:
        """The networks alone: projections, momentum copies and queues never run at inference."""
        groups = self.parameter_groups()
        return sum(p.numel() for g, ps in groups.items() if g not in TRAINING_ONLY for p in ps)

    def query_parameters(self) -> list[nn.Parameter]:
        return [*self.networks.parameters(), *self.projections.parameters()]

    def key_parameters(self) -> list[nn.Parameter]:
        return [*self.key_networks.parameters(), *self.key_projections.parameters()]

    def momentum_update(self) -> None:
        """k <- k * m + q * (1 - m) for every momentum parameter (`MA_MODEL_ALPHA`)."""
        ema_update(self.key_parameters(), self.query_parameters(), self.momentum)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        if not self.training:
            return super().forward(x)
        if x.shape[0] % 2:
            raise HarnessError(f"NCL's MoCo branch trains on 2 views stacked view-major; got a batch of {x.shape[0]} "
                               "images (give its stage views=(View(),))")
        batch = x.shape[0] // 2
        out = super().forward(x[:batch])
        queries = torch.stack([F.normalize(projection(features), dim=1)
                               for projection, features in zip(self.projections, out.features)])
        with torch.no_grad():
            self.momentum_update()
            keys = torch.stack([F.normalize(projection(network(x[batch:]).features[0]), dim=1)
                                for network, projection in zip(self.key_networks, self.key_projections)])
            queue = torch.stack([q.features.clone() for q in self.queues])
            for q, k in zip(self.queues, keys):
                q.push(k)
        return MoCoOutput(logits=out.logits, expert_logits=out.expert_logits, features=out.features,
                          queries=queries, keys=keys, queue=queue)
