"""Interrupt the real CLI at chosen instants and resume it: the result must be the uninterrupted run's.

A property test over kill points (seeded, so a failure reproduces): SIGKILL inside stage 1, at the stage switch and
inside stage 2, one of them during a checkpoint write; then `--resume` to the end. Ctrl-C (SIGINT) and SIGTERM must
each end in one line saying to rerun with --resume, exit 130 / 143, a resumable checkpoint and a KILLED MLflow run.
After the last resume: the same final test metrics as an uninterrupted run with the same seed, every MLflow metric
step exactly once (with the uninterrupted run's value), one MLflow run, FINISHED, and each resumed process started at
the first epoch its predecessor had not checkpointed (never from 0).

The instants come from a test-only plugin (plugins_for_tests/pause_points.py) that pauses the process at a named
point; the test then sends the signal from outside, as a user or a scheduler would.

The three scenarios are independent (one MLflow experiment each) and spend their time waiting on their one-thread
processes, so they run at once, each in a thread of the module's `scenarios` fixture, next to the reference run;
each test waits for its own scenario, whose assertion errors it re-raises.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import warm_cli
from warm_cli import WarmProcess

from harness.cost import is_measured

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PLUGINS = Path(__file__).parent / "plugins_for_tests"
EPOCHS = (2, 2)  # plain: representation = global epochs 0-1, classifier re-training = 2-3
TOTAL = sum(EPOCHS)
STEPS = 2  # batches per epoch: 45 training images (n_max 20, IF 100) in batches of 32
ARGS = ["run", "method", "--method", "plain", "--dataset", "fmnistlt", "--if", "100", "--epochs", "2+2",
        "--seeds", "0", "--set", "data.n_max=20", "--set", "data.test_per_class=5", "--set", "data.augment=none",
        "--set", "optim.batch_size=32", "--set", "train.eval_interval=1",
        "--set", "method.depth=8"]  # ResNet-8: where a run resumes does not depend on the depth
PROCESS_LIMIT_S = 600
SEED = int(os.environ.get("HARNESS_TEST_KILL_SEED", "20230601"))


@dataclass
class Invocation:
    returncode: int
    stderr: str
    events: list[dict]

    @property
    def start(self) -> int:
        """The global epoch this process started training at."""
        (start,) = [e for e in self.events if e["event"] == "start"]
        return start["epoch"] + (EPOCHS[0] if start["stage"] == 1 else 0)

    @property
    def epochs(self) -> list[int]:
        return [e["epoch"] for e in self.events if e["event"] == "epoch"]


@dataclass(frozen=True)
class Place:
    """A run's MLflow experiment in the module's runs folder (one SQLite store: building one costs seconds)."""

    home: Path
    experiment: str

    @property
    def folder(self) -> Path:
        """The run's checkpoint folder (checkpoint.pt, state.json)."""
        (folder,) = self.home.glob(f"checkpoints/{self.experiment}/*/")
        return folder


