"""Options shared by the commands that build run configs, and their translation into `RunSettings` / a `RunConfig`.

Light on purpose: `harness ... --help` imports this module, so nothing here may import torch, mlflow or pandas, and
nothing here may read a registry (registries load plugins); names are checked when the command runs.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from harness.config import PRESETS
from harness.errors import HarnessError

if TYPE_CHECKING:
    from harness.config import RunConfig
    from harness.studies.settings import RunSettings

EPOCHS_HELP = ("training epochs: E in all, split in the method's own stage proportions (SHIKE 9:1, so 200 is "
               "180+20), or E1+E2 for each stage (default: the method's recipe, 180+20)")


def imbalance_factor(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--if expects a number >= 1 (e.g. 100), got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"--if is the ratio n_max/n_min and must be >= 1 (use 100, not {text}; LDAM's 0.01 is 1/IF)")
    return value


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds expects comma-separated integers, got '{text}'") from None
    if not seeds:
        raise argparse.ArgumentTypeError("--seeds expects at least one integer, e.g. 0 or 0,1,2")
    return seeds


def add_seeds(parser: argparse.ArgumentParser, help_text: str = "training seeds, comma-separated (e.g. 0 or 0,1,2)"
              ) -> None:
    """The one seed flag of every command."""
    parser.add_argument("--seeds", type=seed_list, default=[0], help=f"{help_text}; default 0")


def add_data_options(parser: argparse.ArgumentParser, dataset_required: bool = True) -> None:
    parser.add_argument("--dataset", required=dataset_required, help="dataset name (harness list datasets)")
    parser.add_argument("--if", dest="imbalance_factor", type=imbalance_factor, default=100.0,
                        help="imbalance factor n_max/n_min >= 1 (default 100)")
    parser.add_argument("--data-root", default="", help="folder holding the dataset files")
    parser.add_argument("--download", action="store_true", help="download the data with torchvision if missing")


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """--preset, --epochs, --set and --device: what every trained run's config is made of besides the data."""
    parser.add_argument("--preset", default="shike-code", choices=sorted(PRESETS),
                        help="settings source: shike-code (official code; every baseline on SHIKE's recipe), "
                             "shike-paper, shike-code-literal, own (each method's own published recipe)")
    parser.add_argument("--epochs", default=None, metavar="E|E1+E2", help=EPOCHS_HELP)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. optim.lr=0.1, train.eval_interval=0, method.alpha=0.2")
    parser.add_argument("--config", default=None, metavar="FILE.yaml",
                        help="config keys from a YAML file (the keys --set takes, nested or dotted); --set wins")
    parser.add_argument("--device", default=None, help="auto (default), cpu or cuda")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    add_data_options(parser)
    add_config_options(parser)
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite in ./runs)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment name")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue unfinished runs and skip finished ones")
    group.add_argument("--restart", action="store_true", help="discard unfinished checkpoints and start over")


def run_settings(args: argparse.Namespace) -> RunSettings:
    """The flags every run of a command shares (a command without --epochs or --device leaves them unset)."""
    from harness.config import read_config_file
    from harness.studies.settings import RunSettings

    config_file = getattr(args, "config", None)
    from_file = tuple(read_config_file(config_file)) if config_file else ()
    return RunSettings(dataset=args.dataset, imbalance_factor=args.imbalance_factor,
                       preset=getattr(args, "preset", "shike-code"), epochs=getattr(args, "epochs", None),
                       device=getattr(args, "device", None), data_root=getattr(args, "data_root", ""),
                       download=getattr(args, "download", False),
                       overrides=(*from_file, *getattr(args, "overrides", [])))


def make_config(args: argparse.Namespace, method: str, seed: int | None = None) -> RunConfig:
    """defaults -> preset -> flags -> --set: `harness.config.resolve_config` with this command's flags."""
    return run_settings(args).config(method, seed)


def check_dataset(name: str) -> None:
    from harness.registry import DATASETS

    if name not in DATASETS:
        raise HarnessError(f"unknown dataset '{name}'; known datasets: {', '.join(DATASETS.names())}")


def positive_int(text: str) -> int:
    """argparse type for counts (trials, workers): an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value
