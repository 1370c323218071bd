"""Resume, at the engine level: a run that crashes at an epoch and is resumed must train only the epochs it lacks,
end with the weights and metrics of an uninterrupted run, log every MLflow metric step exactly once, and end
FINISHED. Training is deterministic per seed, so "same final metrics" alone would also pass if `resume` silently
retrained from epoch 0; the spy on the epochs actually run and the metric history are what catch that.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from harness import checkpoint
from harness.config import resolve_config
from harness.cost import is_measured
from harness.hooks import Hook
from harness.runner import Run
from harness.tracking import Tracker, runs_dir

EPOCHS = "2+2"  # plain: representation (global epochs 0, 1), then classifier re-training (2, 3)
TOTAL = 4
SETTINGS = ["data.n_max=20", "data.test_per_class=5", "data.augment=none", "optim.batch_size=32",
            "train.eval_interval=1",  # evaluation every epoch: test/* per-epoch steps are checked too
            "method.depth=8"]  # ResNet-8: resuming does not depend on the depth


class Crash(Exception):
    """A simulated crash (an OOM, a bug in a hook): the run is marked FAILED."""


@dataclass
class Spy(Hook):
    """What a run actually did: the global epoch it (re)started at, the epochs it trained, its final weights."""

    start: int | None = None
    epochs: list[int] = field(default_factory=list)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    def before_train(self, trainer: Any) -> None:
        stage, epoch = trainer.start  # (stage index, epoch within it): the end of stage 0 reads (0, E1)
        self.start = trainer.stages[stage].first_global_epoch + epoch

    def after_epoch(self, trainer: Any, epoch: int, metrics: dict[str, Any]) -> None:
        self.epochs.append(epoch)

    def after_train(self, trainer: Any) -> None:
        self.weights = {k: v.detach().clone() for k, v in trainer.spec.model.state_dict().items()}


class CrashAt(Hook):
    """Raises `error` at one point: ("step", g) after the first batch of global epoch g, ("after_epoch", g) once
    epoch g is trained but before its checkpoint, ("before_stage", s) at the start of stage s."""

    def __init__(self, point: tuple[str, int], error: BaseException) -> None:
        self.point, self.error, self.epoch = point, error, 0

    def before_stage(self, trainer: Any, stage: Any) -> None:
        self.epoch = stage.first_global_epoch + trainer.first_epoch
        self._check(("before_stage", stage.index))

    def after_step(self, trainer: Any) -> None:
        self._check(("step", self.epoch))

    def after_epoch(self, trainer: Any, epoch: int, metrics: dict[str, Any]) -> None:
        self._check(("after_epoch", epoch))
        self.epoch = epoch + 1

    def _check(self, point: tuple[str, int]) -> None:
        if point == self.point:
            raise self.error


def execute(experiment: str, hooks: list[Hook], resume: bool = False) -> Any:
    """The one place this file touches the engine's run API."""
    cfg = resolve_config("plain", dataset="fmnistlt", imbalance_factor=100, seed=0, epochs=EPOCHS,
                         overrides=SETTINGS)
    return Run(cfg, Tracker(), experiment, "plain-s0", hooks=hooks).execute(resume=resume)


def mlflow_client() -> Any:
    from mlflow.tracking import MlflowClient  # here: importing mlflow costs seconds at collection

    return MlflowClient(Tracker().uri)


