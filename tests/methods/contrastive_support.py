"""Shared by the contrastive tests (PaCo, BCL, NCL's MoCo branch): a tiny learnable split, both feeders with per-view
pipelines, and a hook that spies on (or interrupts) training."""

from __future__ import annotations

import torch

from harness.data import Split
from harness.datasets.augment import batched_pipeline, per_image_pipeline
from harness.feeders import DeviceFeeder, ReferenceFeeder
from harness.hooks import Hook

COUNTS = (40, 20, 10, 5)
CPU = torch.device("cpu")
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def toy_split(n: int = 48) -> Split:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % len(COUNTS)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    images[:, 0] = (labels * 60).to(torch.uint8)[:, None, None]
    return Split(images, labels)


def feeder(path: str):
    """Both feeders with per-view pipelines, so the methods' "sim" views get theirs."""
    if path == "reference":
        return ReferenceFeeder(toy_split(), per_image_pipeline("basic", MEAN, STD), 16, CPU,
                               pipelines=lambda name: per_image_pipeline(name, MEAN, STD), augment="basic")
    return DeviceFeeder(toy_split(), batched_pipeline("basic", MEAN, STD), 16, CPU,
                        pipelines=lambda name: batched_pipeline(name, MEAN, STD), augment_name="basic")


class Spy(Hook):
    def __init__(self, fn) -> None:
        self.fn = fn

    def after_epoch(self, trainer, epoch, metrics) -> None:
        self.fn(epoch, metrics)


class Killed(Exception):
    pass
