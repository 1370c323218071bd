"""Benchmarks of the two CIFAR augmentation pipelines (run with `pytest tests/bench --benchmark-enable`).

Under the project's default `--benchmark-disable` each benchmark body runs once as a plain test, so the sizes stay
small. Throughput comparisons for reports come from `harness.studies.bench.augment.bench_augmentation` (same
process, same threads, interleaved medians); these give pytest-benchmark's per-call statistics.
"""

from __future__ import annotations

import json

import torch

from harness.datasets.augment import synthetic_cifar_images
from harness.datasets.cifar_lt import CIFAR_MEAN, CIFAR_STD
from harness.feeders import AugmentedDataset
from harness.registry import DATASETS
from harness.studies.bench.augment import AUGMENT, bench_augmentation
from harness.studies.bench.build import BENCH_DATASET, augmentations

PER_IMAGE_N = 128
BATCHED_N = 1024


def test_bench_per_image_reference(benchmark):
    images = synthetic_cifar_images(PER_IMAGE_N, seed=0)
    transform = augmentations().per_image(AUGMENT, CIFAR_MEAN, CIFAR_STD)
    dataset = AugmentedDataset(images, torch.zeros(PER_IMAGE_N), transform)
    benchmark.extra_info.update(images=PER_IMAGE_N, threads=torch.get_num_threads())
    out = benchmark(lambda: [dataset[i][0] for i in range(PER_IMAGE_N)])
    assert len(out) == PER_IMAGE_N and out[0].shape == (3, 32, 32)


def test_bench_batched(benchmark):
    images = synthetic_cifar_images(BATCHED_N, seed=0)
    aug, generator = augmentations().batched(AUGMENT, CIFAR_MEAN, CIFAR_STD), torch.Generator().manual_seed(0)
    benchmark.extra_info.update(images=BATCHED_N, threads=torch.get_num_threads())
    out = benchmark(aug, images, generator)
    assert out.shape == images.shape and out.dtype == torch.float32


def test_benchmarked_pipelines_are_the_datasets_own():
    """The benchmark times what CIFAR-100-LT trains with, not a private copy of its pipelines."""
    assert augmentations() is DATASETS.get(BENCH_DATASET).augmentations


def test_bench_augmentation_report_is_json():
    """The entry point runs end to end on a tiny size, reports what `harness bench` prints, restores threads."""
    threads_before = torch.get_num_threads()
    report = bench_augmentation(n_images=32, repeats=1, threads=1, batch_size=16)
    assert json.loads(json.dumps(report)) == report
    assert {"per_image_img_s", "batched_img_s", "ratio", "threads", "n_images", "torch"} <= set(report)
    assert report["per_image_img_s"] > 0 and report["batched_img_s"] > 0 and report["threads"] == 1
    assert abs(report["ratio"] - report["batched_img_s"] / report["per_image_img_s"]) < 0.011
    assert torch.get_num_threads() == threads_before
