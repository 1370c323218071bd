"""Optuna tuning of a method's switches (SHIKE's alpha and beta): the only module that imports optuna.

The objective is the final balanced accuracy on a validation split carved from the training file; trials never
evaluate the test split (`train.eval_test=false`). A seeded TPE sampler proposes, a percentile pruner reads the
per-epoch validation accuracy through a trainer hook (`PruneHook`), which stops a trial's run after the epoch. The
study lives in an Optuna RDB storage (SQLite next to the MLflow store, or any RDB
URL shared by workers on several machines); every trial is an MLflow child run of the study's parent run, whose id
the study keeps. One invocation adds exactly N trials, whatever its worker count: a worker takes a claim from a
counter shared by the invocation before it starts a trial.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
import torch
from optuna.trial import FrozenTrial, TrialState

from harness.config import RunConfig, builder_defaults, flatten
from harness.errors import HarnessError
from harness.hooks import Hook
from harness.naming import checkpoint_dir
from harness.processes import adopt_environment, worker_context
from harness.progress import make_progress
from harness.registry import METHODS
from harness.runner import Run, RunResult, build_data
from harness.seeding import derive_seed
from harness.studies.search_space import Param
from harness.studies.settings import RunSettings
from harness.tracking import Tracker, runs_dir, store_dir
from harness.trainer import NonFiniteLoss

Study = optuna.Study  # for annotations elsewhere, so that this stays the only module importing optuna
OBJECTIVE = "val/balanced_acc"
PARENT_ATTR, SIGNATURE_ATTR = "mlflow_parent_run_id", "signature"
HEARTBEAT_S, GRACE_S = 20, 120  # a trial whose worker stopped beating for GRACE_S is marked FAIL by the next worker
# How and where a trial runs, not what it computes: machines (and harness versions) may differ in these.
MACHINE_KEYS = ("train.device", "train.num_workers", "train.fast_path", "train.compile", "train.channels_last",
                "train.checkpoint_interval", "data.data_root", "data.download")


@dataclass(frozen=True)
class TunePlan:
    """Everything a worker needs (picklable for spawned processes)."""

    study: str
    storage: str
    tracking_uri: str
    experiment: str
    method: str
    space: dict[str, Param]
    settings: RunSettings  # data, preset, epochs, device and the user's --set entries, shared by every trial
    val_per_class: int = 20
    seed: int = 0
    sampler_seed: int = 0
    n_trials: int = 8
    workers: int = 1
    timeout_s: float | None = None
    startup_trials: int = 5
    prune_warmup: int | None = None  # epochs before pruning may act; None: half the first stage
    prune_keep: float = 75.0  # Optuna's percentile: keep trials in the top 75% at an epoch, prune the bottom 25%
    first_trial: int = 0  # trials in the study when this invocation started (varies the sampler seeds)
    launcher: int = 0  # 0, or this process's id where other invocations work on the study at the same time
    deadline: float | None = field(default=None, compare=False)

    def config(self, params: Mapping[str, float], refit: bool = False) -> RunConfig:
        """The trial's config through the same path as `harness run` (resolve_config), plus the tuning overrides."""
        if refit:  # the full training split, the test set evaluated once at the end
            settings = self.settings.with_overrides(
                after=["data.val_per_class=0", "train.eval_test=true", "train.eval_interval=0"])
        else:  # user --set entries may change the validation size but never switch the test split back on
            settings = self.settings.with_overrides(before=[f"data.val_per_class={self.val_per_class}"],
                                                    after=["train.eval_test=false"])
        return settings.config(self.method, self.seed, dict(params))

    def signature(self) -> dict[str, Any]:
        """What makes two invocations the same study (machine-local keys and trial counts excluded)."""
        flat = {k: v for k, v in flatten(self.config({})).items() if k not in MACHINE_KEYS}
        for name in self.space:
            flat.pop(f"method.{name}", None)
        space = {k: [v.low, v.high, v.log] for k, v in self.space.items()}
        return {**{k: str(v) for k, v in flat.items()}, "space": str(space), "sampler_seed": str(self.sampler_seed)}


