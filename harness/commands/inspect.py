"""`harness describe METHOD --dataset D` (parameters, FLOPs, stages) and `harness data info D --if X` (counts)."""

from __future__ import annotations

import argparse
import json

from harness.commands.options import add_data_options, check_dataset, make_config
from harness.config import PRESETS
from harness.errors import HarnessError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    describe = subparsers.add_parser("describe", help="parameters, forward FLOPs and stages of a method")
    describe.add_argument("method")
    add_data_options(describe)
    describe.add_argument("--preset", default="shike-code", choices=sorted(PRESETS))
    describe.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    describe.add_argument("--json", action="store_true", help="print JSON")
    describe.set_defaults(func=describe_method)
    data = subparsers.add_parser("data", help="dataset facts")
    actions = data.add_subparsers(dest="action", required=True)
    info = actions.add_parser("info", help="class counts, groups and the split manifest hash")
    info.add_argument("dataset")
    info.add_argument("--if", dest="imbalance_factor", type=float, default=100.0)
    info.add_argument("--n-max", type=int, default=0)
    info.add_argument("--profile", default="first-n")
    info.add_argument("--data-root", default="")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=data_info)


def describe_method(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from harness.config import plan_epochs, stage_overrides
    from harness.profile import forward_flops, parameter_counts
    from harness.registry import DATASETS, METHODS

    check_dataset(args.dataset)
    spec = DATASETS.get(args.dataset)
    cfg = make_config(args, args.method)
    counts = spec.counts(args.imbalance_factor)
    method = METHODS.get(args.method)(num_classes=spec.num_classes, class_counts=tuple(counts), **cfg.method_kwargs)
    model = method.model
    model.use_head(method.stages[-1].head)  # what inference uses after the last stage
    params = parameter_counts(model)
    stages = stage_overrides(method.stages, cfg.stage_args)
    facts = {"method": args.method, "dataset": args.dataset, "preset": args.preset, "num_classes": spec.num_classes,
             "parameters_total": params["total"], "parameters_inference": params["inference"],
             "forward_flops_per_image": forward_flops(model, (1, 3, 32, 32)),
             "stages": [{"name": s.name, "epochs": e, "peak_lr": s.peak_lr, "trainable": list(s.trainable),
                         "losses": {t.name: t.weight for t in s.losses}, "schedule": s.schedule or cfg.optim.schedule,
                         "sampler": s.sampler}
                        for s, e in zip(stages, plan_epochs(stages, cfg.train))],
             "posthoc": [type(step).__name__ for step in method.posthoc],
             "method_args": cfg.method_kwargs}
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    table = Table(title=f"{args.method} on {args.dataset} ({args.preset})", show_header=False)
    for key in ("num_classes", "parameters_total", "parameters_inference", "forward_flops_per_image"):
        table.add_row(key, f"{facts[key]:,}")
    for stage in facts["stages"]:
        table.add_row(f"stage {stage['name']}", f"{stage['epochs']} epochs, {stage['schedule']} schedule, peak lr "
                      f"{stage['peak_lr']:g}, {stage['sampler']} sampler, " + json.dumps(stage["losses"])
                      + f" trains {stage['trainable']}")
    if facts["posthoc"]:
        table.add_row("post-hoc", ", ".join(facts["posthoc"]))
    Console().print(table)
    return 0


def data_info(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from harness.data import shot_groups
    from harness.registry import DATASETS

    check_dataset(args.dataset)
    if args.imbalance_factor < 1:
        raise HarnessError(f"--if must be >= 1 (the ratio n_max/n_min), got {args.imbalance_factor:g}")
    spec = DATASETS.get(args.dataset)
    if args.profile not in spec.profiles:  # before the try below, which turns missing data into a note
        raise HarnessError(f"unknown data profile '{args.profile}'; known profiles: {', '.join(spec.profiles)}")
    counts = spec.counts(args.imbalance_factor, args.n_max or None)
    groups = shot_groups(counts)
    facts = {"dataset": args.dataset, "imbalance_factor": args.imbalance_factor, "profile": args.profile,
             "n_max": args.n_max or spec.default_n_max, "num_classes": spec.num_classes, "class_counts": counts,
             "total": sum(counts), "groups": {k: len(v) for k, v in groups.items()},
             "group_classes": groups, "manifest_hash": None}
    try:
        data = spec.build(imbalance_factor=args.imbalance_factor, profile=args.profile, n_max=args.n_max or None,
                          data_root=args.data_root or None)
        facts["manifest_hash"] = data.manifest_hash
        facts["train_indices_sha256"] = data.manifest.get("train_indices_sha256")
    except HarnessError as error:
        facts["manifest_note"] = f"data not available, so no manifest hash: {error}"
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    table = Table(title=f"{args.dataset} IF {args.imbalance_factor:g}", show_header=False)
    for key in ("num_classes", "total", "groups", "manifest_hash"):
        table.add_row(key, str(facts[key]))
    table.add_row("class_counts", ", ".join(map(str, counts)))
    if "manifest_note" in facts:
        table.add_row("note", facts["manifest_note"])
    Console().print(table)
    return 0
