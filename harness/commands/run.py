"""`harness run method ...` (one method, one or more seeds), `harness run ablation ...` (a declared table) and
`harness demo`. The parsers are built without importing torch, mlflow or pandas; the work imports them."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from harness.commands.options import (
    add_dispatch_options,
    add_process_options,
    add_run_options,
    add_seeds,
    check_dataset,
    dispatch_options,
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
    method.add_argument("--workers", type=positive_int, default=1,
                        help="seeds run at once in separate processes (default 1: one after another)")
    add_run_options(method)
    add_dispatch_options(method)
    add_process_options(method)
    method.set_defaults(func=run_method)
    ablation = kinds.add_parser("ablation", help="every row of a table (default: SHIKE Table 4) for each seed, "
                                                 "then the table")
    ablation.add_argument("--table", default="table4", help="table name (harness list tables; default table4)")
    add_seeds(ablation, "training seeds, one child run per row and seed")
    ablation.add_argument("--rows", default="", help="comma-separated row keys (default: all runnable rows)")
    ablation.add_argument("--workers", type=positive_int, default=1,
                          help="runs executed at once in separate processes (default 1: one after another)")
    add_run_options(ablation)
    add_dispatch_options(ablation)
    add_process_options(ablation)
    ablation.set_defaults(func=run_ablation)
    demo = subparsers.add_parser("demo", help="the main job on the embedded default: Table 4's Plain and SHIKE rows "
                                              "on Fashion-MNIST-LT IF 100, three seeds each, about 7 minutes on 2 cores")
    demo.add_argument("--epochs", default=None, help="stage epochs E1+E2 (default: the measured demo schedule)")
    demo.add_argument("--seeds", type=seed_list, default=None, help="training seeds, comma-separated (default 0,1,2)")
    demo.add_argument("--rows", default=None, help="Table 4 rows, the first is the baseline (default plain,shike)")
    demo.add_argument("--workers", type=positive_int, default=None,
                      help="runs at once, one process each (default: one per core, at most one per run)")
    demo.add_argument("--out", default=None, help="folder for the table and figure (default: RUNS/demo)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="a config override applied after the demo's own settings (repeatable)")
    demo.add_argument("--tracking-uri", default=None)
    demo.add_argument("--resume", action="store_true", help="continue an interrupted demo")
    demo.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    """Table 4's headline rows with several seeds run side by side, then the table, the difference in words
    against the seed spread, a figure, and where to look next (`harness.studies.demo`)."""
    import os

    from harness.commands.output import note, print_frame
    from harness.commands.report import print_report
    from harness.progress import make_progress
    from harness.studies import demo
    from harness.studies.ablation import plan_study, run_study
    from harness.studies.report import render
    from harness.studies.settings import RunSettings
    from harness.studies.tables import TABLES
    from harness.tracking import Tracker, runs_dir

    rows = [r.strip() for r in (args.rows or ",".join(demo.DEMO_ROWS)).split(",") if r.strip()]
    seeds = args.seeds or list(demo.DEMO_SEEDS)
    settings = RunSettings(demo.DEMO_DATASET, demo.DEMO_IF, epochs=args.epochs or demo.DEMO_EPOCHS,
                           overrides=(*demo.DEMO_SETTINGS, *args.overrides))
    plan = plan_study(TABLES.get("table4"), rows, seeds, settings, demo.DEMO_EXPERIMENT)
    workers = args.workers or max(1, min(os.cpu_count() or 1, len(rows) * len(seeds)))
    tracker = Tracker(args.tracking_uri)
    out = Path(args.out) if args.out else runs_dir() / "demo"
    note(f"harness demo: rows {', '.join(rows)} x seeds {','.join(map(str, seeds))} on {demo.DEMO_DATASET} IF "
         f"{demo.DEMO_IF:g}, epochs {settings.epochs}, ResNet-8 trunks, {workers} runs at once")
    started = time.perf_counter()
    with make_progress() as progress:
        result = run_study(plan, tracker, resume=args.resume, progress=progress, workers=workers)
    title = (f"harness demo: SHIKE Table 4 rows on {demo.DEMO_DATASET} IF {demo.DEMO_IF:g} (ResNet-8 trunks, "
             f"epochs {settings.epochs}; paper: CIFAR-100-LT, ResNet-32, 180+20)")
    report = demo.only_rows(result.report, rows, title)
    print_report(report, f"demo {plan.experiment}, parent run {result.parent[:8]}")
    for verdict in demo.verdicts(result.runs, rows[0], rows):
        print(verdict.sentence())
    print_frame(demo.timing_frame(result.runs), "where the time went, per run (each in its own process)")
    texts = {run_id: tracker.load_text(run_id, "per_class_accuracy.csv") for run_id in result.runs["run_id"]}
    curve = demo.head_to_tail(demo.per_class_accuracy(texts, result.runs))
    figure = demo.demo_figure(curve, demo.group_bars(result.runs), out / f"{plan.experiment}.png",
                              f"Table 4 rows on {demo.DEMO_DATASET} IF {demo.DEMO_IF:g}, epochs {settings.epochs}")
    table = out / f"{plan.experiment}.md"
    table.write_text(render(report, "md"))
    tracker.log_file(result.parent, figure)
    tracker.log_file(result.parent, table)
    wall = time.perf_counter() - started
    note(f"{len(result.runs)} runs in {wall / 60:.1f} min. Next: the table {table}; the figure {figure} (both also "
         f"logged to parent run {result.parent[:8]});\n  browse the runs: harness ui"
         + (f" --tracking-uri {args.tracking_uri}" if args.tracking_uri else "")
         + " then open http://127.0.0.1:5000/#/experiments?workflowType=machine_learning (experiment "
         f"{plan.experiment})")
    return 0


def _restart(experiment: str, name: str, cfg: object) -> None:
    import shutil

    from harness.naming import checkpoint_dir
    from harness.tracking import runs_dir

    shutil.rmtree(checkpoint_dir(runs_dir(), experiment, name, cfg), ignore_errors=True)


def run_method(args: argparse.Namespace) -> int:
    """One run per seed, one after another, in a local pool of --workers, or as --dispatch says (Ray tasks, SLURM
    jobs); then the final metrics of each seed. Seeds that failed on a cluster are named in one error line after the
    others' table."""
    import pandas as pd

    from harness.commands.output import print_frame
    from harness.distributed import check_processes, launch
    from harness.errors import HarnessError
    from harness.progress import make_progress
    from harness.studies.dispatch import RunJob, failure_message, make_dispatcher, run_all
    from harness.tracking import Tracker

    check_dataset(args.dataset)
    dispatcher = make_dispatcher(dispatch_options(args))
    configs = {seed: make_config(args, args.method, seed) for seed in args.seeds}  # validate all before training
    if check_processes(args.nproc_per_node, getattr(args, "workers", 1), getattr(args, "dispatch", "local"),
                       configs.values()):
        return launch(args.nproc_per_node)  # this command again, in N processes (harness.distributed)
    tracker = Tracker(args.tracking_uri)
    experiment = args.experiment or experiment_name(args.method, args.dataset, args.imbalance_factor)
    # tagged like an ablation row (row_key = the method), so `harness compare` and reports can find it
    tags = (("row_key", args.method), ("source", "run method"))
    jobs = [RunJob(cfg, experiment, run_name(args.method, args.dataset, args.imbalance_factor, seed), seed,
                   key=args.method, tags=tags) for seed, cfg in configs.items()]
    if args.restart:
        for job in jobs:
            _restart(experiment, job.name, job.cfg)
    with make_progress() as progress:
        records, failures = run_all(dispatcher, jobs, tracker.uri, args.resume, progress)
    lines = [{"method": args.method, "seed": r["seed"], "top1": r["test/top1"], "top5": r["test/top5"],
              "many": r["test/many"], "medium": r["test/medium"], "few": r["test/few"], "ece": r["test/ece"],
              "wall_s": r["wall_time_s"], "run_id": r["run_id"][:8]}
             for r in sorted(records, key=lambda r: args.seeds.index(r["seed"]))]
    if lines:
        print_frame(pd.DataFrame(lines), f"{args.method} on {args.dataset} IF {args.imbalance_factor:g} "
                                         f"(final epoch; tracking: {tracker.uri})")
    if failures:
        raise HarnessError(failure_message(failures, len(records), f"experiment {experiment} ({tracker.uri})"))
    return 0


