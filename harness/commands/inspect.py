"""`harness describe METHOD --dataset D` (parameters, FLOPs, stages), `harness data info D --if X` (counts) and
`harness data verify D --data-root R` (every list line's image exists and decodes; list-file datasets)."""

from __future__ import annotations

import argparse
import json

from harness.commands.options import add_data_options, check_dataset, make_config, positive_int
from harness.config import PRESETS
from harness.errors import HarnessError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    describe = subparsers.add_parser("describe", help="parameters, forward FLOPs and stages of a method")
    describe.add_argument("method")
    add_data_options(describe, dataset_required=False)
    describe.add_argument("--num-classes", type=positive_int, default=None,
                          help="describe for this many classes instead of --dataset's (no dataset needed)")
    describe.add_argument("--image-size", type=positive_int, default=None,
                          help="side of the square input the FLOPs are counted at (default: the backbone's own, "
                               "32 for the CIFAR ResNets, 224 for the torchvision ResNet-50 family)")
    describe.add_argument("--preset", default="shike-code", choices=sorted(PRESETS))
    describe.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    describe.add_argument("--json", action="store_true", help="print JSON")
    describe.set_defaults(func=describe_method)
    data = subparsers.add_parser("data", help="dataset facts")
    actions = data.add_subparsers(dest="action", required=True)
    info = actions.add_parser("info", help="class counts, groups and the split manifest hash")
    info.add_argument("dataset")
    info.add_argument("--if", dest="imbalance_factor", type=float, default=None,
                      help="imbalance factor (default 100; list-file datasets: their own)")
    info.add_argument("--n-max", type=int, default=0)
    info.add_argument("--profile", default=None, help="data profile (default: the dataset's first)")
    info.add_argument("--data-root", default="")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=data_info)
    verify = actions.add_parser("verify", help="check that every list line's image exists and decodes "
                                               "(imagenetlt, inat2018, placeslt)")
    verify.add_argument("dataset")
    verify.add_argument("--data-root", default="", help="the folder holding the image folders (and the lists)")
    verify.add_argument("--limit", type=int, default=0, help="check only the first N lines of each list (0: all)")
    verify.add_argument("--workers", type=int, default=0, help="checking threads (default: cores, at most 16)")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=data_verify)


