"""What `harness bench` runs: a `BenchPlan` (full or `quick()`), turned into one JSON-serialisable report.

Ratios are computed inside one process on interleaved repeats (performance-anchors.md section 7 items 4 and 6);
CPU ratios are a weak regression signal and never predict GPU speed-ups. Paths compared: `reference` =
ReferenceFeeder (per-image PIL DataLoader), eager, fp32, contiguous; `fast` = DeviceFeeder (uint8 set on the
device, batched augmentation), bf16 autocast (CUDA only), channels_last, optionally torch.compile. Peak memory: CUDA
`max_memory_allocated` over the pass (exact); on CPU the `ru_maxrss` growth of a fresh child process.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from harness.studies.bench.augment import bench_augmentation
from harness.studies.bench.build import FAST, REFERENCE, compiled, synthetic_lt
from harness.studies.bench.epoch import bench_epoch
from harness.studies.bench.step import bench_step

PARTS = ("augment", "step", "epoch")


@dataclass(frozen=True)
class BenchPlan:
    """What `harness bench` runs; `quick()` is the CI-sized version (seconds)."""

    what: tuple[str, ...] = PARTS
    variants: tuple[str, ...] = ("plain", "shike")
    compile: str = "off"
    batch_size: int = 128
    experts: int = 3
    num_classes: int = 100
    aug_images: int = 2048
    aug_repeats: int = 3
    step_repeats: int = 5
    epoch_repeats: int = 2
    epoch_n_max: int = 20
    memory: bool = True
    threads: int = 0  # torch intra-op threads for the step and epoch benchmarks; 0 keeps torch's setting
    is_quick: bool = False

    def quick(self) -> BenchPlan:
        return replace(self, batch_size=8, experts=2, num_classes=10, aug_images=64, aug_repeats=1, step_repeats=2,
                       epoch_repeats=1, epoch_n_max=8, memory=False, is_quick=True)


def run_bench(plan: BenchPlan, device: torch.device) -> dict[str, Any]:
    """Every requested benchmark of `plan`, as one JSON-serialisable dict; torch's thread count is restored."""
    previous_threads = torch.get_num_threads()
    if plan.threads > 0:
        torch.set_num_threads(plan.threads)
    try:
        return _run_bench(plan, device)
    finally:
        torch.set_num_threads(previous_threads)


def _run_bench(plan: BenchPlan, device: torch.device) -> dict[str, Any]:
    modes = (REFERENCE, FAST) + ((compiled(plan.compile),) if plan.compile != "off" else ())
    quick = plan.is_quick
    report: dict[str, Any] = {"torch": torch.__version__, "device": device.type, "threads": torch.get_num_threads(),
                              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if "augment" in plan.what:  # one thread on both sides: the per-CPU-thread ratio of section 7 item 4
        report["augment"] = bench_augmentation(n_images=plan.aug_images, repeats=plan.aug_repeats, threads=1,
                                               batch_size=min(1024, plan.aug_images))
    if "step" in plan.what:
        report["step"] = bench_step(plan.variants, modes, plan.batch_size, warmup=1 if quick else 2,
                                    steps=1 if quick else 2, repeats=plan.step_repeats, num_classes=plan.num_classes,
                                    experts=plan.experts, device=device, memory=plan.memory)
    if "epoch" in plan.what:
        data = synthetic_lt(plan.num_classes, n_max=plan.epoch_n_max, imbalance_factor=10.0 if quick else 100.0,
                            test_per_class=2)
        report["epoch"] = bench_epoch(plan.variants, modes, data, plan.batch_size, plan.epoch_repeats,
                                      plan.experts, device)
    return report
