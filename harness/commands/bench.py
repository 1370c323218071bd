"""`harness bench`: augmentation, training-step and epoch benchmarks, reference vs fast path, in one process; and
`harness bench gpu`: the per-epoch GPU check (eager and compiled fast path, concurrency, extrapolation to targets).

The benchmarks live in `harness.studies.bench`; this module parses and prints, and imports them (and torch) only
inside the functions that run, so `harness --help` and `harness bench --help` stay light. Tables go to stderr with
--json, so stdout stays one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

WHAT = ("augment", "step", "epoch")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmark augmentation, training step and epoch: reference vs "
                                                 "fast path (ratios in one process); 'bench gpu': the GPU check")
    parser.add_argument("--what", default=",".join(WHAT), help=f"comma-separated subset of {','.join(WHAT)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds; for tests and smoke checks)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.add_argument("--compile", default="off", choices=COMPILE_MODES,
                        help="also time the fast path compiled in this mode (minutes on a CPU)")
    parser.add_argument("--variants", default="plain,shike", help="comma-separated: plain, moe, shike")
    parser.add_argument("--batch-size", type=int, default=0, help="training batch (default 128; --quick 8)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads for the step and epoch benchmarks (default: unchanged; use 1 on a busy "
                             "machine, where OpenMP threads oversubscribed by other processes stall for seconds)")
    parser.set_defaults(func=run)
    commands = parser.add_subparsers(dest="bench_command", metavar="{gpu,data}")
    _add_gpu_parser(commands)
    _add_data_parser(commands)


def _add_gpu_parser(subparsers: argparse._SubParsersAction) -> None:
    gpu = subparsers.add_parser("gpu", help="GPU check: per-epoch reference vs fast path, compile modes, K concurrent "
                                            "runs, extrapolation to a full run and Table 4 (needs CUDA, < 8 min)")
    gpu.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"),
                     help="folder for gpu_check.json, gpu_check.md and logs/ (default $OUT, else gpu_check_out)")
    gpu.add_argument("--budget-s", type=float, default=None,
                     help="all phases together (default 440: with start-up the check stays under 8 min)")
    gpu.add_argument("--workers", type=int, default=None,
                     help="DataLoader workers of the reference path (default min(8, CPUs))")
    gpu.add_argument("--only", default="", help="comma-separated phase names (default: all)")
    gpu.add_argument("--quick", action="store_true", help="tiny data, CPU allowed: checks the command itself")
    gpu.set_defaults(func=run_gpu)


def _add_data_parser(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="images/s of the file-backed input paths (ImageFolder-style baseline, "
                                              "the harness's file feeder, DALI where installed) on a generated tree")
    data.add_argument("--dataset", default="imagenetlt", help="layout of the generated tree (imagenetlt, inat2018, "
                                                              "placeslt)")
    data.add_argument("--augment", default="randaugment", help="training transform (randaugment, colorjitter, basic)")
    data.add_argument("--images", type=int, default=None, help="JPEGs in the tree (default 512; --quick 48)")
    data.add_argument("--image-size", default=None, metavar="WxH", help="source JPEG size (default 500x375)")
    data.add_argument("--batch-size", type=int, default=None, help="batch (default 64)")
    data.add_argument("--workers", type=int, default=None, help="DataLoader workers of both torchvision paths "
                                                                "(default 2)")
    data.add_argument("--repeats", type=int, default=None, help="interleaved timed epochs per loader (default 3)")
    data.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    data.add_argument("--quick", action="store_true", help="tiny tree and crops (seconds; tests and smoke checks)")
    data.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    data.set_defaults(func=run_data)


def _data_plan(args: argparse.Namespace) -> Any:
    from harness.studies.bench.data import DataBenchPlan

    plan = DataBenchPlan(dataset=args.dataset, augment=args.augment)
    plan = plan.quick() if args.quick else plan
    given: dict[str, Any] = {k: getattr(args, k) for k in ("images", "batch_size", "workers", "repeats")
                             if getattr(args, k) is not None}
    if args.image_size:
        width, _, height = args.image_size.partition("x")
        if not (width.isdigit() and height.isdigit()):
            raise HarnessError(f"--image-size takes WxH in pixels (e.g. 500x375), got '{args.image_size}'")
        given["image_size"] = (int(width), int(height))
    plan = replace(plan, **given)
    if plan.images < 10 or plan.batch_size < 1 or plan.workers < 0 or plan.repeats < 1:
        raise HarnessError("bench data needs --images >= 10, --batch-size >= 1, --workers >= 0, --repeats >= 1")
    return plan


def run_data(args: argparse.Namespace) -> int:
    from rich.console import Console

    from harness.commands.options import check_dataset
    from harness.runner import resolve_device
    from harness.studies.bench.data import bench_data, data_table

    check_dataset(args.dataset)
    report = bench_data(_data_plan(args), resolve_device(args.device))
    Console(stderr=args.json).print(data_table(report))
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _plan(args: argparse.Namespace) -> Any:
    from harness.studies.bench.build import VARIANTS
    from harness.studies.bench.plan import BenchPlan

    what, variants = _names(args.what), _names(args.variants)
    if not what or set(what) - set(WHAT):
        raise HarnessError(f"--what takes a comma-separated subset of {','.join(WHAT)}, got '{args.what}'")
    if not variants or set(variants) - set(VARIANTS):
        raise HarnessError(f"--variants takes a subset of {','.join(VARIANTS)}, got '{args.variants}'")
    if args.batch_size < 0 or args.threads < 0:
        raise HarnessError("--batch-size and --threads take positive integers")
    plan = BenchPlan(what=what, variants=variants, compile=args.compile, threads=args.threads)
    plan = plan.quick() if args.quick else plan
    return replace(plan, batch_size=args.batch_size) if args.batch_size else plan


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from harness.runner import resolve_device
    from harness.studies.bench.plan import run_bench
    from harness.studies.bench.render import report_renderables

    report = run_bench(_plan(args), resolve_device(args.device))
    console = Console(stderr=args.json)
    for renderable in report_renderables(report):
        console.print(renderable)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def run_gpu(args: argparse.Namespace) -> int:
    from harness.studies.bench.gpu import GpuCheck, run_gpu_check

    given = {key: getattr(args, key) for key in ("budget_s", "workers") if getattr(args, key) is not None}
    check = GpuCheck(out=Path(args.out), only=_names(args.only), quick=args.quick, **given)
    markdown = run_gpu_check(check, log=lambda line: print(line, flush=True))
    print(markdown.read_text())
    return 0
