"""MLflow tracking: the only module that imports mlflow, and it does so on first use, not at import.

Default store: SQLite under the runs folder (`./runs/mlflow.db`, artifacts in `./runs/artifacts`), overridable with
`--tracking-uri` or MLFLOW_TRACKING_URI. Runs are addressed by id through MlflowClient, so parent/child runs and
resumed runs need no global "active run" state.

Faults end as one `HarnessError` line that says what to do. An HTTP server that does not answer is found by a
short probe when a Tracker is made (before any data is read), and MLflow's own retries are cut to seconds. A
server that goes away during a run loses none of its numbers: the run's logging calls go, in order, to a spool
file (`harness.spool`) that `finish_run` replays at the end of the run, or `harness tracking replay` later.
Importing this module changes no environment variable and no logger; the first client does (`_mlflow`).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from harness.errors import HarnessError
from harness.spool import Record, Spool

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_LENGTH = 6000
PROBE_TIMEOUT_S = 5.0
PROBE_FAILURES = (404, 502, 503, 504)  # HTTP answers from /health that mean "no MLflow server here"
STORE_READY = "ready\n"  # written into <db>.lock once a new SQLite store has been built
# Set (unless the user set them) when this process first creates a client. MLflow's defaults retry a dead server
# for minutes (7 retries, backoff 2 s, 120 s timeout); 2 quick retries let a run learn it in seconds and spool.
MLFLOW_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # no tqdm bars in report output
}
# Schema-creation chatter on a new store and urllib3's "Retrying ..." lines are not the user's business (-v shows
# them: a DEBUG root logger leaves these loggers alone).
QUIET_LOGGERS = {"mlflow": logging.WARNING, "alembic": logging.WARNING, "urllib3.connectionpool": logging.ERROR}

log = logging.getLogger(__name__)


@functools.cache
def _mlflow() -> ModuleType:
    """Import and configure MLflow once per process, when a Tracker first needs it."""
    for name, value in MLFLOW_SETTINGS.items():
        os.environ.setdefault(name, value)
    import mlflow  # here, not at the top: importing it costs seconds, and commands that never track skip it

    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:  # after the import: mlflow sets its own level
        for name, level in QUIET_LOGGERS.items():
            logging.getLogger(name).setLevel(level)
    return mlflow


def runs_dir() -> Path:
    """The runs folder ($HARNESS_HOME, default ./runs). Checked, not created: a folder that cannot be written
    fails here, in one line, before any store, checkpoint or training exists."""
    path = Path(os.environ.get("HARNESS_HOME", "runs")).resolve()
    problem = _folder_problem(path)
    if problem:
        setting = f"HARNESS_HOME={path}" if "HARNESS_HOME" in os.environ else f"the runs folder {path}"
        raise HarnessError(f"{setting} cannot be used: {problem}; set HARNESS_HOME to a writable folder "
                           "(it holds the MLflow store, checkpoints and spool files)")
    return path


def _folder_problem(path: Path) -> str:
    """Why `path` cannot be (or become) a writable folder; '' if it can."""
    existing = path
    while True:
        try:
            is_dir = existing.is_dir()
            if is_dir or existing.exists():
                break
        except OSError as error:
            return f"{existing} cannot be read ({error.strerror})"
        existing = existing.parent
    if not is_dir:
        return f"{existing} is a file, not a folder" + ("" if existing == path else " (so nothing can be made in it)")
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return ""


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{runs_dir() / 'mlflow.db'}"


def spool_dir() -> Path:
    return runs_dir() / "spool"


def probe_server(uri: str, hint: str = "omit --tracking-uri") -> None:
    """Raise HarnessError in seconds when no MLflow server answers at `uri`: no connection, or its /health is
    missing (404: not an MLflow server) or unavailable (502-504: a proxy whose server is down). Other answers, an
    auth wall's 401 or 403 included, count as reachable."""
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError as error:
        if error.code not in PROBE_FAILURES:
            return
        reason = f"HTTP {error.code} {error.reason} from {uri.rstrip('/')}/health"
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
    else:
        return
    raise HarnessError(
        f"MLflow tracking server {uri} is not reachable ({reason}); start it (`harness ui --port PORT` serves "
        f"the local store, or `mlflow server --host 127.0.0.1 --port PORT`), or {hint} to log to the "
        "local store under ./runs ($HARNESS_HOME)") from None


