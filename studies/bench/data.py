"""`harness bench data`: images/s of each input path of the file-backed datasets, side by side in one process.

Paths, all on the same generated tree (`datasets.fake_large`, realistic JPEG sizes by default) and the same
per-image transform (the dataset's `data.augment` recipe at `crop`):

* `baseline`: an ImageFolder-style Dataset (PIL open + convert + the transform) in a shuffling DataLoader, what
  every LT codebase runs;
* `file-feeder`: `harness.file_feeder.FileFeeder` (per-sample seeding, numpy path table), the harness's path;
* `dali`: `harness.dali_feeder.DaliFeeder` (nvJPEG + fused crop on the GPU; augment `basic` only), where NVIDIA DALI
  and CUDA exist.

The loader alone is timed (large-scale-lt.md section 4, number (i)): whole epochs, batches moved to the device, no
model. Repeats are interleaved and the medians compared; `ratio` is images/s over the baseline's.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from harness.data import FileSplit
from harness.datasets.fake_large import long_tail_profile, write_fake_large_lt
from harness.file_feeder import FileFeeder, load_rgb
from harness.registry import DATASETS

LOADERS = ("baseline", "file-feeder", "dali")


@dataclass(frozen=True)
class DataBenchPlan:
    dataset: str = "imagenetlt"
    augment: str = "randaugment"
    images: int = 512  # training images of the generated tree
    image_size: tuple[int, int] = (500, 375)  # source JPEGs: ImageNet's typical size
    crop: int = 224
    batch_size: int = 64
    workers: int = 2
    repeats: int = 3
    loaders: tuple[str, ...] = LOADERS

    def quick(self) -> DataBenchPlan:
        return replace(self, images=48, image_size=(64, 48), crop=32, batch_size=16, workers=0, repeats=1)


class PlainFiles(Dataset):
    """The ImageFolder-style baseline: a list of (path, label) pairs, PIL open + the transform per item."""

    def __init__(self, split: FileSplit, transform: Callable) -> None:
        self.items = [(str(split.root / p), int(y)) for p, y in zip(split.paths, split.labels.tolist())]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        return self.transform(load_rgb(path)), label


def _baseline(split: FileSplit, transform: Callable, plan: DataBenchPlan, device: torch.device
              ) -> Callable[[int], Iterator]:
    def epoch(seed: int) -> Iterator:
        loader = DataLoader(PlainFiles(split, transform), batch_size=plan.batch_size, shuffle=True,
                            num_workers=plan.workers, generator=torch.Generator().manual_seed(seed),
                            pin_memory=device.type == "cuda")
        for images, labels in loader:
            yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)

    return epoch


def _epoch_functions(split: FileSplit, plan: DataBenchPlan, device: torch.device) -> dict[str, Callable]:
    spec = DATASETS.get(plan.dataset)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    transform = spec.augmentations.per_file(plan.augment, mean, std, plan.crop)
    functions: dict[str, Callable] = {}
    if "baseline" in plan.loaders:
        functions["baseline"] = _baseline(split, transform, plan, device)
    if "file-feeder" in plan.loaders:
        functions["file-feeder"] = FileFeeder(split, transform, plan.batch_size, device, plan.workers).epoch
    if "dali" in plan.loaders:
        from harness import dali_feeder

        if dali_feeder.dali_installed() and device.type == "cuda":
            feeder = dali_feeder.DaliFeeder(split, "basic", mean, std, plan.batch_size, device)
            functions["dali"] = feeder.epoch
    return functions


def _timed_epoch(epoch: Callable[[int], Iterator], seed: int, device: torch.device) -> float:
    start = time.perf_counter()
    for _batch in epoch(seed):
        pass
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench_data(plan: DataBenchPlan, device: torch.device, root: Path | None = None) -> dict[str, Any]:
    """Median images/s of each available loader over interleaved repeats (after one warm-up epoch each), and the
    ratio to the baseline. Writes the tree into `root` (default: a temporary folder, removed afterwards)."""
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(root or tmp) / plan.dataset
        write_fake_large_lt(where, plan.dataset, train_counts=_counts(plan.images), val_per_class=1, test_per_class=1,
                            image_size=plan.image_size)
        data = DATASETS.get(plan.dataset).build(imbalance_factor=None, data_root=str(where))
        split = replace(data.train, crop=plan.crop)
        functions = _epoch_functions(split, plan, device)
        rates: dict[str, list[float]] = {name: [] for name in functions}
        for epoch in functions.values():
            _timed_epoch(epoch, 0, device)  # warm-up: page cache, worker start-up paths, lazy imports
        for repeat in range(plan.repeats):
            for name, epoch in functions.items():
                rates[name].append(len(split) / _timed_epoch(epoch, repeat + 1, device))
    medians = {name: statistics.median(values) for name, values in rates.items()}
    base = medians.get("baseline")
    rows = {name: {"img_s": round(rate, 1), "ratio": round(rate / base, 3) if base else None}
            for name, rate in medians.items()}
    skipped = [name for name in plan.loaders if name not in rows]
    return {"dataset": plan.dataset, "augment": plan.augment, "images": len(split), "crop": plan.crop,
            "source_size": list(plan.image_size), "batch_size": plan.batch_size, "workers": plan.workers,
            "repeats": plan.repeats, "device": device.type, "torch": torch.__version__, "loaders": rows,
            "skipped": {name: "needs NVIDIA DALI and CUDA" for name in skipped}}


def _counts(images: int, classes: int = 10) -> list[int]:
    """A long-tailed profile (IF 10) over `classes` classes summing to exactly `images` (>= classes)."""
    profile = long_tail_profile(classes, 100, 10)
    scaled = [max(1, round(n * images / sum(profile))) for n in profile]
    scaled[0] += images - sum(scaled)
    return scaled


def data_table(report: dict[str, Any]) -> Any:
    from rich.table import Table

    title = (f"Input pipeline, {report['dataset']} tree: {report['images']} JPEGs "
             f"{report['source_size'][0]}x{report['source_size'][1]}, augment {report['augment']} at "
             f"{report['crop']}px, batch {report['batch_size']}, {report['workers']} workers, {report['device']} "
             f"(median of {report['repeats']})")
    table = Table(title=title)
    for column in ("loader", "images/s", "ratio to baseline"):
        table.add_column(column, justify="left" if column == "loader" else "right")
    for name, row in report["loaders"].items():
        table.add_row(name, f"{row['img_s']:,.0f}", "-" if row["ratio"] is None else f"{row['ratio']:.2f}")
    for name, why in report["skipped"].items():
        table.add_row(name, "skipped", why)
    return table
