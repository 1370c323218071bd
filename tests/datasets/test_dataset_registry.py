"""The dataset registry and the static facts of each spec (no data files needed)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

import harness.datasets
from harness.datasets import DATASETS, get_dataset, shot_groups
from harness.errors import HarnessError

REPO = Path(__file__).resolve().parents[2]
BUILD_KWARGS = [
    "imbalance_factor", "profile", "n_max", "data_root", "download", "data_seed", "val_per_class", "test_per_class",
]  # fmt: skip


def test_import_resolves_to_repo_package():
    # The repository's datasets/ folder installs as `harness.datasets`, never as a top-level `datasets`.
    assert Path(harness.datasets.__file__).resolve() == REPO / "datasets" / "__init__.py"
    assert harness.datasets.DATASETS is DATASETS


def test_registry_names_and_unknown_name():
    assert DATASETS.names() == ["cifar100lt", "cifar10lt", "fmnistlt", "imagenetlt", "inat2018", "placeslt"]
    with pytest.raises(HarnessError, match="cifar100lt, cifar10lt, fmnistlt, imagenetlt, inat2018, placeslt"):
        get_dataset("imagenet-lt")


@pytest.mark.parametrize("name", ["cifar100lt", "cifar10lt", "fmnistlt"])
def test_builders_take_exactly_the_contract_keywords(name):
    spec = get_dataset(name)
    params = inspect.signature(spec.build).parameters
    assert list(params) == BUILD_KWARGS
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params.values())
    assert params["profile"].default == "first-n" and spec.profiles == ("first-n", "ldam-seed0")


@pytest.mark.parametrize(
    "imbalance_factor, total, groups",
    [(100, 10_847, (35, 35, 30)), (50, 12_608, (41, 41, 18)), (10, 19_573, (69, 31, 0))],
)
def test_cifar100lt_published_counts(imbalance_factor, total, groups):
    counts = get_dataset("cifar100lt").counts(imbalance_factor)
    assert len(counts) == 100 and sum(counts) == total
    assert tuple(len(g) for g in shot_groups(counts).values()) == groups
    if imbalance_factor == 100:
        assert counts[:3] == [500, 477, 455] and counts[-4:] == [5, 5, 5, 5]


def test_cifar10lt_counts():
    spec = get_dataset("cifar10lt")
    assert spec.num_classes == 10 and spec.default_n_max == 5000
    assert spec.counts(100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(spec.counts(100)) == 12_406 and sum(spec.counts(10)) == 20_431


def test_fmnistlt_counts():
    counts = get_dataset("fmnistlt").counts(100)
    assert counts == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5] and sum(counts) == 1_236
    assert {k: len(v) for k, v in shot_groups(counts).items()} == {"many": 4, "medium": 3, "few": 3}
