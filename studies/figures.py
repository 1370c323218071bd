"""SHIKE Figures 1, 3 and 4 from the evaluation details a run logs (`eval_details.npz`), drawn to PNG.

Fig. 1 (paper Sec. 1): per class, the best test accuracy among a ResNet-32's branches (the `branches` method),
classes sorted by training-set size, coloured by the winning branch.
Fig. 3 (Sec. 4.4): (a) the same for a SHIKE model's experts; (b) the share of the many / medium / few classes
on which each expert is the best.
Fig. 4 (Sec. 4.4): the distribution of the hardest-negative probability (the largest non-target softmax
probability) on the test set, for a plain model and SHIKE.

The data helpers (`size_order`, `best_of`, `winner_shares`, `hardest_negative_histogram`) return arrays and
frames and are tested with exact values; the `figure*` functions only draw them. Drawing uses matplotlib's
object API (`Figure`, Agg canvas), so importing this module never changes pyplot's global backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from harness.data import shot_groups

GROUPS = ("many", "medium", "few")
HIST_BINS = 20
COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def size_order(class_counts: Sequence[int]) -> np.ndarray:
    """Class indices from the largest training class to the smallest (ties keep the class order)."""
    return np.argsort(-np.asarray(class_counts), kind="stable")


def best_of(accuracy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(best, winner) per class from (M, C) accuracies: the highest accuracy and the first expert reaching it."""
    accuracy = np.asarray(accuracy, dtype=float)
    return accuracy.max(axis=0), accuracy.argmax(axis=0)


def winner_shares(accuracy: np.ndarray, class_counts: Sequence[int], names: Sequence[str]) -> pd.DataFrame:
    """Fig. 3(b): for each expert (row) and group (many / medium / few), the fraction of the group's classes on
    which the expert has the highest accuracy. A class tied between k experts counts 1/k to each, so every
    non-empty group's column sums to 1; an empty group is NaN."""
    accuracy = np.asarray(accuracy, dtype=float)
    winners = accuracy == accuracy.max(axis=0)
    weights = winners / winners.sum(axis=0)
    groups = shot_groups(list(int(n) for n in class_counts))
    shares = {g: weights[:, groups[g]].sum(axis=1) / len(groups[g]) if groups[g] else np.full(len(names), np.nan)
              for g in GROUPS}
    return pd.DataFrame(shares, index=list(names))


def hardest_negative_histogram(probabilities: Mapping[str, np.ndarray], bins: int = HIST_BINS) -> pd.DataFrame:
    """Fig. 4's data: per model (column), the number of test samples whose hardest-negative probability falls
    in each of `bins` equal bins of [0, 1] (index: the bins' left edges; 1.0 falls in the last bin)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    counts = {name: np.histogram(np.clip(np.asarray(p, dtype=float), 0.0, 1.0), bins=edges)[0]
              for name, p in probabilities.items()}
    return pd.DataFrame(counts, index=pd.Index(np.round(edges[:-1], 6), name="bin_left"))


def save_png(figure: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=120, bbox_inches="tight")
    return path


def _best_per_class(ax: Axes, accuracy: np.ndarray, class_counts: Sequence[int], names: Sequence[str]) -> None:
    """Bars: the best accuracy per class (sorted by class size), coloured by the winning branch or expert;
    a line on a second (log) axis: the class's training images."""
    order = size_order(class_counts)
    best, winner = best_of(np.asarray(accuracy)[:, order])
    x = np.arange(len(order))
    colors = [COLORS[m % len(COLORS)] for m in range(len(names))]
    ax.bar(x, 100 * best, width=0.9, color=[colors[w] for w in winner])
    ax.set_xlabel("classes, sorted by training images (head → tail)")
    ax.set_ylabel("best test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_xlim(-0.5, len(order) - 0.5)
    counts = ax.twinx()
    counts.plot(x, np.asarray(class_counts)[order], color="black", linewidth=1.2, label="training images")
    counts.set_yscale("log")
    counts.set_ylabel("training images")
    handles = [Patch(color=color, label=name) for color, name in zip(colors, names)]  # also for experts winning none
    ax.legend(handles=handles, loc="upper right", fontsize=8, title="best", title_fontsize=8)


def figure1(accuracy: np.ndarray, class_counts: Sequence[int], names: Sequence[str], path: Path,
            subtitle: str = "") -> Path:
    """SHIKE Fig. 1: the best accuracy among a ResNet-32's branches for each class."""
    figure = Figure(figsize=(9, 4), layout="constrained")
    ax = figure.add_subplot()
    _best_per_class(ax, accuracy, class_counts, names)
    ax.set_title("Fig. 1: best branch per class (balanced-softmax re-trained heads)" +
                 (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    return save_png(figure, path)


def figure3(accuracy: np.ndarray, class_counts: Sequence[int], names: Sequence[str], path: Path,
            subtitle: str = "") -> Path:
    """SHIKE Fig. 3: (a) the best expert's accuracy per class; (b) the share of classes each expert wins."""
    figure = Figure(figsize=(13, 4), layout="constrained")
    left, right = figure.subplots(1, 2, gridspec_kw={"width_ratios": (2, 1)})
    _best_per_class(left, accuracy, class_counts, names)
    left.set_title("(a) highest accuracy among experts per class", fontsize=10)
    shares = winner_shares(accuracy, class_counts, names)
    width = 0.8 / len(names)
    x = np.arange(len(GROUPS))
    for m, name in enumerate(names):
        values = shares.loc[name, list(GROUPS)].to_numpy(dtype=float)
        right.bar(x + (m - (len(names) - 1) / 2) * width, 100 * np.nan_to_num(values), width,
                  color=COLORS[m % len(COLORS)], label=name)
    labels = [g if not np.isnan(shares[g]).all() else f"{g}\n(no classes)" for g in GROUPS]
    right.set_xticks(x, labels)
    right.set_ylabel("classes won (%)")
    right.set_ylim(0, 105)
    right.set_title("(b) share of classes each expert is best on", fontsize=10)
    right.legend(fontsize=8)
    figure.suptitle("Fig. 3: preferences of the experts" + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    return save_png(figure, path)


def figure4(probabilities: Mapping[str, np.ndarray], path: Path, subtitle: str = "") -> Path:
    """SHIKE Fig. 4: how many test samples have each hardest-negative probability, per model."""
    histogram = hardest_negative_histogram(probabilities)
    figure = Figure(figsize=(8, 4), layout="constrained")
    ax = figure.add_subplot()
    step = 1.0 / len(histogram)
    width = 0.9 * step / len(histogram.columns)
    for m, name in enumerate(histogram.columns):
        p = np.asarray(probabilities[name], dtype=float)
        label = f"{name}: mean {p.mean():.3f}, >0.5 on {100 * (p > 0.5).mean():.1f}%"
        left_edges = histogram.index.to_numpy() + m * width + 0.05 * step
        ax.bar(left_edges, histogram[name], width, align="edge", color=COLORS[m % len(COLORS)], label=label)
    ax.set_xlabel("hardest-negative probability (largest non-target softmax probability)")
    ax.set_ylabel("test samples")
    ax.set_xlim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("Fig. 4: hardest-negative probability on the test set" + (f"\n{subtitle}" if subtitle else ""),
                 fontsize=10)
    return save_png(figure, path)
