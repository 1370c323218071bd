"""Long-tailed dataset builders, registered by name (entry points in pyproject.toml):
`get_dataset("cifar100lt").build(imbalance_factor=100)`."""

from __future__ import annotations

from harness.data import DatasetSpec, LTData, Split, long_tail_counts, shot_groups
from harness.registry import DATASETS


def get_dataset(name: str) -> DatasetSpec:
    """The registered `DatasetSpec` called `name`; an unknown name raises HarnessError listing the known ones."""
    return DATASETS.get(name)


__all__ = ["DATASETS", "DatasetSpec", "LTData", "Split", "get_dataset", "long_tail_counts", "shot_groups"]
