"""Batch feeders: where training batches come from. The trainer only sees `epoch(seed)` -> (images, labels).

ReferenceFeeder: the official per-image pipeline (PIL ops in a DataLoader); the reference, and the CPU default.
DeviceFeeder: the fast path: uint8 training set resident on the device, the whole epoch augmented in one batched
pass with per-sample randomness, then sliced into batches with no host round trips.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from harness.data import Augmentations, FileSplit, Split
from harness.errors import HarnessError
from harness.samplers import Draw

Batch = tuple[torch.Tensor, torch.Tensor]
# One extra view per entry: None = the batch's own images augmented again; a Draw = an independent draw of images.
# Views come stacked view-major: images (V*B, ...) = [view 0; view 1; ...], labels likewise (harness.method.View).
ViewDraws = Sequence[Draw | None]


class AugmentedDataset(Dataset):
    """uint8 (N, 3, H, W) images + labels -> (float tensor, int label), each image turned into a PIL image and passed
    through `transform`, as torchvision's CIFAR dataset does (Image.fromarray on HWC uint8)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected uint8 (N, C, H, W) images, got {images.dtype} {tuple(images.shape)}")
        self._hwc: np.ndarray = images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self._hwc)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self._hwc[index])), int(self.labels[index])


class ViewsDataset(Dataset):
    """Item k = the items orders[0][k], orders[1][k], ... of `base`, each augmented on its own."""

    def __init__(self, base: AugmentedDataset, orders: list[list[int]]) -> None:
        self.base, self.orders = base, orders

    def __len__(self) -> int:
        return len(self.orders[0])

    def __getitem__(self, k: int) -> list[tuple[torch.Tensor, int]]:
        return [self.base[order[k]] for order in self.orders]


def view_orders(first: torch.Tensor, views: ViewDraws, labels: torch.Tensor, generator: torch.Generator) -> list:
    """The image order of every view: view 0's, then each extra view's (its own draw, or view 0's order again)."""
    return [first, *(first if draw is None else draw(labels, generator) for draw in views)]


class ReferenceFeeder:
    """`transform`: the dataset's per-image training transform (PIL image -> normalised tensor)."""

    def __init__(self, split: Split, transform: Callable, batch_size: int, device: torch.device,
                 num_workers: int = 0) -> None:
        self.dataset = AugmentedDataset(split.images, split.labels, transform)
        self.batch_size, self.device, self.num_workers = batch_size, device, num_workers

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def epoch(self, seed: int, draw: Draw | None = None, views: ViewDraws = ()) -> Iterator[Batch]:
        """`draw`: a stage sampler's (labels, generator) -> indices; None shuffles every image once.
        `views`: extra views per batch (see `ViewDraws`)."""
        # Transforms draw from torch's global RNG (num_workers=0) or from worker seeds derived from the
        # loader's generator: seeding both per epoch makes every epoch replayable on resume.
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        if views:
            yield from self._views(generator, draw, views)
            return
        order = None if draw is None else draw(self.dataset.labels, generator).tolist()
        loader = DataLoader(self.dataset, batch_size=self.batch_size, shuffle=order is None, sampler=order,
                            drop_last=False, num_workers=self.num_workers, generator=generator,
                            pin_memory=self.device.type == "cuda", persistent_workers=False)
        for images, labels in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def _views(self, generator: torch.Generator, draw: Draw | None, views: ViewDraws) -> Iterator[Batch]:
        labels = self.dataset.labels
        first = torch.randperm(len(labels), generator=generator) if draw is None else draw(labels, generator)
        orders = [order.tolist() for order in view_orders(first, views, labels, generator)]
        loader = DataLoader(ViewsDataset(self.dataset, orders), batch_size=self.batch_size, shuffle=False,
                            drop_last=False, num_workers=self.num_workers, generator=generator,
                            pin_memory=self.device.type == "cuda", persistent_workers=False)
        for per_view in loader:  # [(images, labels) of view 0, of view 1, ...]
            images = torch.cat([v[0] for v in per_view]).to(self.device, non_blocking=True)
            yield images, torch.cat([v[1] for v in per_view]).to(self.device, non_blocking=True)


class DeviceFeeder:
    """`augment`: the dataset's batched transform, (uint8 images on the device, generator) -> normalised floats."""

    def __init__(self, split: Split, augment: Callable, batch_size: int, device: torch.device) -> None:
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.augment = augment
        self.batch_size, self.device = batch_size, device
        self.generator = torch.Generator(device=device)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def epoch(self, seed: int, draw: Draw | None = None, views: ViewDraws = ()) -> Iterator[Batch]:
        self.generator.manual_seed(seed)
        order = (torch.randperm(len(self.labels), device=self.device, generator=self.generator) if draw is None
                 else draw(self.labels, self.generator))
        # channels_last once per epoch, so the per-step batches are already in the model's memory format; every
        # view is its own batched pass, so each image gets independent randomness per view
        orders = view_orders(order, views, self.labels, self.generator)
        images = [self.augment(self.images[o], self.generator).contiguous(memory_format=torch.channels_last)
                  for o in orders]
        labels = [self.labels[o] for o in orders]
        for start in range(0, len(order), self.batch_size):
            end = start + self.batch_size
            if len(orders) == 1:
                yield images[0][start:end], labels[0][start:end]
            else:
                yield torch.cat([v[start:end] for v in images]), torch.cat([v[start:end] for v in labels])


def make_feeder(split: Split | FileSplit, augmentations: Augmentations, augment: str, mean, std, batch_size: int,
                device: torch.device, fast_path: str, num_workers: int = 0, loader: str = "auto") -> Any:
    """`fast_path`: auto (device feeder on CUDA only, where the dataset has a batched pipeline), on, off.
    A file-backed split gets `harness.file_feeder`'s feeder instead, chosen by `loader` (data.loader)."""
    if isinstance(split, FileSplit):
        from harness.file_feeder import make_file_feeder

        return make_file_feeder(split, augmentations, augment, mean, std, batch_size, device, fast_path,
                                num_workers, loader)
    batched = augmentations.batched is not None
    if fast_path == "on" and not batched:
        raise HarnessError("train.fast_path=on, but this dataset has no batched augmentation; use fast_path=off")
    if fast_path == "on" or (fast_path == "auto" and device.type == "cuda" and batched):
        return DeviceFeeder(split, augmentations.batched(augment, mean, std), batch_size, device)
    return ReferenceFeeder(split, augmentations.per_image(augment, mean, std), batch_size, device, num_workers)
