"""ImageNet-LT, iNat 2018 and Places-LT from list files (datasets.large_lt), the file-backed feeder and evaluation
batches (harness.file_feeder), `harness data verify/info`, and one end-to-end run on a generated tree.

Trees come from `datasets.fake_large` (the real layouts and list formats, tiny JPEGs); expected counts are computed
here from what the writer reports and from hand-written list lines, never from the builder under test."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from cli_support import run_cli
from PIL import Image
from torchvision import transforms

from harness.data import FileSplit
from harness.datasets.fake_large import LIST_NAMES, write_fake_large_lt
from harness.datasets.large_augment import RA_OP_NAMES, NCLRandAugment
from harness.datasets.large_lt import IMAGENETLT, INAT2018, PLACESLT
from harness.errors import HarnessError
from harness.file_feeder import FileFeeder, FileLoading, file_eval_batches, make_file_feeder
from harness.registry import DATASETS

SPECS = {"imagenetlt": IMAGENETLT, "inat2018": INAT2018, "placeslt": PLACESLT}
# Head to tail: one many-shot class (> 100), two medium (20..100, both ends), three few (< 20); IF 101 / 2 = 50.5.
COUNTS = [101, 100, 20, 19, 3, 2]
GROUPS = {"many": [101], "medium": [100, 20], "few": [19, 3, 2]}


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, dict]:
    """One generated tree per dataset (8x6 JPEGs), with the writer's own summary."""
    root = tmp_path_factory.mktemp("large")
    return {name: write_fake_large_lt(root / name, name, train_counts=COUNTS, val_per_class=2, test_per_class=3,
                                      image_size=(8, 6), seed=1) for name in SPECS}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_exact_counts_groups_and_manifest(trees, name):
    summary = trees[name]
    data = DATASETS.get(name).build(imbalance_factor=None, data_root=summary["root"])
    assert list(data.class_counts) == summary["train_counts"] and sorted(data.class_counts) == sorted(COUNTS)
    for group, counts in GROUPS.items():  # the classes that got those counts, whatever label they landed on
        assert sorted(data.class_counts[c] for c in data.groups[group]) == sorted(counts)
    assert len(data.train) == sum(COUNTS) == 245
    assert len(data.test) == (6 * 2 if name == "inat2018" else 6 * 3)  # iNat: the val list is the test split
    assert data.val is None if name == "inat2018" else len(data.val) == 6 * 2
    m = data.manifest
    assert m["imbalance_factor"] == 50.5 and m["n_max"] == 101 and m["n_min"] == 2
    assert m["groups"] == {"many": 1, "medium": 2, "few": 3}
    assert m["lists_sha256"] == {Path(v["file"]).name: hashlib.sha256(Path(v["file"]).read_bytes()).hexdigest()
                                 for v in summary["lists"].values()}
    assert isinstance(data.train, FileSplit) and data.train.sample_shape == (3, 224, 224)
    assert all((data.train.root / p).is_file() for p in data.train.paths[:5] + data.test.paths[:5])
    assert DATASETS.get(name).build(imbalance_factor=50.5, data_root=summary["root"]).manifest_hash == \
        data.manifest_hash


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_real_line_formats_two_level_places_classes_and_lists_subfolder(tmp_path):
    # The real first lines (large-scale-lt.md section 1), lists in the mirrors' sub-folder.
    _write(tmp_path / "Places_LT" / "Places_LT_train.txt",
           "data_256/a/airfield/00004851.jpg 0\ndata_256/a/apartment_building/outdoor/00000042.jpg 1\n"
           "data_256/a/apartment_building/outdoor/00000043.jpg 1\n\n")
    _write(tmp_path / "Places_LT" / "Places_LT_val.txt", "data_256/a/airfield/00000001.jpg 0\n")
    _write(tmp_path / "Places_LT" / "Places_LT_test.txt", "val_256/Places365_val_00003597.jpg 0\n"
           "val_256/Places365_val_00000001.jpg 1\n")
    data = PLACESLT.build(imbalance_factor=2.0, data_root=str(tmp_path))
    assert data.class_names == ("airfield", "apartment_building/outdoor") and data.class_counts == (1, 2)
    assert data.test.paths == ("val_256/Places365_val_00003597.jpg", "val_256/Places365_val_00000001.jpg")
    easy = tmp_path / "easy"
    _write(easy / "Places_LT_train.txt", "train/airfield/00004851.jpg 0\ntrain/apartment_building-outdoor/1.jpg 1\n")
    _write(easy / "Places_LT_val.txt", "train/airfield/2.jpg 0\n")
    _write(easy / "Places_LT_test.txt", "val/airfield/Places365_val_00003597.jpg 0\n")
    assert PLACESLT.build(imbalance_factor=None, data_root=str(easy)).class_names == (
        "airfield", "apartment_building-outdoor")