def run_ablation(args: argparse.Namespace) -> int:
    """Refuses (one line, before any training or MLflow run) a study that could not end in its table; otherwise
    runs it and prints its report, the same table `harness report TABLE` prints."""
    from harness.commands.output import note
    from harness.commands.report import print_report
    from harness.distributed import check_processes, launch, main_only
    from harness.progress import make_progress
    from harness.studies.ablation import plan_study, run_study
    from harness.studies.tables import TABLES
    from harness.tracking import Tracker

    check_dataset(args.dataset)
    dispatch = dispatch_options(args)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()] or None
    plan = plan_study(TABLES.get(args.table), rows, args.seeds, run_settings(args), args.experiment)
    if check_processes(args.nproc_per_node, args.workers, getattr(args, "dispatch", "local"),
                       [plan.config(row, seed) for row in plan.rows for seed in plan.seeds]):
        return launch(args.nproc_per_node)  # this command again, in N processes (harness.distributed)
    tracker = main_only(Tracker(args.tracking_uri))  # under DDP: rank 0 logs the study's parent run
    started = time.perf_counter()
    with make_progress() as progress:
        result = run_study(plan, tracker, resume=args.resume, restart=args.restart, progress=progress,
                           dispatch=dispatch)
    print_report(result.report, f"study {plan.experiment}, parent run {result.parent[:8]}")
    note(f"{len(result.runs)} runs in {time.perf_counter() - started:.0f} s; logged {', '.join(result.artifacts)} "
         f"to parent run {result.parent} ({tracker.uri})")
    return 0
