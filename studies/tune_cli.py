"""`harness tune` (an Optuna study over a method's switches) and the study report.

`report_study(args)` with `add_study_arguments(parser)` print a study's trial counts, best trials and artifacts; the
`report` command (studies/report_cli.py) mounts them as `harness report study NAME`. Optuna itself stays in
studies/tune.py; this module only reads trial attributes and writes tables.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table

from harness.commands.options import add_data_options, check_dataset
from harness.config import PRESETS, builder_defaults, parse_assignments
from harness.errors import HarnessError
from harness.progress import make_progress
from harness.runner import Run, RunResult
from harness.tracking import Tracker, runs_dir
from harness.registry import METHODS
from harness.studies.tune import (
    DEFAULT_SPACE,
    OBJECTIVE,
    SPACES,
    Param,
    Study,
    TunePlan,
    open_existing,
    save_plots,
    shown_url,
    tune,
)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tune", help="Optuna search over a method's switches (SHIKE: alpha, beta)")
    parser.add_argument("--method", default="shike", help="method name (harness list methods)")
    add_data_options(parser)
    parser.add_argument("--trials", type=_positive, default=8, help="trials this invocation adds (default 8)")
    parser.add_argument("--study", default=None, help="study name (default METHOD-DATASET-ifIF)")
    parser.add_argument("--storage", default=None, help="Optuna RDB URL (default: sqlite next to the MLflow store)")
    parser.add_argument("--workers", type=_positive, default=1, help="worker processes sharing the storage")
    parser.add_argument("--timeout", type=float, default=None, help="start no trial after S seconds")
    parser.add_argument("--space", default="", help="alpha,beta (named ranges) or name=low:high[:log],...")
    parser.add_argument("--val-per-class", type=_positive, default=20,
                        help="validation images per class carved from the training file (the objective)")
    parser.add_argument("--refit", action="store_true",
                        help="retrain the best switches on the full training split and evaluate the test set once")
    parser.add_argument("--seed", type=int, default=0, help="training seed of every trial")
    parser.add_argument("--sampler-seed", type=int, default=0, help="TPE seed (each worker derives its own)")
    parser.add_argument("--startup-trials", type=_positive, default=5,
                        help="random trials before TPE models them, and complete trials before pruning (default 5)")
    parser.add_argument("--prune-warmup", type=int, default=None,
                        help="epochs before a trial may be pruned (default: half the representation stage)")
    parser.add_argument("--preset", default="shike-code", choices=sorted(PRESETS), help="settings source")
    parser.add_argument("--epochs", default=None, help="E1+E2 (stage epochs) or E (E + ceil(E/9))")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. optim.lr=0.1 (not a searched switch)")
    parser.add_argument("--device", default=None, help="auto (default), cpu or cuda")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite in ./runs)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default tune-STUDY)")
    parser.set_defaults(func=run_tune)


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `harness report study NAME`."""
    parser.add_argument("name", help="study name (as given to harness tune --study, or its default)")
    parser.add_argument("--storage", default=None, help="Optuna RDB URL (default: sqlite next to the MLflow store)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (locates the default storage)")
    parser.add_argument("--top", type=_positive, default=5, help="best trials to list")
    parser.add_argument("--out", default=None, help="also write trials.csv, best_params.* and the plots here")


def parse_space(method: str, text: str) -> dict[str, Param]:
    """`alpha,beta` (named ranges of SPACES) or `name=low:high[:log]` entries; checked against the builder."""
    entries = [e.strip() for e in text.split(",") if e.strip()] or list(DEFAULT_SPACE.get(method, ()))
    switches = builder_defaults(METHODS.get(method))
    numeric = [k for k, v in switches.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    space = dict(_parse_entry(method, entry) for entry in entries)
    for name, param in space.items():
        if name not in numeric:
            raise HarnessError(f"--space: '{name}' is not a numeric switch of '{method}'; those are: "
                               f"{', '.join(numeric)}")
        if not param.low < param.high or (param.log and param.low <= 0):
            raise HarnessError(f"--space: bad range for '{name}': {param}")
    if not space:
        raise HarnessError(f"no search space for method '{method}'; pass --space name=low:high[:log],...")
    return space


def _parse_entry(method: str, entry: str) -> tuple[str, Param]:
    name, sep, spec = entry.partition("=")
    if not sep:
        if name not in SPACES.get(method, {}):
            raise HarnessError(f"--space: no named range for '{name}' of '{method}' (named: "
                               f"{', '.join(SPACES.get(method, {})) or 'none'}); write {name}=low:high[:log]")
        return name, SPACES[method][name]
    parts = spec.split(":")
    try:
        return name, Param(float(parts[0]), float(parts[1]), parts[2:] == ["log"])
    except (ValueError, IndexError):
        raise HarnessError(f"--space entry '{entry}': expected name=low:high or name=low:high:log") from None


def default_storage(tracking_uri: str) -> str:
    """SQLite next to the MLflow store (`<runs>/optuna.db`)."""
    folder = Path(tracking_uri.removeprefix("sqlite:///")).parent if tracking_uri.startswith("sqlite:///") \
        else runs_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'optuna.db'}"


