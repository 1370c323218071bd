"""One run, end to end: frozen config -> dataset builder -> method builder -> trainer -> evaluator -> tracking.

Every run is an MLflow run. Its checkpoint folder (keyed by experiment, run name and config hash) holds the
latest atomic checkpoint and a small state file with the MLflow run id, so `resume` continues a killed run in the
same MLflow run and skips a finished one.
"""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.registry import DATASETS
from harness.data import LTData, Split
from harness import __version__
from harness.checkpoint import load_json, save_json
from harness.config import RunConfig, flatten
from harness.errors import HarnessError
from harness.evaluate import predict, quick_metrics, summarize
from harness.feeders import make_feeder
from harness.progress import RunProgress
from harness.seeding import seed_everything, set_deterministic
from harness.tracking import Tracker, runs_dir
from harness.trainer import Trainer
from harness.registry import METHODS
from harness.method import MethodSpec

REPO_ROOT = Path(__file__).resolve().parent.parent
EvalCallback = Callable[[int, dict[str, float]], None]  # (epoch, metrics) -> None; may raise to stop a trial


@dataclass
class RunResult:
    name: str
    run_id: str
    metrics: dict[str, float]
    wall_time_s: float
    skipped: bool = False
    details: dict[str, Any] = field(default_factory=dict, repr=False)


def build_data(cfg: RunConfig) -> LTData:
    d = cfg.data
    spec = DATASETS.get(d.dataset)
    return spec.build(imbalance_factor=d.imbalance_factor, profile=d.profile, n_max=d.n_max or None,
                      data_root=d.data_root or None, download=d.download, data_seed=d.data_seed,
                      val_per_class=d.val_per_class, test_per_class=d.test_per_class)


def build_method(cfg: RunConfig, data: LTData) -> MethodSpec:
    builder = METHODS.get(cfg.method)
    return builder(num_classes=data.num_classes, class_counts=tuple(data.class_counts), **cfg.method_kwargs)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HarnessError("train.device=cuda but no CUDA device is visible; use --set train.device=cpu")
    return torch.device(name)


def git_info() -> dict[str, str]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"git_commit": git("rev-parse", "HEAD") or "unknown",
            "git_dirty": str(bool(git("status", "--porcelain", "--untracked-files=no")))}


def environment(device: torch.device) -> dict[str, str]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": device.type, "device_name": name, "torch": torch.__version__, "harness": __version__,
            "python": platform.python_version(), **git_info()}


def config_hash(cfg: RunConfig) -> str:
    return hashlib.sha256(json.dumps(flatten(cfg), sort_keys=True, default=str).encode()).hexdigest()[:12]


def checkpoint_dir(experiment: str, run_name: str, cfg: RunConfig) -> Path:
    safe = experiment.replace("/", "_")
    return runs_dir() / "checkpoints" / safe / f"{run_name}-{config_hash(cfg)}"


def _to_device(split: Split, device: torch.device) -> Split:
    return Split(split.images.to(device), split.labels.to(device))


class _EpochLogger:
    """Per-epoch hook: buffer losses and lr, and evaluate every `eval_interval` epochs (logged, never selected).
    The buffer goes to MLflow in one batch when a checkpoint is written, so logged history and checkpoint agree."""

    def __init__(self, run: Run, total_epochs: int) -> None:
        self.run, self.total = run, total_epochs
        self.rows: list[tuple[int, dict[str, float]]] = []

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        self.rows.append((epoch, dict(metrics)))
        interval = self.run.cfg.train.eval_interval
        if interval > 0 and (epoch + 1) % interval == 0 and epoch + 1 != self.total:
            self.rows.append((epoch, self.run.evaluate(full=False, epoch=epoch)))

    def flush(self) -> None:
        self.run.tracker.log_metric_rows(self.run.run_id, self.rows)
        self.rows = []


