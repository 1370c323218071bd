"""A finished run is re-evaluable and rerunnable: its weights are kept, `harness eval` reproduces its logged test
figures from them without training (and adds shifted test sets, calibration and figures), `harness rerun` trains
it again from the logged config to the same final metrics on CPU and refuses when the code differs; `--config`
files carry the keys `--set` takes; every run logs what it cost."""

from __future__ import annotations

import math
import os

import pytest
from cli_support import run_cli

from harness.tracking import Tracker

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = ["--dataset", "fmnistlt", "--epochs", "1+1", "--set", "data.n_max=30", "--set", "data.test_per_class=20",
        "--set", "method.depth=8", "--set", "train.eval_interval=0", "--set", "data.augment=none"]


@pytest.fixture(autouse=True)
def own_tracking_uri():
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def runs(home):
    return Tracker(f"sqlite:///{home / 'mlflow.db'}").search()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished ncm run with a validation split (a post-hoc step, so eval must refit it to match)."""
    home = tmp_path_factory.mktemp("eval") / "runs"
    os.environ["HARNESS_HOME"] = str(home)
    try:
        code = _main(["run", "method", "--method", "ncm", *TINY, "--set", "data.val_per_class=3"])
        assert code == 0
    finally:
        os.environ.pop("HARNESS_HOME", None)
    return home


def _main(args):
    from harness.cli import main

    try:
        return main(args)
    except SystemExit as exit_:
        return exit_.code


def test_eval_reproduces_the_logged_test_figures_from_the_kept_weights(finished, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_HOME", str(finished))
    run = runs(finished).iloc[0]
    assert "final_weights.pt" in Tracker(f"sqlite:///{finished / 'mlflow.db'}").artifact_names(run["run_id"])
    code, out, err = run_cli(["eval", run["run_id"][:8], "--out", str(tmp_path)], capsys)
    assert code == 0, err
    after = runs(finished).iloc[0]
    for metric in ("top1", "balanced_acc", "medium", "few", "ece", "nll"):
        # ECE/NLL: float64 here, float32 in the training run's evaluator
        assert after[f"metrics.eval/balanced/{metric}"] == pytest.approx(run[f"metrics.test/{metric}"], rel=1e-6)
    code, out, err = run_cli(["eval", run["run_id"][:8], "--shift", "--temperature", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    after = runs(finished).iloc[0]  # temperature scaling moves calibration, never accuracy
    assert after["metrics.eval/balanced/top1"] == pytest.approx(run["metrics.test/top1"], abs=1e-6)
    assert after["metrics.eval/temperature"] > 0
    assert 0 <= after["metrics.eval/backward-50/mce"] <= 100 and not math.isnan(after["metrics.eval/forward-50/top1"])
    assert (tmp_path / "shift.png").stat().st_size > 1000 and (tmp_path / "reliability.png").stat().st_size > 1000
    assert out.count("backward-") == 5 and out.count("forward-") == 5


def test_rerun_reproduces_the_final_metrics_and_refuses_other_code(finished, capsys, monkeypatch):
    monkeypatch.setenv("HARNESS_HOME", str(finished))
    original = runs(finished).iloc[0]
    code, out, err = run_cli(["rerun", original["run_id"][:8]], capsys)
    assert code == 0, err
    assert "False" not in out and out.count("True") >= 6
    again = runs(finished)
    rerun = again[again["tags.rerun_of"] == original["run_id"]].iloc[0]
    for metric in ("test/top1", "test/few", "test/ece", "test/nll"):
        assert rerun[f"metrics.{metric}"] == original[f"metrics.{metric}"]
    tracker = Tracker(f"sqlite:///{finished / 'mlflow.db'}")
    tracker.set_tags(original["run_id"], {"git_commit": "0123456789abcdef"})
    code, _, err = run_cli(["rerun", original["run_id"][:8]], capsys)
    assert code == 2 and "was trained at commit 0123456789ab" in err and "--force" in err and len(err.splitlines()) == 1


def test_eval_refuses_an_unknown_run_in_one_line(finished, capsys, monkeypatch):
    monkeypatch.setenv("HARNESS_HOME", str(finished))
    code, _, err = run_cli(["eval", "zzzzzz"], capsys)
    assert code == 2 and "no run in" in err and len(err.splitlines()) == 1


def test_config_file_keys_apply_and_set_wins(tmp_path, capsys, harness_home):
    config = tmp_path / "run.yaml"
    config.write_text("optim:\n  lr: 0.07\n  batch_size: 16\ntrain.eval_interval: 0\nmethod.tau: 0.5\n")
    code, _, err = run_cli(["run", "method", "--method", "tau-norm", *TINY, "--config", str(config),
                            "--set", "optim.batch_size=24"], capsys)
    assert code == 0, err
    run = runs(harness_home).iloc[0]
    assert (run["params.optim.lr"], run["params.optim.batch_size"], run["params.method.tau"]) == ("0.07", "24", "0.5")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  nope: 1\n")
    code, _, err = run_cli(["run", "method", "--method", "ce", *TINY, "--config", str(bad)], capsys)
    assert code == 2 and "unknown config key 'optim.nope'" in err


def test_every_run_logs_its_cost(finished):
    run = runs(finished).iloc[0]
    assert run["metrics.cost/params_total"] == run["metrics.cost/params_inference"] > 70_000
    assert run["metrics.cost/forward_flops_per_image"] > 1e6 and run["metrics.cost/train_tflops"] > 0
    assert run["metrics.cost/train_images_per_s"] > 0 and run["metrics.cost/peak_memory_mb"] > 50
    assert 0 < run["metrics.cost/device_hours"] < 1


@pytest.fixture(scope="module")
def two_methods(tmp_path_factory):
    """ce and bsce, seeds 0 and 1, from `harness run method` (tagged so compare and reports find them)."""
    home = tmp_path_factory.mktemp("compare") / "runs"
    os.environ["HARNESS_HOME"] = str(home)
    try:
        for method in ("ce", "bsce"):
            assert _main(["run", "method", "--method", method, "--seeds", "0,1", *TINY]) == 0
    finally:
        os.environ.pop("HARNESS_HOME", None)
    return home


@pytest.mark.slow
def test_compare_pairs_seeds_and_says_when_a_difference_is_noise(two_methods, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HARNESS_HOME", str(two_methods))
    frame = runs(two_methods)
    top1 = {(m, int(s)): v for m, s, v in zip(frame["tags.row_key"], frame["params.train.seed"],
                                               frame["metrics.test/top1"])}
    diffs = [top1[("bsce", s)] - top1[("ce", s)] for s in (0, 1)]
    code, out, err = run_cli(["compare", "ce", "bsce", "--metrics", "test/top1", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    mean = sum(diffs) / 2
    assert out.startswith(f"bsce - ce, test/top1: {mean:+.2f} ±") and "n=2 seeds" in out
    half = 12.706204736174698 * abs(diffs[0] - diffs[1]) / 2 ** 0.5 / 2 ** 0.5  # t(0.975, 1) * sd / sqrt(2)
    assert f"±{half:.2f}" in out
    assert (tmp_path / "bsce-vs-ce.png").stat().st_size > 1000
    code, _, err = run_cli(["compare", "ce", "shike"], capsys)
    assert code == 2 and len(err.splitlines()) == 1


@pytest.mark.slow
def test_reports_count_method_runs_when_asked_and_add_cost_columns(two_methods, capsys, monkeypatch):
    monkeypatch.setenv("HARNESS_HOME", str(two_methods))
    code, md, err = run_cli(["report", "table1", "--format", "md", "--no-figures", "--no-log"], capsys)
    assert code == 0 and "| CE (harness) |  | no runs |" in md
    code, md, err = run_cli(["report", "table1", "--format", "md", "--no-figures", "--no-log", "--with-method-runs",
                             "--cost"], capsys)
    assert code == 0, err
    line = next(line for line in md.splitlines() if line.startswith("| CE (harness) |"))
    assert line.count("(n=2)") == 5  # top-1, parameters, inference GFLOPs, training TFLOPs and wall time
    assert "Train TFLOPs (harness)" in md and "Params (M) (harness)" in md and "GFLOPs/img (harness)" in md


@pytest.mark.slow
def test_a_table_pairs_every_row_against_a_baseline(two_methods, capsys, monkeypatch):
    monkeypatch.setenv("HARNESS_HOME", str(two_methods))
    code, out, err = run_cli(["report", "table1", "--no-figures", "--no-log", "--with-method-runs",
                              "--paired-against", "ce", "--format", "md"], capsys)
    assert code == 0, err
    assert "| bsce - ce | test/top1 | 2 |" in out
    code, _, err = run_cli(["report", "table1", "--no-figures", "--no-log", "--paired-against", "ce"], capsys)
    assert code == 2 and "no finished run of that row" in err
