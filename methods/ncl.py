"""NCL (Li et al., CVPR 2022, "Nested Collaborative Learning"; Bazinga699/NCL): K = 3 complete networks trained
jointly with NIL + NBOD on balanced logits (`harness.methods.losses_moe.ncl_loss`: balanced softmax on all classes
and on the top-N hard classes of network 1, and mutual KL between the networks on both, lambda 0.6). Inference is
the ensemble, the mean of the networks' logits ("NCL (3N)"); each network's own top-1 is logged as expert{k}_top1
(the paper's "NCL (S)" is the best of them on test, a selection the harness reports but does not make).

The optional MoCo branch (`contrastive=True`; off in `cifar100_im100_NCL.yaml`, on in `..._with_contrastive.yaml`):
per network a projection (dim `moco_dim` 64), a momentum copy (m = `moco_momentum` 0.999) and a queue of
`moco_queue` 1024 unlabelled keys (`harness.methods.models.ensemble.MoCoEnsemble`), trained with MoCo's InfoNCE at
T = `moco_temperature` 0.2, summed over the networks, weight `moco_weight` 1.0
(`harness.methods.losses_contrastive.moco_infonce`; `CON_RATIO`). It adds a second view: NCL's CIFAR dataset
(`cui_cifar.py: MULTI_NETWORK_CIFAR_MOCO_AUGPLIS`, PaCo's `aug_plus`) gives the query view AutoAugment + Cutout (the
run's `data.augment`) and the key view PaCo's "sim" (`views="official"`; "same": the run's augment); NIL + NBOD see
view 0 only (official: `criterion(output_ce, ...)` on `image_p`). Simplified: every network sees the same two views
(officially each network gets its own augmented copy of the batch).

recipe "shike": SHIKE's 200 epochs and schedule. "own" (`cifar100_im100_NCL.yaml`): 400 epochs, batch 64, lr 0.1,
weight decay 2e-4, warm-up 5, x0.1 at epoch 320 and 360 (here: x0.1 from 80 %, x0.01 from 90 %), AutoAugment +
Cutout, linear heads with bias."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from harness.method import LossTerm, LossTermModule, MethodSpec, ModelOutput, Stage, own_recipe
from harness.methods.losses_contrastive import MoCoContrast
from harness.methods.losses_moe import NCLLoss
from harness.methods.models.contrastive import contrastive_view, queue_length
from harness.methods.models.ensemble import MoCoEnsemble, NetworkEnsemble
from harness.methods.recipes import SHIKE_SINGLE, pick
from harness.registry import METHODS

NCL_OWN = {"epochs": 400, "peak_lr": 0.1, "schedule": "step", "warmup_epochs": 5, "lr_steps": ((0.8, 0.1),
                                                                                                 (0.9, 0.01))}


class FirstView(LossTermModule):
    """`term` on view 0 only: the model's output covers view 0 (the key view feeds the MoCo branch alone), the
    labels come stacked for every view, so the first B = len(logits) are view 0's."""

    def __init__(self, term: LossTermModule) -> None:
        super().__init__()
        self.term = term

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        return self.term(out, target[: out.logits.shape[0]])


@METHODS.register("ncl")
@own_recipe(optim__batch_size=64, optim__weight_decay=2e-4, optim__lr=0.1, data__augment="autoaugment",
            method__shortcut="A")
def ncl(*, num_classes: int, class_counts: Sequence[int], recipe: str = "shike", networks: int = 3,
        hard_topk: int = 30, nbod_weight: float = 0.6, contrastive: bool = False, moco_queue: int = 1024,
        moco_queue_share: float = 0.1, moco_temperature: float = 0.2, moco_dim: int = 64, moco_weight: float = 1.0,
        moco_momentum: float = 0.999, views: str = "official", shortcut: str = "B", depth: int = 32,
        backbone: str = "resnet32", pretrained: str = "", freeze: str = "none") -> MethodSpec:
    """NCL with `networks` complete networks (3: "NCL (3N)"); N = `hard_topk` hard classes (30 on CIFAR-100, all
    of them when the dataset has fewer), lambda = `nbod_weight`. contrastive: NCL's MoCo branch (queue `moco_queue`
    capped at `moco_queue_share` of the training set as PaCo's (`queue_length`), T `moco_temperature`, dim
    `moco_dim`, weight `moco_weight`, momentum `moco_momentum`, key view per `views`). backbone, pretrained,
    freeze: each network's (`build_expert_resnet`; "resnet50" gives Table 2's 3 x 25.6 M; pretrained "" = random
    init)."""
    common = dict(networks=networks, num_classes=num_classes, head="linear", shortcut=shortcut, depth=depth,
                  backbone=backbone, pretrained=pretrained or None, freeze=freeze)
    nil_nbod = NCLLoss(class_counts, hard_topk=hard_topk, nbod_weight=nbod_weight)
    recipe_args = pick(recipe, SHIKE_SINGLE, NCL_OWN)
    if not contrastive:
        stage = Stage("end-to-end", (LossTerm("nil_nbod", 1.0, nil_nbod),), **recipe_args)
        return MethodSpec(NetworkEnsemble(**common), (stage,))
    key_view = contrastive_view(views)
    queue = queue_length(moco_queue, moco_queue_share, int(sum(class_counts)))
    model = MoCoEnsemble(**common, projection_dim=moco_dim, queue_size=queue, momentum=moco_momentum)
    terms = (LossTerm("nil_nbod", 1.0, FirstView(nil_nbod)),
             LossTerm("moco", moco_weight, MoCoContrast(moco_temperature)))
    stage = Stage("end-to-end", terms, trainable=("backbone", "head", "contrastive"), views=(key_view,),
                  **recipe_args)
    return MethodSpec(model, (stage,))
