"""MLflow tracking: the only module that imports mlflow.

Default store: SQLite under the runs folder (`./runs/mlflow.db`, artifacts in `./runs/artifacts`), overridable with
`--tracking-uri` or MLFLOW_TRACKING_URI. Runs are addressed by id through MlflowClient, so parent/child runs and
resumed runs need no global "active run" state.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm bars in report output

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

for _name in ("mlflow", "alembic"):  # schema-creation chatter on a new store is not the user's business
    logging.getLogger(_name).setLevel(logging.WARNING)

PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_LENGTH = 6000


def runs_dir() -> Path:
    return Path(os.environ.get("HARNESS_HOME", "runs")).resolve()


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{runs_dir() / 'mlflow.db'}"


class Tracker:
    """Thin wrapper over MlflowClient with the harness's conventions."""

    def __init__(self, tracking_uri: str | None = None) -> None:
        self.uri = tracking_uri or default_tracking_uri()
        self.local = self.uri.startswith("sqlite:")
        self._client: MlflowClient | None = None

    @property
    def client(self) -> MlflowClient:
        """Created on first use, so a command that fails its input checks writes no store."""
        if self._client is None:
            if self.uri.startswith("sqlite:///"):
                Path(self.uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        if self.local:
            location = (runs_dir() / "artifacts" / name.replace("/", "_")).as_uri()
        return self.client.create_experiment(name, artifact_location=location)

    def start(self, experiment: str, run_name: str, tags: Mapping[str, Any] | None = None,
              parent_run_id: str | None = None) -> str:
        all_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        run = self.client.create_run(self.experiment_id(experiment), run_name=run_name, tags=all_tags)
        return run.info.run_id

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        existing = self.client.get_run(run_id).data.params
        items = [p for p in items if p.key not in existing]  # params are immutable; a resumed run re-sends them
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        self.log_metric_rows(run_id, [(step, metrics)])

    def log_metric_rows(self, run_id: str, rows: list[tuple[int, Mapping[str, float]]]) -> None:
        """Several steps' metrics in as few requests as possible (one per 500 values)."""
        now = int(time.time() * 1000)
        items = [Metric(k.replace("@", "_"), float(v), now, step) for step, metrics in rows
                 for k, v in metrics.items() if v is not None and np.isfinite(v)]
        for start in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[start:start + 500])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_json(self, run_id: str, obj: Any, name: str) -> None:
        self.client.log_text(run_id, json.dumps(obj, indent=2, sort_keys=True, default=str), name)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def log_file(self, run_id: str, path: Path, artifact_dir: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_dir)

    def log_arrays(self, run_id: str, arrays: Mapping[str, np.ndarray], name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            np.savez_compressed(path, **arrays)
            self.client.log_artifact(run_id, str(path))

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def load_arrays(self, run_id: str, name: str) -> dict[str, np.ndarray]:
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=tmp,
                                                        tracking_uri=self.uri)
            with np.load(local) as data:
                return {k: data[k] for k in data.files}

    def load_text(self, run_id: str, name: str) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=tmp,
                                                        tracking_uri=self.uri)
            return Path(local).read_text()

    def artifact_names(self, run_id: str, folder: str = "") -> list[str]:
        """Paths of the files (not folders) directly under `folder` of a run's artifacts."""
        return [f.path for f in self.client.list_artifacts(run_id, folder or None) if not f.is_dir]

    def experiment_names(self, prefix: str = "") -> list[str]:
        """Names of the experiments starting with `prefix`, the most recently created first."""
        found = [e for e in self.client.search_experiments() if e.name.startswith(prefix)]
        return [e.name for e in sorted(found, key=lambda e: e.creation_time or 0, reverse=True)]

    def search(self, experiment_names: list[str] | None = None, filter_string: str = "") -> Any:
        """Runs as a pandas DataFrame (params.*, metrics.*, tags.* columns), across the named or all experiments."""
        if experiment_names is None:
            ids = [e.experiment_id for e in self.client.search_experiments()]
        else:
            ids = [e.experiment_id for n in experiment_names if (e := self.client.get_experiment_by_name(n))]
        if not ids:
            import pandas as pd

            return pd.DataFrame()
        previous = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.uri)  # search_runs has no uri argument; restore the global state after it
        try:
            return mlflow.search_runs(experiment_ids=ids, filter_string=filter_string, max_results=50000,
                                      output_format="pandas")
        finally:
            mlflow.set_tracking_uri(previous)  # None resets mlflow's default
            if previous is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
