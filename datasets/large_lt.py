"""ImageNet-LT, iNaturalist 2018 and Places-LT, read from their standard list files and image folders.

One list line is `<path relative to the data root> <integer label>` (OLTR/classifier-balancing `LT_Dataset`, RIDE,
PaCo, SADE; large-scale-lt.md section 1.1). The data root is the folder that holds the image folders (`train/`,
`val/`, `data_256/`, `val_256/`, `train_val2018/`); the lists sit there or in the sub-folder their public mirrors use
(`ImageNet_LT/`, `Places_LT/`, `iNaturalist18/`). Labels are the lists' integers, never remapped (iNat:
label = category_id = the image's folder name). Class counts come from the train list, the shot groups from those.

The class profile is the dataset's own: `--if` must be the train list's max/min (ImageNet-LT 256, Places-LT 996,
iNat 500), or omitted where a command allows it. Re-sampling these benchmarks to another imbalance factor would make
numbers comparable to no paper, so it is refused. Splits: train = the train list; test = the test list (iNat: the
val list, as LT papers do; val2018 has no other held-out labels); val = the val list (ImageNet-LT, Places-LT; the
model-selection split, logged, never used to select), none for iNat.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch

from harness.data import Augmentations, DatasetSpec, FileSplit, LTData, shot_groups
from harness.datasets.large_augment import GPU_DECODABLE, LARGE_AUGMENTS
from harness.errors import HarnessError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INAT_MEAN = (0.466, 0.471, 0.380)  # RIDE/NCL/PaCo iNat statistics
INAT_STD = (0.195, 0.194, 0.192)
PROFILE = "first-n"  # the only profile: every line of the list, in file order (n_c = the list's own count)


def _class_after(prefix_parts: int, path: str) -> str:
    """The class folder(s) of a path: what lies between the first `prefix_parts` folders and the file name."""
    return "/".join(path.split("/")[prefix_parts:-1])


def places_class(path: str) -> str:
    """`data_256/a/apartment_building/outdoor/x.jpg` (OLTR) -> `apartment_building/outdoor`;
    `train/apartment_building-outdoor/x.jpg` (easyformat) -> `apartment_building-outdoor`."""
    return _class_after(2 if path.startswith("data_256/") else 1, path)


@dataclass(frozen=True)
class ListLayout:
    """One dataset's list files: names, where they may sit, which is which split, and how a path names its class."""

    dataset: str
    title: str
    lists: dict[str, str]  # split -> list file name ("train", "val", "test")
    folders: tuple[str, ...]  # searched in order under the data root ("" = the root itself)
    test: str  # the list that is the test split
    val: str | None  # the list that is the validation split (None: no held-out list besides the test one)
    class_name: Callable[[str], str]  # relative path -> class name
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    images: str  # the image folders the root must hold, for messages
    source: str  # where the lists come from, for messages
    default_augment: str  # what the harness-wide default augment ("autoaugment") means here
    published: dict[str, int] = field(default_factory=dict)  # the real lists' facts (large-scale-lt.md 1.5)


