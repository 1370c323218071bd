"""SHIKE Figures 1, 3 and 4 from MLflow runs: which run a figure is drawn from, its arrays, and where the PNG goes.

A figure is drawn from a finished run's `eval_details.npz` (`studies/figures.py` draws; this module chooses the
runs and publishes the PNG): to `<runs>/reports/` or `--out`, and logged under `figures/` of the run it comes from
and of that run's parent (the study), unless logging is off.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from harness.errors import HarnessError
from harness.methods.branches import branch_names
from harness.methods.models.moe import default_dkf_sources
from harness.methods.shike import parse_sources
from harness.studies import figures
from harness.studies.report import planned_epochs
from harness.tracking import Tracker, runs_dir

TABLE_FIGURES = {"table4": ("fig3", "fig4")}  # figures drawn from a table's own runs


def _finished(runs: pd.DataFrame, method: str) -> pd.DataFrame:
    if runs.empty or "params.method" not in runs.columns:
        return runs.iloc[0:0]
    return runs[(runs["status"] == "FINISHED") & (runs["params.method"] == method)]


def _preferred(frame: pd.DataFrame, row_key: str) -> pd.DataFrame:
    """Newest last, runs of the preferred table row after the others."""
    keys = frame["tags.row_key"] if "tags.row_key" in frame.columns else pd.Series("", index=frame.index)
    return frame.assign(_pref=(keys == row_key).astype(int)).sort_values(["_pref", "start_time"])


def shike_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Finished SHIKE runs with more than one expert; full-SHIKE rows (row_key shike) and newest last."""
    found = _finished(runs, "shike")
    found = found[pd.to_numeric(found.get("params.method.experts"), errors="coerce") > 1] if len(found) else found
    return _preferred(found, "shike")


def _one(frame: pd.DataFrame, run_id: str | None, what: str) -> pd.Series:
    if run_id:
        match = frame[frame["run_id"] == run_id]
        if match.empty:
            raise HarnessError(f"run {run_id} is not a finished {what} run in the searched experiments")
        return match.iloc[-1]
    if frame.empty:
        raise HarnessError(f"no finished {what} run in the searched experiments")
    return frame.iloc[-1]


def _figure_path(out: str | None, name: str, run: pd.Series) -> Path:
    folder = Path(out) if out else runs_dir() / "reports"
    return folder / f"{name}-{run.get('tags.mlflow.runName') or run['run_id'][:8]}.png"


def _publish(tracker: Tracker, path: Path, run: pd.Series, log: bool) -> Path:
    """Log the PNG under `figures/` of the run and of its parent (the study), unless `log` is off."""
    if log:
        for run_id in dict.fromkeys((run["run_id"], run.get("tags.mlflow.parentRunId"))):
            if isinstance(run_id, str) and run_id:
                tracker.log_file(run_id, path, "figures")
    return path


def expert_names(run: pd.Series, experts: int) -> list[str]:
    """"expert 1 (layer1)" ... from the run's DKF params; plain "expert m" without DKF."""
    if str(run.get("params.method.dkf")) != "True":
        return [f"expert {m + 1}" for m in range(experts)]
    sources = parse_sources(str(run.get("params.method.dkf_sources") or "")) or default_dkf_sources(experts)
    return [f"expert {m + 1} (layer{s})" for m, s in enumerate(sources)]


def make_fig3(tracker: Tracker, runs: pd.DataFrame, run_id: str | None, out: str | None, log: bool) -> Path:
    run = _one(shike_runs(runs), run_id, "SHIKE (experts > 1)")
    details = tracker.load_arrays(run["run_id"], "eval_details.npz")
    accuracy = details["expert_per_class_acc"]
    path = figures.figure3(accuracy, details["class_counts"], expert_names(run, len(accuracy)),
                           _figure_path(out, "fig3", run), subtitle=_subtitle(run))
    return _publish(tracker, path, run, log)


def make_fig4(tracker: Tracker, runs: pd.DataFrame, run_id: str | None, out: str | None, log: bool) -> Path:
    shike = _one(shike_runs(runs), run_id, "SHIKE (experts > 1)")
    plain = _preferred(_finished(runs, "plain"), "plain")
    seeds = plain.get("params.train.seed", pd.Series(dtype=object))
    same_study = plain[(plain["experiment_id"] == shike["experiment_id"]) & (seeds == shike.get("params.train.seed"))]
    single = _one(same_study if len(same_study) else plain, None, "plain")
    probabilities = {f"plain ({single.get('tags.mlflow.runName')})":
                     tracker.load_arrays(single["run_id"], "eval_details.npz")["hardest_negative_prob"],
                     f"SHIKE ({shike.get('tags.mlflow.runName')})":
                     tracker.load_arrays(shike["run_id"], "eval_details.npz")["hardest_negative_prob"]}
    path = figures.figure4(probabilities, _figure_path(out, "fig4", shike), subtitle=_subtitle(shike))
    return _publish(tracker, path, shike, log)


def make_fig1(tracker: Tracker, runs: pd.DataFrame, run_id: str | None, out: str | None, log: bool) -> Path:
    run = _one(_preferred(_finished(runs, "branches"), ""), run_id, "branches")
    details = tracker.load_arrays(run["run_id"], "eval_details.npz")
    accuracy = details["expert_per_class_acc"]
    names = list(branch_names(parse_sources(str(run.get("params.method.shallow") or "")) or ()))
    if len(names) != len(accuracy):
        names = [f"branch {m + 1}" for m in range(len(accuracy))]
    path = figures.figure1(accuracy, details["class_counts"], names, _figure_path(out, "fig1", run),
                           subtitle=_subtitle(run))
    return _publish(tracker, path, run, log)


def _subtitle(run: pd.Series) -> str:
    data = f"{run.get('params.data.dataset')} IF {run.get('params.data.imbalance_factor')}"
    epochs = f"{planned_epochs(run.to_frame().T).iloc[0]} epochs"
    top1 = float(run.get("metrics.test/top1", np.nan))
    return f"{run.get('tags.mlflow.runName')}: {data}, {epochs}, top-1 {top1:.2f}% (final epoch)"


FigureMaker = Callable[[Tracker, pd.DataFrame, "str | None", "str | None", bool], Path]
FIGURE_MAKERS: dict[str, FigureMaker] = {"fig1": make_fig1, "fig3": make_fig3, "fig4": make_fig4}
