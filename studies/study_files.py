"""A tuning study as tables and files: one line per trial, the best trials, state counts, and the files attached to
the study's MLflow parent run (trials.csv, best_params.csv/.md and the Optuna plots). Reads trial attributes only;
optuna itself stays in `studies/tune.py`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from harness.studies.tune import OBJECTIVE, Study, save_plots
from harness.studies.writers import write_table


def trials_frame(study: Study) -> pd.DataFrame:
    """One line per trial: number, state, value, params, seconds, worker, reason, MLflow run id."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        seconds = t.duration.total_seconds() if t.duration else float("nan")
        rows.append({"trial": t.number, "state": t.state.name, OBJECTIVE: t.value, **t.params, "seconds": seconds,
                     "worker": t.user_attrs.get("worker", ""), "reason": t.user_attrs.get("reason", ""),
                     "mlflow_run_id": t.user_attrs.get("mlflow_run_id", "")})
    return pd.DataFrame(rows)


def best_frame(study: Study, top: int = 5) -> pd.DataFrame:
    """The best `top` complete trials, best first."""
    frame = trials_frame(study)
    if frame.empty:
        return frame
    done = frame[frame["state"] == "COMPLETE"].sort_values(OBJECTIVE, ascending=False).head(top)
    return done.drop(columns=["state", "reason", "worker"]).reset_index(drop=True)


def state_counts(study: Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return dict(sorted(counts.items()))


def write_study_files(study: Study, folder: Path, space: list[str], top: int = 5) -> dict[str, str]:
    """trials.csv, best_params.csv, best_params.md and the plots into `folder`; returns the plots it skipped."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trials.csv").write_text(write_table(trials_frame(study), "csv"))
    best = best_frame(study, top)
    (folder / "best_params.csv").write_text(write_table(best, "csv"))
    title = f"Best trials of study '{study.study_name}'"
    lines = () if len(best) else ("(no complete trial)",)
    (folder / "best_params.md").write_text(write_table(best, "md", title, lines))
    return save_plots(study, folder, space)


def log_study(study: Study, tracker: Any, parent: str, space: list[str], folder: Path) -> list[str]:
    """Write the study files, attach them to the parent run with the best value and counts, end the parent run.
    `tracker` is a `harness.tracking.Tracker`."""
    skipped = write_study_files(study, folder, space)
    for path in sorted(folder.iterdir()):
        tracker.log_file(parent, path)
    tags: dict[str, Any] = {f"trials_{k.lower()}": v for k, v in state_counts(study).items()}
    if any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
        best = study.best_trial
        tags.update({"best_trial": best.number, **{f"best_{k}": f"{v:.6g}" for k, v in best.params.items()}})
        tracker.log_metrics(parent, {f"best_{OBJECTIVE.replace('/', '_')}": best.value}, step=len(study.trials))
    tracker.set_tags(parent, tags)
    tracker.end(parent)
    return [p.name for p in sorted(folder.iterdir())] + [f"(skipped {k}: {v})" for k, v in skipped.items()]
