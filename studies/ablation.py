"""Run a declared table (rows x seeds) as MLflow child runs under one parent run; its summary is the table's report.

Experiment, run names and checkpoint folders come from `harness.naming`: experiment `{table}-{dataset}-if{IF}` (one
per study), child runs `{row}-{dataset}-if{IF}-s{seed}`, tagged with table, row and seed so reports find them.
Parent run: one per invocation (reused by --resume). When every child is done, the study's report
(`studies.report.build_report` over exactly its runs) is logged under `report/` of the parent: the same table
`harness report TABLE` builds.

`plan_study` refuses, before any training and before any MLflow run exists, a study that could not end in a table:
a table without runnable rows, a row the harness has no method for, an imbalance factor no column is measured at.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from harness.checkpoint import load_json, save_json
from harness.config import RunConfig
from harness.errors import HarnessError
from harness.interrupts import Terminated, install_signal_handlers
from harness.naming import checkpoint_dir, experiment_name, run_name
from harness.progress import relay
from harness.registry import DATASETS
from harness.runner import Run, build_data
from harness.studies.report import Report, build_report, log_report
from harness.studies.settings import RunSettings
from harness.studies.tables import Row, TableSpec
from harness.tracking import Tracker, runs_dir


@dataclass(frozen=True)
class StudyPlan:
    table: TableSpec
    rows: tuple[Row, ...]
    seeds: tuple[int, ...]
    settings: RunSettings
    experiment_name: str | None = None

    @property
    def dataset(self) -> str:
        return self.settings.dataset

    @property
    def imbalance_factor(self) -> float:
        return self.settings.imbalance_factor

    @property
    def experiment(self) -> str:
        return self.experiment_name or experiment_name(self.table.name, self.dataset, self.imbalance_factor)

    def run_name(self, row: Row, seed: int) -> str:
        return run_name(row.key, self.dataset, self.imbalance_factor, seed)

    def config(self, row: Row, seed: int) -> RunConfig:
        assert row.method is not None, "plan_study keeps runnable rows only"
        return self.settings.config(row.method, seed, row.kwargs)

    def signature(self) -> dict[str, Any]:
        """What makes two invocations the same study (a --resume reopens that study's parent run)."""
        return {"table": self.table.name, "rows": [r.key for r in self.rows], "seeds": list(self.seeds),
                **asdict(self.settings)}


def _runnable(table: TableSpec) -> tuple[Row, ...]:
    return tuple(r for r in table.rows if r.method is not None)


def _no_runnable_rows(table: TableSpec) -> str:
    missing = sorted({c.dataset for c in table.columns if c.dataset not in DATASETS})
    why = (f"its columns are measured on {', '.join(missing)}, which the harness has no dataset for yet "
           "(harness list datasets)" if missing else "none of its rows names a harness method")
    return (f"table {table.name} has no row the harness can run: {why}; `harness report {table.name}` prints the "
            "paper's values")


def select_rows(table: TableSpec, wanted: Sequence[str] | None) -> tuple[Row, ...]:
    """The rows to run: `wanted` (keys or names) or every runnable row; a row without a method is refused with the
    names of the runnable ones."""
    runnable = _runnable(table)
    if not runnable:
        raise HarnessError(_no_runnable_rows(table))
    if not wanted:
        return runnable
    try:
        rows = tuple(table.row(w) for w in wanted)
    except KeyError as error:
        raise HarnessError(str(error.args[0])) from None
    refused = [r.key for r in rows if r.method is None]
    if refused:
        raise HarnessError(f"table {table.name}: row {', '.join(refused)} cannot run (the harness has no method for "
                           f"it; see the notes of `harness report {table.name}`); runnable rows: "
                           f"{', '.join(r.key for r in runnable)}")
    return rows


def check_imbalance_factor(table: TableSpec, imbalance_factor: float) -> None:
    """Where the columns are told apart by imbalance factor (Table 1: IF 100 and IF 50), runs at another factor
    would land in no column, so no cell could be compared with the paper."""
    factors = sorted({c.imbalance_factor for c in table.columns if c.imbalance_factor is not None}, reverse=True)
    if len(factors) > 1 and imbalance_factor not in factors:
        shown = " or ".join(f"--if {f:g}" for f in factors)
        raise HarnessError(f"table {table.name} compares IF {', '.join(f'{f:g}' for f in factors)} only: runs at "
                           f"--if {imbalance_factor:g} would fill no column; use {shown}")


def plan_study(table: TableSpec, wanted_rows: Sequence[str] | None, seeds: Sequence[int], settings: RunSettings,
               experiment: str | None = None) -> StudyPlan:
    """A study that can end in its table, or a `HarnessError` that says why not and what to do."""
    rows = select_rows(table, wanted_rows)
    check_imbalance_factor(table, settings.imbalance_factor)
    if not seeds:
        raise HarnessError("--seeds needs at least one seed (e.g. --seeds 0,1,2)")
    return StudyPlan(table, rows, tuple(seeds), settings, experiment)


def _parent_state_path(plan: StudyPlan) -> Path:
    digest = hashlib.sha256(json.dumps(plan.signature(), sort_keys=True, default=str).encode()).hexdigest()[:12]
    return runs_dir() / "checkpoints" / plan.experiment / f"_parent-{digest}" / "state.json"


@dataclass(frozen=True)
class ChildJob:
    """One (row, seed) run of a study, picklable so a worker process can execute it."""

    cfg: RunConfig
    experiment: str
    name: str
    parent: str
    row: str
    key: str
    seed: int
    table: str


def execute_job(job: ChildJob, tracking_uri: str, resume: bool, progress: Any = None) -> dict:
    """Run one child and return its result record (also what worker processes run)."""
    run = Run(job.cfg, Tracker(tracking_uri), job.experiment, job.name, parent_run_id=job.parent,
              tags={"table": job.table, "row": job.row, "row_key": job.key})
    result = run.execute(resume=resume, progress=progress)
    return {"row": job.row, "key": job.key, "seed": job.seed, "run_id": result.run_id,
            "wall_time_s": result.wall_time_s, "skipped": result.skipped, **result.metrics,
            **{f"time/{k}": v for k, v in result.timings.items()}}


_worker_progress: Any = None  # set in each worker process by `_start_worker`


def _start_worker(threads: int, progress: Any) -> None:
    global _worker_progress
    install_signal_handlers()  # SIGTERM unwinds a worker's run as in the main process: checkpoint kept, run KILLED
    torch.set_num_threads(threads)
    _worker_progress = progress


def _worker_job(job: ChildJob, tracking_uri: str, resume: bool) -> dict:
    try:
        return execute_job(job, tracking_uri, resume, _worker_progress)
    except (KeyboardInterrupt, Terminated):
        # The run is marked KILLED and its finished epochs are checkpointed; end this worker rather than let the
        # pool hand it the next queued run while the study is being stopped.
        os._exit(143)


def run_jobs(jobs: list[ChildJob], tracking_uri: str, resume: bool, workers: int = 1,
             progress: Any = None) -> Iterator[dict]:
    """Execute jobs one after another or in `workers` processes at once (each with cores / workers threads):
    runs of launch-bound small models overlap their host overhead on one GPU; on a CPU they share the cores.
    Either way each run shows its progress: a bar (worker bars are relayed to this process) or a line per epoch."""
    if workers <= 1:
        for job in jobs:
            yield execute_job(job, tracking_uri, resume, progress)
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    with relay(progress, context) as handle, ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_start_worker, initargs=(threads, handle)
    ) as pool:
        futures = [pool.submit(_worker_job, job, tracking_uri, resume) for job in jobs]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BaseException:  # Ctrl-C, SIGTERM, a failed run: stop the other runs too, each resumable
            for future in futures:
                future.cancel()
            for process in list(pool._processes.values()):  # no public API before Python 3.14
                process.terminate()
            raise


