"""Training-step benchmark: ms per step (forward, loss terms, backward, SGD) of each variant under each mode, on one
fixed batch, with the modes interleaved in the same process (performance-anchors.md section 7 items 4 and 6)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

from harness.studies.bench.build import FAST, REFERENCE, Mode, build_trainer, synthetic_lt
from harness.studies.bench.memory import cpu_step_peak_bytes
from harness.studies.bench.timing import sync, timed
from harness.trainer import Trainer, enter_stage, set_train_mode


class StepCase:
    """A trainer in its first stage with its optimizer and one fixed batch: `case(n)` runs n training steps."""

    def __init__(self, trainer: Trainer, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.trainer, self.images, self.labels = trainer, images, labels
        run = trainer.stages[0]
        self.optimizer = enter_stage(trainer.spec, run.stage, trainer.cfg)
        set_train_mode(trainer.spec.model, run.stage.freeze_bn)
        self.sums = torch.zeros(len(run.stage.losses) + 1, device=trainer.device)

    def __call__(self, steps: int = 1) -> None:
        for _ in range(steps):
            self.trainer.step(0, self.optimizer, self.images, self.labels, self.sums)


def random_batch(batch_size: int, num_classes: int, device: torch.device,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised-looking float images (N, 3, 32, 32) and labels: what a feeder hands the trainer."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, 32, 32, generator=g)
    labels = torch.randint(0, num_classes, (batch_size,), generator=g)
    return images.to(device), labels.to(device)


def cuda_peak_bytes(fn: Callable[[], Any], device: torch.device) -> dict[str, int]:
    """`max_memory_allocated` during fn(), absolute and above what was allocated before it."""
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_bytes": peak, "peak_over_start_bytes": peak - before}


def memory_measure(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated over the pass (absolute, and above the allocation before it)"
    return "CPU: ru_maxrss of a fresh child process after 2 steps, minus its resident size before them"


def _interleaved_ms(cases: dict[str, StepCase], device: torch.device, warmup: int, steps: int,
                    repeats: int) -> dict[str, dict[str, float]]:
    """First step (compilation, if any) timed apart, then `repeats` rounds of `steps` steps, one mode after the
    other in each round, after `warmup` steps: median and minimum ms per step."""
    first_s = {name: timed(case, device) for name, case in cases.items()}
    for case in cases.values():
        case(warmup)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, case in cases.items():
            times[name].append(1e3 * timed(lambda c=case: c(steps), device) / steps)
    return {name: {"median_ms": statistics.median(t), "min_ms": min(t), "first_step_s": first_s[name]}
            for name, t in times.items()}


def bench_step(variants: tuple[str, ...] = ("plain", "shike"), modes: tuple[Mode, ...] = (REFERENCE, FAST),
               batch_size: int = 128, warmup: int = 2, steps: int = 2, repeats: int = 5, num_classes: int = 100,
               experts: int = 3, device: torch.device | None = None, memory: bool = True) -> dict[str, Any]:
    """ms per training step of each variant under each mode, their peak memory (if `memory`), and the speed-up of
    each mode's median over the first mode's."""
    device = device or torch.device("cpu")
    data = synthetic_lt(num_classes, n_max=2, imbalance_factor=1.0, test_per_class=1)  # class counts only
    out: dict[str, Any] = {}
    for variant in variants:
        images, labels = random_batch(batch_size, num_classes, device)
        cases = {m.name: StepCase(build_trainer(variant, m, data, device, batch_size, experts=experts,
                                                with_feeder=False), images, labels) for m in modes}
        rows = _interleaved_ms(cases, device, warmup, steps, repeats)
        if memory:
            for mode in modes:
                rows[mode.name].update(cuda_peak_bytes(cases[mode.name], device) if device.type == "cuda" else
                                       cpu_step_peak_bytes(variant, mode, batch_size, num_classes, experts))
        base = rows[modes[0].name]["median_ms"]
        for row in rows.values():
            row["speedup"] = base / row["median_ms"]
        out[variant] = rows
    return {"batch_size": batch_size, "threads": torch.get_num_threads(), "device": device.type, "steps": steps,
            "warmup": warmup, "repeats": repeats, "variants": out, "memory_measure": memory_measure(device)}