def _is_unreachable(error: BaseException | None) -> bool:
    """True when an MLflow call failed because the server could not be reached, not because it refused the call.
    MLflow wraps the requests error in an MlflowException, so the whole cause/context chain is searched."""
    import requests  # mlflow's HTTP layer; loaded with it

    kinds = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, requests.exceptions.RetryError,
             ConnectionError, TimeoutError)
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kinds):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[TextIO]:
    """An exclusive advisory lock (flock) held for the block, shared by every process on this machine."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield handle
        finally:
            handle.flush()
            fcntl.flock(handle, fcntl.LOCK_UN)


def _store_ready(db: Path, lock: Path) -> bool:
    try:
        return db.is_file() and lock.read_text() == STORE_READY
    except OSError:
        return False


def _already_exists(error: Exception) -> bool:
    return getattr(error, "error_code", "") == "RESOURCE_ALREADY_EXISTS"


# How each kind of logging record becomes MLflow calls: live (Tracker._deliver) and on replay alike.

def _send_metrics(client: MlflowClient, entities: ModuleType, run_id: str, record: Record) -> None:
    metrics = [entities.Metric(k, v, t, s) for k, v, t, s in record["items"]]
    for start in range(0, len(metrics), 500):
        client.log_batch(run_id, metrics=metrics[start:start + 500], synchronous=True)


def _send_params(client: MlflowClient, entities: ModuleType, run_id: str, record: Record) -> None:
    existing = client.get_run(run_id).data.params  # immutable; a resumed run or a replay re-sends them
    params = [entities.Param(k, v) for k, v in record["items"].items() if k not in existing]
    for start in range(0, len(params), 100):
        client.log_batch(run_id, params=params[start:start + 100], synchronous=True)


def _send_tags(client: MlflowClient, entities: ModuleType, run_id: str, record: Record) -> None:
    client.log_batch(run_id, tags=[entities.RunTag(k, v) for k, v in record["items"].items()], synchronous=True)


def _send_text(client: MlflowClient, entities: ModuleType, run_id: str, record: Record) -> None:
    client.log_text(run_id, record["text"], record["name"])


def _send_file(client: MlflowClient, entities: ModuleType, run_id: str, record: Record) -> None:
    client.log_artifact(run_id, record["path"], record["artifact_dir"])


def _send_end(client: MlflowClient, entities: ModuleType, run_id: str, record: Record) -> None:
    client.set_terminated(run_id, status=record["status"], end_time=record["end_time"])


SENDERS = {"metrics": _send_metrics, "params": _send_params, "tags": _send_tags, "text": _send_text,
           "file": _send_file, "end": _send_end}


def sqlite_file(uri: str) -> Path | None:
    """The SQLite file of a `sqlite:///PATH` store; None for an in-memory or non-SQLite store."""
    db = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else ""
    return Path(db) if db and db != ":memory:" else None


def store_dir(uri: str) -> Path:
    """The folder of a SQLite store's file: its artifacts and the Optuna study go beside it, so `--tracking-uri
    sqlite:///x/m.db` keeps everything under x/; the harness's runs folder for any other store."""
    db = sqlite_file(uri)
    return db.resolve().parent if db else runs_dir()


