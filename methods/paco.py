"""PaCo (Cui et al., ICCV 2021, "Parametric Contrastive Learning"; dvlab-research/Parametric-Contrastive-Learning
`PaCo/LT`): supervised contrastive learning with parametric class centres. A MoCo model (`PaCoModel`: query
network + projection, momentum key encoder at m = 0.999, a queue of K = 1024 labelled keys of dim 32) trains on two
views of every image with one loss (`harness.methods.losses_moe.paco_loss`, Eq. 7-8): each query q of view 0
contrasts against the C centres (the linear classifier on q's pooled feature, plus log pi), the batch's [q; k] and
the queue, positives the own centre (weight 1) and same-class samples (weight alpha = 0.01), T = 0.05. Inference:
the query network's linear classifier, no prior (official `_inference`).

Views (`views`): "official" (default): the query view (view 0) takes the run's `data.augment` (the own recipe:
AutoAugment + Cutout, `augmentation_regular`), the key view PaCo's SimCLR-style "sim" view (`augmentation_sim_cifar`,
`harness.datasets.augment.sim_transform`); "same": both views with `data.augment` (the harness before per-view
augmentation).

Backbones: resnet32 (CIFAR) or a torchvision resnet50 / resnext50_32x4d / resnet152 (`pretrained`, `freeze` as for
every `build_expert_resnet` network). The projection is feature width -> feature width -> `projection_dim`; 0 picks
the backbone's official size (`PROJECTION_DIMS`): 32 on CIFAR (`sh/CIFAR100_train_imb0.01.sh --moco-dim 32`), 128 on
the torchvision ones (`sh/ImageNetLT_train_R50.sh` passes no `--moco-dim`, so `paco_lt.py`'s default 128): 64 -> 64
-> 32 and 2048 -> 2048 -> 128.

recipe "shike": SHIKE's 200 epochs and schedule. "own" (`sh/CIFAR100_train_imb0.01.sh`, `paco_cifar.py`): 400
epochs, batch 128, lr 0.05, weight decay 5e-4, linear warm-up over 10 epochs, x0.1 after epoch 320 and x0.01 after
360 (0-based `epoch > 320`: from epoch 321 of 400, and 361), zero-padding shortcuts, AutoAugment + Cutout.
Simplified: the official warm-up reaches 1.1x the peak at epoch 10 (`lr / 10 * (epoch + 1)` for epoch <= 10), here
the peak; the official drops the last partial batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from harness.errors import HarnessError
from harness.method import LossTerm, LossTermModule, MethodSpec, ModelOutput, Stage, own_recipe
from harness.methods.losses_lt import _counts64
from harness.methods.losses_moe import paco_loss
from harness.methods.models.contrastive import (
    ContrastiveOutput,
    LabelledQueue,
    NetworkSpec,
    PaCoModel,
    contrastive_view,
    queue_length,
)
from harness.methods.recipes import SHIKE_SINGLE, pick
from harness.registry import METHODS

__all__ = ["PaCoTerm", "paco", "projection_dim_for", "queue_length"]

# paco_cifar.py `adjust_learning_rate`: x0.1 for epoch > 320, x0.01 for epoch > 360 (0-based, of 400).
PACO_STEPS = ((321 / 400, 0.1), (361 / 400, 0.01))
PACO_OWN = {"epochs": 400, "peak_lr": 0.05, "schedule": "step", "warmup_epochs": 10, "lr_steps": PACO_STEPS}


# backbone -> PaCo's projection output (`--moco-dim`); torchvision backbones: TORCHVISION_PROJECTION_DIM.
PROJECTION_DIMS = {"resnet32": 32}
TORCHVISION_PROJECTION_DIM = 128


def projection_dim_for(backbone: str, projection_dim: int) -> int:
    """`projection_dim`, or with 0 the backbone's official size (`PROJECTION_DIMS`)."""
    if projection_dim < 0:
        raise HarnessError(f"method.projection_dim must be >= 0 (0: the backbone's own), got {projection_dim}")
    return projection_dim or PROJECTION_DIMS.get(backbone, TORCHVISION_PROJECTION_DIM)