class Run:
    """The glue object for one run; `execute()` is the whole pipeline."""

    def __init__(self, cfg: RunConfig, tracker: Tracker, experiment: str, run_name: str,
                 parent_run_id: str | None = None, tags: dict[str, Any] | None = None,
                 on_eval: EvalCallback | None = None) -> None:
        self.cfg, self.tracker, self.experiment, self.name = cfg, tracker, experiment, run_name
        self.parent_run_id, self.extra_tags, self.on_eval = parent_run_id, tags or {}, on_eval
        self.folder = checkpoint_dir(experiment, run_name, cfg)
        self.run_id = ""

    def prepare(self) -> None:
        seed_everything(self.cfg.train.seed)
        set_deterministic(self.cfg.train.deterministic)
        self.device = resolve_device(self.cfg.train.device)
        self.data = build_data(self.cfg)
        # Evaluation splits live on the device for the whole run (the fast path's "test evaluation on the device").
        on_device = self.device.type == "cuda"
        self.test_split = _to_device(self.data.test, self.device) if on_device else self.data.test
        self.val_split = None if self.data.val is None else (
            _to_device(self.data.val, self.device) if on_device else self.data.val)
        seed_everything(self.cfg.train.seed)  # model init does not depend on how the data was built
        self.spec = build_method(self.cfg, self.data)

    def evaluate(self, full: bool, epoch: int | None = None) -> dict[str, float]:
        """Test (unless train.eval_test is off, as in tuning trials) and validation metrics. `full` adds every
        evaluator figure and keeps the per-class details; otherwise one host read per split (per-epoch use)."""
        autocast = self.cfg.train.amp and self.device.type == "cuda"
        data = self.data
        if not self.cfg.train.eval_test and data.val is None:
            raise HarnessError("train.eval_test=false needs a validation split (set data.val_per_class > 0)")
        out: dict[str, float] = {}
        details = None
        for name, split in (("test", self.test_split), ("val", self.val_split)):
            if split is None or (name == "test" and not self.cfg.train.eval_test):
                continue
            preds = predict(self.spec.model, split, data.mean, data.std, self.device, autocast=autocast)
            if full:
                metrics, split_details = summarize(preds, data.class_counts)
                details = details if details is not None else split_details  # test first; val in tuning trials
            else:
                metrics = quick_metrics(preds, data.class_counts)
            keys = metrics if (full and name == "test") else ("top1", "balanced_acc", "many", "medium", "few")
            out.update({f"{name}/{k}": metrics[k] for k in keys})
        if self.on_eval is not None:
            self.on_eval(epoch if epoch is not None else -1, out)
        if full:
            self.details = details
        return out

    def start_tracking(self, resume_state: dict[str, Any] | None) -> None:
        d = self.cfg.data
        tags = {"method": self.cfg.method, "dataset": d.dataset, "imbalance_factor": f"{d.imbalance_factor:g}",
                "seed": self.cfg.train.seed, "data_seed": d.data_seed, "manifest_hash": self.data.manifest_hash,
                "preset": self.cfg.preset, **environment(self.device), **self.extra_tags}
        if resume_state is not None:
            self.run_id = resume_state["run_id"]
            self.tracker.reopen(self.run_id)
        else:
            self.run_id = self.tracker.start(self.experiment, self.name, tags, self.parent_run_id)
        self.tracker.set_tags(self.run_id, tags)
        self.tracker.log_params(self.run_id, {**flatten(self.cfg), **self.component_params()})
        self.tracker.log_json(self.run_id, {"config": asdict(self.cfg), "environment": environment(self.device),
                                            "manifest_hash": self.data.manifest_hash}, "config.json")
        self.tracker.log_json(self.run_id, self.data.manifest, "manifest.json")

    def component_params(self) -> dict[str, object]:
        """The same keys for every method: model.* facts and each stage's weighted loss terms."""
        params: dict[str, object] = {f"model.{k}": v for k, v in self.spec.model.architecture().items()}
        for stage in self.spec.stages:
            params[f"loss.{stage.name}"] = " + ".join(f"{t.weight:g}*{t.name}" for t in stage.losses)
        return params

    def log_final(self, metrics: dict[str, float], wall: float, total_epochs: int) -> None:
        self.tracker.log_metrics(self.run_id, {**metrics, "wall_time_s": wall}, step=total_epochs)
        rows = ["class,name,train_count,accuracy"]
        names = self.data.class_names or tuple(str(c) for c in range(self.data.num_classes))
        for c, (name, count) in enumerate(zip(names, self.data.class_counts)):
            rows.append(f"{c},{name},{count},{100 * self.details['per_class_acc'][c]:.2f}")
        self.tracker.log_text(self.run_id, "\n".join(rows) + "\n", "per_class_accuracy.csv")
        self.tracker.log_arrays(self.run_id, self.details, "eval_details.npz")

    def execute(self, resume: bool = False, progress: Any = None) -> RunResult:
        state = load_json(self.folder / "state.json")
        if state is not None and state.get("finished") and resume:
            return RunResult(self.name, state["run_id"], state["metrics"], state["wall_time_s"], skipped=True)
        if state is not None and not state.get("finished") and not resume:
            raise HarnessError(f"run '{self.name}' has an unfinished checkpoint in {self.folder}; "
                               "pass --resume to continue it, or --restart to start it over")
        resume_state = state if (resume and state is not None) else None
        self.prepare()
        self.start_tracking(resume_state)
        save_json(self.folder / "state.json", {"run_id": self.run_id, "finished": False})
        started = time.perf_counter() - (resume_state or {}).get("elapsed_s", 0.0)
        trainer = Trainer(self.spec, self.cfg, self._feeder(), self.device, self.folder / "checkpoint.pt",
                          progress=None)
        self._hooks(trainer, started)
        reporter = RunProgress(progress, self.name, trainer.total_epochs * len(trainer.feeder)) if progress else None
        trainer.progress = reporter
        try:
            trainer.fit(resume=resume_state is not None)
            metrics = self.evaluate(full=True, epoch=trainer.total_epochs)
        except BaseException as error:
            self._logger.flush()  # what the run did before it stopped stays visible
            self.tracker.end(self.run_id, "FAILED" if isinstance(error, Exception) else "KILLED")
            raise
        wall = time.perf_counter() - started
        self.log_final(metrics, wall, trainer.total_epochs)
        self.tracker.end(self.run_id)
        save_json(self.folder / "state.json", {"run_id": self.run_id, "finished": True, "metrics": metrics,
                                               "wall_time_s": wall})
        (self.folder / "checkpoint.pt").unlink(missing_ok=True)
        if reporter:
            reporter.close()
        return RunResult(self.name, self.run_id, metrics, wall, details=self.details)

    def _feeder(self) -> Any:
        t, d = self.cfg.train, self.data
        augmentations = DATASETS.get(self.cfg.data.dataset).augmentations
        return make_feeder(d.train, augmentations, self.cfg.data.augment, d.mean, d.std, self.cfg.optim.batch_size,
                           self.device,
                           t.fast_path, t.num_workers)

    def _hooks(self, trainer: Trainer, started: float) -> None:
        logger = _EpochLogger(self, trainer.total_epochs)

        def checkpointed() -> None:
            logger.flush()
            elapsed = time.perf_counter() - started
            save_json(self.folder / "state.json", {"run_id": self.run_id, "finished": False, "elapsed_s": elapsed})

        trainer.on_epoch, trainer.on_checkpoint = logger, checkpointed
        self._logger = logger
