"""`harness bench gpu`: the GPU timing check of issue #6 in one command (under 8 min on an H100).

Synthetic uint8 images of the CIFAR-100-LT IF100 shape (10,847 train / 10,000 test; timing only, never accuracy).
Per epoch (train + the runner's test evaluation), for plain, MoE (no DKF) and SHIKE-3E: the reference path
(ReferenceFeeder with DataLoader workers, eager, fp32) vs the fast path (DeviceFeeder, bf16 autocast, channels_last)
eager and under torch.compile (default; reduce-overhead = CUDA graphs); compile time, augmentation share, peak
memory, then K concurrent SHIKE processes, and the extrapolation to a full run and to Table 4 against the targets
(60 s / 5 min / 15 min). Last, `r50-moe` (issue #14): training-step images/s and peak memory of SHIKE's
ResNet-50 MoE (ABC, with the conv3x3 and pool1x1 aligners) against a plain ResNet-50 side by side (B = 256 at
224 px, ImageNet-LT's 1,000 classes), eager and compiled; the budget usually cuts it, so run it on its
own with `--only r50-moe`. Every phase runs in child processes (`gpu_child`) with its own time limit inside one
overall budget, so a slow compile or a crash costs that phase only. Writes gpu_check.json, gpu_check.md and logs/.
`quick` runs the same code on a tiny set (CPU allowed) to check the command itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.errors import HarnessError
from harness.studies.bench.build import synthetic_lt
from harness.studies.bench.gpu_child import CHILD_MODULE
from harness.studies.bench.gpu_report import TARGETS_S, write_report

BATCH_SIZE = 128  # the official batch
QUICK_BATCH_SIZE = 16
# r50-moe: the variants (`gpu_child.ThroughputModel`; the plain one is the reference of the ratios) and the sizes
THROUGHPUT_VARIANTS = ["resnet50:ABC", "resnet50:ABC:pool1x1", "resnet50:plain"]
THROUGHPUT = {"batch_size": 256, "image_size": 224, "num_classes": 1000, "warmup": 5, "steps": 20}
QUICK_THROUGHPUT = {"batch_size": 4, "image_size": 64, "num_classes": 1000, "warmup": 1, "steps": 2}
MIN_PHASE_S = 30.0  # a phase is skipped when less than this is left of the budget


@dataclass(frozen=True)
class GpuCheck:
    """What `harness bench gpu` runs: where to write, the overall budget, DataLoader workers of the reference
    path, a subset of phases by name (empty: all), and `quick` (tiny data, CPU allowed)."""

    out: Path
    budget_s: float = 440.0
    workers: int = min(8, os.cpu_count() or 1)
    only: tuple[str, ...] = ()
    quick: bool = False


def phase_plan(quick: bool) -> list[dict[str, Any]]:
    """Phases in order of importance; the budget cuts from the end. limit_s: that phase's own cap on an H100."""
    epochs = {"timed": 1 if quick else 2, "crt": True}
    plan = [
        {"name": "fast", "mode": "fast", "variants": ["shike", "plain", "moe"], "limit_s": 120, **epochs},
        {"name": "reference", "mode": "reference", "variants": ["shike", "plain"], "limit_s": 120, "timed": 1,
         "crt": True},
        {"name": "default-shike", "mode": "fast+default", "variants": ["shike"], "limit_s": 170, **epochs,
         "crt": False},
        {"name": "cudagraphs-shike", "mode": "fast+reduce-overhead", "variants": ["shike"], "limit_s": 140,
         **epochs, "crt": False},
    ]
    plan += [{"name": f"concurrent-eager-k{k}", "kind": "concurrent", "mode": "fast", "variants": ["shike"], "k": k,
              "timed": epochs["timed"], "limit_s": 90} for k in (1, 2, 4)]
    plan += [{"name": f"{tag}-plain", "mode": mode, "variants": ["plain"], "limit_s": 100, **epochs, "crt": False}
             for tag, mode in (("default", "fast+default"), ("cudagraphs", "fast+reduce-overhead"))]
    plan += [{"name": f"concurrent-cudagraphs-k{k}", "kind": "concurrent", "mode": "fast+reduce-overhead",
              "variants": ["shike"], "k": k, "timed": epochs["timed"], "limit_s": 120} for k in (1, 2, 4)]
    # One child measures every variant, eager then compiled (CUDA only), so the ratios come from one run on one card.
    plan.append({"name": "r50-moe", "kind": "throughput", "mode": "fast", "variants": THROUGHPUT_VARIANTS,
                 "compile": ["default"], "limit_s": 420, **(QUICK_THROUGHPUT if quick else THROUGHPUT)})
    return plan


