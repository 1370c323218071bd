"""Fake CIFAR folders (real pickle layout, random images) shared by the dataset tests; written once per session."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from datasets.fake import write_fake_cifar


@pytest.fixture(scope="session")
def fake_cifar100(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Full-size fake CIFAR-100 (500 train / 100 test per class), so published LT counts can be built."""
    return write_fake_cifar(tmp_path_factory.mktemp("c100"), num_classes=100, per_class_train=500, per_class_test=100)


@pytest.fixture(scope="session")
def fake_cifar10(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small fake CIFAR-10 (600 train / 20 test per class), split over five batches like the real one."""
    return write_fake_cifar(tmp_path_factory.mktemp("c10"), num_classes=10, per_class_train=600, per_class_test=20)


def read_raw(folder: Path, names: list[str], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """The images (N, 3, 32, 32) and labels of some pickles, read independently of the code under test."""
    data, labels = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        data.append(batch["data"])
        labels += batch[label_key]
    return np.concatenate(data).reshape(-1, 3, 32, 32), np.asarray(labels)


def row_index(raw_images: np.ndarray) -> dict[bytes, int]:
    """Map each raw image's bytes to its index in the file (random images are unique), to recover chosen indices."""
    return {img.tobytes(): i for i, img in enumerate(raw_images)}


def indices_of(images, lookup: dict[bytes, int]) -> np.ndarray:
    """Indices into the raw file of the images of a built split."""
    return np.array([lookup[img.tobytes()] for img in images.numpy()])
