"""File-backed input pipeline for datasets too large to hold in memory (ImageNet-LT, iNat 2018, Places-LT).

`FileFeeder` has the feeders' interface (`len(feeder)` batches, `epoch(seed, draw, views)` -> (images, labels) on
the device): JPEGs are read with PIL in DataLoader workers and passed through the dataset's per-image training
transform. Every sample of an epoch gets its own seed, drawn from the epoch seed in the main process, and its
transform runs under that seed: an epoch replays exactly on resume, with any number of workers (0 included).

Extra views (`harness.feeders.ViewFeed`, as ReferenceFeeder takes them): view 0 is the single-view epoch itself (the
same order and per-sample seeds, drawn first from the epoch generator, so a single-view run's stream did not move
when views came); then the same generator draws each extra view's order (view 0's again for `draw` None, else an
independent draw of the view's sampler, `harness.feeders.view_orders`), then one seed per (extra view, position).
Each view has its own pipeline (None: the run's `data.augment`; a name: `Augmentations.per_file(name)`, e.g. "sim",
built once, `harness.feeders.ViewPipelines`). Batches are stacked view-major, [view 0; view 1; ...].

`file_eval_batches` is the evaluation side: Resize(crop * 256/224) + CenterCrop(crop) + ToTensor + Normalize in
list order (Resize(256) + CenterCrop(224) at the default crop, as every LT codebase tests; large-scale-lt.md 2.1).

`data.loader` picks the training pipeline: `torchvision` (this module), `dali` (`harness.dali_feeder`: nvJPEG
decoding on the GPU, where NVIDIA DALI is installed) or `auto` (DALI on CUDA when installed and the augmentation is
one it reproduces exactly, else torchvision). DALI's pipeline feeds one view per batch: `training_loader` makes
`auto` torchvision for a run whose stages have views, and refuses `dali` for it in one line, when the run builds its
feeder (its method, and so its stages, are known by then).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from harness.data import DEFAULT_CROP, Augmentations, FileSplit, LTData
from harness.errors import HarnessError
from harness.feeders import ViewDraws, ViewPipelines, view_feeds, view_orders
from harness.samplers import Draw

Batch = tuple[torch.Tensor, torch.Tensor]
LOADERS = ("auto", "torchvision", "dali")
MAX_WORKERS = 16  # NCL-style augmentation needs ~14 busy cores per GPU at 2,000 img/s (large-scale-lt.md section 4)
EVAL_BATCH = 256  # host batches of decoded crops: 256 x 3 x 224 x 224 floats is 154 MB


@dataclass(frozen=True)
class FileLoading:
    """How file-backed splits are fed: `loader` (auto | torchvision | dali) and `image_size` (the crop side)."""

    loader: str = "auto"
    image_size: int = DEFAULT_CROP

    def __post_init__(self) -> None:
        if self.loader not in LOADERS:
            raise HarnessError(f"data.loader={self.loader}: expected one of {', '.join(LOADERS)}")
        if self.image_size < 8:
            raise HarnessError(f"data.image_size={self.image_size}: expected the crop side in pixels (224; >= 8)")


def file_loading(data_config: Any) -> FileLoading:
    """`data.loader` and `data.image_size` of a run's DataConfig (the defaults where it does not declare them)."""
    return FileLoading(data_config.loader, data_config.image_size)


def with_crop(data: LTData, crop: int) -> LTData:
    """`data` with every file-backed split fed at `crop` x `crop`; in-memory splits are left as they are."""
    if not isinstance(data.train, FileSplit) or data.train.crop == crop:
        return data
    resize = lambda split: replace(split, crop=crop) if isinstance(split, FileSplit) else split  # noqa: E731
    return replace(data, train=resize(data.train), test=resize(data.test), val=resize(data.val))


