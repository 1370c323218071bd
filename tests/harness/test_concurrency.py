"""Several processes starting on one NEW local store at once: the schema, the Default experiment and the named
experiment are each created once, and every process's run arrives whole and FINISHED (issue item 5)."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
from pathlib import Path

import pytest
import warm_cli

from harness.tracking import Tracker

PROCESSES = 3
STEPS = 5
TINY = ["--dataset", "fmnistlt", "--if", "100", "--epochs", "1+1", "--set", "data.test_per_class=20",
        "--set", "train.eval_interval=0", "--set", "data.n_max=100", "--set", "data.augment=basic",
        "--set", "method.depth=8"]  # ResNet-8: the race is over the store, not the model


def _log_one_run(uri: str, index: int, barrier: multiprocessing.synchronize.Barrier) -> None:
    """A spawned child: wait for the others, then create the store (first use of the client), the experiment
    and one run with STEPS metric steps, as the runner does."""
    from harness import tracking

    tracking._mlflow()  # the slow import happens before the barrier, so the store creation itself races
    tracker = Tracker(uri)
    barrier.wait(timeout=120)
    run_id = tracker.start("race", f"run-{index}", {"index": index})
    tracker.log_params(run_id, {"index": index})
    tracker.log_metric_rows(run_id, [(step, {"loss": float(step + index)}) for step in range(STEPS)])
    tracker.end(run_id)


def _runs_of(uri: str, experiment: str):
    tracker = Tracker(uri)
    names = [e.name for e in tracker.client.search_experiments()]
    return names, tracker.search([experiment])


@pytest.mark.slow  # three fresh interpreters each import mlflow: ~15 s of CPU in all
def test_processes_racing_on_a_new_store_lose_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_HOME", str(tmp_path / "runs"))
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(PROCESSES)
    children = [context.Process(target=_log_one_run, args=(uri, i, barrier)) for i in range(PROCESSES)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=180)
    assert [child.exitcode for child in children] == [0] * PROCESSES
    names, runs = _runs_of(uri, "race")
    assert sorted(names) == ["Default", "race"]  # one of each, although four processes created them
    assert sorted(runs["tags.mlflow.runName"]) == [f"run-{i}" for i in range(PROCESSES)]
    assert set(runs["status"]) == {"FINISHED"}
    client = Tracker(uri).client
    for run_id in runs["run_id"]:
        assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(STEPS))


@pytest.mark.slow  # another process, with its own imports
def test_creating_an_experiment_another_process_just_created_is_not_an_error(harness_home):
    """The window between "not found" and "create": another process creates the experiment in between."""
    tracker, other = Tracker(), Tracker()
    real_lookup = tracker.client.get_experiment_by_name
    lookups = []

    def stale_then_real(name: str):
        lookups.append(name)
        if len(lookups) == 1:
            other.experiment_id(name)  # the other process wins the race...
            return None  # ...after this one looked
        return real_lookup(name)

    tracker.client.get_experiment_by_name = stale_then_real
    assert tracker.experiment_id("race") == other.experiment_id("race")
    assert lookups == ["race", "race"]  # looked again instead of failing on "already exists"


@pytest.mark.slow
def test_two_cli_runs_on_one_new_store(tmp_path):
    """Two `harness run method` processes (seeds 0 and 1, one experiment) started together on an empty folder."""
    home = tmp_path / "runs"
    env = {**os.environ, "HARNESS_HOME": str(home), "OMP_NUM_THREADS": "1"}
    commands = [["run", "method", "--method", "ce", *TINY, "--seeds", str(seed)] for seed in (0, 1)]
    procs = [warm_cli.popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in commands]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    names, runs = _runs_of(f"sqlite:///{Path(home) / 'mlflow.db'}", "ce-fmnistlt-if100")
    assert sorted(names) == ["Default", "ce-fmnistlt-if100"]
    assert sorted(runs["tags.mlflow.runName"]) == ["ce-fmnistlt-if100-s0", "ce-fmnistlt-if100-s1"]
    assert set(runs["status"]) == {"FINISHED"} and runs["metrics.test/top1"].notna().all()
