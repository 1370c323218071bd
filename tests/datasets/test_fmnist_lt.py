"""Fashion-MNIST-LT from the real Debian files (apt-get install dataset-fashion-mnist) and from small IDX folders."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.datasets import fmnist_lt, get_dataset
from harness.datasets.fmnist_lt import DEBIAN_DIR, IDX_FILES, read_idx
from harness.errors import HarnessError

needs_debian = pytest.mark.skipif(
    not (DEBIAN_DIR / "train-labels-idx1-ubyte.gz").is_file(), reason="apt-get install dataset-fashion-mnist"
)


def write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed uint8 IDX file, written independently of the parser under test."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@needs_debian
def test_idx_parser_on_the_raw_files():
    train_y, test_y = read_idx(DEBIAN_DIR / f"{IDX_FILES[1]}.gz"), read_idx(DEBIAN_DIR / f"{IDX_FILES[3]}.gz")
    assert train_y[:12].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5, 0, 9]
    assert test_y[:12].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7, 4, 5]
    assert read_idx(DEBIAN_DIR / f"{IDX_FILES[0]}.gz").shape == (60_000, 28, 28)
    assert np.all(np.bincount(train_y) == 6_000) and np.all(np.bincount(test_y) == 1_000)


@needs_debian
def test_fmnistlt_if100_counts_shapes_and_padding():
    lt = get_dataset("fmnistlt").build(imbalance_factor=100, data_root="/nonexistent")
    assert list(lt.class_counts) == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5] and len(lt.train) == 1_236
    assert {k: len(v) for k, v in lt.groups.items()} == {"many": 4, "medium": 3, "few": 3}
    assert lt.train.images.shape == (1_236, 3, 32, 32) and lt.train.images.dtype == torch.uint8
    assert len(lt.test) == 10_000 and lt.class_names[0] == "T-shirt/top" and lt.class_names[9] == "Ankle boot"
    raw = read_idx(DEBIAN_DIR / f"{IDX_FILES[0]}.gz")
    # first-n: the first class-0 image of the file is index 1 (labels start 9 0 0 ...).
    first = lt.train.images[0]
    assert torch.equal(first[:, 2:30, 2:30], torch.from_numpy(raw[1].copy()).expand(3, 28, 28))
    assert first[:, :2].sum() == 0 and first[:, -2:].sum() == 0 and first[:, :, :2].sum() == 0
    assert str(DEBIAN_DIR) in lt.manifest["source"]


@needs_debian
def test_hard_coded_mean_std_match_the_padded_training_set():
    x = read_idx(DEBIAN_DIR / f"{IDX_FILES[0]}.gz").astype(np.float64) / 255
    pixels = x.shape[0] * 32 * 32  # the zero border adds pixels but no mass
    mean = x.sum() / pixels
    std = np.sqrt((x**2).sum() / pixels - mean**2)
    assert fmnist_lt.FMNIST_MEAN == pytest.approx((mean,) * 3, abs=1e-4)
    assert fmnist_lt.FMNIST_STD == pytest.approx((std,) * 3, abs=1e-4)


@needs_debian
def test_fmnistlt_val_comes_from_unused_images_and_profiles_differ():
    spec = get_dataset("fmnistlt")
    plain, lt = spec.build(imbalance_factor=100), spec.build(imbalance_factor=100, val_per_class=20)
    assert lt.class_counts == plain.class_counts and torch.equal(lt.train.images, plain.train.images)
    assert len(lt.val) == 200 and torch.all(torch.bincount(lt.val.labels) == 20)
    ldam = spec.build(imbalance_factor=100, profile="ldam-seed0")
    assert ldam.class_counts == plain.class_counts and ldam.manifest_hash != plain.manifest_hash


@needs_debian
def test_torchvision_layout_with_gz_files(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in IDX_FILES:
        shutil.copy(DEBIAN_DIR / f"{stem}.gz", raw)
    lt = get_dataset("fmnistlt").build(imbalance_factor=10, data_root=str(tmp_path))
    assert str(raw.resolve()) in lt.manifest["source"] and sum(lt.class_counts) == sum(
        get_dataset("fmnistlt").counts(10)
    )


@pytest.fixture
def tiny_idx_root(tmp_path) -> Path:
    """Unpacked IDX files with 8 train / 2 test images per class, images equal to their index mod 256."""
    rng = np.random.default_rng(0)
    train_y, test_y = rng.permutation(np.repeat(np.arange(10), 8)), np.repeat(np.arange(10), 2)
    for stem, labels in ((IDX_FILES[0], train_y), (IDX_FILES[2], test_y)):
        write_idx(tmp_path / stem, np.arange(len(labels))[:, None, None].repeat(28, 1).repeat(28, 2) % 256)
    write_idx(tmp_path / IDX_FILES[1], train_y)
    write_idx(tmp_path / IDX_FILES[3], test_y)
    return tmp_path


def test_unpacked_idx_files_in_data_root(tiny_idx_root):
    lt = get_dataset("fmnistlt").build(imbalance_factor=4, n_max=8, data_root=str(tiny_idx_root), test_per_class=1)
    assert list(lt.class_counts) == [int(8 * 4 ** (-c / 9)) for c in range(10)]
    train_y = read_idx(tiny_idx_root / IDX_FILES[1])
    expected = np.concatenate([np.where(train_y == c)[0][:n] for c, n in enumerate(lt.class_counts)])
    assert lt.train.images[:, 0, 16, 16].tolist() == expected.tolist()  # pixel value = file index
    assert len(lt.test) == 10 and str(tiny_idx_root.resolve()) in lt.manifest["source"]


def test_truncated_idx_file_is_a_harness_error(tmp_path):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 3]) + (5).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\0" * 10)
    with pytest.raises(HarnessError, match="truncated"):
        read_idx(path)
    gz = tmp_path / "x.gz"
    gz.write_bytes(gzip.compress(b"not an idx file"))
    with pytest.raises(HarnessError, match="no uint8 IDX header"):
        read_idx(gz)


def test_missing_fmnist_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(fmnist_lt, "DEBIAN_DIR", tmp_path / "no-debian")
    with pytest.raises(HarnessError) as err:
        get_dataset("fmnistlt").build(imbalance_factor=100, data_root=str(tmp_path))
    message = str(err.value)
    assert "\n" not in message and "apt-get install dataset-fashion-mnist" in message
    assert "--data-root" in message and "--download" in message
