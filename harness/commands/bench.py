"""`harness bench`: augmentation, training-step and epoch benchmarks, reference vs fast path, in one process.

Prints rich tables (to stderr with --json, so stdout stays one JSON document). Ratios are computed inside the
process on interleaved repeats; CPU ratios are a regression signal, not a GPU prediction.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from typing import Any

from rich.console import Console
from rich.table import Table

from harness.errors import HarnessError

WHAT = ("augment", "step", "epoch")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmark augmentation, training step and epoch: reference vs "
                                                 "fast path (ratios in one process)")
    parser.add_argument("--what", default=",".join(WHAT), help=f"comma-separated subset of {','.join(WHAT)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds; for tests and smoke checks)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.add_argument("--compile", default="off", choices=COMPILE_MODES,
                        help="also time the fast path under torch.compile(mode=...) (minutes on a CPU)")
    parser.add_argument("--variants", default="plain,shike", help="comma-separated: plain, moe, shike")
    parser.add_argument("--batch-size", type=int, default=0, help="training batch (default 128; --quick 8)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for the step and epoch benchmarks (default: torch's; use 1 on a busy "
                             "machine, where OpenMP threads oversubscribed by other processes stall for seconds)")
    parser.set_defaults(func=run)


def _plan(args: argparse.Namespace) -> Any:
    from harness.bench import VARIANTS, BenchPlan

    what = tuple(w.strip() for w in args.what.split(",") if w.strip())
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if not what or set(what) - set(WHAT):
        raise HarnessError(f"--what takes a comma-separated subset of {','.join(WHAT)}, got '{args.what}'")
    if not variants or set(variants) - set(VARIANTS):
        raise HarnessError(f"--variants takes a subset of {','.join(VARIANTS)}, got '{args.variants}'")
    if args.batch_size < 0 or args.threads < 0:
        raise HarnessError("--batch-size and --threads take positive integers")
    plan = BenchPlan(what=what, variants=variants, compile=args.compile, threads=args.threads)
    plan = plan.quick() if args.quick else plan
    return replace(plan, batch_size=args.batch_size) if args.batch_size else plan


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def augment_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"Augmentation, {report['threads']} thread, {report['n_images']} images "
                        f"(median of {report['repeats']})")
    for column in ("pipeline", "images/s", "ratio"):
        table.add_column(column, justify="left" if column == "pipeline" else "right")
    table.add_row("per-image PIL (reference)", f"{report['per_image_img_s']:,.0f}", "1.00")
    table.add_row(f"batched tensor (batch {report['batch_size']})", f"{report['batched_img_s']:,.0f}",
                  f"{report['ratio']:.2f}")
    return table


def step_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"Training step, batch {report['batch_size']}, {report['device']}, {report['threads']} "
                        f"threads (median of {report['repeats']} interleaved rounds)")
    for column in ("variant", "path", "median ms", "min ms", "first step s", "speed-up", "peak MiB", "peak+ MiB"):
        table.add_column(column, justify="left" if column in ("variant", "path") else "right")
    for variant, rows in report["variants"].items():
        for path, row in rows.items():
            table.add_row(variant, path, f"{row['median_ms']:.1f}", f"{row['min_ms']:.1f}",
                          f"{row['first_step_s']:.2f}", f"{row['speedup']:.2f}x", _mib(row.get("peak_bytes")),
                          _mib(row.get("peak_over_start_bytes")))
    table.caption = f"peak memory: {report['memory_measure']}"
    return table


def epoch_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"Epoch, {report['train_images']} synthetic LT images, batch {report['batch_size']}, "
                        f"{report['device']} (median of {report['repeats']} after a warm-up epoch)")
    for column in ("variant", "path", "epoch s", "batches s", "batch share", "speed-up"):
        table.add_column(column, justify="left" if column in ("variant", "path") else "right")
    for variant, rows in report["variants"].items():
        for path, row in rows.items():
            table.add_row(variant, path, f"{row['epoch_s']:.2f}", f"{row['data_s']:.3f}",
                          f"{100 * row['data_share']:.1f}%", f"{row['speedup']:.2f}x")
    return table


def run(args: argparse.Namespace) -> int:
    import torch

    from harness.bench import run_bench
    from harness.runner import resolve_device

    plan = _plan(args)
    device = resolve_device(args.device)
    report = run_bench(plan, device)
    console = Console(stderr=args.json)
    console.print(f"[bold]harness bench[/] on {report['device_name']} (torch {torch.__version__}, "
                  f"{report['threads']} threads for step and epoch)")
    renderers = {"augment": augment_table, "step": step_table, "epoch": epoch_table}
    for key in WHAT:
        if key in report:
            console.print(renderers[key](report[key]))
    if "augment" in report:
        ratio = report["augment"]["ratio"]
        verdict = "meets" if ratio >= 5 else "misses"
        console.print(f"batched augmentation: {ratio:.2f}x the per-image pipeline per thread ({verdict} the 5x goal)")
    if args.json:
        print(json.dumps(report, indent=2))
    return 0
