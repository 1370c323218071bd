"""`harness report TABLE`, `harness report fig1|fig3|fig4` and `harness report study NAME`: the paper's tables and
figures from whatever MLflow runs exist (the local store, or any `--tracking-uri`), and an Optuna study.

TABLE is any registered table (table1..table5, or a plugin's), checked when the command runs, so the parser needs
no registry. Tables: the default experiment is the newest one named `<table>-*` (one study), or every experiment
for tables whose columns span datasets or imbalance factors (Tables 1 and 2); `--experiment` overrides. The
rendered table (md and csv, plus the chosen format) is logged under `report/` of the newest study parent run, and
Table 4 also draws Figures 3 and 4 from its runs. Figures: PNG files under `<runs>/reports/`, logged under
`figures/` of the run they come from and of its parent; the path is printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

FIGURES = {"fig1": "SHIKE Fig. 1: best branch per class of a ResNet-32 (`branches` method)",
           "fig3": "SHIKE Fig. 3: per-expert per-class accuracy of a SHIKE run; classes won per group",
           "fig4": "SHIKE Fig. 4: hardest-negative probability, plain vs SHIKE"}
FORMATS = ("rich", "md", "csv", "latex", "html")

# Every option of `harness report`, with the kinds of target it applies to (the others refuse it).
TABLE, FIGURE, STUDY = "table", "figure", "study"
OPTIONS: tuple[tuple[tuple[str, ...], dict[str, Any], tuple[str, ...]], ...] = (
    (("--experiment",), dict(default=None, help="MLflow experiment (default: the newest <table>-* one; every "
                                               "experiment for Tables 1-2 and figures)"), (TABLE, FIGURE)),
    (("--tracking-uri",), dict(default=None, help="MLflow tracking URI (default: sqlite in ./runs)"),
     (TABLE, FIGURE, STUDY)),
    (("--no-log",), dict(action="store_true", help="do not log anything back to MLflow"), (TABLE, FIGURE)),
    (("--format",), dict(default="rich", choices=FORMATS,
                         help="tables: rich (terminal, default), md, csv (one line per cell), latex or html"), (TABLE,)),
    (("--dataset",), dict(default=None, help="tables: measure the columns on this dataset instead of the paper's"),
     (TABLE,)),
    (("--if",), dict(dest="imbalance_factor", type=float, default=None,
                     help="tables: imbalance factor to use where the columns do not fix one"), (TABLE,)),
    (("--no-figures",), dict(action="store_true", help="tables: do not draw the table's figures"), (TABLE,)),
    (("--cost",), dict(action="store_true", help="tables: add cost columns (parameters in millions and GFLOPs "
                                                 "per image at inference, training TFLOPs, wall seconds), measured on "
                                                 "the first column's runs; tables 1-3 always show them"),
     (TABLE,)),
    (("--paired-against",), dict(default=None, metavar="ROW",
                                 help="tables: each row's paired difference from ROW over the seeds both ran (first "
                                      "column), flagged when within seed noise"), (TABLE,)),
    (("--with-method-runs",), dict(action="store_true", help="tables: also count `harness run method` runs of a "
                                                             "row's method (rows without switches)"), (TABLE,)),
    (("--run-id",), dict(default=None, help="figures: the run to draw (fig4: the SHIKE run)"), (FIGURE,)),
    (("--out",), dict(default=None, help="tables: also write the rendered table to this file; figures: folder for "
                                         "the PNG (default <runs>/reports); study: folder for its files"),
     (TABLE, FIGURE, STUDY)),
    (("--storage",), dict(default=None, help="study: Optuna RDB URL (default: sqlite next to the MLflow store)"),
     (STUDY,)),
    (("--top",), dict(type=int, default=5, help="study: best trials to list (default 5)"), (STUDY,)),
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="the paper's tables and figures from MLflow runs, and Optuna studies",
        description="TARGET is a table (harness list tables: table1..table5 and any plugin's), a figure "
                    f"({', '.join(f'{k}: {v}' for k, v in FIGURES.items())}), or `study NAME` (an Optuna study: "
                    "best parameters, trials and plots).")
    parser.add_argument("target", metavar="TARGET", help="TABLE, fig1, fig3, fig4 or study")
    parser.add_argument("name", nargs="?", default=None, help="with `study`: the study name (as given to harness "
                                                              "tune --study, or its default)")
    for flags, kwargs, _ in OPTIONS:
        parser.add_argument(*flags, **kwargs)
    parser.set_defaults(func=run)


def kind_of(target: str) -> str:
    return FIGURE if target in FIGURES else STUDY if target == "study" else TABLE


def check_options(args: argparse.Namespace, kind: str) -> None:
    """An option meant for another kind of target is an error, not silently ignored."""
    parser = argparse.ArgumentParser(add_help=False)
    for flags, kwargs, kinds in OPTIONS:
        action = parser.add_argument(*flags, **kwargs)
        if kind not in kinds and getattr(args, action.dest) != action.default:
            raise HarnessError(f"{flags[0]} does not apply to `harness report {args.target}` "
                               f"(it is for {' and '.join(k + 's' for k in kinds)})")
    if (kind == STUDY) != (args.name is not None):
        raise HarnessError("`harness report study NAME` takes a study name" if kind == STUDY else
                           f"`harness report {args.target}` takes no second argument ('{args.name}')")


def run(args: argparse.Namespace) -> int:
    kind = kind_of(args.target)
    check_options(args, kind)
    if kind == STUDY:
        from harness.commands.tune import report_study

        return report_study(args)
    return report_figure(args) if kind == FIGURE else report_table(args)


def print_report(report: Any, where: str) -> None:
    """A built report (`studies.report.Report`) as a rich table, the protocol and notes under it."""
    from harness.commands.output import print_frame
    from harness.studies.report import display_frame, footer

    print_frame(display_frame(report), f"{report.table.title}\n[dim]runs from {where}[/dim]",
                lines=footer(report))


def report_table(args: argparse.Namespace) -> int:
    from harness.commands.output import note
    from harness.studies.figure_runs import FIGURE_MAKERS, TABLE_FIGURES
    from harness.studies.report import build_report, experiments_for, footer, log_report, newest_parent, render
    from harness.studies.tables import TABLES
    from harness.tracking import Tracker

    table = _table(args.target, TABLES)
    if args.cost or table.cost:
        table = with_cost_columns(table)
    tracker = Tracker(args.tracking_uri)
    searched = None if args.with_method_runs and not args.experiment else experiments_for(tracker, table,
                                                                                            args.experiment)
    runs = tracker.search(searched)
    report = build_report(runs, table, args.dataset, args.imbalance_factor, method_runs=args.with_method_runs)
    if args.format == "rich":
        print_report(report, ", ".join(searched) if searched else "all experiments")
    else:
        sys.stdout.write(render(report, args.format))
        sys.stdout.flush()  # the table before any note on stderr
        if args.format == "csv":
            note("\n".join(footer(report)))
    if args.out:
        Path(args.out).write_text(render(report, "md" if args.format == "rich" else args.format))
    if args.paired_against:
        print_paired(runs, table, args)
    parent = newest_parent(runs, table)
    if parent and not args.no_log:
        formats = () if args.format == "rich" else (args.format,)
        paths = log_report(tracker, parent, report, formats)
        note(f"logged {', '.join(paths)} to parent run {parent}")
    if not args.no_figures:
        for name in TABLE_FIGURES.get(table.name, ()):
            try:
                note(f"{name}: {FIGURE_MAKERS[name](tracker, runs, None, None, not args.no_log)}")
            except HarnessError as error:
                note(f"{name}: not drawn ({error})")
    return 0


def print_paired(runs: Any, table: Any, args: argparse.Namespace) -> None:
    """Every row with runs against `--paired-against` on the first column's runs: paired over seeds, the t interval
    and '(within noise)' where it contains 0; a row whose seeds or split do not match is named and skipped."""
    from harness.commands.output import note
    from harness.studies.paired import paired_table, render_paired
    from harness.studies.report import column_runs, table_runs

    column = table.columns[0]
    on_column, _, _ = column_runs(table_runs(runs, table, args.with_method_runs), table, column, args.dataset,
                                  args.imbalance_factor)
    baseline = table.row(args.paired_against).key
    present = set(on_column["tags.row_key"]) if not on_column.empty else set()
    if baseline not in present:
        raise HarnessError(f"--paired-against {baseline}: no finished run of that row in column {column.label}")
    found = []
    for row in table.rows:
        if row.key == baseline or row.key not in present:
            continue
        try:
            found.append(paired_table(on_column, [(baseline, row.key)], [column.metric]))
        except ValueError as error:
            note(f"{row.key}: not paired ({error})")
    if found:
        import pandas as pd

        fmt = "text" if args.format in ("rich", "latex", "html") else args.format
        sys.stdout.write(render_paired(pd.concat(found, ignore_index=True), fmt))


# (label, metric, scale): what a row costs beside what it scores; SHIKE's argument is partly cost.
COST_COLUMNS = (("Params (M)", "cost/params_inference", 1e-6), ("GFLOPs/img", "cost/forward_flops_per_image", 1e-9),
                ("Train TFLOPs", "cost/train_tflops", 1.0), ("Wall (s)", "wall_time_s", 1.0))


def with_cost_columns(table: Any) -> Any:
    """The table with cost columns after its own, each measured on the runs of its first column's setting."""
    from dataclasses import replace

    first = table.columns[0]
    extra = tuple(replace(first, label=label, metric=metric, scale=scale) for label, metric, scale in COST_COLUMNS)
    return replace(table, columns=(*table.columns, *extra))


def _table(name: str, tables: Any) -> Any:
    if name not in tables:
        raise HarnessError(f"unknown report '{name}'; tables: {', '.join(tables.names())}; figures: "
                           f"{', '.join(FIGURES)}; or `study NAME`")
    return tables.get(name)


def report_figure(args: argparse.Namespace) -> int:
    from harness.studies.figure_runs import FIGURE_MAKERS
    from harness.studies.report import experiments_for
    from harness.tracking import Tracker

    tracker = Tracker(args.tracking_uri)
    runs = tracker.search(experiments_for(tracker, None, args.experiment))
    print(FIGURE_MAKERS[args.target](tracker, runs, args.run_id, args.out, not args.no_log))
    return 0
