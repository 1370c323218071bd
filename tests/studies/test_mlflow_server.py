"""A real `mlflow server` on 127.0.0.1: log a study through it, build the Table 4 report and its figures from it,
and read the logged artifacts back over HTTP. The server is always stopped."""

from __future__ import annotations

import io

import pandas as pd
import pytest
from report_support import EXPERIMENT, log_study

from harness.cli import main
from harness.tracking import Tracker

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.fixture(scope="module")
def server_url(mlflow_server_url):
    return mlflow_server_url  # the session's server (tests/studies/conftest.py); this module owns EXPERIMENT there


def test_report_through_a_tracking_server(server_url, harness_home, capsys):
    tracker = Tracker(server_url)
    parent, children = log_study(tracker)
    capsys.readouterr()  # mlflow prints "View run ... at <url>" when an HTTP-tracked run ends
    assert main(["report", "table4", "--tracking-uri", server_url, "--format", "csv"]) == 0
    out = capsys.readouterr()
    frame = pd.read_csv(io.StringIO(out.out)).set_index("row")
    assert (frame.loc["Plain", "mean"], frame.loc["Plain", "n"], frame.loc["Plain", "diff"]) == (51.0, 2, 0.96)
    assert (frame.loc["SHIKE", "mean"], frame.loc["SHIKE", "diff"]) == (56.5, 0.16)
    assert frame.loc["MoE", "n"] == 0
    # the artifacts went through the server's artifact proxy and come back the same way
    assert "| Plain | 51.00 ± 1.41 (n=2) | 50.04 | +0.96 |" in tracker.load_text(parent, "report/table4.md")
    assert "Plain,Acc,51.0,1.4142,2," in tracker.load_text(parent, "report/table4.csv")
    figures = sorted(tracker.artifact_names(parent, "figures"))
    assert [f.split("/")[1].split("-")[0] for f in figures] == ["fig3", "fig4"]
    assert tracker.artifact_names(children["shike-fmnistlt-if100-s1"], "figures")  # the run drawn from
    assert sorted(tracker.search([EXPERIMENT])["tags.mlflow.runName"]) == sorted([*children, f"{EXPERIMENT}-study"])
