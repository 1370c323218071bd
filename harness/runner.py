"""One run, end to end: frozen config -> dataset builder -> method builder -> trainer -> evaluator -> tracking.

Every run is an MLflow run. Its checkpoint folder (keyed by experiment, run name and config hash) holds the
latest atomic checkpoint and a small state file with the MLflow run id, so `resume` continues a killed run in the
same MLflow run and skips a finished one.

Under DDP (`torchrun` or `--nproc-per-node`, harness.distributed) every process executes the run; rank 0 alone
tracks, journals, shows progress and writes the run's files, and every process returns once rank 0 is done.
"""

from __future__ import annotations

import platform
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from harness import __version__
from harness.checkpoint import load_checkpoint, load_json, save_json
from harness.config import RunConfig, flatten, plan_epochs, stage_overrides
from harness.cost import run_cost
from harness.data import FileSplit, LTData, Split
from harness.distributed import LOCAL, Local, replicas, world_size
from harness.errors import HarnessError
from harness.evaluate import Evaluator
from harness.feeders import make_feeder
from harness.file_feeder import file_loading, training_loader, with_crop
from harness.hooks import Hook
from harness.method import MethodSpec
from harness.naming import checkpoint_dir
from harness.posthoc import fit_posthoc
from harness.progress import progress_hook
from harness.registry import DATASETS, METHODS
from harness.seeding import seed_everything, set_deterministic
from harness.tracking import Tracker, runs_dir
from harness.trainer import Trainer

REPO_ROOT = Path(__file__).resolve().parent.parent
FINAL_WEIGHTS = "final_weights.pt"


@dataclass
class RunResult:
    name: str
    run_id: str
    metrics: dict[str, float]
    wall_time_s: float
    skipped: bool = False
    stopped: str | None = None  # a hook's reason for stopping early (e.g. "pruned"); metrics are then empty
    details: dict[str, Any] = field(default_factory=dict, repr=False)
    # Where this process's time went, in seconds: setup (data, model, tracking), train (the epochs run here,
    # per-epoch evaluation included) and eval (the final evaluation); logged as time/* metrics.
    timings: dict[str, float] = field(default_factory=dict)


def build_data(cfg: RunConfig) -> LTData:
    d = cfg.data
    spec = DATASETS.get(d.dataset)
    data = spec.build(imbalance_factor=d.imbalance_factor, profile=d.profile, n_max=d.n_max or None,
                      data_root=d.data_root or None, download=d.download, data_seed=d.data_seed,
                      val_per_class=d.val_per_class, test_per_class=d.test_per_class)
    return with_crop(data, file_loading(d).image_size)  # file-backed splits only


def build_method(cfg: RunConfig, data: LTData) -> MethodSpec:
    """The method's model, losses and stages, with `--set stage.<name>.<field>` applied to its stages."""
    builder = METHODS.get(cfg.method)
    spec = builder(num_classes=data.num_classes, class_counts=tuple(data.class_counts), **cfg.method_kwargs)
    spec.stages = stage_overrides(spec.stages, cfg.stage_args)
    if cfg.optim.peak_lr_scale != 1.0:  # one knob for every method's stages, whatever their names
        spec.stages = tuple(replace(s, peak_lr=s.peak_lr * cfg.optim.peak_lr_scale) for s in spec.stages)
    return spec


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
    # CPU threads change float reduction order, so a rerun on CPU needs the same count to match to the digit
    return {"device": device.type, "device_name": name, "torch": torch.__version__, "harness": __version__,
            "python": platform.python_version(), "torch_threads": str(torch.get_num_threads()),
            "world_size": str(world_size()), **git_info()}


def _to_device(split: Split | FileSplit, device: torch.device) -> Split | FileSplit:
    if isinstance(split, FileSplit):  # read from disk batch by batch at evaluation
        return split
    return Split(split.images.to(device), split.labels.to(device))


class EvaluationHook(Hook):
    """Evaluates every `train.eval_interval` epochs (logged, never used to select) and adds the figures to the
    epoch's metrics, so the hooks after it (tracking, pruning) see them. The final epoch is left to `Run`."""

    def __init__(self, run: Run) -> None:
        self.run = run

    def after_epoch(self, trainer: Trainer, epoch: int, metrics: dict[str, Any]) -> None:
        interval = self.run.cfg.train.eval_interval
        if interval > 0 and (epoch + 1) % interval == 0 and epoch + 1 != trainer.total_epochs:
            metrics.update(self.run.evaluate(full=False))


