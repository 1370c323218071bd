"""`harness report table1..table5` and `harness report fig1|fig3|fig4`: the paper's tables and figures from
whatever MLflow runs exist (the local store, or any `--tracking-uri`).

Tables: the default experiment is the newest one named `<table>-*` (one study), or every experiment for tables
whose columns span datasets or imbalance factors (Tables 1 and 2); `--experiment` overrides. The rendered table
(md and csv, plus the chosen format) is logged under `report/` of the newest study parent run, and Table 4 also
draws Figures 3 and 4 from its runs. Figures: PNG files under `<runs>/reports/`, logged under `figures/` of the
run they come from and of its parent; the path is printed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from harness.errors import HarnessError
from harness.tracking import Tracker, runs_dir
from harness.methods.branches import branch_names
from harness.methods.models.moe import default_dkf_sources
from harness.methods.shike import parse_sources
from harness.studies import figures
from harness.studies.report import FORMATS, Report, build_report, display_frame, footer, newest_parent, render
from harness.studies.tables import TABLES, TableSpec

FIGURES = {"fig1": "SHIKE Fig. 1: best branch per class of a ResNet-32 (`branches` method)",
           "fig3": "SHIKE Fig. 3: per-expert per-class accuracy of a SHIKE run; classes won per group",
           "fig4": "SHIKE Fig. 4: hardest-negative probability, plain vs SHIKE"}
TABLE_FIGURES = {"table4": ("fig3", "fig4")}  # figures drawn from a table's own runs


def note(text: str) -> None:
    """A line for the user on stderr, so stdout carries only the table (csv, md, ...) or the figure path."""
    print(text, file=sys.stderr)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("report", help="the paper's tables and figures from MLflow runs")
    kinds = parser.add_subparsers(dest="what", required=True)
    for name, table in sorted(TABLES.items()):
        sub = kinds.add_parser(name, help=table.title.replace("%", "%%"))  # argparse formats help with %
        _common_options(sub)
        sub.add_argument("--format", default="rich", choices=("rich", *FORMATS),
                         help="rich (terminal, default), md, csv (one line per cell), latex or html")
        sub.add_argument("--dataset", default=None, help="measure the columns on this dataset instead of the paper's")
        sub.add_argument("--if", dest="imbalance_factor", type=float, default=None,
                         help="imbalance factor to use where the columns do not fix one")
        sub.add_argument("--out", default=None, help="also write the rendered table to this file")
        sub.add_argument("--no-figures", action="store_true", help="do not draw the table's figures")
        sub.set_defaults(func=report_table, table=name)
    for name, help_text in FIGURES.items():
        sub = kinds.add_parser(name, help=help_text)
        _common_options(sub)
        sub.add_argument("--run-id", default=None, help="the run to draw (fig4: the SHIKE run)")
        sub.add_argument("--out", default=None, help="folder for the PNG (default: <runs>/reports)")
        sub.set_defaults(func=report_figure, figure=name)
    from harness.studies.tune_cli import add_study_arguments, report_study  # the Optuna study report lives with tuning

    study = kinds.add_parser("study", help="an Optuna study: best parameters, trials and plots")
    add_study_arguments(study)
    study.set_defaults(func=report_study)


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--experiment", default=None,
                        help="MLflow experiment (default: the newest <table>-* one; all for Tables 1-2 and figures)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite in ./runs)")
    parser.add_argument("--no-log", action="store_true", help="do not log anything back to MLflow")


def spans_experiments(table: TableSpec) -> bool:
    """Whether the table's columns need runs of several studies (different datasets or imbalance factors)."""
    return len({(c.dataset, c.imbalance_factor) for c in table.columns}) > 1


def experiments_for(tracker: Tracker, table_name: str | None, chosen: str | None) -> list[str] | None:
    """`--experiment`, else the newest `<table>-*` experiment, else None (every experiment)."""
    if chosen:
        known = tracker.experiment_names()
        if chosen not in known:
            raise HarnessError(f"no experiment '{chosen}' in {tracker.uri}; experiments: {', '.join(known) or '-'}")
        return [chosen]
    if table_name is None or spans_experiments(TABLES[table_name]):
        return None
    return tracker.experiment_names(f"{table_name}-")[:1] or None


def print_rich(report: Report, searched: list[str] | None) -> None:
    frame = display_frame(report)
    where = ", ".join(searched) if searched else "all experiments"
    table = Table(title=f"{report.table.title}\n[dim]runs from {where}[/dim]")
    for column in frame.columns:
        table.add_column(str(column), justify="left" if column in ("Method", "Year") else "right")
    for line in frame.itertuples(index=False):
        values = [str(v) for v in line]
        if values[0].startswith("*"):
            table.add_row(f"[italic]{values[0].strip('*')}[/italic]", *values[1:], end_section=False)
        else:
            table.add_row(*values)
    console = Console()
    console.print(table)
    for line in footer(report):  # under the table, at the terminal's width rather than the table's
        console.print(line, markup=False, highlight=False)


def report_table(args: argparse.Namespace) -> int:
    table = TABLES[args.table]
    tracker = Tracker(args.tracking_uri)
    searched = experiments_for(tracker, table.name, args.experiment)
    runs = tracker.search(searched)
    report = build_report(runs, table, args.dataset, args.imbalance_factor)
    if args.format == "rich":
        print_rich(report, searched)
    else:
        sys.stdout.write(render(report, args.format))
        sys.stdout.flush()  # the table before any note on stderr
        if args.format == "csv":
            note("\n".join(footer(report)))
    if args.out:
        Path(args.out).write_text(render(report, "md" if args.format == "rich" else args.format))
    parent = newest_parent(runs, table)
    if parent and not args.no_log:
        _log_table(tracker, parent, report, args.format)
    if not args.no_figures:
        for name in TABLE_FIGURES.get(table.name, ()):
            try:
                path = FIGURE_MAKERS[name](tracker, runs, None, None, not args.no_log)
                note(f"{name}: {path}")
            except HarnessError as error:
                note(f"{name}: not drawn ({error})")
    return 0


def _log_table(tracker: Tracker, parent: str, report: Report, fmt: str) -> None:
    """md and csv (and the chosen format) under `report/` of the study's parent run."""
    suffix = {"md": "md", "csv": "csv", "latex": "tex", "html": "html"}
    for kind in dict.fromkeys(("md", "csv", fmt if fmt != "rich" else "md")):
        tracker.log_text(parent, render(report, kind), f"report/{report.table.name}.{suffix[kind]}")
    note(f"logged report/{report.table.name}.md and .csv to parent run {parent}")


# Figures ------------------------------------------------------------------------------------------------------

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
    epochs = f"{run.get('params.train.epochs')}+{run.get('params.train.crt_epochs')} epochs"
    top1 = float(run.get("metrics.test/top1", np.nan))
    return f"{run.get('tags.mlflow.runName')}: {data}, {epochs}, top-1 {top1:.2f}% (final epoch)"


FigureMaker = Callable[[Tracker, pd.DataFrame, "str | None", "str | None", bool], Path]
FIGURE_MAKERS: dict[str, FigureMaker] = {"fig1": make_fig1, "fig3": make_fig3, "fig4": make_fig4}


def report_figure(args: argparse.Namespace) -> int:
    tracker = Tracker(args.tracking_uri)
    runs = tracker.search(experiments_for(tracker, None, args.experiment))
    path = FIGURE_MAKERS[args.figure](tracker, runs, args.run_id, args.out, not args.no_log)
    print(path)
    return 0
