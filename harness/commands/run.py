"""`harness run method ...` (one method, one or more seeds) and `harness run ablation ...` (a declared table)."""

from __future__ import annotations

import argparse
import math
import shutil
import time

import pandas as pd
from rich.console import Console
from rich.table import Table

from harness.commands.options import add_run_options, check_dataset, make_config, seed_list
from harness.config import RunConfig
from harness.progress import make_progress
from harness.runner import Run, checkpoint_dir
from harness.tracking import Tracker
from harness.studies.ablation import StudyPlan, run_study, select_rows, summarize_study
from harness.studies.tables import TABLES, Row


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="train and evaluate: one method, or a whole ablation table")
    kinds = parser.add_subparsers(dest="kind", required=True)
    method = kinds.add_parser("method", help="one method on one dataset, for one or more seeds")
    method.add_argument("--method", required=True, help="method name (harness list methods)")
    method.add_argument("--seed", type=seed_list, default=[0], help="training seed(s), e.g. 0 or 0,1,2")
    add_run_options(method)
    method.set_defaults(func=run_method)
    ablation = kinds.add_parser("ablation", help="every row of a table (default: SHIKE Table 4) for each seed")
    ablation.add_argument("--table", default="table4", choices=sorted(TABLES))
    ablation.add_argument("--seeds", type=seed_list, default=[0], help="comma-separated training seeds")
    ablation.add_argument("--rows", default="", help="comma-separated row keys (default: all runnable rows)")
    ablation.add_argument("--workers", type=int, default=1,
                          help="runs executed at once in separate processes (default 1: one after another)")
    add_run_options(ablation)
    ablation.set_defaults(func=run_ablation)
    demo = subparsers.add_parser("demo", help="the main job on the embedded default (Table 4 on Fashion-MNIST-LT, "
                                              "CPU schedule, local MLflow store)")
    demo.add_argument("--epochs", default=DEMO_EPOCHS, help=f"stage epochs (default {DEMO_EPOCHS})")
    demo.add_argument("--seeds", default="0")
    demo.add_argument("--rows", default=DEMO_ROWS, help=f"Table 4 rows (default {DEMO_ROWS})")
    demo.add_argument("--tracking-uri", default=None)
    demo.set_defaults(func=run_demo)


# The embedded default: Table 4's headline rows (Plain, MoE, SHIKE) on real offline data, sized to finish in
# about ten minutes on two CPU cores (setup included). Fewer than ~250 steps per run learn little on this
# 1,236-image split, so the demo keeps 3 rows at 20+5 epochs rather than 7 rows at fewer; `harness run ablation`
# runs all seven. A 2,000-image balanced test subset keeps evaluation cheap; the protocol is printed and logged.
DEMO_EPOCHS = "20+5"
DEMO_ROWS = "plain,moe,shike"
DEMO_SETTINGS = ("data.test_per_class=200", "train.eval_interval=0")


def run_demo(args: argparse.Namespace) -> int:
    from harness.cli import main

    argv = ["run", "ablation", "--dataset", "fmnistlt", "--if", "100", "--seeds", args.seeds, "--epochs", args.epochs,
            "--rows", args.rows]
    for setting in DEMO_SETTINGS:
        argv += ["--set", setting]
    if args.tracking_uri:
        argv += ["--tracking-uri", args.tracking_uri]
    Console(stderr=True).print("[bold]harness " + " ".join(argv))
    return main(argv)


def _fmt(value: object, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:+.{digits}f}" if digits < 0 else f"{value:.{digits}f}"
    return str(value)


def print_frame(frame: pd.DataFrame, title: str, caption: str = "") -> None:
    table = Table(title=title, caption=caption or None)
    for column in frame.columns:
        table.add_column(str(column), justify="left" if column in ("row", "method") else "right")
    for _, line in frame.iterrows():
        table.add_row(*[_fmt(line[c]) for c in frame.columns])
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # logs and pipes: never truncate numbers to fit 80 columns
    console.print(table)


def _restart(experiment: str, name: str, cfg: RunConfig) -> None:
    shutil.rmtree(checkpoint_dir(experiment, name, cfg), ignore_errors=True)


def run_method(args: argparse.Namespace) -> int:
    check_dataset(args.dataset)
    tracker = Tracker(args.tracking_uri)
    configs = {seed: make_config(args, args.method, seed) for seed in args.seed}  # validate all before training
    experiment = args.experiment or f"{args.method}-{args.dataset}-if{args.imbalance_factor:g}"
    lines = []
    with make_progress() as progress:
        for seed, cfg in configs.items():
            name = f"{args.method}-{args.dataset}-if{args.imbalance_factor:g}-s{seed}"
            if args.restart:
                _restart(experiment, name, cfg)
            result = Run(cfg, tracker, experiment, name).execute(resume=args.resume, progress=progress)
            m = result.metrics
            lines.append({"method": args.method, "seed": seed, "top1": m["test/top1"], "top5": m["test/top5"],
                          "many": m["test/many"], "medium": m["test/medium"], "few": m["test/few"],
                          "ece": m["test/ece"], "wall_s": result.wall_time_s, "run_id": result.run_id[:8]})
    print_frame(pd.DataFrame(lines), f"{args.method} on {args.dataset} IF {args.imbalance_factor:g} "
                                     f"(final epoch; tracking: {tracker.uri})")
    return 0


def run_ablation(args: argparse.Namespace) -> int:
    check_dataset(args.dataset)
    table = TABLES[args.table]
    rows = select_rows(table, [r for r in args.rows.split(",") if r.strip()] or None)
    plan = StudyPlan(table, rows, tuple(args.seeds), args.dataset, args.imbalance_factor, args.experiment)

    def config_for(row: Row, seed: int) -> RunConfig:
        assert row.method is not None
        cfg = make_config(args, row.method, seed, extra=row.kwargs)
        if args.restart:
            _restart(plan.experiment, plan.run_name(row, seed), cfg)
        return cfg

    tracker = Tracker(args.tracking_uri)
    signature = {"table": table.name, "rows": [r.key for r in rows], "seeds": args.seeds, "dataset": args.dataset,
                 "if": args.imbalance_factor, "preset": args.preset, "epochs": args.epochs, "set": args.overrides}
    started = time.perf_counter()
    with make_progress() as progress:
        parent, frame = run_study(plan, config_for, tracker, resume=args.resume, signature=signature,
                                  progress=progress, workers=args.workers)
    summary = summarize_study(plan, frame)
    wall = time.perf_counter() - started
    column = table.columns[0]
    caption = ""
    if (column.dataset, column.imbalance_factor) != (args.dataset, args.imbalance_factor):
        caption = (f"paper = {column.dataset} IF {column.imbalance_factor:g}; on {args.dataset} the difference "
                   "is a cross-dataset comparison, not a reproduction gap")
    print_frame(summary, f"{table.title}\n{args.dataset} IF {args.imbalance_factor:g}, seeds {args.seeds}, "
                         f"final epoch; parent run {parent[:8]}; wall {wall:.0f} s", caption)
    return 0
