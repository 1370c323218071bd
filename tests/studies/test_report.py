"""Tables from runs: exact cell statistics from synthetic runs DataFrames, missing cells, the paper difference,
the matching rules, the renderers, and `harness report table4` end to end on a tiny real study."""

from __future__ import annotations

import io
import math

import pandas as pd
import pytest
from report_support import EXPERIMENT, tiny_study_home

from harness.cli import main
from harness.studies.report import build_report, display_frame, newest_parent, render, seed_runs
from harness.studies.tables import TABLE1, TABLE2, TABLE3, TABLE4, TABLE5, TABLES
from harness.tracking import Tracker


def run(key: str, seed: int, top1: float, *, table: str = "table4", dataset: str = "fmnistlt", imb: float = 100.0,
        status: str = "FINISHED", start: int = 0, **metrics: float) -> dict:
    """One line of a runs DataFrame as `Tracker.search` returns it (params are strings)."""
    return {"run_id": f"{key}-{dataset}-{imb:g}-{seed}-{start}", "experiment_id": "1", "status": status,
            "start_time": pd.Timestamp(1_700_000_000 + start, unit="s"), "tags.table": table, "tags.row_key": key,
            "params.method": key, "params.data.dataset": dataset, "params.data.imbalance_factor": str(imb),
            "params.train.seed": str(seed), "params.train.epochs": "2", "params.train.crt_epochs": "1",
            "params.data.profile": "first-n", "params.data.test_per_class": "0", "params.preset": "shike-code",
            "metrics.test/top1": top1, **{f"metrics.test/{k}": v for k, v in metrics.items()}}


def cells(report) -> pd.DataFrame:
    return report.cells.set_index(["key", "column"])


def test_cell_is_mean_std_n_ci_over_seeds_with_the_paper_difference():
    frame = pd.DataFrame([run("plain", 0, 50.0), run("plain", 1, 52.0), run("shike", 0, 56.0),
                          run("shike", 1, 57.0), run("shike", 2, 58.0)])
    c = cells(build_report(frame, TABLE4))
    plain, shike = c.loc[("plain", "Acc")], c.loc[("shike", "Acc")]
    assert (plain["mean"], plain["n"], plain["paper"]) == (51.0, 2, 50.04)
    assert plain["std"] == pytest.approx(math.sqrt(2))
    assert plain["ci95"] == pytest.approx(12.706 * math.sqrt(2) / math.sqrt(2))
    assert plain["diff"] == pytest.approx(51.0 - 50.04)
    assert (shike["mean"], shike["std"], shike["n"]) == (57.0, 1.0, 3)
    assert shike["ci95"] == pytest.approx(4.303 / math.sqrt(3))
    assert shike["diff"] == pytest.approx(57.0 - 56.34)
    assert shike["seeds"] == "0,1,2"


def test_cells_without_runs_say_so_and_carry_no_number():
    report = build_report(pd.DataFrame([run("plain", 0, 50.0)]), TABLE4)
    moe = cells(report).loc[("moe", "Acc")]
    assert moe["n"] == 0 and math.isnan(moe["mean"]) and math.isnan(moe["std"]) and math.isnan(moe["diff"])
    assert moe["status"] == "no runs" and moe["paper"] == 54.23
    line = display_frame(report).set_index("Method").loc["MoE"]
    assert line["Acc (harness)"] == "no runs" and line["Acc paper"] == "54.23" and line["Acc Δ"] == ""
    assert display_frame(report).set_index("Method").loc["Plain", "Acc (harness)"] == "50.00 (n=1)"


