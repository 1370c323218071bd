"""Splits whose images name themselves, for feeder tests (the fast-path and multi-view tests share them)."""

from __future__ import annotations

import torch

from harness.data import Split

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def identifiable_split(n: int = 75, num_classes: int = 4) -> Split:
    """Images whose first two pixels encode their index, so an un-augmented batch names its images."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    index = torch.arange(n)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = (index % 256).to(torch.uint8), (index // 256).to(torch.uint8)
    return Split(images, index % num_classes)


def image_ids(batch: torch.Tensor) -> torch.Tensor:
    """The indices an un-augmented, normalised batch of `identifiable_split` images encode."""
    pixels = ((batch[:, 0, 0, :2] * STD[0] + MEAN[0]) * 255).round().long()
    return pixels[:, 0] + 256 * pixels[:, 1]
