"""Every fault ends in ONE line on stderr, a non-zero exit, no traceback, and nothing lost (issue "Trustworthy
numbers", item 4). Each fault goes through the real command line in a subprocess with a private HARNESS_HOME;
the cheaper variants of a fault are checked in-process next to it."""

from __future__ import annotations

import contextlib
import gzip
import http.server
import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import warm_cli
from cli_support import run_cli

from harness.datasets.cifar_lt import build_cifar10lt
from harness.datasets.fake import write_fake_cifar, write_fake_fmnist
from harness.datasets.fmnist_lt import IDX_FILES, build_fmnistlt
from harness.errors import HarnessError
from harness.tracking import Tracker, runs_dir

# Fashion-MNIST-LT at n_max 100 (250 training images), 20 test images per class, no per-epoch evaluation, ResNet-8
# trunks (`method.depth=8`; no fault here depends on the depth).
TINY = ["--dataset", "fmnistlt", "--if", "100", "--set", "data.test_per_class=20", "--set", "train.eval_interval=0",
        "--set", "data.n_max=100", "--set", "data.augment=basic", "--set", "method.depth=8"]
# MLflow's own default would retry a dead server for minutes; every fault here must end well inside this.
FAULT_TIMEOUT_S = 150


@dataclass
class Result:
    code: int
    out: str
    err: str
    seconds: float

    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def harness(args: list[str], home: Path, timeout: float = FAULT_TIMEOUT_S, **env: str) -> Result:
    """`python -m harness.cli ARGS` in a process of its own (forked warm, tests/warm_cli.py) with HARNESS_HOME=home:
    what a user's shell sees."""
    full_env = {**os.environ, "HARNESS_HOME": str(home), "OMP_NUM_THREADS": "1", **env}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    started = time.perf_counter()
    done = warm_cli.run(args, env=full_env, timeout=timeout)
    return Result(done.returncode, done.stdout, done.stderr, time.perf_counter() - started)


def assert_one_line(result: Result, *fragments: str) -> str:
    """Exit 2, exactly one stderr line, starting `harness: error:`, holding every fragment; returns the line."""
    lines = result.error_lines()
    assert result.code == 2 and len(lines) == 1, result.err[-3000:]
    assert lines[0].startswith("harness: error: ") and "Traceback" not in result.err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# (a) a tracking server that is down ------------------------------------------------------------------------------