def test_rows_the_harness_cannot_run_render_the_paper_and_are_marked():
    report = build_report(pd.DataFrame(), TABLE2)
    status = report.cells.set_index(["key", "column"])["status"]
    assert status[("ssd", "iNat R-50")] == "not runnable" and status[("shike", "iNat R-50")] == "no runs"
    assert {status[(key, "iNat R-50")] for key in ("ride", "bbn", "paco", "bcl", "ncl-3n")} == {"no runs"}
    assert set(status) == {"not runnable", "no runs"} and (report.cells["n"] == 0).all()
    assert "no finished runs tagged table=table2" in report.protocol
    places = cells(build_report(pd.DataFrame(), TABLE3))
    assert places.loc[("oltr", "All"), "status"] == "not runnable" and places.loc[("crt", "All"), "status"] == "no runs"
    assert places.loc[("paco", "All"), "status"] == "no runs"
    ours = cells(build_report(pd.DataFrame(), TABLE2))
    assert [ours.loc[("shike", c.label), "paper"] for c in TABLE2.columns] == [59.7, 59.6, 75.4]
    md = render(build_report(pd.DataFrame(), TABLE3), "md")
    assert "| Ours (3E) | - | no runs | 43.60 |" in md and "| PaCo | 2021 | no runs | 37.50 |" in md
    assert "*Contrastive & Hybrid methods*" in md


def test_only_finished_child_runs_of_the_table_count_and_the_newest_run_of_a_seed_wins():
    frame = pd.DataFrame([
        run("plain", 0, 10.0, start=0), run("plain", 0, 50.0, start=5),  # a rerun of seed 0 replaces the first
        run("plain", 1, 52.0, start=1), run("plain", 2, 99.0, status="FAILED"), run("plain", 3, 99.0, table="table1"),
        {**run("plain", 4, 99.0), "tags.row_key": None},  # a parent-like run without a row
    ])
    plain = cells(build_report(frame, TABLE4)).loc[("plain", "Acc")]
    assert (plain["mean"], plain["n"], plain["seeds"]) == (51.0, 2, "0,1")
    assert list(seed_runs(frame[frame["status"] == "FINISHED"], TABLE4.row("plain"))["metrics.test/top1"])[:2] == \
        [50.0, 52.0]


def test_seeds_are_listed_in_numeric_order():
    frame = pd.DataFrame([run("plain", 10, 50.0), run("plain", 2, 52.0)])
    assert cells(build_report(frame, TABLE4)).loc[("plain", "Acc"), "seeds"] == "2,10"


def test_table1_columns_split_by_imbalance_factor_and_prefer_the_papers_dataset():
    frame = pd.DataFrame([
        run("shike", 0, 55.0, table="table1", dataset="cifar100lt", imb=100), run("shike", 1, 57.0, table="table1",
                                                                                 dataset="cifar100lt", imb=100),
        run("shike", 0, 60.0, table="table1", dataset="cifar100lt", imb=50),
        run("shike", 0, 90.0, table="table1", dataset="fmnistlt", imb=100),
        run("bsce", 0, 40.0, table="table1", dataset="cifar100lt", imb=100)])
    c = cells(build_report(frame, TABLE1))
    assert (c.loc[("shike", "IF 100"), "mean"], c.loc[("shike", "IF 100"), "n"]) == (56.0, 2)
    assert c.loc[("shike", "IF 100"), "diff"] == pytest.approx(56.0 - 56.3)
    assert (c.loc[("shike", "IF 50"), "mean"], c.loc[("shike", "IF 50"), "diff"]) == (60.0, pytest.approx(0.2))
    assert c.loc[("bsce", "IF 100"), "mean"] == 40.0 and math.isnan(c.loc[("bsce", "IF 100"), "paper"])
    assert c.loc[("bsce", "IF 50"), "status"] == "no runs" and c.loc[("paco-bf", "IF 100"), "status"] == "not runnable"
    fmnist = cells(build_report(frame, TABLE1, dataset="fmnistlt"))
    assert fmnist.loc[("shike", "IF 100"), "mean"] == 90.0 and fmnist.loc[("shike", "IF 50"), "n"] == 0


def test_a_single_other_dataset_stands_in_and_the_protocol_says_so():
    report = build_report(pd.DataFrame([run("plain", 0, 50.0), run("plain", 1, 52.0)]), TABLE4)
    assert cells(report).loc[("plain", "Acc"), "n"] == 2
    assert "Acc: fmnistlt IF 100 (paper: cifar100lt IF 100)" in report.protocol
    for fragment in ("profile first-n", "epochs 2+1", "preset shike-code", "seeds 0,1", "test images per class full",
                     "selection: final epoch", "2 runs"):
        assert fragment in report.protocol


