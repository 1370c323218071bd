"""Peak memory of training steps on the CPU, where torch's allocator keeps no peak counter: a fresh child process
builds the trainer, notes its resident size, runs two steps and reports its `ru_maxrss` growth over that size.

Run as `python -m harness.studies.bench.memory SPEC_JSON` (the child side); `cpu_step_peak_bytes` is the parent.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from dataclasses import asdict
from typing import Any

import torch

from harness.studies.bench.build import Mode

PROBE_MODULE = "harness.studies.bench.memory"


def cpu_step_peak_bytes(variant: str, mode: Mode, batch_size: int, num_classes: int, experts: int) -> dict[str, int]:
    """Peak resident growth of two training steps, measured in a fresh child process (ru_maxrss)."""
    spec = json.dumps({"variant": variant, "mode": asdict(mode), "batch_size": batch_size,
                       "num_classes": num_classes, "experts": experts, "threads": torch.get_num_threads()})
    done = subprocess.run([sys.executable, "-m", PROBE_MODULE, spec], capture_output=True, text=True, timeout=300,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_probe(spec: dict[str, Any]) -> dict[str, int]:
    """Child side: build, then ru_maxrss growth over the pre-step resident size."""
    from harness.studies.bench.build import build_trainer, synthetic_lt
    from harness.studies.bench.step import StepCase, random_batch  # step imports this module: import here

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


if __name__ == "__main__":
    print(json.dumps(memory_probe(json.loads(sys.argv[1]))))
