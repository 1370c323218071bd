"""Where a local store keeps its artifacts: beside the SQLite file named by the tracking URI, never in the harness's
default runs folder (a user who points `--tracking-uri` at another folder expects everything there)."""

from __future__ import annotations

from pathlib import Path


def test_artifacts_go_beside_the_sqlite_file_of_the_tracking_uri(tmp_path, monkeypatch):
    from harness.tracking import Tracker

    monkeypatch.setenv("HARNESS_HOME", str(tmp_path / "home"))
    store = tmp_path / "elsewhere" / "m.db"
    tracker = Tracker(f"sqlite:///{store}")
    tracker.experiment_id("demo")
    location = tracker.client.get_experiment_by_name("demo").artifact_location
    assert location == (tmp_path / "elsewhere" / "artifacts" / "demo").as_uri()
    assert not (tmp_path / "home" / "runs" / "artifacts").exists()


def test_the_default_store_keeps_its_artifacts_in_the_runs_folder(tmp_path, monkeypatch):
    from harness.tracking import Tracker

    monkeypatch.setenv("HARNESS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = Tracker()
    tracker.experiment_id("demo")
    location = tracker.client.get_experiment_by_name("demo").artifact_location
    runs = Path(tracker.uri.removeprefix("sqlite:///")).parent
    assert location == (runs / "artifacts" / "demo").as_uri() and runs.is_relative_to(tmp_path / "home")
