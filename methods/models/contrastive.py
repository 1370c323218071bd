"""Multi-view contrastive models: PaCo's MoCo model (Cui et al., ICCV 2021) and BCL's two-branch model (Zhu et al.,
CVPR 2022), on the CIFAR ResNet or a torchvision ResNet-50 / ResNeXt-50 / ResNet-152 (`backbone`). Both wrap one
plain network (`build_expert_resnet(experts=1, dkf=False)`: trunk + classifier on the pooled feature) and add what
only training uses, in the parameter group "contrastive" (it trains with the backbone; `inference_parameter_count`
leaves it out, and the momentum copy is in no group at all). The pieces MoCo-style branches share (the key queues,
the EMA update, the projection MLP, the contrastive views) are here too: NCL's optional MoCo branch
(`harness.methods.models.ensemble.MoCoEnsemble`) reuses them.

Training batches come from a stage with views (`harness.method.View`): (V*B, C, H, W) = [view 0; view 1; ...].
Evaluation batches are plain (B, ...), and both models then return exactly their network's output: the classifier
on the query encoder's pooled feature, with no prior added (PaCo `_inference` returns `self.linear(feat)`; BCL's
`validate` takes the raw `self.fc(feat)` logits; the class prior enters only through the training losses).

Sources (snapshots in reference/baselines.md): dvlab-research/Parametric-Contrastive-Learning `PaCo/LT/moco/builder.py`
(MoCo, `_train`, `_momentum_update_key_encoder`, `_dequeue_and_enqueue`), `PaCo/LT/paco_cifar.py` (`--mlp` default
True, `--moco-dim 32`, `--moco-k 1024`, `--moco-m 0.999`); FlamieZhu/Balanced-Contrastive-Learning
`models/resnext.py: BCLModel` (head, fc, head_fc), with the CIFAR sizes 64 -> 512 -> 128 (BCL#7; no official CIFAR
code exists) and the ImageNet ones 2048 -> 2048 -> 1024 (`BCLModel(feat_dim=1024)`, `main.py --feat_dim 1024`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import HarnessError
from harness.method import LTModel, ModelOutput, View
from harness.methods.models.heads import CosineHead
from harness.methods.models.moe import build_expert_resnet

# Parameter groups that only training uses: excluded from `inference_parameter_count`.
TRAINING_ONLY = ("contrastive",)

# `views` switch of the contrastive builders -> the augmentation of their contrastive (key) views: "official" is
# PaCo's SimCLR-style "sim" view (PaCo and NCL: the key view; BCL: both contrastive views), "same" augments every
# view with the run's `data.augment` (the harness's behaviour before per-view augmentation).
CONTRASTIVE_VIEWS: dict[str, str | None] = {"official": "sim", "same": None}


def contrastive_view(views: str) -> View:
    """The extra view a contrastive builder adds for its `views` switch (`CONTRASTIVE_VIEWS`)."""
    if views not in CONTRASTIVE_VIEWS:
        raise HarnessError(f"method.views must be one of {', '.join(CONTRASTIVE_VIEWS)}, got '{views}'")
    return View(augment=CONTRASTIVE_VIEWS[views])


def queue_length(queue_size: int, queue_share: float, train_images: int) -> int:
    """K = min(queue_size, max(1, floor(queue_share * N))): the official 1024 keys are 9.4 % of CIFAR-100-LT's
    10,847 images (IF 100), and a queue longer than the data it summarises would hold its random initial keys (with
    random labels) for many epochs on a tiny set. The default share 0.1 keeps 1024 on every CIFAR-LT of IF <= 100
    (10 % of 10,847 = 1,084) and gives Fashion-MNIST-LT IF 100 (1,236 images) 123 keys."""
    if queue_share <= 0:
        raise HarnessError(f"method.queue_share must be > 0 (the queue's largest share of the training set), "
                           f"got {queue_share}")
    return max(1, min(queue_size, math.floor(queue_share * train_images)))


@torch.no_grad()
def ema_update(keys: Sequence[torch.Tensor], queries: Sequence[torch.Tensor], momentum: float) -> None:
    """k <- k * m + q * (1 - m) for every (key, query) pair, in place (MoCo's `_momentum_update_key_encoder`; PaCo
    builder.py, NCL's momentum-averaged model at MA_MODEL_ALPHA)."""
    keys = list(keys)
    torch._foreach_mul_(keys, momentum)
    torch._foreach_add_(keys, torch._foreach_mul(list(queries), 1.0 - momentum))


@dataclass
class ContrastiveOutput(ModelOutput):
    """A training forward's output: the `ModelOutput` fields for all V*B images (view-major; `features` are the
    pooled (1, V*B, F) maps, F the feature width) plus what the contrastive terms need. `embeddings` (V*B, D) are
    the L2-normalised projections (PaCo: [q; k], k from the momentum encoder and detached). PaCo: `queue_features` (K, D) and
    `queue_labels` (K,) are the queue as it was before this batch (official: `self.queue.clone().detach()` taken
    before `_dequeue_and_enqueue`). BCL: `prototypes` (C, D), the normalised class prototypes."""

    embeddings: torch.Tensor | None = None
    queue_features: torch.Tensor | None = None
    queue_labels: torch.Tensor | None = None
    prototypes: torch.Tensor | None = None


@dataclass
class MoCoOutput(ModelOutput):
    """A training forward's output of K networks with a MoCo branch each (NCL): the `ModelOutput` fields of view 0
    only (B images; the key view never reaches the classifiers), plus, per network k, `queries` (K, B, D) (the
    L2-normalised projections of view 0, with grad), `keys` (K, B, D) (the momentum network's on view 1, detached)
    and `queue` (K, Q, D), each network's queue as it was before this batch's keys were pushed."""

    queries: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    queue: torch.Tensor | None = None


class ProjectionMLP(nn.Sequential):
    """Linear(in, hidden) - BatchNorm1d - ReLU - Linear(hidden, out): PaCo's `--mlp` head (builder.py: the
    encoder's fc replaced by `Sequential(Linear(dim_mlp, dim_mlp), BatchNorm1d, ReLU, fc)`, 64 -> 64 -> 32 on
    CIFAR, 2048 -> 2048 -> 128 on ImageNet) and BCL's `head` / `head_fc` (64 -> 512 -> 128 on CIFAR, 2048 -> 2048
    -> 1024 on ImageNet). Its BatchNorm1d needs >= 2 rows in training. `batch_norm=False`: Linear - ReLU - Linear,
    NCL's projection (`network.py: _get_multi_classifer("mlp")`, with bias)."""

    def __init__(self, in_features: int, hidden: int, out_features: int, batch_norm: bool = True) -> None:
        middle = [nn.BatchNorm1d(hidden)] if batch_norm else []
        super().__init__(nn.Linear(in_features, hidden), *middle, nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_features))


