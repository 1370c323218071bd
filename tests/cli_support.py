"""Shared by the CLI tests: run `harness` in-process as the console script does."""

from __future__ import annotations

from harness.cli import main


def run_cli(args, capsys):
    """main() as the console script runs it: argparse errors exit through SystemExit."""
    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err
