"""CIFAR-10-LT and CIFAR-100-LT read from the standard python pickles (torchvision layout), without md5 checks so
that fake folders written by `datasets.fake` load exactly like the real ones."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from harness.data import DatasetSpec, LTData
from harness.datasets._select import PROFILES, RawData, build_lt
from harness.datasets.augment import SMALL_IMAGE_AUGMENTATIONS
from harness.errors import HarnessError

# The official SHIKE code normalises CIFAR-100 with the CIFAR-10 statistics; we keep that for both datasets.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
DEFAULT_DATA_ROOT = "~/.cache/harness/data"
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


@dataclass(frozen=True)
class CifarLayout:
    """Where one CIFAR variant keeps its pickles and which keys hold labels and class names."""

    title: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: str
    names_key: str
    torchvision_class: str

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, self.test_file, self.meta_file)


LAYOUTS = {
    "cifar100": CifarLayout(
        "CIFAR-100", "cifar-100-python", ("train",), "test", "meta", "fine_labels", "fine_label_names", "CIFAR100"
    ),
    "cifar10": CifarLayout(
        "CIFAR-10",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        "labels",
        "label_names",
        "CIFAR10",
    ),
}


def find_cifar_folder(root: Path, layout: CifarLayout) -> Path | None:
    """The folder holding the pickles: `<root>/<inner folder>` or `root` itself; None if neither is complete."""
    for folder in (root / layout.folder, root):
        if all((folder / name).is_file() for name in layout.files):
            return folder
    return None


def corrupt_file_error(path: Path, layout: CifarLayout, problem: str) -> HarnessError:
    """The one line for a damaged pickle: which file, what is wrong, and how to get an intact copy."""
    return HarnessError(
        f"{path} is not a readable {layout.title} file ({problem}); delete {path.parent} and rerun with --download, "
        "or download the python version again from the official CIFAR page (www.cs.toronto.edu/~kriz/cifar.html)"
    )


def _read_pickle(path: Path, layout: CifarLayout) -> dict:
    # The files were pickled by Python 2; latin1 decodes their str keys and keeps the byte arrays intact.
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    except Exception as error:  # truncated or overwritten bytes fail in many ways; all mean "get the file again"
        raise corrupt_file_error(path, layout, f"{type(error).__name__}: {error}") from None
    if not isinstance(obj, dict):
        raise corrupt_file_error(path, layout, f"it holds a {type(obj).__name__}, not a dict")
    return obj


def _batch_arrays(path: Path, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 3072) uint8, labels (N,) int64) of one batch file, checked against each other."""
    batch = _read_pickle(path, layout)
    missing = [k for k in ("data", layout.label_key) if k not in batch]
    if missing:
        raise corrupt_file_error(path, layout, f"no {', '.join(missing)} entry")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch[layout.label_key], dtype=np.int64)
    if data.size != len(labels) * 3072:
        raise corrupt_file_error(path, layout, f"{data.size} pixel bytes for {len(labels)} labels")
    return data.reshape(-1, 3072), labels