def test_inat_label_is_category_id_never_remapped(tmp_path):
    lines = ["train_val2018/Plantae/3/9f8ecb39e5f767e39e9b28e34488f179.jpg 3",
             "train_val2018/Aves/0/aa.jpg 0", "train_val2018/Insecta/2/bb.jpg 2", "train_val2018/Aves/1/cc.jpg 1",
             "train_val2018/Plantae/3/dd.jpg 3"]
    _write(tmp_path / "iNaturalist18_train.txt", "\n".join(lines) + "\n")
    _write(tmp_path / "iNaturalist18_val.txt", "train_val2018/Aves/1/ee.jpg 1\n")
    data = INAT2018.build(imbalance_factor=None, data_root=str(tmp_path))
    assert data.train.labels.tolist() == [3, 0, 2, 1, 3]  # json order kept, labels as written
    assert all(int(p.split("/")[2]) == y for p, y in zip(data.train.paths, data.train.labels.tolist()))
    assert data.class_names == ("Aves/0", "Aves/1", "Insecta/2", "Plantae/3") and data.class_counts == (1, 1, 1, 2)
    _write(tmp_path / "iNaturalist18_train.txt", "\n".join([*lines, "train_val2018/Aves/0/ff.jpg 3"]) + "\n")
    with pytest.raises(HarnessError, match="label 3 names two class folders"):
        INAT2018.build(imbalance_factor=None, data_root=str(tmp_path))


@pytest.mark.parametrize("kwargs, fragment", [
    ({"imbalance_factor": 100.0}, "fixes the imbalance factor at 50.5 (101 / 2 images); pass --if 50.5"),
    ({"imbalance_factor": None, "profile": "ldam-seed0"}, "one profile, 'first-n'"),
    ({"imbalance_factor": None, "n_max": 500}, "fixes n_max at 101"),
    ({"imbalance_factor": None, "download": True}, "cannot be downloaded"),
])
def test_refusals_are_one_line(trees, kwargs, fragment):
    with pytest.raises(HarnessError, match=fragment.replace("(", r"\(").replace(")", r"\)")) as error:
        IMAGENETLT.build(data_root=trees["imagenetlt"]["root"], **kwargs)
    assert "\n" not in str(error.value)


def test_the_printed_imbalance_factor_is_accepted():
    """101 / 3 is printed (and asked for) as 33.6667: that value must pass, a visibly different one must not."""
    from harness.datasets.large_lt import LAYOUTS, check_request

    layout = next(iter(LAYOUTS.values()))
    counts = (101, 40, 3)
    assert check_request(layout, counts, 33.6667, None, "first-n", False, 0) == 101 / 3
    with pytest.raises(HarnessError, match="pass --if 33.6667"):
        check_request(layout, counts, 33.67, None, "first-n", False, 0)


def test_missing_lists_name_the_release_and_inat_has_no_val(tmp_path, trees):
    with pytest.raises(HarnessError, match="ImageNet_LT_train.txt.*OLTR's release"):
        IMAGENETLT.build(imbalance_factor=None, data_root=str(tmp_path))
    with pytest.raises(HarnessError, match="needs --data-root"):
        IMAGENETLT.build(imbalance_factor=None, data_root=None)
    with pytest.raises(HarnessError, match="no validation list"):
        INAT2018.build(imbalance_factor=None, data_root=trees["inat2018"]["root"], val_per_class=1)


def test_test_per_class_keeps_the_first_lines_of_each_class(trees):
    data = IMAGENETLT.build(imbalance_factor=None, data_root=trees["imagenetlt"]["root"], test_per_class=1,
                            val_per_class=1)
    lines = Path(trees["imagenetlt"]["lists"]["test"]["file"]).read_text().splitlines()
    first = {}
    for line in lines:
        path, label = line.split()
        first.setdefault(int(label), path)
    assert data.test.paths == tuple(first[c] for c in sorted(first)) and len(data.val) == 6


