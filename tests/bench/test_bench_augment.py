"""Benchmarks of the two CIFAR augmentation pipelines (run with `pytest tests/bench --benchmark-enable`).

Under the project's default `--benchmark-disable` each benchmark body runs once as a plain test, so the sizes stay
small. Throughput comparisons for reports come from `harness.bench_augment.bench_augmentation` (same process, same
threads, interleaved medians); these give pytest-benchmark's per-call statistics.
"""

from __future__ import annotations

import json

import torch

from harness.datasets.augment import synthetic_cifar_images, train_transform
from harness.feeders import AugmentedDataset
from harness.datasets.batched_augment import BatchedAugment
from harness.bench_augment import CIFAR_MEAN, CIFAR_STD, bench_augmentation

PER_IMAGE_N = 128
BATCHED_N = 1024


def test_bench_per_image_reference(benchmark):
    images = synthetic_cifar_images(PER_IMAGE_N, seed=0)
    dataset = AugmentedDataset(images, torch.zeros(PER_IMAGE_N), train_transform(CIFAR_MEAN, CIFAR_STD))
    benchmark.extra_info.update(images=PER_IMAGE_N, threads=torch.get_num_threads())
    out = benchmark(lambda: [dataset[i][0] for i in range(PER_IMAGE_N)])
    assert len(out) == PER_IMAGE_N and out[0].shape == (3, 32, 32)


def test_bench_batched(benchmark):
    images = synthetic_cifar_images(BATCHED_N, seed=0)
    aug, generator = BatchedAugment(CIFAR_MEAN, CIFAR_STD), torch.Generator().manual_seed(0)
    benchmark.extra_info.update(images=BATCHED_N, threads=torch.get_num_threads())
    out = benchmark(aug, images, generator)
    assert out.shape == images.shape and out.dtype == torch.float32


def test_bench_augmentation_report_is_json():
    """The harness entry point runs end to end on a tiny size and reports what the lead's `harness bench` needs."""
    threads_before = torch.get_num_threads()
    report = bench_augmentation(n_images=32, repeats=1, threads=1, batch_size=16)
    assert json.loads(json.dumps(report)) == report
    assert {"per_image_img_s", "batched_img_s", "ratio", "threads", "n_images", "torch"} <= set(report)
    assert report["per_image_img_s"] > 0 and report["batched_img_s"] > 0 and report["threads"] == 1
    assert torch.get_num_threads() == threads_before
