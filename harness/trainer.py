"""The stage loop. It knows stages, loss terms and parameter groups; it never knows a method's name.

Per stage: choose the head set, freeze everything outside `stage.trainable`, build a fresh SGD (the stage's weight
decay) and its LR schedule; then for each epoch let the loss terms set their epoch's weights (`start_epoch`), draw
the epoch from the stage's sampler, sum the weighted loss terms (mixed criterion under mixup), apply the stage's
constraints after each step or epoch, and log each term by name (`loss/<name>`, unweighted).
Loss sums stay on the device during the epoch and are read once at its end (no per-step host syncs).
A checkpoint is written atomically after every epoch; `resume` continues from it to the same result.
Under DDP (`replicas`, harness.distributed) the forward goes through the stage's DDP wrapper (`model_call`), the
epoch's loss sums are summed over the processes before they are read, and rank 0 alone writes the checkpoint.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.checkpoint import load_checkpoint, save_checkpoint
from harness.config import RunConfig, plan_epochs
from harness.distributed import LOCAL, Local
from harness.errors import HarnessError
from harness.feeders import ViewFeed, prepare_views
from harness.hooks import Hook
from harness.method import MethodSpec, Stage
from harness.samplers import make_draw, make_view_draw
from harness.schedules import stage_lr
from harness.seeding import derive_seed

log = logging.getLogger(__name__)


class NonFiniteLoss(HarnessError):
    """A loss went NaN or infinite: the run is marked FAILED; the last checkpoint stays for inspection."""


@dataclass
class StageRun:
    """A stage as planned for this run: its place, its epochs and its first epoch on the run's global count."""

    index: int
    stage: Stage
    epochs: int
    first_global_epoch: int


def plan(spec: MethodSpec, cfg: RunConfig) -> list[StageRun]:
    runs, first = [], 0
    for index, (stage, epochs) in enumerate(zip(spec.stages, plan_epochs(spec.stages, cfg.train))):
        runs.append(StageRun(index, stage, epochs, first))
        first += epochs
    return runs


def enter_stage(spec: MethodSpec, stage: Stage, cfg: RunConfig) -> torch.optim.Optimizer:
    """Select the head, set requires_grad by parameter group, and build the stage's optimizer."""
    model = spec.model
    model.use_head(stage.head)
    groups = model.parameter_groups()
    unknown = set(stage.trainable) - set(groups)
    if unknown:
        raise HarnessError(f"stage '{stage.name}' trains unknown parameter groups {sorted(unknown)}")
    for name, params in groups.items():
        for p in params:
            p.requires_grad_(name in stage.trainable)
    trainable = [p for name in stage.trainable for p in groups[name]]
    if stage.views and stage.mixup > 0:
        raise HarnessError(f"stage '{stage.name}' has both views and mixup; the mixed criterion is defined for "
                           "single-view batches only")
    o = cfg.optim
    weight_decay = o.weight_decay if stage.weight_decay is None else stage.weight_decay
    fused = trainable[0].device.type == "cuda"  # one optimizer kernel per step on CUDA; foreach on CPU
    return torch.optim.SGD(trainable, lr=o.lr, momentum=o.momentum, weight_decay=weight_decay, nesterov=o.nesterov,
                           fused=fused or None, foreach=None if fused else True)


def compile_mode(setting: str, device: torch.device) -> str | None:
    """`train.compile` -> a torch.compile mode or None (eager). auto: CUDA graphs on CUDA, where per-step kernel
    launches dominate at batch 128 (performance-anchors.md section 3.3); eager on CPU, where compute dominates."""
    if setting == "auto":
        return "reduce-overhead" if device.type == "cuda" else None
    if setting == "off":
        return None
    if setting not in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        raise HarnessError(f"unknown train.compile '{setting}'; known: auto, off, default, reduce-overhead, "
                           "max-autotune, max-autotune-no-cudagraphs")
    return setting


def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    model.train()
    if freeze_bn:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