def default_storage(tracking_uri: str) -> str:
    """SQLite next to the MLflow store (`<runs>/optuna.db`)."""
    folder = store_dir(tracking_uri)
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'optuna.db'}"


def trial_name(study: str, number: int, refit: bool = False) -> str:
    """`{study}-t{n}` for a trial's MLflow run, `{study}-refit-t{n}` for the refit of trial n."""
    return f"{study}-refit-t{number}" if refit else f"{study}-t{number}"


def quiet_optuna() -> None:
    """Optuna logs each failed trial with its traceback; the harness prints one line per trial with its reason
    instead (`_announce`), and the study's report lists every reason. Called when tuning starts, never at import."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.ERROR)


def shown_url(url: str) -> str:
    """A storage URL fit for logs and MLflow tags: any password masked."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL sqlalchemy can parse: optuna will say so when it opens it
        return url


def open_storage(url: str, on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None
                 ) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats; retried because concurrent first connections race to create the tables."""
    engine = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    for attempt in range(4):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" since 2.9; said once per process is noise
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S,
                                                  grace_period=GRACE_S, heartbeat_stale_trial_callback=on_stale)
        except Exception as error:  # sqlalchemy's errors differ per backend; the last attempt reports it
            if attempt == 3:
                raise HarnessError(f"cannot open the Optuna storage {shown_url(url)}: {error}") from error
            time.sleep(1 + attempt)
    raise AssertionError("unreachable")


def make_sampler(plan: TunePlan, worker: int) -> optuna.samplers.TPESampler:
    """Seeded TPE; each worker of each invocation gets its own seed so they do not propose the same points."""
    seed = derive_seed(plan.sampler_seed, plan.first_trial, plan.launcher, worker) % 2**32
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=plan.startup_trials, constant_liar=True)


def load_study(plan: TunePlan, storage: optuna.storages.BaseStorage, worker: int = 0) -> optuna.Study:
    # The pruner drops the bottom quarter only; the warm-up before it may act is the PruneHook's (it knows the
    # planned stage epochs, which the config alone does not).
    pruner = optuna.pruners.PercentilePruner(plan.prune_keep, n_startup_trials=plan.startup_trials)
    return optuna.load_study(study_name=plan.study, storage=storage, sampler=make_sampler(plan, worker),
                             pruner=pruner)


def ensure_study(plan: TunePlan, tracker: Tracker, storage: optuna.storages.BaseStorage) -> tuple[TunePlan, str]:
    """Create the study (or join it); return the plan (with the study's experiment) and the MLflow parent run id.
    Exactly one process creates the study (the storage enforces it); it writes the signature and the parent run,
    the others wait for them."""
    try:
        study = optuna.create_study(storage=storage, study_name=plan.study, direction="maximize")
        study.set_user_attr(SIGNATURE_ATTR, plan.signature())
        study.set_user_attr("experiment", plan.experiment)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=plan.study, storage=storage)
        _check_signature(plan, study)
        # Joining a study that another invocation has just created or is running: its seeds must differ from
        # that one's (same trial count), so they come from this process; a plain rerun stays reproducible.
        busy = not study.trials or any(t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))
        plan = replace(plan, experiment=study.user_attrs.get("experiment", plan.experiment),
                       launcher=os.getpid() if busy else 0)
        parent = _wait_for(lambda: study.user_attrs.get(PARENT_ATTR), 30.0)  # the creator is writing it
    else:
        parent = None
    if parent is None:  # created here (or its creator died before writing it): this process makes the parent run
        tags = {"kind": "tune", "study": plan.study, "method": plan.method, "storage": shown_url(plan.storage)}
        parent = tracker.start(plan.experiment, plan.study, tags)
        study.set_user_attr(PARENT_ATTR, parent)
    else:
        tracker.reopen(parent)
    return plan, parent


def _wait_for(get: Callable[[], Any], timeout_s: float) -> Any:
    deadline = time.monotonic() + timeout_s
    while (value := get()) is None and time.monotonic() < deadline:
        time.sleep(0.5)
    return value


def _check_signature(plan: TunePlan, study: optuna.Study) -> None:
    stored = _wait_for(lambda: study.user_attrs.get(SIGNATURE_ATTR), 30.0)
    ours = plan.signature()
    if stored is None:  # its creator died before writing one: this invocation's settings define the study
        study.set_user_attr(SIGNATURE_ATTR, ours)
        return
    diff = sorted(k for k in set(stored) & set(ours) if stored[k] != ours[k])  # keys a newer harness added pass
    if diff:
        shown = "; ".join(f"{k}: study {stored[k]!r}, now {ours[k]!r}" for k in diff[:6])
        raise HarnessError(f"study '{plan.study}' was created with other settings ({shown}); "
                           "rerun with the same options or pass --study NEW_NAME")


class Claims:
    """A counter shared by one invocation's workers: a trial starts only after taking a claim, so K workers
    together add exactly N trials (a fast worker takes more of them)."""

    def __init__(self, total: int, ctx: Any) -> None:
        self.total, self.taken = total, ctx.Value("i", 0)

    def take(self, deadline: float | None) -> bool:
        with self.taken.get_lock():
            if self.taken.value >= self.total or (deadline is not None and time.time() >= deadline):
                return False
            self.taken.value += 1
            return True


class Objective:
    """One trial = one harness Run (an MLflow child run) with the trial's switches as method overrides."""

    def __init__(self, plan: TunePlan, tracker: Tracker) -> None:
        self.plan, self.tracker = plan, tracker
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", self.worker)  # first, so that the launcher can fail it if this worker dies
        params = {k: _suggest(trial, k, p, self.plan.method) for k, p in self.plan.space.items()}
        cfg = self.plan.config(params)
        name = trial_name(self.plan.study, trial.number)
        folder = checkpoint_dir(runs_dir(), self.plan.experiment, name, cfg)
        shutil.rmtree(folder, ignore_errors=True)  # trials never resume: a reused number starts over
        tags = {"kind": "trial", "study": self.plan.study, "trial_number": trial.number, "trial_state": "RUNNING"}
        pruning = PruneHook(trial, self.plan.prune_warmup)
        run = Run(cfg, self.tracker, self.plan.experiment, name, tags=tags,
                  parent_run_id=trial.study.user_attrs[PARENT_ATTR], hooks=[pruning])
        try:
            result = run.execute()
        except NonFiniteLoss as error:  # these switches diverge: TPE should move away, the study goes on
            self._close(run, trial, "PRUNED", "FAILED", str(error))
            raise optuna.TrialPruned(str(error)) from error
        except Exception as error:
            self._close(run, trial, "FAIL", "FAILED", f"{type(error).__name__}: {error}")
            raise
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if result.stopped:  # the run has ended itself as KILLED
            self._close(run, trial, "PRUNED", None, result.stopped)
            raise optuna.TrialPruned(result.stopped)
        value = result.metrics[OBJECTIVE]
        trial.report(value, pruning.total_epochs)  # the final evaluation closes the curve the pruner compares
        self._close(run, trial, "COMPLETE", None)
        return value

    def _close(self, run: Run, trial: optuna.Trial, state: str, status: str | None, reason: str = "") -> None:
        extra = {"reason": reason[:500]} if reason else {}
        for key, value in {**extra, "mlflow_run_id": run.run_id}.items():
            trial.set_user_attr(key, value)
        if not run.run_id:
            return
        self.tracker.set_tags(run.run_id, {"trial_state": state, **extra})
        if status is not None:
            self.tracker.end(run.run_id, status)


def _suggest(trial: optuna.Trial, name: str, p: Param, method: str) -> float:
    if isinstance(builder_defaults(METHODS.get(method))[name], int):
        return trial.suggest_int(name, int(p.low), int(p.high), log=p.log)
    return trial.suggest_float(name, p.low, p.high, log=p.log)


class PruneHook(Hook):
    """Reports each epoch's validation balanced accuracy to the trial and stops the run when the pruner says so.

    Early validation accuracy of a long-tailed run is noise around chance (a trial at chance after two of eight
    epochs can end best), so pruning waits `warmup` epochs (default: half the first stage); the last epoch is never
    pruned (the run's final evaluation is the trial's value). A trial must never see the test split."""

    def __init__(self, trial: optuna.Trial, warmup: int | None = None) -> None:
        self.trial, self.warmup = trial, warmup
        self.total_epochs = 0

    def before_train(self, trainer: Any) -> None:
        self.total_epochs = trainer.total_epochs
        if self.warmup is None:
            self.warmup = trainer.stages[0].epochs // 2

    def after_epoch(self, trainer: Any, epoch: int, metrics: dict[str, Any]) -> None:
        if any(k.startswith("test/") for k in metrics):
            raise HarnessError("a tuning trial evaluated the test split; it must see validation data only")
        if OBJECTIVE not in metrics:
            return
        value = metrics[OBJECTIVE]
        self.trial.report(value, epoch)
        if epoch >= (self.warmup or 0) and epoch + 1 < self.total_epochs and self.trial.should_prune():
            trainer.request_stop(f"pruned after epoch {epoch + 1} ({OBJECTIVE} {value:.4f})")


def mark_lost(tracker: Tracker, plan: TunePlan, number: int, reason: str) -> None:
    """Close the MLflow child run of a trial whose worker died (found by its tags)."""
    found = tracker.search([plan.experiment], f"tags.study = '{plan.study}' and tags.trial_number = '{number}'")
    for run_id in getattr(found, "run_id", []):
        tracker.set_tags(run_id, {"trial_state": "FAIL", "reason": reason})
        tracker.end(run_id, "KILLED")


def worker_main(plan: TunePlan, worker: int, claims: Claims, env: dict[str, str] | None = None) -> None:
    """One worker process: take claims and run one trial per claim until the invocation's N are taken. `env`: the
    parent's environment, adopted first (a forked worker has its forkserver's: `harness.processes`)."""
    if env is not None:
        adopt_environment(env)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // plan.workers))
    quiet_optuna()
    tracker = Tracker(plan.tracking_uri)

    def on_stale(study: optuna.Study, trial: FrozenTrial) -> None:
        mark_lost(tracker, plan, trial.number, "no heartbeat: its worker died")

    study = load_study(plan, open_storage(plan.storage, on_stale), worker)
    objective = Objective(plan, tracker)
    while claims.take(plan.deadline):
        study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[_announce(worker)])