class Tracker:
    """Thin wrapper over MlflowClient with the harness's conventions.

    An HTTP tracking server is probed here, when the Tracker is made: commands make theirs before reading any
    data, so a server that is down fails the command in seconds instead of after the data and model are built."""

    def __init__(self, tracking_uri: str | None = None) -> None:
        self.uri = tracking_uri or default_tracking_uri()
        self.local = self.uri.startswith("sqlite:")
        self.remote = self.uri.startswith(("http://", "https://"))
        if self.remote:
            probe_server(self.uri, "omit --tracking-uri" if tracking_uri else "unset MLFLOW_TRACKING_URI")
        self._client: MlflowClient | None = None
        self._spools: dict[str, Spool] = {}  # run id -> spool, once the server went away during that run

    @property
    def client(self) -> MlflowClient:
        """Created on first use, so a command that fails its input checks writes no store."""
        if self._client is None:
            mlflow = _mlflow()
            db = sqlite_file(self.uri)
            if db is None:
                self._client = mlflow.tracking.MlflowClient(tracking_uri=self.uri)
            else:
                self._client = self._open_sqlite(mlflow, db)
        return self._client

    def _open_sqlite(self, mlflow: ModuleType, db: Path) -> MlflowClient:
        """Build a new SQLite store under a file lock: processes starting on a new store at once would otherwise
        race to create the same tables and the Default experiment. The lock file says "ready" once a store is
        built, so later processes skip the lock (and its seconds-long wait) altogether."""
        lock = db.with_name(db.name + ".lock")
        if _store_ready(db, lock):
            return mlflow.tracking.MlflowClient(tracking_uri=self.uri)
        db.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(lock) as handle:
            client = mlflow.tracking.MlflowClient(tracking_uri=self.uri)  # builds the schema and Default experiment
            if not _store_ready(db, lock):
                handle.write(STORE_READY)
        return client

    @contextlib.contextmanager
    def _reaching(self, action: str) -> Iterator[None]:
        """A call that cannot be spooled (it creates or reads): an unreachable server becomes one line."""
        try:
            yield
        except HarnessError:
            raise
        except Exception as error:
            if not (self.remote and _is_unreachable(error)):
                raise
            raise HarnessError(f"MLflow tracking server {self.uri} stopped answering while {action}; restart it "
                               f"and rerun (finished runs are skipped with --resume)") from None

    def experiment_id(self, name: str) -> str:
        """The experiment's id, created if missing; a concurrent creation by another process is not an error."""
        with self._reaching(f"opening experiment '{name}'"):
            found = self.client.get_experiment_by_name(name)
            if found is not None:
                return found.experiment_id
            location = (store_dir(self.uri) / "artifacts" / name.replace("/", "_")).as_uri() if self.local else None
            try:
                return self.client.create_experiment(name, artifact_location=location)
            except Exception as error:
                if not _already_exists(error):
                    raise
            return self.client.get_experiment_by_name(name).experiment_id

    def start(self, experiment: str, run_name: str, tags: Mapping[str, Any] | None = None,
              parent_run_id: str | None = None) -> str:
        all_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        experiment_id = self.experiment_id(experiment)
        with self._reaching(f"starting run '{run_name}'"):
            run = self.client.create_run(experiment_id, run_name=run_name, tags=all_tags)
        return run.info.run_id

    def reopen(self, run_id: str) -> None:
        """Mark a resumed run RUNNING. A spool left by its earlier process is taken over, so what it kept (its
        FAILED or KILLED end included) reaches the server before, not after, what the resumed run logs."""
        with self._reaching(f"reopening run {run_id}"):
            self.client.update_run(run_id, status="RUNNING")
        left = spool_dir() / f"{run_id}.jsonl" if self.remote else None
        if left is not None and left.is_file():
            self._spools[run_id] = Spool(left)

    # Logging calls: each is a record, sent now or spooled (see `_deliver`); `_send` turns a record into calls.

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        self._deliver(run_id, {"op": "params", "items": {k: str(v)[:MAX_PARAM_LENGTH] for k, v in params.items()}})

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        self.log_metric_rows(run_id, [(step, metrics)])

    def log_metric_rows(self, run_id: str, rows: Sequence[tuple[Any, ...]]) -> None:
        """Several steps' metrics in as few requests as possible (one per 500 values). A row is (step, metrics) or
        (step, metrics, timestamp in ms): a row re-sent with its original timestamp is an exact duplicate, which the
        MLflow store ignores, so a write-ahead journal can be replayed without logging a step twice."""
        now = int(time.time() * 1000)
        items = [[k.replace("@", "_"), float(v), int(row[2]) if len(row) > 2 else now, int(row[0])] for row in rows
                 for k, v in row[1].items() if v is not None and np.isfinite(v)]
        if items:
            self._deliver(run_id, {"op": "metrics", "items": items})

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        self._deliver(run_id, {"op": "tags", "items": {k: str(v) for k, v in tags.items()}})

    def log_json(self, run_id: str, obj: Any, name: str) -> None:
        self.log_text(run_id, json.dumps(obj, indent=2, sort_keys=True, default=str), name)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self._deliver(run_id, {"op": "text", "text": text, "name": name})

    def log_file(self, run_id: str, path: Path, artifact_dir: str | None = None) -> None:
        self._deliver(run_id, {"op": "file", "path": str(path), "artifact_dir": artifact_dir})

    def log_arrays(self, run_id: str, arrays: Mapping[str, np.ndarray], name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            np.savez_compressed(path, **arrays)
            self.log_file(run_id, path)  # a spool copies the file before the folder goes

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self._deliver(run_id, {"op": "end", "status": status, "end_time": int(time.time() * 1000)})

    def _deliver(self, run_id: str, record: Record) -> None:
        """Send a logging call now; if the server cannot be reached, spool it. Once a run has a spool, its later
        calls go straight there (no retry waits during training, and replay keeps their order)."""
        spool = self._spools.get(run_id)
        if spool is None:
            try:
                self._send(run_id, record)
                return
            except Exception as error:
                if not (self.remote and _is_unreachable(error)):
                    raise
                spool = self._spools[run_id] = Spool.create(spool_dir(), run_id, self.uri)
                log.warning("harness: warning: MLflow tracking server %s is not answering; run %s keeps training "
                            "and logs to %s until it is replayed", self.uri, run_id, spool.path)
        spool.append(record)

    def _send(self, run_id: str, record: Record) -> None:
        if record["op"] not in SENDERS:
            raise ValueError(f"unknown tracking record '{record['op']}'")
        SENDERS[record["op"]](self.client, _mlflow().entities, run_id, record)

    def finish_run(self, run_id: str) -> None:
        """Call after a run's last logging call. If the server went away during the run, replay its spool now;
        if it is still away, raise one line that names the spool file and how to replay it."""
        spool = self._spools.pop(run_id, None)
        if spool is not None:
            self.replay(spool.path)

    def replay(self, path: Path) -> int:
        """Send a spool file's records to this tracker's store in order; return how many. Delivered records
        leave the file (it is deleted when empty), so a replay cut short resumes without sending any twice."""
        spool = Spool(path)
        try:
            header, records = spool.read()
        except (OSError, ValueError) as error:
            raise HarnessError(f"cannot read spool file {path}: {error}") from None
        run_id = header["run_id"]
        self._check_run_exists(run_id, path, header.get("tracking_uri", "?"), len(records))
        for index, record in enumerate(records):
            try:
                self._send(run_id, record)
            except Exception as error:
                spool.rewrite(header, records[index:])
                if _is_unreachable(error):
                    raise self._still_away(run_id, path, len(records) - index) from None
                cause = (str(error).splitlines() or [""])[0]
                raise HarnessError(f"{self.uri} refused the spooled '{record['op']}' call of run {run_id} "
                                   f"({type(error).__name__}: {cause}); it and later calls stay in {path}") from None
        spool.remove()
        return len(records)

    def _check_run_exists(self, run_id: str, path: Path, started_on: str, count: int) -> None:
        try:
            self.client.get_run(run_id)
        except HarnessError:
            raise
        except Exception as error:
            if _is_unreachable(error):
                raise self._still_away(run_id, path, count) from None
            if getattr(error, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise HarnessError(f"run {run_id} of {path} is not in {self.uri}; replay it into the store it was "
                               f"started on ({started_on}): `harness tracking replay {path} --tracking-uri URI`"
                               ) from None

    def _still_away(self, run_id: str, path: Path, count: int) -> HarnessError:
        return HarnessError(f"MLflow tracking server {self.uri} is not answering, so {count} logging call(s) of run "
                            f"{run_id} stay in {path}; when it is back, run `harness tracking replay {path}`")

    def load_arrays(self, run_id: str, name: str) -> dict[str, np.ndarray]:
        with tempfile.TemporaryDirectory() as tmp, np.load(self._download(run_id, name, tmp)) as data:
            return {k: data[k] for k in data.files}

    def load_text(self, run_id: str, name: str) -> str:
        with tempfile.TemporaryDirectory() as tmp:
            return self._download(run_id, name, tmp).read_text()

    def download(self, run_id: str, name: str, folder: str) -> Path:
        """One artifact of a run into `folder`; returns its local path."""
        return self._download(run_id, name, folder)

    def _download(self, run_id: str, name: str, folder: str) -> Path:
        with self._reaching(f"downloading {name} of run {run_id}"):
            return Path(_mlflow().artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=folder,
                                                               tracking_uri=self.uri))

    def artifact_names(self, run_id: str, folder: str = "") -> list[str]:
        """Paths of the files (not folders) directly under `folder` of a run's artifacts."""
        with self._reaching(f"listing artifacts of run {run_id}"):
            return [f.path for f in self.client.list_artifacts(run_id, folder or None) if not f.is_dir]

    def experiment_names(self, prefix: str = "") -> list[str]:
        """Names of the experiments starting with `prefix`, the most recently created first."""
        with self._reaching("listing experiments"):
            found = [e for e in self.client.search_experiments() if e.name.startswith(prefix)]
        return [e.name for e in sorted(found, key=lambda e: e.creation_time or 0, reverse=True)]

    def search(self, experiment_names: list[str] | None = None, filter_string: str = "") -> Any:
        """Runs as a pandas DataFrame (params.*, metrics.*, tags.* columns), across the named or all experiments."""
        with self._reaching("searching runs"):
            return self._search(experiment_names, filter_string)

    def _search(self, experiment_names: list[str] | None, filter_string: str) -> Any:
        if experiment_names is None:
            ids = [e.experiment_id for e in self.client.search_experiments()]
        else:
            ids = [e.experiment_id for n in experiment_names if (e := self.client.get_experiment_by_name(n))]
        if not ids:
            import pandas as pd

            return pd.DataFrame()
        mlflow = _mlflow()
        previous = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.uri)  # search_runs has no uri argument; restore the global state after it
        try:
            return mlflow.search_runs(experiment_ids=ids, filter_string=filter_string, max_results=50000,
                                      output_format="pandas")
        finally:
            mlflow.set_tracking_uri(previous)  # None resets mlflow's default
            if previous is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
