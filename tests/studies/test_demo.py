"""`harness demo`: the conclusion in words against the seed spread (golden values), the head-to-tail figure data,
and the command end to end on real Fashion-MNIST-LT with two worker processes (lines per epoch off a terminal)."""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import warm_cli

from harness.studies.demo import Verdict, group_bars, head_to_tail, verdicts
from harness.studies.stats import difference


def test_difference_is_welch_with_floored_degrees_of_freedom():
    a, b = [56.1, 57.3, 55.2], [50.2, 51.0, 49.1, 50.5]
    # scipy.stats.ttest_ind(a, b, equal_var=False): t = 8.228705775884928, df = 3.663 -> floored to 3 (t975 3.182)
    se = 6.0 / 8.228705775884928
    got = difference(a, b)
    assert got["diff"] == pytest.approx(6.0)
    assert got["ci95"] == pytest.approx(3.182 * se)
    assert got["spread"] == pytest.approx(np.std(a, ddof=1))  # the larger of the two seed stds
    assert (got["n_a"], got["n_b"]) == (3, 4)
    one = difference([50.0], [40.0, 41.0])
    assert one["diff"] == 9.5 and math.isnan(one["ci95"]) and math.isnan(one["spread"])


def _records(shike: list[float], plain: list[float]) -> pd.DataFrame:
    lines = [{"row": "SHIKE", "key": "shike", "seed": s, "test/top1": v, "test/few": v / 2, "test/many": 90.0,
              "test/medium": 60.0} for s, v in enumerate(shike)]
    lines += [{"row": "Plain", "key": "plain", "seed": s, "test/top1": v, "test/few": v / 2, "test/many": 80.0 + s,
               "test/medium": 50.0} for s, v in enumerate(plain)]
    return pd.DataFrame(lines)


def test_verdicts_say_how_large_the_difference_is_against_the_seed_spread():
    clear = verdicts(_records([70.0, 71.0, 72.0], [60.0, 61.0, 62.0]), "plain", ["plain", "shike"])
    assert [(v.row, v.baseline, v.metric) for v in clear] == [("SHIKE", "Plain", "top-1"), ("SHIKE", "Plain", "few-shot")]
    top1 = clear[0]
    assert top1.diff == pytest.approx(10.0) and top1.spread == pytest.approx(1.0) and top1.separated
    text = top1.sentence()
    assert "+10.00 points" in text and "10.0x the seed spread" in text and "beyond seed noise" in text
    assert "every SHIKE seed is above every Plain seed" in text
    noisy = verdicts(_records([60.0, 66.0, 63.0], [61.0, 65.0, 62.0]), "plain", ["plain", "shike"])[0]
    assert not noisy.separated and "not told apart from seed noise" in noisy.sentence()
    single = verdicts(_records([70.0], [60.0]), "plain", ["plain", "shike"])[0]
    assert "one seed per row" in single.sentence() and "--seeds 0,1,2" in single.sentence()
    worse = Verdict("A", "B", "top-1", -5.0, 1.0, 1.0, (3, 3), True).sentence()
    assert "A is below B beyond seed noise" in worse


def test_head_to_tail_orders_classes_by_training_images_and_averages_seeds():
    per_class = pd.DataFrame([
        {"row": r, "seed": s, "class": c, "name": f"c{c}", "train_count": n, "accuracy": acc}
        for r, shift in (("Plain", 0.0), ("SHIKE", 10.0)) for s in (0, 1)
        for c, n, acc in ((0, 5, 10.0 + s + shift), (1, 50, 80.0 + 2 * s + shift), (2, 50, 60.0 + shift))
    ])
    curve = head_to_tail(per_class)
    plain = curve[curve["row"] == "Plain"]
    assert list(plain["class"]) == [1, 2, 0]  # 50, 50 (tie: class order), then 5 images
    assert list(plain["rank"]) == [0, 1, 2]
    assert list(plain["mean"]) == pytest.approx([81.0, 60.0, 10.5])
    assert list(plain["std"]) == pytest.approx([math.sqrt(2), 0.0, math.sqrt(0.5)])
    assert list(curve[curve["row"] == "SHIKE"]["mean"]) == pytest.approx([91.0, 70.0, 20.5])
    bars = group_bars(_records([70.0, 71.0], [60.0, 61.0]))
    assert bars.loc["Plain", ("many", "mean")] == pytest.approx(80.5)
    assert bars.loc["Plain", ("many", "std")] == pytest.approx(math.sqrt(0.5))
    assert bars.loc["SHIKE", ("few", "mean")] == pytest.approx(35.25)


