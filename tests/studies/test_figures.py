"""Figures 1, 3 and 4: exact data helpers, valid PNG files, and `harness report fig1|fig3|fig4` on a tiny real study."""

from __future__ import annotations

import math

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from report_support import EXPERIMENT, tiny_study_home

from harness.cli import main
from harness.studies import figures
from harness.studies.figure_runs import expert_names
from harness.tracking import Tracker

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COUNTS = (500, 150, 60, 30, 10, 5)  # many: 0, 1; medium: 2, 3; few: 4, 5


def assert_png(path, min_width: int = 300) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width >= min_width and height >= 200


def test_classes_are_ordered_by_training_size_with_stable_ties():
    assert list(figures.size_order((5, 50, 20, 50))) == [1, 3, 2, 0]


def test_best_of_takes_the_highest_accuracy_and_the_first_expert_reaching_it():
    best, winner = figures.best_of(np.array([[0.1, 0.5, 0.3], [0.2, 0.5, 0.1]]))
    assert list(best) == [0.2, 0.5, 0.3] and list(winner) == [1, 0, 0]


def test_winner_shares_split_ties_and_leave_empty_groups_nan():
    accuracy = np.array([[0.9, 0.1, 0.5, 0.2, 0.3, 0.0],
                         [0.1, 0.8, 0.5, 0.1, 0.7, 0.0],
                         [0.0, 0.0, 0.1, 0.6, 0.2, 0.0]])
    shares = figures.winner_shares(accuracy, COUNTS, ["e1", "e2", "e3"])
    assert shares.loc["e1"].tolist() == [0.5, 0.25, 1 / 6]  # class 2 tied e1/e2, class 5 tied by all three
    assert shares.loc["e2"].tolist() == [0.5, 0.25, 0.5 + 1 / 6]
    assert shares.loc["e3"].tolist() == [0.0, 0.5, 1 / 6]
    assert np.allclose(shares.sum(axis=0), 1.0)
    no_few = figures.winner_shares(accuracy[:, :4], COUNTS[:4], ["e1", "e2", "e3"])
    assert no_few["few"].isna().all() and not no_few["many"].isna().any()


def test_hardest_negative_histogram_counts_each_bin_and_puts_one_in_the_last():
    histogram = figures.hardest_negative_histogram({"plain": np.array([0.0, 0.04, 0.05, 0.99, 1.0]),
                                                    "SHIKE": np.array([0.5, 0.51])}, bins=20)
    assert list(histogram.columns) == ["plain", "SHIKE"] and len(histogram) == 20
    assert histogram["plain"].tolist() == [2, 1] + [0] * 17 + [2]
    assert histogram.loc[0.5, "SHIKE"] == 2 and histogram["SHIKE"].sum() == 2


def test_figures_are_valid_pngs(tmp_path):
    rng = np.random.default_rng(0)
    accuracy = rng.random((3, len(COUNTS)))
    one = figures.figure1(accuracy, COUNTS, ["layer1", "layer2", "layer3 (deep)"], tmp_path / "a" / "fig1.png")
    three = figures.figure3(accuracy, COUNTS, ["e1", "e2", "e3"], tmp_path / "fig3.png", subtitle="run x")
    four = figures.figure4({"plain": rng.random(100), "SHIKE": rng.random(100)}, tmp_path / "fig4.png")
    for path in (one, three, four):
        assert_png(path)
    assert matplotlib.image.imread(three).shape[1] > matplotlib.image.imread(one).shape[1]  # two panels


def test_expert_names_follow_the_runs_dkf_sources():
    assert expert_names(pd.Series({"params.method.dkf": "True", "params.method.dkf_sources": ""}), 3) == \
        ["expert 1 (layer1)", "expert 2 (layer2)", "expert 3 (layer1)"]
    assert expert_names(pd.Series({"params.method.dkf": "True", "params.method.dkf_sources": "2,2"}), 2) == \
        ["expert 1 (layer2)", "expert 2 (layer2)"]
    assert expert_names(pd.Series({"params.method.dkf": "False"}), 2) == ["expert 1", "expert 2"]


# End to end on a real (tiny) study ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def study_home(tmp_path_factory):
    return tiny_study_home(tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("figure, method", [("fig1", "branches"), ("fig3", "shike"), ("fig4", "shike")])
def test_report_figure_end_to_end(figure, method, study_home, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HARNESS_HOME", str(study_home))
    assert main(["report", figure, "--out", str(tmp_path)]) == 0
    path = tmp_path / capsys.readouterr().out.strip().split("/")[-1]
    assert path.exists() and path.name.startswith(f"{figure}-{method}-fmnistlt-if100-s")
    assert_png(path)
    tracker = Tracker()
    runs = tracker.search().set_index("tags.mlflow.runName")
    run = runs.loc[path.stem.removeprefix(f"{figure}-")]
    assert f"figures/{path.name}" in tracker.artifact_names(run["run_id"], "figures")
    parent = run.get("tags.mlflow.parentRunId")
    if isinstance(parent, str):  # the study's parent run gets the figure too
        assert f"figures/{path.name}" in tracker.artifact_names(parent, "figures")


@pytest.mark.slow
def test_fig1_plots_every_branch_of_the_branches_run(study_home, monkeypatch):
    monkeypatch.setenv("HARNESS_HOME", str(study_home))
    tracker = Tracker()
    runs = tracker.search()
    branch = runs[runs["params.method"] == "branches"].iloc[0]
    details = tracker.load_arrays(branch["run_id"], "eval_details.npz")
    assert details["expert_per_class_acc"].shape == (3, 10)  # layer1, layer2, layer3 branches
    deep = 100 * details["expert_per_class_acc"][-1].mean()
    assert math.isclose(deep, float(branch["metrics.test/balanced_acc"]), abs_tol=1e-3)  # logits = deep branch


@pytest.mark.slow
def test_fig3_refuses_a_run_that_is_not_shike(study_home, monkeypatch, capsys):
    monkeypatch.setenv("HARNESS_HOME", str(study_home))
    runs = Tracker().search([EXPERIMENT])
    plain = runs[runs["params.method"] == "plain"]["run_id"].iloc[0]
    assert main(["report", "fig3", "--run-id", plain, "--no-log"]) == 2
    assert "is not a finished SHIKE" in capsys.readouterr().err
