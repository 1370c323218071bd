"""Session-wide test settings: no telemetry, a private runs folder, two CPU threads."""

from __future__ import annotations

import os

import pytest
import torch

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "true"
os.environ.pop("MLFLOW_TRACKING_URI", None)
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def harness_home(tmp_path, monkeypatch):
    """A private runs folder (SQLite MLflow store, checkpoints) for one test."""
    home = tmp_path / "runs"
    monkeypatch.setenv("HARNESS_HOME", str(home))
    return home
