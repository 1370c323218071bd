"""`harness bench data` through the command line on a tiny generated tree (CPU). Benchmarks measure: this asserts
what the report contains, never how fast anything ran."""

from __future__ import annotations

import json

import pytest

from harness.cli import main


def test_cli_bench_data_quick_reports_each_loader(capsys):
    assert main(["bench", "data", "--quick", "--json", "--images", "20"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["images"] == 20 and report["crop"] == 32 and report["augment"] == "randaugment"
    assert set(report["loaders"]) == {"baseline", "file-feeder"} and report["loaders"]["baseline"]["ratio"] == 1.0
    assert report["loaders"]["file-feeder"]["img_s"] > 0
    assert report["skipped"] == {"dali": "needs NVIDIA DALI and CUDA"}  # no CUDA here
    assert "Input pipeline" in captured.err  # the table goes to stderr with --json


@pytest.mark.parametrize("args, fragment", [(["--images", "3"], "--images >= 10"), (["--image-size", "64"], "WxH")])
def test_cli_bench_data_rejects_bad_sizes(args, fragment, capsys):
    assert main(["bench", "data", "--quick", *args]) == 2
    assert fragment in capsys.readouterr().err
