"""Fake CIFAR folders in the exact pickle layout of the real files (torchvision's), for tests and CLI smoke runs.

Images are noise blended with a per-class colour, so a model can learn them above chance in a few steps."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from harness.datasets.cifar_lt import CIFAR10_CLASSES


def _fake_images(labels: np.ndarray, rng: np.random.Generator, colours: np.ndarray) -> np.ndarray:
    noise = rng.integers(0, 256, size=(len(labels), 3, 1024), dtype=np.uint8)
    # Half noise, half class colour: still uint8, and the class is visible in the per-channel mean.
    images = noise // 2 + colours[labels][:, :, None] // 2
    return images.reshape(len(labels), 3072)


def _labels(num_classes: int, per_class: int, rng: np.random.Generator) -> np.ndarray:
    # The real files interleave classes in a shuffled order; a permutation of a balanced list does the same.
    return rng.permutation(np.repeat(np.arange(num_classes), per_class)).astype(np.int64)


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)


def _batch(labels: np.ndarray, images: np.ndarray, label_key: str, batch_label: str, start: int) -> dict:
    batch = {
        "batch_label": batch_label,
        label_key: [int(y) for y in labels],
        "data": images,
        "filenames": [f"fake_{start + i:06d}.png" for i in range(len(labels))],
    }
    if label_key == "fine_labels":
        batch["coarse_labels"] = [int(y) // 5 for y in labels]  # 20 superclasses of 5, as in CIFAR-100
    return batch


def write_fake_cifar(
    root: str | Path, num_classes: int = 100, per_class_train: int = 500, per_class_test: int = 100, seed: int = 0
) -> Path:
    """Write `<root>/cifar-100-python/{train,test,meta}` (num_classes=100) or
    `<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}` (num_classes=10) and return `root`.

    Keys, dtypes and shapes match the real pickles (`data` is (N, 3072) uint8, row-major CHW); label names are
    placeholders for CIFAR-100 and the real ones for CIFAR-10. The same seed writes the same bytes.
    """
    if num_classes not in (10, 100):
        raise ValueError(f"num_classes must be 10 or 100, got {num_classes}")
    root, rng = Path(root), np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(num_classes, 3), dtype=np.uint8)
    train_y, test_y = _labels(num_classes, per_class_train, rng), _labels(num_classes, per_class_test, rng)
    train_x, test_x = _fake_images(train_y, rng, colours), _fake_images(test_y, rng, colours)
    if num_classes == 100:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        _dump(folder / "train", _batch(train_y, train_x, "fine_labels", "training batch 1 of 1", 0))
        _dump(folder / "test", _batch(test_y, test_x, "fine_labels", "testing batch 1 of 1", 0))
        fine = [f"fake_class_{c:02d}" for c in range(100)]
        coarse = [f"fake_superclass_{c:02d}" for c in range(20)]
        _dump(folder / "meta", {"fine_label_names": fine, "coarse_label_names": coarse})
        return root
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for b, chunk in enumerate(np.array_split(np.arange(len(train_y)), 5)):
        batch = _batch(train_y[chunk], train_x[chunk], "labels", f"training batch {b + 1} of 5", int(chunk[0]))
        _dump(folder / f"data_batch_{b + 1}", batch)
    _dump(folder / "test_batch", _batch(test_y, test_x, "labels", "testing batch 1 of 1", 0))
    _dump(
        folder / "batches.meta",
        {"label_names": list(CIFAR10_CLASSES), "num_cases_per_batch": len(train_y) // 5, "num_vis": 3072},
    )
    return root


def _write_idx(path: Path, array: np.ndarray) -> None:
    # IDX: two zero bytes, type 0x08 (uint8), the number of dims, each dim as a big-endian uint32, then the bytes.
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_fake_fmnist(root: str | Path, per_class_train: int = 600, per_class_test: int = 20, seed: int = 0) -> Path:
    """Write the four uncompressed Fashion-MNIST IDX files (10 classes of 28x28 noise-plus-grey-level images)
    into `root` and return it; `datasets.fmnist_lt` reads them like the real ones via --data-root."""
    from harness.datasets.fmnist_lt import IDX_FILES

    root, rng = Path(root), np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    levels = rng.integers(0, 256, size=10, dtype=np.uint8)
    for (images_name, labels_name), per_class in zip((IDX_FILES[:2], IDX_FILES[2:]), (per_class_train, per_class_test)):
        labels = _labels(10, per_class, rng).astype(np.uint8)
        noise = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        _write_idx(root / images_name, noise // 2 + levels[labels][:, None, None] // 2)
        _write_idx(root / labels_name, labels)
    return root
