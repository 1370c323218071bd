"""Compute accounting for a run, logged as `cost/*` metrics so a table can put accuracy beside what it cost:
parameters (total, used at inference), forward FLOPs per image at inference, training FLOPs in TFLOPs (forward + backward of
what each stage trains, times the images it saw), images per second, peak memory and device-hours."""

from __future__ import annotations

import resource
import sys

import torch

from harness.method import MethodSpec
from harness.profile import forward_flops, multiview_train_flops, parameter_counts, train_flops

# Metrics read off a clock or the process (they differ between a resumed and an uninterrupted run of the same
# seed, and between machines); everything else a run logs is a function of its config and seed.
MEASURED = ("wall_time_s", "time/", "cost/train_images_per_s", "cost/peak_memory_mb", "cost/device_hours")


def is_measured(key: str) -> bool:
    return key.startswith(MEASURED)


def stage_train_flops(spec: MethodSpec, input_shape: tuple[int, ...]) -> list[int]:
    """Forward + backward FLOPs per image of each stage, with only that stage's parameter groups trainable (the
    model's requires_grad flags and head are restored afterwards); a stage with extra views counts every view."""
    model = spec.model
    flags = {id(p): p.requires_grad for p in model.parameters()}
    head = model.active_head
    groups = model.parameter_groups()
    out = []
    try:
        for stage in spec.stages:
            model.use_head(stage.head)
            for name, params in groups.items():
                for p in params:
                    p.requires_grad_(name in stage.trainable)
            views = 1 + len(stage.views)
            out.append(train_flops(model, input_shape) if views == 1
                       else multiview_train_flops(model, views, (2, *input_shape[1:])))
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        model.use_head(head)
    return out


def peak_memory_mb(device: torch.device) -> float:
    """Peak device memory allocated by tensors on CUDA; on CPU the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def run_cost(spec: MethodSpec, input_shape: tuple[int, ...], stage_images: list[int], train_s: float,
             images_trained: int, wall_s: float, device: torch.device) -> dict[str, float]:
    """`stage_images`: training images each stage saw in all (epochs x images per epoch)."""
    params = parameter_counts(spec.model)
    per_image = stage_train_flops(spec, input_shape)
    return {
        "cost/params_total": float(params["total"]),
        "cost/params_inference": float(params["inference"]),
        "cost/forward_flops_per_image": float(forward_flops(spec.model, input_shape)),
        "cost/train_tflops": sum(f * n for f, n in zip(per_image, stage_images)) / 1e12,
        "cost/train_images_per_s": images_trained / train_s if train_s > 0 else float("nan"),
        "cost/peak_memory_mb": peak_memory_mb(device),
        "cost/device_hours": wall_s / 3600.0,
    }
