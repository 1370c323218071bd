"""Classifier heads: the official cosine classifier (`NormedLinear`, `networks.py:127-135`) and a plain linear one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HEAD_KINDS = ("cosine", "linear")


class CosineHead(nn.Module):
    """Cosine classifier with no bias: logit_c = scale * cos(x, w_c) (official `NormedLinear` times `self.s`,
    `networks.py:127-135`, `:158-159`, `:209-214`; the paper calls phi^m "a linear layer", section 5 item 1).

    The weight is stored as (in_features, num_classes), as in the official code, and initialised uniform(-1, 1)
    with each class column renormed to unit norm. Logits are bounded in [-scale, scale].
    """

    def __init__(self, in_features: int, num_classes: int, scale: float = 30.0) -> None:
        super().__init__()
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(in_features, num_classes))
        with torch.no_grad():
            self.weight.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(x, dim=1).mm(F.normalize(self.weight, dim=0))

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[0]}, num_classes={self.weight.shape[1]}, scale={self.scale}"


class LinearHead(nn.Linear):
    """Linear classifier with bias (the `use_norm=False` branch, `networks.py:165-166`)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__(in_features, num_classes, bias=True)


def make_head(kind: str, in_features: int, num_classes: int, scale: float = 30.0) -> nn.Module:
    """Build a head by kind: "cosine" (scaled by `scale`) or "linear" (`scale` unused, as `self.s = 1` officially)."""
    if kind == "cosine":
        return CosineHead(in_features, num_classes, scale)
    if kind == "linear":
        return LinearHead(in_features, num_classes)
    raise ValueError(f"unknown head kind '{kind}'; known: {HEAD_KINDS}")


class LWSScale(nn.Module):
    """Learnable weight scaling (Kang et al., ICLR 2020): z'_c = f_c * z_c, f initialised to 1, so the kept stage-1
    head (bias included) is unchanged until f trains (`models/TauNormClassifier.py` of the decoupling code)."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.scales = nn.Parameter(torch.ones(num_classes))

    def forward(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return logits * self.scales


class DisAlignCalibration(nn.Module):
    """DisAlign's adaptive calibration (Zhang et al., CVPR 2021, Eq. 3-4): z' = sigma(g(x)) (alpha * z + beta) +
    (1 - sigma(g(x))) z, with g a linear confidence layer on the feature; alpha = 1, beta = 0 at the start, so the
    calibrated head is the identity until the calibration stage trains it."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(num_classes))
        self.beta = nn.Parameter(torch.zeros(num_classes))
        self.confidence = nn.Linear(in_features, 1)

    def forward(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.confidence(features))
        return gate * (self.alpha * logits + self.beta) + (1 - gate) * logits


CALIBRATIONS = {"lws": LWSScale, "disalign": DisAlignCalibration}
