"""Options shared by the commands that build a run config, and their translation into a `RunConfig`."""

from __future__ import annotations

import argparse
from typing import Any

from harness.config import PRESETS, RunConfig, parse_assignments, parse_epochs, resolve
from harness.errors import HarnessError
from harness.registry import METHODS


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
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds expects comma-separated integers, got '{text}'") from None


def add_data_options(parser: argparse.ArgumentParser, dataset_required: bool = True) -> None:
    parser.add_argument("--dataset", required=dataset_required, help="dataset name (harness list datasets)")
    parser.add_argument("--if", dest="imbalance_factor", type=imbalance_factor, default=100.0,
                        help="imbalance factor n_max/n_min >= 1 (default 100)")
    parser.add_argument("--data-root", default="", help="folder holding the dataset files")
    parser.add_argument("--download", action="store_true", help="download the data with torchvision if missing")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    add_data_options(parser)
    parser.add_argument("--preset", default="shike-code", choices=sorted(PRESETS),
                        help="settings source: shike-code (official code), shike-paper, shike-code-literal")
    parser.add_argument("--epochs", default=None, help="E1+E2 (stage epochs, default 180+20) or E (E + ceil(E/9))")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. optim.lr=0.1, train.eval_interval=0, method.alpha=0.2")
    parser.add_argument("--device", default=None, help="auto (default), cpu or cuda")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite in ./runs)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment name")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue unfinished runs and skip finished ones")
    group.add_argument("--restart", action="store_true", help="discard unfinished checkpoints and start over")


def base_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Flags that are shorthands for config keys; explicit --set entries win over them."""
    out: dict[str, Any] = {"data.dataset": args.dataset, "data.imbalance_factor": args.imbalance_factor,
                           "data.data_root": args.data_root, "data.download": args.download}
    if getattr(args, "epochs", None):
        first, second = parse_epochs(args.epochs)
        out.update({"train.epochs": first, "train.crt_epochs": second})
    if getattr(args, "device", None):
        out["train.device"] = args.device
    return out


def make_config(args: argparse.Namespace, method: str, seed: int | None = None,
                extra: dict[str, Any] | None = None) -> RunConfig:
    """defaults -> preset -> flags -> row switches (`extra`) -> --set."""
    builder = METHODS.get(method)
    overrides = base_overrides(args)
    if seed is not None:
        overrides["train.seed"] = seed
    overrides.update({f"method.{k}": v for k, v in (extra or {}).items()})
    overrides.update(parse_assignments(getattr(args, "overrides", [])))
    return resolve(method, builder, preset=getattr(args, "preset", "shike-code"), overrides=overrides)


def check_dataset(name: str) -> None:
    from harness.registry import DATASETS

    if name not in DATASETS:
        raise HarnessError(f"unknown dataset '{name}'; known datasets: {', '.join(DATASETS.names())}")
