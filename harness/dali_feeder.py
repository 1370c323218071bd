"""Optional GPU decoding with NVIDIA DALI (`pip install -e '.[dali]'`): the only module that imports `nvidia.dali`.

DALI's mixed decoder fuses nvJPEG decoding with RandomResizedCrop (only the crop is decoded), then flips and
normalises on the GPU (large-scale-lt.md section 4, option 3). Image bytes come from an external source fed in the
epoch's order, so stage samplers (`draw`) work as on the torchvision path; the pipeline is rebuilt every epoch with
a seed derived from the epoch seed, so an epoch replays on resume. Its random streams are DALI's own: the same seed
gives different crops than the torchvision path (both sample RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3) + flip).

Only augmentations DALI reproduces exactly are offered (`basic`: crop + flip); NCL's RandAugment has no DALI
equivalent (DALI's `auto_aug.rand_augment` is the paper's version, large-scale-lt.md section 2.2), so
`data.loader=auto` falls back to torchvision for it and `data.loader=dali` refuses it.

One view per batch: multi-view stages (BBN's reversed view, PaCo's and BCL's "sim" views) are fed by the torchvision
path (`harness.file_feeder.FileFeeder`). `harness.file_feeder.training_loader` makes `data.loader=auto` pick it for
such runs and refuses `data.loader=dali` for them before training (`DALI_VIEWS`); the feeder itself refuses views
with the same line, should anyone hand it some.

Not exercised by the test suite (it needs CUDA and DALI); `harness bench data` times it where both exist.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from harness.data import FileSplit
from harness.errors import HarnessError
from harness.samplers import Draw

DALI_THREADS = 4  # CPU threads of the pipeline (file reads and the host part of decoding)
DALI_VIEWS = ("data.loader=dali feeds one view per batch; this method's stages have extra views (bbn, paco, bcl, ncl "
              "contrastive): use data.loader=torchvision (data.loader=auto picks it for them)")


def dali_installed() -> bool:
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def use_dali(loader: str, device: torch.device, augment: str, gpu_decodable: tuple[str, ...]) -> bool:
    """Whether `data.loader` selects DALI here; `dali` without DALI, CUDA or a reproducible augmentation refuses."""
    if loader == "torchvision":
        return False
    ready = dali_installed() and device.type == "cuda" and augment in gpu_decodable
    if loader == "auto" or ready:
        return ready
    if not dali_installed():
        raise HarnessError("data.loader=dali but NVIDIA DALI is not installed: pip install -e '.[dali]' (CUDA 13 "
                           "wheels), or use data.loader=torchvision")
    if device.type != "cuda":
        raise HarnessError("data.loader=dali decodes on the GPU and needs train.device=cuda; use data.loader="
                           "torchvision on the CPU")
    raise HarnessError(f"data.loader=dali reproduces only data.augment={', '.join(gpu_decodable) or '(none)'}; "
                       f"'{augment}' needs data.loader=torchvision")


class EpochSource:
    """External source of one epoch: batches of (encoded file bytes, labels) in the epoch's order."""

    def __init__(self, split: FileSplit, order: np.ndarray, batch_size: int) -> None:
        self.root, self.paths, self.labels = str(split.root), split.paths, split.labels.numpy()
        self.order, self.batch_size, self.start = order, batch_size, 0

    def __iter__(self) -> EpochSource:
        return self

    def __next__(self) -> tuple[list[np.ndarray], np.ndarray]:
        if self.start >= len(self.order):
            raise StopIteration
        chunk = self.order[self.start:self.start + self.batch_size]
        self.start += len(chunk)
        encoded = [np.fromfile(os.path.join(self.root, self.paths[i]), dtype=np.uint8) for i in chunk]
        return encoded, self.labels[chunk].astype(np.int64)


def _pipeline(source: EpochSource, batch_size: int, crop: int, mean, std, seed: int, device_id: int) -> Any:
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=DALI_THREADS, device_id=device_id, seed=seed)
    def train_pipe():
        encoded, labels = fn.external_source(source=source, num_outputs=2, batch=True,
                                             dtype=[types.UINT8, types.INT64])
        images = fn.decoders.image_random_crop(encoded, device="mixed", output_type=types.RGB,
                                               random_area=[0.08, 1.0], random_aspect_ratio=[3 / 4, 4 / 3])
        images = fn.resize(images, resize_x=crop, resize_y=crop)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                          mean=[255 * m for m in mean], std=[255 * s for s in std],
                                          mirror=fn.random.coin_flip(probability=0.5))
        return images, labels.gpu()

    return train_pipe()


class DaliFeeder:
    """The feeder interface over a DALI pipeline (augment `basic`: RandomResizedCrop + flip + Normalize)."""

    def __init__(self, split: FileSplit, augment: str, mean, std, batch_size: int, device: torch.device) -> None:
        self.split, self.mean, self.std = split, mean, std
        self.batch_size, self.device = batch_size, device

    def __len__(self) -> int:
        return -(-len(self.split) // self.batch_size)

    def prepare_views(self, augments: Iterable[str | None]) -> None:
        """Views of any kind are refused before training (`DALI_VIEWS`)."""
        if list(augments):
            raise HarnessError(DALI_VIEWS)

    def epoch(self, seed: int, draw: Draw | None = None, views: Sequence[Any] = ()) -> Iterator[tuple]:
        if views:  # before DALI's import: the line says what to do wherever this runs
            raise HarnessError(DALI_VIEWS)
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        from harness.file_feeder import epoch_plan

        order, _ = epoch_plan(self.split.labels, seed, draw)
        source = EpochSource(self.split, order, self.batch_size)
        device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        pipe = _pipeline(source, self.batch_size, self.split.crop, self.mean, self.std, seed % 2**31, device_id)
        pipe.build()
        # size=-1: read until the external source raises StopIteration (the last batch may be partial)
        for out in DALIGenericIterator([pipe], ["images", "labels"], size=-1):
            yield out[0]["images"], out[0]["labels"].view(-1)