@pytest.mark.slow
def test_server_down_fails_in_seconds_before_any_data_or_training(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = harness(["run", "method", "--method", "ce", *TINY, "--epochs", "1+1", "--tracking-uri", uri],
                     tmp_path / "runs")
    assert_one_line(result, uri, "not reachable", "harness ui", "mlflow server", "omit --tracking-uri")
    assert not (tmp_path / "runs").exists()  # no checkpoint, no spool, no local store: nothing started


def test_server_down_from_the_environment_names_the_variable(monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(HarnessError, match="unset MLFLOW_TRACKING_URI"):
        Tracker()


@contextlib.contextmanager
def answering(status: int) -> Iterator[str]:
    """A local HTTP server whose every GET gets `status`: an auth wall, a wrong URL, a proxy with no server."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status, reachable", [(200, True), (401, True), (403, True), (404, False), (502, False),
                                               (503, False)])
def test_probe_tells_a_server_from_a_wrong_url_or_a_proxy_without_one(status, reachable):
    with answering(status) as uri:
        if reachable:
            assert Tracker(uri).uri == uri
        else:
            with pytest.raises(HarnessError, match=re.escape(f"HTTP {status}")):
                Tracker(uri)


# (b) the server goes away during a run ---------------------------------------------------------------------------

class MlflowServer:
    """A real `mlflow server` on a free 127.0.0.1 port over a SQLite store in `folder`; stop() kills its group."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.log = (folder / f"server-{self.port}.log").open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
             "--artifacts-destination", str(folder / "server-artifacts")],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not come up: {self.log.name}")
            time.sleep(0.25)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # a crash, not a clean shutdown
        self.process.wait(timeout=30)
        self.log.close()


@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[MlflowServer]:
    server = MlflowServer(folder)
    try:
        yield server
    finally:
        server.stop()


def _wait_for_first_epoch(url: str, experiment: str, process: warm_cli.WarmProcess, timeout: float = 300) -> str:
    """The run id, once its first epoch's metrics reached the server."""
    tracker = Tracker(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        runs = tracker.search([experiment])
        if len(runs) and tracker.client.get_metric_history(runs["run_id"][0], "loss/total"):
            return runs["run_id"][0]
        time.sleep(0.1)
    raise AssertionError(f"no epoch logged (exit {process.poll()}): {process.stderr.read() if process.stderr else ''}")


def _offline():
    """A client method that fails as MLflow does when the server is gone (a requests ConnectionError inside)."""
    import requests

    def fail(*args, **kwargs):
        raise requests.exceptions.ConnectionError("Connection refused")

    return fail


def test_spool_keeps_every_call_in_order_and_a_cut_replay_sends_none_twice(harness_home, caplog):
    """Tracker-level (b) in seconds: a SQLite store stands in for the server, and a client method that raises
    a connection error stands in for the server going away."""
    tracker = Tracker()
    tracker.remote = True  # spool on connection errors, as for an http:// URI
    run_id = tracker.start("spooled", "run")
    client = tracker.client
    send_batch = client.log_batch
    client.log_batch = _offline()
    tracker.log_metric_rows(run_id, [(step, {"loss": float(step)}) for step in range(3)])
    client.log_batch = send_batch  # back already: the run's later calls still go to the spool, in order
    tracker.log_text(run_id, "a,b\n", "table.csv")
    tracker.end(run_id)
    spool = harness_home / "spool" / f"{run_id}.jsonl"
    assert [r["op"] for r in map(json.loads, spool.read_text().splitlines()[1:])] == ["metrics", "text", "end"]
    assert len([r for r in caplog.records if str(spool) in r.getMessage()]) == 1  # warned once
    assert client.get_run(run_id).info.status == "RUNNING" and not client.get_metric_history(run_id, "loss")

    send_text, client.log_text = client.log_text, _offline()
    with pytest.raises(HarnessError, match=re.escape(f"2 logging call(s) of run {run_id} stay in {spool}; when it "
                                                     f"is back, run `harness tracking replay {spool}`")):
        tracker.finish_run(run_id)  # the metrics go, then the server is away again
    assert [r["op"] for r in map(json.loads, spool.read_text().splitlines()[1:])] == ["text", "end"]
    client.log_text = send_text
    assert Tracker().replay(spool) == 2 and not spool.exists()
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [0, 1, 2]  # each step once
    assert client.get_run(run_id).info.status == "FINISHED" and tracker.load_text(run_id, "table.csv") == "a,b\n"


@pytest.mark.server
@pytest.mark.slow
def test_server_lost_mid_run_spools_every_step_and_replay_delivers_each_once(tmp_path, capsys, monkeypatch):
    """The run is the fault, so it is a real process; the replays after it run in-process (`run_cli`)."""
    home, store = tmp_path / "runs", tmp_path / "server"
    store.mkdir()
    epochs, total = "6+1", 7  # ResNet-8 epochs: seconds of training still to go when the server is killed
    env = {**os.environ, "HARNESS_HOME": str(home), "OMP_NUM_THREADS": "1"}
    with mlflow_server(store) as server:
        run = warm_cli.popen(["run", "method", "--method", "ce", *TINY, "--epochs", epochs, "--tracking-uri",
                              server.url, "--experiment", "lost"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        run_id = _wait_for_first_epoch(server.url, "lost", run)
    out, err = run.communicate(timeout=600)  # the server died while the run was still training
    spool = home / "spool" / f"{run_id}.jsonl"
    lines = [line for line in err.splitlines() if line.startswith("harness: ")]
    assert run.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("harness: warning: ") and str(spool) in lines[0]  # warned once, kept training
    assert len(lines) == 2 and lines[1].startswith("harness: error: ") and err.rstrip().endswith(lines[1])
    assert str(spool) in lines[1] and f"harness tracking replay {spool}" in lines[1]
    assert spool.is_file() and "test/top1" in spool.read_text()  # the run finished; its numbers are on disk

    monkeypatch.setenv("HARNESS_HOME", str(home))
    with mlflow_server(store) as fresh:  # a new server process on the same store
        code, out, err = run_cli(["tracking", "replay", str(spool), "--tracking-uri", fresh.url], capsys)
        assert code == 0 and "replayed" in out, err[-3000:]
        assert not spool.exists()
        client = Tracker(fresh.url).client
        for key in ("loss/total", "lr"):  # every epoch's value exactly once: none lost, none sent twice
            assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(total)), key
        assert [m.step for m in client.get_metric_history(run_id, "test/top1")] == [total]
        finished = client.get_run(run_id)
        assert finished.info.status == "FINISHED" and finished.data.params["method"] == "ce"
        names = {a.path for a in client.list_artifacts(run_id)}
        assert {"config.json", "per_class_accuracy.csv", "eval_details.npz"} <= names
        code, out, _ = run_cli(["tracking", "replay", "--tracking-uri", fresh.url], capsys)
        assert code == 0 and "nothing to replay" in out


# (c) corrupt or truncated data files, an unknown profile ---------------------------------------------------------

def _truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


@pytest.mark.slow
def test_truncated_cifar_pickle_names_the_file_and_how_to_fetch_it(tmp_path):
    root = write_fake_cifar(tmp_path / "cifar", num_classes=10, per_class_train=60, per_class_test=5)
    broken = root / "cifar-10-batches-py" / "data_batch_3"
    _truncate(broken)
    result = harness(["run", "method", "--method", "ce", "--dataset", "cifar10lt", "--data-root", str(root),
                      "--epochs", "1+1", "--set", "data.n_max=50"], tmp_path / "runs")
    assert_one_line(result, str(broken), "truncated", "--download", "official CIFAR page")


@pytest.mark.parametrize("damage, problem", [
    (lambda p: p.write_bytes(b"\x80\x04not an idx file"), "no uint8 IDX header"),
    (lambda p: p.write_bytes(p.read_bytes()[:-1]), "truncated"),
    (lambda p: p.write_bytes(p.read_bytes() + b"\0"), "too long"),
], ids=["no-header", "truncated", "too-long"])
def test_damaged_fmnist_idx_in_process(tmp_path, damage, problem):
    root = write_fake_fmnist(tmp_path / "fmnist", per_class_train=60, per_class_test=5)
    damage(root / IDX_FILES[1])
    with pytest.raises(HarnessError, match=problem) as error:
        build_fmnistlt(imbalance_factor=10, n_max=50, data_root=str(root))
    assert str(root / IDX_FILES[1]) in str(error.value) and "dataset-fashion-mnist" in str(error.value)


@pytest.mark.parametrize("content, problem", [
    (gzip.compress(b"x"), "UnpicklingError"),  # not a pickle at all
    (pickle.dumps({"data": np.zeros((3, 3072), np.uint8), "labels": [0, 1]}), "9216 pixel bytes for 2 labels"),
    (pickle.dumps({"labels": [0]}), "no data entry"),
    (pickle.dumps([1, 2]), "holds a list, not a dict"),
], ids=["not-a-pickle", "sizes-disagree", "no-data", "not-a-dict"])
def test_damaged_cifar_pickle_in_process(tmp_path, content, problem):
    root = write_fake_cifar(tmp_path / "cifar", num_classes=10, per_class_train=60, per_class_test=5)
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(content)
    with pytest.raises(HarnessError, match="test_batch is not a readable CIFAR-10 file") as error:
        build_cifar10lt(imbalance_factor=10, n_max=50, data_root=str(root))
    assert problem in str(error.value)


@pytest.mark.slow
def test_truncated_fmnist_idx_names_the_file_and_how_to_fetch_it(tmp_path):
    root = write_fake_fmnist(tmp_path / "fmnist", per_class_train=60, per_class_test=5)
    gz = root / f"{IDX_FILES[0]}.gz"  # a cut .gz fails inside the decompressor
    gz.write_bytes(gzip.compress((root / IDX_FILES[0]).read_bytes()))
    (root / IDX_FILES[0]).unlink()
    _truncate(gz)
    result = harness(["run", "method", "--method", "ce", "--dataset", "fmnistlt", "--data-root", str(root),
                      "--epochs", "1+1", "--set", "data.n_max=50"], tmp_path / "runs")
    assert_one_line(result, str(gz), "apt-get install --reinstall dataset-fashion-mnist", "--data-root")


@pytest.mark.slow
def test_unknown_profile_lists_the_known_ones(tmp_path):
    result = harness(["data", "info", "fmnistlt", "--profile", "bogus"], tmp_path / "runs")
    assert_one_line(result, "unknown data profile 'bogus'", "known profiles: first-n, ldam-seed0")


def test_unknown_profile_fails_before_reading_files(tmp_path):
    with pytest.raises(HarnessError, match="known profiles: first-n, ldam-seed0"):
        build_cifar10lt(imbalance_factor=10, profile="bogus", data_root=str(tmp_path / "nothing-here"))


# (d) a runs folder that cannot be used ---------------------------------------------------------------------------

@pytest.mark.slow
def test_harness_home_that_is_a_file(tmp_path):
    home = tmp_path / "runs"
    home.write_text("not a folder")
    result = harness(["run", "method", "--method", "ce", *TINY, "--epochs", "1+1"], home)
    assert_one_line(result, f"HARNESS_HOME={home}", "is a file, not a folder", "writable folder")
    assert home.read_text() == "not a folder"


def test_harness_home_under_a_file(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("HARNESS_HOME", str(tmp_path / "file" / "runs"))
    with pytest.raises(HarnessError, match=re.escape(f"{tmp_path / 'file'} is a file, not a folder")):
        runs_dir()


def test_harness_home_not_writable(tmp_path, monkeypatch):
    """Root ignores permission bits, so the permission answer itself is what is replaced here."""
    monkeypatch.setenv("HARNESS_HOME", str(tmp_path / "runs"))
    with monkeypatch.context() as patch:
        patch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
        with pytest.raises(HarnessError, match=re.escape(f"{tmp_path} is not writable; set HARNESS_HOME to a")):
            runs_dir()
    assert runs_dir() == tmp_path / "runs"  # writable again: accepted, and not created by the check
    assert not (tmp_path / "runs").exists()


# (f) importing changes no environment variable and no logger -----------------------------------------------------

IMPORT_PROBE = """
import logging, os, sys
env, loggers = dict(os.environ), set(logging.Logger.manager.loggerDict)
import harness.tracking, harness.cli
harness.cli.build_parser()
changed = [k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k)]
levels = {n: logging.getLogger(n).level for n in logging.Logger.manager.loggerDict if logging.getLogger(n).level}
print(changed, levels, 'mlflow' in sys.modules)
harness.tracking.Tracker('sqlite:///' + sys.argv[1]).client
print(os.environ['MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR'], os.environ['MLFLOW_HTTP_REQUEST_MAX_RETRIES'],
      logging.getLogger('mlflow').level == logging.WARNING, logging.getLogger('alembic').level == logging.WARNING)
"""


@pytest.mark.slow
def test_import_changes_nothing_and_the_first_client_quiets_mlflow(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP") and "PROGRESS_BAR" not in k}
    done = subprocess.run([sys.executable, "-c", IMPORT_PROBE, str(tmp_path / "mlflow.db")], env=env,
                          capture_output=True, text=True, timeout=FAULT_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["[] {} False", "false 2 True True"]
    assert "Creating initial MLflow database tables" not in done.stderr  # a new store is built quietly
