"""Shared long-tail selection: which training-file images form the LT subset, the balanced validation carve-out,
the balanced test subset, and the assembly of an `LTData` with its manifest. Builders only read raw arrays."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from harness.data import LTData, Split, indices_sha256, long_tail_counts
from harness.errors import HarnessError

# first-n: SHIKE's imbalanced_cifar.py (its shuffle lines are commented out); ldam-seed0: LDAM-DRW/RIDE/SADE/PaCo's
# IMBALANCECIFAR, which seeds the global numpy RNG with 0 and shuffles each class's indices before taking n_c.
PROFILES = ("first-n", "ldam-seed0")

# Turns selected raw rows into uint8 (N, 3, 32, 32), e.g. padding 28x28 grey images.
ToCHW = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class RawData:
    """A dataset as read from disk: uint8 images (N, 3, H, W) or (N, H, W), int64 labels, in file order."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    source: str


def check_imbalance_factor(imbalance_factor: float) -> float:
    """Validate IF = n_max / n_min (>= 1) and return it as a float, so 100 and 100.0 hash alike."""
    if not isinstance(imbalance_factor, numbers.Real) or not math.isfinite(imbalance_factor) or imbalance_factor < 1:
        raise HarnessError(
            f"imbalance factor must be a finite number >= 1 (n_max / n_min), got {imbalance_factor!r}; "
            "pass e.g. --imbalance-factor 100, not the ratio 0.01 that LDAM-style code calls imb_factor"
        )
    return float(imbalance_factor)


def select_lt_indices(labels: np.ndarray, class_counts: list[int], profile: str) -> np.ndarray:
    """Indices into the training file of the LT subset, class by class, in the order the profile produces them."""
    if profile not in PROFILES:
        raise HarnessError(f"unknown data profile '{profile}'; known profiles: {', '.join(PROFILES)}")
    # A local RandomState(0) replays np.random.seed(0) + np.random.shuffle without touching the global RNG.
    rng = np.random.RandomState(0) if profile == "ldam-seed0" else None
    chosen = []
    for c, n_c in enumerate(class_counts):
        idx = np.where(labels == c)[0]
        if len(idx) < n_c:
            raise HarnessError(
                f"class {c} has only {len(idx)} training images but the profile needs {n_c}; lower --n-max"
            )
        if rng is not None:
            rng.shuffle(idx)
        chosen.append(idx[:n_c])
    return np.concatenate(chosen).astype(np.int64)


