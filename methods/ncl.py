"""NCL (Li et al., CVPR 2022, "Nested Collaborative Learning"; Bazinga699/NCL): K = 3 complete networks trained
jointly with NIL + NBOD on balanced logits (`harness.methods.losses_moe.ncl_loss`: balanced softmax on all classes
and on the top-N hard classes of network 1, and mutual KL between the networks on both, lambda 0.6). Inference is
the ensemble, the mean of the networks' logits ("NCL (3N)"); each network's own top-1 is logged as expert{k}_top1
(the paper's "NCL (S)" is the best of them on test, a selection the harness reports but does not make). The
optional MoCo branch (off in the CIFAR-100 config) is not implemented.

recipe "shike": SHIKE's 200 epochs and schedule. "own" (`cifar100_im100_NCL.yaml`): 400 epochs, batch 64, lr 0.1,
weight decay 2e-4, warm-up 5, x0.1 at epoch 320 and 360 (here: x0.1 from 80 %, x0.01 from 90 %), AutoAugment +
Cutout, linear heads with bias."""

from __future__ import annotations

from collections.abc import Sequence

from harness.method import LossTerm, MethodSpec, Stage, own_recipe
from harness.methods.losses_moe import NCLLoss
from harness.methods.models.ensemble import NetworkEnsemble
from harness.methods.recipes import SHIKE_SINGLE, pick
from harness.registry import METHODS

NCL_OWN = {"epochs": 400, "peak_lr": 0.1, "schedule": "step", "warmup_epochs": 5, "lr_steps": ((0.8, 0.1),
                                                                                                 (0.9, 0.01))}


@METHODS.register("ncl")
@own_recipe(optim__batch_size=64, optim__weight_decay=2e-4, optim__lr=0.1, data__augment="autoaugment",
            method__shortcut="A")
def ncl(*, num_classes: int, class_counts: Sequence[int], recipe: str = "shike", networks: int = 3,
        hard_topk: int = 30, nbod_weight: float = 0.6, shortcut: str = "B", depth: int = 32,
        backbone: str = "resnet32", pretrained: str = "", freeze: str = "none") -> MethodSpec:
    """NCL with `networks` complete networks (3: "NCL (3N)"); N = `hard_topk` hard classes (30 on CIFAR-100, all
    of them when the dataset has fewer), lambda = `nbod_weight`. backbone, pretrained, freeze: each network's
    (`build_expert_resnet`; "resnet50" gives Table 2's 3 x 25.6 M; pretrained "" = random init)."""
    model = NetworkEnsemble(networks=networks, num_classes=num_classes, head="linear", shortcut=shortcut, depth=depth,
                            backbone=backbone, pretrained=pretrained or None, freeze=freeze)
    term = LossTerm("nil_nbod", 1.0, NCLLoss(class_counts, hard_topk=hard_topk, nbod_weight=nbod_weight))
    return MethodSpec(model, (Stage("end-to-end", (term,), **pick(recipe, SHIKE_SINGLE, NCL_OWN)),))