def test_protocol_reads_the_planned_epochs_and_falls_back_for_old_runs():
    new = {**run("plain", 0, 50.0), "params.plan.epochs": "180+20"}
    for key in ("params.train.epochs", "params.train.crt_epochs"):
        new.pop(key)
    assert "epochs 180+20;" in build_report(pd.DataFrame([new]), TABLE4).protocol
    assert "epochs 180+20 / 2+1;" in build_report(pd.DataFrame([new, run("plain", 1, 52.0)]), TABLE4).protocol


def test_protocol_names_batch_augmentation_and_peak_lrs_where_runs_logged_them():
    official = {**run("plain", 0, 50.0), "params.optim.batch_size": "128", "params.data.augment": "autoaugment",
                "params.plan.peak_lrs": "0.15+0.1"}
    demo = {**run("plain", 1, 52.0), "params.optim.batch_size": "32", "params.data.augment": "basic",
            "params.plan.peak_lrs": "0.075+0.05"}
    assert "; batch 128; augment autoaugment; peak LRs 0.15+0.1; preset" in \
        build_report(pd.DataFrame([official]), TABLE4).protocol
    mixed = build_report(pd.DataFrame([official, demo]), TABLE4).protocol  # distinct values, sorted
    assert "; batch 32 / 128; augment autoaugment / basic; peak LRs 0.075+0.05 / 0.15+0.1;" in mixed
    assert "peak LRs" not in build_report(pd.DataFrame([run("plain", 0, 50.0)]), TABLE4).protocol


def test_a_difference_measured_on_other_data_is_flagged_and_matching_data_is_not():
    stand_in = build_report(pd.DataFrame([run("plain", 0, 50.0)]), TABLE4)
    assert "Acc: measured on fmnistlt IF 100, the paper on cifar100lt IF 100; Δ is a cross-setting comparison" \
        in " ".join(stand_in.notes)
    same = build_report(pd.DataFrame([run("plain", 0, 50.0, dataset="cifar100lt")]), TABLE4)
    assert not any("cross-setting" in note for note in same.notes)
    at_50 = build_report(pd.DataFrame([run("shike", 0, 60.0, table="table1", dataset="cifar100lt", imb=50)]), TABLE1)
    assert not any("cross-setting" in note for note in at_50.notes)  # IF 50 runs fill the IF 50 column only
    other_if = build_report(pd.DataFrame([run("plain", 0, 50.0, dataset="cifar100lt", imb=50)]), TABLE4)
    assert any("measured on cifar100lt IF 50, the paper on cifar100lt IF 100" in n for n in other_if.notes)


def test_runs_on_several_other_datasets_are_not_pooled():
    frame = pd.DataFrame([run("plain", 0, 50.0, dataset="fmnistlt"), run("plain", 0, 30.0, dataset="cifar10lt")])
    report = build_report(frame, TABLE4)
    assert cells(report).loc[("plain", "Acc"), "n"] == 0
    assert any("--dataset" in note for note in report.notes)
    assert cells(build_report(frame, TABLE4, dataset="cifar10lt")).loc[("plain", "Acc"), "mean"] == 30.0


def test_table3_columns_read_their_own_metrics():
    frame = pd.DataFrame([run("shike", 0, 41.0, table="table3", dataset="placeslt", many=44.0, medium=40.0, few=45.0)])
    c = cells(build_report(frame, TABLE3))
    assert [c.loc[("shike", label), "mean"] for label in ("Many", "Medium", "Few", "All")] == [44.0, 40.0, 45.0, 41.0]
    assert c.loc[("shike", "Few"), "diff"] == pytest.approx(45.0 - 44.8)