def describe_method(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from harness.config import plan_epochs, stage_overrides
    from harness.profile import forward_flops, parameter_counts
    from harness.registry import METHODS

    num_classes, counts = static_classes(args)
    cfg = make_config(args, args.method)
    # Weights change no count or FLOP: describe never loads (or downloads) `method.pretrained`.
    kwargs = {**cfg.method_kwargs, **({"pretrained": ""} if cfg.method_kwargs.get("pretrained") else {})}
    method = METHODS.get(args.method)(num_classes=num_classes, class_counts=tuple(counts), **kwargs)
    model = method.model
    model.use_head(method.stages[-1].head)  # what inference uses after the last stage
    params = parameter_counts(model)
    stages = stage_overrides(method.stages, cfg.stage_args)
    size = args.image_size or native_input_size(model)
    facts = {"method": args.method, "dataset": args.dataset, "preset": args.preset, "num_classes": num_classes,
             "parameters_total": params["total"], "parameters_inference": params["inference"],
             "input_shape": [3, size, size], "forward_flops_per_image": forward_flops(model, (1, 3, size, size)),
             "architecture": model.architecture(),
             "stages": [{"name": s.name, "epochs": e, "peak_lr": s.peak_lr, "trainable": list(s.trainable),
                         "losses": {t.name: t.weight for t in s.losses}, "schedule": s.schedule or cfg.optim.schedule,
                         "sampler": s.sampler}
                        for s, e in zip(stages, plan_epochs(stages, cfg.train))],
             "posthoc": [type(step).__name__ for step in method.posthoc],
             "method_args": cfg.method_kwargs}
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    where = args.dataset or f"{num_classes} classes"
    table = Table(title=f"{args.method} on {where} ({args.preset})", show_header=False)
    for key in ("num_classes", "parameters_total", "parameters_inference", "forward_flops_per_image"):
        table.add_row(key, f"{facts[key]:,}")
    table.add_row("input_shape", "x".join(map(str, facts["input_shape"])))
    table.add_row("architecture", ", ".join(f"{k}={v}" for k, v in facts["architecture"].items()))
    for stage in facts["stages"]:
        table.add_row(f"stage {stage['name']}", f"{stage['epochs']} epochs, {stage['schedule']} schedule, peak lr "
                      f"{stage['peak_lr']:g}, {stage['sampler']} sampler, " + json.dumps(stage["losses"])
                      + f" trains {stage['trainable']}")
    if facts["posthoc"]:
        table.add_row("post-hoc", ", ".join(facts["posthoc"]))
    Console().print(table)
    return 0


def static_classes(args: argparse.Namespace) -> tuple[int, list[int]]:
    """Class count and per-class training counts from static facts only (never the data files): the dataset spec's,
    or with --num-classes the exponential profile at --if from 500 images (only loss priors read the counts;
    parameters and FLOPs do not depend on them)."""
    from harness.data import long_tail_counts
    from harness.registry import DATASETS

    if args.dataset is None and args.num_classes is None:
        raise HarnessError("describe needs --dataset NAME or --num-classes N")
    if args.dataset is not None:
        check_dataset(args.dataset)
        spec = DATASETS.get(args.dataset)
        if args.num_classes is None or args.num_classes == spec.num_classes:
            return spec.num_classes, spec.counts(args.imbalance_factor)
    return args.num_classes, long_tail_counts(500, args.num_classes, args.imbalance_factor)


def native_input_size(model: object) -> int:
    """The input side the model's backbone is built for: the first `input_size` among its modules (torchvision
    backbones: 224), else 32 (the CIFAR ResNets)."""
    modules = model.modules() if hasattr(model, "modules") else ()
    return next((int(m.input_size) for m in modules if hasattr(m, "input_size")), 32)


def data_info(args: argparse.Namespace) -> int:
    from harness.data import shot_groups
    from harness.registry import DATASETS

    check_dataset(args.dataset)
    if args.imbalance_factor is not None and args.imbalance_factor < 1:
        raise HarnessError(f"--if must be >= 1 (the ratio n_max/n_min), got {args.imbalance_factor:g}")
    spec = DATASETS.get(args.dataset)
    args.profile = args.profile or spec.profiles[0]
    if args.profile not in spec.profiles:  # before the try below, which turns missing data into a note
        raise HarnessError(f"unknown data profile '{args.profile}'; known profiles: {', '.join(spec.profiles)}")
    if spec.fixed_profile:
        return _fixed_profile_info(args, spec)
    args.imbalance_factor = 100.0 if args.imbalance_factor is None else args.imbalance_factor
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
    return _print_info(args, facts)


def _print_info(args: argparse.Namespace, facts: dict) -> int:
    from rich.console import Console
    from rich.table import Table

    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    table = Table(title=f"{args.dataset} IF {facts['imbalance_factor']:g}", show_header=False)
    for key in ("num_classes", "total", "groups", "manifest_hash"):
        table.add_row(key, str(facts[key]))
    for key in ("splits", "lists_sha256"):
        if key in facts:
            table.add_row(key, ", ".join(f"{k} {v}" for k, v in facts[key].items()))
    table.add_row("class_counts", ", ".join(map(str, facts["class_counts"])))
    if "manifest_note" in facts:
        table.add_row("note", facts["manifest_note"])
    Console().print(table)
    return 0


def _fixed_profile_info(args: argparse.Namespace, spec) -> int:
    """The same summary for a dataset whose class profile is its own (list files): built from the data, since
    there are no counts without it; a missing list is the builder's one-line error."""
    from harness.data import shot_groups

    data = spec.build(imbalance_factor=args.imbalance_factor, profile=args.profile, n_max=args.n_max or None,
                      data_root=args.data_root or None)
    counts, m = list(data.class_counts), data.manifest
    groups = shot_groups(counts)
    facts = {"dataset": args.dataset, "imbalance_factor": m["imbalance_factor"], "profile": args.profile,
             "n_max": m["n_max"], "num_classes": data.num_classes, "class_counts": counts, "total": sum(counts),
             "groups": {k: len(v) for k, v in groups.items()}, "group_classes": groups,
             "manifest_hash": data.manifest_hash,
             "splits": {"train": len(data.train), "val": 0 if data.val is None else len(data.val),
                        "test": len(data.test)},
             "lists_sha256": {name: digest[:16] for name, digest in m["lists_sha256"].items()}}
    return _print_info(args, facts)


def data_verify(args: argparse.Namespace) -> int:
    """Exit 0 when every checked image exists and decodes, 1 otherwise (the problems are listed)."""
    from harness.registry import DATASETS

    check_dataset(args.dataset)
    spec = DATASETS.get(args.dataset)
    if spec.verify is None:
        raise HarnessError(f"dataset '{args.dataset}' has no image files to verify (its files are checked when it is "
                           "built); verify works for list-file datasets: imagenetlt, inat2018, placeslt")
    if args.limit < 0 or args.workers < 0:
        raise HarnessError("--limit and --workers take integers >= 0")
    report = spec.verify(data_root=args.data_root or None, limit=args.limit, workers=args.workers)
    print(json.dumps(report.as_dict(), indent=2) if args.json else "\n".join(report.lines()))
    return 0 if report.ok else 1
