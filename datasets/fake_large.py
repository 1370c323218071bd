"""Fake ImageNet-LT, iNaturalist 2018 and Places-LT trees in the real layouts, for tests, demos and benchmarks.

`write_fake_large_lt(root, dataset, ...)` writes small JPEGs (a per-class colour plus noise; some greyscale, and for
ImageNet a CMYK one, as the real sets have) and the list files with their real names and line formats
(large-scale-lt.md section 1): ImageNet-LT `train/<wnid>/<wnid>_<n>.JPEG` (val list also from `train/`, test from
`val/<wnid>/ILSVRC2012_val_<n>.JPEG`), Places-LT `data_256/<letter>/<class>[/<sub>]/<n>.jpg` and
`val_256/Places365_val_<n>.jpg` (OLTR) or `train/<class>[-<sub>]/...` and `val/<class>/...` (easyformat), iNat
`train_val2018/<super-category>/<category_id>/<32 hex>.jpg` with label = category_id, lines in a shuffled (json)
order. Labels get their train counts through a seeded permutation (the real lists are not sorted by size). The same
arguments write the same bytes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

DATASETS = ("imagenetlt", "placeslt", "inat2018")
# Real Places365 names, alphabetical as the labels are; a slash marks the two-level classes.
PLACES_NAMES = ("airfield", "apartment_building/outdoor", "bakery/shop", "beach", "canyon", "church/indoor",
                "desert/sand", "field/wild", "kitchen", "library/indoor", "ocean", "temple/asia")
INAT_SUPERS = ("Aves", "Fungi", "Insecta", "Plantae")


def long_tail_profile(classes: int, n_max: int, n_min: int) -> list[int]:
    """Exponential counts from n_max down to n_min over `classes` classes (class order = head to tail)."""
    if classes == 1:
        return [n_max]
    ratio = n_max / n_min
    return [max(n_min, round(n_max * ratio ** (-c / (classes - 1)))) for c in range(classes)]


def _jpeg(rng: np.random.Generator, colour: np.ndarray, size: tuple[int, int], mode: str) -> bytes:
    w, h = size
    pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) // 2 + colour // 2
    image = Image.fromarray(pixels.astype(np.uint8), "RGB").convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


class _TreeWriter:
    """Writes one JPEG per requested path; image k of the tree is greyscale every 11th, CMYK once (ImageNet)."""

    def __init__(self, root: Path, classes: int, image_size: tuple[int, int], seed: int, cmyk: bool) -> None:
        self.root, self.image_size, self.cmyk = root, image_size, cmyk
        self.rng = np.random.default_rng(seed)
        self.colours = self.rng.integers(0, 256, size=(classes, 3), dtype=np.uint8)
        self.written = 0

    def write(self, relative: str, label: int) -> str:
        w, h = self.image_size
        size = (h, w) if self.written % 5 == 3 else (w, h)  # some portrait images
        mode = "L" if self.written % 11 == 5 else ("CMYK" if self.cmyk and self.written == 7 else "RGB")
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_jpeg(self.rng, self.colours[label], size, mode))
        self.written += 1
        return relative


def _write_list(path: Path, rows: list[tuple[str, int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{p} {label}\n" for p, label in rows))


def _imagenet(writer: _TreeWriter, counts: list[int], val: int, test: int) -> dict[str, list[tuple[str, int]]]:
    wnids = [f"n{1440764 + 1000 * c:08d}" for c in range(len(counts))]  # sorted, so label = index as in the real
    rows: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    serial = 1
    for label, (wnid, n) in enumerate(zip(wnids, counts)):
        for i in range(n + val):  # the val list's images come from the train folder too, disjoint from the train list
            split = "train" if i < n else "val"
            rows[split].append((writer.write(f"train/{wnid}/{wnid}_{10000 + i}.JPEG", label), label))
        for _ in range(test):
            rows["test"].append((writer.write(f"val/{wnid}/ILSVRC2012_val_{serial:08d}.JPEG", label), label))
            serial += 1
    return rows


def _places_name(c: int) -> str:
    return PLACES_NAMES[c] if c < len(PLACES_NAMES) else f"zz_class_{c:03d}"


def _places(writer: _TreeWriter, counts: list[int], val: int, test: int, layout: str
            ) -> dict[str, list[tuple[str, int]]]:
    rows: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    serial, number = 1, 1
    for label, n in enumerate(counts):
        name = _places_name(label)
        train_dir = f"data_256/{name[0]}/{name}" if layout == "oltr" else f"train/{name.replace('/', '-')}"
        for i in range(n + val):
            split = "train" if i < n else "val"
            rows[split].append((writer.write(f"{train_dir}/{number:08d}.jpg", label), label))
            number += 1
        for _ in range(test):
            stem = f"Places365_val_{serial:08d}.jpg"
            flat = f"val_256/{stem}" if layout == "oltr" else f"val/{name.replace('/', '-')}/{stem}"
            rows["test"].append((writer.write(flat, label), label))
            serial += 1
    return rows


def _inat(writer: _TreeWriter, counts: list[int], val: int, rng: np.random.Generator
          ) -> dict[str, list[tuple[str, int]]]:
    blocks = np.array_split(np.arange(len(counts)), min(len(INAT_SUPERS), len(counts)))
    supers = {int(c): INAT_SUPERS[b] for b, block in enumerate(blocks) for c in block}
    rows: dict[str, list[tuple[str, int]]] = {"train": [], "val": []}
    for category, n in enumerate(counts):
        for i in range(n + val):
            name = rng.bytes(16).hex()  # md5-like file names
            split = "train" if i < n else "val"
            rows[split].append((writer.write(f"train_val2018/{supers[category]}/{category}/{name}.jpg", category),
                                category))
    for split in rows:  # json order: not grouped by class
        rows[split] = [rows[split][i] for i in rng.permutation(len(rows[split]))]
    return rows


LIST_NAMES = {
    "imagenetlt": {"train": "ImageNet_LT_train.txt", "val": "ImageNet_LT_val.txt", "test": "ImageNet_LT_test.txt"},
    "placeslt": {"train": "Places_LT_train.txt", "val": "Places_LT_val.txt", "test": "Places_LT_test.txt"},
    "inat2018": {"train": "iNaturalist18_train.txt", "val": "iNaturalist18_val.txt"},
}


def write_fake_large_lt(root: str | Path, dataset: str, train_counts: list[int] | None = None, classes: int = 6,
                        n_max: int = 24, n_min: int = 2, val_per_class: int = 2, test_per_class: int = 3,
                        image_size: tuple[int, int] = (64, 48), places_layout: str = "oltr", lists_folder: str = "",
                        seed: int = 0) -> dict:
    """Write a fake `dataset` tree under `root` and return a summary: the train count of each label, the list
    files and the number of lines of each. `train_counts` (head to tail) defaults to an exponential profile of
    `classes` classes from `n_max` to `n_min`; labels receive them in a seeded permuted order. For iNat
    `test_per_class` is ignored: its val list (3 per class in the real one) has `val_per_class` lines per class and
    is the test split. `lists_folder` puts the lists in a sub-folder of `root` (e.g. `ImageNet_LT`)."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if places_layout not in ("oltr", "easyformat"):
        raise ValueError(f"places_layout must be oltr or easyformat, got {places_layout!r}")
    root, rng = Path(root), np.random.default_rng(seed)
    profile = list(train_counts) if train_counts is not None else long_tail_profile(classes, n_max, n_min)
    counts = [profile[i] for i in rng.permutation(len(profile))]  # label -> count
    writer = _TreeWriter(root, len(counts), image_size, seed + 1, cmyk=dataset == "imagenetlt")
    if dataset == "imagenetlt":
        rows = _imagenet(writer, counts, val_per_class, test_per_class)
    elif dataset == "placeslt":
        rows = _places(writer, counts, val_per_class, test_per_class, places_layout)
    else:
        rows = _inat(writer, counts, val_per_class, rng)
    lists = {}
    for split, name in LIST_NAMES[dataset].items():
        path = root / lists_folder / name
        _write_list(path, rows[split])
        lists[split] = {"file": str(path), "lines": len(rows[split])}
    return {"root": str(root), "dataset": dataset, "train_counts": counts, "lists": lists,
            "images": writer.written}
