"""`harness bench` and `harness bench gpu` end to end through the command line (CPU; tiny sizes). Benchmarks
measure: these assert what the reports contain, never how fast anything ran."""

from __future__ import annotations

import json

import pytest
import torch

from harness.cli import main
from harness.studies.bench.plan import BenchPlan

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _json_out(capsys) -> tuple[dict, str]:
    captured = capsys.readouterr()
    return json.loads(captured.out), captured.err


@pytest.mark.slow  # ~20 s alone, more on a busy machine: every benchmark, both variants
def test_cli_bench_quick_json_runs_every_benchmark(capsys):
    assert main(["bench", "--quick", "--json", "--threads", "1"]) == 0
    report, tables = _json_out(capsys)
    assert report["device"] == "cpu" and {"augment", "step", "epoch"} <= set(report)
    assert report["augment"]["n_images"] == BenchPlan().quick().aug_images
    for part in ("step", "epoch"):
        assert set(report[part]["variants"]) == {"plain", "shike"}
        assert all(set(rows) == {"reference", "fast"} for rows in report[part]["variants"].values())
    assert "Augmentation" in tables and "Training step" in tables and "Epoch" in tables  # stdout stays JSON


def test_cli_bench_quick_prints_json(capsys):
    assert main(["bench", "--quick", "--what", "step", "--variants", "plain", "--threads", "1", "--json"]) == 0
    report, _ = _json_out(capsys)
    assert set(report) >= {"step"} and not {"augment", "epoch"} & set(report)
    assert report["step"]["batch_size"] == BenchPlan().quick().batch_size
    assert set(report["step"]["variants"]["plain"]) == {"reference", "fast"}


def test_cli_bench_rejects_unknown_parts(capsys):
    assert main(["bench", "--what", "augment,nope"]) == 2
    assert "--what" in capsys.readouterr().err


def test_cli_bench_gpu_refuses_without_cuda(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "gpu", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err and "--quick" in err
    assert not (tmp_path / "out").exists()


def test_cli_bench_gpu_rejects_unknown_phases(capsys, tmp_path):
    assert main(["bench", "gpu", "--quick", "--only", "fast,nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "concurrent-eager-k1" in err


@pytest.mark.slow  # three phases, each in fresh child processes: about a minute on a busy 2-core machine
def test_cli_bench_gpu_quick_runs_every_child_kind(capsys, tmp_path):
    out = tmp_path / "gpu"
    args = ["bench", "gpu", "--quick", "--only", "reference,concurrent-eager-k1,r50-moe", "--workers", "0",
            "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    assert [p["status"] for p in report["phases"]] == ["ok", "ok", "ok"]
    for variant in ("shike", "plain"):
        row = report["epochs"][f"reference|{variant}"]
        assert row["stage1"]["epoch_s"] > 0 and row["crt"]["epoch_s"] > 0 and row["recipe_epochs"] == [180, 20]
    assert report["concurrency"]["fast"]["1"]["speedup"] == 1.0
    # r50-moe on CPU: eager only, every variant measured, ratios against the plain ResNet-50 of the same run
    rows = {r["variant"]: r for r in report["throughput"]}
    assert set(rows) == {"resnet50:ABC", "resnet50:ABC:pool1x1", "resnet50:plain"}
    assert all(r["compile"] == "off" and r["images_per_s"] > 0 and r["peak_bytes"] > 0 for r in rows.values())
    assert rows["resnet50:plain"]["params"] == 25_557_032  # torchvision's published ResNet-50 count (1,000 classes)
    assert rows["resnet50:plain"]["images_vs_plain"] == 1.0
    assert rows["resnet50:ABC"]["params"] > rows["resnet50:ABC:pool1x1"]["params"] > 25_557_032
    printed = capsys.readouterr().out
    assert "reference: ok" in printed and "| reference | shike |" in printed
    assert "r50-moe: ok" in printed and "| r50-moe | resnet50:ABC | off | 4 x 64 |" in printed
    assert printed.endswith((out / "gpu_check.md").read_text() + "\n")
