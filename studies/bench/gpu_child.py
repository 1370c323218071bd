"""`harness bench gpu`, the child side: one phase's measurements in a fresh process (its own CUDA context, its own
compile caches, its own time limit). Run as `python -m harness.studies.bench.gpu_child SPEC_JSON`; it appends one
JSON line per finished measurement to spec["result"], so partial results survive a timeout.

Three kinds of phase: per-epoch timing of the CIFAR recipes (`measure_variant`), K simultaneous runs
(`concurrent_worker`), and training-step throughput of the ImageNet-size backbones on synthetic device tensors
(`throughput_worker`: images/s and peak memory, no data pipeline).
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.data import LTData, Split
from harness.errors import HarnessError
from harness.evaluate import predict
from harness.method import LTModel
from harness.methods.models.moe import BACKBONES, build_expert_resnet
from harness.seeding import set_deterministic
from harness.studies.bench.build import Mode, build_trainer, mode_named
from harness.studies.bench.epoch import TestEvaluation, timed_epoch
from harness.studies.bench.timing import timed
from harness.trainer import Trainer, enter_stage

CHILD_MODULE = "harness.studies.bench.gpu_child"


def _device() -> torch.device:
    set_deterministic(False)  # the harness default: cudnn.benchmark on
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":  # --quick on a CPU: one thread per process keeps a shared CPU from stalling in OpenMP
        torch.set_num_threads(1)
    return device


def _setup(spec: dict[str, Any]) -> tuple[torch.device, LTData, Mode]:
    return _device(), torch.load(spec["data"], weights_only=False), mode_named(spec["mode"])


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


@dataclass(frozen=True)
class ThroughputModel:
    """A throughput variant "BACKBONE:plain" (one expert, linear head, no DKF: the backbone as torchvision trains
    it, the reference of the ratios) or "BACKBONE:ARRANGEMENT[:DKF_ALIGN]" (SHIKE's model, one expert per letter of
    Table 5's depth string, DKF with `dkf_align`, the official cosine heads)."""

    backbone: str
    arrangement: str  # "plain" or a depth string such as "ABC"
    dkf_align: str = "conv3x3"

    @classmethod
    def parse(cls, variant: str) -> ThroughputModel:
        parts = variant.split(":")
        if len(parts) not in (2, 3) or parts[0] not in BACKBONES or (parts[1] == "plain" and len(parts) == 3):
            raise HarnessError(f"throughput variant '{variant}': write BACKBONE:plain or "
                               f"BACKBONE:ARRANGEMENT[:DKF_ALIGN], BACKBONE one of {', '.join(BACKBONES)}")
        return cls(*parts)

    def build(self, num_classes: int) -> LTModel:
        # retrain_head=False: the cRT heads take no part in a stage-1 step, so they would only add idle memory.
        if self.arrangement == "plain":
            return build_expert_resnet(num_classes=num_classes, backbone=self.backbone, experts=1, dkf=False,
                                       head="linear", retrain_head=False)
        return build_expert_resnet(num_classes=num_classes, backbone=self.backbone, arrangement=self.arrangement,
                                   dkf_align=self.dkf_align, retrain_head=False)


def _peak_memory(device: torch.device) -> tuple[int, str]:
    """CUDA: the allocator's peak since the last reset. CPU: the process's peak RSS (Linux reports KiB), which never
    goes down, so on CPU it covers every variant measured before in this process too."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process peak RSS"


def throughput_worker(spec: dict[str, Any], variant: str, compile_mode: str) -> dict[str, Any]:
    """Training steps of `variant` on one fixed synthetic batch (B x 3 x S x S on the device, random labels over
    spec["num_classes"]): the fast path's switches (channels_last; bf16 autocast on CUDA), SGD, CE on the mean
    logits. spec["warmup"] untimed steps (cudnn autotuning; compilation when `compile_mode` is not "off"), then
    spec["steps"] timed ones between device syncs -> images/s and peak memory."""
    device, mode = _device(), mode_named(spec["mode"])
    _release(device)
    torch.manual_seed(0)
    batch, size = spec["batch_size"], spec["image_size"]
    started = time.perf_counter()
    model = ThroughputModel.parse(variant).build(spec["num_classes"])
    memory_format = torch.channels_last if mode.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).train()
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, spec["num_classes"], (batch,), device=device)
    # SGD with momentum and weight decay, as every recipe here trains; the values do not change a step's cost.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    amp = mode.amp and device.type == "cuda"

    def loss_of() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return torch.nn.functional.cross_entropy(model(images).logits.float(), labels)

    forward = loss_of if compile_mode == "off" else torch.compile(loss_of, mode=compile_mode)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        forward().backward()
        optimizer.step()

    build_s = time.perf_counter() - started
    warmup_s = timed(lambda: [step() for _ in range(spec["warmup"])], device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # the timed steps' peak (the warm-up's autotuning buffers aside)
    train_s = timed(lambda: [step() for _ in range(spec["steps"])], device)
    peak, peak_kind = _peak_memory(device)
    return {"variant": variant, "compile": compile_mode, "batch_size": batch, "image_size": size, "amp": amp,
            "channels_last": mode.channels_last, "build_s": build_s, "warmup_s": warmup_s, "steps": spec["steps"],
            "train_s": train_s, "ms_per_step": 1e3 * train_s / spec["steps"],
            "images_per_s": batch * spec["steps"] / train_s, "peak_bytes": peak, "peak_kind": peak_kind,
            "params": sum(p.numel() for p in model.parameters())}


def throughput_jobs(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Every variant eager first, then compiled (CUDA only), so a slow compile that runs into the phase's time limit
    still leaves the eager ratios."""
    modes = ["off"] + (spec["compile"] if torch.cuda.is_available() else [])
    return [{"variant": variant, "compile": mode} for mode in modes for variant in spec["variants"]]


def _release(device: torch.device) -> None:
    """Drop the previous measurement's compiled graphs and cached blocks, so each variant's peak is its own."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


Job = dict[str, Any]
# phase kind -> (its jobs, the measurement of one job); a phase without "kind" times epochs.
CHILD_KINDS: dict[str, tuple[Callable[[dict[str, Any]], list[Job]], Callable[[dict[str, Any], Job], Job]]] = {
    "epochs": (lambda spec: [{"variant": v} for v in spec["variants"]],
               lambda spec, job: measure_variant(spec, job["variant"])),
    "concurrent": (lambda spec: [{"variant": None}], lambda spec, job: concurrent_worker(spec)),
    "throughput": (throughput_jobs, lambda spec, job: throughput_worker(spec, job["variant"], job["compile"])),
}


def child_main(spec: dict[str, Any]) -> None:
    """One JSON line per finished measurement; a failing job is recorded and does not lose the others."""
    jobs_of, measure = CHILD_KINDS[spec.get("kind", "epochs")]
    for job in jobs_of(spec):
        try:
            result = measure(spec, job)
        except Exception as error:
            result = {**job, "error": f"{type(error).__name__}: {error}"[:2000]}
            print(result["error"], file=sys.stderr, flush=True)
        with open(spec["result"], "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    child_main(json.loads(sys.argv[1]))