def _announce(worker: int) -> Callable[[optuna.Study, FrozenTrial], None]:
    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        params = " ".join(f"{k}={v:.4g}" for k, v in trial.params.items())
        value = "-" if trial.value is None else f"{trial.value:.4f}"
        seconds = trial.duration.total_seconds() if trial.duration else 0.0
        reason = f": {trial.user_attrs['reason']}" if trial.user_attrs.get("reason") else ""
        print(f"[worker {worker}] trial {trial.number} {trial.state.name} {OBJECTIVE}={value} {params} "
              f"({seconds:.0f} s){reason}", flush=True)

    return callback


def run_workers(plan: TunePlan, tracker: Tracker, study: optuna.Study) -> list[int]:
    """Run the invocation's trials: in this process for one worker, else K worker processes (`harness.processes`). Returns the exit
    codes; the running trials of a worker that died are marked FAIL at once, so the study stays usable."""
    ctx = worker_context()
    claims = Claims(plan.n_trials, ctx)
    if plan.workers == 1:
        worker_main(plan, 0, claims)
        return [0]
    env = dict(os.environ)
    procs = [ctx.Process(target=worker_main, args=(plan, i, claims, env), name=f"tune-worker-{i}")
             for i in range(plan.workers)]
    for proc in procs:
        proc.start()
        print(f"worker {procs.index(proc)} pid {proc.pid}", flush=True)
    for proc in procs:  # on Ctrl-C the workers get SIGINT too; multiprocessing joins them at exit
        proc.join()
    fail_dead_workers(study, tracker, plan, {f"{socket.gethostname()}:{p.pid}": p.exitcode for p in procs
                                             if p.exitcode != 0})
    return [p.exitcode if p.exitcode is not None else -1 for p in procs]