class TrackingHook(Hook):
    """Sends each epoch's metrics to MLflow in one batch when a checkpoint is written, so the logged history and the
    checkpoint agree: a resumed run logs each step exactly once.

    Write-ahead: every epoch's rows, with the timestamps they will be logged with, are journaled to `pending.json`
    before the trainer can write that epoch's checkpoint. A process killed after the checkpoint is renamed into place
    but before its rows reach MLflow loses nothing: the resume re-sends the journaled rows the checkpoint covers
    (an exact duplicate of a row that did arrive is ignored by the store) and drops the ones it does not cover,
    which it trains and logs again."""

    def __init__(self, run: Run, started: float) -> None:
        self.run, self.started = run, started
        self.journal = run.folder / "pending.json"
        self.rows: list[tuple[int, dict[str, float], int]] = []

    def before_train(self, trainer: Trainer) -> None:
        stage, epoch = trainer.start
        done = trainer.stages[stage].first_global_epoch + epoch if stage < len(trainer.stages) else trainer.total_epochs
        journaled = (load_json(self.journal) or {}).get("rows", [])
        self.rows = [(int(e), m, int(t)) for e, m, t in journaled if int(e) < done]
        self.flush()

    def after_epoch(self, trainer: Trainer, epoch: int, metrics: dict[str, Any]) -> None:
        self.rows.append((epoch, dict(metrics), int(time.time() * 1000)))
        save_json(self.journal, {"rows": self.rows})

    def after_checkpoint(self, trainer: Trainer) -> None:
        self.flush()
        elapsed = time.perf_counter() - self.started
        save_json(self.run.folder / "state.json", {"run_id": self.run.run_id, "finished": False,
                                                   "elapsed_s": elapsed})

    def flush(self) -> None:
        self.run.tracker.log_metric_rows(self.run.run_id, self.rows)
        self.rows = []
        save_json(self.journal, {"rows": []})

    def flush_checkpointed(self, trainer: Trainer) -> None:
        """After a crash or an interrupt: log the epochs the checkpoint on disk covers (it may have been renamed into
        place just before the crash, before `after_checkpoint` flushed them) and drop the later ones, which a resume
        trains and logs again (logging them now too would put their steps in the history twice)."""
        if self.rows:
            saved = load_checkpoint(trainer.checkpoint_path) if trainer.checkpoint_path else None
            done = 0 if saved is None else trainer.stages[saved["stage"]].first_global_epoch + saved["epoch"]
            self.rows = [row for row in self.rows if row[0] < done]
        self.flush()


class FollowerTracking(TrackingHook):
    """The tracking hook of a DDP process other than rank 0: rank 0 alone journals, logs and writes the state."""

    def before_train(self, trainer: Trainer) -> None:
        pass

    def after_epoch(self, trainer: Trainer, epoch: int, metrics: dict[str, Any]) -> None:
        pass

    def after_checkpoint(self, trainer: Trainer) -> None:
        pass

    def flush(self) -> None:
        pass

    def flush_checkpointed(self, trainer: Trainer) -> None:
        pass