@pytest.mark.slow
def test_demo_end_to_end_with_two_workers(tmp_path, monkeypatch):
    """Two seeds of Plain and SHIKE in two worker processes, 1+1 epochs: a line per epoch per run off a terminal,
    the two-row table, the verdict lines, and the figure and table written and logged to the parent run."""
    env = {**os.environ, "HARNESS_HOME": str(tmp_path / "home"), "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": "true"}
    done = warm_cli.run(
        ["demo", "--epochs", "1+1", "--seeds", "0,1", "--workers", "2", "--set", "data.test_per_class=20",
         "--set", "data.n_max=300", "--out", str(tmp_path / "out")], env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    for run in ("plain-fmnistlt-if100-s0", "plain-fmnistlt-if100-s1", "shike-fmnistlt-if100-s0",
                "shike-fmnistlt-if100-s1"):
        for stage in ("representation epoch 1/1", "classifier epoch 1/1"):
            assert sum(line.startswith(f"{run} {stage}") and " eta " in line for line in lines) == 1, run
    table = done.stdout.split("where the time went")[0]  # the timing table below also has one line per run
    rows = [line.split("│")[1].strip() for line in table.splitlines() if line.startswith("│")]
    assert rows == ["Plain", "SHIKE"]  # only the rows that ran
    assert done.stdout.count("SHIKE - Plain, ") == 2
    assert "ResNet-8 trunks" in done.stdout
    figure, table = tmp_path / "out" / "demo-fmnistlt-if100.png", tmp_path / "out" / "demo-fmnistlt-if100.md"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "SHIKE" in table.read_text() and "Plain" in table.read_text()
    assert "; batch 32; augment basic; peak LRs 0.075+0.05;" in table.read_text()  # the demo's recipe, said
    assert "harness ui" in done.stderr and "http://127.0.0.1:5000" in done.stderr

    from harness.tracking import Tracker

    monkeypatch.setenv("HARNESS_HOME", env["HARNESS_HOME"])
    tracker = Tracker()
    runs = tracker.search(["demo-fmnistlt-if100"])
    parent = runs[runs["tags.kind"] == "study"]["run_id"].iloc[0]
    assert {"demo-fmnistlt-if100.png", "demo-fmnistlt-if100.md"} <= set(tracker.artifact_names(parent))
    children = runs[runs["tags.kind"] != "study"]
    assert len(children) == 4 and set(children["status"]) == {"FINISHED"}
    assert set(children["params.method.depth"]) == {"8"}


def _alive_in_group(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc: a container without an init may keep the
    zombies of exited children around, and those are not left-behind work."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(group) == pgid and state != "Z":
            alive.append(int(stat.parent.name))
    return alive


PLUGINS = Path(__file__).parents[1] / "harness" / "plugins_for_tests"  # pause_points: pause at a named instant


@pytest.mark.slow
def test_sigterm_stops_every_worker_and_resume_runs_only_the_rest(tmp_path, monkeypatch):
    """SIGTERM to `run ablation --workers 2` while both worker runs are inside their second epoch (each paused there
    by the test-only pause_points plugin, which the workers import too) ends both runs (KILLED, checkpointed) and the
    parent (exit 143) with no process left behind; `--resume` then finishes both runs without re-running their first
    epoch (checkpointed before the second began, so it must not be trained again)."""
    import json
    import signal
    import time

    events = tmp_path / "events"
    env = {**os.environ, "HARNESS_HOME": str(tmp_path / "home"), "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": "true"}
    paused = {**env, "HARNESS_TEST_EVENTS": str(events), "HARNESS_TEST_PAUSE": "step:1:0",
              "PYTHONPATH": os.pathsep.join(p for p in (str(PLUGINS), os.environ.get("PYTHONPATH", "")) if p)}
    args = ["run", "ablation", "--dataset", "fmnistlt", "--if", "100", "--rows", "plain,shike", "--seeds", "0",
            "--workers", "2", "--epochs", "3+1", "--set", "method.depth=8", "--set", "data.test_per_class=10",
            "--set", "train.eval_interval=0", "--set", "data.n_max=60", "--set", "optim.batch_size=32"]
    process = warm_cli.popen(["--plugin", "pause_points", *args], env=paused, stderr=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        lines = events.read_text().splitlines() if events.exists() else []
        if sum(json.loads(line)["event"] == "paused" for line in lines) == 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, "both workers should have paused inside their second epoch"
    process.send_signal(signal.SIGTERM)
    assert process.stderr is not None
    rest = process.stderr.read()
    assert process.wait(timeout=120) == 143, rest[-2000:]
    assert "rerun with --resume" in rest and "Traceback" not in rest
    time.sleep(1)
    assert _alive_in_group(process.pid) == []  # the workers are gone with the parent

    from harness.tracking import Tracker

    monkeypatch.setenv("HARNESS_HOME", env["HARNESS_HOME"])
    runs = Tracker().search(["table4-fmnistlt-if100"])
    assert sorted(runs["status"]) == ["KILLED"] * 3  # the parent and both children

    resumed = warm_cli.run([*args, "--resume"], env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "representation epoch 1/3" not in resumed.stderr  # checkpointed epochs are not trained again
    for run in ("plain-fmnistlt-if100-s0", "shike-fmnistlt-if100-s0"):
        assert f"{run} representation epoch 2/3" in resumed.stderr
        assert f"{run} classifier epoch 1/1" in resumed.stderr
    runs = Tracker().search(["table4-fmnistlt-if100"])
    children = runs[runs["tags.kind"] != "study"]
    assert sorted(children["status"]) == ["FINISHED", "FINISHED"]
