"""Batch feeders: where training batches come from. The trainer only sees `epoch(seed)` -> (images, labels).

ReferenceFeeder: the official per-image pipeline (PIL ops in a DataLoader); the reference, and the CPU default.
DeviceFeeder: the fast path: uint8 training set resident on the device, the whole epoch augmented in one batched
pass with per-sample randomness, then sliced into batches with no host round trips.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from datasets._api import Split
from datasets.augment import AugmentedDataset, train_transform

Batch = tuple[torch.Tensor, torch.Tensor]


class ReferenceFeeder:
    def __init__(self, split: Split, mean, std, augment: str, batch_size: int, device: torch.device,
                 num_workers: int = 0) -> None:
        self.dataset = AugmentedDataset(split.images, split.labels, train_transform(mean, std, augment))
        self.batch_size, self.device, self.num_workers = batch_size, device, num_workers

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def epoch(self, seed: int) -> Iterator[Batch]:
        # Transforms draw from torch's global RNG (num_workers=0) or from worker seeds derived from the
        # loader's generator: seeding both per epoch makes every epoch replayable on resume.
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True, drop_last=False,
                            num_workers=self.num_workers, generator=generator,
                            pin_memory=self.device.type == "cuda", persistent_workers=False)
        for images, labels in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


class DeviceFeeder:
    def __init__(self, split: Split, mean, std, augment: str, batch_size: int, device: torch.device) -> None:
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        from datasets.batched_augment import BatchedAugment  # only the fast path needs it

        self.augment = BatchedAugment(mean, std, augment=augment)
        self.batch_size, self.device = batch_size, device
        self.generator = torch.Generator(device=device)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def epoch(self, seed: int) -> Iterator[Batch]:
        self.generator.manual_seed(seed)
        order = torch.randperm(len(self.labels), device=self.device, generator=self.generator)
        # channels_last once per epoch, so the per-step batches are already in the model's memory format
        images = self.augment(self.images[order], self.generator).contiguous(memory_format=torch.channels_last)
        labels = self.labels[order]
        for start in range(0, len(labels), self.batch_size):
            yield images[start:start + self.batch_size], labels[start:start + self.batch_size]


def make_feeder(split: Split, mean, std, augment: str, batch_size: int, device: torch.device, fast_path: str,
                num_workers: int = 0) -> ReferenceFeeder | DeviceFeeder:
    """`fast_path`: auto (device feeder on CUDA only), on, off."""
    use_device = fast_path == "on" or (fast_path == "auto" and device.type == "cuda")
    if use_device:
        return DeviceFeeder(split, mean, std, augment, batch_size, device)
    return ReferenceFeeder(split, mean, std, augment, batch_size, device, num_workers)
