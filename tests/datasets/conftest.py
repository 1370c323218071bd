"""Fake CIFAR folders (real pickle layout, random images) shared by the dataset tests; written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.datasets.fake import write_fake_cifar


@pytest.fixture(scope="session")
def fake_cifar100(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Full-size fake CIFAR-100 (500 train / 100 test per class), so published LT counts can be built."""
    return write_fake_cifar(tmp_path_factory.mktemp("c100"), num_classes=100, per_class_train=500, per_class_test=100)


@pytest.fixture(scope="session")
def fake_cifar10(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small fake CIFAR-10 (600 train / 20 test per class), split over five batches like the real one."""
    return write_fake_cifar(tmp_path_factory.mktemp("c10"), num_classes=10, per_class_train=600, per_class_test=20)
