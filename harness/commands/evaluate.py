"""`harness eval RUN_ID ...`: re-evaluate finished runs from their kept weights, without retraining (on the balanced
test split and, with --shift, on forward/backward long-tailed test splits); `harness rerun RUN_ID`: train a
logged run again from its logged config, refusing when the code or the data differ unless told otherwise."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    evaluate = subparsers.add_parser("eval", help="re-evaluate finished runs from their kept weights (no training)")
    evaluate.add_argument("run_ids", nargs="+", metavar="RUN_ID", help="MLflow run ids (a unique prefix is enough)")
    evaluate.add_argument("--shift", action="store_true",
                          help="also forward/backward long-tailed test splits (imbalance 2, 5, 10, 25, 50)")
    evaluate.add_argument("--temperature", action="store_true",
                          help="calibration after temperature scaling fitted on the run's validation split")
    evaluate.add_argument("--out", default=None, help="folder for the figures (default: RUNS/eval)")
    evaluate.add_argument("--device", default=None, help="auto, cpu or cuda (default: the run's own setting)")
    evaluate.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite in ./runs)")
    evaluate.set_defaults(func=run_eval)
    rerun = subparsers.add_parser("rerun", help="train a logged run again from its logged config and data manifest")
    rerun.add_argument("run_id", metavar="RUN_ID", help="MLflow run id (a unique prefix is enough)")
    rerun.add_argument("--force", action="store_true", help="rerun even if the git commit differs from the run's")
    rerun.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: the run's logged count; results on CPU depend on it)")
    rerun.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite in ./runs)")
    rerun.set_defaults(func=run_rerun)


def run_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    import pandas as pd

    from harness.commands.output import note, print_frame
    from harness.studies.reevaluation import evaluate_runs
    from harness.studies.shift_figures import reliability_figure, shift_curve_figure
    from harness.tracking import Tracker, runs_dir

    tracker = Tracker(args.tracking_uri)
    found = evaluate_runs(tracker, [resolve_run_id(tracker, r) for r in args.run_ids], shift=args.shift,
                          device=args.device, temperature=args.temperature)
    print_frame(pd.DataFrame(found.lines), f"re-evaluated from kept weights (tracking: {tracker.uri}); "
                                           "logged as eval/*")
    out = Path(args.out) if args.out else runs_dir() / "eval"
    out.mkdir(parents=True, exist_ok=True)
    written = [reliability_figure(found.bins, out / "reliability.png", title="balanced test set")]
    if args.shift:
        written.append(shift_curve_figure(found.curves, out / "shift.png", title="top-1 against test distribution"))
    note("figures: " + ", ".join(str(p) for p in written))
    return 0


def run_rerun(args: argparse.Namespace) -> int:
    import pandas as pd

    from harness.commands.output import print_frame
    from harness.progress import make_progress
    from harness.studies.reevaluation import rerun
    from harness.tracking import Tracker

    tracker = Tracker(args.tracking_uri)
    with make_progress() as progress:
        lines = rerun(tracker, resolve_run_id(tracker, args.run_id), force=args.force, progress=progress,
                      threads=args.threads)
    print_frame(pd.DataFrame(lines), f"rerun of {args.run_id} (tracking: {tracker.uri})")
    return 0


def resolve_run_id(tracker, prefix: str) -> str:
    """A full run id from a unique prefix of one (what `harness run` prints is the first 8 characters)."""
    from harness.errors import HarnessError

    runs = tracker.search()
    ids = [] if runs.empty else [r for r in runs["run_id"] if r.startswith(prefix)]
    if len(ids) != 1:
        found = "no run" if not ids else f"{len(ids)} runs"
        raise HarnessError(f"{found} in {tracker.uri} with an id starting '{prefix}'; give more of the id "
                           "(harness ui lists them)")
    return ids[0]
