"""The CLI end to end on real offline data (Fashion-MNIST-LT from Debian's package) and on bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import warm_cli
from cli_support import run_cli
from warm_cli import WarmProcess

from harness.registry import METHODS

# Fashion-MNIST-LT IF 100 at n_max 200 (492 training images, 200 -> 2: many, medium and few all have classes), 20 test
# images per class, ResNet-8 trunks (`method.depth=8`: the CLI's plumbing does not depend on the depth; `describe`
# below checks ResNet-32's counts).
TINY = ["--dataset", "fmnistlt", "--if", "100", "--epochs", "1+1", "--set", "data.test_per_class=20",
        "--set", "train.eval_interval=0", "--set", "data.n_max=200", "--set", "method.depth=8"]




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
def test_run_method_end_to_end_on_real_data(capsys, harness_home, one_torch_thread):
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
    assert run["params.plan.peak_lrs"] == "0.15+0.1"  # representation, then the re-trained classifier
    assert run["tags.mlflow.runName"] == "plain-fmnistlt-if100-s0"
    details = Tracker().load_arrays(run["run_id"], "eval_details.npz")
    assert details["per_class_acc"].shape == (10,)


PLUGINS = Path(__file__).parent / "plugins_for_tests"  # pause_points: records the epoch a run (re)starts at


def _cli(home: Path, *args: str, events: Path | None = None) -> WarmProcess:
    """`python -m harness.cli ARGS` in its own process (forked warm: tests/warm_cli.py); one torch thread, so two of them share 2 cores without
    stalling each other (and both compute with the same thread count, hence the same numbers). With `events`, the
    test-only plugin pause_points writes there the epoch the run starts training at (it never pauses here)."""
    env = {**os.environ, "HARNESS_HOME": str(home), "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
           "OMP_NUM_THREADS": "1"}
    plugin = []
    if events is not None:
        env.update(HARNESS_TEST_EVENTS=str(events), HARNESS_TEST_PAUSE="",
                   PYTHONPATH=os.pathsep.join(p for p in (str(PLUGINS), os.environ.get("PYTHONPATH", "")) if p))
        plugin = ["--plugin", "pause_points"]
    return warm_cli.popen([*plugin, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _loss_steps(home: Path) -> list[int]:
    """The `loss/total` steps logged in the only MLflow run of the store in `home`, duplicates kept."""
    from mlflow.tracking import MlflowClient  # here: importing mlflow costs seconds at collection

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])  # a resume adds no run
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss/total"))


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, capsys, monkeypatch):
    """Killed after its first checkpoint (3+1 epochs), refused without --resume, then resumed: it starts at the first
    epoch its checkpoint lacks (training is deterministic, so a resume that silently retrained from epoch 0 would
    still reach the same numbers), ends with the uninterrupted run's final metrics, and logs each epoch once."""
    args = ["run", "method", "--method", "plain", "--dataset", "fmnistlt", "--if", "100", "--epochs", "3+1",
            "--set", "data.n_max=100", "--set", "data.test_per_class=20", "--set", "train.eval_interval=0",
            "--set", "optim.batch_size=64", "--set", "method.depth=8"]
    clean = _cli(tmp_path / "clean", *args)
    victim = _cli(tmp_path / "killed", *args)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None and not list(checkpoints.glob("*/*/checkpoint.pt")):
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the run ended before it could be killed: " + victim.stderr.read()
    (saved,) = checkpoints.glob("*/*/checkpoint.pt")
    state = torch.load(saved, weights_only=False)
    first_missing = state["epoch"] + 3 * state["stage"]  # stage 1 (classifier re-training) starts at global epoch 3
    monkeypatch.setenv("HARNESS_HOME", str(tmp_path / "killed"))
    code, _, err = run_cli(args, capsys)  # in-process: the refusal comes before any data or model is built
    assert code == 2 and "--resume" in err  # no silent restart over saved work
    events = tmp_path / "resumed.events"
    resumed = _cli(tmp_path / "killed", *args, "--resume", events=events)
    assert resumed.wait() == 0, resumed.stderr.read()
    assert clean.wait() == 0, clean.stderr.read()
    (start,) = [e for e in map(json.loads, events.read_text().splitlines()) if e["event"] == "start"]
    assert 1 <= first_missing < 4 and start["epoch"] + 3 * start["stage"] == first_missing

    def final(home: Path) -> dict:
        state = next((home / "checkpoints").glob("*/*/state.json"))
        return json.loads(state.read_text())["metrics"]

    assert final(tmp_path / "clean") == final(tmp_path / "killed")
    assert _loss_steps(tmp_path / "killed") == _loss_steps(tmp_path / "clean") == [0, 1, 2, 3]


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
    commands = [["--plugin", "toy_table_plugin", "report", "toy", "--format", "csv", "--no-log"], ["report", "toy"]]
    with_plugin, without = [warm_cli.run(args, env=env, timeout=120) for args in commands]
    assert with_plugin.returncode == 0, with_plugin.stderr
    lines = with_plugin.stdout.splitlines()
    assert lines[0].startswith("row,column,mean,std,n,ci95,paper,diff,status")
    assert lines[1].startswith("CE,Acc,,,0,,40.0,,no runs") and lines[2].startswith("Other,Acc,,,0,,41.0,,not runnable")
    assert without.returncode == 2 and "unknown report 'toy'; tables: table1" in without.stderr
