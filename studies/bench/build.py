"""What the benchmarks compare, on what data, and the one place they make a config and a Trainer.

`run_config` and `build_trainer` are the only functions here that touch the engine's config and Trainer APIs;
when those change, these two follow and every benchmark (step, epoch, gpu) follows with them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from harness.config import RunConfig, resolve_config, stage_overrides
from harness.data import Augmentations, LTData, Split, long_tail_counts
from harness.datasets.augment import synthetic_cifar_images
from harness.datasets.cifar_lt import CIFAR_MEAN, CIFAR_STD
from harness.errors import HarnessError
from harness.feeders import make_feeder
from harness.registry import DATASETS, METHODS
from harness.trainer import Trainer

# The synthetic images are CIFAR-shaped, so they go through CIFAR-100-LT's own augmentation pipelines.
BENCH_DATASET = "cifar100lt"

# The model variants timed: Table 4 rows map onto these (plain = row 1; moe = rows 2, 6; shike = the DKF rows).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "plain": ("plain", {}),
    "moe": ("shike", {"dkf": False, "l_mu": False, "l_nt": False}),
    "shike": ("shike", {}),
}


@dataclass(frozen=True)
class Mode:
    """One side of a comparison: which feeder and which trainer switches."""

    name: str
    feeder: str  # "reference" (DataLoader, per-image PIL) or "device" (DeviceFeeder)
    channels_last: bool
    amp: bool  # bf16 autocast; the trainer enables it on CUDA only
    compile: str = "off"  # off | default | reduce-overhead | max-autotune


REFERENCE = Mode("reference", "reference", channels_last=False, amp=False)
FAST = Mode("fast", "device", channels_last=True, amp=True)


def compiled(mode: str) -> Mode:
    """The fast path with `torch.compile(mode=...)` on the loss step."""
    return replace(FAST, name=f"fast+{mode}", compile=mode)


def mode_named(name: str) -> Mode:
    """`reference`, `fast` or `fast+<compile mode>` -> its Mode (the names the reports use)."""
    return {"reference": REFERENCE, "fast": FAST}.get(name) or compiled(name.split("+", 1)[1])


def augmentations() -> Augmentations:
    """The pipelines of BENCH_DATASET, as its registry entry declares them (both: the benchmarks compare them)."""
    found = DATASETS.get(BENCH_DATASET).augmentations
    if found is None or found.batched is None:
        raise HarnessError(f"dataset '{BENCH_DATASET}' declares no batched augmentation to compare with")
    return found


def synthetic_lt(num_classes: int = 100, n_max: int = 500, imbalance_factor: float = 100.0,
                 test_per_class: int = 100, seed: int = 0) -> LTData:
    """CIFAR-shaped synthetic long-tailed data, for timing only (defaults: the CIFAR-100-LT IF100 shape, 10,847
    training and 10,000 test images)."""
    counts = long_tail_counts(n_max, num_classes, imbalance_factor)
    train_labels = torch.repeat_interleave(torch.arange(num_classes), torch.tensor(counts))
    test_labels = torch.arange(num_classes).repeat_interleave(test_per_class)
    images = synthetic_cifar_images(len(train_labels) + len(test_labels), seed=seed)
    n = len(train_labels)
    return LTData("synthetic-lt", Split(images[:n], train_labels), Split(images[n:], test_labels), tuple(counts),
                  tuple(str(c) for c in range(num_classes)), CIFAR_MEAN, CIFAR_STD, {"synthetic": True})


def run_config(variant: str, mode: Mode, batch_size: int, seed: int = 0, experts: int = 3) -> RunConfig:
    """The resolved `shike-code` config of a variant under a mode; one epoch per stage (the benchmarks drive the
    epochs themselves, so only the stage list and the learning-rate schedule's length depend on it)."""
    method, switches = VARIANTS[variant]
    overrides: dict[str, Any] = {
        "train.stage_epochs": "1+1", "train.seed": seed, "optim.batch_size": batch_size,
        "train.channels_last": mode.channels_last, "train.amp": mode.amp, "train.compile": mode.compile,
        "train.fast_path": "on" if mode.feeder == "device" else "off",
    }
    if method == "shike":
        overrides["method.experts"] = experts
    return resolve_config(method, switches=switches, overrides=overrides)


def build_trainer(variant: str, mode: Mode, data: LTData, device: torch.device, batch_size: int, seed: int = 0,
                  num_workers: int = 0, experts: int = 3, with_feeder: bool = True) -> Trainer:
    """A Trainer (no hooks: nothing observes a benchmark) for one variant and mode; the same seed gives the same
    initial weights in every mode. `with_feeder=False`: step benchmarks feed a fixed batch themselves."""
    cfg = run_config(variant, mode, batch_size, seed, experts=experts)
    torch.manual_seed(seed)
    spec = METHODS.get(cfg.method)(num_classes=data.num_classes, class_counts=data.class_counts,
                                   **cfg.method_kwargs)
    spec.stages = stage_overrides(spec.stages, cfg.stage_args)
    feeder = None
    if with_feeder:
        feeder = make_feeder(data.train, augmentations(), cfg.data.augment, data.mean, data.std, batch_size, device,
                             cfg.train.fast_path, num_workers)
    return Trainer(spec, cfg, feeder, device)