class Trainer:
    """Runs a method's stages on a feeder; `hooks` observe it (evaluation, tracking, progress, pruning)."""

    def __init__(self, spec: MethodSpec, cfg: RunConfig, feeder: Any, device: torch.device,
                 checkpoint_path: Path | None = None, hooks: Sequence[Hook] = (), replicas: Local = LOCAL) -> None:
        self.spec, self.cfg, self.feeder, self.device = spec, cfg, feeder, device
        self.checkpoint_path, self.hooks = checkpoint_path, list(hooks)
        self.replicas = replicas  # one process (LOCAL), or this process's part of a DDP run
        self.model_call: Callable[..., Any] = spec.model  # the training forward: the model, or the stage's DDP wrapper
        self.losses = nn.ModuleList([term.fn for stage in spec.stages for term in stage.losses]).to(device)
        # Everything with state besides the model and optimizer (loss buffers such as DRW weights, constraint
        # thresholds): saved in each checkpoint.
        constraints = [c for stage in spec.stages for c in stage.constraints]
        self.state = nn.ModuleList([self.losses, *constraints]).to(device)
        self.memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.spec.model.to(device, memory_format=self.memory_format)
        self.autocast = cfg.train.amp and device.type == "cuda"
        self.stages = plan(spec, cfg)
        self.total_epochs = sum(s.epochs for s in self.stages)
        self.loss_step = self.forward_losses
        mode = compile_mode(cfg.train.compile, device)
        if mode is not None:
            # dynamic=False: a full batch and the smaller last batch give two static graphs, no shape guards.
            self.loss_step = torch.compile(self.forward_losses, mode=mode, dynamic=False)
        self.checkpoint_interval = cfg.train.checkpoint_interval or (10 if device.type == "cuda" else 1)
        self.stop_reason: str | None = None
        self.images_trained = 0  # by this process (a resumed run counts only what it trained)
        # every view augmentation the stages name, checked (and built once) before any training
        prepare_views(feeder, [view.augment for stage in spec.stages for view in stage.views])

    def request_stop(self, reason: str) -> None:
        """Stop after the current epoch (its checkpoint and hooks still run)."""
        self.stop_reason = reason

    def _call(self, event: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self, *args)

    def forward_losses(self, stage_index: int, images: torch.Tensor, labels: torch.Tensor,
                       mix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Forward pass and every loss term of the stage: returns (term values..., weighted total) stacked.
        `mix` = (lambda, partner labels): the images are already mixed; each term is the mixed criterion
        lambda * term(y) + (1 - lambda) * term(y_partner).
        This is the part `train.compile` hands to torch.compile (one graph per stage; no host syncs inside)."""
        stage = self.stages[stage_index].stage
        images = images.contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model_call(images)
        out.logits, out.expert_logits = out.logits.float(), out.expert_logits.float()
        if mix is None:
            values = [term.fn(out, labels) for term in stage.losses]
        else:
            lam, partner = mix
            values = [lam * term.fn(out, labels) + (1 - lam) * term.fn(out, partner) for term in stage.losses]
        total = values[0] * stage.losses[0].weight
        for term, value in zip(stage.losses[1:], values[1:]):
            total = total + term.weight * value
        return torch.stack([*values, total])

    def step(self, stage_index: int, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
             sums: torch.Tensor) -> None:
        stage = self.stages[stage_index].stage
        optimizer.zero_grad(set_to_none=True)  # before the forward: old gradients are not alive during it
        mix = None
        if stage.mixup > 0:  # Zhang et al. 2018: one lambda per batch, a random partner per image
            lam = torch.distributions.Beta(stage.mixup, stage.mixup).sample().to(images.device)
            partner = torch.randperm(len(labels), device=images.device)
            images = lam * images + (1 - lam) * images[partner]
            mix = (lam, labels[partner])
        try:
            values = self.loss_step(stage_index, images, labels, mix)
        except Exception as error:  # "torch.compile where it works": a failed compile falls back to eager
            if self.loss_step == self.forward_losses:
                raise
            log.warning("torch.compile failed (%s: %s); continuing in eager mode", type(error).__name__, error)
            self.loss_step = self.forward_losses
            values = self.loss_step(stage_index, images, labels, mix)
        values[-1].backward()
        optimizer.step()
        self.constrain(stage, "step")
        sums += values.detach() * (len(labels) // (1 + len(stage.views)))  # per image, not per view

    def constrain(self, stage: Stage, every: str) -> None:
        for constraint in stage.constraints:
            if constraint.every == every:
                constraint.apply(self.spec.model)

    def run_epoch(self, run: StageRun, optimizer: torch.optim.Optimizer, epoch: int) -> dict[str, float]:
        lr = stage_lr(run.stage, self.cfg.optim.schedule, self.cfg.optim.lr, epoch, run.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        set_train_mode(self.spec.model, run.stage.freeze_bn)
        self.spec.model.start_epoch(epoch, run.epochs)
        for term in run.stage.losses:
            term.fn.start_epoch(epoch, run.epochs)
        sums = torch.zeros(len(run.stage.losses) + 1, device=self.device)
        seen = 0
        seed = derive_seed(self.cfg.train.seed, run.index, epoch)
        torch.manual_seed(seed)  # what the step draws (mixup, noisy losses) replays on resume, as the feeder does
        draw = make_draw(run.stage.sampler, epoch, run.epochs)
        views = [ViewFeed(make_view_draw(view.sampler, epoch, run.epochs), view.augment) for view in run.stage.views]
        batches = self.feeder.epoch(seed, draw, views) if views else self.feeder.epoch(seed, draw)
        for images, labels in batches:
            self.step(run.index, optimizer, images, labels, sums)
            seen += len(labels) // (1 + len(views))  # images of the epoch, not views of them
            self._call("after_step")
        self.constrain(run.stage, "epoch")
        sums, seen = self.replicas.total(sums, seen)  # every process's share of the epoch (identity in one)
        self.images_trained += seen
        means = (sums / max(seen, 1)).tolist()  # the one host sync of the epoch
        names = [f"loss/{t.name}" for t in run.stage.losses] + ["loss/total"]
        metrics = dict(zip(names, means))
        if not all(math.isfinite(v) for v in means):
            shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            raise NonFiniteLoss(f"non-finite loss in stage '{run.stage.name}', epoch {epoch + 1}/{run.epochs} ({shown}); "
                                "lower optim.lr or check the method's loss weights")
        metrics["lr"] = lr
        return metrics

    def fit(self, resume: bool = False) -> None:
        """Run every stage from the start, or from the checkpoint with `resume`; returns early on request_stop."""
        start_stage, start_epoch, optimizer_state = 0, 0, None
        if resume and self.checkpoint_path is not None:
            state = load_checkpoint(self.checkpoint_path)
            if state is not None:
                self.spec.model.load_state_dict(state["model"])
                if "state" in state:
                    self.state.load_state_dict(state["state"])
                start_stage, start_epoch, optimizer_state = state["stage"], state["epoch"], state["optimizer"]
        self.start = (start_stage, start_epoch)
        self._call("before_train")
        for run in self.stages[start_stage:]:
            optimizer = enter_stage(self.spec, run.stage, self.cfg)
            first = start_epoch if run.index == start_stage else 0
            if optimizer_state is not None and run.index == start_stage:
                optimizer.load_state_dict(optimizer_state)
            self.model_call = self.spec.model  # the last stage's DDP wrapper goes before the next is built
            self.model_call = self.replicas.wrap(self.spec.model)  # after requires_grad: DDP syncs what trains
            if first == 0:
                for constraint in run.stage.constraints:
                    constraint.begin(self.spec.model)
            self.first_epoch = first
            self._call("before_stage", run)
            for epoch in range(first, run.epochs):
                metrics = self.run_epoch(run, optimizer, epoch)
                self._call("after_epoch", run.first_global_epoch + epoch, metrics)
                self.stop_reason = self.replicas.from_main(lambda: self.stop_reason)  # rank 0's say: all stop alike
                if (epoch + 1) % self.checkpoint_interval == 0 or epoch + 1 == run.epochs or self.stop_reason:
                    self.save(run.index, epoch + 1, optimizer)
                if self.stop_reason:
                    return
            self._call("after_stage", run)
        self.replicas.sync_buffers(self.spec.model)
        self._call("after_train")

    def save(self, stage_index: int, next_epoch: int, optimizer: torch.optim.Optimizer) -> None:
        if self.checkpoint_path is None:
            return
        if self.replicas.is_main:  # one writer: every process holds the same weights and optimizer state
            save_checkpoint(self.checkpoint_path, {"model": self.spec.model.state_dict(), "stage": stage_index,
                                                   "epoch": next_epoch, "optimizer": optimizer.state_dict(),
                                                   "state": self.state.state_dict()})
        self.replicas.barrier()  # no process runs past an epoch whose checkpoint is not on disk yet
        self._call("after_checkpoint")
