"""The paper's tables from a runs DataFrame (pure pandas; no mlflow here).

Input: runs as `Tracker.search` returns them: one line per MLflow run with `status`, `start_time`, `params.*`,
`metrics.*` and `tags.*` columns. A table's runs are FINISHED child runs tagged `table=<name>` with a `row_key`.

A cell is (row, column): the runs of that row that were measured on the column's data, one per seed (the newest
run of a seed wins, so a rerun does not count twice), summarised by `cell_stats` over the final-epoch metric.
Nothing is invented: a cell with no runs has n = 0 and NaN statistics, and says "no runs" (or "not runnable"
for a published row the harness has no method for). The paper's value and the difference sit beside it.

Data matching: the column's dataset and imbalance factor must match the run's `data.*` params, except that
(1) `dataset` (a `--dataset` override) replaces the paper's dataset, and (2) where the runs hold no run on the
paper's dataset but exactly one other dataset (a Fashion-MNIST-LT study of Table 4, say), that one stands in,
and the protocol line under the table says so. The imbalance factor only filters where it tells the columns
apart (Table 1); otherwise the paper's IF is preferred and a single other IF stands in the same way. Where a
column's runs stand in for other data than the paper's, a note under the table says that its difference is a
cross-setting comparison, not a reproduction gap.

This is the one summary of a study: `harness run ablation` prints and logs the report of its own runs, and
`harness report TABLE` builds the same report from whatever runs exist.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

from harness.errors import HarnessError
from harness.studies.stats import cell_stats
from harness.studies.tables import Column, Row, TableSpec
from harness.studies.writers import FORMATS, SUFFIX, write_table

CSV_COLUMNS = ("row", "column", "mean", "std", "n", "ci95", "paper", "diff", "status", "key", "group")
SHOT_GROUPS = ("many", "medium", "few")  # mean over the same seeds as the cell
SELECTION = "final epoch (no checkpoint selection)"


@dataclass(frozen=True)
class Report:
    """A built table: long-format `cells` (one line per row x column), the protocol line and notes."""

    table: TableSpec
    cells: pd.DataFrame
    protocol: str
    notes: tuple[str, ...] = ()


def _col(runs: pd.DataFrame, name: str) -> pd.Series:
    """A column of `runs`, or an all-missing one if no run has it."""
    return runs[name] if name in runs.columns else pd.Series([None] * len(runs), index=runs.index, dtype=object)


def table_runs(runs: pd.DataFrame, table: TableSpec, method_runs: bool = False) -> pd.DataFrame:
    """The finished child runs of `table` (tag table=<name>, with a row_key); with `method_runs`, also the finished
    `harness run method` runs (tag source) of the method of a row without switches, counted in that row."""
    if runs.empty:
        return runs
    finished = _col(runs, "status") == "FINISHED"
    keep = finished & (_col(runs, "tags.table") == table.name)
    mine = runs[keep & _col(runs, "tags.row_key").notna()]
    if not method_runs:
        return mine
    rows = {r.method: r.key for r in table.rows if r.method and not r.switches}
    method = _col(runs, "tags.source") == "run method"
    extra = runs[finished & method & _col(runs, "tags.row_key").isin(list(rows))].copy()
    extra["tags.row_key"] = extra["tags.row_key"].map(rows)
    extra["tags.table"] = table.name
    return pd.concat([mine, extra]) if not extra.empty else mine


def _as_float(values: pd.Series) -> pd.Series:
    return pd.to_numeric(values, errors="coerce")


def _pick(present: list[Any], wanted: Any, override: Any = None) -> Any:
    """The value to match: an explicit override, else the paper's if runs have it, else the runs' only value."""
    if override is not None:
        return override
    if wanted in present or not present:
        return wanted
    return present[0] if len(present) == 1 else None


def _natural(value: Any) -> tuple[float, str]:
    number = pd.to_numeric(value, errors="coerce")
    return (math.inf if pd.isna(number) else float(number), str(value))


def _distinct(values: pd.Series) -> list[Any]:
    return sorted(values.dropna().unique(), key=_natural)


def column_runs(runs: pd.DataFrame, table: TableSpec, column: Column, dataset: str | None = None,
                imbalance_factor: float | None = None) -> tuple[pd.DataFrame, str | None, float | None]:
    """The runs measured on `column`'s data, with the dataset and IF they were matched on (None: ambiguous)."""
    if runs.empty:
        return runs, dataset or column.dataset, imbalance_factor or column.imbalance_factor
    data = _col(runs, "params.data.dataset")
    chosen = _pick(_distinct(data), column.dataset, dataset)
    mask = data == chosen
    factors = _as_float(_col(runs, "params.data.imbalance_factor"))
    separates_if = len({c.imbalance_factor for c in table.columns}) > 1
    factor = column.imbalance_factor if separates_if else _pick(_distinct(factors[mask]), column.imbalance_factor,
                                                                imbalance_factor)
    if factor is not None:
        mask &= factors == float(factor)
    elif len(_distinct(factors[mask])) > 1:
        mask &= False  # several IFs and no rule to choose: refuse to pool them
    for key, value in column.requires:
        mask &= _col(runs, f"params.{key}").astype(str) == value
    return runs[mask], chosen, factor


