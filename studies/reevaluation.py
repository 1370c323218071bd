"""Finished runs evaluated again from their kept weights (`harness eval`), and logged runs trained again from their
logged config (`harness rerun`). Results go back to MLflow: `eval/<test set>/<metric>` on the evaluated run; a rerun
is a new run named `<original>-rerun` in the original's experiment, compared metric by metric with it."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from harness.calibration import ece, mce, nll
from harness.errors import HarnessError
from harness.evaluate import accuracy_metrics
from harness.reevaluate import load_run, logged_config
from harness.runner import Run, build_data, git_info
from harness.shift import BALANCED, DISTRIBUTIONS, test_distributions
from harness.tracking import Tracker

COMPARED = ("test/top1", "test/top5", "test/balanced_acc", "test/many", "test/medium", "test/few", "test/ece",
            "test/nll")


def split_metrics(loaded, split) -> dict[str, float]:
    """top-1, balanced accuracy, many/medium/few (training-count groups), ECE, MCE (15 bins) and NLL on a split."""
    preds = loaded.evaluator.predict(loaded.predictor, split)
    accuracy, _ = accuracy_metrics(preds, loaded.data.class_counts)
    logits, labels = preds.logits.cpu(), preds.labels.cpu()
    probs = F.softmax(logits, dim=1)
    return {**accuracy, "ece": ece(probs, labels), "mce": mce(probs, labels), "nll": nll(logits, labels)}


def evaluate_runs(tracker: Tracker, run_ids: list[str], shift: bool = False,
                  device: str | None = None) -> list[dict[str, Any]]:
    """One line per run and test set; each run's figures are logged to it as `eval/<test set>/<metric>`."""
    lines = []
    for run_id in run_ids:
        loaded = load_run(tracker, run_id, device)
        sets = test_distributions(loaded.data.test) if shift else {BALANCED: loaded.data.test}
        logged: dict[str, float] = {}
        with torch.no_grad():
            for name in (n for n in DISTRIBUTIONS if n in sets):
                metrics = split_metrics(loaded, sets[name])
                logged.update({f"eval/{name}/{k}": v for k, v in metrics.items()})
                lines.append({"run": run_id[:8], "method": loaded.cfg.method, "seed": loaded.cfg.train.seed,
                              "test set": name, "images": len(sets[name]), "top1": metrics["top1"],
                              "many": metrics["many"], "medium": metrics["medium"], "few": metrics["few"],
                              "ece": metrics["ece"], "mce": metrics["mce"], "nll": metrics["nll"]})
        tracker.log_metrics(run_id, logged)
    return lines


def rerun(tracker: Tracker, run_id: str, force: bool = False, progress: Any = None) -> list[dict[str, Any]]:
    """Train the logged run again (same config, seed and data; the data's manifest must match) as a new run, and
    compare its final metrics with the original's."""
    cfg, tags = logged_config(tracker, run_id)
    here = git_info()
    logged_commit = tags.get("git_commit", "unknown")
    if logged_commit != here["git_commit"] and not force:
        raise HarnessError(f"run {run_id[:8]} was trained at commit {logged_commit[:12]}, this checkout is at "
                           f"{here['git_commit'][:12]}; check that commit out, or pass --force to rerun anyway")
    data = build_data(cfg)
    if tags.get("manifest_hash") and tags["manifest_hash"] != data.manifest_hash:
        raise HarnessError(f"run {run_id[:8]} was trained on data with manifest {tags['manifest_hash']}, but "
                           f"{cfg.data.dataset} here gives {data.manifest_hash}; point data.data_root at the same "
                           "files")
    original = tracker.client.get_run(run_id)
    experiment = tracker.client.get_experiment(original.info.experiment_id).name
    name = f"{original.info.run_name}-rerun"
    result = Run(cfg, tracker, experiment, name, tags={"rerun_of": run_id}).execute(progress=progress)
    before = original.data.metrics  # MLflow keeps no NaN (a group with no classes): absent on both sides
    return [{"metric": key, "original": before.get(key, math.nan), "rerun": result.metrics[key],
             "identical": same(before.get(key, math.nan), result.metrics[key])}
            for key in COMPARED if key in result.metrics]


def same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))