def _open_parent(plan: StudyPlan, tracker: Tracker, resume: bool) -> str:
    state_path = _parent_state_path(plan)
    state = load_json(state_path) if resume else None
    if state is not None:
        tracker.reopen(state["run_id"])
        return state["run_id"]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parent = tracker.start(plan.experiment, f"{plan.experiment}-{stamp}",
                           {"table": plan.table.name, "kind": "study", "dataset": plan.dataset,
                            "imbalance_factor": f"{plan.imbalance_factor:g}",
                            "seeds": ",".join(map(str, plan.seeds))})
    save_json(state_path, {"run_id": parent})
    return parent


def study_report(tracker: Tracker, plan: StudyPlan, run_ids: Sequence[str]) -> Report:
    """The table from exactly this study's runs (its parent's children, and finished runs a --resume reused)."""
    quoted = ", ".join(f"'{run_id}'" for run_id in run_ids)
    runs = tracker.search([plan.experiment], f"attributes.run_id IN ({quoted})") if run_ids else pd.DataFrame()
    return build_report(runs, plan.table, plan.dataset, plan.imbalance_factor)


@dataclass
class StudyResult:
    parent: str
    runs: pd.DataFrame  # one line per (row, seed): run id, wall time, skipped, final metrics
    report: Report
    artifacts: list[str]


def run_study(plan: StudyPlan, tracker: Tracker, *, resume: bool = False, restart: bool = False,
              progress: Any = None, workers: int = 1) -> StudyResult:
    """Run every (row, seed) as a child of one parent run, then log the study's report to the parent."""
    configs = {(row.key, seed): plan.config(row, seed) for row in plan.rows for seed in plan.seeds}
    for cfg in {c.data: c for c in configs.values()}.values():
        build_data(cfg)  # fail on missing data before any run is created (cached in-process for the runs)
    jobs = [ChildJob(configs[(row.key, seed)], plan.experiment, plan.run_name(row, seed), "", row.name, row.key,
                     seed, plan.table.name) for row in plan.rows for seed in plan.seeds]
    if restart:
        for job in jobs:
            shutil.rmtree(checkpoint_dir(runs_dir(), job.experiment, job.name, job.cfg), ignore_errors=True)
    parent = _open_parent(plan, tracker, resume)
    jobs = [replace(job, parent=parent) for job in jobs]
    outer = progress.add_task("runs", total=len(jobs)) if progress is not None else None
    records = []
    try:
        for record in run_jobs(jobs, tracker.uri, resume, workers, progress):
            records.append(record)
            if outer is not None:
                progress.advance(outer)
    except BaseException:
        tracker.end(parent, "KILLED")
        raise
    order = {(job.key, job.seed): i for i, job in enumerate(jobs)}
    frame = pd.DataFrame.from_records(sorted(records, key=lambda r: order[(r["key"], r["seed"])]))
    report = study_report(tracker, plan, [r["run_id"] for r in records])
    artifacts = log_report(tracker, parent, report)
    tracker.end(parent)
    return StudyResult(parent, frame, report, artifacts)
