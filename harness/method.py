"""The method contract: a builder returns a model, named weighted loss terms and stages. It never trains."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class ModelOutput:
    """What every model returns. `logits` is what inference uses (the mean over experts);
    `expert_logits` is (M, B, C) with M = 1 for single models; `features` are pooled (M, B, D)."""

    logits: torch.Tensor
    expert_logits: torch.Tensor
    features: torch.Tensor | None = None


class LTModel(nn.Module):
    """Base class of harness models.

    Parameters are split into named groups ("backbone", "head", "retrain_head") so that stages can say what
    trains without string-matching parameter names. `active_head` chooses the classifier set used by forward:
    "head" in representation learning, "retrain_head" after classifier re-training.
    """

    active_head: str = "head"

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        raise NotImplementedError

    def use_head(self, name: str) -> None:
        if name not in self.parameter_groups():
            raise ValueError(f"model has no head group '{name}'")
        self.active_head = name

    def architecture(self) -> dict[str, object]:
        """Facts logged as `model.*` params for every method alike (experts, dkf, ...), so MLflow's compare view
        lines runs of different methods up on the same keys."""
        return {}

    def inference_parameter_count(self) -> int:
        """Parameters used at inference: everything except the head groups not active."""
        groups = self.parameter_groups()
        unused = {g for g in groups if g.endswith("head") and g != self.active_head}
        return sum(p.numel() for g, ps in groups.items() if g not in unused for p in ps)


class LossTermModule(nn.Module):
    """A loss term: forward(out, target) -> scalar. State (class counts) lives in buffers, never on a fixed device."""

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass(frozen=True)
class LossTerm:
    """One named term of a stage's objective; the trainer adds weight * fn(out, target) and logs `loss/<name>`."""

    name: str
    weight: float
    fn: LossTermModule


@dataclass(frozen=True)
class Stage:
    """One training stage; it owns its length and learning-rate schedule, so a method with a third stage (a post-hoc
    or LWS step, say) adds a `Stage` in its builder and changes no engine file.

    epochs: the stage's length in the method's own recipe (SHIKE: 180 then 20). `train.epochs=E` rescales every
    stage of a method by E / (sum of its stages' epochs); `train.stage_epochs="E1+E2"` sets them one by one.
    peak_lr / warmup_epochs: the `code` schedule (official warm-up then cosine, restarted per stage).
    schedule: "code" or "paper" for this stage; None follows `optim.schedule` (the preset's choice).
    trainable: the parameter groups that train; everything else is frozen (requires_grad False).
    head: the classifier set used in this stage and afterwards at evaluation.
    freeze_bn: BN layers in eval mode during this stage (the official code keeps them updating).
    """

    name: str
    losses: tuple[LossTerm, ...]
    epochs: int = 200
    peak_lr: float = 0.15
    warmup_epochs: int = 5
    schedule: str | None = None
    trainable: tuple[str, ...] = ("backbone", "head")
    head: str = "head"
    freeze_bn: bool = False


@dataclass
class MethodSpec:
    """What a method builder returns."""

    model: LTModel
    stages: tuple[Stage, ...]
    notes: dict[str, str] = field(default_factory=dict)
