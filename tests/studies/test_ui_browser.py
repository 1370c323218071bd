"""Headless Chromium (Debian's `chromium`) against a real MLflow UI: the experiment page lists the study, and the
compare view lines up its child runs by the same metric key. Screenshots land in the test's tmp folder."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest
from report_support import EXPERIMENT, log_study

from harness.tracking import Tracker

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
UI_EXPERIMENT = f"ui-{EXPERIMENT}"  # on the session's server, next to test_mlflow_server.py's EXPERIMENT
pytestmark = [pytest.mark.browser, pytest.mark.server, pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                                          "(apt-get install -y chromium)")]


def chromium(url: str, screenshot: Path) -> str:
    """Load `url` headless, let the single-page app render (virtual time), save a screenshot and return the DOM
    (one browser start for both)."""
    command = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--hide-scrollbars", "--window-size=1600,1000", "--virtual-time-budget=20000",
               f"--screenshot={screenshot}", "--dump-dom", url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def visible_text(dom: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


@pytest.fixture(scope="module")
def ui(mlflow_server_url, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow-ui")
    tracker = Tracker(mlflow_server_url)
    parent, children = log_study(tracker, UI_EXPERIMENT)
    return mlflow_server_url, tracker.experiment_id(UI_EXPERIMENT), parent, children, folder


def test_experiment_page_shows_the_study(ui):
    url, experiment_id, _, children, folder = ui
    # workflowType=machine_learning opens the runs table (MLflow 3 opens GenAI traces by default)
    page = f"{url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    text = visible_text(chromium(page, folder / "experiment.png"))
    assert UI_EXPERIMENT in text and f"{UI_EXPERIMENT}-study" in text  # the parent run, its children nested under it
    assert f"{len(children) + 1} matching runs" in text
    assert (folder / "experiment.png").read_bytes()[:4] == b"\x89PNG"


def test_compare_view_lines_up_the_child_runs(ui):
    url, experiment_id, _, children, folder = ui
    runs = urllib.parse.quote(json.dumps(list(children.values())))
    page = f"{url}/#/compare-runs?runs={runs}&experiments={urllib.parse.quote(json.dumps([experiment_id]))}"
    text = visible_text(chromium(page, folder / "compare.png"))
    assert f"Comparing {len(children)} Runs from 1 Experiment" in text
    assert all(name in text for name in children) and "test/top1" in text
