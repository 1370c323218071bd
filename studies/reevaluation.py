"""Finished runs evaluated again from their kept weights (`harness eval`), and logged runs trained again from their
logged config (`harness rerun`). Results go back to MLflow: `eval/<test set>/<metric>` on the evaluated run; a rerun
is a new run named `<original>-rerun` in the original's experiment, compared metric by metric with it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from harness.calibration import CalibrationBins, apply_temperature, calibration_bins, ece, fit_temperature, mce, nll
from harness.errors import HarnessError
from harness.evaluate import accuracy_metrics
from harness.reevaluate import load_run, logged_config
from harness.runner import Run, build_data, git_info
from harness.shift import BALANCED, DISTRIBUTIONS, test_distributions
from harness.tracking import Tracker

COMPARED = ("test/top1", "test/top5", "test/balanced_acc", "test/many", "test/medium", "test/few", "test/ece",
            "test/nll")


@dataclass
class Evaluation:
    """What `evaluate_runs` found: table lines, top-1 per test set by run label (the shift curve) and the balanced
    test set's calibration bins by run label (the reliability diagrams)."""

    lines: list[dict[str, Any]] = field(default_factory=list)
    curves: dict[str, dict[str, float]] = field(default_factory=dict)
    bins: dict[str, CalibrationBins] = field(default_factory=dict)


def split_logits(loaded, split) -> tuple[torch.Tensor, torch.Tensor, Any]:
    preds = loaded.evaluator.predict(loaded.predictor, split)
    return preds.logits.cpu(), preds.labels.cpu(), preds


def split_metrics(loaded, split, temperature: float | None = None) -> tuple[dict[str, float], CalibrationBins]:
    """top-1, balanced accuracy, many/medium/few (training-count groups), ECE, MCE (15 bins) and NLL on a split;
    with `temperature`, the calibration figures are those of the temperature-scaled logits (accuracy is unchanged)."""
    logits, labels, preds = split_logits(loaded, split)
    accuracy, _ = accuracy_metrics(preds, loaded.data.class_counts)
    if temperature is not None:
        logits = apply_temperature(logits, temperature)
    probs = F.softmax(logits, dim=1)
    metrics = {**accuracy, "ece": ece(probs, labels), "mce": mce(probs, labels), "nll": nll(logits, labels)}
    return metrics, calibration_bins(probs, labels)


def validation_temperature(loaded) -> float:
    """Temperature scaling (Guo et al. 2017) fitted on the run's validation split, never on test."""
    if loaded.data.val is None:
        raise HarnessError(f"run {loaded.run_id[:8]} has no validation split (data.val_per_class=0), and "
                           "temperature scaling is fitted on one: rerun it with --set data.val_per_class=K")
    logits, labels, _ = split_logits(loaded, loaded.data.val)
    return fit_temperature(logits, labels)


def evaluate_runs(tracker: Tracker, run_ids: list[str], shift: bool = False, device: str | None = None,
                  temperature: bool = False) -> Evaluation:
    """One line per run and test set; each run's figures are logged to it as `eval/<test set>/<metric>` (and
    `eval/temperature` with `temperature`)."""
    found = Evaluation()
    for run_id in run_ids:
        loaded = load_run(tracker, run_id, device)
        label = f"{loaded.cfg.method} s{loaded.cfg.train.seed} ({run_id[:8]})"
        sets = test_distributions(loaded.data.test) if shift else {BALANCED: loaded.data.test}
        with torch.no_grad():
            t = validation_temperature(loaded) if temperature else None
            logged: dict[str, float] = {} if t is None else {"eval/temperature": t}
            for name in (n for n in DISTRIBUTIONS if n in sets):
                metrics, bins = split_metrics(loaded, sets[name], t)
                logged.update({f"eval/{name}/{k}": v for k, v in metrics.items()})
                found.curves.setdefault(label, {})[name] = metrics["top1"]
                if name == BALANCED:
                    found.bins[label] = bins
                found.lines.append({"run": run_id[:8], "method": loaded.cfg.method, "seed": loaded.cfg.train.seed,
                                    "test set": name, "images": len(sets[name]), "top1": metrics["top1"],
                                    "many": metrics["many"], "medium": metrics["medium"], "few": metrics["few"],
                                    "ece": metrics["ece"], "mce": metrics["mce"], "nll": metrics["nll"],
                                    **({} if t is None else {"T": t})})
        tracker.log_metrics(run_id, logged)
    return found


def rerun(tracker: Tracker, run_id: str, force: bool = False, progress: Any = None,
          threads: int | None = None) -> list[dict[str, Any]]:
    """Train the logged run again (same config, seed and data; the data's manifest must match) as a new run, and
    compare its final metrics with the original's. On CPU it uses the run's logged torch thread count (`threads`
    overrides it; runs logged before the count was name none): another count reorders float sums."""
    cfg, tags = logged_config(tracker, run_id)
    count = threads or int(tags.get("torch_threads", 0) or 0)
    if count:
        torch.set_num_threads(count)
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
