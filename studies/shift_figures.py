"""Figures for test-agnostic evaluation and calibration, drawn to PNG.

- Shift curve (SADE Fig. 1/Table 5 style): accuracy on the 11 test distributions of `harness.shift`, forward-50
  (test prior most like training) through balanced to backward-50 (most opposed), one line per run.
- Reliability diagrams (Guo et al. 2017 Fig. 1 style): per confidence bin, the accuracy as a bar, the gap to the
  bin's mean confidence shaded, the diagonal for perfect calibration, the ECE in the title; one panel per run.

`draw_*` return the matplotlib `Figure` (object API, Agg canvas: pyplot's global backend is never touched);
`*_figure` save it. PNGs carry no software/version text, so the same input gives the same bytes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from harness.calibration import CalibrationBins
from harness.shift import DISTRIBUTIONS
from harness.studies.figures import COLORS

PANELS_PER_ROW = 3


def save_png(figure: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})
    return path


def draw_shift_curve(results: Mapping[str, Mapping[str, float]], title: str = "") -> Figure:
    """Accuracy (%) per test distribution, one line per run label; a distribution a run lacks is a gap."""
    if not results:
        raise ValueError("no runs to draw")
    unknown = sorted({d for acc in results.values() for d in acc} - set(DISTRIBUTIONS))
    if unknown:
        raise ValueError(f"unknown test distributions {unknown}; known: {', '.join(DISTRIBUTIONS)}")
    figure = Figure(figsize=(9, 4), layout="constrained")
    ax = figure.add_subplot()
    x = np.arange(len(DISTRIBUTIONS))
    for i, (label, accuracy) in enumerate(results.items()):
        y = [accuracy.get(name, math.nan) for name in DISTRIBUTIONS]
        ax.plot(x, y, marker="o", color=COLORS[i % len(COLORS)], label=label)
    ax.axvline(DISTRIBUTIONS.index("balanced"), color="grey", linewidth=0.8, linestyle=":")
    ax.set_xticks(x, DISTRIBUTIONS, rotation=45, ha="right")
    ax.set_xlabel("test class distribution (forward: like training; backward: reversed)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.legend(fontsize=8)
    ax.set_title(title or "Accuracy under test label shift", fontsize=10)
    return figure


def shift_curve_figure(results: Mapping[str, Mapping[str, float]], path: Path, title: str = "") -> Path:
    """`draw_shift_curve` saved to `path` (PNG)."""
    return save_png(draw_shift_curve(results, title), path)


def _reliability_panel(ax, label: str, bins: CalibrationBins) -> None:
    width = np.diff(bins.edges)
    left = bins.edges[:-1]
    used = bins.count > 0
    accuracy = np.where(used, bins.accuracy, 0.0)
    confidence = np.where(used, bins.confidence, 0.0)
    ax.bar(left, accuracy, width, align="edge", color="tab:blue", edgecolor="black", linewidth=0.5,
           label="accuracy")
    low, high = np.minimum(accuracy, confidence), np.maximum(accuracy, confidence)
    ax.bar(left[used], (high - low)[used], width[used], bottom=low[used], align="edge", color="tab:red",
           alpha=0.3, edgecolor="tab:red", hatch="//", linewidth=0.5, label="gap to confidence")
    ax.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1.0)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{label}\nECE {bins.ece:.2f}%  MCE {bins.mce:.2f}%", fontsize=9)
    ax.legend(loc="upper left", fontsize=7)


def draw_reliability(bins_by_label: Mapping[str, CalibrationBins], title: str = "") -> Figure:
    """One reliability diagram per run label, up to three panels a row."""
    if not bins_by_label:
        raise ValueError("no runs to draw")
    n = len(bins_by_label)
    columns = min(n, PANELS_PER_ROW)
    rows = math.ceil(n / columns)
    figure = Figure(figsize=(3.6 * columns, 3.8 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, (label, bins) in zip(axes, bins_by_label.items()):
        _reliability_panel(ax, label, bins)
    for ax in axes[n:]:
        figure.delaxes(ax)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def reliability_figure(bins_by_label: Mapping[str, CalibrationBins], path: Path, title: str = "") -> Path:
    """`draw_reliability` saved to `path` (PNG)."""
    return save_png(draw_reliability(bins_by_label, title), path)
