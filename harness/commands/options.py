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
    from harness.studies.dispatch import DispatchOptions
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


def add_process_options(parser: argparse.ArgumentParser) -> None:
    """--nproc-per-node: each run on N processes with DistributedDataParallel (harness.distributed)."""
    parser.add_argument("--nproc-per-node", type=positive_int, default=1, metavar="N",
                        help="processes per run (DDP: one per GPU, gloo on CPU): the command runs N times with "
                             "torchrun's environment, as `torchrun --nproc-per-node N -m harness ...` does; "
                             "optim.batch_size stays the global batch (a multiple of N); one run at a time "
                             "(--workers 1); default 1")


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


def non_negative_int(text: str) -> int:
    """argparse type for device counts: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def add_dispatch_options(parser: argparse.ArgumentParser) -> None:
    """Where the runs go (`harness.studies.dispatch`): the local process pool (default), Ray or SLURM."""
    group = parser.add_argument_group("dispatch", "where the runs execute; ray and slurm need "
                                                  "pip install 'lt-harness[cluster]'")
    group.add_argument("--dispatch", default="local", metavar="local|ray|slurm",
                       help="local: processes on this machine (--workers); ray: one Ray task per run; slurm: one "
                            "SLURM job per run in a job array (submitit). Default local")
    group.add_argument("--cpus-per-run", type=positive_int, default=None, metavar="N",
                       help="cores and torch threads of each run (default: local splits the cores among --workers; "
                            "ray and slurm give 1)")
    group.add_argument("--gpus-per-run", type=non_negative_int, default=None, metavar="N",
                       help="CUDA devices of each run (ray and slurm; default 1 where the cluster has them, else 0)")
    group.add_argument("--ray-address", default=None, metavar="ADDR",
                       help="the Ray cluster to join (auto, or HOST:PORT; default: start a local one)")
    group.add_argument("--slurm-partition", default=None, metavar="NAME", help="SLURM partition")
    group.add_argument("--slurm-time", type=positive_int, default=None, metavar="MIN",
                       help="each job's time limit in minutes (default 1440)")
    group.add_argument("--slurm-mem-gb", type=float, default=None, metavar="GB", help="each job's memory")
    group.add_argument("--slurm-array-parallelism", type=positive_int, default=None, metavar="N",
                       help="jobs of the array running at once (default: as many as SLURM allows)")
    group.add_argument("--slurm-folder", default=None, metavar="DIR",
                       help="submitit's job files and logs, on a filesystem the nodes share (default "
                            "RUNS/submitit/%%j)")
    group.add_argument("--slurm-option", dest="slurm_options", action="append", default=[], metavar="KEY=VALUE",
                       help="any other submitit slurm_* parameter, e.g. account=lab or qos=high (repeatable)")
    group.add_argument("--slurm-local", action="store_true",
                       help="run the SLURM jobs as local processes (submitit's LocalExecutor): a dry run of the "
                            "same path on this machine")


# Each backend's own flags (dest -> flag): given with another --dispatch they would be silently ignored.
BACKEND_FLAGS = {
    "slurm": {"slurm_partition": "--slurm-partition", "slurm_time": "--slurm-time", "slurm_mem_gb": "--slurm-mem-gb",
              "slurm_array_parallelism": "--slurm-array-parallelism", "slurm_folder": "--slurm-folder",
              "slurm_options": "--slurm-option", "slurm_local": "--slurm-local"},
    "ray": {"ray_address": "--ray-address"},
    "cluster": {"gpus_per_run": "--gpus-per-run"},  # ray and slurm: the local pool's device is the config's
}


def dispatch_options(args: argparse.Namespace) -> DispatchOptions:
    """The dispatch flags as `DispatchOptions`; a backend's flag given for another backend is refused."""
    from harness.studies.dispatch import SLURM_TIME_MIN, DispatchOptions, SlurmOptions

    backend = args.dispatch
    mine = {backend, "cluster"} if backend != "local" else {backend}
    misplaced = [flag for owner, flags in BACKEND_FLAGS.items() if owner not in mine
                 for dest, flag in flags.items() if getattr(args, dest) not in (None, False, [])]
    if misplaced:
        raise HarnessError(f"{', '.join(misplaced)} does not apply to --dispatch {backend}; drop it or change "
                           "--dispatch")
    extra = []
    for entry in args.slurm_options:
        key, sep, value = entry.partition("=")
        if not sep or not key.strip():
            raise HarnessError(f"--slurm-option expects KEY=VALUE (e.g. account=lab), got '{entry}'")
        extra.append((key.strip(), value.strip()))
    slurm = SlurmOptions(partition=args.slurm_partition, time_min=args.slurm_time or SLURM_TIME_MIN,
                         mem_gb=args.slurm_mem_gb, array_parallelism=args.slurm_array_parallelism,
                         folder=args.slurm_folder, local=args.slurm_local, extra=tuple(extra))
    return DispatchOptions(backend=backend, workers=getattr(args, "workers", 1), cpus_per_run=args.cpus_per_run,
                           gpus_per_run=args.gpus_per_run, ray_address=args.ray_address, slurm=slurm)