def launch(place: Place, tag: str, pause: str = "", resume: bool = False) -> tuple[WarmProcess, Path, Path]:
    """Start `harness run method` under the pause plugin; one torch thread (a shared 2-core machine). The process is
    forked from the warm CLI server (tests/warm_cli.py: no import start-up; SIGINT raises KeyboardInterrupt in it
    as in a terminal, whatever pytest's own disposition)."""
    home = place.home
    events, stderr = home / f"{place.experiment}-{tag}.events", home / f"{place.experiment}-{tag}.stderr"
    path = os.pathsep.join(p for p in (str(PLUGINS), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "HARNESS_HOME": str(home), "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
           "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "HARNESS_TEST_EVENTS": str(events),
           "HARNESS_TEST_PAUSE": pause}
    with open(stderr, "w") as err:
        process = warm_cli.popen(["--plugin", "pause_points", *ARGS, "--experiment", place.experiment,
                                  *(["--resume"] * resume)], env=env, stdout=subprocess.DEVNULL, stderr=err)
    return process, events, stderr


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def invoke(place: Place, tag: str, pause: str = "", signum: int | None = None, resume: bool = True) -> Invocation:
    """Run the CLI once; with `pause`, wait until it pauses there and send it `signum`."""
    process, events, stderr = launch(place, tag, pause, resume)
    deadline = time.monotonic() + PROCESS_LIMIT_S
    while pause and process.poll() is None and time.monotonic() < deadline:
        if any(e["event"] == "paused" for e in read_events(events)):
            process.send_signal(signum)
            break
        time.sleep(0.05)
    try:
        returncode = process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    invocation = Invocation(returncode, stderr.read_text(), read_events(events))
    if pause:
        assert {"event": "paused", "at": pause} in invocation.events, f"never paused at {pause}: {invocation.stderr}"
    return invocation


def resume_point(pause: str) -> int:
    """The first epoch a run killed at `pause` has not checkpointed: where its resume must start."""
    kind, number = pause.split(":")[:2]
    if kind == "before_stage":
        return sum(EPOCHS[: int(number)])
    return int(number) + (kind in ("written", "after_checkpoint"))


def timeline(pause: str) -> tuple[int, int]:
    kind, *numbers = pause.split(":")
    if kind == "before_stage":
        return resume_point(pause), 0
    phase = {"step": 1 + int(numbers[-1]), "after_epoch": 10, "writing": 11, "written": 12, "after_checkpoint": 13}
    return int(numbers[0]), phase[kind]


def kill_plan(rng: random.Random) -> list[str]:
    """One SIGKILL point inside stage 1, one at the stage switch, one inside stage 2, in the order they happen;
    one of the three, chosen at random, is during a checkpoint write (half its bytes in the temporary file)."""
    steps = [f"step:{g}:{j}" for g in range(TOTAL) for j in range(STEPS)]
    regions = {
        "stage 1": [p for p in steps if p.startswith("step:0")] + ["after_epoch:0", "after_checkpoint:0",
                                                                     "step:1:0", "step:1:1"],
        "stage switch": ["after_epoch:1", "after_checkpoint:1", "before_stage:1"],
        "stage 2": [p for p in steps if p.startswith(("step:2", "step:3"))] + ["after_epoch:2", "after_checkpoint:2",
                                                                              "after_epoch:3"],
    }
    writes = {"stage 1": "writing:0", "stage switch": "writing:1", "stage 2": "writing:2"}
    during_write = rng.choice(sorted(regions))
    plan = [writes[r] if r == during_write else rng.choice(regions[r]) for r in regions]
    return sorted(plan, key=timeline)


class Reference:
    """The uninterrupted run, started when the module starts so it trains while the first test does."""

    def __init__(self, home: Path) -> None:
        self.place = Place(home, "reference")
        self.process, self.events, self.stderr = launch(self.place, "run")
        self.lock = threading.Lock()  # the scenarios ask for the result from their threads

    def result(self) -> tuple[dict, dict]:
        with self.lock:
            assert self.process.wait(timeout=PROCESS_LIMIT_S) == 0, self.stderr.read_text()
            assert [e["epoch"] for e in read_events(self.events) if e["event"] == "epoch"] == list(range(TOTAL))
            return final_metrics(self.place), metric_history(self.place)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def reference(home) -> Reference:
    reference = Reference(home)
    yield reference
    if reference.process.poll() is None:
        reference.process.kill()


def state(place: Place) -> dict:
    return json.loads((place.folder / "state.json").read_text())


def final_metrics(place: Place) -> dict:
    return state(place)["metrics"]


MLFLOW_READS = threading.Lock()  # one scenario thread at a time reads the store (each opens its own client)


def client(place: Place):
    from mlflow.tracking import MlflowClient  # here: importing mlflow costs seconds at collection

    return MlflowClient(f"sqlite:///{place.home / 'mlflow.db'}")


def only_run(place: Place):
    with MLFLOW_READS:
        mlflow = client(place)
        runs = mlflow.search_runs([mlflow.get_experiment_by_name(place.experiment).experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]  # a resume continues its MLflow run, never a new one
    return runs[0]


def metric_history(place: Place) -> dict[str, list[tuple[int, float]]]:
    run = only_run(place)
    with MLFLOW_READS:
        mlflow = client(place)
        return {key: sorted((m.step, m.value) for m in mlflow.get_metric_history(run.info.run_id, key))
                for key in run.data.metrics}


def assert_matches_reference(place: Place, reference: Reference) -> None:
    ref_metrics, ref_history = reference.result()
    metrics = final_metrics(place)
    assert metrics.keys() == ref_metrics.keys()
    for key, value in ref_metrics.items():  # exactly equal; NaN (a group with no classes) equals NaN
        assert metrics[key] == value or (math.isnan(metrics[key]) and math.isnan(value)), key
    history = metric_history(place)
    assert history.keys() == ref_history.keys()
    for key, values in ref_history.items():
        if is_measured(key):  # read off the clock or the process: logged once, at the end
            assert [step for step, _ in history[key]] == [TOTAL], key
        else:
            assert history[key] == values, key  # each step exactly once, with the uninterrupted run's value
    assert only_run(place).info.status == "FINISHED"


def temporary_files(place: Place) -> list[str]:
    return [p.name for p in place.folder.glob("*.tmp")]


def random_sigkills(home: Path, reference: Reference) -> None:
    plan = kill_plan(random.Random(SEED))
    place, started_at = Place(home, "killed"), 0
    for index, pause in enumerate(plan):
        run = invoke(place, f"kill{index}", pause, signal.SIGKILL, resume=index > 0)
        context = f"kill plan {plan} (HARNESS_TEST_KILL_SEED={SEED}), kill at {pause}"
        assert run.returncode == -signal.SIGKILL, context
        assert run.start == started_at, context  # resumed where the previous process stopped, not at epoch 0
        assert run.epochs == list(range(started_at, started_at + len(run.epochs))), context  # none skipped
        if pause.startswith("writing"):
            assert temporary_files(place), context  # the kill really landed inside the checkpoint write
        started_at = resume_point(pause)
    last = invoke(place, "final", resume=True)
    assert last.returncode == 0, last.stderr
    assert last.start == started_at and last.epochs == list(range(started_at, TOTAL))
    assert_matches_reference(place, reference)


def assert_interrupted(run: Invocation, code: int, place: Place) -> None:
    """One line that says to rerun with --resume, the conventional exit code, a KILLED run, a checkpoint kept."""
    assert run.returncode == code, run.stderr
    assert "Traceback" not in run.stderr
    said = [line for line in run.stderr.splitlines() if line.startswith("harness:")]
    assert len(said) == 1 and "--resume" in said[0], run.stderr
    assert only_run(place).info.status == "KILLED"
    assert (state(place)["finished"], temporary_files(place)) == (False, [])
    assert (place.folder / "checkpoint.pt").is_file()


def ctrl_c_then_sigterm(home: Path, reference: Reference) -> None:
    place = Place(home, "interrupted")
    ctrl_c = invoke(place, "sigint", "step:1:0", signal.SIGINT, resume=False)  # inside epoch 1; epoch 0 checkpointed
    assert_interrupted(ctrl_c, 130, place)
    assert "interrupted" in ctrl_c.stderr
    # SIGTERM halfway through epoch 2's checkpoint write: the temporary file is removed, the previous checkpoint
    # stays, and epoch 2's metrics are not logged now (the resume trains and logs that epoch again).
    term = invoke(place, "sigterm", "writing:2", signal.SIGTERM)
    assert_interrupted(term, 143, place)
    assert "terminated" in term.stderr
    assert term.start == 1
    last = invoke(place, "final")
    assert last.returncode == 0, last.stderr
    assert last.start == 2 and last.epochs == [2, 3]
    assert_matches_reference(place, reference)


def sigkill_after_rename(home: Path, reference: Reference) -> None:
    place = Place(home, "written")
    killed = invoke(place, "kill", "written:1", signal.SIGKILL, resume=False)
    assert killed.returncode == -signal.SIGKILL
    last = invoke(place, "final")
    assert (last.returncode, last.start) == (0, 2), last.stderr
    assert_matches_reference(place, reference)


SCENARIOS: tuple[Callable[[Path, Reference], None], ...] = (random_sigkills, ctrl_c_then_sigterm, sigkill_after_rename)


@pytest.fixture(scope="module")
def scenarios(home, reference) -> Iterator[dict[str, Future]]:
    """Every scenario, started at once in its own thread; {name: future}. Leaving waits for them all."""
    with ThreadPoolExecutor(len(SCENARIOS), thread_name_prefix="scenario") as pool:
        yield {scenario.__name__: pool.submit(scenario, home, reference) for scenario in SCENARIOS}


def test_sigkill_at_random_points_then_resume_matches_an_uninterrupted_run(scenarios):
    scenarios["random_sigkills"].result()


def test_ctrl_c_and_sigterm_leave_a_resumable_killed_run(scenarios):
    scenarios["ctrl_c_then_sigterm"].result()


def test_sigkill_after_a_checkpoint_is_renamed_before_its_metrics_are_logged(scenarios):
    scenarios["sigkill_after_rename"].result()