LAYOUTS: dict[str, ListLayout] = {
    "imagenetlt": ListLayout(
        "imagenetlt", "ImageNet-LT",
        {"train": "ImageNet_LT_train.txt", "val": "ImageNet_LT_val.txt", "test": "ImageNet_LT_test.txt"},
        ("", "ImageNet_LT"), "test", "val", partial(_class_after, 1), IMAGENET_MEAN, IMAGENET_STD,
        "ILSVRC-2012 train/<wnid>/ and val/<wnid>/ (the val images sorted into wnid folders)",
        "OLTR's release (github.com/zhmiao/OpenLongTailRecognition-OLTR), mirrored in facebookresearch/"
        "classifier-balancing data/ImageNet_LT/",
        "randaugment", {"classes": 1000, "train": 115_846, "val": 20_000, "test": 50_000, "max": 1280, "min": 5}),
    "placeslt": ListLayout(
        "placeslt", "Places-LT",
        {"train": "Places_LT_train.txt", "val": "Places_LT_val.txt", "test": "Places_LT_test.txt"},
        ("", "Places_LT"), "test", "val", places_class, IMAGENET_MEAN, IMAGENET_STD,
        "Places365-Standard 256x256: data_256/ and val_256/ (OLTR lists) or train/ and val/ (easyformat lists)",
        "OLTR's release (github.com/zhmiao/OpenLongTailRecognition-OLTR; easyformat lists in facebookresearch/"
        "classifier-balancing data/Places_LT/)",
        "colorjitter", {"classes": 365, "train": 62_500, "val": 7_300, "test": 36_500, "max": 4980, "min": 5}),
    "inat2018": ListLayout(
        "inat2018", "iNaturalist 2018",
        {"train": "iNaturalist18_train.txt", "val": "iNaturalist18_val.txt"},
        ("", "iNaturalist18"), "val", None, partial(_class_after, 1), INAT_MEAN, INAT_STD,
        "train_val2018/<super-category>/<category_id>/ (train_val2018.tar.gz, visipedia/inat_comp 2018)",
        "classifier-balancing's gen_lists.py over train2018.json/val2018.json (facebookresearch/classifier-balancing "
        "data/iNaturalist18/)",
        "randaugment", {"classes": 8142, "train": 437_513, "val": 24_426, "max": 1000, "min": 2}),
}


def find_lists(layout: ListLayout, root: Path) -> dict[str, Path]:
    """split -> list file: the first of the layout's folders under `root` that holds every list."""
    for folder in layout.folders:
        where = root / folder
        if all((where / name).is_file() for name in layout.lists.values()):
            return {split: where / name for split, name in layout.lists.items()}
    names = ", ".join(layout.lists.values())
    places = " or ".join(str(root / f) if f else str(root) for f in layout.folders)
    raise HarnessError(f"{layout.title} list files not found: expected {names} in {places}; they come from "
                       f"{layout.source}; the data root must also hold {layout.images}")


