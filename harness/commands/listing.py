"""`harness list methods|datasets|presets|tables`."""

from __future__ import annotations

import argparse

from harness.config import PRESETS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("list", help="list registered methods, datasets, presets or tables")
    parser.add_argument("what", choices=["methods", "datasets", "presets", "tables"])
    parser.set_defaults(func=run)


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if doc else ""


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=True)
    table.add_column("name")
    table.add_column("description")
    if args.what == "methods":
        from harness.registry import METHODS

        for name in METHODS.names():
            table.add_row(name, _first_line(METHODS.get(name).__doc__))
    elif args.what == "datasets":
        from harness.registry import DATASETS

        for name in DATASETS.names():
            spec = DATASETS.get(name)
            table.add_row(name, f"{spec.num_classes} classes, n_max {spec.default_n_max}; {spec.description}")
    elif args.what == "presets":
        for name, values in PRESETS.items():
            table.add_row(name, ", ".join(f"{k}={v}" for k, v in values.items()))
    else:
        from harness.studies.tables import TABLES

        for name, spec in TABLES.items():
            table.add_row(name, spec.title)
    Console().print(table)
    return 0
