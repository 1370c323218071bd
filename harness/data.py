"""The data contract every dataset builder returns, and the long-tail arithmetic shared by all builders."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
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

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """What one image is as the model sees it, (3, H, W)."""
        return tuple(self.images.shape[1:])


# The side of the crop a file-backed split is fed at: RandomResizedCrop(224) in training, Resize(256) +
# CenterCrop(224) at test (all LT codebases for ImageNet-LT, iNat and Places-LT; large-scale-lt.md section 2.1).
DEFAULT_CROP = 224


@dataclass(frozen=True)
class FileSplit:
    """A split too large to hold in memory: image files under `root` named by `paths` (relative, as in the
    dataset's list files) with int64 `labels` (N,) on the CPU. `crop` is the side of the square the model sees
    (training crops and test centre crops); `harness.file_feeder` reads and transforms the files."""

    root: Path
    paths: tuple[str, ...]
    labels: torch.Tensor
    crop: int = DEFAULT_CROP

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (3, self.crop, self.crop)


AnySplit = Split | FileSplit


@dataclass(frozen=True)
class LTData:
    """A built long-tailed dataset: the training split, a balanced test split and an optional balanced validation
    split carved from the training file (never from the test set)."""

    name: str
    train: Split | FileSplit
    test: Split | FileSplit
    class_counts: tuple[int, ...]
    class_names: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    manifest: dict[str, Any]
    val: Split | FileSplit | None = None

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
    torch.Generator) -> normalised floats for the device-resident fast path (None: the dataset has none).
    File-backed datasets (`FileSplit`) give `per_file(augment, mean, std, crop)`: a PIL image of any size ->
    normalised (3, crop, crop) tensor, and may name the augmentations a GPU decoding pipeline (DALI) reproduces
    exactly in `gpu_decodable` (`harness.dali_feeder`)."""

    per_image: Callable[[str, Stats, Stats], Callable[..., Any]]
    batched: Callable[[str, Stats, Stats], Callable[..., Any]] | None = None
    per_file: Callable[[str, Stats, Stats, int], Callable[..., Any]] | None = None
    gpu_decodable: tuple[str, ...] = ()


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
    # True where the class profile is the dataset's own (list files: ImageNet-LT, iNat 2018, Places-LT): `counts()`
    # is then only an exponential stand-in, and the real counts need the data (`build`).
    fixed_profile: bool = False
    # verify(data_root=..., limit=...) -> a report with `.ok`, `.lines()` and `.as_dict()` (`harness data verify`)
    verify: Callable[..., Any] | None = None

    def counts(self, imbalance_factor: float, n_max: int | None = None) -> list[int]:
        return long_tail_counts(n_max or self.default_n_max, self.num_classes, imbalance_factor)