def fail_dead_workers(study: optuna.Study, tracker: Tracker, plan: TunePlan, dead: dict[str, int | None]) -> list[int]:
    """Mark FAIL the running trials of workers that died (keyed "host:pid" -> exit code); return their numbers."""
    lost = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if worker in dead:
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            mark_lost(tracker, plan, trial.number, f"worker {worker} exited with code {dead[worker]}")
            lost.append(trial.number)
    return lost


def check_data(plan: TunePlan) -> None:
    """Build the trials' data once (the split is the same for every trial): missing or broken data files fail here,
    with the dataset's own message, before any study, trial or MLflow run exists."""
    build_data(plan.config({}))


def tune(plan: TunePlan) -> tuple[TunePlan, optuna.Study, str, list[int]]:
    """Create or join the study and add `plan.n_trials` trials with `plan.workers` workers; return the plan as run,
    the study, the parent run id and the worker exit codes."""
    check_data(plan)
    quiet_optuna()
    tracker = Tracker(plan.tracking_uri)
    storage = open_storage(plan.storage)
    plan, parent = ensure_study(plan, tracker, storage)
    study = load_study(plan, storage)
    deadline = time.time() + plan.timeout_s if plan.timeout_s else None
    plan = replace(plan, first_trial=len(study.trials), deadline=deadline)
    try:
        codes = run_workers(plan, tracker, study)
    except BaseException:
        tracker.end(parent, "KILLED")
        raise
    return plan, study, parent, codes


