"""Training-step benchmarks, reference vs fast path (run with `pytest tests/bench --benchmark-enable`).

Under the project's default `--benchmark-disable` each benchmark body runs once as a plain test, so sizes stay small
(batch 8, 10 classes, 2 experts). Ratios for reports come from `harness bench` (interleaved medians in one process);
these give pytest-benchmark's per-call statistics and keep the benchmark entry points working.
"""

from __future__ import annotations

import json

import pytest
import torch

from harness.bench import FAST, REFERENCE, BenchPlan, StepCase, bench_epoch, bench_step, build_trainer, random_batch
from harness.bench import synthetic_lt as make_data
from harness.cli import main

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def class_counts_only():
    return make_data(10, n_max=2, imbalance_factor=1.0, test_per_class=1)


@pytest.mark.parametrize("variant", ["plain", "shike"])
@pytest.mark.parametrize("mode", [REFERENCE, FAST], ids=lambda m: m.name)
def test_bench_training_step(benchmark, class_counts_only, variant, mode):
    trainer = build_trainer(variant, mode, class_counts_only, CPU, 8, experts=2, with_feeder=False)
    case = StepCase(trainer, *random_batch(8, 10, CPU))
    case(1)  # warm-up: momentum buffers, allocator
    benchmark.extra_info.update(variant=variant, path=mode.name, batch=8, threads=torch.get_num_threads())
    before = [p.detach().clone() for p in trainer.spec.model.parameters()]
    benchmark(case)
    assert all(torch.isfinite(p).all() for p in trainer.spec.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.spec.model.parameters()))  # it trained
    assert torch.isfinite(case.sums).all() and case.sums[-1] > 0


def test_bench_step_report_has_ratios_and_is_json():
    report = bench_step(("plain",), (REFERENCE, FAST), batch_size=4, warmup=0, steps=1, repeats=1, num_classes=10,
                        experts=2, memory=False)
    assert json.loads(json.dumps(report)) == report
    rows = report["variants"]["plain"]
    assert set(rows) == {"reference", "fast"} and rows["reference"]["speedup"] == 1.0
    assert all(row["median_ms"] > 0 and row["speedup"] > 0 for row in rows.values())


def test_bench_epoch_times_both_feeders():
    data = make_data(10, n_max=6, imbalance_factor=3.0, test_per_class=1)
    report = bench_epoch(("plain",), (REFERENCE, FAST), data, batch_size=16, repeats=1, experts=2)
    rows = report["variants"]["plain"]
    assert report["train_images"] == len(data.train)
    assert all(0 < row["data_s"] < row["epoch_s"] and 0 < row["data_share"] < 1 for row in rows.values())


def test_cli_bench_quick_prints_json(capsys):
    assert main(["bench", "--quick", "--what", "step", "--variants", "plain", "--threads", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["step"]["batch_size"] == BenchPlan().quick().batch_size
    assert set(report["step"]["variants"]["plain"]) == {"reference", "fast"}


def test_cli_bench_rejects_unknown_parts(capsys):
    assert main(["bench", "--what", "augment,nope"]) == 2
    assert "--what" in capsys.readouterr().err
