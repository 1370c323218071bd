"""BCL (Zhu et al., CVPR 2022, "Balanced Contrastive Learning for Long-Tailed Visual Recognition";
FlamieZhu/Balanced-Contrastive-Learning): a classifier trained with logit compensation (`LogitAdjust`, tau = 1:
CE(z + log pi, y), i.e. balanced softmax) plus the balanced contrastive loss (`harness.methods.losses_moe.bcl_loss`,
Eq. 5-8: class-averaging and class-complement prototypes from an MLP on the classifier weights), L = ce_weight * CE
+ scl_weight * BCL (`main.py`: `loss = args.alpha * ce_loss + args.beta * scl_loss`). Model: `BCLModel`.

Views: the official code draws three (`main.py`: view 0, RandAugment (`--randaug`), to the classifier; views 1-2,
SimCLR-style "sim" (`--cl_views sim-sim`), to the contrastive branch; the CE is on view 0 only). `num_views=3`
(default): that split; `num_views=2`: view 0 feeds the CE and both views the contrastive branch. `views`: "official"
(default): every view after view 0 takes the "sim" pipeline (`harness.datasets.augment.sim_transform`; on CIFAR,
PaCo's CIFAR "sim", as BCL has no CIFAR code), view 0 the run's `data.augment`; "same": every view `data.augment`
(the harness before per-view augmentation; with `num_views=2` the previous default). Inference: the classifier's raw
logits, uncompensated (official `validate` takes `self.fc(feat)`; compensating again at test would correct the prior
twice).

Backbones: resnet32 (CIFAR) or a torchvision resnet50 / resnext50_32x4d / resnet152 (`pretrained`, `freeze` as for
every `build_expert_resnet` network). MLP sizes (`hidden_dim`, `projection_dim`; 0 = the backbone's, `MLP_DIMS`):
64 -> 512 -> 128 on CIFAR (BCL#7), feature width -> feature width -> 1024 on the torchvision ones (`models/resnext.py:
BCLModel`, head and head_fc `Linear(dim_in, dim_in) ... Linear(dim_in, feat_dim)`, `main.py --feat_dim 1024`).

Defaults (CIFAR-100-LT; BCL has no official CIFAR code, BCL#4/#7/#13): T 0.07 (`main.py --temp`), MLPs 64 -> 512 ->
128 (BCL#7), ce_weight 2.0 and scl_weight 0.6 (the CIFAR values of BCL's derivatives: Ton-lee/ConCutMix's
CIFAR-100-LT script `--alpha 2 --beta 0.6`, sumyeongahn/CUDA_LTR `BCLLoss(alpha=2.0, beta=0.6)`; main.py's own
defaults, 1.0 and 0.35, are its ImageNet-LT setting), cosine classifier with s = 30 (`--use_norm True`, `NormedLinear`).
recipe "shike": SHIKE's 200 epochs and schedule. "own" (those derivatives' CIFAR recipe): 200 epochs, batch 256, lr
0.15, weight decay 5e-4, 5 warm-up epochs then cosine; approximated by the harness's `code` schedule with base =
peak (5 epochs at the peak, then cosine to 0; BCL's `adjust_lr` ramps linearly to the peak first), zero-padding
shortcuts, AutoAugment + Cutout standing in for RandAugment.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from harness.errors import HarnessError
from harness.method import LossTerm, LossTermModule, MethodSpec, ModelOutput, Stage, own_recipe
from harness.methods.losses_lt import _counts64
from harness.methods.losses_moe import bcl_loss
from harness.methods.models.contrastive import BCLModel, ContrastiveOutput, NetworkSpec, contrastive_view
from harness.methods.recipes import SHIKE_SINGLE, pick
from harness.registry import METHODS

BCL_OWN = {"epochs": 200, "peak_lr": 0.15, "schedule": "code", "warmup_epochs": 5}
VIEW_CHOICES = (2, 3)
# backbone -> (hidden, output) of the projection and prototype MLPs; hidden None = the feature width.
MLP_DIMS: dict[str, tuple[int | None, int]] = {"resnet32": (512, 128)}
TORCHVISION_MLP_DIMS: tuple[int | None, int] = (None, 1024)


def mlp_dims_for(backbone: str, hidden_dim: int, projection_dim: int) -> tuple[int | None, int]:
    """(hidden, output) of BCL's MLPs: the switches, or with 0 the backbone's own (`MLP_DIMS`)."""
    if hidden_dim < 0 or projection_dim < 0:
        raise HarnessError(f"method.hidden_dim and method.projection_dim must be >= 0 (0: the backbone's own), got "
                           f"{hidden_dim} and {projection_dim}")
    hidden, output = MLP_DIMS.get(backbone, TORCHVISION_MLP_DIMS)
    return hidden_dim or hidden, projection_dim or output


class CompensatedCE(LossTermModule):
    """BCL's classification term (`loss/logitadjust.py: LogitAdjust`, tau = 1): CE(z + log pi, y) on the logits of
    view 0 only (official: `logits, _, __ = torch.split(logits, [B, B, B])`), batch mean; log pi = log(n / sum n) is
    a float32 buffer computed in float64."""

    log_prior: torch.Tensor

    def __init__(self, class_counts: Sequence[int], views: int) -> None:
        super().__init__()
        self.views = views
        counts = _counts64(class_counts)
        self.register_buffer("log_prior", (counts / counts.sum()).log().to(torch.float32))

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        batch = target.shape[0] // self.views
        return F.cross_entropy(out.logits[:batch] + self.log_prior, target[:batch])


class BalancedContrast(LossTermModule):
    """BCL's balanced contrastive term (`bcl_loss`, official `BalSCL(centers, features, targets)`) on the embeddings
    of the contrastive views, as (B, V', D), with the prototypes appended: with 3 views, views 1-2 (the official);
    with 2, both views."""

    def __init__(self, views: int, temperature: float = 0.07) -> None:
        super().__init__()
        self.views, self.temperature = views, temperature
        self.first = 1 if views == 3 else 0

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        if not isinstance(out, ContrastiveOutput) or out.prototypes is None:
            raise HarnessError("the BCL loss needs a BCL model's training output (views, prototypes)")
        batch = target.shape[0] // self.views
        embeddings = out.embeddings.float().view(self.views, batch, -1)[self.first:].transpose(0, 1)
        return bcl_loss(embeddings, target[:batch], out.prototypes.float(), temperature=self.temperature)


@METHODS.register("bcl")
@own_recipe(optim__batch_size=256, optim__weight_decay=5e-4, optim__lr=0.15, data__augment="autoaugment",
            method__shortcut="A")
def bcl(*, num_classes: int, class_counts: Sequence[int], recipe: str = "shike", ce_weight: float = 2.0,
        scl_weight: float = 0.6, temperature: float = 0.07, hidden_dim: int = 0, projection_dim: int = 0,
        num_views: int = 3, views: str = "official", head: str = "cosine", scale: float = 30.0, shortcut: str = "B",
        depth: int = 32, backbone: str = "resnet32", pretrained: str = "", freeze: str = "none") -> MethodSpec:
    """BCL: `ce_weight` * logit-compensated CE on view 0 + `scl_weight` * balanced contrastive loss (T =
    `temperature`) on the projections (feature -> `hidden_dim` -> `projection_dim`; 0: the backbone's, 512 / 128 on
    resnet32, 2048 / 1024 on ResNet-50) and the class prototypes; `head` "cosine" (official, s = `scale`) or
    "linear". One stage on `num_views` views (3: official; or 2), views after the first augmented per `views`
    ("official": "sim"; "same": data.augment); the projection and prototype MLPs (group "contrastive") train with
    the backbone. backbone, pretrained, freeze: the network's (`build_expert_resnet`; pretrained "" = random
    init)."""
    if num_views not in VIEW_CHOICES:
        raise HarnessError(f"method.num_views must be 2 or 3 (3: the official split), got {num_views}")
    extra = contrastive_view(views)
    hidden, output = mlp_dims_for(backbone, hidden_dim, projection_dim)
    net = NetworkSpec(shortcut=shortcut, depth=depth, backbone=backbone, pretrained=pretrained or None, freeze=freeze)
    model = BCLModel(num_classes=num_classes, views=num_views, head=head, scale=scale, net=net, hidden_dim=hidden,
                     projection_dim=output)
    terms = (LossTerm("ce", ce_weight, CompensatedCE(class_counts, num_views)),
             LossTerm("bcl", scl_weight, BalancedContrast(num_views, temperature)))
    stage = Stage("end-to-end", terms, trainable=("backbone", "head", "contrastive"),
                  views=(extra,) * (num_views - 1), **pick(recipe, SHIKE_SINGLE, BCL_OWN))
    return MethodSpec(model, (stage,))