def carve_val(
    labels: np.ndarray, train_idx: np.ndarray, val_per_class: int, data_seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Draw `val_per_class` training-file images per class for a balanced validation split.

    Images come from those NOT in the LT subset, so the published LT training set stays intact. A class with
    fewer unused images than needed (e.g. IF = 1, where every image is used) gives all its unused images plus
    the shortfall drawn from its own LT training images, which then leave the training set (its count drops).
    Returns (train_idx without the carved images, val_idx class by class in file order).
    """
    rng = np.random.default_rng(data_seed)
    taken = np.zeros(len(labels), dtype=bool)
    taken[train_idx] = True
    train_labels = labels[train_idx]
    val_parts, drop = [], np.zeros(len(train_idx), dtype=bool)
    for c in range(int(labels.max()) + 1):
        unused = np.where((labels == c) & ~taken)[0]
        if len(unused) >= val_per_class:
            val_parts.append(np.sort(rng.choice(unused, val_per_class, replace=False)))
            continue
        positions = np.where(train_labels == c)[0]
        short = val_per_class - len(unused)
        if short >= len(positions):
            raise HarnessError(
                f"class {c} has {len(unused) + len(positions)} images, too few for {val_per_class} validation "
                "images plus at least one training image; lower --val-per-class"
            )
        moved = rng.choice(positions, short, replace=False)
        drop[moved] = True
        val_parts.append(np.sort(np.concatenate([unused, train_idx[moved]])))
    return train_idx[~drop], np.concatenate(val_parts).astype(np.int64)


def first_k_per_class(labels: np.ndarray, k: int, num_classes: int) -> np.ndarray:
    """Indices of the first k images of each class, kept in file order (deterministic balanced subset)."""
    parts = []
    for c in range(num_classes):
        idx = np.where(labels == c)[0]
        if len(idx) < k:
            raise HarnessError(f"class {c} has only {len(idx)} test images, fewer than --test-per-class {k}")
        parts.append(idx[:k])
    return np.sort(np.concatenate(parts)).astype(np.int64)


def make_split(images: np.ndarray, labels: np.ndarray, idx: np.ndarray, to_chw: ToCHW | None = None) -> Split:
    """A `Split` of the chosen rows: uint8 images (optionally converted to (N, 3, 32, 32)) and int64 labels."""
    chosen = images[idx]
    if to_chw is not None:
        chosen = to_chw(chosen)
    return Split(
        images=torch.from_numpy(np.ascontiguousarray(chosen, dtype=np.uint8)),
        labels=torch.from_numpy(labels[idx].astype(np.int64)),
    )


def split_manifest(raw: RawData, *, builder: str, dataset: str, profile: str, imbalance_factor: float, n_max: int,
                   class_counts: tuple[int, ...], train_idx: np.ndarray, val_idx: np.ndarray | None,
                   val_per_class: int, test_idx: np.ndarray, test_per_class: int, data_seed: int) -> dict:
    """What a split is made of, for the manifest logged with every run (its hash names the split)."""
    return {
        "builder": builder,
        "dataset": dataset,
        "profile": profile,
        "imbalance_factor": imbalance_factor,
        "n_max": int(n_max),
        "num_classes": len(class_counts),
        "class_counts": list(class_counts),
        "num_train": int(len(train_idx)),
        "train_indices_sha256": indices_sha256(train_idx),
        "val_per_class": int(val_per_class),
        "val_indices_sha256": None if val_idx is None else indices_sha256(val_idx),
        "test_per_class": int(test_per_class),
        "num_test": int(len(test_idx)),
        # data_seed only shapes the validation draw; leaving it out otherwise keeps the hash a function of the split.
        "data_seed": int(data_seed) if val_idx is not None else None,
        "source": raw.source,
    }


def build_lt(
    raw: RawData,
    *,
    dataset: str,
    builder: str,
    imbalance_factor: float,
    profile: str,
    n_max: int,
    data_seed: int,
    val_per_class: int,
    test_per_class: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    to_chw: ToCHW | None = None,
) -> LTData:
    """Select the LT subset, optional validation and test subsets from `raw` and record how in the manifest."""
    imbalance_factor = check_imbalance_factor(imbalance_factor)
    if n_max < 1 or val_per_class < 0 or test_per_class < 0:
        raise HarnessError(
            f"need n_max >= 1 and non-negative per-class sizes, got n_max={n_max}, "
            f"val_per_class={val_per_class}, test_per_class={test_per_class}"
        )
    num_classes = len(raw.class_names)
    counts = long_tail_counts(n_max, num_classes, imbalance_factor)
    train_idx = select_lt_indices(raw.train_labels, counts, profile)
    val_idx = None
    if val_per_class > 0:
        train_idx, val_idx = carve_val(raw.train_labels, train_idx, val_per_class, data_seed)
    class_counts = tuple(int(n) for n in np.bincount(raw.train_labels[train_idx], minlength=num_classes))
    test_idx = (
        first_k_per_class(raw.test_labels, test_per_class, num_classes)
        if test_per_class > 0
        else np.arange(len(raw.test_labels), dtype=np.int64)
    )
    manifest = split_manifest(raw, builder=builder, dataset=dataset, profile=profile, imbalance_factor=imbalance_factor,
                              n_max=n_max, class_counts=class_counts, train_idx=train_idx, val_idx=val_idx,
                              val_per_class=val_per_class, test_idx=test_idx, test_per_class=test_per_class,
                              data_seed=data_seed)
    return LTData(
        name=dataset,
        train=make_split(raw.train_images, raw.train_labels, train_idx, to_chw),
        test=make_split(raw.test_images, raw.test_labels, test_idx, to_chw),
        class_counts=class_counts,
        class_names=raw.class_names,
        mean=mean,
        std=std,
        manifest=manifest,
        val=None if val_idx is None else make_split(raw.train_images, raw.train_labels, val_idx, to_chw),
    )
