"""The paper's tables as data. A row is a method plus switches (never a copied file); `paper` holds the published
numbers by column. Reports and the ablation command read these declarations; a test binds every row's switches to
its builder's signature so a typo fails in milliseconds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Row:
    name: str  # as printed in the paper's table
    key: str  # slug used in run names: {key}-{dataset}-if{IF}-s{seed}
    method: str | None  # None: the harness cannot run this row (yet); its paper value still renders
    switches: tuple[tuple[str, Any], ...] = ()
    paper: tuple[tuple[str, float | None], ...] = ()  # (column, value); None where the paper prints "-"
    group: str = ""  # section header in the paper's table (Single model, MoE-based, ...)

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.switches)

    def paper_value(self, column: str) -> float | None:
        return dict(self.paper).get(column)


@dataclass(frozen=True)
class Column:
    label: str  # as printed in the paper
    metric: str  # MLflow metric key
    dataset: str  # dataset the column is measured on
    imbalance_factor: float | None = None


@dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]
    protocol: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self, key_or_name: str) -> Row:
        for row in self.rows:
            if key_or_name in (row.key, row.name):
                return row
        known = ", ".join(r.key for r in self.rows)
        raise KeyError(f"table {self.name} has no row '{key_or_name}'; rows: {known}")


def row(name: str, key: str, method: str | None, paper: dict[str, float | None] | float | None = None,
        group: str = "", **switches: Any) -> Row:
    values = paper if isinstance(paper, dict) else {"Acc": paper}
    return Row(name, key, method, tuple(sorted(switches.items())), tuple(values.items()), group)


# SHIKE Table 4: ablation on CIFAR-100-LT IF 100 (decoupled training in every row).
TABLE4 = TableSpec(
    name="table4",
    title="SHIKE Table 4: ablation of MoE, DKF, L_mu and L_nt (CIFAR-100-LT IF 100, ResNet-32)",
    columns=(Column("Acc", "test/top1", "cifar100lt", 100.0),),
    rows=(
        row("Plain", "plain", "plain", 50.04),
        row("MoE", "moe", "shike", 54.23, dkf=False, l_mu=False, l_nt=False),
        row("+DKF", "dkf", "shike", 55.26, l_mu=False, l_nt=False),
        row("+DKF+L_mu", "dkf-mu", "shike", 55.59, l_nt=False),
        row("+DKF+L_nt", "dkf-nt", "shike", 55.79, l_mu=False),
        row("MoE+L_mu+L_nt", "moe-mu-nt", "shike", 54.82, dkf=False),
        row("SHIKE", "shike", "shike", 56.34),
    ),
    protocol="every row: stage 1 then balanced-softmax classifier re-training; final-epoch test accuracy",
)

TABLES: dict[str, TableSpec] = {"table4": TABLE4}
