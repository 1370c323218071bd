"""A run's tracking calls that could not reach the MLflow server, kept on disk in order until they are replayed.

One JSON-lines file per run, `<runs>/spool/<run_id>.jsonl`: a header line (run id, tracking URI) and then one
record per logging call (`{"op": "metrics", ...}`, `params`, `tags`, `text`, `file`, `end`). Files logged as
artifacts are copied next to it, into `<runs>/spool/<run_id>/`, because the originals may be temporary.
Only `harness.tracking` writes and replays spools; this module knows the file format and nothing of MLflow.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

Record = dict[str, Any]


class Spool:
    """The spool file of one run. Appends are flushed line by line, so a killed process loses no record."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.files = self.path.with_suffix("")  # folder for copied artifact files

    @classmethod
    def create(cls, folder: Path, run_id: str, tracking_uri: str) -> Spool:
        spool = cls(folder / f"{run_id}.jsonl")
        spool.path.parent.mkdir(parents=True, exist_ok=True)
        if not spool.path.exists():
            spool._write_lines([{"run_id": run_id, "tracking_uri": tracking_uri}], "w")
        return spool

    def append(self, record: Record) -> None:
        if record.get("op") == "file":
            record = {**record, "path": self._keep_copy(Path(record["path"]))}
        self._write_lines([record], "a")

    def read(self) -> tuple[Record, list[Record]]:
        """(header, records in the order they were logged)."""
        lines = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
        if not lines or "run_id" not in lines[0]:
            raise ValueError(f"{self.path} has no spool header line")
        return lines[0], lines[1:]

    def rewrite(self, header: Record, records: list[Record]) -> None:
        """Keep only `records` (those not yet delivered); atomic, so a crash mid-write keeps the old file."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in [header, *records])
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
        shutil.rmtree(self.files, ignore_errors=True)

    def _keep_copy(self, source: Path) -> str:
        # One numbered folder per copy: the artifact keeps its file name, and two files of one name can coexist.
        index = len(list(self.files.iterdir())) if self.files.is_dir() else 0
        target = self.files / f"{index:04d}" / source.name
        target.parent.mkdir(parents=True)
        shutil.copy2(source, target)
        return str(target)

    def _write_lines(self, records: list[Record], mode: str) -> None:
        with open(self.path, mode) as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
            f.flush()


def spool_files(folder: Path) -> list[Path]:
    """Every spool file under `folder`, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(folder.glob("*.jsonl"), key=lambda p: p.stat().st_mtime)