def test_verify_reports_a_missing_and_a_truncated_jpeg(tmp_path, capsys):
    summary = write_fake_large_lt(tmp_path / "tree", "placeslt", train_counts=[6, 3, 2], image_size=(32, 24))
    root = Path(summary["root"])
    code, out, _ = run_cli(["data", "verify", "placeslt", "--data-root", str(root)], capsys)
    assert code == 0 and "OK: every checked image exists and decodes" in out
    train = [line.split()[0] for line in (root / LIST_NAMES["placeslt"]["train"]).read_text().splitlines()]
    (root / train[1]).unlink()
    blob = (root / train[4]).read_bytes()
    (root / train[4]).write_bytes(blob[: len(blob) // 2])
    code, out, _ = run_cli(["data", "verify", "placeslt", "--data-root", str(root)], capsys)
    assert code == 1
    assert f"missing: {train[1]}" in out and f"unreadable: {train[4]}: OSError" in out and "truncated" in out.lower()
    assert "train (Places_LT_train.txt): 11 lines, 11 checked, 1 missing, 1 unreadable" in out
    assert "many/medium/few = 0 / 0 / 3" in out
    code, out, _ = run_cli(["data", "verify", "placeslt", "--data-root", str(root), "--limit", "1"], capsys)
    assert code == 0 and "11 lines, 1 checked" in out


def test_verify_refuses_without_lists_and_for_in_memory_datasets(tmp_path, capsys):
    code, _, err = run_cli(["data", "verify", "inat2018", "--data-root", str(tmp_path)], capsys)
    assert code == 2 and "iNaturalist18_train.txt" in err and "gen_lists.py" in err
    code, _, err = run_cli(["data", "verify", "cifar10lt", "--data-root", str(tmp_path)], capsys)
    assert code == 2 and "no image files to verify" in err


@pytest.mark.parametrize("name", sorted(SPECS))
def test_data_info_prints_the_summary(trees, name, capsys):
    code, out, err = run_cli(["data", "info", name, "--data-root", trees[name]["root"]], capsys)
    assert code == 0, err
    assert f"{name} IF 50.5" in out and "'many': 1, 'medium': 2, 'few': 3" in out and "manifest_hash" in out


def _index_images(split: FileSplit):
    """load_rgb stand-in: a 2x2 image whose red/green values encode the path's position in the split."""
    position = {str(split.root / p): i for i, p in enumerate(split.paths)}
    return lambda path: Image.new("RGB", (2, 2), (position[path] % 256, position[path] // 256, 0))


def test_file_feeder_labels_belong_to_the_paths_it_read(trees, monkeypatch):
    data = IMAGENETLT.build(imbalance_factor=None, data_root=trees["imagenetlt"]["root"])
    monkeypatch.setattr("harness.file_feeder.load_rgb", _index_images(data.train))
    feeder = FileFeeder(data.train, transforms.PILToTensor(), batch_size=32, device=torch.device("cpu"))
    balanced = lambda labels, g: torch.multinomial(torch.ones(len(labels)), len(labels), True, generator=g)  # noqa
    for draw in (None, balanced):
        images, labels = map(torch.cat, zip(*feeder.epoch(3, draw)))
        read = images[:, 0, 0, 0].long() + 256 * images[:, 1, 0, 0].long()  # which file each sample came from
        assert torch.equal(labels, data.train.labels[read])
        if draw is None:
            assert sorted(read.tolist()) == list(range(len(data.train)))  # every image once
    assert len(feeder) == -(-245 // 32)


def test_file_feeder_replays_an_epoch_with_any_worker_count(trees):
    data = IMAGENETLT.build(imbalance_factor=None, data_root=trees["imagenetlt"]["root"])
    split = FileSplit(data.train.root, data.train.paths[:40], data.train.labels[:40], crop=16)
    transform = IMAGENETLT.augmentations.per_file("randaugment", data.mean, data.std, 16)

    def epoch(seed: int, workers: int) -> list:
        return list(FileFeeder(split, transform, 16, torch.device("cpu"), workers).epoch(seed))

    first = epoch(5, 0)
    assert first[0][0].shape == (16, 3, 16, 16) and first[-1][0].shape == (8, 3, 16, 16)
    for other in (epoch(5, 0), epoch(5, 2)):  # same seed: same order, same crops, same RandAugment draws
        assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(first, other))
    assert not torch.equal(first[0][0], epoch(6, 0)[0][0])


def test_eval_batches_resize_and_centre_crop_in_list_order(trees):
    data = PLACESLT.build(imbalance_factor=None, data_root=trees["placeslt"]["root"])
    split = FileSplit(data.test.root, data.test.paths, data.test.labels, crop=16)
    batches = list(file_eval_batches(split, data.mean, data.std, torch.device("cpu"), batch_size=8))
    assert [b.shape[0] for b in batches] == [8, 8, 2] and batches[0].shape[1:] == (3, 16, 16)
    with Image.open(split.root / split.paths[9]) as img:
        expected = transforms.Compose([transforms.Resize(18), transforms.CenterCrop(16), transforms.ToTensor(),
                                       transforms.Normalize(data.mean, data.std)])(img.convert("RGB"))
    assert torch.equal(batches[1][1], expected)  # round(16 * 256 / 224) = 18, as 256 is to 224


def test_feeder_dispatch_and_loader_refusals(trees):
    data = IMAGENETLT.build(imbalance_factor=None, data_root=trees["imagenetlt"]["root"])
    cpu, aug = torch.device("cpu"), IMAGENETLT.augmentations
    feeder = make_file_feeder(data.train, aug, "autoaugment", data.mean, data.std, 8, cpu, "auto")
    assert isinstance(feeder, FileFeeder)
    assert any(isinstance(t, NCLRandAugment) for t in feeder.dataset.transform.transforms)  # autoaugment = NCL's
    places = PLACESLT.augmentations.per_file("autoaugment", data.mean, data.std, 224).transforms
    assert any(isinstance(t, transforms.ColorJitter) for t in places)
    assert not any(isinstance(t, NCLRandAugment) for t in places)
    with pytest.raises(HarnessError, match="data.loader=dali .*(not installed|needs train.device=cuda)"):
        make_file_feeder(data.train, aug, "basic", data.mean, data.std, 8, cpu, "auto", loader="dali")
    with pytest.raises(HarnessError, match="fast_path=on needs an in-memory dataset"):
        make_file_feeder(data.train, aug, "basic", data.mean, data.std, 8, cpu, "on")
    with pytest.raises(HarnessError, match="data.augment=autoaug2"):
        make_file_feeder(data.train, aug, "autoaug2", data.mean, data.std, 8, cpu, "auto")
    with pytest.raises(HarnessError, match="data.loader=nvjpeg"):
        FileLoading("nvjpeg")


@pytest.mark.slow  # ~10 s alone (MLflow store, two evaluations); more on a busy machine
def test_run_method_end_to_end_on_a_generated_tree(tmp_path, capsys, harness_home, monkeypatch, one_torch_thread):
    from harness.tracking import Tracker

    tree = write_fake_large_lt(tmp_path / "tree", "imagenetlt", train_counts=[12, 6, 3], image_size=(40, 30))
    # Stands for `--set data.image_size=32` (a DataConfig key not declared yet): 32 px crops keep the test fast.
    monkeypatch.setattr("harness.runner.file_loading", lambda data_config: FileLoading(image_size=32))
    code, out, err = run_cli(["run", "method", "--method", "ce", "--dataset", "imagenetlt", "--data-root",
                              tree["root"], "--if", "4", "--epochs", "1", "--set", "method.depth=8",
                              "--set", "optim.batch_size=8"], capsys)
    assert code == 0, err
    assert "ce on imagenetlt IF 4" in out
    (run,) = [row for _, row in Tracker().search().iterrows()]
    assert run["status"] == "FINISHED" and run["metrics.val/top1"] >= 0 and run["metrics.test/top1"] >= 0
    details = Tracker().load_arrays(run["run_id"], "eval_details.npz")
    assert details["class_counts"].tolist() == tree["train_counts"]


def test_ncl_randaugment_op_frequencies_and_magnitude_ranges():
    """NCL/PaCo's timm RandAugment rand-n2-m10-mstd0.5 (large-scale-lt.md 2.2): 2 ops per image drawn uniformly from
    15 with replacement, each applied with p = 0.5, magnitude min(10, max(0, N(10, 0.5)))."""
    torch.manual_seed(0)
    augment, image, calls = NCLRandAugment(), Image.new("RGB", (8, 8), (120, 60, 30)), 3000
    augment.record = []
    for _ in range(calls):
        augment(image)
    record = augment.record
    per_image = len(record) / calls  # binomial(2, 0.5): mean 1, sd 0.707 / sqrt(3000) = 0.013
    assert abs(per_image - 1.0) < 0.05
    counts = torch.tensor([sum(1 for r in record if r[0] == name) for name in RA_OP_NAMES], dtype=torch.float)
    assert len(RA_OP_NAMES) == 15 and counts.min() > 0
    assert abs(counts / len(record) - 1 / 15).max() < 0.025  # sd of each share about 0.0046
    magnitudes = torch.tensor([m for _, m, _ in record])
    assert magnitudes.max() == 10.0 and magnitudes.min() >= 0
    # E[min(10, 10 + 0.5 Z)] = 10 - 0.5 * phi(0) = 10 - 0.5 / sqrt(2 pi) = 9.8005; half the draws clip at 10
    assert abs(magnitudes.mean() - (10 - 0.5 / (2 * torch.pi) ** 0.5)) < 0.02
    assert abs((magnitudes == 10).float().mean() - 0.5) < 0.05
    values = {name: [v for n, _, v in record if n == name] for name in RA_OP_NAMES}
    assert max(abs(v) for v in values["Rotate"]) <= 30 and min(values["Rotate"]) < 0 < max(values["Rotate"])
    assert max(abs(v) for v in values["ShearX"]) <= 0.3 and max(abs(v) for v in values["TranslateYRel"]) <= 0.45
    enhance = values["Color"] + values["Contrast"] + values["Brightness"] + values["Sharpness"]
    assert min(enhance) >= 0.1 and max(enhance) == pytest.approx(1.9)  # 1.8 * m / 10 + 0.1, unsigned
    assert set(values["Posterize"]) <= {3, 4} and set(values["Solarize"]) <= set(range(200, 257))
    assert max(values["SolarizeAdd"]) == 110
