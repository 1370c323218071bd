"""Where the runs of a study go: a local process pool (default), Ray tasks, or SLURM jobs through submitit.

The unit is one run (`RunJob`: a resolved config, its MLflow experiment, run name, parent run and tags). Every
backend executes the same function, `run_one` (in the pool's worker processes, in Ray tasks, in SLURM jobs), with
picklable arguments, and every run logs to the same MLflow store (`Tracker(tracking_uri)`), so the parent run and
the report stay with the caller (`studies.ablation.run_study`, `harness run method`). Design:
reference/large-scale-lt.md section 6 (one small `submit/wait` interface; Ray and submitit optional, imported here
only, and only when asked for).

A backend yields one outcome per run as it ends: its record (what `execute_job` returns) or a `Failure` naming the
run's row and seed. The local pool stops the study at the first failed run (as it always has: the others are ended,
each resumable); on Ray and SLURM the runs are independent jobs, so the others still land and the failures are
reported together at the end (`failure_message`).

Remote workers get HARNESS_HOME (the checkpoints) and HARNESS_PLUGINS from the caller (`WorkerSetup`), so a cluster
needs the caller's runs folder on a shared filesystem and, for more than one node, an MLflow server as the store
(`--tracking-uri http://...`; SQLite over NFS is not safe for several writers).
"""

from __future__ import annotations

import importlib
import os
import shutil
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol

import torch

from harness.config import RunConfig
from harness.errors import HarnessError
from harness.interrupts import Terminated, install_signal_handlers
from harness.plugins import ENV_VAR as PLUGINS_ENV
from harness.plugins import load_env_plugins
from harness.processes import adopt_environment, worker_context
from harness.progress import NullProgress, relay
from harness.registry import Registry
from harness.runner import Run
from harness.tracking import Tracker, runs_dir

INSTALL_HINT = "pip install 'lt-harness[cluster]'"
SLURM_TIME_MIN = 24 * 60  # submitit's own default (5 minutes) would kill every real run
POLL_S = {"local": 1.0, "slurm": 15.0}  # submitit job polling: local jobs are cheap to poll, sacct is rate-limited


@dataclass(frozen=True)
class RunJob:
    """One run of a study or of `run method --seeds`; picklable, so a worker process, a Ray task or a SLURM job can
    execute it. `row` is the table row's name ('' outside a table), `key` the row key or the method."""

    cfg: RunConfig
    experiment: str
    name: str
    seed: int
    row: str = ""
    key: str = ""
    parent: str | None = None
    tags: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        return f"row {self.row} seed {self.seed}" if self.row else f"{self.key or self.cfg.method} seed {self.seed}"


@dataclass(frozen=True)
class Failure:
    """A run that did not land: which one, and its error in one line (the traceback is in its worker's log)."""

    job: RunJob
    error: str


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker applies before a run: torch threads (CPU reduction order, so per-seed results match across
    backends only at the same count) and the caller's environment (runs folder, plugin modules)."""

    threads: int | None = None
    env: tuple[tuple[str, str], ...] = ()

    def apply(self) -> None:
        os.environ.update(dict(self.env))
        if self.threads:
            torch.set_num_threads(self.threads)