def test_csv_has_one_line_per_cell_with_separate_columns():
    text = render(build_report(pd.DataFrame([run("plain", 0, 50.0), run("plain", 1, 52.0)]), TABLE4), "csv")
    frame = pd.read_csv(io.StringIO(text))
    assert list(frame.columns[:8]) == ["row", "column", "mean", "std", "n", "ci95", "paper", "diff"]
    assert len(frame) == 7 and list(frame["row"]) == [r.name for r in TABLE4.rows]
    plain = frame.set_index("row").loc["Plain"]
    assert (plain["mean"], plain["std"], plain["n"], plain["paper"], plain["diff"]) == (51.0, 1.4142, 2, 50.04, 0.96)
    assert frame.set_index("row").loc["MoE"].isna()[["mean", "std", "ci95", "diff"]].all()


def test_md_latex_and_html_carry_the_cell_text_and_the_protocol():
    report = build_report(pd.DataFrame([run("plain", 0, 50.0), run("plain", 1, 52.0)]), TABLE4)
    md, latex, html = (render(report, f) for f in ("md", "latex", "html"))
    assert "| Plain | 51.00 ± 1.41 (n=2) | 50.04 | +0.96 |" in md and report.protocol in md
    assert r"51.00 $\pm$ 1.41 (n=2)" in latex and r"\caption{SHIKE Table 4" in latex and "% Protocol:" in latex
    assert "<td>51.00 ± 1.41 (n=2)</td>" in html and "<p>Protocol:" in html
    assert r"\caption{SHIKE Table 3: top-1 (\%) on Places-LT" in render(build_report(pd.DataFrame(), TABLE3), "latex")
    with pytest.raises(ValueError, match="unknown format"):
        render(report, "docx")


def test_newest_parent_is_the_latest_study_run_of_the_table():
    frame = pd.DataFrame([
        {"run_id": "old", "start_time": pd.Timestamp(1), "tags.kind": "study", "tags.table": "table4"},
        {"run_id": "new", "start_time": pd.Timestamp(9), "tags.kind": "study", "tags.table": "table4"},
        {"run_id": "other", "start_time": pd.Timestamp(20), "tags.kind": "study", "tags.table": "table1"}])
    assert newest_parent(frame, TABLE4) == "new" and newest_parent(frame, TABLE5) is None


def test_declared_tables_hold_the_papers_values():
    assert set(TABLES) == {"table1", "table2", "table3", "table4", "table5"}
    assert TABLE1.row("shike").paper == (("IF 100", 56.3), ("IF 50", 59.8))
    assert TABLE1.row("balms").paper_value("IF 100") == 50.7 and TABLE1.row("balms").method == "balms-sampler-free"
    assert TABLE1.row("paco").method == "paco" and "swapped" in TABLE1.row("paco").own
    assert {r.key for r in TABLE1.rows if r.method} == {"shike", "plain", "ce", "bsce", "la", "focal", "ldam-drw",
                                                        "tau-norm", "crt", "balms", "lade", "gcl", "wb", "la-posthoc",
                                                        "cb", "cb-ce", "ncm", "lws", "disalign", "ncl-3n", "paco",
                                                        "bcl", "ride", "reslt", "tlc"}
    assert {r.key for r in TABLE2.rows if r.method} == {"ldam-drw", "crt", "tau-norm", "balms", "la", "gcl", "wb",
                                                        "paco", "bcl", "bbn", "ride", "ncl-3n", "shike"}
    assert {r.key for r in TABLE3.rows if r.method} == {"focal", "ncm", "crt", "tau-norm", "lws", "balms", "lade",
                                                        "disalign", "gcl", "paco", "ncl-3n", "shike"}
    assert all(r.paper_value("IF 100") is None for r in TABLE1.rows if r.group.startswith("Harness"))
    assert [TABLE3.row("shike").paper_value(c) for c in ("Many", "Medium", "Few", "All")] == [43.6, 39.2, 44.8, 41.9]
    assert {r.name: (r.method, r.kwargs) for r in TABLE5.rows} == {
        name: ("shike", {"arrangement": name}) for name in ("A", "B", "C", "AB", "BC", "AC", "ABC", "ABCA", "ABCB",
                                                            "ABCC")}
    assert {r.key for r in TABLE5.rows if r.backbones} == {"b", "ab", "bc", "abc", "abca", "abcb", "abcc"}
    assert TABLE5.row("abc").paper_value("Acc") == 59.72 and "resnet32" not in TABLE5.row("abc").backbones


