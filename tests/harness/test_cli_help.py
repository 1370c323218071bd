"""`harness --help` and every subcommand's `--help` import no torch, mlflow, pandas or optuna: command modules keep
their heavy imports inside the functions that run the command, and no parser reads a registry (which would load
plugins). Each command is checked in a fresh interpreter, so one command's imports cannot hide another's."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from harness.cli import build_parser

HEAVY = ("torch", "mlflow", "pandas", "optuna", "matplotlib")
PROBE = """
import json, sys
from harness.cli import main
try:
    main(json.loads(sys.argv[1]) + ["--help"])
except SystemExit as exit_:
    code = exit_.code
print(json.dumps({"code": code, "heavy": sorted(m for m in json.loads(sys.argv[2]) if m in sys.modules)}),
      file=sys.stderr)
"""


def command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and subcommand path of the parser: (), ("run",), ("run", "method"), ..."""
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += command_paths(sub, (*prefix, name))
    return paths


COMMANDS = command_paths(build_parser())


def test_every_command_is_found():
    names = {" ".join(path) for path in COMMANDS}
    assert {"", "run method", "run ablation", "report", "tune", "list", "describe", "data info", "demo"} <= names


@pytest.mark.parametrize("path", COMMANDS, ids=lambda path: " ".join(path) or "harness")
def test_help_imports_no_heavy_module(path):
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(list(path)), json.dumps(HEAVY)],
                          capture_output=True, text=True, timeout=120)
    result = json.loads(done.stderr.strip().splitlines()[-1])
    assert result["code"] == 0, done.stderr
    assert result["heavy"] == [], f"`harness {' '.join(path)} --help` imported {result['heavy']}"
    assert "usage: harness" in done.stdout


def test_help_says_what_epochs_and_seeds_mean():
    done = subprocess.run([sys.executable, "-m", "harness.cli", "run", "ablation", "--help"], capture_output=True,
                          text=True, timeout=120)
    text = " ".join(done.stdout.split())
    assert "--seeds SEEDS" in text and "--epochs E|E1+E2" in text and "200 is 180+20" in text
    top = subprocess.run([sys.executable, "-m", "harness.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert "--plugin MODULE" in top.stdout
