"""Long-tailed dataset builders, registered by name: `get_dataset("cifar100lt").build(imbalance_factor=100)`."""

from __future__ import annotations

from datasets import cifar_lt, fmnist_lt
from datasets._api import DatasetSpec, LTData, Split, long_tail_counts, shot_groups
from harness.registry import Registry

DATASETS = Registry("dataset")

# Registering here, not inside the builder modules, keeps those modules free of a circular import.
for _spec in (cifar_lt.CIFAR10LT, cifar_lt.CIFAR100LT, fmnist_lt.FMNISTLT):
    DATASETS.register(_spec.name)(_spec)


def get_dataset(name: str) -> DatasetSpec:
    """The registered `DatasetSpec` called `name`; an unknown name raises HarnessError listing the known ones."""
    return DATASETS.get(name)


__all__ = ["DATASETS", "DatasetSpec", "LTData", "Split", "get_dataset", "long_tail_counts", "shot_groups"]
