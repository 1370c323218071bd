"""PaCo (Cui et al., ICCV 2021, "Parametric Contrastive Learning"; dvlab-research/Parametric-Contrastive-Learning
`PaCo/LT`): supervised contrastive learning with parametric class centres. A MoCo model (`PaCoModel`: query
network + projection, momentum key encoder at m = 0.999, a queue of K = 1024 labelled keys of dim 32) trains on two
views of every image with one loss (`harness.methods.losses_moe.paco_loss`, Eq. 7-8): each query q of view 0
contrasts against the C centres (the linear classifier on q's pooled feature, plus log pi), the batch's [q; k] and
the queue, positives the own centre (weight 1) and same-class samples (weight alpha = 0.01), T = 0.05. Inference:
the query network's linear classifier, no prior (official `_inference`).

recipe "shike": SHIKE's 200 epochs and schedule. "own" (`sh/CIFAR100_train_imb0.01.sh`, `paco_cifar.py`): 400
epochs, batch 128, lr 0.05, weight decay 5e-4, linear warm-up over 10 epochs, x0.1 after epoch 320 and x0.01 after
360 (0-based `epoch > 320`: from epoch 321 of 400, and 361), zero-padding shortcuts, AutoAugment + Cutout.
Simplified: the official key view is SimCLR-style (RandomResizedCrop, colour jitter, grayscale, blur) while the
harness augments every view with `data.augment`; the official warm-up reaches 1.1x the peak at epoch 10
(`lr / 10 * (epoch + 1)` for epoch <= 10), here the peak; the official drops the last partial batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from harness.errors import HarnessError
from harness.method import LossTerm, LossTermModule, MethodSpec, ModelOutput, Stage, View, own_recipe
from harness.methods.losses_lt import _counts64
from harness.methods.losses_moe import paco_loss
from harness.methods.models.contrastive import ContrastiveOutput, LabelledQueue, PaCoModel
from harness.methods.models.moe import require_cifar_backbone
from harness.methods.recipes import SHIKE_SINGLE, pick
from harness.registry import METHODS

# paco_cifar.py `adjust_learning_rate`: x0.1 for epoch > 320, x0.01 for epoch > 360 (0-based, of 400).
PACO_STEPS = ((321 / 400, 0.1), (361 / 400, 0.01))
PACO_OWN = {"epochs": 400, "peak_lr": 0.05, "schedule": "step", "warmup_epochs": 10, "lr_steps": PACO_STEPS}


def queue_length(queue_size: int, queue_share: float, train_images: int) -> int:
    """K = min(queue_size, max(1, floor(queue_share * N))): the official 1024 keys are 9.4 % of CIFAR-100-LT's
    10,847 images (IF 100), and a queue longer than the data it summarises would hold its random initial keys (with
    random labels) for many epochs on a tiny set. The default share 0.1 keeps 1024 on every CIFAR-LT of IF <= 100
    (10 % of 10,847 = 1,084) and gives Fashion-MNIST-LT IF 100 (1,236 images) 123 keys."""
    if queue_share <= 0:
        raise HarnessError(f"method.queue_share must be > 0 (the queue's largest share of the training set), "
                           f"got {queue_share}")
    return max(1, min(queue_size, math.floor(queue_share * train_images)))


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
         temperature: float = 0.05, queue_size: int = 1024, queue_share: float = 0.1, projection_dim: int = 32,
         momentum: float = 0.999, shortcut: str = "B", depth: int = 32, backbone: str = "resnet32") -> MethodSpec:
    """PaCo on CIFAR-100-LT's official settings: alpha 0.01 (`paco_alpha`: the weight of same-class samples;
    beta = gamma = 1 as always), T 0.05 (`--moco-t`), queue 1024 (`--moco-k`, capped at `queue_share` of the
    training set: see `queue_length`), projection 64 -> 64 -> 32 (`--mlp`, `--moco-dim 32`), momentum 0.999.
    One stage on two views of each image; the projection (group "contrastive") trains with the backbone."""
    require_cifar_backbone("paco", backbone)
    queue = queue_length(queue_size, queue_share, int(sum(class_counts)))
    model = PaCoModel(num_classes=num_classes, shortcut=shortcut, depth=depth, projection_dim=projection_dim,
                      queue_size=queue, momentum=momentum)
    term = PaCoTerm(class_counts, model.queue, alpha=paco_alpha, temperature=temperature)
    stage = Stage("end-to-end", (LossTerm("paco", 1.0, term),), trainable=("backbone", "head", "contrastive"),
                  views=(View(),), **pick(recipe, SHIKE_SINGLE, PACO_OWN))
    return MethodSpec(model, (stage,))
