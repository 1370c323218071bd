"""The embedded default (`harness demo`): Table 4's Plain and SHIKE rows on real Fashion-MNIST-LT (IF 100) with
CIFAR ResNet-8 trunks, several seeds run side by side (one process per core, one thread each), then the table,
the difference in words against the seed spread, a head-to-tail figure and where to look next.

The README gives the full 180+20 recipe's figures on the same data and model (Plain and SHIKE within seed noise of
each other, 81 % top-1) and the measurements behind the demo's shorter recipe (DEMO_SETTINGS), which reaches 72-76 %
and prints the same top-1 verdict in every measured rerun.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from harness.studies.report import Report
from harness.studies.stats import cell_stats, difference

DEMO_DATASET, DEMO_IF = "fmnistlt", 100.0
DEMO_ROWS = ("plain", "shike")
DEMO_SEEDS = (0, 1, 2)
DEMO_EPOCHS = "20+5"
# Measured on this data (README "The demo, measured"): ResNet-8 trunks (one block per stage, a quarter of ResNet-32's
# step time); batch 32 (four times the SGD steps of batch 128 for the same images and about the same time on one
# thread); crop + flip only (AutoAugment + Cutout slow short schedules down); the device-resident batched
# augmentation, which costs a tenth of the reference DataLoader on a CPU too; peak LRs halved for a batch four times
# smaller (square-root scaling: 0.15 -> 0.075 for the representation, 0.1 -> 0.05 for the classifier).
DEMO_SETTINGS = ("method.depth=8", "train.eval_interval=0", "train.fast_path=on", "data.augment=basic",
                 "optim.batch_size=32", "optim.lr=0.025", "stage.representation.peak_lr=0.075",
                 "stage.classifier.peak_lr=0.05")
DEMO_EXPERIMENT = "demo-fmnistlt-if100"
METRICS = (("test/top1", "top-1"), ("test/few", "few-shot"))


def only_rows(report: Report, keys: Sequence[str], title: str) -> Report:
    """The report restricted to the rows that were run (the demo shows no "no runs" lines), under `title`."""
    rows = tuple(r for r in report.table.rows if r.key in keys)
    cells = report.cells[report.cells["key"].isin(keys)]
    return replace(report, table=replace(report.table, rows=rows, title=title), cells=cells)


@dataclass(frozen=True)
class Verdict:
    row: str
    baseline: str
    metric: str
    diff: float
    ci95: float
    spread: float
    n: tuple[int, int]
    separated: bool  # every seed of the row on the same side of every seed of the baseline

    def sentence(self) -> str:
        if math.isnan(self.ci95):
            return (f"{self.row} - {self.baseline}, {self.metric}: {self.diff:+.2f} points from one seed per row; the "
                    "seed spread is unknown, so this says nothing yet (run with --seeds 0,1,2)")
        ratio = abs(self.diff) / self.spread if self.spread > 0 else math.inf
        head = (f"{self.row} - {self.baseline}, {self.metric}: {self.diff:+.2f} points (95% interval "
                f"±{self.ci95:.2f}, n={self.n[0]}+{self.n[1]} seeds); the larger seed std is {self.spread:.2f}, so the "
                f"difference is {ratio:.1f}x the seed spread")
        if abs(self.diff) <= self.ci95:
            return head + ": not told apart from seed noise (the interval includes 0)"
        side = "above" if self.diff > 0 else "below"
        every = f"; every {self.row} seed is {side} every {self.baseline} seed" if self.separated else ""
        return head + f": {self.row} is {side} {self.baseline} beyond seed noise{every}"


def verdicts(records: pd.DataFrame, baseline: str, rows: Sequence[str]) -> list[Verdict]:
    """Each row against the baseline row, per metric in METRICS, from the study's records (one per row and seed)."""
    out = []
    base = records[records["key"] == baseline]
    for key in rows:
        if key == baseline:
            continue
        mine = records[records["key"] == key]
        for metric, label in METRICS:
            a, b = list(mine[metric].astype(float)), list(base[metric].astype(float))
            d = difference(a, b)
            separated = bool(a and b and (min(a) > max(b) or max(a) < min(b)))
            out.append(Verdict(mine["row"].iloc[0], base["row"].iloc[0], label, d["diff"], d["ci95"], d["spread"],
                               (d["n_a"], d["n_b"]), separated))
    return out