def seed_runs(runs: pd.DataFrame, row: Row) -> pd.DataFrame:
    """The runs of `row`, one per training seed (the newest finished run of each seed)."""
    mine = runs[_col(runs, "tags.row_key") == row.key] if not runs.empty else runs
    if mine.empty:
        return mine
    seeds = _col(mine, "params.train.seed").fillna(_col(mine, "tags.seed"))
    mine = mine.assign(_seed=seeds, _start=_col(mine, "start_time"))
    newest = mine.sort_values("_start").drop_duplicates("_seed", keep="last")
    return newest.sort_values("_seed", key=lambda s: pd.to_numeric(s, errors="coerce"))


def make_cell(row: Row, column: Column, runs: pd.DataFrame) -> dict[str, Any]:
    """One cell: statistics over the row's seeds, the paper's value and the difference (NaN where either is)."""
    metric = f"metrics.{column.metric}"
    mine = seed_runs(runs, row)
    values = [v * column.scale for v in _as_float(_col(mine, metric))] if not mine.empty else []
    stats = cell_stats(values)
    paper = row.paper_value(column.label)
    diff = stats["mean"] - paper if paper is not None and stats["n"] else math.nan
    status = "ok" if stats["n"] else ("not runnable" if row.method is None else "no runs")
    seeds = ",".join(str(s) for s, v in zip(_col(mine, "_seed"), values) if not math.isnan(v)) if values else ""
    shots = {group: cell_stats(list(_as_float(_col(mine, f"metrics.test/{group}"))))["mean"] if not mine.empty
             else math.nan for group in SHOT_GROUPS}
    return {"row": row.name, "column": column.label, **stats, "paper": math.nan if paper is None else paper,
            "diff": diff, "status": status, "key": row.key, "group": row.group, "year": row.year, "seeds": seeds,
            **shots}


def _describe(values: pd.Series, sep: str = " / ") -> str:
    """The distinct values of a param across runs ("1+1", or "1+1 / 2+1" where runs differ)."""
    found = _distinct(values.astype(str)) if len(values) else []
    return sep.join(found) if found else "?"


def planned_epochs(runs: pd.DataFrame) -> pd.Series:
    """Each run's epochs per stage as planned ("180+20", the runner's `plan.epochs` param); runs logged before that
    param existed give `train.epochs` + `train.crt_epochs` instead."""
    legacy = _col(runs, "params.train.epochs").astype(str) + "+" + _col(runs, "params.train.crt_epochs").astype(str)
    return _col(runs, "params.plan.epochs").where(_col(runs, "params.plan.epochs").notna(), legacy)


def _setting(dataset: str | None, factor: float | None) -> str:
    return f"{dataset or '?'}" + (f" IF {factor:g}" if factor is not None else "")


def cross_setting_notes(table: TableSpec, matched: dict[str, tuple[str | None, float | None]],
                        cells: pd.DataFrame) -> list[str]:
    """One note per setting where a column's runs were measured on other data than the paper's column: the
    difference to the paper is then a cross-setting comparison, not a reproduction gap."""
    by_setting: dict[tuple[str, str], list[str]] = {}
    for column in table.columns:
        dataset, factor = matched[column.label]
        measured = cells[(cells["column"] == column.label) & (cells["n"] > 0)]
        paper_factor = column.imbalance_factor if column.imbalance_factor is not None else factor
        if measured.empty or (dataset, factor) == (column.dataset, paper_factor):
            continue
        paper = _setting(column.dataset, column.imbalance_factor)
        by_setting.setdefault((_setting(dataset, factor), paper), []).append(column.label)
    return [f"{', '.join(labels)}: measured on {used}, the paper on {paper}; Δ is a cross-setting comparison, "
            "not a reproduction gap." for (used, paper), labels in by_setting.items()]


