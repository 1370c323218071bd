"""`harness run method ...` (one method, one or more seeds), `harness run ablation ...` (a declared table) and
`harness demo`. The parsers are built without importing torch, mlflow or pandas; the work imports them."""

from __future__ import annotations

import argparse
import time

from harness.commands.options import (
    add_run_options,
    add_seeds,
    check_dataset,
    make_config,
    positive_int,
    run_settings,
    seed_list,
)
from harness.naming import experiment_name, run_name


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="train and evaluate: one method, or a whole ablation table")
    kinds = parser.add_subparsers(dest="kind", required=True)
    method = kinds.add_parser("method", help="one method on one dataset, for one or more seeds")
    method.add_argument("--method", required=True, help="method name (harness list methods)")
    add_seeds(method, "training seeds, one MLflow run each")
    add_run_options(method)
    method.set_defaults(func=run_method)
    ablation = kinds.add_parser("ablation", help="every row of a table (default: SHIKE Table 4) for each seed, "
                                                 "then the table")
    ablation.add_argument("--table", default="table4", help="table name (harness list tables; default table4)")
    add_seeds(ablation, "training seeds, one child run per row and seed")
    ablation.add_argument("--rows", default="", help="comma-separated row keys (default: all runnable rows)")
    ablation.add_argument("--workers", type=positive_int, default=1,
                          help="runs executed at once in separate processes (default 1: one after another)")
    add_run_options(ablation)
    ablation.set_defaults(func=run_ablation)
    demo = subparsers.add_parser("demo", help="the main job on the embedded default (Table 4 on Fashion-MNIST-LT, "
                                              "CPU schedule, local MLflow store)")
    demo.add_argument("--epochs", default=DEMO_EPOCHS, help=f"stage epochs E1+E2 (default {DEMO_EPOCHS})")
    demo.add_argument("--seeds", type=seed_list, default=[0], help="training seeds, comma-separated; default 0")
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
    from rich.console import Console

    from harness.cli import main

    argv = ["run", "ablation", "--dataset", "fmnistlt", "--if", "100", "--seeds", ",".join(map(str, args.seeds)),
            "--epochs", args.epochs, "--rows", args.rows]
    for setting in DEMO_SETTINGS:
        argv += ["--set", setting]
    if args.tracking_uri:
        argv += ["--tracking-uri", args.tracking_uri]
    Console(stderr=True).print("[bold]harness " + " ".join(argv))
    return main(argv)


def _restart(experiment: str, name: str, cfg: object) -> None:
    import shutil

    from harness.naming import checkpoint_dir
    from harness.tracking import runs_dir

    shutil.rmtree(checkpoint_dir(runs_dir(), experiment, name, cfg), ignore_errors=True)


def run_method(args: argparse.Namespace) -> int:
    import pandas as pd

    from harness.commands.output import print_frame
    from harness.progress import make_progress
    from harness.runner import Run
    from harness.tracking import Tracker

    check_dataset(args.dataset)
    configs = {seed: make_config(args, args.method, seed) for seed in args.seeds}  # validate all before training
    tracker = Tracker(args.tracking_uri)
    experiment = args.experiment or experiment_name(args.method, args.dataset, args.imbalance_factor)
    lines = []
    with make_progress() as progress:
        for seed, cfg in configs.items():
            name = run_name(args.method, args.dataset, args.imbalance_factor, seed)
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
    """Refuses (one line, before any training or MLflow run) a study that could not end in its table; otherwise
    runs it and prints its report, the same table `harness report TABLE` prints."""
    from harness.commands.output import note
    from harness.commands.report import print_report
    from harness.progress import make_progress
    from harness.studies.ablation import plan_study, run_study
    from harness.studies.tables import TABLES
    from harness.tracking import Tracker

    check_dataset(args.dataset)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()] or None
    plan = plan_study(TABLES.get(args.table), rows, args.seeds, run_settings(args), args.experiment)
    tracker = Tracker(args.tracking_uri)
    started = time.perf_counter()
    with make_progress() as progress:
        result = run_study(plan, tracker, resume=args.resume, restart=args.restart, progress=progress,
                           workers=args.workers)
    print_report(result.report, f"study {plan.experiment}, parent run {result.parent[:8]}")
    note(f"{len(result.runs)} runs in {time.perf_counter() - started:.0f} s; logged {', '.join(result.artifacts)} "
         f"to parent run {result.parent} ({tracker.uri})")
    return 0
