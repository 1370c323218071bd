"""`harness bench gpu`, the child side: one phase's measurements in a fresh process (its own CUDA context, its own
compile caches, its own time limit). Run as `python -m harness.studies.bench.gpu_child SPEC_JSON`; it appends one
JSON line per finished measurement to spec["result"], so partial results survive a timeout.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from harness.data import LTData, Split
from harness.evaluate import predict
from harness.seeding import set_deterministic
from harness.studies.bench.build import Mode, build_trainer, mode_named
from harness.studies.bench.epoch import TestEvaluation, timed_epoch
from harness.studies.bench.timing import timed
from harness.trainer import Trainer, enter_stage

CHILD_MODULE = "harness.studies.bench.gpu_child"


def _setup(spec: dict[str, Any]) -> tuple[torch.device, LTData, Mode]:
    set_deterministic(False)  # the harness default: cudnn.benchmark on
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":  # --quick on a CPU: one thread per process keeps a shared CPU from stalling in OpenMP
        torch.set_num_threads(1)
    return device, torch.load(spec["data"], weights_only=False), mode_named(spec["mode"])


def _peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _timed_stage(trainer: Trainer, index: int, timed_epochs: int, evaluation: TestEvaluation,
                 device: torch.device) -> dict[str, Any]:
    """A warm-up epoch (compilation, cudnn autotuning, worker start), then the median of `timed_epochs` epochs, each
    with the test evaluation; the warm-up's extra time is the stage's compile cost."""
    run = trainer.stages[index]
    optimizer = enter_stage(trainer.spec, run.stage, trainer.cfg)
    first = timed_epoch(trainer, run, optimizer, 0, evaluation, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    epochs = [timed_epoch(trainer, run, optimizer, e + 1, evaluation, device) for e in range(timed_epochs)]
    median = {k: sorted(t[k] for t in epochs)[len(epochs) // 2] for k in epochs[0]}
    return {**median, "first_epoch_s": first["epoch_s"], "extra_first_s": first["epoch_s"] - median["epoch_s"],
            "peak_bytes": _peak(device), "ms_per_step": 1e3 * median["train_s"] / len(trainer.feeder)}


def measure_variant(spec: dict[str, Any], variant: str) -> dict[str, Any]:
    """Build, then stage 1 and (if spec["crt"]) the cRT stage, each warmed up and timed; eval variants on the eager
    fast path; torch.compile's graph breaks and CUDA-graph skips."""
    device, data, mode = _setup(spec)
    started = time.perf_counter()
    workers = spec["workers"] if mode.feeder == "reference" else 0
    trainer = build_trainer(variant, mode, data, device, spec["batch_size"], num_workers=workers)
    evaluation = TestEvaluation.of(data, device, mode.amp)
    out: dict[str, Any] = {"variant": variant, "mode": spec["mode"], "build_s": time.perf_counter() - started,
                           "steps_per_epoch": len(trainer.feeder), "workers": workers,
                           "recipe_epochs": [s.epochs for s in trainer.spec.stages]}
    out["stage1"] = _timed_stage(trainer, 0, spec["timed"], evaluation, device)
    if spec["crt"]:
        out["crt"] = _timed_stage(trainer, 1, spec["timed"], evaluation, device)
    out["eval_variants"] = eval_variants(trainer, data, device, mode) if spec["mode"] == "fast" else {}
    from torch._dynamo.utils import counters

    out["graph_breaks"] = sum(counters["graph_break"].values())
    out["cudagraph_skips"] = int(counters["inductor"].get("cudagraph_skips", 0))
    return out


def eval_variants(trainer: Trainer, data: LTData, device: torch.device, mode: Mode) -> dict[str, float]:
    """Test-set forward time: from a host split in batches of 500 vs a device-resident split in larger batches."""
    on_device = Split(data.test.images.to(device), data.test.labels)
    amp = mode.amp and device.type == "cuda"
    model, out = trainer.spec.model, {}
    for name, split, batch in (("host_bs500", data.test, 500), ("device_bs2000", on_device, 2000),
                               ("device_bs10000", on_device, 10000)):
        predict(model, split, data.mean, data.std, device, batch, amp)  # warm-up (cudnn autotune)
        out[name] = timed(lambda s=split, b=batch: predict(model, s, data.mean, data.std, device, b, amp), device)
    return out


def concurrent_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One of K simultaneous runs: warm up, wait at a file barrier, then `timed` timed epochs (with evaluation)."""
    device, data, mode = _setup(spec)
    trainer = build_trainer(spec["variants"][0], mode, data, device, spec["batch_size"], seed=spec["rank"])
    evaluation = TestEvaluation.of(data, device, mode.amp)
    run = trainer.stages[0]
    optimizer = enter_stage(trainer.spec, run.stage, trainer.cfg)
    timed_epoch(trainer, run, optimizer, 0, evaluation, device)
    barrier = Path(spec["barrier"])
    (barrier / f"ready{spec['rank']}").touch()
    while not (barrier / "go").exists():
        time.sleep(0.005)
    start = time.time()
    epochs = [timed_epoch(trainer, run, optimizer, e + 1, evaluation, device)["epoch_s"]
              for e in range(spec["timed"])]
    return {"rank": spec["rank"], "start": start, "end": time.time(), "epoch_s": epochs}


def child_main(spec: dict[str, Any]) -> None:
    """One JSON line per finished measurement; a failing variant is recorded and does not lose the others."""
    jobs = [None] if spec.get("kind") == "concurrent" else spec["variants"]
    for variant in jobs:
        try:
            result = concurrent_worker(spec) if variant is None else measure_variant(spec, variant)
        except Exception as error:
            result = {"variant": variant, "error": f"{type(error).__name__}: {error}"[:2000]}
            print(result["error"], file=sys.stderr, flush=True)
        with open(spec["result"], "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    child_main(json.loads(sys.argv[1]))
