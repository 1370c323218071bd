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


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for timing-sensitive modules: on a shared 2-core machine, OpenMP threads oversubscribed by
    other processes stall for seconds per step; results do not depend on it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
