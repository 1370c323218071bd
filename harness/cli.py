"""`harness` command line. Only this module reads argv; every subcommand lives in its own module under
harness/commands/ (the only layer that imports studies), which adds its parser with `add_parser(subparsers)` and sets
`func`. Building the parser imports no torch, mlflow, pandas or optuna (each command imports them when it runs), so
`--help` is instant. A `HarnessError` becomes one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from harness.errors import HarnessError
from harness.interrupts import Terminated, install_signal_handlers, interrupt_exit_code, interrupt_name

COMMAND_MODULES = (
    "harness.commands.listing",
    "harness.commands.run",
    "harness.commands.inspect",
    "harness.commands.bench",
    "harness.commands.ui",
    "harness.commands.tracking",
    "harness.commands.report",
    "harness.commands.tune",
    "harness.commands.evaluate",
    "harness.commands.compare",
)


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; we print one line that names the command's --help instead. No
    abbreviated options: `--seed` must not silently mean `--seeds` (one spelling per flag)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"harness: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="harness", description="Long-tailed recognition benchmark and ablations.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    parser.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="MODULE",
                        help="import MODULE (on the path) before the command, so the methods, datasets and tables "
                             "it registers can be named; repeatable; worker processes import it too")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:
                raise
            continue
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    install_signal_handlers()  # SIGTERM unwinds like Ctrl-C: the run is marked KILLED and stays resumable
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    try:
        if args.plugins:
            from harness.plugins import add_plugins

            add_plugins(args.plugins)
        return int(args.func(args) or 0)
    except HarnessError as error:
        if args.verbose:
            raise
        print(f"harness: error: {error}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Terminated) as interrupt:
        print(f"harness: {interrupt_name(interrupt)}; finished epochs are checkpointed, rerun with --resume to "
              "continue", file=sys.stderr)
        return interrupt_exit_code(interrupt)


if __name__ == "__main__":
    sys.exit(main())
