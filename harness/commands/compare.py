"""`harness compare A B`: two rows (or methods) over the seeds both ran, paired seed by seed on the same split, with
the per-seed difference's interval and a verdict that says when a difference is within seed noise; and the
per-class difference from head to tail as a figure."""

from __future__ import annotations

import argparse

FORMATS = ("text", "md", "csv")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("compare", help="paired comparison of two rows/methods over seeds (b - a)")
    parser.add_argument("a", help="row key or method of the baseline (a table row key, or `run method`'s method)")
    parser.add_argument("b", help="row key or method compared with it")
    parser.add_argument("--table", default=None, help="only runs of this table's ablations (default: any)")
    parser.add_argument("--dataset", default=None, help="only runs on this dataset")
    parser.add_argument("--if", dest="imbalance_factor", type=float, default=None, help="only this imbalance factor")
    parser.add_argument("--metrics", default="test/top1,test/many,test/medium,test/few",
                        help="comma-separated MLflow metrics (default: top-1 and the three shot groups)")
    parser.add_argument("--bootstrap", type=int, default=0, help="also a percentile bootstrap over seeds (resamples)")
    parser.add_argument("--format", default="text", choices=FORMATS)
    parser.add_argument("--out", default=None, help="folder for the per-class figure (default: RUNS/compare)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite in ./runs)")
    parser.set_defaults(func=run_compare)


def select(runs, args):
    keep = runs["status"] == "FINISHED"
    for column, value in (("tags.table", args.table), ("params.data.dataset", args.dataset)):
        if value is not None:
            keep &= runs.get(column) == value
    if args.imbalance_factor is not None:
        keep &= runs["params.data.imbalance_factor"].astype(float) == args.imbalance_factor
    return runs[keep]


def run_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from harness.commands.output import note
    from harness.errors import HarnessError
    from harness.studies.paired import (
        paired_frame,
        paired_table,
        per_class_difference,
        per_class_difference_figure,
        render_paired,
    )
    from harness.tracking import Tracker, runs_dir

    tracker = Tracker(args.tracking_uri)
    runs = tracker.search()
    if runs.empty or "tags.row_key" not in runs:
        raise HarnessError(f"no finished runs with a row key in {tracker.uri}; run `harness run ...` first")
    runs = select(runs, args)
    asked = [m.strip() for m in args.metrics.split(",") if m.strip()]
    mine = runs[runs["tags.row_key"].isin([args.a, args.b])]
    for name in (args.a, args.b):
        if not (mine["tags.row_key"] == name).any():
            raise HarnessError(f"no finished run of '{name}' in {tracker.uri} (with these filters); known: "
                               f"{', '.join(sorted(set(runs['tags.row_key'].dropna())))}")
    metrics = [m for m in asked if f"metrics.{m}" in mine and mine[f"metrics.{m}"].notna().any()]
    for missing in sorted(set(asked) - set(metrics)):  # a shot group with no classes is never logged
        note(f"{missing}: no run of {args.a} or {args.b} has it (a group with no classes?); left out")
    if not metrics:
        raise HarnessError(f"no run of '{args.a}' or '{args.b}' has any of {', '.join(asked)}")
    try:
        table = paired_table(runs, [(args.a, args.b)], metrics, bootstrap=args.bootstrap)
        seeds = paired_frame(runs, args.a, args.b, metrics[0])["seed"].tolist()
    except ValueError as error:
        raise HarnessError(f"{error} (narrow the runs with --table, --dataset, --if)") from None
    print(render_paired(table, args.format), end="")
    details, counts = {}, None
    for name in (args.a, args.b):
        side = runs[runs["tags.row_key"] == name].sort_values("start_time")
        by_seed = {float(s): r for s, r in zip(side["params.train.seed"], side["run_id"])}  # newest wins
        arrays = [tracker.load_arrays(by_seed[float(s)], "eval_details.npz") for s in seeds]
        details[name] = [a["per_class_acc"] for a in arrays]
        counts = arrays[0]["class_counts"]
    out = Path(args.out) if args.out else runs_dir() / "compare"
    out.mkdir(parents=True, exist_ok=True)
    diff = per_class_difference(details[args.a], details[args.b], counts)
    path = per_class_difference_figure(diff, counts, out / f"{args.b}-vs-{args.a}.png", f"{args.b} - {args.a}")
    note(f"per-class difference, head to tail: {path}")
    return 0
