"""Shift-curve and reliability figures: what is drawn (lines, panels, titles) and byte-identical PNGs."""

from __future__ import annotations

import math

import matplotlib.image
import numpy as np
import pytest
import torch

from harness.calibration import calibration_bins
from harness.studies import shift_figures

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAMES = ["forward-50", "forward-25", "forward-10", "forward-5", "forward-2", "balanced",
         "backward-2", "backward-5", "backward-10", "backward-25", "backward-50"]
RESULTS = {
    "ce": dict(zip(NAMES, [70.0, 66.0, 60.0, 55.0, 48.0, 41.0, 35.0, 30.0, 25.0, 21.0, 19.0])),
    "sade": dict(zip(NAMES, [65.0, 63.0, 60.0, 57.0, 54.0, 50.0, 47.0, 45.0, 43.0, 41.0, 40.0])),
}


def hand_bins():
    # 6 samples over 4 classes (as tests/harness/test_shift_calibration.py): ECE 21.67 %, MCE 45 %
    samples = [(0.95, True), (0.95, False), (0.90, True), (0.50, True), (0.50, False), (0.30, False)]
    probs = torch.tensor([[p, (1 - p) / 3, (1 - p) / 3, (1 - p) / 3] for p, _ in samples], dtype=torch.float64)
    return calibration_bins(probs, torch.tensor([0 if right else 1 for _, right in samples]))


def assert_png(path) -> np.ndarray:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] >= 200 and pixels.shape[1] >= 300
    assert (pixels[..., :3] < 0.5).any()  # something dark was drawn
    return pixels


def test_shift_curve_draws_one_line_per_run_over_the_eleven_distributions():
    figure = shift_figures.draw_shift_curve(RESULTS)
    (ax,) = figure.axes
    runs = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
    assert [line.get_label() for line in runs] == ["ce", "sade"]
    assert runs[0].get_ydata().tolist() == [70.0, 66.0, 60.0, 55.0, 48.0, 41.0, 35.0, 30.0, 25.0, 21.0, 19.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == NAMES


def test_a_missing_distribution_is_a_gap_and_an_unknown_one_is_refused():
    partial = {"ce": {"forward-50": 70.0, "balanced": 41.0}}
    (line,) = [line for line in shift_figures.draw_shift_curve(partial).axes[0].get_lines()
               if line.get_label() == "ce"]
    y = line.get_ydata()
    assert y[0] == 70.0 and y[5] == 41.0 and sum(math.isnan(v) for v in y) == 9
    with pytest.raises(ValueError, match="uniform"):
        shift_figures.draw_shift_curve({"ce": {"uniform": 41.0}})
    with pytest.raises(ValueError):
        shift_figures.draw_shift_curve({})


def test_reliability_has_one_panel_per_run_with_its_ece():
    bins = hand_bins()
    figure = shift_figures.draw_reliability({f"run{i}": bins for i in range(4)})  # a 2 x 3 grid, 2 left empty
    assert len(figure.axes) == 4
    assert [ax.get_title().splitlines()[0] for ax in figure.axes] == ["run0", "run1", "run2", "run3"]
    assert "ECE 21.67%" in figure.axes[0].get_title() and "MCE 45.00%" in figure.axes[0].get_title()
    accuracy_bars = figure.axes[0].containers[0]
    heights = [bar.get_height() for bar in accuracy_bars]
    assert len(heights) == 15 and heights[14] == 0.5 and heights[13] == 1.0 and heights[4] == 0.0
    gap_bars = figure.axes[0].containers[1]  # only the 4 non-empty bins: gaps 0.45, 0.1, 0, 0.3
    assert sorted(round(bar.get_height(), 6) for bar in gap_bars) == [0.0, 0.1, 0.3, 0.45]


def test_figures_are_written_and_identical_for_the_same_input(tmp_path):
    curve_a = shift_figures.shift_curve_figure(RESULTS, tmp_path / "a" / "shift.png")
    curve_b = shift_figures.shift_curve_figure(RESULTS, tmp_path / "b" / "shift.png")
    bins = {"ce": hand_bins(), "sade": hand_bins()}
    rel_a = shift_figures.reliability_figure(bins, tmp_path / "a" / "reliability.png")
    rel_b = shift_figures.reliability_figure(bins, tmp_path / "b" / "reliability.png")
    for a, b in ((curve_a, curve_b), (rel_a, rel_b)):
        assert_png(a)
        assert a.read_bytes() == b.read_bytes()
    assert b"Software" not in curve_a.read_bytes() and b"Software" not in rel_a.read_bytes()
    one = assert_png(shift_figures.reliability_figure({"ce": hand_bins()}, tmp_path / "one.png"))
    assert matplotlib.image.imread(rel_a).shape[1] > 1.6 * one.shape[1]  # two panels side by side
