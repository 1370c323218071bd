"""Baselines I end to end: every method of Table 1 that the harness runs, through `harness run ablation` on CIFAR-100
files in the real pickle layout (generated here), one epoch per stage; then `harness report table1` over the store.
And `--preset own`: a method's own recipe reaches the logged run (its schedule, batch and shortcut)."""

from __future__ import annotations

import os

import pytest
from cli_support import run_cli

from harness.datasets.fake import write_fake_cifar
from harness.tracking import Tracker

BASELINES_I = ("focal", "cb", "cb-ce", "ldam-drw", "crt", "tau-norm", "lws", "ncm", "balms", "lade", "gcl", "wb",
               "disalign", "la-posthoc")
TINY = ["--epochs", "1+1", "--set", "data.n_max=12", "--set", "data.test_per_class=2", "--set", "method.depth=8",
        "--set", "train.eval_interval=0", "--set", "data.augment=basic", "--set", "optim.batch_size=64"]


@pytest.fixture(autouse=True)
def own_tracking_uri():
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.mark.slow
def test_every_baseline_runs_on_cifar100_files_and_fills_table1(tmp_path, capsys, harness_home, one_torch_thread):
    root = write_fake_cifar(tmp_path / "cifar", num_classes=100, per_class_train=12, per_class_test=2)
    code, out, err = run_cli(["run", "ablation", "--table", "table1", "--dataset", "cifar100lt", "--data-root",
                              str(root), "--if", "100", "--rows", ",".join(BASELINES_I), *TINY], capsys)
    assert code == 0, err
    runs = Tracker(f"sqlite:///{harness_home / 'mlflow.db'}").search()
    children = runs[runs["tags.row_key"].notna()]
    assert sorted(children["tags.row_key"]) == sorted(BASELINES_I)
    assert set(children["status"]) == {"FINISHED"}
    by_key = children.set_index("tags.row_key")
    assert by_key.loc["crt", "params.stage.classifier.sampler"] == "class-balanced"
    assert by_key.loc["ncm", "params.posthoc"] == "NCM" and by_key.loc["tau-norm", "params.posthoc"] == "TauNorm"
    assert by_key.loc["wb", "params.stage.classifier.constraints"] == "MaxNorm"
    assert by_key.loc["lws", "params.stage.classifier.trains"] == "calibration"
    code, md, err = run_cli(["report", "table1", "--format", "md"], capsys)
    assert code == 0, err
    for name in ("| LDAM-DRW | 2019 |", "| cRT | 2020 |", "| Weight Balancing | 2022 |", "| NCM (harness) |"):
        line = next(line for line in md.splitlines() if line.startswith(name))
        assert "(n=1)" in line, line
    assert "LDAM-DRW: own paper 42.04 at IF 100 (SHIKE quotes 44.4)." in md


@pytest.mark.slow
def test_own_preset_logs_the_methods_published_recipe(capsys, harness_home, one_torch_thread):
    code, out, err = run_cli(["run", "method", "--method", "ldam-drw", "--dataset", "fmnistlt", "--preset", "own",
                              "--epochs", "2", "--set", "data.n_max=20", "--set", "data.test_per_class=2",
                              "--set", "method.depth=8", "--set", "train.eval_interval=0"], capsys)
    assert code == 0, err
    run = Tracker(f"sqlite:///{harness_home / 'mlflow.db'}").search().iloc[0]
    assert (run["params.method.recipe"], run["params.optim.batch_size"], run["params.method.shortcut"]) == (
        "own", "128", "A")
    assert run["params.stage.end-to-end.lr"].startswith("step peak 0.1 ")
    assert run["params.stage.end-to-end.lr_steps"] == "0.8:0.01,0.9:0.0001"


BASELINES_II = ("ride", "reslt", "tlc", "ncl-3n", "paco", "bcl")


@pytest.mark.slow
def test_every_baselines_ii_method_runs_on_cifar100_files_and_fills_table1(tmp_path, capsys, harness_home,
                                                                         one_torch_thread):
    """The multi-expert and contrastive rows of Table 1 (and BBN, a Table 2 row, by `run method`), one epoch each on
    CIFAR-100 files in the real layout: multi-view batches, queues and routers go through the real CLI."""
    root = write_fake_cifar(tmp_path / "cifar", num_classes=100, per_class_train=12, per_class_test=2)
    data = ["--dataset", "cifar100lt", "--data-root", str(root), "--if", "100"]
    code, out, err = run_cli(["run", "ablation", "--table", "table1", *data, "--rows", ",".join(BASELINES_II), *TINY],
                             capsys)
    assert code == 0, err
    code, out, err = run_cli(["run", "method", "--method", "bbn", *data, *TINY], capsys)
    assert code == 0, err
    runs = Tracker(f"sqlite:///{harness_home / 'mlflow.db'}").search()
    assert set(runs[runs["tags.kind"] != "study"]["status"]) == {"FINISHED"}
    keyed = runs[runs["tags.row_key"].notna()].set_index("tags.row_key")
    assert sorted(keyed.index) == sorted((*BASELINES_II, "bbn"))  # `run method` keys its run by the method
    children = keyed.drop(index="bbn")
    assert children.loc["ride", "params.model.experts"] == "3" and children.loc["tlc", "params.model.experts"] == "4"
    for key in ("paco", "bcl"):  # two views: training FLOPs count both, so above twice the inference forward
        assert float(children.loc[key, "metrics.cost/train_tflops"]) > 0
    code, md, err = run_cli(["report", "table1", "--format", "md"], capsys)
    assert code == 0, err
    for name in ("| RIDE (3E) | 2021 |", "| PaCo | 2021 |", "| BCL | 2022 |", "| TLC (4E) | 2022 |"):
        line = next(line for line in md.splitlines() if line.startswith(name))
        assert "(n=1)" in line, line