def per_class_accuracy(texts: dict[str, str], records: pd.DataFrame) -> pd.DataFrame:
    """Long frame (row, seed, class, name, train_count, accuracy) from each run's `per_class_accuracy.csv`."""
    frames = []
    for record in records.itertuples():
        frame = pd.read_csv(io.StringIO(texts[record.run_id]))
        frames.append(frame.assign(row=record.row, seed=record.seed))
    return pd.concat(frames, ignore_index=True)


def head_to_tail(per_class: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of each row's accuracy per class, classes from the most training images to the
    fewest (ties keep class order); columns: row, rank, class, name, train_count, mean, std, n."""
    order = (per_class[["class", "train_count"]].drop_duplicates("class")
             .sort_values(["train_count", "class"], ascending=[False, True], kind="stable"))
    rank = {c: i for i, c in enumerate(order["class"])}
    lines = []
    for (row, klass), group in per_class.groupby(["row", "class"], sort=False):
        stats = cell_stats(list(group["accuracy"]))
        first = group.iloc[0]
        lines.append({"row": row, "rank": rank[klass], "class": klass, "name": first["name"],
                      "train_count": int(first["train_count"]), "mean": stats["mean"], "std": stats["std"],
                      "n": stats["n"]})
    return pd.DataFrame(lines).sort_values(["row", "rank"], kind="stable").reset_index(drop=True)


def group_bars(records: pd.DataFrame) -> pd.DataFrame:
    """Per row: mean and std over seeds of many / medium / few accuracy (index row, columns (group, stat))."""
    out = {}
    for row, mine in records.groupby("row", sort=False):
        out[row] = {(g, s): cell_stats(list(mine[f"test/{g}"].astype(float)))[s]
                    for g in ("many", "medium", "few") for s in ("mean", "std")}
    return pd.DataFrame.from_dict(out, orient="index")


def demo_figure(curve: pd.DataFrame, bars: pd.DataFrame, path: Path, subtitle: str) -> Path:
    """Left: per-class accuracy from head to tail, one line per row (band: ± one seed std). Right: many / medium /
    few bars per row with seed-std error bars."""
    from matplotlib.figure import Figure

    from harness.studies.figures import COLORS, save_png

    figure = Figure(figsize=(13, 4.2), layout="constrained")
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": (2, 1)})
    for i, (row, line) in enumerate(curve.groupby("row", sort=False)):
        color = COLORS[i % len(COLORS)]
        x, mean, std = line["rank"].to_numpy(), line["mean"].to_numpy(), np.nan_to_num(line["std"].to_numpy())
        left.plot(x, mean, marker="o", color=color, label=f"{row} (n={int(line['n'].min())})")
        left.fill_between(x, mean - std, mean + std, color=color, alpha=0.15)
    first = curve[curve["row"] == curve["row"].iloc[0]]
    left.set_xticks(first["rank"].to_numpy(), [f"{n}\n({c})" for n, c in zip(first["name"], first["train_count"])],
                    fontsize=7)
    left.set_xlabel("classes, head → tail (training images)")
    left.set_ylabel("test accuracy (%)")
    left.set_ylim(0, 100)
    left.legend(fontsize=8)
    left.set_title("per-class accuracy, mean over seeds (band: ± seed std)", fontsize=10)
    groups = ("many", "medium", "few")
    width = 0.8 / max(1, len(bars))
    x = np.arange(len(groups))
    for i, (row, values) in enumerate(bars.iterrows()):
        means = [values[(g, "mean")] for g in groups]
        stds = [0.0 if math.isnan(values[(g, "std")]) else values[(g, "std")] for g in groups]
        right.bar(x + (i - (len(bars) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
                  color=COLORS[i % len(COLORS)], label=row)
    right.set_xticks(x, groups)
    right.set_ylim(0, 100)
    right.set_ylabel("test accuracy (%)")
    right.set_title("many / medium / few (error bar: seed std)", fontsize=10)
    right.legend(fontsize=8)
    figure.suptitle(subtitle, fontsize=10)
    return save_png(figure, path)


def timing_frame(records: pd.DataFrame) -> pd.DataFrame:
    """Where each run's time went (seconds, in its own process): setup, training, final evaluation, wall."""
    columns = {"time/setup_s": "setup s", "time/train_s": "train s", "time/eval_s": "eval s", "wall_time_s": "wall s"}
    frame = records[["row", "seed", *[c for c in columns if c in records]]].rename(columns=columns)
    return frame.round(1).reset_index(drop=True)
