"""Run a declared table (rows x seeds) as MLflow child runs under one parent run, and summarise it.

Experiment: `{table}-{dataset}-if{IF}` (one per study). Parent run: one per invocation (reused by --resume).
Child runs: `{row}-{dataset}-if{IF}-s{seed}`, tagged with table, row and seed so reports can find them.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from harness.checkpoint import load_json, save_json
from harness.config import RunConfig
from harness.errors import HarnessError
from harness.runner import Run, build_data
from harness.tracking import Tracker, runs_dir
from harness.studies.stats import cell_stats
from harness.studies.tables import Row, TableSpec

ConfigFactory = Callable[[Row, int], RunConfig]  # (row, seed) -> resolved config


@dataclass
class StudyPlan:
    table: TableSpec
    rows: tuple[Row, ...]
    seeds: tuple[int, ...]
    dataset: str
    imbalance_factor: float
    experiment_name: str | None = None

    @property
    def experiment(self) -> str:
        return self.experiment_name or f"{self.table.name}-{self.dataset}-if{self.imbalance_factor:g}"

    def run_name(self, row: Row, seed: int) -> str:
        return f"{row.key}-{self.dataset}-if{self.imbalance_factor:g}-s{seed}"


def select_rows(table: TableSpec, wanted: Sequence[str] | None) -> tuple[Row, ...]:
    rows = tuple(r for r in table.rows if r.method is not None)
    if not wanted:
        return rows
    try:
        return tuple(table.row(w) for w in wanted)
    except KeyError as error:
        raise HarnessError(str(error.args[0])) from None


def _parent_state_path(plan: StudyPlan, signature: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(signature, sort_keys=True, default=str).encode()).hexdigest()[:12]
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


def execute_job(job: ChildJob, tracking_uri: str, resume: bool, progress: Any = None, threads: int = 0) -> dict:
    """Run one child and return its result record (also the entry point of worker processes)."""
    if threads:
        torch.set_num_threads(threads)
    run = Run(job.cfg, Tracker(tracking_uri), job.experiment, job.name, parent_run_id=job.parent,
              tags={"table": job.table, "row": job.row, "row_key": job.key})
    result = run.execute(resume=resume, progress=progress)
    return {"row": job.row, "key": job.key, "seed": job.seed, "run_id": result.run_id,
            "wall_time_s": result.wall_time_s, "skipped": result.skipped, **result.metrics}


def run_jobs(jobs: list[ChildJob], tracking_uri: str, resume: bool, workers: int = 1,
             progress: Any = None) -> Iterator[dict]:
    """Execute jobs one after another (with per-run progress bars) or in `workers` processes at once: runs of
    launch-bound small models overlap their host overhead on one GPU; on a CPU they share the cores."""
    if workers <= 1:
        for job in jobs:
            yield execute_job(job, tracking_uri, resume, progress)
        return
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = [pool.submit(execute_job, job, tracking_uri, resume, None, threads) for job in jobs]
        for future in as_completed(futures):
            yield future.result()


def _open_parent(plan: StudyPlan, tracker: Tracker, resume: bool, signature: dict[str, Any]) -> str:
    state_path = _parent_state_path(plan, signature)
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


def run_study(plan: StudyPlan, make_config: ConfigFactory, tracker: Tracker, *, resume: bool = False,
              signature: dict[str, Any] | None = None, progress: Any = None,
              workers: int = 1) -> tuple[str, pd.DataFrame]:
    """Run every (row, seed) as a child of one parent run; return the parent run id and the per-run frame."""
    configs = {(row.key, seed): make_config(row, seed) for row in plan.rows for seed in plan.seeds}
    for cfg in {c.data: c for c in configs.values()}.values():
        build_data(cfg)  # fail on missing data before any run is created (cached in-process for the runs)
    parent = _open_parent(plan, tracker, resume, signature or {})
    jobs = [ChildJob(configs[(row.key, seed)], plan.experiment, plan.run_name(row, seed), parent, row.name, row.key,
                     seed, plan.table.name) for row in plan.rows for seed in plan.seeds]
    outer = progress.add_task("runs", total=len(jobs)) if progress is not None else None
    records = []
    try:
        for record in run_jobs(jobs, tracker.uri, resume, workers, progress if workers <= 1 else None):
            records.append(record)
            if outer is not None:
                progress.advance(outer)
    except BaseException:
        tracker.end(parent, "KILLED")
        raise
    order = {(job.key, job.seed): i for i, job in enumerate(jobs)}
    frame = pd.DataFrame.from_records(sorted(records, key=lambda r: order[(r["key"], r["seed"])]))
    summary = summarize_study(plan, frame)
    tracker.log_text(parent, summary.to_csv(index=False), f"{plan.table.name}.csv")
    tracker.log_text(parent, summary.to_markdown(index=False) if _has_tabulate() else summary.to_string(),
                     f"{plan.table.name}.md")
    tracker.end(parent)
    return parent, frame


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def summarize_study(plan: StudyPlan, frame: pd.DataFrame, metric: str = "test/top1") -> pd.DataFrame:
    """One line per row: mean, std, n and 95% interval over seeds, the paper's value and the difference, and the
    many/medium/few means."""
    lines = []
    column = plan.table.columns[0].label
    for row in plan.rows:
        runs = frame[frame["key"] == row.key] if len(frame) else frame
        stats = cell_stats(list(runs[metric])) if len(runs) else cell_stats([])
        paper = row.paper_value(column)
        line = {"row": row.name, "mean": stats["mean"], "std": stats["std"], "n": stats["n"],
                "ci95": stats["ci95"], "paper": paper,
                "diff": stats["mean"] - paper if paper is not None else float("nan")}
        for group in ("many", "medium", "few"):
            key = f"test/{group}"
            line[group] = cell_stats(list(runs[key]))["mean"] if len(runs) and key in runs else float("nan")
        line["wall_s"] = float(runs["wall_time_s"].sum()) if len(runs) else float("nan")
        lines.append(line)
    return pd.DataFrame(lines)
