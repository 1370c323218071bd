"""Parameter and FLOP counts (FLOPs = 2 x multiply-adds, `torch.utils.flop_counter.FlopCounterMode`'s convention,
as in performance-anchors section 1.1). Only convs and matmuls are counted; BN, ReLU and the DKF product are not."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from harness.method import LTModel, ModelOutput


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """total: every parameter of the module; inference: those used at inference
    (`LTModel.inference_parameter_count`, i.e. without the inactive head set), or total for a plain module."""
    total = sum(p.numel() for p in model.parameters())
    inference = model.inference_parameter_count() if isinstance(model, LTModel) else total
    return {"total": total, "inference": inference}


def _logits(out: ModelOutput | torch.Tensor) -> torch.Tensor:
    return out.logits if isinstance(out, ModelOutput) else out


def _sample_input(model: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    ref = next(model.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    return torch.randn(*input_shape, device=device, dtype=dtype)


def forward_flops(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 32, 32)) -> int:
    """Forward FLOPs per image: counted on a batch of `input_shape`, in eval mode and without grad, divided by the
    batch size. The model's train/eval mode is restored afterwards."""
    was_training = model.training
    x = _sample_input(model, input_shape)
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // input_shape[0]


def train_flops(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 32, 32)) -> int:
    """Forward + backward FLOPs per image (the backward of `logits.sum()` w.r.t. the parameters that require grad,
    which includes the gradients of the activations but not of the input image).

    Runs in eval mode so that BN running statistics are left untouched (conv/matmul FLOPs do not depend on the
    mode); gradients are returned by `torch.autograd.grad`, so no `.grad` is written. Mode is restored."""
    was_training = model.training
    params = [p for p in model.parameters() if p.requires_grad]
    x = _sample_input(model, input_shape)
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        with torch.enable_grad(), counter:
            loss = _logits(model(x)).sum()
            if params:
                torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // input_shape[0]


def multiview_train_flops(model: nn.Module, views: int, input_shape: tuple[int, ...] = (1, 3, 32, 32)) -> int:
    """Forward + backward FLOPs per training image of a stage whose batches carry `views` views per image
    (`harness.method.View`): counted in training mode, where such models do what only training does (a second view,
    a momentum encoder's keys, a re-balancing branch), on a copy of the model, so that no BN statistic, queue or
    momentum encoder of the real one moves. Divided by the images, not by the views."""
    replica = copy.deepcopy(model)
    replica.train()
    for p, q in zip(model.parameters(), replica.parameters()):
        q.requires_grad_(p.requires_grad)
    params = [p for p in replica.parameters() if p.requires_grad]
    x = _sample_input(replica, (views * input_shape[0], *input_shape[1:]))
    counter = FlopCounterMode(display=False)
    with torch.enable_grad(), counter:
        loss = _logits(replica(x)).sum()
        if params:
            torch.autograd.grad(loss, params, allow_unused=True)
    return counter.get_total_flops() // input_shape[0]
