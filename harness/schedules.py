"""Learning-rate schedules, stepped once per epoch as in the official code; each stage carries its own.

`code`: the official CosineAnnealingLRWarmup (utils.py:73-104). With base lr b, warm-up W, peak p, stage
length T and epoch index e within the stage:
    e < W:  b + (p - b) * (e - 1) / (W - 1)          (so epoch 0 runs below b: 0.025 for b = 0.05, p = 0.15)
    e >= W: p * (1 + cos(pi * (e - W) / (T - W))) / 2
SHIKE's stage 1 uses p = 0.15, T = 180; stage 2 restarts with p = 0.1, T = 20 (0.0375 at its first epoch, ~1.09e-3
at its last). A stage shorter than 4 * W epochs skips the warm-up (a shortened warm-up would start below zero:
the official epoch-0 value is b - (p - b) / (W - 1)), so short CPU schedules run cosine from the peak.

`paper`: lr(e) = b * (1 + cos(pi * e / T)) / 2, cosine from b to 0, restarted for each stage.

`step` (LDAM-DRW's `adjust_learning_rate`, the recipe of most single-model baselines): p * (e + 1) / W during the
warm-up, then p times the factor of each (fraction f, factor) in `stage.lr_steps` with e >= round(f * T); factors
are absolute, not cumulative (LDAM: (0.8, 0.01), (0.9, 1e-4) = x0.01 after epoch 160 and x1e-4 after 180 of 200).

`cosine`: p * (1 + cos(pi * e / T)) / 2, cosine from the stage's peak to 0 with no warm-up (cRT, LWS, WB stage 2).
"""

from __future__ import annotations

import math

from harness.errors import HarnessError
from harness.method import Stage

SCHEDULES = ("code", "paper", "step", "cosine")


def code_lr(epoch: int, total: int, base: float, peak: float, warmup: int = 5) -> float:
    warm = warmup if total >= 4 * warmup and warmup >= 2 else 0
    if epoch < warm:
        return base + (peak - base) * (epoch - 1) / (warm - 1)
    return peak * (1 + math.cos(math.pi * (epoch - warm) / (total - warm))) / 2


def paper_lr(epoch: int, total: int, base: float) -> float:
    return base * (1 + math.cos(math.pi * epoch / total)) / 2


def step_lr(epoch: int, total: int, peak: float, warmup: int, steps: tuple[tuple[float, float], ...]) -> float:
    if epoch < warmup:
        return peak * (epoch + 1) / warmup
    factor = 1.0
    for fraction, value in sorted(steps):
        if epoch >= round(fraction * total):
            factor = value
    return peak * factor


def stage_lr(stage: Stage, default_schedule: str, base_lr: float, epoch: int, total: int) -> float:
    """LR of `epoch` (0-based, within the stage) of a stage `total` epochs long."""
    schedule = stage.schedule or default_schedule
    if schedule == "code":
        return code_lr(epoch, total, base_lr, stage.peak_lr, stage.warmup_epochs)
    if schedule == "paper":
        return paper_lr(epoch, total, base_lr)
    if schedule == "step":
        return step_lr(epoch, total, stage.peak_lr, stage.warmup_epochs, stage.lr_steps)
    if schedule == "cosine":
        return paper_lr(epoch, total, stage.peak_lr)
    raise HarnessError(f"unknown schedule '{schedule}' (stage '{stage.name}'); known: {', '.join(SCHEDULES)}")
