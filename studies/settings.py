"""What the runs of a study share (data, preset, epochs, device, `--set` entries), resolved through the one config
path, `harness.config.resolve_config`, for each (method, seed, switches) a study asks for."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from harness.config import RunConfig, resolve_config


@dataclass(frozen=True)
class RunSettings:
    """Picklable, so worker processes (ablation `--workers`, tuning workers) resolve the same configs."""

    dataset: str
    imbalance_factor: float = 100.0
    preset: str = "shike-code"
    epochs: str | None = None  # "E" (total, split in the method's stage proportions) or "E1+E2"
    device: str | None = None
    data_root: str = ""
    download: bool = False
    overrides: tuple[str, ...] = ()  # `--set key=value` entries, applied last

    def config(self, method: str, seed: int | None = None, switches: Mapping[str, Any] | None = None) -> RunConfig:
        """defaults -> preset -> these flags -> `switches` (a table row's, a trial's) -> `overrides`."""
        return resolve_config(method, preset=self.preset, dataset=self.dataset,
                              imbalance_factor=self.imbalance_factor, seed=seed, epochs=self.epochs,
                              device=self.device, data_root=self.data_root or None, download=self.download,
                              switches=switches, overrides=list(self.overrides))

    def with_overrides(self, before: Iterable[str] = (), after: Iterable[str] = ()) -> RunSettings:
        """These settings with `--set` entries added before the user's (defaults they may change) or after them
        (settings they may not change)."""
        return replace(self, overrides=(*before, *self.overrides, *after))
