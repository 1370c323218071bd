"""Weight constraints applied after optimizer steps (`Stage.constraints`).

MaxNorm (Alshammari et al., CVPR 2022, Weight Balancing, `utils/regularizers.py: MaxNorm_via_PGD`): projected
gradient descent that caps the L2 norm of each class row of the classifier weight at one threshold per classifier,
t = min_c ||w_c|| + thresh * (max_c ||w_c|| - min_c ||w_c||), taken once from the weights at the stage's start;
the bias is unconstrained. The official code projects once per epoch, after the training pass.
"""

from __future__ import annotations

import torch

from harness.method import Constraint, LTModel
from harness.methods.posthoc import linear_weights


class MaxNorm(Constraint):
    thresholds: torch.Tensor

    def __init__(self, experts: int, thresh: float = 0.1, every: str = "epoch") -> None:
        super().__init__()
        if every not in ("step", "epoch"):
            raise ValueError(f"MaxNorm every must be 'step' or 'epoch', got {every!r}")
        self.thresh, self.every = thresh, every
        self.register_buffer("thresholds", torch.full((experts,), float("inf")))

    @torch.no_grad()
    def begin(self, model: LTModel) -> None:
        for m, weight in enumerate(linear_weights(model)):
            norms = weight.norm(dim=1)
            self.thresholds[m] = norms.min() + self.thresh * (norms.max() - norms.min())

    @torch.no_grad()
    def apply(self, model: LTModel) -> None:
        for m, weight in enumerate(linear_weights(model)):
            norms = weight.norm(dim=1, keepdim=True)
            weight.mul_(torch.where(norms > self.thresholds[m], self.thresholds[m] / norms, torch.ones_like(norms)))
