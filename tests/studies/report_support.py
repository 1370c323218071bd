"""Shared by the report, figure, server and browser tests: a tiny real Table 4 study (trained once per session),
synthetic runs logged through a Tracker, and a real `mlflow server` on 127.0.0.1 that is always stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.cli import main
from harness.tracking import Tracker

# Fashion-MNIST-LT at n_max 100 (250 training images) and 20 test images per class, ResNet-8 trunks (what the
# reports and figures read does not depend on the depth): about a second of training per run on 2 CPUs.
TINY = ["--dataset", "fmnistlt", "--if", "100", "--epochs", "1+1", "--set", "train.eval_interval=0",
        "--set", "data.test_per_class=20", "--set", "data.n_max=100", "--set", "data.augment=basic",
        "--set", "method.depth=8"]
EXPERIMENT = "table4-fmnistlt-if100"
_HOMES: dict[str, Path] = {}


def tiny_study_home(factory: pytest.TempPathFactory) -> Path:
    """`harness run ablation` (plain and SHIKE, seeds 0 and 1) and one `branches` run, once per session."""
    if "home" not in _HOMES:
        home = factory.mktemp("tiny-study") / "runs"
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # batches of 128 on ResNet-8: a second thread only stalls on a busy machine
        try:
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("HARNESS_HOME", str(home))
                assert main(["run", "ablation", *TINY, "--seeds", "0,1", "--rows", "plain,shike"]) == 0
                assert main(["run", "method", "--method", "branches", *TINY]) == 0
        finally:
            torch.set_num_threads(threads)
        _HOMES["home"] = home
    return _HOMES["home"]


def details(num_classes: int, experts: int, seed: int) -> dict[str, np.ndarray]:
    """eval_details.npz arrays as the runner logs them, with random values."""
    rng = np.random.default_rng(seed)
    return {"per_class_acc": rng.random(num_classes), "expert_per_class_acc": rng.random((experts, num_classes)),
            "hardest_negative_prob": rng.random(200).astype(np.float32),
            "class_counts": np.array([int(500 * 100 ** (-c / (num_classes - 1))) for c in range(num_classes)])}


def log_study(tracker: Tracker, experiment: str = EXPERIMENT,
              top1: dict[str, tuple[float, ...]] | None = None) -> tuple[str, dict[str, str]]:
    """A Table 4 study as `run_study` logs it (parent + child runs with the runner's params, metrics, artifacts);
    returns the parent run id and {run name: run id}."""
    top1 = top1 or {"plain": (50.0, 52.0), "shike": (56.0, 57.0)}
    parent = tracker.start(experiment, f"{experiment}-study", {"table": "table4", "kind": "study",
                                                              "dataset": "fmnistlt", "imbalance_factor": "100"})
    children = {}
    for key, values in top1.items():
        for seed, value in enumerate(values):
            name = f"{key}-fmnistlt-if100-s{seed}"
            run = tracker.start(experiment, name, {"table": "table4", "row": key, "row_key": key}, parent)
            experts = 3 if key == "shike" else 1
            tracker.log_params(run, {"method": key, "data.dataset": "fmnistlt", "data.imbalance_factor": 100.0,
                                     "data.profile": "first-n", "data.test_per_class": 20, "train.seed": seed,
                                     "train.epochs": 0, "train.stage_epochs": "1+1", "plan.epochs": "1+1",
                                     "preset": "shike-code",
                                     **({"method.experts": 3, "method.dkf": True} if key == "shike" else {})})
            tracker.log_metrics(run, {"test/top1": value}, step=2)
            tracker.log_arrays(run, details(10, experts, seed), "eval_details.npz")
            tracker.end(run)
            children[name] = run
    tracker.end(parent)
    return parent, children


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def mlflow_server(folder: Path, timeout_s: float = 60.0) -> Iterator[str]:
    """A real `mlflow server` (1 worker, no job execution, telemetry off) on a free 127.0.0.1 port; yields its URL
    once /health answers, and always stops its whole process group (the server and its uvicorn worker)."""
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = (folder / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}", "--artifacts-destination",
         str(folder / "server-artifacts")], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not come up: {(folder / 'server.log').read_text()[-2000:]}")
            time.sleep(0.25)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=5)
        log.close()