def worker_setup(threads: int | None) -> WorkerSetup:
    env = {"HARNESS_HOME": str(runs_dir()), "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
    if os.environ.get(PLUGINS_ENV):
        env[PLUGINS_ENV] = os.environ[PLUGINS_ENV]
    return WorkerSetup(threads, tuple(sorted(env.items())))


def execute_job(job: RunJob, tracking_uri: str, resume: bool, progress: Any = None) -> dict:
    """Run one job in this process and return its record: row, key, seed, run id, wall time, final metrics."""
    run = Run(job.cfg, Tracker(tracking_uri), job.experiment, job.name, parent_run_id=job.parent or None,
              tags=dict(job.tags))
    result = run.execute(resume=resume, progress=progress)
    return {"row": job.row, "key": job.key, "seed": job.seed, "run_id": result.run_id,
            "wall_time_s": result.wall_time_s, "skipped": result.skipped, **result.metrics,
            **{f"time/{k}": v for k, v in result.timings.items()}}


def run_one(job: RunJob, tracking_uri: str, resume: bool, setup: WorkerSetup, progress: Any = None) -> dict:
    """The one-run function every backend executes: the caller's setup, then the run."""
    setup.apply()
    return execute_job(job, tracking_uri, resume, progress)


def run_remote(job: RunJob, tracking_uri: str, resume: bool, setup: WorkerSetup) -> dict:
    """A Ray task's or SLURM job's entry: `run_one` with a line per epoch on the worker's stderr. A run's own error
    comes back as a record {"failed": "Type: message"} (the run is already marked FAILED in MLflow by `Run`), so
    every backend reports it alike and no backend retries it; a crash of the worker itself still raises."""
    try:
        return run_one(job, tracking_uri, resume, setup, NullProgress())
    except Exception as error:
        traceback.print_exc()
        return {"failed": error_line(error)}


def error_line(error: BaseException) -> str:
    """`Type: first line`; a Ray task error is unwrapped to the exception raised in the task."""
    cause = getattr(error, "cause", None)
    error = cause if isinstance(cause, BaseException) else error
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _outcome(job: RunJob, record: dict) -> dict | Failure:
    return Failure(job, record["failed"]) if "failed" in record else record


def failure_message(failures: Sequence[Failure], landed: int, where: str) -> str:
    """One line: which runs failed and why, and where the others went."""
    listed = "; ".join(f"{f.job.label} ({f.error})" for f in failures)
    return (f"{len(failures)} of {len(failures) + landed} runs failed: {listed}; the {landed} other run(s) landed in "
            f"{where}; rerun with --resume to run only the unfinished ones (tracebacks: the failed runs' logs)")


@dataclass(frozen=True)
class SlurmOptions:
    partition: str | None = None
    time_min: int = SLURM_TIME_MIN
    mem_gb: float | None = None
    array_parallelism: int | None = None
    folder: str | None = None  # default RUNS/submitit/%j: on the filesystem the nodes share with this machine
    local: bool = False  # submitit's LocalExecutor: each job a local process, through the same pickling path
    extra: tuple[tuple[str, str], ...] = ()  # --slurm-option KEY=VALUE: any submitit slurm_* parameter
    cluster: str | None = None  # a submitit cluster name that wins over `local` ("debug": in-process, for tests)


@dataclass(frozen=True)
class DispatchOptions:
    """How the runs are executed. `cpus_per_run` is each run's cores and torch threads (default: the local pool
    splits the cores; Ray and SLURM give 1); `gpus_per_run` each run's devices (default: 1 where the cluster has
    CUDA devices, else 0)."""

    backend: str = "local"
    workers: int = 1
    cpus_per_run: int | None = None
    gpus_per_run: int | None = None
    ray_address: str | None = None
    slurm: SlurmOptions = field(default_factory=SlurmOptions)


class Dispatcher(Protocol):
    """A backend: made from `DispatchOptions` (refusing, before any run exists, what cannot work), it executes the
    jobs and yields one outcome per run as it ends."""

    def run(self, jobs: Sequence[RunJob], tracking_uri: str, resume: bool, progress: Any = None
            ) -> Iterator[dict | Failure]: ...


DISPATCHERS = Registry("dispatcher")


def make_dispatcher(options: DispatchOptions) -> Dispatcher:
    """The backend for `options`, checked (installed, reachable where that can be known) before any run starts."""
    return DISPATCHERS.get(options.backend)(options)


def _require(module: str, backend: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise HarnessError(f"--dispatch {backend} needs {module}, which is not installed: {INSTALL_HINT}") from None


def _no_workers(options: DispatchOptions, instead: str) -> None:
    if options.workers != 1:
        raise HarnessError(f"--workers sizes the local process pool; with --dispatch {options.backend} {instead}")


# The local pool: today's default, one process per run slot, or this process itself for one slot.

_worker_progress: Any = None  # set in each pool process by `_start_worker`


def _start_worker(progress: Any, env: dict[str, str]) -> None:
    global _worker_progress
    adopt_environment(env)  # the parent's variables now, not the forkserver's (harness.processes)
    install_signal_handlers()  # SIGTERM unwinds a worker's run as in the main process: checkpoint kept, run KILLED
    load_env_plugins()  # the --plugin modules, before any run starts, as the main process imported them
    _worker_progress = progress


def _pool_job(job: RunJob, tracking_uri: str, resume: bool, setup: WorkerSetup) -> dict:
    try:
        return run_one(job, tracking_uri, resume, setup, _worker_progress)
    except (KeyboardInterrupt, Terminated):
        # The run is marked KILLED and its finished epochs are checkpointed; end this worker rather than let the
        # pool hand it the next queued run while the study is being stopped.
        os._exit(143)


@DISPATCHERS.register("local")
class LocalPool:
    """Runs one after another in this process, or in `workers` processes at once (forked from a forkserver that
    has imported torch once: `harness.processes`) (each with cores / workers
    threads unless --cpus-per-run says): runs of launch-bound small models overlap their host overhead on one GPU; on
    a CPU they share the cores. Each run shows its progress: a bar (worker bars are relayed to this process) or a
    line per epoch. The first failed run stops the others (each stays resumable) and raises."""

    def __init__(self, options: DispatchOptions) -> None:
        self.options = options

    def run(self, jobs: Sequence[RunJob], tracking_uri: str, resume: bool, progress: Any = None
            ) -> Iterator[dict | Failure]:
        workers, cpus = self.options.workers, self.options.cpus_per_run
        if workers <= 1:
            setup = WorkerSetup(cpus)  # this process: its environment as it is; threads only if named
            for job in jobs:
                yield run_one(job, tracking_uri, resume, setup, progress)
            return
        setup = worker_setup(cpus or max(1, (os.cpu_count() or 1) // workers))
        context = worker_context()
        with relay(progress, context) as handle, ProcessPoolExecutor(
            max_workers=workers, mp_context=context, initializer=_start_worker, initargs=(handle, dict(os.environ))
        ) as pool:
            futures = [pool.submit(_pool_job, job, tracking_uri, resume, setup) for job in jobs]
            try:
                for future in as_completed(futures):
                    yield future.result()
            except BaseException:  # Ctrl-C, SIGTERM, a failed run: stop the other runs too, each resumable
                for future in futures:
                    future.cancel()
                for process in list(pool._processes.values()):  # no public API before Python 3.14
                    process.terminate()
                raise


@DISPATCHERS.register("ray")
class RayTasks:
    """One Ray task per run (`num_cpus` = --cpus-per-run, `num_gpus` = one device where the cluster has GPUs; Ray
    sets CUDA_VISIBLE_DEVICES per task). Joins the cluster at --ray-address (or one this process already joined), or
    starts a local instance without the dashboard and shuts it down at the end. Tasks are not retried: a run that
    failed would find its own unfinished checkpoint; `--resume` reruns it on purpose."""

    def __init__(self, options: DispatchOptions) -> None:
        _no_workers(options, "the cluster runs as many at once as its resources fit (--cpus-per-run, "
                             "--gpus-per-run)")
        self.options, self.ray = options, _require("ray", "ray")

    def run(self, jobs: Sequence[RunJob], tracking_uri: str, resume: bool, progress: Any = None
            ) -> Iterator[dict | Failure]:
        ray, joined = self.ray, self.ray.is_initialized()
        if not joined:
            self._connect()
        try:
            cpus, gpus = self.resources()
            task = ray.remote(run_remote).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
            setup = worker_setup(cpus)
            refs = {task.remote(job, tracking_uri, resume, setup): job for job in jobs}
            yield from self._gather(refs)
        finally:
            if not joined:
                ray.shutdown()  # a local instance ends; a cluster is only disconnected from

    def _connect(self) -> None:
        address = self.options.ray_address
        try:
            if address:
                self.ray.init(address=address, log_to_driver=True)
            else:
                self.ray.init(include_dashboard=False, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise HarnessError(f"cannot {'join the Ray cluster at ' + address if address else 'start a local Ray'}"
                               f" ({error_line(error)}); check --ray-address (e.g. auto, or HOST:6379)") from None

    def resources(self) -> tuple[int, int]:
        """(CPUs, GPUs) per run, refused when the cluster has fewer than one run needs (Ray would wait forever)."""
        total = self.ray.cluster_resources()
        cpus = self.options.cpus_per_run or 1
        gpus = self.options.gpus_per_run
        if gpus is None:
            gpus = 1 if total.get("GPU", 0) >= 1 else 0
        if total.get("CPU", 0) < cpus or total.get("GPU", 0) < gpus:
            raise HarnessError(f"each run asks for {cpus} CPU(s) and {gpus} GPU(s) but the Ray cluster has "
                               f"{total.get('CPU', 0):g} CPU(s) and {total.get('GPU', 0):g} GPU(s); lower "
                               "--cpus-per-run / --gpus-per-run")
        return cpus, gpus

    def _gather(self, refs: dict[Any, RunJob]) -> Iterator[dict | Failure]:
        pending = list(refs)
        try:
            while pending:
                done, pending = self.ray.wait(pending, num_returns=1)
                for ref in done:
                    try:
                        yield _outcome(refs[ref], self.ray.get(ref))
                    except Exception as error:  # the worker died (OOM, node lost), or the task was cancelled
                        yield Failure(refs[ref], error_line(error))
        except BaseException:
            for ref in pending:  # a KeyboardInterrupt in each task: its run ends KILLED, checkpointed
                self.ray.cancel(ref)
            raise


@DISPATCHERS.register("slurm")
class SlurmJobs:
    """One job per run in one SLURM job array (submitit.AutoExecutor: partition, time, one node, one task, GPUs and
    CPUs per run, memory, array parallelism, and any other `slurm_*` parameter). `--slurm-local` runs the same
    pickled jobs as local processes (submitit's LocalExecutor: every job at once, for tests and small studies)."""

    def __init__(self, options: DispatchOptions) -> None:
        _no_workers(options, "SLURM runs as many at once as --slurm-array-parallelism allows")
        self.options, self.submitit = options, _require("submitit", "slurm")
        slurm = options.slurm
        self.cluster = slurm.cluster or ("local" if slurm.local else "slurm")
        if self.cluster == "slurm" and shutil.which("sbatch") is None:
            raise HarnessError("--dispatch slurm needs SLURM's sbatch on this machine and none is on the PATH; "
                               "submit from a login node, or use --slurm-local to run the jobs as local processes")

    def parameters(self) -> dict[str, Any]:
        """submitit's parameters for one run: generic names, translated by AutoExecutor for the cluster in use
        (slurm_* ones are ignored off SLURM)."""
        slurm, cpus = self.options.slurm, self.options.cpus_per_run or 1
        gpus = self.options.gpus_per_run
        if gpus is None:  # on SLURM the nodes have the devices; locally, this machine's CUDA decides
            gpus = 1 if self.cluster == "slurm" or torch.cuda.is_available() else 0
        params: dict[str, Any] = {"name": "lt-harness", "timeout_min": slurm.time_min, "nodes": 1,
                                  "tasks_per_node": 1, "cpus_per_task": cpus, "gpus_per_node": gpus}
        optional = {"mem_gb": slurm.mem_gb, "slurm_partition": slurm.partition,
                    "slurm_array_parallelism": slurm.array_parallelism}
        params.update({k: v for k, v in optional.items() if v is not None})
        params.update({key if key.startswith("slurm_") else f"slurm_{key}": _typed(value) for key, value in slurm.extra})
        return params

    def executor(self) -> Any:
        folder = self.options.slurm.folder or str(runs_dir() / "submitit" / "%j")
        executor = self.submitit.AutoExecutor(folder=folder, cluster=self.cluster)
        try:
            executor.update_parameters(**self.parameters())
        except (NameError, ValueError, TypeError) as error:
            raise HarnessError(f"submitit refused the SLURM parameters ({error_line(error)}); check the --slurm-* "
                               "options") from None
        return executor

    def run(self, jobs: Sequence[RunJob], tracking_uri: str, resume: bool, progress: Any = None
            ) -> Iterator[dict | Failure]:
        executor, n = self.executor(), len(jobs)
        setup = worker_setup(self.options.cpus_per_run or 1)
        handles = executor.map_array(run_remote, list(jobs), [tracking_uri] * n, [resume] * n, [setup] * n)
        owner = {id(handle): job for handle, job in zip(handles, jobs)}
        poll = POLL_S.get(self.cluster, 0.2)
        try:
            for handle in self.submitit.helpers.as_completed(handles, poll_frequency=poll):
                try:
                    yield _outcome(owner[id(handle)], handle.result())
                except Exception as error:  # the job died (time limit, OOM, preemption) or was cancelled
                    yield Failure(owner[id(handle)], error_line(error))
        except BaseException:
            for handle in handles:
                if not handle.done():
                    handle.cancel(check=False)
            raise


def _typed(value: str) -> Any:
    """--slurm-option values: integers as int (submitit checks types), the rest as given."""
    return int(value) if value.lstrip("-").isdigit() else value


def run_all(dispatcher: Dispatcher, jobs: Sequence[RunJob], tracking_uri: str, resume: bool, progress: Any = None,
            on_outcome: Callable[[], None] | None = None) -> tuple[list[dict], list[Failure]]:
    """Every job through `dispatcher`: the records of the runs that landed, and the failures."""
    records: list[dict] = []
    failures: list[Failure] = []
    for outcome in dispatcher.run(jobs, tracking_uri, resume, progress):
        (failures if isinstance(outcome, Failure) else records).append(outcome)
        if on_outcome is not None:
            on_outcome()
    return records, failures

