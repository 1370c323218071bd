"""Augmentation throughput: the official per-image PIL pipeline vs the batched tensor pipeline, in one process.

performance-anchors.md section 7 item 4: run both on the same synthetic CIFAR-shaped data, on the same number of
threads, and report images/s and their ratio (target: batched >= 5x per-image per CPU thread). Interleaved repeats,
medians. The per-image side includes the uint8 -> PIL conversion, as torchvision's CIFAR dataset does it. Both
pipelines are the ones BENCH_DATASET declares (`Augmentations.per_image` / `.batched`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from harness.datasets.augment import synthetic_cifar_images
from harness.datasets.cifar_lt import CIFAR_MEAN, CIFAR_STD
from harness.feeders import AugmentedDataset
from harness.studies.bench.build import augmentations

AUGMENT = "autoaugment"  # the official CIFAR training stack (crop, flip, CIFAR10Policy, Cutout)


def _time_per_image(dataset: AugmentedDataset, n_images: int) -> float:
    start = time.perf_counter()
    for i in range(n_images):
        dataset[i]
    return time.perf_counter() - start


def _time_batched(batched: Callable, images: torch.Tensor, batch_size: int, generator: torch.Generator) -> float:
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        batched(images[i : i + batch_size], generator)
    return time.perf_counter() - start


def bench_augmentation(
    n_images: int = 2048, repeats: int = 3, threads: int = 1, seed: int = 0, batch_size: int = 1024
) -> dict[str, Any]:
    """Images/s of the per-image PIL reference (plain loop, one image at a time) and of the batched pipeline
    (batches of `batch_size`) on the same `n_images` synthetic uint8 32x32 images, with torch limited to `threads`
    threads. Returns a JSON-serialisable dict with the medians over `repeats` interleaved repeats and their ratio."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        per_image, batched = _interleaved_rates(n_images, repeats, seed, batch_size)
    finally:
        torch.set_num_threads(previous_threads)
    per_image_img_s, batched_img_s = statistics.median(per_image), statistics.median(batched)
    return {
        "per_image_img_s": round(per_image_img_s, 1),
        "batched_img_s": round(batched_img_s, 1),
        "ratio": round(batched_img_s / per_image_img_s, 2),
        "threads": threads,
        "n_images": n_images,
        "batch_size": batch_size,
        "repeats": repeats,
        "torch": torch.__version__,
    }


def _interleaved_rates(n_images: int, repeats: int, seed: int, batch_size: int) -> tuple[list[float], list[float]]:
    """images/s of each pipeline per repeat, alternating the two so that machine noise hits both alike."""
    pipelines = augmentations()
    images = synthetic_cifar_images(n_images, seed=seed)
    dataset = AugmentedDataset(images, torch.zeros(n_images, dtype=torch.long),
                               pipelines.per_image(AUGMENT, CIFAR_MEAN, CIFAR_STD))
    batched_fn = pipelines.batched(AUGMENT, CIFAR_MEAN, CIFAR_STD)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    _time_batched(batched_fn, images[:batch_size], batch_size, generator)  # warm-up (allocator, lru caches)
    _time_per_image(dataset, min(64, n_images))
    per_image, batched = [], []
    for _ in range(repeats):
        per_image.append(n_images / _time_per_image(dataset, n_images))
        batched.append(n_images / _time_batched(batched_fn, images, batch_size, generator))
    return per_image, batched
