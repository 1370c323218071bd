"""Every runnable row of every declared table binds to its method builder's signature: a typo in a switch fails
here in milliseconds, not after a GPU hour."""

from __future__ import annotations

import inspect

import pytest

from harness.registry import METHODS
from harness.studies.tables import TABLE4, TABLES

ROWS = [(t.name, r) for t in TABLES.values() for r in t.rows if r.method is not None]


@pytest.mark.parametrize("table, row", ROWS, ids=[f"{t}:{r.key}" for t, r in ROWS])
def test_row_switches_bind_to_the_builder(table, row):
    builder = METHODS.get(row.method)
    inspect.signature(builder).bind(num_classes=10, class_counts=(1,) * 10, **row.kwargs)


def test_table4_rows_and_paper_values():
    expected = {"Plain": 50.04, "MoE": 54.23, "+DKF": 55.26, "+DKF+L_mu": 55.59, "+DKF+L_nt": 55.79,
                "MoE+L_mu+L_nt": 54.82, "SHIKE": 56.34}
    assert {r.name: r.paper_value("Acc") for r in TABLE4.rows} == expected


@pytest.mark.parametrize("key, dkf, l_mu, l_nt, experts", [
    ("moe", False, False, False, 3), ("dkf", True, False, False, 3), ("dkf-mu", True, True, False, 3),
    ("dkf-nt", True, False, True, 3), ("moe-mu-nt", False, True, True, 3), ("shike", True, True, True, 3)])
def test_table4_rows_build_the_components_they_claim(key, dkf, l_mu, l_nt, experts):
    row = TABLE4.row(key)
    spec = METHODS.get(row.method)(num_classes=10, class_counts=(10,) * 10, **row.kwargs)
    names = {t.name for t in spec.stages[0].losses}
    assert spec.model.dkf is dkf and spec.model.num_experts == experts
    assert ("mu" in names, "nt" in names) == (l_mu, l_nt)


def test_plain_row_is_a_single_model():
    spec = METHODS.get("plain")(num_classes=10, class_counts=(10,) * 10, **TABLE4.row("plain").kwargs)
    assert spec.model.num_experts == 1 and not spec.model.dkf