def recipe_line(runs: pd.DataFrame) -> str:
    """Recipe (a baseline's `shike` or `own`), batch, augmentation and per-stage peak LRs ("batch 128; augment
    autoaugment; peak LRs 0.15+0.1; "), each only where the runs logged it (runs from before `plan.peak_lrs`
    existed show no peaks; methods without a recipe switch show none)."""
    parts = []
    for label, name in (("recipe", "method.recipe"), ("batch", "optim.batch_size"), ("augment", "data.augment"),
                        ("peak LRs", "plan.peak_lrs")):
        values = _col(runs, f"params.{name}").dropna()
        if not values.empty:
            parts.append(f"{label} {_describe(values)}; ")
    return "".join(parts)


def protocol_line(runs: pd.DataFrame, table: TableSpec, matched: dict[str, tuple[str | None, float | None]]) -> str:
    """What the cells were measured under: data, profile, epochs, preset, seeds and the selection rule."""
    if runs.empty:
        return (f"Protocol: no finished runs tagged table={table.name} were found, so every harness cell is "
                f"missing. Paper: {table.protocol}")
    data = []
    for column in table.columns:
        dataset, factor = matched[column.label]
        used = f"{dataset} IF {factor:g}" if dataset and factor is not None else f"{dataset or '?'}"
        paper = f"{column.dataset}" + (f" IF {column.imbalance_factor:g}" if column.imbalance_factor else "")
        data.append(f"{column.label}: {used}" + ("" if used == paper else f" (paper: {paper})"))
    epochs = planned_epochs(runs)
    test = _col(runs, "params.data.test_per_class").astype(str).replace({"0": "full"})
    depth = _col(runs, "params.method.depth").dropna()
    trunk = f"; ResNet-{_describe(depth)} trunks" if not depth.empty and set(depth.astype(str)) != {"32"} else ""
    return ("Protocol: " + "; ".join(dict.fromkeys(data)) + trunk +
            f"; profile {_describe(_col(runs, 'params.data.profile'))}; epochs {_describe(epochs)}; "
            f"{recipe_line(runs)}"
            f"preset {_describe(_col(runs, 'params.preset'))}; "
            f"seeds {_describe(_col(runs, 'params.train.seed'), ',')}; test images per class {_describe(test)}; "
            f"selection: {SELECTION}; {len(runs)} runs. Paper: {table.protocol}")


def build_report(runs: pd.DataFrame, table: TableSpec, dataset: str | None = None,
                 imbalance_factor: float | None = None, method_runs: bool = False) -> Report:
    """Every row x column cell of `table` from `runs` (see the module docstring for the matching rules)."""
    mine = table_runs(runs, table, method_runs)
    cells, matched, used = [], {}, []
    for column in table.columns:
        on_column, chosen, factor = column_runs(mine, table, column, dataset, imbalance_factor)
        matched[column.label] = (chosen, factor)
        used.append(on_column)
        cells += [make_cell(row, column, on_column) for row in table.rows]
    frame = pd.DataFrame(cells)
    own = [f"{r.name}: {r.own}." for r in table.rows if r.own and r.method is not None]
    notes = [*table.notes, *own, *cross_setting_notes(table, matched, frame)]
    if not mine.empty and any(c is None for c, _ in matched.values()):
        notes.append("Runs on several datasets and none is the paper's: choose one with --dataset "
                     f"({', '.join(_distinct(_col(mine, 'params.data.dataset')))}).")
    used_runs = pd.concat(used).drop_duplicates("run_id") if used and not mine.empty else mine
    return Report(table, frame, protocol_line(used_runs, table, matched), tuple(notes))


def format_cell(mean: float, std: float, n: int, status: str) -> str:
    """"56.34 ± 0.21 (n=3)"; "56.34 (n=1)" for one seed; the status ("no runs") where there is no value."""
    if not n:
        return status
    if n == 1 or math.isnan(std):
        return f"{mean:.2f} (n={n})"
    return f"{mean:.2f} ± {std:.2f} (n={n})"


