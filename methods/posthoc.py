"""Post-hoc steps (`MethodSpec.posthoc`): fitted once on a trained model, applied at the final evaluation only.

TauNorm (Kang et al., ICLR 2020, Sec. 4): each class row of the linear classifier divided by its norm^tau, bias
dropped (`tau_norm.py` of the decoupling code). NCM (same paper): nearest class mean of centred, L2-normalised
training features (`KNNClassifier.py`, "cl2n"). LogitAdjust (Menon et al., ICLR 2021, Eq. 8): logits - tau log pi.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import HarnessError
from harness.method import LTModel, ModelOutput, PostHoc, TrainFeatures
from harness.methods.losses import logit_adjust, tau_normalize


def _recompose(expert_logits: torch.Tensor, out: ModelOutput) -> ModelOutput:
    return ModelOutput(logits=expert_logits.mean(dim=0), expert_logits=expert_logits, features=out.features)


def linear_weights(model: LTModel) -> list[torch.Tensor]:
    """The (C, D) weight of each active classifier; only linear heads have class rows to rescale."""
    heads = model.classifiers()
    if not all(isinstance(h, nn.Linear) for h in heads):
        raise HarnessError(f"this post-hoc step needs linear heads, got {type(heads[0]).__name__}")
    return [h.weight for h in heads]


class TauNorm(PostHoc):
    """Logits from the tau-normalised classifier rows, bias dropped: z_c = <f, w_c / ||w_c||^tau>."""

    def __init__(self, tau: float) -> None:
        super().__init__()
        self.tau = tau

    def forward(self, model: LTModel, out: ModelOutput) -> ModelOutput:
        if out.features is None:
            raise HarnessError("tau-norm needs the model's pooled features")
        weights = torch.stack([tau_normalize(w, self.tau) for w in linear_weights(model)])  # (M, C, D)
        return _recompose(torch.einsum("mbd,mcd->mbc", out.features.float(), weights.float()), out)


class NCM(PostHoc):
    """Nearest class mean: features centred by the training mean and L2-normalised; logit_c = -||f - mu_c||^2 with
    mu_c the (not re-normalised) mean of class c's normalised training features, per expert."""

    needs_train_features = True
    mean: torch.Tensor
    centroids: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(0))
        self.register_buffer("centroids", torch.zeros(0))

    def normalise(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features - self.mean[:, None, :], dim=-1)

    def fit(self, model: LTModel, train_features: TrainFeatures | None) -> None:
        assert train_features is not None
        features, labels = train_features.features.float(), train_features.labels
        self.mean = features.mean(dim=1)  # (M, D)
        normed = self.normalise(features)
        classes = model.num_classes if hasattr(model, "num_classes") else int(labels.max()) + 1
        sums = torch.zeros(normed.shape[0], classes, normed.shape[2], device=normed.device)
        sums.index_add_(1, labels, normed)
        counts = torch.bincount(labels, minlength=classes).clamp(min=1).to(normed.dtype)
        self.centroids = sums / counts[None, :, None]  # (M, C, D)

    def forward(self, model: LTModel, out: ModelOutput) -> ModelOutput:
        assert out.features is not None
        distances = torch.cdist(self.normalise(out.features.float()), self.centroids) ** 2  # (M, B, C)
        return _recompose(-distances, out)


class LogitAdjust(PostHoc):
    """Post-hoc logit adjustment: every expert's logits minus tau * log prior (never after an LA/BS loss)."""

    def __init__(self, class_counts: Sequence[int], tau: float = 1.0) -> None:
        super().__init__()
        self.tau = tau
        self.register_buffer("counts", torch.as_tensor(class_counts, dtype=torch.float32))

    def forward(self, model: LTModel, out: ModelOutput) -> ModelOutput:
        return _recompose(logit_adjust(out.expert_logits, self.counts, self.tau), out)