def environment() -> dict[str, Any]:
    """torch, CUDA, CPU count, device name and the key nvidia-smi fields (card, SXM/PCIe, power cap, clocks)."""
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "cpus": os.cpu_count(),
           "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA)"}
    try:
        text = subprocess.run(["nvidia-smi", "-q"], capture_output=True, text=True, timeout=30).stdout
        keys = ("Product Name", "Product Architecture", "Board Part Number", "Bus Id", "Current Power Limit",
                "Max Power Limit", "Total", "SM ", "Memory ")
        lines = [" ".join(ln.split()) for ln in text.splitlines() if ln.strip()]
        picked = [ln for ln in lines if ln.startswith(keys)]
        env["nvidia_smi"] = list(dict.fromkeys(lines[:8] + picked))[:22]  # header (driver, CUDA) + key fields
    except (OSError, subprocess.SubprocessError) as error:
        env["nvidia_smi"] = [f"unavailable: {error}"]
    return env


def run_phase(phase: dict[str, Any], common: dict[str, Any], out: Path, limit: float) -> dict[str, Any]:
    """Run one phase as K (usually 1) child processes under `limit` seconds; collect their JSON lines."""
    result_file = out / "logs" / f"{phase['name']}.jsonl"
    result_file.unlink(missing_ok=True)
    barrier = Path(tempfile.mkdtemp(prefix="bench_gpu_barrier_"))
    k = phase.get("k", 1)
    started, procs = time.perf_counter(), []
    with open(out / "logs" / f"{phase['name']}.log", "w") as log:
        for rank in range(k):
            spec = {**common, **phase, "rank": rank, "barrier": str(barrier), "result": str(result_file)}
            procs.append(subprocess.Popen([sys.executable, "-m", CHILD_MODULE, json.dumps(spec)], stdout=log,
                                          stderr=subprocess.STDOUT))
        status = _wait(procs, barrier, k if phase.get("kind") == "concurrent" else 0, started + limit)
    shutil.rmtree(barrier, ignore_errors=True)
    lines = result_file.read_text().splitlines() if result_file.exists() else []
    return {"name": phase["name"], "mode": phase["mode"], "k": k, "status": status,
            "wall_s": time.perf_counter() - started, "results": [json.loads(line) for line in lines]}


def _wait(procs: list[subprocess.Popen], barrier: Path, k: int, deadline: float) -> str:
    """Release the K-process barrier once all are warm (k = 0: no barrier); kill everything at the deadline."""
    released = k == 0
    while any(p.poll() is None for p in procs):
        if not released and len(list(barrier.glob("ready*"))) == k:
            (barrier / "go").touch()
            released = True
        if time.perf_counter() > deadline:
            for p in procs:
                p.kill()
            return "timeout"
        time.sleep(0.01)
    return "ok" if all(p.returncode == 0 for p in procs) else f"exit {[p.returncode for p in procs]}"


def _skipped(phase: dict[str, Any]) -> dict[str, Any]:
    return {"name": phase["name"], "mode": phase["mode"], "k": phase.get("k", 1), "status": "skipped (budget)",
            "wall_s": 0.0, "results": []}


def run_gpu_check(check: GpuCheck, log: Callable[[str], None] = print) -> Path:
    """Every phase of the plan within the budget; the report is rewritten after each phase (a killed check keeps
    what it measured). Returns the markdown report's path. Without CUDA only `quick` runs."""
    if not torch.cuda.is_available() and not check.quick:
        raise HarnessError("no CUDA device: the GPU figures stay unmeasured (add --quick to check the command on CPU)")
    known = [p["name"] for p in phase_plan(check.quick)]
    if set(check.only) - set(known):
        raise HarnessError(f"unknown phase(s) {', '.join(sorted(set(check.only) - set(known)))}; "
                           f"known: {', '.join(known)}")
    started = time.perf_counter()
    (check.out / "logs").mkdir(parents=True, exist_ok=True)
    data = synthetic_lt(4, 12, 3.0, 2) if check.quick else synthetic_lt()  # default: CIFAR-100-LT IF100 shape
    data_file = Path(tempfile.mkdtemp(prefix="bench_gpu_")) / "data.pt"
    torch.save(data, data_file)
    report: dict[str, Any] = {"environment": environment(), "targets_s": TARGETS_S, "budget_s": check.budget_s,
                              "data": f"{len(data.train)} train / {len(data.test)} test synthetic uint8 32x32"}
    log(f"{report['environment']['device_name']}: {report['data']}")
    common = {"data": str(data_file), "batch_size": QUICK_BATCH_SIZE if check.quick else BATCH_SIZE,
              "workers": check.workers}
    phases: list[dict[str, Any]] = []
    try:
        for phase in phase_plan(check.quick):
            if check.only and phase["name"] not in check.only:
                continue
            left = check.budget_s - (time.perf_counter() - started)
            if left < MIN_PHASE_S:
                phases.append(_skipped(phase))
                continue
            limit = phase["limit_s"] * (4 if check.quick else 1)  # CPU: slower steps, colder compiles
            phases.append(run_phase(phase, common, check.out, min(limit, left - 10)))
            log(f"{phase['name']}: {phases[-1]['status']} in {phases[-1]['wall_s']:.0f} s")
            report["wall_s"] = time.perf_counter() - started
            write_report(check.out, report, phases)
        report["wall_s"] = time.perf_counter() - started
        write_report(check.out, report, phases)
    finally:
        shutil.rmtree(data_file.parent, ignore_errors=True)
    return check.out / "gpu_check.md"
