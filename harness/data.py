"""The data contract every dataset builder returns, and the long-tail arithmetic shared by all builders."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# Shot groups by training count, as in OLTR/Decoupling and the SHIKE Places-LT table: many > 100, few < 20.
MANY_THRESHOLD = 100
FEW_THRESHOLD = 20


def long_tail_counts(n_max: int, num_classes: int, imbalance_factor: float) -> list[int]:
    """Exponential profile n_c = int(n_max * IF^(-c/(C-1))), class c = label index (LDAM/SHIKE convention)."""
    if imbalance_factor < 1:
        raise ValueError(f"imbalance factor must be >= 1, got {imbalance_factor}")
    if num_classes == 1:
        return [n_max]
    return [int(n_max * imbalance_factor ** (-c / (num_classes - 1))) for c in range(num_classes)]


def shot_groups(class_counts: list[int] | tuple[int, ...]) -> dict[str, list[int]]:
    """Class indices of the many (>100), medium (20-100) and few (<20) shot groups."""
    many = [c for c, n in enumerate(class_counts) if n > MANY_THRESHOLD]
    few = [c for c, n in enumerate(class_counts) if n < FEW_THRESHOLD]
    medium = [c for c, n in enumerate(class_counts) if FEW_THRESHOLD <= n <= MANY_THRESHOLD]
    return {"many": many, "medium": medium, "few": few}


def indices_sha256(indices: np.ndarray) -> str:
    """Content hash of a chosen index list (int64, in order)."""
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()


# Where the files were read from does not change the split's content: same data elsewhere, same hash.
NON_CONTENT_KEYS = frozenset({"source"})


def manifest_hash(manifest: dict[str, Any]) -> str:
    """Short stable hash of a split manifest's content (canonical JSON, without where the files lived)."""
    content = {k: v for k, v in manifest.items() if k not in NON_CONTENT_KEYS}
    blob = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class Split:
    """Images as uint8 (N, 3, H, W) and labels as int64 (N,), both on the CPU."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class LTData:
    """A built long-tailed dataset: the training split, a balanced test split and an optional balanced validation
    split carved from the training file (never from the test set)."""

    name: str
    train: Split
    test: Split
    class_counts: tuple[int, ...]
    class_names: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    manifest: dict[str, Any]
    val: Split | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_counts)

    @property
    def groups(self) -> dict[str, list[int]]:
        return shot_groups(self.class_counts)

    @property
    def manifest_hash(self) -> str:
        return manifest_hash(self.manifest)


Stats = tuple[float, ...]


@dataclass(frozen=True)
class Augmentations:
    """How a dataset's training images are augmented: `per_image(augment, mean, std)` gives the PIL transform of
    the reference DataLoader path; `batched(augment, mean, std)` gives a callable (uint8 images on the device,
    torch.Generator) -> normalised floats for the device-resident fast path (None: the dataset has none)."""

    per_image: Callable[[str, Stats, Stats], Callable[..., Any]]
    batched: Callable[[str, Stats, Stats], Callable[..., Any]] | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """What the dataset registry holds: static facts (no data needed) and the loader.

    `build` takes keyword arguments: imbalance_factor, profile, n_max, data_root, download, data_seed,
    val_per_class, test_per_class; it returns an `LTData`.
    """

    name: str
    num_classes: int
    default_n_max: int
    profiles: tuple[str, ...]
    build: Callable[..., LTData]
    description: str = ""
    class_names: tuple[str, ...] = field(default=())
    augmentations: Augmentations | None = None

    def counts(self, imbalance_factor: float, n_max: int | None = None) -> list[int]:
        return long_tail_counts(n_max or self.default_n_max, self.num_classes, imbalance_factor)