def load_rgb(path: str) -> Image.Image:
    """torchvision's pil_loader: open, decode and convert to RGB (greyscale and CMYK JPEGs exist in ImageNet)."""
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def worker_count(requested: int, device: torch.device) -> int:
    """`train.num_workers`, or where it is 0 on CUDA, the usable cores up to MAX_WORKERS: decoding is the bottleneck
    there, and per-sample seeding makes the batches independent of the worker count."""
    if requested > 0 or device.type != "cuda":
        return requested
    return min(MAX_WORKERS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class FileDataset(Dataset):
    """Item k of an epoch: image `order[k]` of the split through `transform`, run under `seeds[k]`.

    Paths are kept in one numpy bytes array, not a tuple of str: DataLoader workers forked from the main process
    would otherwise touch every string's refcount and copy the whole list into each worker (pytorch#13246)."""

    def __init__(self, split: FileSplit, transform: Callable) -> None:
        self.root = str(split.root)
        self.paths = np.array([p.encode() for p in split.paths], dtype=np.bytes_)
        self.labels = split.labels
        self.transform = transform
        self.order: np.ndarray = np.arange(len(self.paths))
        self.seeds: np.ndarray | None = None

    def for_epoch(self, order: np.ndarray, seeds: np.ndarray | None) -> FileDataset:
        epoch = object.__new__(FileDataset)
        epoch.__dict__.update(self.__dict__, order=order, seeds=seeds)
        return epoch

    def __len__(self) -> int:
        return len(self.order)

    def path(self, index: int) -> str:
        return os.path.join(self.root, self.paths[index].decode())

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        index = int(self.order[k])
        image = load_rgb(self.path(index))
        seed = None if self.seeds is None else int(self.seeds[k])
        return seeded(self.transform, image, seed), int(self.labels[index])


def seeded(transform: Callable, image: Image.Image, seed: int | None) -> Any:
    """`transform(image)` with torch's CPU default generator seeded to `seed` for this call only (None: as it is)."""
    if seed is None:
        return transform(image)
    # torchvision's random transforms draw from the CPU default generator; seed it for this sample only and
    # put the caller's state back (with num_workers=0 that is the trainer's own stream).
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        return transform(image)
    finally:
        generator.set_state(state)


class FileViewsDataset(Dataset):
    """Item k of a multi-view epoch: for every view v, image `orders[v, k]` of `base` through `transforms[v]` under
    `seeds[v, k]`, with its label. A file is decoded once per item however many views show it (views with draw
    None): the transforms return new images and leave their input alone."""

    def __init__(self, base: FileDataset, orders: np.ndarray, seeds: np.ndarray, transforms: list[Callable]) -> None:
        self.base, self.orders, self.seeds, self.transforms = base, orders, seeds, transforms

    def __len__(self) -> int:
        return self.orders.shape[1]

    def __getitem__(self, k: int) -> list[tuple[torch.Tensor, int]]:
        decoded: dict[int, Image.Image] = {}
        items = []
        for order, seeds, transform in zip(self.orders, self.seeds, self.transforms):
            index = int(order[k])
            if index not in decoded:
                decoded[index] = load_rgb(self.base.path(index))
            items.append((seeded(transform, decoded[index], int(seeds[k])), int(self.base.labels[index])))
        return items


def _first_view(labels: torch.Tensor, generator: torch.Generator, draw: Draw | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(len(labels), generator=generator) if draw is None else draw(labels, generator)
    return order, torch.randint(0, 2**62, (len(order),), generator=generator, dtype=torch.int64)


def epoch_plan(labels: torch.Tensor, seed: int, draw: Draw | None) -> tuple[np.ndarray, np.ndarray]:
    """The epoch's image order (every image once, or the stage sampler's draw) and one seed per position."""
    order, seeds = _first_view(labels, torch.Generator().manual_seed(seed), draw)
    return order.cpu().numpy(), seeds.numpy()


def views_plan(labels: torch.Tensor, seed: int, draw: Draw | None, draws: Sequence[Draw | None]
               ) -> tuple[np.ndarray, np.ndarray]:
    """(1 + len(draws), N) image orders and per-sample seeds of a multi-view epoch: row 0 is exactly `epoch_plan`'s
    (drawn first from the same generator), then the extra views' orders (`view_orders`: view 0's again for a None
    draw), then their seeds, all from the one epoch generator, so the plan depends on the seed alone."""
    generator = torch.Generator().manual_seed(seed)
    first, first_seeds = _first_view(labels, generator, draw)
    orders = view_orders(first, draws, labels, generator)
    if any(len(order) != len(first) for order in orders):
        raise HarnessError(f"a view's draw gave {[len(o) for o in orders]} images; every view of an epoch must have "
                           f"as many as view 0 ({len(first)})")
    extra = torch.randint(0, 2**62, (len(draws), len(first)), generator=generator, dtype=torch.int64)
    seeds = torch.cat([first_seeds[None], extra])
    return torch.stack([order.cpu() for order in orders]).numpy(), seeds.numpy()


class FileFeeder:
    """`transform`: the dataset's per-image training transform (PIL image of any size -> normalised crop).
    `pipelines`: name -> per-file transform (`Augmentations.per_file` at the run's mean, std and crop), for views
    with their own augmentation (`ViewFeed.augment`); `augment` names `transform`, so that a view naming the run's
    own augmentation reuses it."""

    def __init__(self, split: FileSplit, transform: Callable, batch_size: int, device: torch.device,
                 num_workers: int = 0, pipelines: Callable[[str], Callable] | None = None,
                 augment: str | None = None) -> None:
        self.dataset = FileDataset(split, transform)
        self.batch_size, self.device = batch_size, device
        self.num_workers = worker_count(num_workers, device)
        self.pipelines = ViewPipelines(transform, augment, pipelines)

    def prepare_views(self, augments: Iterable[str | None]) -> None:
        """Check (and build once) the views' augmentation pipelines before training (`ViewPipelines.prepare`)."""
        self.pipelines.prepare(augments)

    def __len__(self) -> int:
        return -(-len(self.dataset.labels) // self.batch_size)

    def epoch(self, seed: int, draw: Draw | None = None, views: ViewDraws = ()) -> Iterator[Batch]:
        """`draw`: a stage sampler's (labels, generator) -> indices; None shuffles every image once.
        `views`: extra views per batch (`harness.feeders.ViewDraws`), stacked view-major."""
        if views:
            yield from self._views(seed, draw, views)
            return
        order, seeds = epoch_plan(self.dataset.labels, seed, draw)
        for images, labels in self._loader(self.dataset.for_epoch(order, seeds)):
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def _views(self, seed: int, draw: Draw | None, views: ViewDraws) -> Iterator[Batch]:
        feeds = view_feeds(views)
        transforms_ = [self.dataset.transform, *(self.pipelines.get(feed.augment) for feed in feeds)]
        orders, seeds = views_plan(self.dataset.labels, seed, draw, [feed.draw for feed in feeds])
        for per_view in self._loader(FileViewsDataset(self.dataset, orders, seeds, transforms_)):
            # per_view: [(images, labels) of view 0, of view 1, ...]
            images = torch.cat([v[0] for v in per_view]).to(self.device, non_blocking=True)
            yield images, torch.cat([v[1] for v in per_view]).to(self.device, non_blocking=True)

    def _loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, drop_last=False,
                          num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
                          prefetch_factor=4 if self.num_workers else None, persistent_workers=False)


def eval_transform(mean, std, crop: int = DEFAULT_CROP) -> transforms.Compose:
    """Resize the shorter side to crop * 256/224 (256 at 224), centre-crop `crop`, ToTensor, Normalize."""
    return transforms.Compose([transforms.Resize(round(crop * 256 / 224)), transforms.CenterCrop(crop),
                               transforms.ToTensor(), transforms.Normalize(mean, std)])


def file_eval_batches(split: FileSplit, mean, std, device: torch.device, batch_size: int) -> Iterator[torch.Tensor]:
    """Normalised test-transform batches of `split` in list order, on `device`. No randomness: any number of
    workers gives the same batches."""
    dataset = FileDataset(split, eval_transform(mean, std, split.crop))
    workers = worker_count(0, device) if len(dataset) >= 4 * EVAL_BATCH else 0  # tiny splits: no worker start-up
    loader = DataLoader(dataset, batch_size=min(batch_size, EVAL_BATCH), shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    for images, _ in loader:
        yield images.to(device, non_blocking=True)


def make_file_feeder(split: FileSplit, augmentations: Augmentations, augment: str, mean, std, batch_size: int,
                     device: torch.device, fast_path: str, num_workers: int = 0, loader: str = "auto") -> Any:
    """The training feeder of a file-backed split: DALI or torchvision per `loader` (see the module docstring)."""
    if augmentations.per_file is None:
        raise HarnessError("this dataset gives file-backed splits but declares no per-file augmentation")
    if fast_path == "on":
        raise HarnessError("train.fast_path=on needs an in-memory dataset; file-backed datasets choose their "
                           "pipeline with data.loader (auto, torchvision, dali)")
    FileLoading(loader)  # an unknown name fails here
    from harness import dali_feeder  # light: imports DALI only when asked whether it is there

    if dali_feeder.use_dali(loader, device, augment, augmentations.gpu_decodable):
        return dali_feeder.DaliFeeder(split, augment, mean, std, batch_size, device)
    transform = augmentations.per_file(augment, mean, std, split.crop)
    per_file = augmentations.per_file
    return FileFeeder(split, transform, batch_size, device, num_workers,
                      pipelines=lambda name: per_file(name, mean, std, split.crop), augment=augment)


def training_loader(loader: str, train: Any, stages: Sequence[Any]) -> str:
    """`data.loader` for a run whose training split is `train` and whose method has `stages`: DALI's pipeline feeds
    one view per batch, so for a file-backed split and a stage with views (BBN, PaCo, BCL, NCL contrastive) `auto`
    becomes `torchvision` and an explicit `dali` is refused in one line, before any training; otherwise `loader`.

    Decided here, where the run builds its feeder (`harness.runner`), because the feeder is built after the method:
    the stages are known, and a DaliFeeder is never built for a run it could not feed."""
    if not isinstance(train, FileSplit) or not any(stage.views for stage in stages):
        return loader
    if loader == "dali":
        from harness.dali_feeder import DALI_VIEWS

        raise HarnessError(DALI_VIEWS)
    return "torchvision"
