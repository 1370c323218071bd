"""Training-step, epoch and peak-memory benchmarks: the reference path vs the fast path, side by side in one process.

performance-anchors.md section 7 items 4 and 6: medians of interleaved repeats after warm-up, reported as ratios in
the same process (CPU ratios are a weak regression signal and never predict GPU speed-ups). The augmentation
benchmark is `harness.bench_augment`; `scripts/gpu_check.py` reuses the builders below for the GPU timings.

Paths compared: `reference` = ReferenceFeeder (per-image PIL DataLoader), eager, fp32, contiguous; `fast` =
DeviceFeeder (uint8 set on the device, batched augmentation), bf16 autocast (CUDA only), channels_last, optionally
torch.compile. Peak memory: CUDA `max_memory_allocated` over the pass (exact); on CPU the `ru_maxrss` growth of a
fresh child process over its pre-step resident size (torch's CPU allocator has no peak counter).
"""

from __future__ import annotations

import itertools
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from harness.data import LTData, Split, long_tail_counts
from harness.datasets.augment import synthetic_cifar_images
from harness.bench_augment import CIFAR_MEAN, CIFAR_STD, bench_augmentation
from harness.config import RunConfig, resolve
from harness.evaluate import predict, summarize
from harness.feeders import DeviceFeeder, make_feeder
from harness.trainer import StageRun, Trainer, enter_stage, set_train_mode
from harness.registry import METHODS

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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall seconds of fn(), with the device drained before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


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


def run_config(variant: str, mode: Mode, batch_size: int, seed: int = 0, epochs: int = 1, crt_epochs: int = 1,
               experts: int = 3) -> RunConfig:
    """The resolved `shike-code` config of a variant under a mode."""
    method, switches = VARIANTS[variant]
    overrides: dict[str, Any] = {
        "train.epochs": epochs, "train.crt_epochs": crt_epochs, "train.seed": seed, "optim.batch_size": batch_size,
        "train.channels_last": mode.channels_last, "train.amp": mode.amp, "train.compile": mode.compile,
        "train.fast_path": "on" if mode.feeder == "device" else "off",
        **{f"method.{k}": v for k, v in switches.items()},
    }
    if method == "shike":
        overrides["method.experts"] = experts
    return resolve(method, METHODS.get(method), overrides=overrides)


def build_trainer(variant: str, mode: Mode, data: LTData, device: torch.device, batch_size: int, seed: int = 0,
                  num_workers: int = 0, experts: int = 3, with_feeder: bool = True) -> Trainer:
    """A Trainer for one variant and mode; the same seed gives the same initial weights in every mode."""
    cfg = run_config(variant, mode, batch_size, seed, experts=experts)
    torch.manual_seed(seed)
    spec = METHODS.get(cfg.method)(num_classes=data.num_classes, class_counts=data.class_counts,
                                   **cfg.method_kwargs)
    feeder = None
    if with_feeder:
        feeder = make_feeder(data.train, data.mean, data.std, cfg.data.augment, batch_size, device,
                             cfg.train.fast_path, num_workers)
    return Trainer(spec, cfg, feeder, device)