def _number(value: float, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "-" if not signed else ""
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def display_frame(report: Report, groups: bool = True) -> pd.DataFrame:
    """The human table: Method (and Year), then per paper column: harness cell, paper value, difference.

    With `groups`, the paper's section headers (Single model, MoE-based, ...) are rows of their own."""
    table, cells = report.table, report.cells
    with_year = any(r.year for r in table.rows)
    lines, group = [], None
    for row in table.rows:
        if groups and row.group and row.group != group:
            group = row.group
            lines.append({"Method": f"*{group}*"})
        line = {"Method": row.name, **({"Year": row.year} if with_year else {})}
        for column in table.columns:
            c = cells[(cells["key"] == row.key) & (cells["column"] == column.label)].iloc[0]
            line[f"{column.label} (harness)"] = format_cell(c["mean"], c["std"], int(c["n"]), c["status"])
            line[f"{column.label} paper"] = _number(c["paper"])
            line[f"{column.label} Δ"] = _number(c["diff"], signed=True)
        if len(table.columns) == 1 and table.columns[0].metric == "test/top1":
            # harness-only context for one-column tables (Table 4, 5): where the accuracy comes from, head to tail
            line.update({group: _number(c[group]) for group in SHOT_GROUPS})
        lines.append(line)
    return pd.DataFrame(lines).fillna("")


def footer(report: Report) -> list[str]:
    return [report.protocol, *(f"Note: {note}" for note in report.notes)]


def to_csv(report: Report) -> str:
    """Long format, one line per cell: row, column, mean, std, n, ci95, paper, diff, status, key, group."""
    frame = report.cells.loc[:, list(CSV_COLUMNS)].copy()
    for name in ("mean", "std", "ci95", "paper", "diff"):
        frame[name] = frame[name].round(4)
    return write_table(frame, "csv")


def render(report: Report, fmt: str) -> str:
    """The table as md, csv, latex or html; md, latex and html carry the protocol and notes under the table."""
    if fmt == "csv":
        return to_csv(report)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format '{fmt}'; known: {', '.join(FORMATS)}")
    frame = display_frame(report, groups=fmt != "latex")
    return write_table(frame, fmt, report.table.title, footer(report), label=report.table.name)


def log_report(tracker: Any, parent_run_id: str, report: Report, formats: tuple[str, ...] = ("md", "csv")) -> list[str]:
    """Attach the rendered table under `report/` of a study's parent run (md and csv, plus any other format asked
    for); returns the artifact paths. `tracker` is a `harness.tracking.Tracker` (not imported: no mlflow here)."""
    paths = []
    for fmt in dict.fromkeys(("md", "csv", *formats)):
        path = f"report/{report.table.name}.{SUFFIX[fmt]}"
        tracker.log_text(parent_run_id, render(report, fmt), path)
        paths.append(path)
    return paths


def newest_parent(runs: pd.DataFrame, table: TableSpec) -> str | None:
    """The run id of the newest study parent run (tag kind=study) of `table` among `runs`, or None."""
    if runs.empty:
        return None
    parents = runs[(_col(runs, "tags.kind") == "study") & (_col(runs, "tags.table") == table.name)]
    return None if parents.empty else str(parents.sort_values("start_time").iloc[-1]["run_id"])


def spans_experiments(table: TableSpec) -> bool:
    """Whether the table's columns need runs of several studies (different datasets or imbalance factors)."""
    return len({(c.dataset, c.imbalance_factor) for c in table.columns}) > 1


def experiments_for(tracker: Any, table: TableSpec | None, chosen: str | None) -> list[str] | None:
    """The experiments a report reads: `chosen` (it must exist), else the newest `<table>-*` experiment (one study),
    else None (every experiment: figures, and tables whose columns span datasets or imbalance factors)."""
    if chosen:
        known = tracker.experiment_names()
        if chosen not in known:
            raise HarnessError(f"no experiment '{chosen}' in {tracker.uri}; experiments: {', '.join(known) or '-'}")
        return [chosen]
    if table is None or spans_experiments(table):
        return None
    return tracker.experiment_names(f"{table.name}-")[:1] or None
