"""The CLI end to end on real offline data (Fashion-MNIST-LT from Debian's package) and on bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_support import run_cli

from harness.registry import METHODS

TINY = ["--dataset", "fmnistlt", "--if", "100", "--epochs", "1+1", "--set", "data.test_per_class=20",
        "--set", "train.eval_interval=0"]




@pytest.mark.parametrize("args, fragment", [
    (["run", "method", "--method", "nope", "--dataset", "fmnistlt"], "known methods: " + ", ".join(METHODS.names())),
    (["run", "method", "--method", "ce", "--dataset", "nope"], "known datasets: cifar100lt, cifar10lt, fmnistlt"),
    (["run", "method", "--method", "ce", "--dataset", "fmnistlt", "--if", "0.5"], "must be >= 1"),
    (["run", "method", "--method", "ce", "--dataset", "fmnistlt", "--set", "optim.lrr=1"], "unknown config key"),
    (["run", "method", "--method", "ce", "--dataset", "fmnistlt", "--set", "train.epochs=x"], "expected a int"),
    (["run", "method", "--method", "ce", "--dataset", "fmnistlt", "--set", "method.alpha=1"], "its switches are"),
    (["run", "method", "--method", "ce", "--dataset", "cifar100lt", "--data-root", "/nonexistent"], "--download"),
    (["run", "ablation", "--dataset", "fmnistlt", "--rows", "nope"], "has no row 'nope'"),
])
def test_bad_input_is_one_line_and_exit_2(args, fragment, capsys, harness_home):
    code, _, err = run_cli(args, capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err
    assert not (harness_home / "mlflow.db").exists()  # nothing half-written


def test_list_and_data_info(capsys):
    code, out, _ = run_cli(["data", "info", "cifar100lt", "--if", "100", "--json"], capsys)
    facts = json.loads(out)
    assert code == 0 and facts["total"] == 10_847 and facts["groups"] == {"many": 35, "medium": 35, "few": 30}
    assert facts["class_counts"][0] == 500 and facts["class_counts"][-1] == 5
    code, out, _ = run_cli(["data", "info", "fmnistlt", "--if", "100", "--json"], capsys)
    facts = json.loads(out)
    assert facts["total"] == 1236 and facts["manifest_hash"]  # the real files are installed: a manifest exists
    code, out, _ = run_cli(["list", "methods"], capsys)
    assert code == 0 and all(m in out for m in ("shike", "plain", "bsce", "la", "ce"))


def test_describe_shike_and_plain(capsys):
    _, out, _ = run_cli(["describe", "shike", "--dataset", "cifar100lt", "--json"], capsys)
    facts = json.loads(out)
    assert facts["parameters_inference"] == 1_257_808 and facts["parameters_total"] == 1_277_008
    assert abs(facts["forward_flops_per_image"] / 1e6 - 240.3) < 0.5
    _, out, _ = run_cli(["describe", "plain", "--dataset", "cifar100lt", "--json", "--set", "method.head=linear"],
                        capsys)
    facts = json.loads(out)
    assert facts["parameters_inference"] == 472_756 and abs(facts["forward_flops_per_image"] / 1e6 - 138.3) < 0.5


@pytest.mark.slow
def test_run_method_end_to_end_on_real_data(capsys, harness_home):
    from harness.tracking import Tracker

    code, out, err = run_cli(["run", "method", "--method", "plain", *TINY], capsys)
    assert code == 0, err
    assert "plain on fmnistlt IF 100" in out
    runs = Tracker().search()
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "FINISHED"
    assert {"metrics.test/top1", "metrics.test/many", "metrics.test/few", "metrics.test/ece", "metrics.loss/ce",
            "metrics.loss/bsce", "metrics.lr"} <= set(runs.columns)
    assert run["params.plan.epochs"] == "1+1" and run["tags.manifest_hash"] and run["tags.git_commit"]
    assert run["tags.mlflow.runName"] == "plain-fmnistlt-if100-s0"
    details = Tracker().load_arrays(run["run_id"], "eval_details.npz")
    assert details["per_class_acc"].shape == (10,)


def _cli(home: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "HARNESS_HOME": str(home), "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    return subprocess.Popen([sys.executable, "-m", "harness.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    args = ["run", "method", "--method", "plain", "--dataset", "fmnistlt", "--if", "100", "--epochs", "4+1",
            "--set", "data.n_max=100", "--set", "data.test_per_class=20", "--set", "train.eval_interval=0",
            "--set", "optim.batch_size=64"]
    clean = _cli(tmp_path / "clean", *args)
    victim = _cli(tmp_path / "killed", *args)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not list(checkpoints.glob("*/*/checkpoint.pt")):
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert list(checkpoints.glob("*/*/checkpoint.pt")), "no checkpoint was written before the kill"
    refused = _cli(tmp_path / "killed", *args)
    assert refused.wait() == 2 and "--resume" in refused.stderr.read()  # no silent restart over saved work
    resumed = _cli(tmp_path / "killed", *args, "--resume")
    assert resumed.wait() == 0, resumed.stderr.read()
    assert clean.wait() == 0, clean.stderr.read()

    def final(home: Path) -> dict:
        state = next((home / "checkpoints").glob("*/*/state.json"))
        return json.loads(state.read_text())["metrics"]

    assert final(tmp_path / "clean") == final(tmp_path / "killed")


TOY_TABLE = """
from harness.studies.tables import TABLES, Column, TableSpec, row

TABLES.register("toy")(TableSpec(name="toy", title="Toy table from a plugin",
                                 columns=(Column("Acc", "test/top1", "fmnistlt", 100.0),),
                                 rows=(row("CE", "ce", "ce", 40.0), row("Other", "other", None, 41.0))))
"""


@pytest.mark.slow
def test_a_plugin_table_is_reported_by_name(tmp_path):
    """`--plugin MODULE` imports a module that registers a table; `harness report TABLE` then knows it, because the
    table name is checked when the command runs, not when the parser is built."""
    (tmp_path / "toy_table_plugin.py").write_text(TOY_TABLE)
    env = {**os.environ, "HARNESS_HOME": str(tmp_path / "runs"), "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "harness.cli", "--plugin", "toy_table_plugin", "report", "toy",
                           "--format", "csv", "--no-log"], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("row,column,mean,std,n,ci95,paper,diff,status")
    assert lines[1].startswith("CE,Acc,,,0,,40.0,,no runs") and lines[2].startswith("Other,Acc,,,0,,41.0,,not runnable")
    without = subprocess.run([sys.executable, "-m", "harness.cli", "report", "toy"], env=env, capture_output=True,
                             text=True, timeout=120)
    assert without.returncode == 2 and "unknown report 'toy'; tables: table1" in without.stderr
