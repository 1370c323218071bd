"""Fashion-MNIST-LT: the real-data stand-in that works offline (Debian's `dataset-fashion-mnist` package).

The 28x28 grey images are zero-padded to 32x32 and repeated to 3 channels so CIFAR models and transforms run
unchanged. Long-tail profiles, counts and manifests are those of CIFAR-LT (`datasets._select`)."""

from __future__ import annotations

import gzip
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from harness.data import DatasetSpec, LTData
from harness.datasets._select import PROFILES, RawData, build_lt
from harness.datasets.augment import SMALL_IMAGE_AUGMENTATIONS
from harness.datasets.cifar_lt import DEFAULT_DATA_ROOT, check_profile
from harness.errors import HarnessError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
# Train images, train labels, test images, test labels; each may also be gzipped (".gz").
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
FMNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
# Measured once over all 60,000 padded training images (pixels / 255): the 28x28 mean 0.2860 scaled by
# 784/1024 for the zero border, and the population std over every pixel of the padded images.
FMNIST_MEAN = (0.2190, 0.2190, 0.2190)
FMNIST_STD = (0.3318, 0.3318, 0.3318)


def corrupt_file_error(path: Path, problem: str) -> HarnessError:
    """The one line for a damaged IDX file: which file, what is wrong, and how to get an intact copy."""
    return HarnessError(
        f"{path} is not a readable Fashion-MNIST IDX file ({problem}); reinstall the Debian package "
        "(`apt-get install --reinstall dataset-fashion-mnist`) or point --data-root at a folder with intact files"
    )


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (gzipped or not) of unsigned bytes into a read-only uint8 array of its stated shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            blob = f.read()
    except (OSError, EOFError, zlib.error) as error:  # a cut or damaged .gz fails while decompressing
        raise corrupt_file_error(path, f"{type(error).__name__}: {error}") from None
    # Header: two zero bytes, a type code (0x08 = uint8), the number of dims, then each dim as a big-endian uint32.
    if len(blob) < 4 or blob[:2] != b"\0\0" or blob[2] != 0x08 or len(blob) < 4 + 4 * blob[3]:
        raise corrupt_file_error(path, "no uint8 IDX header")
    ndim = blob[3]
    dims = tuple(int(d) for d in np.frombuffer(blob, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    expected, found = int(np.prod(dims)), len(blob) - offset
    if found != expected:
        which = "truncated" if found < expected else "too long"
        raise corrupt_file_error(path, f"{which}: the header says {dims}, {expected} bytes, the file has {found}")
    return np.frombuffer(blob, dtype=np.uint8, offset=offset).reshape(dims)


def find_fmnist_files(folder: Path) -> tuple[Path, ...] | None:
    """The four IDX files in `folder` or `folder/FashionMNIST/raw` (torchvision's layout), unpacked or .gz."""
    for where in (folder, folder / "FashionMNIST" / "raw"):
        found = []
        for stem in IDX_FILES:
            hits = [p for p in (where / stem, where / f"{stem}.gz") if p.is_file()]
            found.append(hits[0] if hits else None)
        if all(found):
            return tuple(found)
    return None


@lru_cache(maxsize=2)
def _load_files(paths: tuple[str, ...], stamp: tuple[tuple[int, int], ...]) -> RawData:
    # `stamp` (size, mtime) keys the cache so replaced files are read again.
    del stamp
    train_x, train_y, test_x, test_y = (read_idx(Path(p)) for p in paths)
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise HarnessError(f"Fashion-MNIST image and label files disagree in length in {Path(paths[0]).parent}")
    source = ", ".join(paths)
    return RawData(train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64), FMNIST_CLASSES, source)


def _download(root: Path) -> None:
    import torchvision.datasets  # only needed here; keeps `import datasets` light

    try:
        torchvision.datasets.FashionMNIST(str(root), train=True, download=True)
    except Exception as e:  # no network, proxy, disk: all end the same way for the user
        cause = (str(e).splitlines() or [""])[0]
        raise HarnessError(
            f"could not download Fashion-MNIST into {root} ({type(e).__name__}: {cause}); "
            "run `apt-get install dataset-fashion-mnist` or pass --data-root DIR holding the four IDX files"
        ) from None


def load_fmnist(data_root: str | None = None, download: bool = False) -> RawData:
    """Read Fashion-MNIST from `data_root`, else Debian's package files, else download it if `download`."""
    root = Path(data_root or DEFAULT_DATA_ROOT).expanduser()
    files = find_fmnist_files(root) or find_fmnist_files(DEBIAN_DIR)
    if files is None and download:
        _download(root)
        files = find_fmnist_files(root)
    if files is None:
        raise HarnessError(
            f"Fashion-MNIST not found in {root} or {DEBIAN_DIR}: run `apt-get install dataset-fashion-mnist`, "
            f"or pass --data-root DIR holding {', '.join(IDX_FILES)} (or .gz), or pass --download"
        )
    files = tuple(p.resolve() for p in files)
    stamp = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _load_files(tuple(str(p) for p in files), stamp)


def pad_to_rgb32(images: np.ndarray) -> np.ndarray:
    """(N, 28, 28) uint8 -> (N, 3, 32, 32): a 2-pixel zero border, then the grey channel repeated three times."""
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(padded[:, None], 3, axis=1)


def build_fmnistlt(
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
    """Fashion-MNIST-LT: n_c = int(n_max * IF^(-c/9)) training images of class c (n_max 500; IF 100 gives 1,236).

    Profiles, validation and test subsets work as in `datasets.cifar_lt.build_cifar100lt`; the pool holds 6,000
    training and 1,000 test images per class.
    """
    check_profile(profile)
    raw = load_fmnist(data_root, download)
    return build_lt(
        raw,
        dataset="fmnistlt",
        builder="datasets.fmnist_lt.build_fmnistlt",
        imbalance_factor=imbalance_factor,
        profile=profile,
        n_max=500 if n_max is None else n_max,
        data_seed=data_seed,
        val_per_class=val_per_class,
        test_per_class=test_per_class,
        mean=FMNIST_MEAN,
        std=FMNIST_STD,
        to_chw=pad_to_rgb32,
    )


FMNISTLT = DatasetSpec(
    name="fmnistlt",
    num_classes=10,
    default_n_max=500,
    profiles=PROFILES,
    augmentations=SMALL_IMAGE_AUGMENTATIONS,
    build=build_fmnistlt,
    description="Fashion-MNIST-LT (exponential profile, class 0 = head), padded to 3x32x32; offline via Debian",
    class_names=FMNIST_CLASSES,
)
