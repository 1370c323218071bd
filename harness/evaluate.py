"""Evaluator: top-1/top-5, many/medium/few, per-class accuracy, ECE (15 bins), NLL, and expert diagnostics.

The final-epoch figures are the reported ones; nothing here selects a checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from harness.data import FileSplit, Split, shot_groups
from harness.method import LTModel

ECE_BINS = 15  # as MiSLAS reports


@dataclass
class Predictions:
    logits: torch.Tensor  # (N, C) float32, what inference uses
    expert_logits: torch.Tensor  # (M, N, C) float32
    labels: torch.Tensor  # (N,)
    features: torch.Tensor | None = None  # (M, N, D) pooled features, when asked for


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N,3,H,W) -> float normalised, the test transform (ToTensor + Normalize)."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255.0 - m) / s


def eval_batches(split: Split | FileSplit, mean, std, device: torch.device, batch_size: int
                 ) -> Iterator[torch.Tensor]:
    """Normalised test-transform batches of a split in order, on `device`: an in-memory Split is sliced (on the
    device where it lives there); a FileSplit is read and resized + centre-cropped (`harness.file_feeder`)."""
    if isinstance(split, FileSplit):
        from harness.file_feeder import file_eval_batches  # PIL/DataLoader, only for file-backed splits

        yield from file_eval_batches(split, mean, std, device, batch_size)
        return
    images = split.images.to(device, non_blocking=True)
    for start in range(0, len(split), batch_size):
        yield normalize(images[start:start + batch_size], mean, std)


@torch.no_grad()
def predict(model: LTModel, split: Split | FileSplit, mean, std, device: torch.device, batch_size: int = 0,
            autocast: bool = False, features: bool = False) -> Predictions:
    """Forward the whole split in eval mode (BN running statistics), restoring the model's mode afterwards.

    The split may already live on `device` (the fast path keeps it there); results stay on `device` too, so a
    per-epoch evaluation costs one host read (see `quick_metrics`). Batches: 2,000 on CUDA, 500 on CPU."""
    batch_size = batch_size or (2000 if device.type == "cuda" else 500)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    was_training = model.training
    model.eval()
    logits, experts, pooled = [], [], []
    try:
        for batch in eval_batches(split, mean, std, device, batch_size):
            x = batch.contiguous(memory_format=memory_format)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                out = model(x)
            logits.append(out.logits.float())
            experts.append(out.expert_logits.float())
            if features:
                if out.features is None:
                    raise ValueError(f"{type(model).__name__} returns no features")
                pooled.append(out.features.float())
    finally:
        model.train(was_training)
    return Predictions(torch.cat(logits), torch.cat(experts, dim=1), split.labels.to(device),
                       torch.cat(pooled, dim=1) if features else None)


def per_class_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Fraction correct per class (0 for a class with no test samples), on the inputs' device."""
    correct = torch.zeros(num_classes, device=labels.device).index_add_(0, labels, (pred == labels).float())
    total = torch.zeros(num_classes, device=labels.device).index_add_(0, labels, torch.ones_like(labels,
                                                                                               dtype=torch.float))
    return correct / total.clamp(min=1)


def accuracy_metrics(preds: Predictions, class_counts: tuple[int, ...] | list[int]) -> tuple[dict[str, float],
                                                                                             np.ndarray]:
    """top-1, balanced accuracy (mean per-class accuracy) and many/medium/few (mean per-class accuracy over the
    group's classes; NaN for an empty group), in percent, with the per-class accuracies. The one implementation
    behind both the per-epoch and the final evaluation; a single host read wherever the predictions live."""
    labels = preds.labels
    pred = preds.logits.argmax(dim=1)
    per_class_t = per_class_accuracy(pred, labels, len(class_counts))
    host = torch.cat([(pred == labels).float().mean().view(1), per_class_t]).cpu().numpy()
    per_class = host[1:]
    metrics = {"top1": 100.0 * float(host[0]), "balanced_acc": 100.0 * float(per_class.mean())}
    for group, classes in shot_groups(class_counts).items():
        metrics[group] = 100.0 * float(per_class[classes].mean()) if classes else float("nan")
    return metrics, per_class


def quick_metrics(preds: Predictions, class_counts: tuple[int, ...] | list[int]) -> dict[str, float]:
    """The per-epoch figures: top-1, balanced accuracy and many/medium/few."""
    return accuracy_metrics(preds, class_counts)[0]


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE with equal-width confidence bins: sum_b |B_b|/N * |acc(B_b) - conf(B_b)|."""
    confidence, pred = probs.max(dim=1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece = torch.zeros(())
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.float().mean() * (correct[in_bin].mean() - confidence[in_bin].mean()).abs()
    return float(ece)


def hardest_negative_probability(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The largest non-target probability per sample (SHIKE Fig. 4)."""
    masked = probs.clone()
    masked[torch.arange(len(labels)), labels] = -1.0
    return masked.max(dim=1).values


def summarize(preds: Predictions, class_counts: tuple[int, ...] | list[int]) -> tuple[dict[str, float], dict]:
    """Scalar metrics (percent for accuracies) and per-class / per-expert details for artifacts and figures."""
    num_classes = len(class_counts)
    preds = Predictions(preds.logits.cpu(), preds.expert_logits.cpu(), preds.labels.cpu())
    labels = preds.labels
    probs = F.softmax(preds.logits, dim=1)
    top5 = preds.logits.topk(min(5, num_classes), dim=1).indices
    accuracy, per_class = accuracy_metrics(preds, class_counts)
    metrics = {
        "top1": accuracy["top1"],
        "top5": 100.0 * float((top5 == labels[:, None]).any(dim=1).float().mean()),
        "balanced_acc": accuracy["balanced_acc"],
        "ece": 100.0 * expected_calibration_error(probs, labels),
        "nll": float(F.cross_entropy(preds.logits, labels)),
        **{group: accuracy[group] for group in ("many", "medium", "few")},
    }
    expert_acc = np.stack([per_class_accuracy(e.argmax(dim=1), labels, num_classes).numpy()
                           for e in preds.expert_logits])
    for m, logits in enumerate(preds.expert_logits):  # a top-1 like `top1` (sample mean), not a balanced accuracy
        metrics[f"expert{m}_top1"] = 100.0 * float((logits.argmax(dim=1) == labels).float().mean())
    details = {
        "per_class_acc": per_class,
        "expert_per_class_acc": expert_acc,
        "hardest_negative_prob": hardest_negative_probability(probs, labels).numpy().astype(np.float32),
        "class_counts": np.asarray(class_counts),
    }
    return metrics, details


class Evaluator:
    """One evaluator per run: forwards a split and summarises it, per epoch (`quick`) or at the end (`full`)."""

    def __init__(self, class_counts: tuple[int, ...] | list[int], mean, std, device: torch.device,
                 autocast: bool = False) -> None:
        self.class_counts, self.mean, self.std = tuple(class_counts), mean, std
        self.device, self.autocast = device, autocast

    def predict(self, model: LTModel, split: Split) -> Predictions:
        return predict(model, split, self.mean, self.std, self.device, autocast=self.autocast)

    def quick(self, model: LTModel, split: Split) -> dict[str, float]:
        return quick_metrics(self.predict(model, split), self.class_counts)

    def full(self, model: LTModel, split: Split) -> tuple[dict[str, float], dict]:
        return summarize(self.predict(model, split), self.class_counts)