class TimedFeeder:
    """Wraps a feeder and adds up the time spent producing batches (the augmentation share of an epoch).

    DeviceFeeder augments the whole epoch at the first batch, so only that call is timed, between two device
    syncs (one extra sync per epoch). ReferenceFeeder batches are timed as host wall time in the DataLoader."""

    def __init__(self, inner: Any, device: torch.device) -> None:
        self.inner, self.device, self.data_s = inner, device, 0.0
        self.at_once = isinstance(inner, DeviceFeeder)

    def __len__(self) -> int:
        return len(self.inner)

    def epoch(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = iter(self.inner.epoch(seed))
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


def evaluate_once(trainer: Trainer, data: LTData, device: torch.device, amp: bool) -> None:
    """The runner's per-epoch test evaluation: predict the whole test split, then summarize on the host."""
    preds = predict(trainer.spec.model, data.test, data.mean, data.std, device, autocast=amp and device.type == "cuda")
    summarize(preds, data.class_counts)


def timed_epoch(trainer: Trainer, run: StageRun, optimizer: torch.optim.Optimizer, epoch: int, data: LTData | None,
                device: torch.device) -> dict[str, float]:
    """One training epoch through `Trainer.run_epoch` (plus the test evaluation if `data`): seconds of the epoch,
    of its batch production and of the evaluation."""
    feeder = TimedFeeder(trainer.feeder, device)
    trainer.feeder = feeder
    try:
        train_s = timed(lambda: trainer.run_epoch(run, optimizer, epoch), device)
    finally:
        trainer.feeder = feeder.inner
    eval_s = timed(lambda: evaluate_once(trainer, data, device, trainer.cfg.train.amp), device) if data else 0.0
    return {"train_s": train_s, "data_s": feeder.data_s, "eval_s": eval_s, "epoch_s": train_s + eval_s}


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


def random_batch(batch_size: int, num_classes: int, device: torch.device, seed: int = 0):
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


def cpu_step_peak_bytes(variant: str, mode: Mode, batch_size: int, num_classes: int, experts: int) -> dict[str, int]:
    """Peak resident growth of two training steps, measured in a fresh child process (ru_maxrss)."""
    spec = json.dumps({"variant": variant, "mode": mode.__dict__, "batch_size": batch_size,
                       "num_classes": num_classes, "experts": experts,
                       "threads": torch.get_num_threads()})
    done = subprocess.run([sys.executable, "-m", "harness.bench", "--memory-probe", spec], capture_output=True,
                          text=True, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _memory_probe(spec: dict[str, Any]) -> dict[str, int]:
    """Child side of `cpu_step_peak_bytes`: build, then ru_maxrss growth over the pre-step resident size."""
    torch.set_num_threads(spec["threads"])
    device = torch.device("cpu")
    data = synthetic_lt(spec["num_classes"], n_max=2, imbalance_factor=1.0, test_per_class=1)
    trainer = build_trainer(spec["variant"], Mode(**spec["mode"]), data, device, spec["batch_size"],
                            experts=spec["experts"], with_feeder=False)
    case = StepCase(trainer, *random_batch(spec["batch_size"], spec["num_classes"], device))
    with open("/proc/self/statm") as f:  # current resident pages (not the import-time high-water mark)
        resident = int(f.read().split()[1]) * resource.getpagesize()
    case(2)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"peak_bytes": peak, "peak_over_start_bytes": max(peak - resident, 0)}


def bench_step(variants: tuple[str, ...] = ("plain", "shike"), modes: tuple[Mode, ...] = (REFERENCE, FAST),
               batch_size: int = 128, warmup: int = 2, steps: int = 2, repeats: int = 5, num_classes: int = 100,
               experts: int = 3, device: torch.device | None = None, memory: bool = True) -> dict[str, Any]:
    """ms per training step (forward, loss terms, backward, SGD) of each variant under each mode on one fixed
    batch: the first step (compilation, if any) is timed apart, then `repeats` interleaved rounds of `steps` steps
    after `warmup` steps; medians, minima and the reference/mode ratios of the medians."""
    device = device or torch.device("cpu")
    data = synthetic_lt(num_classes, n_max=2, imbalance_factor=1.0, test_per_class=1)  # class counts only
    out: dict[str, Any] = {}
    for variant in variants:
        images, labels = random_batch(batch_size, num_classes, device)
        cases = {m.name: StepCase(build_trainer(variant, m, data, device, batch_size, experts=experts,
                                                with_feeder=False), images, labels) for m in modes}
        first_s = {name: timed(case, device) for name, case in cases.items()}
        for case in cases.values():
            case(warmup)
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(repeats):
            for name, case in cases.items():
                times[name].append(1e3 * timed(lambda c=case: c(steps), device) / steps)
        rows = {name: {"median_ms": statistics.median(t), "min_ms": min(t), "first_step_s": first_s[name]}
                for name, t in times.items()}
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


def memory_measure(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated over the pass (absolute, and above the allocation before it)"
    return "CPU: ru_maxrss of a fresh child process after 2 steps, minus its resident size before them"


def bench_epoch(variants: tuple[str, ...] = ("plain", "shike"), modes: tuple[Mode, ...] = (REFERENCE, FAST),
                data: LTData | None = None, batch_size: int = 128, repeats: int = 2, experts: int = 3,
                device: torch.device | None = None, evaluate: bool = False, num_workers: int = 0) -> dict[str, Any]:
    """Seconds per training epoch (and its batch-production share) per variant and mode on a small synthetic LT
    set: one warm-up epoch each, then `repeats` interleaved epochs; medians and ratios."""
    device = device or torch.device("cpu")
    data = data or synthetic_lt(num_classes=100, n_max=20, imbalance_factor=100.0, test_per_class=2)
    out: dict[str, Any] = {}
    for variant in variants:
        trainers = {m.name: build_trainer(variant, m, data, device, batch_size, experts=experts,
                                          num_workers=num_workers) for m in modes}
        optimizers = {name: enter_stage(t.spec, t.stages[0].stage, t.cfg) for name, t in trainers.items()}
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in trainers}
        for epoch in range(repeats + 1):
            for name, trainer in trainers.items():
                result = timed_epoch(trainer, trainer.stages[0], optimizers[name], epoch,
                                     data if evaluate else None, device)
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


@dataclass(frozen=True)
class BenchPlan:
    """What `harness bench` runs; `quick()` is the CI-sized version."""

    what: tuple[str, ...] = ("augment", "step", "epoch")
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

    def quick(self) -> BenchPlan:
        return replace(self, batch_size=8, experts=2, num_classes=10, aug_images=64, aug_repeats=1, step_repeats=2,
                       epoch_repeats=1, epoch_n_max=8, memory=False)


def run_bench(plan: BenchPlan, device: torch.device) -> dict[str, Any]:
    """Every requested benchmark of `plan`, as one JSON-serialisable dict."""
    previous_threads = torch.get_num_threads()
    if plan.threads > 0:
        torch.set_num_threads(plan.threads)
    try:
        return _run_bench(plan, device)
    finally:
        torch.set_num_threads(previous_threads)


def _run_bench(plan: BenchPlan, device: torch.device) -> dict[str, Any]:
    modes = (REFERENCE, FAST) + ((compiled(plan.compile),) if plan.compile != "off" else ())
    quick = plan.aug_images < 256
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


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-probe":
        print(json.dumps(_memory_probe(json.loads(sys.argv[2]))))
    else:
        print(json.dumps(run_bench(BenchPlan().quick(), torch.device("cpu")), indent=2))