class PaCoTerm(LossTermModule):
    """PaCo's loss (`paco_loss`) on a `PaCoModel` training output, as `PaCoLoss.forward(features, labels,
    sup_logits)` receives it from `MoCo._train`: contrast features [q; k; queue] with labels [y; y; queue labels],
    anchors the B queries of view 0, `sup_logits` the linear classifier on view 0's pooled features.

    After the loss it pushes (k, y of view 1) into the model's queue (official `_dequeue_and_enqueue(k, labels)`):
    the model's forward never sees labels. The queue is held as a reference, not a submodule, so its state is saved
    once, with the model. Class counts are a float32 buffer (the prior is formed in float64 inside `paco_loss`)."""

    class_counts: torch.Tensor

    def __init__(self, class_counts: Sequence[int], queue: LabelledQueue, alpha: float = 0.01,
                 temperature: float = 0.05) -> None:
        super().__init__()
        self.alpha, self.temperature = alpha, temperature
        self.register_buffer("class_counts", _counts64(class_counts).to(torch.float32))
        self._queue = (queue,)  # a tuple, so that nn.Module does not register it (and save it) a second time

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        if not isinstance(out, ContrastiveOutput) or out.queue_features is None:
            raise HarnessError("the PaCo loss needs a PaCo model's training output (two views, queue)")
        batch = target.shape[0] // 2
        embeddings = out.embeddings.float()
        loss = paco_loss(embeddings, target, out.logits[:batch], self.class_counts, out.queue_features.float(),
                         out.queue_labels, alpha=self.alpha, temperature=self.temperature)
        self._queue[0].push(embeddings[batch:].detach(), target[batch:])
        return loss


@METHODS.register("paco")
@own_recipe(optim__batch_size=128, optim__weight_decay=5e-4, optim__lr=0.05, data__augment="autoaugment",
            method__shortcut="A")
def paco(*, num_classes: int, class_counts: Sequence[int], recipe: str = "shike", paco_alpha: float = 0.01,
         temperature: float = 0.05, queue_size: int = 1024, queue_share: float = 0.1, projection_dim: int = 0,
         momentum: float = 0.999, views: str = "official", shortcut: str = "B", depth: int = 32,
         backbone: str = "resnet32", pretrained: str = "", freeze: str = "none") -> MethodSpec:
    """PaCo on CIFAR-100-LT's official settings: alpha 0.01 (`paco_alpha`: the weight of same-class samples;
    beta = gamma = 1 as always), T 0.05 (`--moco-t`), queue 1024 (`--moco-k`, capped at `queue_share` of the
    training set: see `queue_length`), projection feature -> feature -> `projection_dim` (0: 32 on resnet32, 128 on
    torchvision backbones), momentum 0.999. One stage on two views of each image (`views`: "official" = key view
    "sim", "same" = both with data.augment); the projection (group "contrastive") trains with the backbone.
    backbone, pretrained, freeze: the network's (`build_expert_resnet`; pretrained "" = random init)."""
    net = NetworkSpec(shortcut=shortcut, depth=depth, backbone=backbone, pretrained=pretrained or None, freeze=freeze)
    key_view = contrastive_view(views)
    queue = queue_length(queue_size, queue_share, int(sum(class_counts)))
    model = PaCoModel(num_classes=num_classes, net=net, projection_dim=projection_dim_for(backbone, projection_dim),
                      queue_size=queue, momentum=momentum)
    term = PaCoTerm(class_counts, model.queue, alpha=paco_alpha, temperature=temperature)
    stage = Stage("end-to-end", (LossTerm("paco", 1.0, term),), trainable=("backbone", "head", "contrastive"),
                  views=(key_view,),
                  **pick(recipe, SHIKE_SINGLE, PACO_OWN))
    return MethodSpec(model, (stage,))
