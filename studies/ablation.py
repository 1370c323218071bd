"""Run a declared table (rows x seeds) as MLflow child runs under one parent run; its summary is the table's report.

Experiment, run names and checkpoint folders come from `harness.naming`: experiment `{table}-{dataset}-if{IF}` (one
per study), child runs `{row}-{dataset}-if{IF}-s{seed}`, tagged with table, row and seed so reports find them.
Parent run: one per invocation (reused by --resume). When every child is done, the study's report
(`studies.report.build_report` over exactly its runs) is logged under `report/` of the parent: the same table
`harness report TABLE` builds.

The runs go through `harness.studies.dispatch` (a local process pool by default, Ray tasks or SLURM jobs); the parent
run and the report stay here, whichever backend ran the children.

`plan_study` refuses, before any training and before any MLflow run exists, a study that could not end in a table:
a table without runnable rows, a row the harness has no method for, an imbalance factor no column is measured at.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from harness.checkpoint import load_json, save_json
from harness.config import RunConfig
from harness.errors import HarnessError
from harness.naming import checkpoint_dir, experiment_name, run_name
from harness.registry import DATASETS
from harness.runner import build_data
from harness.studies.dispatch import DispatchOptions, RunJob, failure_message, make_dispatcher, run_all
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
    rows = rows_for_backbone(table, rows, settings, explicit=bool(wanted_rows))
    return StudyPlan(table, rows, tuple(seeds), settings, experiment)


def rows_for_backbone(table: TableSpec, rows: tuple[Row, ...], settings: RunSettings, explicit: bool
                      ) -> tuple[Row, ...]:
    """Rows that name the backbones they need (Table 5's B rows: ResNet-50's layer2 has no ResNet-32 stage) run only
    on those: asked for by name on another backbone they are refused; in a whole-table run they are left out."""
    def backbone(row: Row) -> str:
        return str(settings.config(row.method, None, row.kwargs).method_kwargs.get("backbone", "resnet32"))

    unfit = [r for r in rows if r.backbones and backbone(r) not in r.backbones]
    if not unfit:
        return rows
    kept = tuple(r for r in rows if r not in unfit)
    here = backbone(unfit[0])
    if explicit or not kept:
        fit = [r.key for r in _runnable(table) if not r.backbones or here in r.backbones]
        raise HarnessError(f"table {table.name}: row {', '.join(r.key for r in unfit)} cannot run on backbone {here} "
                           f"(it needs {' or '.join(unfit[0].backbones)}: --set method.backbone=...); rows that run "
                           f"on {here}: {', '.join(fit)}")
    return kept


def _parent_state_path(plan: StudyPlan) -> Path:
    digest = hashlib.sha256(json.dumps(plan.signature(), sort_keys=True, default=str).encode()).hexdigest()[:12]
    return runs_dir() / "checkpoints" / plan.experiment / f"_parent-{digest}" / "state.json"


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
              progress: Any = None, workers: int = 1, dispatch: DispatchOptions | None = None) -> StudyResult:
    """Run every (row, seed) as a child of one parent run (in a local pool of `workers`, or as `dispatch` says:
    Ray tasks, SLURM jobs), then log the study's report to the parent. Runs that failed on a cluster leave the
    others' report logged, the parent FAILED, and one error line naming each failed row and seed."""
    dispatcher = make_dispatcher(dispatch or DispatchOptions(workers=workers))  # installed? before any run exists
    configs = {(row.key, seed): plan.config(row, seed) for row in plan.rows for seed in plan.seeds}
    for cfg in {c.data: c for c in configs.values()}.values():
        build_data(cfg)  # fail on missing data before any run is created (cached in-process for the runs)
    jobs = [RunJob(configs[(row.key, seed)], plan.experiment, plan.run_name(row, seed), seed, row.name, row.key,
                   tags=(("table", plan.table.name), ("row", row.name), ("row_key", row.key)))
            for row in plan.rows for seed in plan.seeds]
    if restart:
        for job in jobs:
            shutil.rmtree(checkpoint_dir(runs_dir(), job.experiment, job.name, job.cfg), ignore_errors=True)
    parent = _open_parent(plan, tracker, resume)
    jobs = [replace(job, parent=parent) for job in jobs]
    outer = progress.add_task("runs", total=len(jobs)) if progress is not None else None
    try:
        records, failures = run_all(dispatcher, jobs, tracker.uri, resume, progress,
                                    None if outer is None else lambda: progress.advance(outer))
    except BaseException:
        tracker.end(parent, "KILLED")
        raise
    order = {(job.key, job.seed): i for i, job in enumerate(jobs)}
    frame = pd.DataFrame.from_records(sorted(records, key=lambda r: order[(r["key"], r["seed"])]))
    report = study_report(tracker, plan, [r["run_id"] for r in records])
    artifacts = log_report(tracker, parent, report) if records else []
    if failures:
        tracker.end(parent, "FAILED")
        raise HarnessError(failure_message(failures, len(records), f"parent run {parent} ({tracker.uri})"))
    tracker.end(parent)
    return StudyResult(parent, frame, report, artifacts)