def _read_batches(folder: Path, names: tuple[str, ...], layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    batches = [_batch_arrays(folder / name, layout) for name in names]
    images = np.concatenate([data for data, _ in batches]).reshape(-1, 3, 32, 32)
    labels = np.concatenate([labels for _, labels in batches])
    images.flags.writeable = False  # shared through the in-process cache
    labels.flags.writeable = False
    return images, labels


@lru_cache(maxsize=2)
def _load_folder(folder: str, kind: str, stamp: tuple[tuple[str, int, int], ...]) -> RawData:
    # `stamp` (name, size, mtime) keys the cache so a rewritten folder is read again; 2 entries bound memory.
    del stamp
    layout, path = LAYOUTS[kind], Path(folder)
    train_images, train_labels = _read_batches(path, layout.train_files, layout)
    test_images, test_labels = _read_batches(path, (layout.test_file,), layout)
    meta = _read_pickle(path / layout.meta_file, layout)
    if layout.names_key not in meta:
        raise corrupt_file_error(path / layout.meta_file, layout, f"no {layout.names_key} entry")
    names = tuple(str(n) for n in meta[layout.names_key])
    return RawData(train_images, train_labels, test_images, test_labels, names, str(path))


def _download(root: Path, layout: CifarLayout) -> None:
    import torchvision.datasets  # only needed here; keeps `import datasets` light

    try:
        getattr(torchvision.datasets, layout.torchvision_class)(str(root), train=True, download=True)
    except Exception as e:  # no network, proxy, disk: all end the same way for the user
        cause = (str(e).splitlines() or [""])[0]
        raise HarnessError(
            f"could not download {layout.title} into {root} ({type(e).__name__}: {cause}); "
            f"put the torchvision layout {root}/{layout.folder}/ there yourself and pass --data-root {root}"
        ) from None


def load_cifar(kind: str, data_root: str | None = None, download: bool = False) -> RawData:
    """Read CIFAR-10 (`kind="cifar10"`) or CIFAR-100 (`"cifar100"`) from `data_root`, downloading if asked."""
    layout = LAYOUTS[kind]
    root = Path(data_root or DEFAULT_DATA_ROOT).expanduser()
    folder = find_cifar_folder(root, layout)
    if folder is None and download:
        _download(root, layout)
        folder = find_cifar_folder(root, layout)
    if folder is None:
        expected = f"{root}/{layout.folder}/{{{','.join(layout.files)}}}"
        raise HarnessError(
            f"{layout.title} not found: expected the torchvision layout {expected}; "
            "pass --data-root DIR pointing at a folder that holds it, or --download to fetch it"
        )
    folder = folder.resolve()
    stamp = tuple((n, (folder / n).stat().st_size, (folder / n).stat().st_mtime_ns) for n in layout.files)
    return _load_folder(str(folder), kind, stamp)


def check_profile(profile: str) -> None:
    """Refuse an unknown profile before any file is read or downloaded (`build_lt` would only notice after)."""
    if profile not in PROFILES:
        raise HarnessError(f"unknown data profile '{profile}'; known profiles: {', '.join(PROFILES)}")


def _build(kind: str, dataset: str, default_n_max: int, **kw) -> LTData:
    check_profile(kw["profile"])
    raw = load_cifar(kind, kw.pop("data_root"), kw.pop("download"))
    n_max = kw.pop("n_max")
    return build_lt(
        raw,
        dataset=dataset,
        builder=f"datasets.cifar_lt.build_{dataset}",
        n_max=default_n_max if n_max is None else n_max,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        **kw,
    )


def build_cifar100lt(
    *,
    imbalance_factor: float,
    profile: str = "first-n",
    n_max: int | None = None,
    data_root: str | None = None,
    download: bool = False,
    data_seed: int = 0,
    val_per_class: int = 0,
    test_per_class: int = 0,
) -> LTData:
    """CIFAR-100-LT: n_c = int(n_max * IF^(-c/99)) training images of class c (n_max 500; IF 100 gives 10,847).

    profile "first-n" takes the first n_c images of each class in training-file order (official SHIKE code);
    "ldam-seed0" shuffles each class with RandomState(0) first (LDAM-DRW/RIDE/SADE/PaCo). `val_per_class` images
    per class are drawn (seeded by `data_seed`) from training-file images outside the LT subset; a class with
    too few such images gives up some of its LT images instead, lowering its count. The test set is the balanced
    test file, or its first `test_per_class` images of each class.
    """
    return _build(
        "cifar100", "cifar100lt", 500,
        imbalance_factor=imbalance_factor, profile=profile, n_max=n_max, data_root=data_root, download=download,
        data_seed=data_seed, val_per_class=val_per_class, test_per_class=test_per_class,
    )  # fmt: skip


def build_cifar10lt(
    *,
    imbalance_factor: float,
    profile: str = "first-n",
    n_max: int | None = None,
    data_root: str | None = None,
    download: bool = False,
    data_seed: int = 0,
    val_per_class: int = 0,
    test_per_class: int = 0,
) -> LTData:
    """CIFAR-10-LT: n_c = int(n_max * IF^(-c/9)) training images of class c (n_max 5000; IF 100 gives 12,406).

    Profiles, validation and test subsets work as in `build_cifar100lt`.
    """
    return _build(
        "cifar10", "cifar10lt", 5000,
        imbalance_factor=imbalance_factor, profile=profile, n_max=n_max, data_root=data_root, download=download,
        data_seed=data_seed, val_per_class=val_per_class, test_per_class=test_per_class,
    )  # fmt: skip


CIFAR100LT = DatasetSpec(
    name="cifar100lt",
    num_classes=100,
    default_n_max=500,
    profiles=PROFILES,
    augmentations=SMALL_IMAGE_AUGMENTATIONS,
    build=build_cifar100lt,
    description="CIFAR-100-LT (exponential profile, class 0 = head), torchvision pickles",
)
CIFAR10LT = DatasetSpec(
    name="cifar10lt",
    num_classes=10,
    default_n_max=5000,
    profiles=PROFILES,
    augmentations=SMALL_IMAGE_AUGMENTATIONS,
    build=build_cifar10lt,
    description="CIFAR-10-LT (exponential profile, class 0 = head), torchvision pickles",
    class_names=CIFAR10_CLASSES,
)
