"""Post-hoc steps after training (`MethodSpec.posthoc`): fitted once on the trained model, then applied to every
prediction of the final evaluation. Per-epoch evaluations see the model as trained; the final one sees this."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from harness.data import Split
from harness.evaluate import predict
from harness.method import LTModel, ModelOutput, PostHoc, TrainFeatures


class PostHocModel(nn.Module):
    """The trained model followed by its post-hoc steps, in order; what the final evaluation forwards."""

    def __init__(self, model: LTModel, steps: Sequence[PostHoc]) -> None:
        super().__init__()
        self.model, self.steps = model, nn.ModuleList(steps)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        out = self.model(x)
        for step in self.steps:
            out = step(self.model, out)
        return out


def fit_posthoc(model: LTModel, steps: Sequence[PostHoc], train: Split, mean, std,
                device: torch.device) -> nn.Module:
    """Fit each step on `model` (with one non-augmented pass over `train` if any step needs features) and return
    the predictor for the final evaluation: `model` itself when there are no steps."""
    if not steps:
        return model
    features = None
    if any(step.needs_train_features for step in steps):
        preds = predict(model, train, mean, std, device, features=True)
        features = TrainFeatures(preds.features, preds.labels)
    for step in steps:
        step.to(device)
        step.fit(model, features)
    return PostHocModel(model, steps)
