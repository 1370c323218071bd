"""Studies that could not end in a table are refused before any training and before any MLflow run exists, with
one line that says why and what to do; the ones that can run, run end to end and are compared with the paper
column measured at the same imbalance factor. `harness tune` checks its data before any trial and fails loudly
when every trial failed."""

from __future__ import annotations

import io
import os

import pandas as pd
import pytest
from cli_support import run_cli

import harness.studies.tune as tune_mod
from harness.tracking import Tracker

FAST = ["--dataset", "fmnistlt", "--epochs", "1+1", "--set", "data.test_per_class=10", "--set", "data.n_max=50",
        "--set", "train.eval_interval=0", "--set", "data.augment=none",
        "--set", "method.depth=8"]  # ResNet-8: what these check does not depend on the depth




def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(autouse=True)
def no_global_tracking_uri():
    # Tracker.search (mlflow.search_runs) exports MLFLOW_TRACKING_URI; keep each test on its own store.
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.mark.parametrize("args, fragments", [
    (["--table", "table2", "--dataset", "imagenetlt", "--if", "256"], ["imagenetlt needs --data-root"]),
    (["--table", "table3", "--dataset", "placeslt"], ["placeslt needs --data-root"]),
    (["--table", "table5", "--rows", "b"], ["table table5: row b cannot run on backbone resnet32",
                                            "rows that run on resnet32: a, c, ac"]),
    (["--table", "table5", "--rows", "a,abc"], ["row abc cannot run on backbone resnet32", "needs resnet50"]),
    (["--table", "table1", "--if", "20"], ["table table1 compares IF 100, 50 only", "use --if 100 or --if 50"]),
    (["--table", "nope"], ["unknown table 'nope'; known tables: table1, table2, table3, table4, table5"]),
    (["--table", "table4", "--rows", "nope"], ["table table4 has no row 'nope'; rows: plain, moe"]),
])
def test_ablations_that_cannot_end_in_a_table_are_refused_before_any_run(args, fragments, capsys, harness_home):
    code, out, err = run_cli(["run", "ablation", *FAST, *args], capsys)
    line = one_line(err)
    assert code == 2 and all(f in line for f in fragments), line
    assert not harness_home.exists()  # no MLflow store, no parent run, no checkpoint folder


@pytest.mark.parametrize("args, fragment", [
    (["report", "nope"], "unknown report 'nope'; tables: table1, table2, table3, table4, table5; figures: fig1, fig3"),
    (["report", "table4", "--run-id", "abc"], "--run-id does not apply to `harness report table4` (it is for figures)"),
    (["report", "fig3", "--format", "csv"], "--format does not apply to `harness report fig3` (it is for tables)"),
    (["report", "study"], "`harness report study NAME` takes a study name"),
    (["report", "table4", "extra"], "takes no second argument ('extra')"),
    (["tune", "--dataset", "fmnistlt", "--seeds", "0,1"], "a tuning trial is one run with one seed, got 2"),
    (["--plugin", "no_such_plugin_module", "list", "tables"], "cannot import plugin module 'no_such_plugin_module'"),
])
def test_report_and_tune_options_are_checked_in_one_line(args, fragment, capsys, harness_home):
    code, _, err = run_cli(args, capsys)
    assert code == 2 and fragment in one_line(err)
    assert not (harness_home / "mlflow.db").exists()


def test_tune_with_missing_data_fails_before_any_trial(capsys, harness_home, tmp_path):
    code, _, err = run_cli(["tune", "--dataset", "cifar100lt", "--data-root", str(tmp_path / "none"),
                            "--trials", "2"], capsys)
    line = one_line(err)
    assert code == 2 and "--download" in line, line
    assert not (harness_home / "mlflow.db").exists() and not (harness_home / "optuna.db").exists()


class FailingRun:
    """Stands in for harness.runner.Run in trials: every run fails at once, as a broken method or data would."""

    def __init__(self, cfg, tracker, experiment, run_name, **kwargs):
        self.run_id = ""

    def execute(self, resume=False, progress=None):
        raise RuntimeError("boom: the method's forward pass broke")


@pytest.mark.slow
def test_tune_exits_non_zero_with_the_first_reason_when_every_trial_failed(capsys, harness_home, monkeypatch):
    monkeypatch.setattr(tune_mod, "Run", FailingRun)
    code, out, err = run_cli(["tune", *FAST, "--if", "10", "--val-per-class", "5", "--trials", "2",
                              "--study", "broken"], capsys)
    assert code == 2, out + err
    line = one_line(err)
    assert "every trial of this invocation failed; the first, trial 0: RuntimeError: boom" in line, line
    assert "2 trials (2 FAIL)" in out  # the study is still printed and logged


def report_csv(experiment: str, table: str) -> pd.DataFrame:
    """The report the ablation logged to its parent run (the one study parent of `experiment`)."""
    tracker = Tracker()
    runs = tracker.search([experiment])
    parent = runs[runs["tags.kind"] == "study"]["run_id"].iloc[0]
    return pd.read_csv(io.StringIO(tracker.load_text(parent, f"report/{table}.csv")))


@pytest.mark.slow
def test_table5_runs_end_to_end_and_its_summary_is_the_report(capsys, harness_home, one_torch_thread):
    code, out, err = run_cli(["run", "ablation", "--table", "table5", "--rows", "a", *FAST], capsys)
    assert code == 0, err
    assert "SHIKE Table 5" in out and "(n=1)" in out and "cross-setting comparison" in out
    cells = report_csv("table5-fmnistlt-if100", "table5").set_index("key")
    assert (cells.loc["a", "n"], cells.loc["a", "paper"], cells.loc["a", "status"]) == (1, 54.10, "ok")
    assert cells.loc["a", "diff"] == pytest.approx(cells.loc["a", "mean"] - 54.10, abs=1e-3)
    assert cells.loc["c", "status"] == "no runs" and cells.loc["b", "status"] == "no runs"  # b: ResNet-50 only


@pytest.mark.slow
def test_table1_at_if_50_is_compared_with_the_papers_if_50_column(capsys, harness_home, one_torch_thread):
    code, out, err = run_cli(["run", "ablation", "--table", "table1", "--rows", "shike", "--if", "50", *FAST], capsys)
    assert code == 0, err
    cells = report_csv("table1-fmnistlt-if50", "table1").set_index(["key", "column"])
    assert cells.loc[("shike", "IF 50"), "n"] == 1 and cells.loc[("shike", "IF 50"), "paper"] == 59.8
    assert cells.loc[("shike", "IF 50"), "diff"] == pytest.approx(cells.loc[("shike", "IF 50"), "mean"] - 59.8,
                                                                  abs=1e-3)
    assert cells.loc[("shike", "IF 100"), "n"] == 0 and cells.loc[("shike", "IF 100"), "status"] == "no runs"