@lru_cache(maxsize=8)
def _read_list(path: str, stamp: tuple[int, int]) -> tuple[tuple[str, ...], np.ndarray, str]:
    # `stamp` (size, mtime) keys the cache so a rewritten list is read again.
    del stamp
    blob = Path(path).read_bytes()
    paths, labels = [], []
    for number, line in enumerate(blob.decode("utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit() or int(fields[1]) < 0:
            raise HarnessError(f"{path}:{number}: expected '<relative path> <label>' with a label >= 0, got "
                               f"{line.strip()[:80]!r}; is it a list file of this dataset?")
        paths.append(fields[0])
        labels.append(int(fields[1]))
    if not paths:
        raise HarnessError(f"{path} holds no samples; download the list file again")
    return tuple(paths), np.asarray(labels, dtype=np.int64), hashlib.sha256(blob).hexdigest()


def read_list(path: Path) -> tuple[tuple[str, ...], np.ndarray, str]:
    """(relative paths, int64 labels, sha256 of the file) of one list file, in file order."""
    stat = path.stat()
    return _read_list(str(path.resolve()), (stat.st_size, stat.st_mtime_ns))


def class_counts_of(labels: np.ndarray, layout: ListLayout, list_name: str) -> tuple[int, ...]:
    """Training images per class; labels must run 0..C-1 with every class present (all three lists do)."""
    counts = np.bincount(labels)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise HarnessError(f"{list_name}: labels run to {len(counts) - 1} but {len(empty)} classes have no "
                           f"training image (first: {empty[0]}); {layout.title} lists label every class 0..C-1")
    return tuple(int(n) for n in counts)


def class_names_of(paths: tuple[str, ...], labels: np.ndarray, layout: ListLayout, list_name: str
                   ) -> tuple[str, ...]:
    """Each label's class folder, from the train list; one folder per label, or the list does not fit the layout."""
    names: dict[int, str] = {}
    for path, label in zip(paths, labels.tolist()):
        name = layout.class_name(path)
        if names.setdefault(label, name) != name:
            raise HarnessError(f"{list_name}: label {label} names two class folders ({names[label]!r} and "
                               f"{name!r}); the list does not match the {layout.title} layout")
    return tuple(names[c] for c in range(len(names)))


def first_per_class(labels: np.ndarray, k: int, num_classes: int, list_name: str) -> np.ndarray:
    """Positions of the first k lines of each class, in file order (0: every line)."""
    if k <= 0:
        return np.arange(len(labels))
    counts = np.bincount(labels, minlength=num_classes)
    if counts.min() < k:
        raise HarnessError(f"{list_name}: class {int(counts.argmin())} has {int(counts.min())} lines, fewer than "
                           f"the {k} per class asked for")
    rank = np.zeros(len(labels), dtype=np.int64)
    seen = np.zeros(num_classes, dtype=np.int64)
    for i, label in enumerate(labels.tolist()):
        rank[i], seen[label] = seen[label], seen[label] + 1
    return np.flatnonzero(rank < k)


def check_request(layout: ListLayout, counts: tuple[int, ...], imbalance_factor: float | None, n_max: int | None,
                  profile: str, download: bool, val_per_class: int) -> float:
    """The list's own imbalance factor; anything that asks for another profile is refused with one line."""
    native = max(counts) / min(counts)
    if profile != PROFILE:
        raise HarnessError(f"{layout.dataset} has one profile, '{PROFILE}' (every list line); got '{profile}'")
    # the factor as printed (6 significant digits, `:g`) is accepted: 101 / 3 is passed as --if 33.6667
    if imbalance_factor is not None and abs(imbalance_factor - native) > 5e-6 * native:
        raise HarnessError(f"{layout.dataset}: its train list fixes the imbalance factor at {native:g} "
                           f"({max(counts)} / {min(counts)} images); pass --if {native:g} (re-sampling the "
                           "benchmark to another factor is not supported)")
    if n_max is not None and n_max != max(counts):
        raise HarnessError(f"{layout.dataset}: its train list fixes n_max at {max(counts)}; drop --n-max / "
                           "data.n_max or set it to that")
    if download:
        raise HarnessError(f"{layout.title} cannot be downloaded by the harness: get {layout.images} and the lists "
                           f"from {layout.source}, then pass --data-root")
    if layout.val is None and val_per_class > 0:
        raise HarnessError(f"{layout.title} has no validation list apart from its test list; "
                           "set data.val_per_class=0")
    return native


def build_large_lt(dataset: str, *, imbalance_factor: float | None, profile: str = PROFILE, n_max: int | None = None,
                   data_root: str | None = None, download: bool = False, data_seed: int = 0,
                   val_per_class: int = 0, test_per_class: int = 0) -> LTData:
    """Splits of one list-file dataset (module docstring). `val_per_class`/`test_per_class` > 0 keep the first k
    lines of each class of the val/test list (CPU demos); 0 keeps every line. `data_seed` is unused (no draw)."""
    layout = LAYOUTS[dataset]
    if not data_root:
        raise HarnessError(f"{dataset} needs --data-root DIR: the folder holding {layout.images}, with the list "
                           f"files from {layout.source}")
    root = Path(data_root).expanduser().resolve()
    lists = find_lists(layout, root)
    parsed = {split: read_list(path) for split, path in lists.items()}
    train_paths, train_labels, _ = parsed["train"]
    counts = class_counts_of(train_labels, layout, lists["train"].name)
    native = check_request(layout, counts, imbalance_factor, n_max, profile, download, val_per_class)
    num_classes = len(counts)
    for split, (_, labels, _) in parsed.items():
        if labels.max() >= num_classes:
            raise HarnessError(f"{lists[split].name}: label {int(labels.max())} has no training images "
                               f"(the train list has {num_classes} classes)")

    def split_of(name: str, per_class: int) -> tuple[FileSplit, int]:
        paths, labels, _ = parsed[name]
        keep = first_per_class(labels, per_class, num_classes, lists[name].name)
        chosen = tuple(paths[i] for i in keep) if len(keep) < len(paths) else paths
        return FileSplit(root, chosen, torch.from_numpy(labels[keep].copy())), len(keep)

    test, num_test = split_of(layout.test, test_per_class)
    val, num_val = split_of(layout.val, val_per_class) if layout.val else (None, 0)
    train = FileSplit(root, train_paths, torch.from_numpy(train_labels.copy()))
    groups = shot_groups(counts)
    manifest = {
        "builder": f"datasets.large_lt.build_{dataset}", "dataset": dataset, "profile": PROFILE,
        "imbalance_factor": native, "n_max": max(counts), "n_min": min(counts), "num_classes": num_classes,
        "class_counts": list(counts), "groups": {k: len(v) for k, v in groups.items()},
        "num_train": len(train), "num_val": num_val, "num_test": num_test,
        "val_list": lists[layout.val].name if layout.val else None, "test_list": lists[layout.test].name,
        "val_per_class": int(val_per_class), "test_per_class": int(test_per_class),
        "lists_sha256": {path.name: parsed[split][2] for split, path in lists.items()},
        "source": str(root),
    }
    return LTData(name=dataset, train=train, test=test, class_counts=counts,
                  class_names=class_names_of(train_paths, train_labels, layout, lists["train"].name),
                  mean=layout.mean, std=layout.std, manifest=manifest, val=val)


def _build(dataset: str):
    def build(*, imbalance_factor: float | None, profile: str = PROFILE, n_max: int | None = None,
              data_root: str | None = None, download: bool = False, data_seed: int = 0, val_per_class: int = 0,
              test_per_class: int = 0) -> LTData:
        return build_large_lt(dataset, imbalance_factor=imbalance_factor, profile=profile, n_max=n_max,
                              data_root=data_root, download=download, data_seed=data_seed,
                              val_per_class=val_per_class, test_per_class=test_per_class)

    build.__name__ = f"build_{dataset}"
    build.__doc__ = (f"{LAYOUTS[dataset].title} from its list files under --data-root "
                     "(`datasets.large_lt.build_large_lt`); imbalance_factor None or the list's own.")
    return build


def _per_file(dataset: str):
    def per_file(augment: str, mean, std, crop: int):
        """The training transform of a file-backed split (`datasets.large_augment`); `autoaugment`, the
        harness-wide default, is this dataset's recipe (randaugment for ImageNet-LT/iNat, colorjitter for Places)."""
        name = LAYOUTS[dataset].default_augment if augment == "autoaugment" else augment
        if name not in LARGE_AUGMENTS:
            raise HarnessError(f"data.augment={augment}: {dataset} knows {', '.join(LARGE_AUGMENTS)} (and "
                               f"autoaugment = {LAYOUTS[dataset].default_augment})")
        return LARGE_AUGMENTS[name](crop, mean, std)

    return per_file


def _no_memory_pipeline(augment: str, mean, std):
    raise HarnessError("this dataset is file-backed: its images are fed by harness.file_feeder, not from memory")


def _spec(dataset: str, description: str) -> DatasetSpec:
    from harness.datasets.large_verify import verify_large  # its own module: PIL checks and the report

    layout = LAYOUTS[dataset]
    return DatasetSpec(
        name=dataset, num_classes=layout.published["classes"], default_n_max=layout.published["max"],
        profiles=(PROFILE,), build=_build(dataset), description=description, fixed_profile=True,
        augmentations=Augmentations(per_image=_no_memory_pipeline, per_file=_per_file(dataset),
                                    gpu_decodable=GPU_DECODABLE),
        verify=partial(verify_large, layout))


IMAGENETLT = _spec("imagenetlt", "ImageNet-LT (OLTR lists: 115,846 / 20,000 / 50,000 images, IF 256), file-backed")
INAT2018 = _spec("inat2018", "iNaturalist 2018 (437,513 train / 24,426 val = test images, IF 500), file-backed")
PLACESLT = _spec("placeslt", "Places-LT (OLTR lists: 62,500 / 7,300 / 36,500 images, IF 996), file-backed")