def build_plan(args: argparse.Namespace) -> TunePlan:
    """Translate `harness tune` options into a plan; the base config is resolved once here to fail early."""
    space = parse_space(args.method, args.space)
    clash = sorted(k for k in parse_assignments(args.overrides) if k.removeprefix("method.") in space)
    if clash:
        raise HarnessError(f"--set {', '.join(clash)}: these switches are searched (--space); drop the --set")
    study = args.study or f"{args.method}-{args.dataset}-if{args.imbalance_factor:g}"
    tracking_uri = Tracker(args.tracking_uri).uri
    cli = {k: getattr(args, k) for k in ("dataset", "imbalance_factor", "data_root", "download", "epochs",
                                         "device", "preset", "overrides")}
    plan = TunePlan(study=study, storage=args.storage or default_storage(tracking_uri), tracking_uri=tracking_uri,
                    experiment=args.experiment or f"tune-{study}", method=args.method, space=space, cli=cli,
                    val_per_class=args.val_per_class, seed=args.seed, sampler_seed=args.sampler_seed,
                    n_trials=args.trials, workers=args.workers, timeout_s=args.timeout,
                    startup_trials=args.startup_trials, prune_warmup=args.prune_warmup)
    plan.config({})
    return plan


def run_tune(args: argparse.Namespace) -> int:
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
    if args.refit:
        result = refit(plan, study, tracker, parent)
        shown = ", ".join(f"{k} {v:.2f}" if v == v else f"{k} - (no class in the group)" for k, v in
                          result.metrics.items() if k.split("/")[-1] in ("top1", "many", "medium", "few"))
        print(f"refit of trial {study.best_trial.number} on the full training split (run {result.run_id[:8]}"
              f"{', already done' if result.skipped else ''}): {shown}")
    return 0 if all(code == 0 for code in codes) else 1


def refit(plan: TunePlan, study: Study, tracker: Tracker, parent: str) -> RunResult:
    """Train the best switches on the full training split and evaluate the test set once (a child run tagged
    refit; rerunning skips a finished refit of the same trial and resumes an interrupted one)."""
    if not any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
        raise HarnessError(f"study '{plan.study}' has no complete trial to refit")
    best = study.best_trial
    run = Run(plan.config(best.params, refit=True), tracker, plan.experiment, f"{plan.study}-refit-t{best.number}",
              parent_run_id=parent, tags={"kind": "refit", "refit": "true", "study": plan.study,
                                          "best_trial": best.number})
    with make_progress() as progress:
        return run.execute(resume=True, progress=progress)


def report_study(args: argparse.Namespace) -> int:
    """`harness report study NAME`: trial counts, the best trials, the MLflow parent run (and files with --out)."""
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


def markdown(frame: pd.DataFrame, title: str) -> str:
    if frame.empty:
        return f"# {title}\n\n(no complete trial)\n"
    cells = [[_cell(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    return f"# {title}\n\n" + "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells]) + "\n"


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_study_files(study: Study, folder: Path, space: list[str], top: int = 5) -> dict[str, str]:
    """trials.csv, best_params.csv, best_params.md and the plots into `folder`; returns the plots it skipped."""
    folder.mkdir(parents=True, exist_ok=True)
    trials_frame(study).to_csv(folder / "trials.csv", index=False)
    best = best_frame(study, top)
    best.to_csv(folder / "best_params.csv", index=False)
    (folder / "best_params.md").write_text(markdown(best, f"Best trials of study '{study.study_name}'"))
    return save_plots(study, folder, space)


def log_study(study: Study, tracker: Tracker, parent: str, space: list[str], folder: Path) -> list[str]:
    """Write the study files, attach them to the parent run with the best value and counts, end the parent run."""
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


def print_study(study: Study, parent: str, experiment: str, top: int) -> None:
    counts = state_counts(study)
    best = best_frame(study, top)
    table = Table(title=f"study {study.study_name}: {sum(counts.values())} trials "
                        f"({', '.join(f'{v} {k}' for k, v in counts.items())}); best {OBJECTIVE} first")
    for column in best.columns:
        table.add_column(str(column), justify="right")
    for row in best.itertuples(index=False):
        table.add_row(*[_cell(v) for v in row])
    Console().print(table)
    print(f"MLflow experiment {experiment}, parent run {parent}")