# End to end on a real (tiny) study ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def study_home(tmp_path_factory):
    return tiny_study_home(tmp_path_factory)


@pytest.mark.slow
def test_report_table4_csv_end_to_end(study_home, monkeypatch, capsys):
    monkeypatch.setenv("HARNESS_HOME", str(study_home))
    assert main(["report", "table4", "--format", "csv"]) == 0
    out = capsys.readouterr()
    frame = pd.read_csv(io.StringIO(out.out)).set_index("row")
    assert list(frame.index) == [r.name for r in TABLE4.rows]
    assert list(frame["n"]) == [2, 0, 0, 0, 0, 0, 2]
    assert list(frame["paper"]) == [50.04, 54.23, 55.26, 55.59, 55.79, 54.82, 56.34]
    for name in ("Plain", "SHIKE"):
        assert frame.loc[name, "diff"] == pytest.approx(frame.loc[name, "mean"] - frame.loc[name, "paper"], abs=1e-3)
        assert 0 <= frame.loc[name, "mean"] <= 100 and frame.loc[name, "std"] >= 0
    assert frame.loc["MoE"].isna()[["mean", "std", "diff"]].all()
    assert "epochs 1+1" in out.err and "seeds 0,1" in out.err and "fig3:" in out.err and "fig4:" in out.err
    tracker = Tracker()
    parent = newest_parent(tracker.search([EXPERIMENT]), TABLE4)
    assert "| SHIKE |" in tracker.load_text(parent, "report/table4.md")
    figures = tracker.artifact_names(parent, "figures")
    assert {p.split("/")[-1].split("-")[0] for p in figures} == {"fig3", "fig4"}


@pytest.mark.slow
def test_report_rich_default_and_bad_experiment(study_home, monkeypatch, capsys):
    monkeypatch.setenv("HARNESS_HOME", str(study_home))
    assert main(["report", "table4", "--no-figures", "--no-log"]) == 0
    out = capsys.readouterr().out
    assert "SHIKE Table 4" in out and "(n=2)" in out and "no runs" in out and "Protocol:" in out
    assert main(["report", "table2", "--no-log", "--format", "md"]) == 0
    assert "| Ours (3E) | - | no runs | 59.70 |" in capsys.readouterr().out
    assert main(["report", "table4", "--experiment", "nope"]) == 2
    assert "no experiment 'nope'" in capsys.readouterr().err


def test_report_help_names_the_targets_without_reading_the_registry(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["report", "-h"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert all(name in out for name in ("table1..table5", "harness list tables", "fig1", "fig3", "fig4", "study NAME"))


def test_every_figure_the_command_offers_has_a_maker():
    from harness.commands.report import FIGURES
    from harness.studies.figure_runs import FIGURE_MAKERS

    assert set(FIGURES) == set(FIGURE_MAKERS)


BASELINES_I = ("focal", "cb", "ldam-drw", "crt", "tau-norm", "lws", "ncm", "balms-sampler-free", "lade", "gcl", "wb", "disalign",
               "la-posthoc")


def test_tables_1_and_3_run_every_baseline_and_footnote_the_methods_own_numbers():
    assert {r.method for r in TABLE1.rows} >= set(BASELINES_I)
    assert {r.method for r in TABLE3.rows} >= {"focal", "ncm", "crt", "tau-norm", "lws", "balms-sampler-free", "lade", "disalign",
                                                "gcl"}
    assert TABLE1.row("ldam-drw").paper_value("IF 100") == 44.4 and "42.04" in TABLE1.row("ldam-drw").own
    report = build_report(pd.DataFrame([run("ldam-drw", 0, 43.0, table="table1")]), TABLE1)
    assert "LDAM-DRW: own paper 42.04 at IF 100 (SHIKE quotes 44.4)." in report.notes
