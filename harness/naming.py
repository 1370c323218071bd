"""Names built in one place: experiments, runs and their checkpoint folders (mmpretrain's name shape)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from harness.config import RunConfig, flatten


def experiment_name(prefix: str, dataset: str, imbalance_factor: float) -> str:
    """`{table or method}-{dataset}-if{IF}`: one MLflow experiment per study."""
    return f"{prefix}-{dataset}-if{imbalance_factor:g}"


def run_name(key: str, dataset: str, imbalance_factor: float, seed: int) -> str:
    """`{row or method}-{dataset}-if{IF}-s{seed}`."""
    return f"{key}-{dataset}-if{imbalance_factor:g}-s{seed}"


def config_hash(cfg: RunConfig) -> str:
    return hashlib.sha256(json.dumps(flatten(cfg), sort_keys=True, default=str).encode()).hexdigest()[:12]


def checkpoint_dir(runs_root: Path, experiment: str, name: str, cfg: RunConfig) -> Path:
    """Where a run keeps its latest checkpoint and state file: keyed by experiment, run name and config hash, so a
    changed config never resumes from another config's checkpoint."""
    return runs_root / "checkpoints" / experiment.replace("/", "_") / f"{name}-{config_hash(cfg)}"
