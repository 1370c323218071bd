"""Batch feeders: where training batches come from. The trainer only sees `epoch(seed)` -> (images, labels).

ReferenceFeeder: the official per-image pipeline (PIL ops in a DataLoader); the reference, and the CPU default.
DeviceFeeder: the fast path: uint8 training set resident on the device, the whole epoch augmented in one batched
pass with per-sample randomness, then sliced into batches with no host round trips.
Both take extra views (`ViewFeed`): each view has its image order and its augmentation pipeline (the run's own, or a
named one of the dataset's, built once per feeder).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from harness.data import Augmentations, FileSplit, Split
from harness.errors import HarnessError
from harness.samplers import Draw

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ViewFeed:
    """One extra view as a feeder receives it (`harness.method.View` with its epoch's draw made): `draw` None = the
    batch's own images augmented again, a Draw = an independent draw of images; `augment` None = the run's own
    augmentation (`data.augment`), a name = that pipeline of the dataset for this view (PaCo's key view: "sim")."""

    draw: Draw | None = None
    augment: str | None = None


# One extra view per entry: a `ViewFeed`, or a bare draw (or None), which is ViewFeed(draw) (the run's augmentation).
# Views come stacked view-major: images (V*B, ...) = [view 0; view 1; ...], labels likewise (harness.method.View).
ViewDraws = Sequence[ViewFeed | Draw | None]


def view_feeds(views: ViewDraws) -> list[ViewFeed]:
    return [view if isinstance(view, ViewFeed) else ViewFeed(view) for view in views]


class ViewPipelines:
    """The augmentation pipelines of a feeder's views, each distinct one built once and kept: None (and the run's
    own name) is the run's pipeline; another name is built by `build(name)` on first use (the dataset's
    `Augmentations.per_image` or `.batched` with the run's mean and std). An unknown name, or a named view on a
    feeder built without `build`, is a `HarnessError` in one line."""

    def __init__(self, own: Callable, own_name: str | None = None, build: Callable[[str], Callable] | None = None
                 ) -> None:
        self.build = build
        self.built: dict[str | None, Callable] = {None: own}
        if own_name is not None:
            self.built[own_name] = own

    def get(self, name: str | None) -> Callable:
        if name not in self.built:
            if self.build is None:
                raise HarnessError(f"a view asks for augmentation '{name}', but this feeder was built with the run's "
                                   "pipeline only; build it with make_feeder (or pass `pipelines`)")
            try:
                self.built[name] = self.build(name)
            except (ValueError, KeyError, HarnessError) as error:
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise HarnessError(f"unknown view augmentation '{name}' (harness.method.View.augment): {reason}"
                                   ) from None
        return self.built[name]

    def prepare(self, names: Iterable[str | None]) -> None:
        """Build (and so check) every named pipeline now, before any training step."""
        for name in names:
            self.get(name)


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
        return self.item(index, self.transform)

    def item(self, index: int, transform: Callable) -> tuple[torch.Tensor, int]:
        """Image `index` through `transform` (a view's own pipeline), with its label."""
        return transform(Image.fromarray(self._hwc[index])), int(self.labels[index])


class ViewsDataset(Dataset):
    """Item k = the items orders[0][k], orders[1][k], ... of `base`, each augmented on its own, view v with
    transforms[v]."""

    def __init__(self, base: AugmentedDataset, orders: list[list[int]], transforms: list[Callable]) -> None:
        self.base, self.orders, self.transforms = base, orders, transforms

    def __len__(self) -> int:
        return len(self.orders[0])

    def __getitem__(self, k: int) -> list[tuple[torch.Tensor, int]]:
        return [self.base.item(order[k], transform) for order, transform in zip(self.orders, self.transforms)]


def view_orders(first: torch.Tensor, views: ViewDraws, labels: torch.Tensor, generator: torch.Generator) -> list:
    """The image order of every view: view 0's, then each extra view's (its own draw, or view 0's order again)."""
    return [first, *(first if draw is None else draw(labels, generator) for draw in views)]


class ReferenceFeeder:
    """`transform`: the dataset's per-image training transform (PIL image -> normalised tensor). `pipelines`:
    name -> per-image transform, for views with their own augmentation (`ViewFeed.augment`); `augment` names
    `transform` so that a view naming the run's own augmentation reuses it."""

    def __init__(self, split: Split, transform: Callable, batch_size: int, device: torch.device,
                 num_workers: int = 0, pipelines: Callable[[str], Callable] | None = None,
                 augment: str | None = None) -> None:
        self.dataset = AugmentedDataset(split.images, split.labels, transform)
        self.batch_size, self.device, self.num_workers = batch_size, device, num_workers
        self.pipelines = ViewPipelines(transform, augment, pipelines)

    def prepare_views(self, augments: Iterable[str | None]) -> None:
        """Check (and build once) the views' augmentation pipelines before training (`ViewPipelines.prepare`)."""
        self.pipelines.prepare(augments)

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
        feeds = view_feeds(views)
        transforms = [self.dataset.transform, *(self.pipelines.get(feed.augment) for feed in feeds)]
        labels = self.dataset.labels
        first = torch.randperm(len(labels), generator=generator) if draw is None else draw(labels, generator)
        orders = [order.tolist() for order in view_orders(first, [f.draw for f in feeds], labels, generator)]
        loader = DataLoader(ViewsDataset(self.dataset, orders, transforms), batch_size=self.batch_size, shuffle=False,
                            drop_last=False, num_workers=self.num_workers, generator=generator,
                            pin_memory=self.device.type == "cuda", persistent_workers=False)
        for per_view in loader:  # [(images, labels) of view 0, of view 1, ...]
            images = torch.cat([v[0] for v in per_view]).to(self.device, non_blocking=True)
            yield images, torch.cat([v[1] for v in per_view]).to(self.device, non_blocking=True)


class DeviceFeeder:
    """`augment`: the dataset's batched transform, (uint8 images on the device, generator) -> normalised floats.
    `pipelines`: name -> batched transform, for views with their own augmentation (`ViewFeed.augment`);
    `augment_name` names `augment` so that a view naming the run's own augmentation reuses it."""

    def __init__(self, split: Split, augment: Callable, batch_size: int, device: torch.device,
                 pipelines: Callable[[str], Callable] | None = None, augment_name: str | None = None) -> None:
        self.images = split.images.to(device)
        self.labels = split.labels.to(device)
        self.augment = augment
        self.batch_size, self.device = batch_size, device
        self.generator = torch.Generator(device=device)
        self.pipelines = ViewPipelines(augment, augment_name, pipelines)

    def prepare_views(self, augments: Iterable[str | None]) -> None:
        """Check (and build once) the views' augmentation pipelines before training (`ViewPipelines.prepare`)."""
        self.pipelines.prepare(augments)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def epoch(self, seed: int, draw: Draw | None = None, views: ViewDraws = ()) -> Iterator[Batch]:
        feeds = view_feeds(views)
        pipelines = [self.augment, *(self.pipelines.get(feed.augment) for feed in feeds)]
        self.generator.manual_seed(seed)
        order = (torch.randperm(len(self.labels), device=self.device, generator=self.generator) if draw is None
                 else draw(self.labels, self.generator))
        # channels_last once per epoch, so the per-step batches are already in the model's memory format; every
        # view is its own batched pass (with its own pipeline), so each image gets independent randomness per view
        orders = view_orders(order, [f.draw for f in feeds], self.labels, self.generator)
        images = [augment(self.images[o], self.generator).contiguous(memory_format=torch.channels_last)
                  for o, augment in zip(orders, pipelines)]
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
        return DeviceFeeder(split, augmentations.batched(augment, mean, std), batch_size, device,
                            pipelines=lambda name: augmentations.batched(name, mean, std), augment_name=augment)
    return ReferenceFeeder(split, augmentations.per_image(augment, mean, std), batch_size, device, num_workers,
                           pipelines=lambda name: augmentations.per_image(name, mean, std), augment=augment)


def prepare_views(feeder: Any, augments: Iterable[str | None]) -> None:
    """Check every view augmentation a run's stages name (`harness.method.View.augment`) against its feeder before
    training: each pipeline is built once here and reused by every epoch. A feeder without `prepare_views` is left
    alone (DaliFeeder's refuses any view); a wrapper (DDP's sharded feeder) is seen
    through."""
    names = [name for name in augments if name is not None]
    inner = feeder if hasattr(feeder, "prepare_views") else getattr(feeder, "feeder", None)
    if names and inner is not None and hasattr(inner, "prepare_views"):
        inner.prepare_views(names)