class KeyQueue(nn.Module):
    """MoCo's queue of keys (features + pointer), all buffers: the queue is part of the model's state, so
    checkpoints and resume keep it. `push` is FIFO with wrap-around on the device (no host sync): key j of a batch
    of n goes to slot (ptr + j) mod K and the pointer moves to (ptr + n) mod K; a batch larger than the queue keeps
    its last K keys (the official code asserts K % B == 0 instead).

    `normalise`: how the random initial keys randn(K, D) are normalised, as the official code of each method does:
    "queue" along the queue axis (PaCo's (K, D) queue under `F.normalize(queue, dim=0)`), "key" each key to unit
    norm (NCL's `MOCO.py` keeps a (D, K) queue and normalises it along dim 0, i.e. per key)."""

    features: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, size: int, dim: int, normalise: str = "queue") -> None:
        super().__init__()
        if size < 1:
            raise HarnessError(f"a contrastive queue needs at least one slot, got queue size {size}")
        if normalise not in ("queue", "key"):
            raise HarnessError(f"queue normalisation must be 'queue' or 'key', got '{normalise}'")
        self.size = size
        self.register_buffer("features", F.normalize(torch.randn(size, dim), dim=0 if normalise == "queue" else 1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def _slots(self, n: int) -> tuple[int, torch.Tensor]:
        first = max(0, n - self.size)  # static shapes: decided on the host from the batch size, no sync
        return first, (self.ptr + torch.arange(first, n, device=self.ptr.device)) % self.size

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        first, slots = self._slots(keys.shape[0])
        self.features.index_copy_(0, slots, keys[first:].to(self.features.dtype))
        self.ptr.copy_((self.ptr + keys.shape[0]) % self.size)


class LabelledQueue(KeyQueue):
    """A `KeyQueue` whose keys carry their labels (PaCo builder.py: `queue`, `queue_l`, `queue_ptr`).

    Initialised as the official code: features randn(K, D) normalised along dim 0 (the queue axis, not per key, as
    `F.normalize(self.queue, dim=0)` does), labels uniform over the classes; the first K / B steps contrast against
    these until real keys replace them."""

    labels: torch.Tensor

    def __init__(self, size: int, dim: int, num_classes: int) -> None:
        super().__init__(size, dim, normalise="queue")
        self.register_buffer("labels", torch.randint(0, num_classes, (size,)))

    @torch.no_grad()
    def push(self, keys: torch.Tensor, labels: torch.Tensor) -> None:  # type: ignore[override]
        first, slots = self._slots(keys.shape[0])
        self.labels.index_copy_(0, slots, labels[first:].to(self.labels.dtype))
        super().push(keys)


@dataclass(frozen=True)
class NetworkSpec:
    """The plain network a contrastive model wraps: `build_expert_resnet(experts=1, dkf=False, ...)` on `backbone`
    (resnet32: the CIFAR knobs `shortcut`, `depth`; torchvision backbones: `pretrained` (None, a state-dict path or
    "torchvision") and `freeze` ("none" | "trunk"))."""

    shortcut: str = "B"
    depth: int = 32
    backbone: str = "resnet32"
    pretrained: str | None = None
    freeze: str = "none"


class _TwoViewModel(LTModel):
    """Shared by both models: one plain network (trunk + classifier), the view split, the parameter groups."""

    def __init__(self, *, num_classes: int, views: int, head: str, scale: float, net: NetworkSpec) -> None:
        super().__init__()
        if views < 2:
            raise HarnessError(f"a contrastive model needs at least 2 views per image, got {views}")
        self.num_classes, self.views = num_classes, views
        self.network = build_expert_resnet(num_classes=num_classes, experts=1, dkf=False, shortcut=net.shortcut,
                                           head=head, scale=scale, retrain_head=False, depth=net.depth,
                                           backbone=net.backbone, pretrained=net.pretrained, freeze=net.freeze)
        self.feature_dim = self.network.feature_dim

    def contrastive_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The network's groups (backbone, head; "trunk" where it is frozen) and "contrastive"."""
        groups = {name: params for name, params in self.network.parameter_groups().items() if name != "retrain_head"}
        return {**groups, "contrastive": [p for m in self.contrastive_modules() for p in m.parameters()]}

    def inference_parameter_count(self) -> int:
        """The network alone (trunk + classifier): projection heads and the momentum encoder never run at
        inference."""
        groups = self.parameter_groups()
        return sum(p.numel() for g, ps in groups.items() if g not in TRAINING_ONLY for p in ps)

    def classifiers(self) -> list[nn.Module]:
        return self.network.classifiers()

    def architecture(self) -> dict[str, object]:
        return {**self.network.architecture(), "views": self.views}

    def per_view(self, x: torch.Tensor) -> int:
        """B, the images per view of a training batch (V*B, ...); refuses what the model cannot split."""
        if x.shape[0] % self.views:
            raise HarnessError(f"{type(self).__name__} trains on {self.views} views stacked view-major; got a "
                               f"batch of {x.shape[0]} images (give its stage views=(View(),) * {self.views - 1})")
        batch = x.shape[0] // self.views
        if batch < 2:
            raise HarnessError(f"{type(self).__name__} got a training batch of one image per view; BatchNorm1d in "
                               "its projection head needs two: choose optim.batch_size so that N % batch != 1")
        return batch


class PaCoModel(_TwoViewModel):
    """PaCo's MoCo model: the query network (trunk + linear classifier) with a projection MLP, their momentum copy
    (the key encoder, EMA of every parameter, official `encoder_k` + `linear_k`), and a `LabelledQueue`.

    Training forward on [view 0; view 1] (official `_train(im_q, im_k)`): q from view 0 through the query network
    and projection (with grad); then, under no_grad, the momentum update k <- m k + (1 - m) q of every key
    parameter (before the keys are computed, as the official) and k from view 1 through the key encoder. BN running
    statistics are not averaged: the key encoder keeps its own, as in MoCo. Returns logits [z_q; z_k] (z_k from the
    momentum classifier, detached; only z_q enters the loss), embeddings [q; k] and a copy of the queue. The
    enqueue needs the keys' labels, which the model never sees: the PaCo loss term pushes (k, y) into this
    model's queue right after computing the loss (`harness.methods.paco.PaCoTerm`). No distributed batch shuffle
    (the official's BN trick needs DDP)."""

    def __init__(self, *, num_classes: int, net: NetworkSpec = NetworkSpec(), projection_dim: int = 32,
                 queue_size: int = 1024, momentum: float = 0.999) -> None:
        super().__init__(num_classes=num_classes, views=2, head="linear", scale=1.0, net=net)
        if not 0.0 <= momentum <= 1.0:
            raise HarnessError(f"PaCo's momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.projection = ProjectionMLP(self.feature_dim, self.feature_dim, projection_dim)
        # The key encoder starts as an exact copy (official: param_k.data.copy_(param_q.data)) and never trains.
        self.key_network = copy.deepcopy(self.network)
        self.key_projection = copy.deepcopy(self.projection)
        for p in self.key_parameters():
            p.requires_grad_(False)
        self.queue = LabelledQueue(queue_size, projection_dim, num_classes)

    def contrastive_modules(self) -> list[nn.Module]:
        return [self.projection]

    def query_parameters(self) -> list[nn.Parameter]:
        return [*self.network.parameters(), *self.projection.parameters()]

    def key_parameters(self) -> list[nn.Parameter]:
        return [*self.key_network.parameters(), *self.key_projection.parameters()]

    def architecture(self) -> dict[str, object]:
        return {**super().architecture(), "queue": self.queue.size, "momentum": self.momentum}

    def momentum_update(self) -> None:
        """k <- k * m + q * (1 - m) for every key parameter (builder.py `_momentum_update_key_encoder`)."""
        ema_update(self.key_parameters(), self.query_parameters(), self.momentum)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        if not self.training:
            return self.network(x)
        batch = self.per_view(x)
        out = self.network(x[:batch])
        q = F.normalize(self.projection(out.features[0]), dim=1)
        with torch.no_grad():
            self.momentum_update()
            key_out = self.key_network(x[batch:])
            k = F.normalize(self.key_projection(key_out.features[0]), dim=1)
        logits = torch.cat([out.logits, key_out.logits])
        return ContrastiveOutput(logits=logits, expert_logits=logits[None],
                                 features=torch.cat([out.features, key_out.features], dim=1),
                                 embeddings=torch.cat([q, k]), queue_features=self.queue.features.clone(),
                                 queue_labels=self.queue.labels.clone())


def class_weight_rows(head: nn.Module) -> torch.Tensor:
    """The classifier's class vectors as (C, D) rows: a cosine head stores (D, C) (official `NormedLinear`, whose
    `weight.T` BCLModel feeds to head_fc), a linear head (C, D)."""
    return head.weight.T if isinstance(head, CosineHead) else head.weight


class BCLModel(_TwoViewModel):
    """BCL's two-branch model (`BCLModel`): the network (trunk + classifier: cosine s = 30 officially, `use_norm`
    True) runs on every view; the projection MLP (`head`) maps each pooled feature to a normalised embedding, and
    the prototype MLP (`head_fc`) maps the classifier's class vectors (un-normalised, with gradient into the
    classifier, as the official) to the normalised class prototypes (class-complement)."""

    def __init__(self, *, num_classes: int, views: int, head: str, scale: float, net: NetworkSpec = NetworkSpec(),
                 hidden_dim: int | None = 512, projection_dim: int = 128) -> None:
        """hidden_dim None: the network's feature width (BCL's ImageNet MLPs, dim_in -> dim_in -> feat_dim)."""
        super().__init__(num_classes=num_classes, views=views, head=head, scale=scale, net=net)
        hidden = hidden_dim or self.feature_dim
        self.projection = ProjectionMLP(self.feature_dim, hidden, projection_dim)
        self.prototype_head = ProjectionMLP(self.feature_dim, hidden, projection_dim)

    def contrastive_modules(self) -> list[nn.Module]:
        return [self.projection, self.prototype_head]

    def prototypes(self) -> torch.Tensor:
        return F.normalize(self.prototype_head(class_weight_rows(self.network.classifiers()[0])), dim=1)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        if not self.training:
            return self.network(x)
        self.per_view(x)
        out = self.network(x)
        embeddings = F.normalize(self.projection(out.features[0]), dim=1)
        return ContrastiveOutput(logits=out.logits, expert_logits=out.expert_logits, features=out.features,
                                 embeddings=embeddings, prototypes=self.prototypes())
