"""`harness bench gpu`'s arithmetic on made-up measurements: the per-recipe run time, the K-process speed-up, the
scaling of a variant not timed in a mode, Table 4's totals against the targets (issue #6), and the ResNet-50 MoE
throughput ratios (issue #14)."""

from __future__ import annotations

from collections import Counter

import pytest

from harness.errors import HarnessError
from harness.studies.bench.gpu_child import ThroughputModel
from harness.studies.bench.gpu_report import (
    concurrency,
    epoch_rows,
    extrapolate,
    markdown,
    reference_variant,
    table4_variants,
    throughput,
)

TABLE4 = ["plain", "moe", "moe", "shike", "shike", "shike", "shike"]


def _row(mode: str, variant: str, stage1: float, extra: float, crt: float | None, crt_extra: float = 0.0) -> dict:
    out = {"mode": mode, "variant": variant, "recipe_epochs": [180, 20],
           "stage1": {"epoch_s": stage1, "train_s": stage1, "data_s": 0.1, "eval_s": 0.0, "extra_first_s": extra,
                      "ms_per_step": 1.0, "peak_bytes": None}}
    if crt is not None:
        out["crt"] = {"epoch_s": crt, "extra_first_s": crt_extra}
    return out


def _concurrent(mode: str, k: int, spans: list[tuple[float, float]], epochs: int) -> dict:
    results = [{"rank": r, "start": s, "end": e, "epoch_s": [1.0] * epochs} for r, (s, e) in enumerate(spans)]
    return {"name": f"concurrent-{mode}-k{k}", "mode": mode, "k": k, "status": "ok", "wall_s": 1.0,
            "results": results}


@pytest.fixture
def phases() -> list[dict]:
    fast = [_row("fast", "shike", 2.0, 10.0, 1.0, 5.0), _row("fast", "plain", 1.0, 4.0, 0.5, 2.0),
            _row("fast", "moe", 1.5, 6.0, 0.8, 3.0)]
    return [{"name": "fast", "mode": "fast", "k": 1, "status": "ok", "wall_s": 1.0, "results": fast},
            {"name": "reference", "mode": "reference", "k": 1, "status": "ok", "wall_s": 1.0,
             "results": [_row("reference", "shike", 4.0, 1.0, 2.0, 0.5), {"variant": "plain", "error": "boom"}]},
            _concurrent("fast", 1, [(0.0, 10.0)], 2), _concurrent("fast", 2, [(0.0, 10.0), (0.5, 12.0)], 2)]


def test_table4_is_one_plain_two_moe_four_dkf_rows():
    assert Counter(table4_variants()) == Counter(TABLE4)


def test_concurrency_is_epochs_over_the_shared_span(phases):
    table = concurrency(phases)["fast"]
    assert table[1]["epochs_per_s"] == pytest.approx(2 / 10)
    assert table[2]["epochs_per_s"] == pytest.approx(4 / 12)
    assert table[2]["speedup"] == pytest.approx((4 / 12) / (2 / 10))


def test_extrapolation_of_timed_variants(phases):
    out = extrapolate(epoch_rows(phases), concurrency(phases), TABLE4)["fast"]
    # run = 180 stage-1 epochs + 20 cRT epochs + the first-epoch extra time of each stage
    assert out["runs"]["shike"] == {"epochs_s": 380.0, "compile_s": 15.0, "run_s": 395.0}
    assert out["runs"]["plain"]["run_s"] == 180 + 10 + 6
    assert out["table4_1seed_s"] == pytest.approx(196 + 2 * (270 + 16 + 9) + 4 * 395)
    best = (4 / 12) / (2 / 10)
    five = sum(out["runs"][v]["compile_s"] + 5 * out["runs"][v]["epochs_s"] / best for v in TABLE4)
    assert out["concurrency_used"] == pytest.approx(best) and out["table4_5seeds_s"] == pytest.approx(five)
    assert out["meets"] == {"shike_run": False, "table4_1seed": False, "table4_5seeds": False} and not out["notes"]


def test_untimed_variant_is_scaled_from_shike_by_the_eager_ratio(phases):
    out = extrapolate(epoch_rows(phases), {}, TABLE4)["reference"]
    # plain: SHIKE's reference epoch x (fast plain / fast SHIKE) = 4.0 x 0.5; its cRT epoch by fast plain's
    # cRT/stage-1 ratio (0.5); an untimed cRT stage compiles as long as stage 1
    assert out["runs"]["plain"] == {"epochs_s": 180 * 2.0 + 20 * 1.0, "compile_s": 2.0, "run_s": 382.0}
    assert "plain scaled from SHIKE by the eager ratio 0.50" in out["notes"]
    assert out["concurrency_used"] == 1.0


