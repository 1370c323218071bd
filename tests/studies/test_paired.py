"""Paired seed-by-seed differences: matching, refusals, the t interval against hand-computed values, the verdict
at its boundary, the bootstrap's determinism, the rendered forms and the per-class head-to-tail difference."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest

from harness.studies.paired import (
    NOT_TOLD_APART,
    ONE_SEED,
    paired_frame,
    paired_summary,
    paired_table,
    per_class_difference,
    per_class_difference_figure,
    render_paired,
    t_quantile,
    verdict,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# t_{0.975, 2} in closed form (df 2: t = (2p - 1) / sqrt(2 p (1 - p))), so the expectation needs no scipy
P = 0.975
T2 = (2 * P - 1) / math.sqrt(2 * P * (1 - P))


def run(key: str, seed: int, top1: float, few: float = math.nan, start: int = 0, status: str = "FINISHED",
        data_seed: str = "0", factor: str = "100.0", manifest: str = "00000000000012e4") -> dict[str, object]:
    """One line of `Tracker.search`: params are text as MLflow stores them; the manifest hash looks like a number
    on purpose (it must be compared as text)."""
    return {"run_id": f"{key}-{seed}-{start}", "status": status, "start_time": start, "tags.row_key": key,
            "params.train.seed": str(seed), "params.data.dataset": "fmnistlt",
            "params.data.imbalance_factor": factor, "params.data.data_seed": data_seed,
            "tags.manifest_hash": manifest, "metrics.test/top1": top1, "metrics.test/few": few}


def study(**changes: dict[str, object]) -> pd.DataFrame:
    """plain and shike on seeds 0-2: top-1 differences 1, 2, 3; few-shot differences 10, 10, 10."""
    lines = [run("plain", s, 50.0 + 2 * s, few=10.0 + s) for s in range(3)]
    lines += [run("shike", s, 51.0 + 3 * s, few=20.0 + s) for s in range(3)]
    return pd.DataFrame(lines)


def test_t_quantile_matches_the_closed_form_and_the_normal_limit():
    assert t_quantile(2) == pytest.approx(T2, rel=1e-12)
    assert t_quantile(2) == pytest.approx(4.302652729911275, rel=1e-9)  # the value quoted in the brief
    assert t_quantile(1) == pytest.approx(1 / math.tan(math.pi * 0.025), rel=1e-12)  # df 1: Cauchy
    assert t_quantile(10**9) == pytest.approx(1.959963984540054, rel=1e-6)
    with pytest.raises(ValueError, match="confidence"):
        t_quantile(2, 1.0)


def test_paired_frame_matches_seeds_keeps_the_newest_rerun_and_skips_unfinished_runs():
    runs = pd.concat([study(), pd.DataFrame([run("shike", 1, 99.0, start=-1),  # older rerun: loses
                                             run("shike", 2, 0.0, start=5, status="FAILED"),
                                             run("other", 0, 1.0)])])
    frame = paired_frame(runs, "plain", "shike")
    assert frame["seed"].tolist() == [0, 1, 2]
    assert frame["a"].tolist() == [50.0, 52.0, 54.0]
    assert frame["b"].tolist() == [51.0, 54.0, 57.0]
    assert frame["diff"].tolist() == [1.0, 2.0, 3.0]
    assert frame.attrs["matched_on"] == ("data.dataset", "data.imbalance_factor", "data.data_seed", "manifest_hash")


def test_numbers_logged_as_text_match_their_values():
    runs = study()
    runs.loc[runs["tags.row_key"] == "shike", "params.data.imbalance_factor"] = "100"
    assert paired_frame(runs, "plain", "shike")["diff"].tolist() == [1.0, 2.0, 3.0]


def test_different_seed_sets_are_refused_naming_the_missing_seeds():
    runs = pd.concat([study(), pd.DataFrame([run("plain", 7, 50.0)])])
    runs = runs[~((runs["tags.row_key"] == "shike") & (runs["params.train.seed"] == "1"))]
    with pytest.raises(ValueError) as error:
        paired_frame(runs, "plain", "shike")
    assert "'plain' has no run for seed(s)" not in str(error.value)
    assert "'shike' has no run for seed(s) 1,7" in str(error.value)
    runs = runs[~((runs["tags.row_key"] == "plain") & (runs["params.train.seed"] == "2"))]
    with pytest.raises(ValueError, match=r"'plain' has no run for seed\(s\) 2; 'shike' has no run for seed\(s\) 1,7"):
        paired_frame(runs, "plain", "shike")


def test_a_seed_on_another_split_or_runs_on_several_settings_are_refused():
    runs = study()
    runs.loc[(runs["tags.row_key"] == "shike") & (runs["params.train.seed"] == "2"), "tags.manifest_hash"] = "ab"
    with pytest.raises(ValueError, match="seed 2: 'plain' ran on .*manifest_hash=00000000000012e4.* and 'shike' "
                                         ".*manifest_hash=ab"):
        paired_frame(runs, "plain", "shike")
    runs = study()
    runs.loc[runs["params.train.seed"] == "2", "params.data.imbalance_factor"] = "10"
    with pytest.raises(ValueError, match="several settings"):
        paired_frame(runs, "plain", "shike")
    runs = pd.concat([study(), pd.DataFrame([run("plain", 0, 40.0, data_seed="1")])])
    with pytest.raises(ValueError, match=r"'plain' has runs on several splits for seed\(s\) 0"):
        paired_frame(runs, "plain", "shike")
    with pytest.raises(ValueError, match="no finished run with tags.row_key == 'nobody'"):
        paired_frame(runs, "plain", "nobody")


def test_a_split_column_some_runs_lack_is_not_matched_on():
    runs = study()
    runs.loc[runs["tags.row_key"] == "plain", "tags.manifest_hash"] = None  # logged before the hash existed
    assert "manifest_hash" not in paired_frame(runs, "plain", "shike").attrs["matched_on"]


def test_summary_is_the_paired_t_interval_computed_by_hand():
    summary = paired_summary(pd.DataFrame({"diff": [1.0, 2.0, 3.0]}))
    half = T2 * 1.0 / math.sqrt(3)  # mean 2, sd 1, n 3
    assert summary["n"] == 3 and summary["mean"] == 2.0 and summary["std"] == pytest.approx(1.0, rel=1e-15)
    assert summary["half_width"] == pytest.approx(half, rel=1e-12)
    assert (summary["low"], summary["high"]) == pytest.approx((2 - half, 2 + half), rel=1e-12)
    assert summary["verdict"] == NOT_TOLD_APART  # 2 < 2.484: the interval reaches below 0
    assert math.isnan(summary["boot_low"]) and math.isnan(summary["boot_high"])
    wider = paired_summary(pd.DataFrame({"diff": [1.0, 2.0, 3.0]}), confidence=0.99)
    assert wider["half_width"] > summary["half_width"]


def test_verdict_at_the_boundary_counts_an_interval_touching_zero_as_not_told_apart():
    assert verdict(0.0, 1.0) == verdict(-1.0, 0.0) == verdict(0.0, 0.0) == NOT_TOLD_APART
    assert verdict(1e-12, 1.0) == "b above a"
    assert verdict(-1.0, -1e-12) == "a above b"
    same = [paired_summary(pd.DataFrame({"diff": d}))["verdict"] for d in ([1.0, 1.0], [0.0, 0.0], [-2.0, -2.0])]
    assert same == ["b above a", NOT_TOLD_APART, "a above b"]  # sd 0: the interval is the point itself


def test_one_seed_gives_no_interval():
    summary = paired_summary(pd.DataFrame({"diff": [0.5]}), bootstrap=100)
    assert summary["verdict"] == ONE_SEED and summary["mean"] == 0.5
    assert all(math.isnan(summary[k]) for k in ("std", "half_width", "low", "high", "boot_low", "boot_high"))
    with pytest.raises(ValueError, match="no paired differences"):
        paired_summary(pd.DataFrame({"diff": []}))


def test_bootstrap_is_deterministic_for_a_seed_and_stays_within_the_observed_differences():
    frame = pd.DataFrame({"diff": [1.0, 2.0, 3.0, 7.0]})
    first, again = (paired_summary(frame, bootstrap=500, seed=3) for _ in range(2))
    other = paired_summary(frame, bootstrap=500, seed=4)
    assert (first["boot_low"], first["boot_high"]) == (again["boot_low"], again["boot_high"])
    assert (first["boot_low"], first["boot_high"]) != (other["boot_low"], other["boot_high"])
    assert 1.0 <= first["boot_low"] < first["mean"] < first["boot_high"] <= 7.0
    assert first["low"] == paired_summary(frame)["low"]  # the bootstrap does not change the t interval
    constant = paired_summary(pd.DataFrame({"diff": [2.0, 2.0, 2.0]}), bootstrap=50)
    assert (constant["boot_low"], constant["boot_high"]) == (2.0, 2.0)


def test_table_and_its_text_markdown_and_csv_forms():
    table = paired_table(study(), [("plain", "shike")], metrics=("test/top1", "test/few"))
    assert table[["a", "b", "metric", "n", "mean"]].values.tolist() == [
        ["plain", "shike", "test/top1", 3, 2.0], ["plain", "shike", "test/few", 3, 10.0]]
    assert table["seeds"].tolist() == ["0,1,2", "0,1,2"]
    half = T2 / math.sqrt(3)
    assert render_paired(table, "text") == (
        f"shike - plain, test/top1: +2.00 ±{half:.2f} (within noise), n=3 seeds, 95% t interval "
        f"[{2 - half:+.2f}, {2 + half:+.2f}]: not told apart\n"
        "shike - plain, test/few: +10.00 ±0.00, n=3 seeds, 95% t interval [+10.00, +10.00]: shike above plain\n")
    markdown = render_paired(table, "md")
    assert f"| shike - plain | test/top1 | 3 | +2.00 ±{half:.2f} (within noise) |" in markdown
    assert "| shike above plain |" in markdown and "matched on the training seed and data.data_seed" in markdown
    back = pd.read_csv(io.StringIO(render_paired(table, "csv")))
    assert back["half_width"].tolist() == [round(half, 4), 0.0]
    assert back["verdict"].tolist() == [NOT_TOLD_APART, "b above a"]
    with pytest.raises(ValueError, match="known: md, csv, text"):
        render_paired(table, "latex")


def test_bootstrap_column_and_one_seed_wording_in_the_rendered_forms():
    runs = study()
    boot = paired_table(runs, [("plain", "shike")], metrics=("test/top1",), bootstrap=200)
    assert "bootstrap interval" in render_paired(boot, "md") and ", bootstrap [" in render_paired(boot, "text")
    one = paired_table(runs[runs["params.train.seed"] == "0"], [("plain", "shike")], metrics=("test/top1",))
    assert render_paired(one, "text") == f"shike - plain, test/top1: +1.00 ({ONE_SEED}), n=1 seeds: {ONE_SEED}\n"


def test_per_class_difference_orders_classes_head_to_tail_and_averages_over_seeds():
    counts = [5, 500, 50, 500]  # ties (classes 1 and 3) keep class order
    a = [np.array([0.1, 0.9, 0.5, 0.8]), np.array([0.3, 0.7, 0.5, 0.6])]
    b = [np.array([0.2, 0.9, 0.6, 0.8]), np.array([0.6, 0.9, 0.5, 0.6])]
    diff = per_class_difference(a, b, counts)
    assert diff["class"].tolist() == [1, 3, 2, 0]
    assert diff["train_count"].tolist() == [500, 500, 50, 5]
    assert diff["group"].tolist() == ["many", "many", "medium", "few"]
    # per seed b - a in points: class 1: 0, 20; class 3: 0, 0; class 2: 10, 0; class 0: 10, 30
    assert diff["diff"].to_numpy() == pytest.approx([10.0, 0.0, 5.0, 20.0])
    assert diff["std"].to_numpy() == pytest.approx([math.sqrt(200), 0.0, math.sqrt(50), math.sqrt(200)])
    assert diff["a"].to_numpy() == pytest.approx([80.0, 70.0, 50.0, 20.0])
    assert diff["n"].unique().tolist() == [2]
    with pytest.raises(ValueError, match="same seeds"):
        per_class_difference(a, b[:1], counts)
    with pytest.raises(ValueError, match="for 3 classes"):
        per_class_difference(a, b, counts[:3])


def test_per_class_difference_figure_is_a_png_with_the_same_bytes_for_the_same_input(tmp_path):
    counts = [int(500 * 100 ** (-c / 9)) for c in range(10)]  # many, medium and few classes
    rng = np.random.default_rng(0)
    a, b = [rng.random(10) for _ in range(3)], [rng.random(10) for _ in range(3)]
    diff = per_class_difference(a, b, counts)
    first = per_class_difference_figure(diff, counts, tmp_path / "one.png", "shike - plain")
    second = per_class_difference_figure(diff, counts, tmp_path / "two.png", "shike - plain")
    assert first.read_bytes()[:8] == PNG_SIGNATURE
    assert first.read_bytes() == second.read_bytes()
    with pytest.raises(ValueError, match="class counts"):
        per_class_difference_figure(diff, counts[::-1], tmp_path / "three.png", "shike - plain")
