"""Optuna tuning: search spaces, resume, failed and non-finite trials, pruning, MLflow child runs, and that a trial
never evaluates the test split. Most tests swap the harness Run for a fake one that drives the trial's hooks as the
trainer would (no training); one trains for real."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
from pathlib import Path

import pytest

import harness.evaluate
import harness.runner
import harness.studies.tune as tune_mod
from harness.cli import main
from harness.errors import HarnessError
from harness.runner import RunResult
from harness.studies.search_space import Param, parse_space
from harness.studies.settings import RunSettings
from harness.studies.tune import PARENT_ATTR, Claims, PruneHook, TunePlan, default_storage
from harness.tracking import Tracker
from harness.trainer import NonFiniteLoss

TINY = ("data.n_max=50", "data.test_per_class=7", "data.augment=none")  # test 70 images, validation 50
CLI = ["--dataset", "fmnistlt", "--if", "10", "--epochs", "1+1", "--val-per-class", "5", "--device", "cpu",
       "--startup-trials", "2", "--prune-warmup", "1"] + [arg for item in TINY for arg in ("--set", item)]


class FakeTrainer:
    """What a hook sees of the trainer: two one-epoch stages, and request_stop."""

    def __init__(self):
        self.stages = [type("StageRun", (), {"epochs": 1})(), type("StageRun", (), {"epochs": 1})()]
        self.total_epochs = 2
        self.stop_reason = None

    def request_stop(self, reason):
        self.stop_reason = reason


class FakeRun:
    """Stands in for harness.runner.Run: an MLflow child run whose hooks see one validation evaluation (epoch 0 of
    1+1, as the trainer reports it), then the final one as the run's result; no training.
    `FAILS` maps a trial number to the exception its run raises."""

    FAILS: dict[int, BaseException] = {}

    def __init__(self, cfg, tracker, experiment, run_name, *, parent_run_id=None, tags=None, hooks=()):
        self.cfg, self.tracker, self.experiment, self.name = cfg, tracker, experiment, run_name
        self.parent, self.tags, self.hooks, self.run_id = parent_run_id, tags, list(hooks), ""

    def execute(self, resume=False, progress=None):
        assert not self.cfg.train.eval_test and self.cfg.data.val_per_class == 5
        self.run_id = self.tracker.start(self.experiment, self.name, self.tags, self.parent)
        kw = self.cfg.method_kwargs
        score = 80 - 10 * abs(math.log10(kw["alpha"]) + 1) - 5 * abs(math.log10(kw["beta"]) + 2)
        number = int(self.name.rsplit("-t", 1)[1])
        trainer = FakeTrainer()
        try:
            if number in self.FAILS:
                raise self.FAILS[number]
            for hook in self.hooks:
                hook.before_train(trainer)
            for hook in self.hooks:
                hook.after_epoch(trainer, 0, {"loss/total": 1.0, "val/top1": score, "val/balanced_acc": score})
        except BaseException:
            self.tracker.end(self.run_id, "FAILED")
            raise
        if trainer.stop_reason:
            self.tracker.end(self.run_id, "KILLED")
            return RunResult(self.name, self.run_id, {}, 0.0, stopped=trainer.stop_reason)
        self.tracker.end(self.run_id)
        return RunResult(self.name, self.run_id, {"val/balanced_acc": score}, 0.0)


@pytest.fixture(autouse=True)
def no_global_tracking_uri():
    # Tracker.search goes through mlflow.search_runs, whose set_tracking_uri also exports MLFLOW_TRACKING_URI;
    # without this the next test's Tracker() would default to this test's store.
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def fake_run(monkeypatch):
    monkeypatch.setattr(tune_mod, "Run", FakeRun)
    FakeRun.FAILS = {}
    return FakeRun


def make_plan(n_trials: int, **changes) -> TunePlan:
    tracking = Tracker().uri
    settings = RunSettings(dataset="fmnistlt", imbalance_factor=10.0, epochs="1+1", device="cpu", overrides=TINY)
    plan = TunePlan(study="s", storage=default_storage(tracking), tracking_uri=tracking, experiment="tune-s",
                    method="shike", space=parse_space("shike", ""), settings=settings, val_per_class=5,
                    n_trials=n_trials, startup_trials=2, prune_warmup=1)
    return TunePlan(**{**plan.__dict__, **changes})


def states(study) -> list[str]:
    return [t.state.name for t in study.get_trials(deepcopy=False)]


def test_parse_space_named_custom_and_errors():
    assert parse_space("shike", "") == {"alpha": Param(1e-3, 1.0, True), "beta": Param(1e-4, 0.1, True)}
    assert parse_space("shike", "alpha,scale=5:50") == {"alpha": Param(1e-3, 1.0, True), "scale": Param(5, 50)}
    assert parse_space("shike", "beta=1e-5:1e-2:log")["beta"] == Param(1e-5, 1e-2, True)
    for bad in ("gamma", "dkf=0:1", "head=0:1", "alpha=1:0.1", "alpha=0:1:log", "alpha=x:1"):
        with pytest.raises(HarnessError):
            parse_space("shike", bad)


def test_claims_add_up_to_n_and_respect_the_deadline():
    claims = Claims(3, mp.get_context("spawn"))
    assert [claims.take(None) for _ in range(5)] == [True, True, True, False, False]
    assert not Claims(3, mp.get_context("spawn")).take(deadline=0.0)


@pytest.mark.slow
def test_resume_adds_trials_under_one_parent_run(harness_home, fake_run):
    _, study, parent, codes = tune_mod.tune(make_plan(3))
    assert codes == [0] and states(study) == ["COMPLETE"] * 3
    _, study, parent_again, _ = tune_mod.tune(make_plan(2))
    assert len(study.trials) == 5 and parent_again == parent == study.user_attrs[PARENT_ATTR]
    children = Tracker().search(["tune-s"], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(children["tags.mlflow.runName"]) == [f"s-t{n}" for n in range(5)]
    assert set(children["tags.trial_state"]) == {"COMPLETE"} and set(children["status"]) == {"FINISHED"}
    # The sampler of the second invocation is seeded apart from the first: no repeated proposal.
    assert len({tuple(t.params.values()) for t in study.trials}) == 5


def test_failing_and_non_finite_trials_are_recorded_and_the_study_goes_on(harness_home, fake_run):
    fake_run.FAILS = {1: RuntimeError("boom"), 2: NonFiniteLoss("non-finite loss in stage x")}
    _, study, parent, _ = tune_mod.tune(make_plan(4))
    assert states(study) == ["COMPLETE", "FAIL", "PRUNED", "COMPLETE"]
    assert "boom" in study.trials[1].user_attrs["reason"]
    assert "non-finite" in study.trials[2].user_attrs["reason"]
    children = Tracker().search(["tune-s"], f"tags.mlflow.parentRunId = '{parent}'").set_index("tags.trial_number")
    assert children.loc["1", "tags.trial_state"] == "FAIL" and children.loc["1", "status"] == "FAILED"
    assert children.loc["2", "tags.trial_state"] == "PRUNED"


def test_pruned_trials_stop_early_and_count(harness_home, fake_run):
    _, study, _, _ = tune_mod.tune(make_plan(8, prune_warmup=0))
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert len(study.trials) == 8 and pruned and all(list(t.intermediate_values) == [0] for t in pruned)
    complete = sorted(t.value for t in study.trials if t.state.name == "COMPLETE")
    assert all(t.intermediate_values[0] < complete[-1] for t in pruned)


class FakeTrial:
    def __init__(self, prune):
        self.reports, self.prune = [], prune

    def report(self, value, step):
        self.reports.append((step, value))

    def should_prune(self):
        return self.prune


def test_prune_hook_waits_for_the_warmup_and_never_prunes_the_last_epoch():
    trainer = FakeTrainer()
    trainer.stages[0].epochs, trainer.total_epochs = 4, 6  # 4+2: default warm-up is half the first stage
    hook = PruneHook(FakeTrial(prune=True))
    hook.before_train(trainer)
    assert hook.warmup == 2
    for epoch in (0, 1):
        hook.after_epoch(trainer, epoch, {"val/balanced_acc": 1.0})
    hook.after_epoch(trainer, 2, {"loss/total": 1.0})  # an epoch without evaluation reports nothing
    assert trainer.stop_reason is None and hook.trial.reports == [(0, 1.0), (1, 1.0)]
    hook.after_epoch(trainer, 5, {"val/balanced_acc": 2.0})  # the last epoch: reported, never pruned
    assert trainer.stop_reason is None
    hook.after_epoch(trainer, 3, {"val/balanced_acc": 0.5})
    assert trainer.stop_reason == "pruned after epoch 4 (val/balanced_acc 0.5000)"
    keep = PruneHook(FakeTrial(prune=False), warmup=0)
    keep.before_train(trainer)
    keep.after_epoch(trainer, 0, {"val/balanced_acc": 1.0})
    with pytest.raises(HarnessError, match="test split"):
        keep.after_epoch(trainer, 1, {"val/balanced_acc": 1.0, "test/top1": 1.0})


def test_a_different_setup_refuses_to_join_the_study(harness_home, fake_run):
    tune_mod.tune(make_plan(1))
    changed = make_plan(1, settings=RunSettings(dataset="fmnistlt", imbalance_factor=10.0, epochs="2+1",
                                                device="cpu", overrides=TINY))
    with pytest.raises(HarnessError, match="train.stage_epochs"):
        tune_mod.tune(changed)


@pytest.mark.slow
def test_running_trials_of_a_dead_worker_are_failed(harness_home, fake_run):
    plan, study, _, _ = tune_mod.tune(make_plan(1))
    orphan = study.ask()
    orphan.set_user_attr("worker", "host:4242")
    lost = tune_mod.fail_dead_workers(study, Tracker(), plan, {"host:4242": -9, "host:1": -9})
    assert lost == [1] and states(study) == ["COMPLETE", "FAIL"]
    _, study, _, _ = tune_mod.tune(make_plan(2))  # still usable: it goes on from 2 trials to 4
    assert states(study) == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]


@pytest.mark.slow
def test_cli_tune_then_report_study(harness_home, fake_run, tmp_path, capsys):
    assert main(["tune", *CLI, "--trials", "3", "--study", "cli"]) == 0
    out = capsys.readouterr().out
    assert "3 trials (3 COMPLETE)" in out and "contour_alpha_beta.png" in out
    study = tune_mod.open_existing("cli", default_storage(Tracker().uri))
    names = {a.path for a in Tracker().client.list_artifacts(study.user_attrs[PARENT_ATTR])}
    assert {"best_params.csv", "best_params.md", "trials.csv", "optimization_history.png",
            "param_importances.png", "contour_alpha_beta.png"} <= names
    assert main(["report", "study", "cli", "--out", str(tmp_path / "out")]) == 0
    assert "3 trials (3 COMPLETE)" in capsys.readouterr().out
    best = (tmp_path / "out" / "best_params.md").read_text()
    assert best.startswith("### Best trials of study 'cli'") and best.count("\n| ") == 5  # header, rule, 3 trials
    assert main(["report", "study", "nope"]) == 2
    assert "its studies: cli" in capsys.readouterr().err
    assert main(["tune", *CLI, "--set", "method.alpha=0.5"]) == 2  # a searched switch cannot also be --set


@pytest.mark.slow
def test_real_trial_sees_validation_only_and_refit_sees_test_once(harness_home, monkeypatch, capsys):
    built, predicted = [], []
    real_build, real_predict = harness.runner.build_data, harness.evaluate.Evaluator.predict

    def build_spy(cfg):
        built.append(real_build(cfg))
        return built[-1]

    def predict_spy(self, model, split):
        predicted.append(("test" if len(split) == 70 else "val", len(built)))  # by size: splits may be device copies
        return real_predict(self, model, split)

    monkeypatch.setattr(harness.runner, "build_data", build_spy)
    monkeypatch.setattr(harness.evaluate.Evaluator, "predict", predict_spy)
    assert main(["tune", *CLI, "--set", "method.depth=8", "--trials", "1", "--study", "real", "--refit"]) == 0
    trial_calls = [kind for kind, run in predicted if run == 1]
    refit_calls = [kind for kind, run in predicted if run == 2]
    assert trial_calls == ["val", "val"]  # epoch 0 and the final evaluation; never the test split
    assert refit_calls == ["test"]  # the refit has no validation split and evaluates the test set once
    assert len(built[0].val) == 50 and len(built[0].test) == 70 and built[1].val is None
    runs = Tracker().search(["tune-real"])
    trial = runs[runs["tags.kind"] == "trial"].iloc[0]
    assert trial["status"] == "FINISHED" and math.isfinite(trial["metrics.val/balanced_acc"])
    assert not any(c.startswith("metrics.test/") and not math.isnan(trial[c]) for c in runs.columns)
    refit = runs[runs["tags.kind"] == "refit"].iloc[0]
    assert refit["tags.mlflow.parentRunId"] == trial["tags.mlflow.parentRunId"]
    assert math.isfinite(refit["metrics.test/top1"]) and "refit of trial 0" in capsys.readouterr().out
    assert not any(Path(harness_home, "checkpoints", "tune-real").glob("real-t*"))  # trial folders removed
