"""What observes training is a hook passed to the trainer (detectron2's HookBase), never an attribute patched on.

The trainer calls, in order: before_train, then per stage before_stage, per batch after_step, per epoch
after_epoch (with that epoch's losses and lr; evaluation hooks add their metrics to the same dict, so later hooks
see them), after_checkpoint whenever a checkpoint was written, after_stage; and after_train. A hook stops training
after the current epoch with `trainer.request_stop(reason)` (an Optuna pruner, say).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.trainer import StageRun, Trainer


class Hook:
    """No-op base: override what you need."""

    def before_train(self, trainer: Trainer) -> None:
        pass

    def before_stage(self, trainer: Trainer, stage: StageRun) -> None:
        pass

    def after_step(self, trainer: Trainer) -> None:
        pass

    def after_epoch(self, trainer: Trainer, epoch: int, metrics: dict[str, Any]) -> None:
        pass

    def after_checkpoint(self, trainer: Trainer) -> None:
        pass

    def after_stage(self, trainer: Trainer, stage: StageRun) -> None:
        pass

    def after_train(self, trainer: Trainer) -> None:
        pass