class Run:
    """The glue object for one run; `execute()` is the whole pipeline. `hooks` are added after the run's own
    (evaluation, tracking, progress), so they see each epoch's evaluation."""

    replicas: Local = LOCAL  # this process's part of the run (harness.distributed); set by `execute`

    def __init__(self, cfg: RunConfig, tracker: Tracker, experiment: str, run_name: str, *,
                 parent_run_id: str | None = None, tags: dict[str, Any] | None = None,
                 hooks: Sequence[Hook] = ()) -> None:
        self.cfg, self.tracker, self.experiment, self.name = cfg, tracker, experiment, run_name
        self.parent_run_id, self.extra_tags, self.extra_hooks = parent_run_id, tags or {}, list(hooks)
        self.folder = checkpoint_dir(runs_dir(), experiment, run_name, cfg)
        self.run_id = ""

    def prepare(self) -> None:
        seed_everything(self.cfg.train.seed)
        set_deterministic(self.cfg.train.deterministic)
        self.device = self.replicas.place(resolve_device(self.cfg.train.device))
        self.data = build_data(self.cfg)
        # Evaluation splits live on the device for the whole run (the fast path's "test evaluation on the device").
        on_device = self.device.type == "cuda"
        self.test_split = _to_device(self.data.test, self.device) if on_device else self.data.test
        self.val_split = None if self.data.val is None else (
            _to_device(self.data.val, self.device) if on_device else self.data.val)
        seed_everything(self.cfg.train.seed)  # model init does not depend on how the data was built
        self.spec = build_method(self.cfg, self.data)
        self.predictor: torch.nn.Module = self.spec.model  # the final evaluation's model: + post-hoc steps
        self.evaluator = Evaluator(self.data.class_counts, self.data.mean, self.data.std, self.device,
                                   autocast=self.cfg.train.amp and self.device.type == "cuda")

    def evaluate(self, full: bool) -> dict[str, float]:
        """Test (unless train.eval_test is off, as in tuning trials) and validation metrics. `full` adds every
        evaluator figure and keeps the per-class details; otherwise one host read per split (per-epoch use)."""
        if not self.cfg.train.eval_test and self.data.val is None:
            raise HarnessError("train.eval_test=false needs a validation split (set data.val_per_class > 0)")
        out: dict[str, float] = {}
        details = None
        for name, split in (("test", self.test_split), ("val", self.val_split)):
            if split is None or (name == "test" and not self.cfg.train.eval_test):
                continue
            if full:
                metrics, split_details = self.evaluator.full(self.predictor, split)
                details = details if details is not None else split_details  # test first; val in tuning trials
            else:
                metrics = self.evaluator.quick(self.spec.model, split)
            keys = metrics if (full and name == "test") else ("top1", "balanced_acc", "many", "medium", "few")
            out.update({f"{name}/{k}": metrics[k] for k in keys})
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
        epochs = plan_epochs(self.spec.stages, self.cfg.train)
        params["plan.epochs"] = "+".join(map(str, epochs))
        params["plan.peak_lrs"] = "+".join(f"{stage.peak_lr:g}" for stage in self.spec.stages)
        for stage, planned in zip(self.spec.stages, epochs):
            params[f"loss.{stage.name}"] = " + ".join(f"{t.weight:g}*{t.name}" for t in stage.losses)
            params[f"stage.{stage.name}.epochs"] = planned
            params[f"stage.{stage.name}.lr"] = (f"{stage.schedule or self.cfg.optim.schedule} peak {stage.peak_lr:g} "
                                                f"warm-up {stage.warmup_epochs}")
            params[f"stage.{stage.name}.sampler"] = stage.sampler
            params[f"stage.{stage.name}.trains"] = ",".join(stage.trainable)
            if stage.lr_steps:
                params[f"stage.{stage.name}.lr_steps"] = ",".join(f"{f:g}:{v:g}" for f, v in stage.lr_steps)
            if stage.weight_decay is not None:
                params[f"stage.{stage.name}.weight_decay"] = stage.weight_decay
            if stage.mixup:
                params[f"stage.{stage.name}.mixup"] = stage.mixup
            if stage.constraints:
                params[f"stage.{stage.name}.constraints"] = ",".join(type(c).__name__ for c in stage.constraints)
        params["posthoc"] = ",".join(type(step).__name__ for step in self.spec.posthoc) or "none"
        return params

    def log_final(self, metrics: dict[str, float], wall: float, total_epochs: int) -> None:
        self.tracker.log_metrics(self.run_id, {**metrics, "wall_time_s": wall}, step=total_epochs)
        rows = ["class,name,train_count,accuracy"]
        names = self.data.class_names or tuple(str(c) for c in range(self.data.num_classes))
        for c, (name, count) in enumerate(zip(names, self.data.class_counts)):
            rows.append(f"{c},{name},{count},{100 * self.details['per_class_acc'][c]:.2f}")
        self.tracker.log_text(self.run_id, "\n".join(rows) + "\n", "per_class_accuracy.csv")
        self.tracker.log_arrays(self.run_id, self.details, "eval_details.npz")

    def log_weights(self) -> None:
        """The final weights as the artifact `final_weights.pt` (the model's state dict; post-hoc steps are refitted
        from the training split when `harness eval` loads them), beside the run's config and manifest."""
        if not self.replicas.is_main:
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / FINAL_WEIGHTS
            torch.save(self.spec.model.state_dict(), path)
            self.tracker.log_file(self.run_id, path)

    def execute(self, resume: bool = False, progress: Any = None) -> RunResult:
        self.replicas = replicas(sync_bn=self.cfg.train.sync_bn)
        self.tracker = self.replicas.tracker(self.tracker)
        state = self.replicas.from_main(lambda: load_json(self.folder / "state.json"))  # one decision for all
        if state is not None and state.get("finished") and resume:
            return RunResult(self.name, state["run_id"], state["metrics"], state["wall_time_s"], skipped=True)
        if state is not None and not state.get("finished") and not resume:
            raise HarnessError(f"run '{self.name}' has an unfinished checkpoint in {self.folder}; "
                               "pass --resume to continue it, or --restart to start it over")
        resume_state = state if (resume and state is not None) else None
        clock = time.perf_counter()
        self.prepare()
        self.start_tracking(resume_state)
        main = self.replicas.is_main
        if main:
            save_json(self.folder / "state.json", {"run_id": self.run_id, "finished": False})
        started = time.perf_counter() - (resume_state or {}).get("elapsed_s", 0.0)
        tracking = (TrackingHook if main else FollowerTracking)(self, started)
        feeder = self.replicas.shard(self._feeder(), self.cfg.optim.batch_size)
        hooks: list[Hook] = [EvaluationHook(self), tracking]
        if progress is not None and main:
            hooks.append(progress_hook(progress, self.name, feeder))
        trainer = Trainer(self.spec, self.cfg, feeder, self.device, self.folder / "checkpoint.pt",
                          hooks=[*hooks, *self.extra_hooks], replicas=self.replicas)
        timings = {"setup_s": time.perf_counter() - clock}
        try:
            clock = time.perf_counter()
            trainer.fit(resume=resume_state is not None)
            timings["train_s"] = time.perf_counter() - clock
            if not trainer.stop_reason:
                self.predictor = fit_posthoc(self.spec.model, self.spec.posthoc, self.data.train, self.data.mean,
                                             self.data.std, self.device)
            if trainer.stop_reason:
                tracking.flush()
                self.tracker.end(self.run_id, "KILLED")
                self.tracker.finish_run(self.run_id)
                return RunResult(self.name, self.run_id, {}, time.perf_counter() - started,
                                 stopped=trainer.stop_reason)
            clock = time.perf_counter()
            metrics = self.evaluate(full=True)
            timings["eval_s"] = time.perf_counter() - clock
        except BaseException as error:
            tracking.flush_checkpointed(trainer)
            self.tracker.end(self.run_id, "FAILED" if isinstance(error, Exception) else "KILLED")
            raise
        wall = time.perf_counter() - started
        cost = run_cost(self.spec, (1, *self.data.train.sample_shape),
                        [run.epochs * len(self.data.train) for run in trainer.stages], timings["train_s"],
                        trainer.images_trained, wall, self.device)
        self.log_final({**metrics, **cost, **{f"time/{k}": v for k, v in timings.items()}}, wall,
                       trainer.total_epochs)
        self.log_weights()
        self.tracker.end(self.run_id)
        if main:
            save_json(self.folder / "state.json", {"run_id": self.run_id, "finished": True, "metrics": metrics,
                                                   "wall_time_s": wall})
            (self.folder / "checkpoint.pt").unlink(missing_ok=True)
            tracking.journal.unlink(missing_ok=True)
        self.tracker.finish_run(self.run_id)  # replays what a tracking server that went away missed, or says how
        self.replicas.barrier()  # every process returns once rank 0 has logged the run (a study reads it next)
        return RunResult(self.name, self.run_id, metrics, wall, details=self.details, timings=timings)

    def _feeder(self) -> Any:
        t, d = self.cfg.train, self.data
        augmentations = DATASETS.get(self.cfg.data.dataset).augmentations
        if augmentations is None:
            raise HarnessError(f"dataset '{self.cfg.data.dataset}' declares no training augmentations")
        loader = training_loader(file_loading(self.cfg.data).loader, d.train, self.spec.stages)  # views: no DALI
        return make_feeder(d.train, augmentations, self.cfg.data.augment, d.mean, d.std, self.cfg.optim.batch_size,
                           self.device, t.fast_path, t.num_workers, loader=loader)
