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

    def classifiers(self) -> list[nn.Module]:
        """The active head set, one classifier per expert (post-hoc steps such as tau-norm read their weights)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its classifiers")

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called by the trainer before epoch `epoch` (0-based) of a stage `epochs` long, in training mode: a model
        whose forward changes with the epoch (BBN's cumulative-learning weight) sets its buffers here, as a function
        of the epoch alone, so a resumed run sees the same values (buffers are part of the checkpointed state)."""

    def inference_parameter_count(self) -> int:
        """Parameters used at inference: everything except the head groups not active."""
        groups = self.parameter_groups()
        unused = {g for g in groups if g.endswith("head") and g != self.active_head}
        return sum(p.numel() for g, ps in groups.items() if g not in unused for p in ps)


class LossTermModule(nn.Module):
    """A loss term: forward(out, target) -> scalar. State (class counts) lives in buffers, never on a fixed device."""

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called by the trainer before epoch `epoch` (0-based) of a stage `epochs` long: a term whose weights change
        with the epoch (deferred re-weighting, annealed coefficients) sets its buffers here, as a function of the
        epoch alone, so a resumed run sees the same values. Its buffers are saved in every checkpoint."""


class Constraint(nn.Module):
    """A projection applied to the model after optimizer steps (MaxNorm, say), `every` "step" or "epoch".
    `begin` runs when its stage starts from its first epoch (thresholds taken from the weights then); its buffers
    are saved in every checkpoint, so a resumed stage keeps the thresholds of its start."""

    every: str = "step"

    def begin(self, model: LTModel) -> None:
        pass

    def apply(self, model: LTModel) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class PostHoc(nn.Module):
    """A step after the last stage that changes how the trained model predicts and never trains it (tau-norm, NCM,
    post-hoc logit adjustment). `fit` runs once on the trained model (`train_features` is a non-augmented pass over
    the training split when `needs_train_features`); `forward` maps every prediction of the final evaluation."""

    needs_train_features: bool = False

    def fit(self, model: LTModel, train_features: TrainFeatures | None) -> None:
        pass

    def forward(self, model: LTModel, out: ModelOutput) -> ModelOutput:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class TrainFeatures:
    """Pooled features (M, N, D) of the training split in eval mode without augmentation, and its labels (N,)."""

    features: torch.Tensor
    labels: torch.Tensor


@dataclass(frozen=True)
class LossTerm:
    """One named term of a stage's objective; the trainer adds weight * fn(out, target) and logs `loss/<name>`."""

    name: str
    weight: float
    fn: LossTermModule


@dataclass(frozen=True)
class View:
    """One more view in every training batch of a stage. `sampler` None: the batch's own images augmented again,
    with independent per-image randomness (two-view contrastive methods: PaCo, BCL); a sampler name
    (`harness.samplers`): an independent draw of images from that sampler (BBN's reversed branch).
    `augment` None: the view is augmented as view 0, with the run's `data.augment`; a name: with that augmentation
    pipeline of the dataset (PaCo's and BCL's contrastive views: "sim"). The feeder builds each distinct pipeline
    once; a name the dataset does not know is refused in one line.

    With V = 1 + len(stage.views) the model receives the views stacked view-major, (V*B, C, H, W) = [view 0; view 1;
    ...], and every loss term the labels stacked the same way, (V*B,). In evaluation the model sees plain batches."""

    sampler: str | None = None
    augment: str | None = None


@dataclass(frozen=True)
class Stage:
    """One training stage; it owns its length and learning-rate schedule, so a method with a third stage (a post-hoc
    or LWS step, say) adds a `Stage` in its builder and changes no engine file.

    epochs: the stage's length in the method's own recipe (SHIKE: 180 then 20). `train.epochs=E` rescales every
    stage of a method by E / (sum of its stages' epochs); `train.stage_epochs="E1+E2"` sets them one by one.
    peak_lr / warmup_epochs: the `code` schedule (official warm-up then cosine, restarted per stage).
    schedule: "code" or "paper" for this stage; None follows `optim.schedule` (the preset's choice).
    schedule "step" (LDAM-DRW's recipe): linear warm-up to the peak over `warmup_epochs` ((e+1)/W of it), then the
    peak times the factor of every (fraction, factor) in `lr_steps` whose epoch round(fraction * epochs) has passed.
    trainable: the parameter groups that train; everything else is frozen (requires_grad False).
    head: the classifier set used in this stage and afterwards at evaluation.
    freeze_bn: BN layers in eval mode during this stage (the official code keeps them updating).
    sampler: how the stage draws its training images (`harness.samplers`): instance (every image once per epoch),
    class-balanced, square-root, progressive (instance -> class-balanced over the stage); epochs stay N images long.
    weight_decay: this stage's weight decay; None keeps `optim.weight_decay`.
    mixup: alpha of mixup (Beta(alpha, alpha) per batch, images mixed, every term the mixed criterion); 0 is off.
    constraints: projections applied after optimizer steps (`Constraint`).
    views: extra views of every training batch (`View`); () is the plain single-view batch.
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
    sampler: str = "instance"
    weight_decay: float | None = None
    mixup: float = 0.0
    lr_steps: tuple[tuple[float, float], ...] = ()
    constraints: tuple[Constraint, ...] = ()
    views: tuple[View, ...] = ()


@dataclass
class MethodSpec:
    """What a method builder returns."""

    model: LTModel
    stages: tuple[Stage, ...]
    notes: dict[str, str] = field(default_factory=dict)
    posthoc: tuple[PostHoc, ...] = ()


def own_recipe(**overrides: object):
    """Declare the config half of a builder's own published recipe (`optim.batch_size`, `data.augment`, ...), applied
    by `--preset own`, which also sets the builder's `recipe` switch to "own" so its stages take their own epochs and
    LR schedule. Without `--preset own` every method runs on SHIKE's recipe, for a like-for-like table."""

    def attach(builder):
        builder.own_recipe = {key.replace("__", "."): value for key, value in overrides.items()}
        return builder

    return attach
