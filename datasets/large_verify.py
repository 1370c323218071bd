"""`harness data verify`: does every list line of a list-file dataset point at an image that exists and decodes?

Each image is opened, `Image.verify()`-ed (container structure), then decoded at 1/8 scale with `draft()`: JPEG's
DCT-domain downscale still reads every entropy-coded byte, so a truncated file fails ("image file is truncated")
at a fraction of a full decode's cost. Files are checked in a thread pool: Pillow releases the GIL while decoding.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from harness.data import shot_groups
from harness.errors import HarnessError

SHOWN = 20  # problems listed per kind and split; the rest are counted


def check_image(path: str) -> str | None:
    """None if `path` exists and decodes, else why not: "missing", or the decoder's error in one line."""
    if not os.path.isfile(path):
        return "missing"
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            img.draft("RGB", (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
            img.load()
    except Exception as error:  # PIL raises many types for damaged files; each is "unreadable"
        return f"{type(error).__name__}: {str(error)[:80]}"
    return None


@dataclass(frozen=True)
class SplitCheck:
    """One list's result: lines in the list, lines checked, and the problems (path, reason) found."""

    split: str
    list_file: str
    lines: int
    checked: int
    problems: tuple[tuple[str, str], ...]

    @property
    def missing(self) -> list[str]:
        return [path for path, why in self.problems if why == "missing"]

    @property
    def unreadable(self) -> list[tuple[str, str]]:
        return [(path, why) for path, why in self.problems if why != "missing"]


@dataclass(frozen=True)
class VerifyReport:
    dataset: str
    root: str
    lists_dir: str
    splits: tuple[SplitCheck, ...]
    class_counts: tuple[int, ...]

    @property
    def ok(self) -> bool:
        return not any(check.problems for check in self.splits)

    def as_dict(self) -> dict[str, Any]:
        groups = {k: len(v) for k, v in shot_groups(self.class_counts).items()}
        return {"dataset": self.dataset, "root": self.root, "lists_dir": self.lists_dir, "ok": self.ok,
                "num_classes": len(self.class_counts), "groups": groups,
                "splits": [{**asdict(c), "problems": [list(p) for p in c.problems]} for c in self.splits]}

    def lines(self) -> list[str]:
        groups = shot_groups(self.class_counts)
        out = [f"{self.dataset}: data root {self.root}, lists in {self.lists_dir}",
               f"classes {len(self.class_counts)}; train counts max {max(self.class_counts)} / min "
               f"{min(self.class_counts)}; many/medium/few = {len(groups['many'])} / {len(groups['medium'])} / "
               f"{len(groups['few'])}"]
        for check in self.splits:
            missing, unreadable = check.missing, check.unreadable
            out.append(f"{check.split} ({check.list_file}): {check.lines} lines, {check.checked} checked, "
                       f"{len(missing)} missing, {len(unreadable)} unreadable")
            out += [f"  missing: {path}" for path in missing[:SHOWN]]
            if len(missing) > SHOWN:
                out.append(f"  ... and {len(missing) - SHOWN} more missing")
            out += [f"  unreadable: {path}: {why}" for path, why in unreadable[:SHOWN]]
            if len(unreadable) > SHOWN:
                out.append(f"  ... and {len(unreadable) - SHOWN} more unreadable")
        out.append("OK: every checked image exists and decodes" if self.ok else "PROBLEMS found (listed above)")
        return out


def verify_large(layout: Any, *, data_root: str | None, limit: int = 0, workers: int = 0) -> VerifyReport:
    """Check the first `limit` lines of every list (0: all) of `layout` (a `datasets.large_lt.ListLayout`)."""
    from harness.datasets.large_lt import class_counts_of, find_lists, read_list

    if not data_root:
        raise HarnessError(f"harness data verify {layout.dataset} needs --data-root DIR (the folder holding "
                           f"{layout.images})")
    root = Path(data_root).expanduser().resolve()
    lists = find_lists(layout, root)
    workers = workers or min(16, os.cpu_count() or 1)
    checks = []
    counts: tuple[int, ...] = ()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for split, list_path in lists.items():
            paths, labels, _ = read_list(list_path)
            if split == "train":
                counts = class_counts_of(labels, layout, list_path.name)
            chosen = paths[:limit] if limit > 0 else paths
            reasons = pool.map(check_image, [str(root / p) for p in chosen], chunksize=64)
            problems = tuple((p, why) for p, why in zip(chosen, reasons) if why is not None)
            checks.append(SplitCheck(split, list_path.name, len(paths), len(chosen), problems))
    return VerifyReport(layout.dataset, str(root), str(lists["train"].parent), tuple(checks), counts)
