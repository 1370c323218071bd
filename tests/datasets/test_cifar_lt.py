"""CIFAR-10/100-LT builders on fake folders in the real pickle layout: counts, profiles, splits and manifests."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets

from harness.data import indices_sha256
from harness.datasets import get_dataset, long_tail_counts
from harness.errors import HarnessError


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


@pytest.fixture(scope="module")
def raw100(fake_cifar100):
    return read_raw(fake_cifar100 / "cifar-100-python", ["train"], "fine_labels")


@pytest.fixture(scope="module")
def lookup100(raw100):
    return row_index(raw100[0])


def build100(root, **kw):
    return get_dataset("cifar100lt").build(data_root=str(root), **{"imbalance_factor": 100, **kw})


def test_cifar100lt_if100_exact_counts_and_shapes(fake_cifar100):
    lt = build100(fake_cifar100)
    assert len(lt.train) == 10_847 and list(lt.class_counts) == long_tail_counts(500, 100, 100)
    assert {k: len(v) for k, v in lt.groups.items()} == {"many": 35, "medium": 35, "few": 30}
    assert torch.equal(torch.bincount(lt.train.labels, minlength=100), torch.tensor(lt.class_counts))
    assert lt.train.images.shape == (10_847, 3, 32, 32) and lt.train.images.dtype == torch.uint8
    assert lt.train.labels.dtype == torch.int64 and lt.val is None
    assert lt.mean == (0.4914, 0.4822, 0.4465) and lt.std == (0.2023, 0.1994, 0.2010)
    assert lt.manifest["num_train"] == 10_847 and lt.manifest["source"].endswith("cifar-100-python")


@pytest.mark.parametrize("imbalance_factor, total", [(50, 12_608), (10, 19_573), (37.5, 13_500)])
def test_cifar100lt_other_factors(fake_cifar100, imbalance_factor, total):
    lt = build100(fake_cifar100, imbalance_factor=imbalance_factor)
    assert len(lt.train) == total and sum(lt.class_counts) == total


def test_test_set_is_balanced_full_split(fake_cifar100):
    lt = build100(fake_cifar100)
    assert len(lt.test) == 10_000 and torch.all(torch.bincount(lt.test.labels) == 100)


def test_test_per_class_keeps_first_k_in_file_order(fake_cifar100):
    images, labels = read_raw(fake_cifar100 / "cifar-100-python", ["test"], "fine_labels")
    lt = build100(fake_cifar100, test_per_class=7)
    expected = np.sort(np.concatenate([np.where(labels == c)[0][:7] for c in range(100)]))
    assert torch.equal(lt.test.images, torch.from_numpy(images[expected]))
    assert torch.equal(lt.test.labels, torch.from_numpy(labels[expected]))


@pytest.mark.parametrize("bad", [0.5, 0, -3, float("nan")])
def test_imbalance_factor_below_one_is_a_one_line_error(fake_cifar100, bad):
    with pytest.raises(HarnessError, match=">= 1") as err:
        build100(fake_cifar100, imbalance_factor=bad)
    assert "\n" not in str(err.value)


def test_unknown_profile_lists_profiles(fake_cifar100):
    with pytest.raises(HarnessError, match="first-n, ldam-seed0"):
        build100(fake_cifar100, profile="random")


def test_n_max_larger_than_the_pool_says_what_to_do(fake_cifar100):
    with pytest.raises(HarnessError, match="--n-max"):
        build100(fake_cifar100, n_max=600)


def test_first_n_takes_the_first_images_of_each_class_in_file_order(fake_cifar100, raw100):
    images, labels = raw100
    lt = build100(fake_cifar100)
    counts = long_tail_counts(500, 100, 100)
    expected = np.concatenate([np.where(labels == c)[0][:n] for c, n in enumerate(counts)])
    assert torch.equal(lt.train.images, torch.from_numpy(images[expected]))
    assert torch.equal(lt.train.labels, torch.from_numpy(labels[expected]))
    assert lt.manifest["train_indices_sha256"] == indices_sha256(expected)


def test_ldam_seed0_matches_imbalancecifar_and_leaves_global_rng_alone(fake_cifar100, raw100):
    images, labels = raw100
    saved = np.random.get_state()
    # LDAM-DRW's IMBALANCECIFAR.gen_imbalanced_data, verbatim in spirit: global seed, shuffle, take the head.
    np.random.seed(0)
    expected = []
    for c, n in enumerate(long_tail_counts(500, 100, 100)):
        idx = np.where(labels == c)[0]
        np.random.shuffle(idx)
        expected.append(idx[:n])
    expected = np.concatenate(expected)
    np.random.set_state(saved)
    lt = build100(fake_cifar100, profile="ldam-seed0")
    assert np.array_equal(np.random.get_state()[1], saved[1])
    assert torch.equal(lt.train.images, torch.from_numpy(images[expected]))
    assert lt.manifest["train_indices_sha256"] == indices_sha256(expected)
    assert lt.manifest["train_indices_sha256"] != build100(fake_cifar100).manifest["train_indices_sha256"]


def test_manifest_hash_is_stable_and_tracks_the_split(fake_cifar100):
    a, b = build100(fake_cifar100), build100(fake_cifar100, imbalance_factor=100.0)
    assert a.manifest_hash == b.manifest_hash and len(a.manifest_hash) == 16
    assert build100(fake_cifar100, profile="ldam-seed0").manifest_hash != a.manifest_hash
    assert build100(fake_cifar100, imbalance_factor=50).manifest_hash != a.manifest_hash
    keys = {"builder", "dataset", "profile", "imbalance_factor", "n_max", "num_classes", "class_counts", "num_train"}
    keys |= {"train_indices_sha256", "val_per_class", "val_indices_sha256", "test_per_class", "data_seed", "source"}
    assert keys <= set(a.manifest)


def test_val_split_is_balanced_disjoint_and_keeps_the_lt_training_set(fake_cifar100, lookup100):
    plain = build100(fake_cifar100, n_max=450)
    lt = build100(fake_cifar100, n_max=450, val_per_class=5, data_seed=3)
    assert lt.class_counts == plain.class_counts and torch.equal(lt.train.images, plain.train.images)
    assert lt.manifest["train_indices_sha256"] == plain.manifest["train_indices_sha256"]
    assert len(lt.val) == 500 and torch.all(torch.bincount(lt.val.labels, minlength=100) == 5)
    val_idx, train_idx = indices_of(lt.val.images, lookup100), indices_of(lt.train.images, lookup100)
    assert not set(val_idx) & set(train_idx)
    assert lt.manifest["val_indices_sha256"] == indices_sha256(val_idx)
    assert torch.equal(lt.test.images, plain.test.images)


def test_val_split_takes_from_the_head_class_when_it_uses_the_whole_pool(fake_cifar100, lookup100):
    # At the published n_max = 500 class 0 uses all 500 of its images, so its validation images leave training.
    plain = build100(fake_cifar100)
    lt = build100(fake_cifar100, val_per_class=5)
    assert lt.class_counts == (495, *plain.class_counts[1:]) and len(lt.train) == 10_842
    val_idx, train_idx = indices_of(lt.val.images, lookup100), indices_of(lt.train.images, lookup100)
    assert set(train_idx) < set(indices_of(plain.train.images, lookup100)) and not set(val_idx) & set(train_idx)
    assert lt.manifest["val_indices_sha256"] == indices_sha256(val_idx)
    assert torch.equal(lt.test.images, plain.test.images)


def test_val_split_is_deterministic_per_seed(fake_cifar100):
    a, b = (build100(fake_cifar100, val_per_class=5, data_seed=1) for _ in range(2))
    c = build100(fake_cifar100, val_per_class=5, data_seed=2)
    assert torch.equal(a.val.images, b.val.images) and a.manifest_hash == b.manifest_hash
    assert a.manifest["val_indices_sha256"] != c.manifest["val_indices_sha256"]
    assert a.manifest_hash != c.manifest_hash


def test_val_split_at_if1_is_carved_from_training_images(fake_cifar100, lookup100):
    lt = build100(fake_cifar100, imbalance_factor=1, val_per_class=10)
    assert lt.class_counts == (490,) * 100 and len(lt.train) == 49_000
    assert torch.all(torch.bincount(lt.val.labels, minlength=100) == 10)
    assert not set(indices_of(lt.val.images, lookup100)) & set(indices_of(lt.train.images, lookup100))
    with pytest.raises(HarnessError, match="--val-per-class"):
        build100(fake_cifar100, imbalance_factor=100, val_per_class=500)


def test_data_root_may_point_at_the_inner_folder(fake_cifar100):
    inner = build100(fake_cifar100 / "cifar-100-python")
    assert inner.manifest_hash == build100(fake_cifar100).manifest_hash


def test_cifar10lt_reads_five_batches_in_order(fake_cifar10):
    folder = fake_cifar10 / "cifar-10-batches-py"
    images, labels = read_raw(folder, [f"data_batch_{i}" for i in range(1, 6)], "labels")
    lt = get_dataset("cifar10lt").build(imbalance_factor=10, n_max=500, data_root=str(fake_cifar10))
    counts = long_tail_counts(500, 10, 10)
    expected = np.concatenate([np.where(labels == c)[0][:n] for c, n in enumerate(counts)])
    assert list(lt.class_counts) == counts and torch.equal(lt.train.images, torch.from_numpy(images[expected]))
    assert lt.class_names[0] == "airplane" and len(lt.test) == 200


@pytest.mark.parametrize("name, folder", [("cifar100lt", "cifar-100-python"), ("cifar10lt", "cifar-10-batches-py")])
def test_missing_data_is_a_one_line_error_naming_the_flags(tmp_path, name, folder):
    with pytest.raises(HarnessError) as err:
        get_dataset(name).build(imbalance_factor=100, data_root=str(tmp_path))
    message = str(err.value)
    assert "\n" not in message and "--data-root" in message and "--download" in message and folder in message


def test_failed_download_is_a_one_line_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>\nsecond line")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    with pytest.raises(HarnessError, match="could not download CIFAR-100") as err:
        build100(tmp_path, download=True)
    assert "\n" not in str(err.value) and "--data-root" in str(err.value)