def first_failure(study: optuna.Study, plan: TunePlan) -> str | None:
    """If every trial this invocation added failed, the reason of the first one (else None)."""
    mine = [t for t in study.get_trials(deepcopy=False) if t.number >= plan.first_trial]
    if not mine or any(t.state != TrialState.FAIL for t in mine):
        return None
    return f"trial {mine[0].number}: {mine[0].user_attrs.get('reason') or 'no reason recorded (its worker died?)'}"


def refit(plan: TunePlan, study: optuna.Study, tracker: Tracker, parent: str) -> RunResult:
    """Train the best switches on the full training split and evaluate the test set once (a child run tagged
    refit; rerunning skips a finished refit of the same trial and resumes an interrupted one)."""
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        raise HarnessError(f"study '{plan.study}' has no complete trial to refit")
    best = study.best_trial
    run = Run(plan.config(best.params, refit=True), tracker, plan.experiment, trial_name(plan.study, best.number, True),
              parent_run_id=parent, tags={"kind": "refit", "refit": "true", "study": plan.study,
                                          "best_trial": best.number})
    with make_progress() as progress:
        return run.execute(resume=True, progress=progress)


def save_plots(study: optuna.Study, folder: Path, space: list[str]) -> dict[str, str]:
    """optimization_history.png, param_importances.png, contour_<a>_<b>.png (and intermediate_values.png) where
    the study has enough trials for them; returns {file: reason} for the ones it could not draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    plots: dict[str, Callable[[], Any]] = {
        "optimization_history.png": lambda: vis.plot_optimization_history(study),
        "param_importances.png": lambda: vis.plot_param_importances(study),
        "intermediate_values.png": lambda: vis.plot_intermediate_values(study),
    }
    pair = ["alpha", "beta"] if {"alpha", "beta"} <= set(space) else space[:2]
    if len(pair) == 2:
        plots[f"contour_{pair[0]}_{pair[1]}.png"] = lambda: vis.plot_contour(study, params=pair)
    folder.mkdir(parents=True, exist_ok=True)
    skipped = {}
    for name, draw in plots.items():
        try:
            with warnings.catch_warnings():  # "importances will be equal" with few trials is not news
                warnings.simplefilter("ignore")
                axes = draw()
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
            figure.savefig(folder / name, dpi=120, bbox_inches="tight")
            plt.close(figure)
        except Exception as error:  # too few complete trials, a constant parameter...: the others still draw
            skipped[name] = f"{type(error).__name__}: {error}"
    return skipped


def open_existing(name: str, storage_url: str) -> optuna.Study:
    """Load a study for reporting; an unknown name lists the storage's studies."""
    storage = open_storage(storage_url)
    names = optuna.get_all_study_names(storage)
    if name not in names:
        raise HarnessError(f"no study '{name}' in {shown_url(storage_url)}; its studies: "
                           f"{', '.join(sorted(names)) or '(none)'}")
    return optuna.load_study(study_name=name, storage=storage)
