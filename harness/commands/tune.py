"""`harness tune` (an Optuna study over a method's switches) and `harness report study NAME` (its report).

The study itself (optuna, workers, pruning) is `harness.studies.tune`; the search space `studies.search_space`; the
trial tables and files `studies.study_files`. This module reads options, checks them before any trial, and prints.
"""

from __future__ import annotations

import argparse
from typing import Any

from harness.commands.options import (
    add_config_options,
    add_data_options,
    add_seeds,
    check_dataset,
    positive_int,
    run_settings,
)
from harness.errors import HarnessError
from harness.naming import experiment_name


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tune", help="Optuna search over a method's switches (SHIKE: alpha, beta)")
    parser.add_argument("--method", default="shike", help="method name (harness list methods)")
    add_data_options(parser)
    parser.add_argument("--trials", type=positive_int, default=8, help="trials this invocation adds (default 8)")
    parser.add_argument("--study", default=None, help="study name (default METHOD-DATASET-ifIF)")
    parser.add_argument("--storage", default=None, help="Optuna RDB URL (default: sqlite next to the MLflow store)")
    parser.add_argument("--workers", type=positive_int, default=1, help="worker processes sharing the storage")
    parser.add_argument("--timeout", type=float, default=None, help="start no trial after S seconds")
    parser.add_argument("--space", default="", help="alpha,beta (named ranges) or name=low:high[:log],...")
    parser.add_argument("--val-per-class", type=positive_int, default=20,
                        help="validation images per class carved from the training file (the objective)")
    parser.add_argument("--refit", action="store_true",
                        help="retrain the best switches on the full training split and evaluate the test set once")
    add_seeds(parser, "the training seed of every trial (one seed: a trial is one run)")
    parser.add_argument("--sampler-seed", type=int, default=0, help="TPE seed (each worker derives its own)")
    parser.add_argument("--startup-trials", type=positive_int, default=5,
                        help="random trials before TPE models them, and complete trials before pruning (default 5)")
    parser.add_argument("--prune-warmup", type=int, default=None,
                        help="epochs before a trial may be pruned (default: half the first stage)")
    add_config_options(parser)
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite in ./runs)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default tune-STUDY)")
    parser.set_defaults(func=run_tune)


def build_plan(args: argparse.Namespace) -> Any:
    """Translate `harness tune` options into a `TunePlan`; the base config is resolved once here to fail early."""
    from harness.config import parse_assignments
    from harness.studies.search_space import parse_space
    from harness.studies.tune import TunePlan, default_storage
    from harness.tracking import Tracker

    if len(args.seeds) != 1:
        raise HarnessError(f"--seeds: a tuning trial is one run with one seed, got {len(args.seeds)} "
                           f"({','.join(map(str, args.seeds))}); run one study per seed")
    space = parse_space(args.method, args.space)
    clash = sorted(k for k in parse_assignments(args.overrides) if k.removeprefix("method.") in space)
    if clash:
        raise HarnessError(f"--set {', '.join(clash)}: these switches are searched (--space); drop the --set")
    study = args.study or experiment_name(args.method, args.dataset, args.imbalance_factor)
    tracking_uri = Tracker(args.tracking_uri).uri
    plan = TunePlan(study=study, storage=args.storage or default_storage(tracking_uri), tracking_uri=tracking_uri,
                    experiment=args.experiment or f"tune-{study}", method=args.method, space=space,
                    settings=run_settings(args), val_per_class=args.val_per_class, seed=args.seeds[0],
                    sampler_seed=args.sampler_seed, n_trials=args.trials, workers=args.workers,
                    timeout_s=args.timeout, startup_trials=args.startup_trials, prune_warmup=args.prune_warmup)
    plan.config({})
    return plan


def run_tune(args: argparse.Namespace) -> int:
    """Exits 2 with one line when the data is missing (before any trial) or when every trial of this invocation
    failed (with the first failure's reason); 1 when a worker process died."""
    from harness.studies.study_files import log_study
    from harness.studies.tune import first_failure, refit, shown_url, tune
    from harness.tracking import Tracker, runs_dir

    check_dataset(args.dataset)
    plan = build_plan(args)
    print(f"study {plan.study}: +{plan.n_trials} trials, {plan.workers} worker(s); storage {shown_url(plan.storage)}; "
          f"MLflow {plan.tracking_uri}, experiment {plan.experiment}", flush=True)
    plan, study, parent, codes = tune(plan)
    tracker = Tracker(plan.tracking_uri)
    artifacts = log_study(study, tracker, parent, list(plan.space), runs_dir() / "studies" / plan.study)
    print_study(study, parent, plan.experiment, top=5)
    print("artifacts on the parent run: " + ", ".join(artifacts))
    for index, code in enumerate(codes):
        if code != 0:
            print(f"worker {index} exited with code {code}; its running trial was marked FAIL, the study is usable")
    failure = first_failure(study, plan)
    if failure is not None:
        raise HarnessError(f"every trial of this invocation failed; the first, {failure}")
    if args.refit:
        result = refit(plan, study, tracker, parent)
        shown = ", ".join(f"{k} {v:.2f}" if v == v else f"{k} - (no class in the group)" for k, v in
                          result.metrics.items() if k.split("/")[-1] in ("top1", "many", "medium", "few"))
        print(f"refit of trial {study.best_trial.number} on the full training split (run {result.run_id[:8]}"
              f"{', already done' if result.skipped else ''}): {shown}")
    return 0 if all(code == 0 for code in codes) else 1


def report_study(args: argparse.Namespace) -> int:
    """`harness report study NAME`: trial counts, the best trials, the MLflow parent run (and files with --out)."""
    from pathlib import Path

    from harness.studies.study_files import write_study_files
    from harness.studies.tune import default_storage, open_existing
    from harness.tracking import Tracker

    if args.top < 1:
        raise HarnessError(f"--top expects an integer >= 1, got {args.top}")
    storage = args.storage or default_storage(Tracker(args.tracking_uri).uri)
    study = open_existing(args.name, storage)
    attrs = study.user_attrs
    print_study(study, attrs.get("mlflow_parent_run_id", "?"), attrs.get("experiment", "?"), top=args.top)
    if args.out:
        space = sorted({k for t in study.get_trials(deepcopy=False) for k in t.params})
        skipped = write_study_files(study, Path(args.out), space, top=args.top)
        print(f"wrote {', '.join(sorted(p.name for p in Path(args.out).iterdir()))} to {args.out}")
        for name, why in skipped.items():
            print(f"skipped {name}: {why}")
    return 0


def print_study(study: Any, parent: str, experiment: str, top: int) -> None:
    from harness.commands.output import print_frame
    from harness.studies.study_files import best_frame, state_counts
    from harness.studies.tune import OBJECTIVE

    counts = state_counts(study)
    print_frame(best_frame(study, top), f"study {study.study_name}: {sum(counts.values())} trials "
                                        f"({', '.join(f'{v} {k}' for k, v in counts.items())}); best {OBJECTIVE} first")
    print(f"MLflow experiment {experiment}, parent run {parent}")
