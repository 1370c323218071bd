"""Training-step and epoch benchmarks, reference vs fast path (run with `pytest tests/bench --benchmark-enable`).

Under the project's default `--benchmark-disable` each benchmark body runs once as a plain test, so sizes stay small
(batch 8, 10 classes, 2 experts). Ratios for reports come from `harness bench` (interleaved medians in one process);
these give pytest-benchmark's per-call statistics and keep the benchmark entry points working.
"""

from __future__ import annotations

import json

import pytest
import torch

from harness.feeders import DeviceFeeder, ReferenceFeeder
from harness.studies.bench.build import FAST, REFERENCE, build_trainer, compiled, mode_named, run_config
from harness.studies.bench.build import synthetic_lt as make_data
from harness.studies.bench.epoch import bench_epoch
from harness.studies.bench.step import StepCase, bench_step, random_batch

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


def test_modes_set_the_switches_they_name():
    """Each side of the comparison is the config it claims: the reference path is eager fp32 contiguous on the
    DataLoader feeder; the fast path is the device feeder, channels_last, autocast; `fast+<mode>` compiles."""
    ref, fast = run_config("plain", REFERENCE, 8).train, run_config("plain", FAST, 8).train
    assert (ref.fast_path, ref.channels_last, ref.amp, ref.compile) == ("off", False, False, "off")
    assert (fast.fast_path, fast.channels_last, fast.amp, fast.compile) == ("on", True, True, "off")
    assert run_config("shike", compiled("reduce-overhead"), 8).train.compile == "reduce-overhead"
    assert mode_named("fast+default") == compiled("default") and mode_named("reference") == REFERENCE
    assert dict(run_config("moe", FAST, 8, experts=2).method_args)["dkf"] is False


def test_build_trainer_picks_the_feeder_of_the_mode():
    data = make_data(10, n_max=4, imbalance_factor=2.0, test_per_class=1)
    assert isinstance(build_trainer("plain", REFERENCE, data, CPU, 8).feeder, ReferenceFeeder)
    assert isinstance(build_trainer("plain", FAST, data, CPU, 8).feeder, DeviceFeeder)


def test_bench_step_report_has_ratios_and_is_json():
    report = bench_step(("plain",), (REFERENCE, FAST), batch_size=4, warmup=0, steps=1, repeats=1, num_classes=10,
                        experts=2, memory=False)
    assert json.loads(json.dumps(report)) == report
    rows = report["variants"]["plain"]
    assert set(rows) == {"reference", "fast"} and rows["reference"]["speedup"] == 1.0
    assert all(row["median_ms"] > 0 and row["speedup"] > 0 for row in rows.values())
    assert rows["fast"]["speedup"] == pytest.approx(rows["reference"]["median_ms"] / rows["fast"]["median_ms"])


@pytest.mark.slow  # a fresh child process: ~5 s alone, half a minute on a busy 2-core machine
def test_bench_step_cpu_memory_probe_reports_growth():
    """The CPU peak comes from a fresh child process (`python -m harness.studies.bench.memory`)."""
    report = bench_step(("plain",), (REFERENCE,), batch_size=4, warmup=0, steps=1, repeats=1, num_classes=10,
                        experts=2, memory=True)
    row = report["variants"]["plain"]["reference"]
    assert row["peak_bytes"] > row["peak_over_start_bytes"] > 0


def test_bench_epoch_times_both_feeders():
    data = make_data(10, n_max=6, imbalance_factor=3.0, test_per_class=1)
    report = bench_epoch(("plain",), (REFERENCE, FAST), data, batch_size=16, repeats=1, experts=2, evaluate=True)
    rows = report["variants"]["plain"]
    assert report["train_images"] == len(data.train)
    assert all(0 < row["data_s"] < row["epoch_s"] and 0 < row["data_share"] < 1 for row in rows.values())
    assert all(row["eval_s"] > 0 and row["epoch_s"] == row["train_s"] + row["eval_s"] for row in rows.values())