def metric_history(run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every logged value of every metric of a run, as sorted (step, value) pairs (timestamps dropped)."""
    client = mlflow_client()
    keys = client.get_run(run_id).data.metrics
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}


def same_figures(a: dict[str, float], b: dict[str, float]) -> bool:
    """Equal keys and exactly equal values; NaN equals NaN (a group with no classes, e.g. `many` on a tiny split)."""
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def run_status(run_id: str) -> str:
    return mlflow_client().get_run(run_id).info.status


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module (building a SQLite store costs seconds); each test uses its own experiment."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HARNESS_HOME", str(tmp_path_factory.mktemp("runs")))
        previous = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny batches; a second thread only contends with other processes
        try:
            yield
        finally:
            torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def reference(store):
    """The uninterrupted run everything is compared with."""
    spy = Spy()
    result = execute("reference", [spy])
    assert spy.epochs == list(range(TOTAL)) and spy.start == 0
    return result, spy, metric_history(result.run_id)


def crash_then_resume(experiment: str, crash: list[Hook], error: type[BaseException]) -> tuple[Any, Spy, str]:
    """Run with the `crash` hooks until `error` is raised, note the run's MLflow status, and resume it with a spy."""
    with pytest.raises(error):
        execute(experiment, crash)
    state = checkpoint.load_json(run_folder(experiment) / "state.json")
    crashed_status = run_status(state["run_id"])
    spy = Spy()
    result = execute(experiment, [spy], resume=True)
    assert result.run_id == state["run_id"]  # the same MLflow run continues; no second run
    return result, spy, crashed_status


def run_folder(experiment: str) -> Path:
    (folder,) = runs_dir().glob(f"checkpoints/{experiment}/*/")
    return folder


def assert_resumed_like_the_reference(result: Any, spy: Spy, epochs: list[int], reference: Any) -> None:
    ref_result, ref_spy, ref_history = reference
    assert spy.start == epochs[0] and spy.epochs == epochs  # not from epoch 0, not a finished epoch twice
    assert same_figures(result.metrics, ref_result.metrics)  # every final test figure, exactly
    for name, value in ref_spy.weights.items():
        assert torch.equal(value, spy.weights[name]), name
    history = metric_history(result.run_id)
    assert set(history) == set(ref_history)
    for key, values in ref_history.items():
        if is_measured(key):  # read off the clock or the process: logged once, at the end
            assert [step for step, _ in history[key]] == [TOTAL], key
        else:
            assert history[key] == values, key  # each step exactly once, with the uninterrupted run's value
    assert [step for step, _ in history["loss/total"]] == list(range(TOTAL))
    assert run_status(result.run_id) == "FINISHED"


# where it crashes, with what, the MLflow status that leaves, and the global epochs the resumed run must train
CASES = {
    "epoch trained but not checkpointed, stage 2": (("after_epoch", 2), KeyboardInterrupt, "KILLED", [2, 3]),
    "mid-epoch in stage 1": (("step", 1), Crash, "FAILED", [1, 2, 3]),
    "at the stage switch": (("before_stage", 1), KeyboardInterrupt, "KILLED", [2, 3]),
}
FAST_CASE = "epoch trained but not checkpointed, stage 2"  # catches both a restart from 0 and a step logged twice


@pytest.mark.parametrize("case", [pytest.param(c, marks=[] if c == FAST_CASE else [pytest.mark.slow], id=c)
                                  for c in CASES])
def test_resume_runs_only_the_missing_epochs_and_logs_each_step_once(case, reference):
    point, error, crashed_status, epochs = CASES[case]
    experiment = "crash-" + case.replace(" ", "-").replace(",", "")
    result, spy, status_after_crash = crash_then_resume(experiment, [CrashAt(point, error())], error)
    assert status_after_crash == crashed_status
    assert_resumed_like_the_reference(result, spy, epochs, reference)


def break_checkpoint_write(monkeypatch: pytest.MonkeyPatch, number: int, when: str, error: BaseException) -> None:
    """Make the `number`-th checkpoint write (1-based) raise `error`: "halfway" (half its bytes are in the temporary
    file, nothing renamed), or "after_rename" (the new checkpoint is in place, its epoch's metrics not yet logged)."""
    real_write, count = checkpoint.atomic_write_bytes, []

    def breaking_write(path: Path, write: Any) -> None:
        count.extend([path] if path.name == "checkpoint.pt" else [])
        if path.name != "checkpoint.pt" or len(count) != number:
            return real_write(path, write)
        if when == "after_rename":
            real_write(path, write)
            raise error

        def half_then_fail(handle: Any) -> None:
            buffer = io.BytesIO()
            write(buffer)
            handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            raise error

        real_write(path, half_then_fail)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", breaking_write)


# which checkpoint write breaks, how, with what, the MLflow status that leaves, the epochs the resume must train
WRITE_CASES = {
    "disk full halfway through the last checkpoint": (TOTAL, "halfway", OSError(28, "No space left on device"),
                                                      "FAILED", [TOTAL - 1]),
    "interrupt after epoch 1's checkpoint is renamed, before its metrics are logged": (
        2, "after_rename", KeyboardInterrupt(), "KILLED", [2, 3]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", WRITE_CASES)
def test_a_broken_checkpoint_write_keeps_a_consistent_checkpoint_and_history(case, reference, monkeypatch):
    """No torn or temporary file is left, the run resumes from whichever checkpoint is in place, and the history
    still has each step once (an epoch whose checkpoint made it to disk is logged even though the crash came
    before its usual flush)."""
    number, when, error, crashed_status, epochs = WRITE_CASES[case]
    experiment = "write-" + str(number) + "-" + when
    with monkeypatch.context() as patch:
        break_checkpoint_write(patch, number, when, error)
        with pytest.raises(type(error)):
            execute(experiment, [])
    folder = run_folder(experiment)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.pt", "pending.json", "state.json"]  # no temporary file left
    assert run_status(checkpoint.load_json(folder / "state.json")["run_id"]) == crashed_status
    spy = Spy()
    result = execute(experiment, [spy], resume=True)
    assert_resumed_like_the_reference(result, spy, epochs, reference)