def test_a_mode_missing_a_table4_variant_is_left_out(phases):
    assert set(extrapolate(epoch_rows(phases[1:]), {}, TABLE4)) == set()


def test_markdown_shows_every_table_and_the_errors(phases):
    rows = epoch_rows(phases)
    conc = concurrency(phases)
    report = {"environment": {"device_name": "test", "torch": "x", "cuda": None, "cpus": 2}, "data": "d",
              "wall_s": 1.0, "concurrency": conc, "extrapolation": extrapolate(rows, conc, TABLE4),
              "phases": phases}
    text = markdown(report, rows)
    assert "| fast | shike | 2.000 |" in text and "| reference | shike | 4.000 |" in text
    assert "| fast | 2 | 0.333 | 1.67x |" in text
    assert "| fast | 395 | 15 |" in text
    assert "- reference: boom" in text


def _step_row(variant: str, compile_mode: str, images_per_s: float, peak_gib: float) -> dict:
    return {"variant": variant, "compile": compile_mode, "batch_size": 256, "image_size": 224,
            "images_per_s": images_per_s, "ms_per_step": 256e3 / images_per_s, "peak_bytes": int(peak_gib * 2**30),
            "peak_kind": "cuda max_memory_allocated"}


@pytest.fixture
def throughput_phase() -> dict:
    results = [_step_row("resnet50:ABC", "off", 600.0, 30.0), _step_row("resnet50:plain", "off", 1000.0, 20.0),
               _step_row("resnet50:ABC:pool1x1", "off", 800.0, 25.0), _step_row("resnet50:ABC", "default", 900.0, 27.0),
               {"variant": "resnet50:plain", "compile": "default", "error": "compile timeout"}]
    return {"name": "r50-moe", "mode": "fast", "k": 1, "status": "ok", "wall_s": 1.0, "results": results}


def test_throughput_ratios_are_against_the_plain_backbone_in_the_same_compile_mode(throughput_phase):
    rows = {(r["variant"], r["compile"]): r for r in throughput([throughput_phase])}
    assert len(rows) == 4  # the failed compile is no measurement
    assert rows["resnet50:ABC", "off"]["images_vs_plain"] == pytest.approx(0.6)
    assert rows["resnet50:ABC", "off"]["peak_vs_plain"] == pytest.approx(1.5)
    assert rows["resnet50:ABC:pool1x1", "off"]["images_vs_plain"] == pytest.approx(0.8)
    assert rows["resnet50:plain", "off"]["images_vs_plain"] == 1.0
    # no compiled plain ResNet-50 in this run: no ratio, rather than one against the eager model
    assert rows["resnet50:ABC", "default"]["images_vs_plain"] is None


def test_reference_of_a_throughput_variant_is_its_plain_backbone():
    assert reference_variant("resnet50:ABC:pool1x1") == reference_variant("resnet50:plain") == "resnet50:plain"
    assert reference_variant("resnext50_32x4d:ABC") == "resnext50_32x4d:plain"


@pytest.mark.parametrize("variant", ["resnet50", "resnet99:ABC", "resnet50:plain:pool1x1", "resnet50:ABC:x:y"])
def test_a_malformed_throughput_variant_says_how_to_write_one(variant):
    with pytest.raises(HarnessError, match="BACKBONE:plain or BACKBONE:ARRANGEMENT"):
        ThroughputModel.parse(variant)
    assert ThroughputModel.parse("resnet50:ABC:pool1x1") == ThroughputModel("resnet50", "ABC", "pool1x1")


def test_markdown_shows_the_throughput_table(phases, throughput_phase):
    all_phases = [*phases, throughput_phase]
    rows = epoch_rows(all_phases)
    conc = concurrency(all_phases)
    report = {"environment": {"device_name": "test", "torch": "x", "cuda": None, "cpus": 2}, "data": "d",
              "wall_s": 1.0, "concurrency": conc, "extrapolation": extrapolate(rows, conc, TABLE4),
              "phases": all_phases}
    text = markdown(report, rows)
    assert "| r50-moe | resnet50:ABC | off | 256 x 224 | 600.0 | 426.7 | 30.00 | 0.60x | 1.50x |" in text
    assert "| r50-moe | resnet50:ABC | default | 256 x 224 | 900.0 | 284.4 | 27.00 | - | - |" in text
    assert "- r50-moe: compile timeout" in text
    assert "images/s vs plain" not in markdown({**report, "phases": phases}, rows)
