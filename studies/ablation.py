"""Run a declared table (rows x seeds) as MLflow child runs under one parent run, and summarise it.

Experiment: `{table}-{dataset}-if{IF}` (one per study). Parent run: one per invocation (reused by --resume).
Child runs: `{row}-{dataset}-if{IF}-s{seed}`, tagged with table, row and seed so reports can find them.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from harness.checkpoint import load_json, save_json
from harness.config import RunConfig
from harness.errors import HarnessError
from harness.runner import Run, RunResult, build_data
from harness.tracking import Tracker, runs_dir
from studies.stats import cell_stats
from studies.tables import Row, TableSpec

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


def run_study(plan: StudyPlan, make_config: ConfigFactory, tracker: Tracker, *, resume: bool = False,
              signature: dict[str, Any] | None = None, progress: Any = None,
              on_result: Callable[[Row, int, RunResult], None] | None = None) -> tuple[str, pd.DataFrame]:
    """Run every (row, seed); return the parent run id and the per-run results frame."""
    configs = {(row.key, seed): make_config(row, seed) for row in plan.rows for seed in plan.seeds}
    for cfg in {c.data: c for c in configs.values()}.values():
        build_data(cfg)  # fail on missing data before any run is created (cached in-process for the runs)
    state_path = _parent_state_path(plan, signature or {})
    state = load_json(state_path) if resume else None
    if state is not None:
        parent = state["run_id"]
        tracker.reopen(parent)
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        parent = tracker.start(plan.experiment, f"{plan.experiment}-{stamp}",
                               {"table": plan.table.name, "kind": "study", "dataset": plan.dataset,
                                "imbalance_factor": f"{plan.imbalance_factor:g}",
                                "seeds": ",".join(map(str, plan.seeds))})
        save_json(state_path, {"run_id": parent})
    records = []
    outer = progress.add_task("runs", total=len(configs)) if progress is not None else None
    try:
        for row in plan.rows:
            for seed in plan.seeds:
                cfg = configs[(row.key, seed)]
                run = Run(cfg, tracker, plan.experiment, plan.run_name(row, seed), parent_run_id=parent,
                          tags={"table": plan.table.name, "row": row.name, "row_key": row.key})
                result = run.execute(resume=resume, progress=progress)
                records.append({"row": row.name, "key": row.key, "seed": seed, "run_id": result.run_id,
                                "wall_time_s": result.wall_time_s, "skipped": result.skipped, **result.metrics})
                if on_result is not None:
                    on_result(row, seed, result)
                if outer is not None:
                    progress.advance(outer)
    except BaseException:
        tracker.end(parent, "KILLED")
        raise
    frame = pd.DataFrame.from_records(records)
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
