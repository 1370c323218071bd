"""Epoch benchmark: seconds per training epoch (through `Trainer.run_epoch`), the share spent producing batches, and
optionally the per-epoch test evaluation, per variant and mode, interleaved in one process."""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from harness.data import LTData, Split
from harness.evaluate import Evaluator
from harness.feeders import DeviceFeeder
from harness.studies.bench.build import FAST, REFERENCE, Mode, build_trainer, synthetic_lt
from harness.studies.bench.timing import sync, timed
from harness.trainer import StageRun, Trainer, enter_stage


class TimedFeeder:
    """Wraps a feeder and adds up the time spent producing batches (the augmentation share of an epoch).

    DeviceFeeder augments the whole epoch at the first batch, so only that call is timed, between two device
    syncs (one extra sync per epoch). ReferenceFeeder batches are timed as host wall time in the DataLoader."""

    def __init__(self, inner: Any, device: torch.device) -> None:
        self.inner, self.device, self.data_s = inner, device, 0.0
        self.at_once = isinstance(inner, DeviceFeeder)

    def __len__(self) -> int:
        return len(self.inner)

    def epoch(self, seed: int, draw: Any = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = iter(self.inner.epoch(seed, draw))
        for index in itertools.count():
            timing = index == 0 or not self.at_once
            if timing and self.at_once:
                sync(self.device)
            start = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            if timing:
                if self.at_once:
                    sync(self.device)
                self.data_s += time.perf_counter() - start
            yield batch


@dataclass(frozen=True)
class TestEvaluation:
    """The runner's per-epoch test evaluation: `Evaluator.quick` on the test split, which lives on the device for
    the whole run on CUDA (as `Run.prepare` places it), with bf16 autocast where the mode has it."""

    evaluator: Evaluator
    split: Split

    @classmethod
    def of(cls, data: LTData, device: torch.device, amp: bool) -> TestEvaluation:
        on_device = device.type == "cuda"
        split = Split(data.test.images.to(device), data.test.labels.to(device)) if on_device else data.test
        return cls(Evaluator(data.class_counts, data.mean, data.std, device, autocast=amp and on_device), split)

    def __call__(self, trainer: Trainer) -> None:
        self.evaluator.quick(trainer.spec.model, self.split)


def timed_epoch(trainer: Trainer, run: StageRun, optimizer: torch.optim.Optimizer, epoch: int,
                evaluation: TestEvaluation | None, device: torch.device) -> dict[str, float]:
    """One training epoch through `Trainer.run_epoch` (plus the test evaluation if given): seconds of the epoch, of
    its batch production and of the evaluation."""
    feeder = TimedFeeder(trainer.feeder, device)
    trainer.feeder = feeder
    try:
        train_s = timed(lambda: trainer.run_epoch(run, optimizer, epoch), device)
    finally:
        trainer.feeder = feeder.inner
    eval_s = timed(lambda: evaluation(trainer), device) if evaluation else 0.0
    return {"train_s": train_s, "data_s": feeder.data_s, "eval_s": eval_s, "epoch_s": train_s + eval_s}


def bench_epoch(variants: tuple[str, ...] = ("plain", "shike"), modes: tuple[Mode, ...] = (REFERENCE, FAST),
                data: LTData | None = None, batch_size: int = 128, repeats: int = 2, experts: int = 3,
                device: torch.device | None = None, evaluate: bool = False, num_workers: int = 0) -> dict[str, Any]:
    """Seconds per training epoch (and its batch-production share) per variant and mode on a small synthetic LT
    set: one warm-up epoch each, then `repeats` interleaved epochs; medians, and each mode's speed-up over the
    first mode."""
    device = device or torch.device("cpu")
    data = data or synthetic_lt(num_classes=100, n_max=20, imbalance_factor=100.0, test_per_class=2)
    out: dict[str, Any] = {}
    for variant in variants:
        trainers = {m.name: build_trainer(variant, m, data, device, batch_size, experts=experts,
                                          num_workers=num_workers) for m in modes}
        evaluations = {m.name: TestEvaluation.of(data, device, m.amp) if evaluate else None for m in modes}
        optimizers = {name: enter_stage(t.spec, t.stages[0].stage, t.cfg) for name, t in trainers.items()}
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in trainers}
        for epoch in range(repeats + 1):
            for name, trainer in trainers.items():
                result = timed_epoch(trainer, trainer.stages[0], optimizers[name], epoch, evaluations[name], device)
                if epoch > 0:  # epoch 0 warms up (allocator, cudnn autotuning, compilation)
                    runs[name].append(result)
        rows = {name: {key: statistics.median(r[key] for r in results) for key in results[0]}
                for name, results in runs.items()}
        base = rows[modes[0].name]["epoch_s"]
        for row in rows.values():
            row["data_share"] = row["data_s"] / row["epoch_s"]
            row["speedup"] = base / row["epoch_s"]
        out[variant] = rows
    return {"train_images": len(data.train), "batch_size": batch_size, "device": device.type, "repeats": repeats,
            "threads": torch.get_num_threads(), "evaluate": evaluate, "variants": out}
