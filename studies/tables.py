"""The paper's tables as data. A row is a method plus switches (never a copied file); `paper` holds the published
numbers by column. Reports and the ablation command read these declarations; a test binds every row's switches to
its builder's signature so a typo fails in milliseconds."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from harness.registry import Registry


@dataclass(frozen=True)
class Row:
    name: str  # as printed in the paper's table
    key: str  # slug used in run names: {key}-{dataset}-if{IF}-s{seed}
    method: str | None  # None: the harness cannot run this row (yet); its paper value still renders
    switches: tuple[tuple[str, Any], ...] = ()
    paper: tuple[tuple[str, float | None], ...] = ()  # (column, value); None where the paper prints "-"
    group: str = ""  # section header in the paper's table (Single model, MoE-based, ...)
    year: str = ""  # the paper's Year column ("" for the harness's own rows)
    own: str = ""  # where the method's own paper reports another number than the one SHIKE quotes (a footnote)
    backbones: tuple[str, ...] = ()  # the `method.backbone` values the row can run on; () = any

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
    requires: tuple[tuple[str, str], ...] = ()  # (run param, value) a run must have to count here (e.g. backbone)
    scale: float = 1.0  # shown = logged x scale (parameters in millions, FLOPs in G)


@dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]
    protocol: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # printed under the table: what the harness cannot map, and why
    cost: bool = False  # report cost columns (parameters, FLOPs, training compute, wall time) without --cost

    def row(self, key_or_name: str) -> Row:
        for row in self.rows:
            if key_or_name in (row.key, row.name):
                return row
        known = ", ".join(r.key for r in self.rows)
        raise KeyError(f"table {self.name} has no row '{key_or_name}'; rows: {known}")


def row(name: str, key: str, method: str | None, paper: dict[str, float | None] | float | None = None,
        group: str = "", year: str = "", **switches: Any) -> Row:
    values = paper if isinstance(paper, dict) else {"Acc": paper}
    return Row(name, key, method, tuple(sorted(switches.items())), tuple(values.items()), group, year)


def published(group: str, columns: tuple[str, ...], entries: tuple[tuple[Any, ...], ...],
              runnable: dict[str, str] | None = None, own: dict[str, str] | None = None) -> tuple[Row, ...]:
    """Rows as the paper prints them: (name, key, year, value per column...), None where the paper prints "-".
    `runnable` maps a row key to the harness method that runs it (its switches at their defaults); the others are
    "not runnable". `own` maps a row key to a footnote: what the method's own paper reports where SHIKE's quote
    differs."""
    runnable, own = runnable or {}, own or {}
    return tuple(replace(row(name, key, runnable.get(key), dict(zip(columns, values, strict=True)), group, year),
                         own=own.get(key, ""))
                 for name, key, year, *values in entries)


# Baselines the harness runs, by the paper's row key (Baselines I: methods/reweighting.py, methods/decoupled.py).
# BALMS runs without its meta sampler (the sampler-free variant; methods/decoupled.py says why).
BASELINES = {"focal": "focal", "ldam-drw": "ldam-drw", "tau-norm": "tau-norm", "crt": "crt", "balms": "balms-sampler-free",
             "lade": "lade", "gcl": "gcl", "wb": "wb", "ncm": "ncm", "lws": "lws", "disalign": "disalign",
             "la": "la-posthoc"}
# Baselines II (methods/ride.py, reslt.py, tlc.py, ncl.py, bbn.py; paco.py, bcl.py): multi-expert and contrastive.
MULTI_EXPERT = {"ride": "ride", "reslt": "reslt", "tlc": "tlc", "ncl-3n": "ncl", "bbn": "bbn"}
CONTRASTIVE = {"paco": "paco", "bcl": "bcl"}
# The rows of Tables 2 and 3 the harness can train on the torchvision ResNets (`method.backbone`); the others stay
# "not runnable" there. RIDE (3E) is the 3-expert model without distillation unless `method.teacher` is set (the
# paper's value is RIDE's model-zoo 4-expert + distillation result).
LARGE_SCALE = {**BASELINES, "la": "la", "ncl-3n": "ncl", "shike": "shike", "ride": "ride", "bbn": "bbn",
               "paco": "paco", "bcl": "bcl"}
# The methods' own CIFAR-100-LT numbers where SHIKE quotes another (baselines.md section 0; R = recalled there).
OWN_CIFAR = {
    "focal": "no CIFAR-LT number in its own paper; LDAM-DRW's re-run gives 38.41 at IF 100",
    "ldam-drw": "own paper 42.04 at IF 100 (SHIKE quotes 44.4)",
    "tau-norm": "no CIFAR number in its own paper", "crt": "no CIFAR number in its own paper",
    "balms": "own paper about 50.8 at IF 100 with the meta sampler; the harness runs the sampler-free variant",
    "wb": "own paper 53.35 at IF 100 (SHIKE quotes 53.6); its released logs reach 51.98",
    "paco": "own paper 52.0 / 56.0 (SHIKE's PaCo and BCL values look swapped)",
    "bcl": "own paper 51.93 / 56.59", "ride": "own paper 48.0 (3 experts); its model zoo 48.6",
    "tlc": "own result 49.8 (4 experts) on its own CIFAR builder (11,123 images, not the standard 10,847)",
}


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


SINGLE, HYBRID, MOE = "Single model", "Contrastive & Hybrid methods", "MoE-based methods"
HARNESS = "Harness baselines (not in the paper)"
PROTOCOL_LARGE = ("paper: 200 epochs (180 + 20 classifier re-training); harness: --preset shike-imagenetlt or "
                  "shike-inat2018 (ResNet-50; --set method.backbone=resnext50_32x4d for the RX-50 column)")

# SHIKE Table 1: CIFAR-100-LT, ResNet-32, top-1 at imbalance factor 100 and 50 (reference section 6.2).
T1 = ("IF 100", "IF 50")
TABLE1 = TableSpec(
    name="table1",
    cost=True,
    title="SHIKE Table 1: top-1 (%) on CIFAR-100-LT, ResNet-32",
    columns=(Column("IF 100", "test/top1", "cifar100lt", 100.0), Column("IF 50", "test/top1", "cifar100lt", 50.0)),
    rows=(
        *published(SINGLE, T1, (
            ("Focal Loss", "focal", "2017", 42.3, None), ("OLTR", "oltr", "2019", 43.4, None),
            ("LDAM-DRW", "ldam-drw", "2019", 44.4, None), ("τ-norm", "tau-norm", "2020", 45.4, None),
            ("cRT", "crt", "2020", 45.6, None), ("BALMS", "balms", "2020", 50.7, None),
            ("LADE", "lade", "2021", 45.4, 50.5), ("GCL", "gcl", "2022", 48.7, 53.6),
            ("Weight Balancing", "wb", "2022", 53.6, 57.7)), BASELINES, OWN_CIFAR),
        *published(HYBRID, T1, (
            ("BALMS+BatchFormer", "balms-bf", "2022", 51.7, None), ("PaCo", "paco", "2021", 51.9, 56.0),
            ("PaCo+BatchFormer", "paco-bf", "2022", 52.4, None), ("BCL", "bcl", "2022", 52.0, 56.6)),
            CONTRASTIVE, OWN_CIFAR),
        *published(MOE, T1, (
            ("RIDE (3E)", "ride", "2021", 48.3, None), ("ResLT (3E)", "reslt", "2022", 45.3, 50.0),
            ("TLC (4E)", "tlc", "2022", 50.1, None), ("NCL (S)", "ncl-s", "2022", 53.3, 56.8),
            ("NCL (3N)", "ncl-3n", "2022", 54.2, 58.2)), MULTI_EXPERT, OWN_CIFAR),
        row("Ours (3E)", "shike", "shike", {"IF 100": 56.3, "IF 50": 59.8}, MOE, "-"),
        # BALMS is BSCE plus a meta sampler; these are the harness's own single-model rows, with no paper value.
        row("Plain decoupled (harness)", "plain", "plain", {}, HARNESS),
        row("CE (harness)", "ce", "ce", {}, HARNESS),
        row("Balanced softmax (harness)", "bsce", "bsce", {}, HARNESS),
        row("Logit adjustment (harness)", "la", "la", {}, HARNESS),
        row("Logit adjustment, post-hoc (harness)", "la-posthoc", "la-posthoc", {}, HARNESS),
        row("Class-Balanced focal (harness)", "cb", "cb", {}, HARNESS),
        row("Class-Balanced CE (harness)", "cb-ce", "cb", {}, HARNESS, loss="ce"),
        row("NCM (harness)", "ncm", "ncm", {}, HARNESS), row("LWS (harness)", "lws", "lws", {}, HARNESS),
        row("DisAlign (harness)", "disalign", "disalign", {}, HARNESS),
    ),
    protocol="ResNet-32, 200 epochs; the paper reports one run per cell (model selection unstated)",
)

# SHIKE Table 2: ImageNet-LT (ResNet-50, ResNeXt-50) and iNaturalist 2018 (ResNet-50), 200 epochs.
T2 = ("ImageNet-LT R-50", "ImageNet-LT RX-50", "iNat R-50")
TABLE2 = TableSpec(
    name="table2",
    cost=True,
    title="SHIKE Table 2: top-1 (%) on ImageNet-LT and iNaturalist 2018",
    columns=(Column(T2[0], "test/top1", "imagenetlt", requires=(("method.backbone", "resnet50"),)),
             Column(T2[1], "test/top1", "imagenetlt", requires=(("method.backbone", "resnext50_32x4d"),)),
             Column(T2[2], "test/top1", "inat2018", requires=(("method.backbone", "resnet50"),))),
    rows=(
        *published(SINGLE, T2, (
            ("OLTR", "oltr", "2019", None, None, 63.9), ("LDAM-DRW", "ldam-drw", "2019", None, None, 68.0),
            ("cRT", "crt", "2020", 47.3, 49.6, 65.2), ("τ-norm", "tau-norm", "2020", 46.7, 49.4, 65.6),
            ("BALMS", "balms", "2020", 50.1, None, None), ("LA", "la", "2021", None, None, 66.4),
            ("CAM", "cam", "2021", None, None, 70.9), ("GCL", "gcl", "2022", 54.9, None, 72.0),
            ("Weight Balancing", "wb", "2022", None, 53.9, 70.2)), LARGE_SCALE),
        *published(HYBRID, T2, (
            ("SSD", "ssd", "2021", None, 56.0, None), ("PaCo", "paco", "2021", 57.0, 58.2, 73.2),
            ("BCL", "bcl", "2022", 56.0, None, 71.8), ("RIDE+BF", "ride-bf", "2022", 55.7, None, 74.1),
            ("BALMS+BF", "balms-bf", "2022", 51.1, None, None)), LARGE_SCALE),
        *published(MOE, T2, (
            ("BBN", "bbn", "2020", 48.3, 49.3, 66.3), ("RIDE (3E)", "ride", "2021", 55.4, 56.8, 72.6),
            ("ACE", "ace", "2021", 54.7, 56.6, None), ("NCL (S)", "ncl-s", "2022", 57.4, 58.4, 74.2),
            ("NCL (3N)", "ncl-3n", "2022", 59.5, 60.5, 74.9), ("Ours (3E)", "shike", "-", 59.7, 59.6, 75.4)),
            LARGE_SCALE),
    ),
    protocol=PROTOCOL_LARGE,
    notes=("The text adds ResNet-50 on ImageNet-LT at 400 epochs: 60.3 (the abstract's number).",),
)

# SHIKE Table 3: Places-LT, ImageNet-pretrained ResNet-152 with the shared part frozen, 30 epochs.
T3 = ("Many", "Medium", "Few", "All")
TABLE3 = TableSpec(
    name="table3",
    cost=True,
    title="SHIKE Table 3: top-1 (%) on Places-LT by split, ResNet-152",
    columns=(Column("Many", "test/many", "placeslt"), Column("Medium", "test/medium", "placeslt"),
             Column("Few", "test/few", "placeslt"), Column("All", "test/top1", "placeslt")),
    rows=(
        *published(SINGLE, T3, (
            ("Focal Loss", "focal", "2017", 41.1, 34.8, 22.4, 34.6), ("OLTR", "oltr", "2019", 44.7, 37.0, 25.3, 35.9),
            ("NCM", "ncm", "2020", 40.4, 37.1, 27.3, 36.4), ("cRT", "crt", "2020", 42.0, 37.6, 24.9, 36.7),
            ("τ-norm", "tau-norm", "2020", 37.8, 40.7, 31.8, 37.9), ("LWS", "lws", "2020", 40.6, 39.1, 28.6, 37.6),
            ("BALMS", "balms", "2020", 41.2, 39.8, 31.6, 38.7), ("LADE", "lade", "2021", 42.8, 39.0, 31.2, 38.8),
            ("DisAlign", "disalign", "2021", 40.4, 42.4, 30.1, 39.3),
            ("GCL", "gcl", "2022", None, None, None, 40.6)), LARGE_SCALE),
        *published(HYBRID, T3, (
            ("LDAM+RSG", "ldam-rsg", "2021", 41.9, 41.4, 32.0, 39.3),
            ("PaCo", "paco", "2021", 37.5, 47.2, 33.9, 41.2)), LARGE_SCALE),
        *published(MOE, T3, (
            ("LFME", "lfme", "2020", 39.3, 39.6, 24.2, 36.2), ("NCL (S)", "ncl-s", "2022", None, None, None, 41.5),
            ("NCL (3N)", "ncl-3n", "2022", None, None, None, 41.8),
            ("Ours (3E)", "shike", "-", 43.6, 39.2, 44.8, 41.9)), LARGE_SCALE),
    ),
    protocol="paper: ImageNet-pretrained ResNet-152, shared part frozen, 30 epochs; many > 100, few < 20 images",
)

# SHIKE Table 5: number of experts x depth arrangement (ImageNet-LT, ResNet-50; A/B/C = the outputs of layer1/2/3,
# shallow -> deep). Every row runs on the torchvision backbones (`--preset shike-imagenetlt`). On the CIFAR ResNet-32
# only two shared stages exist: A is the shallowest (layer1 in both networks), C the stage right before the experts'
# own (layer3 of ResNet-50, layer2 of ResNet-32: one downsampling away); B (ResNet-50's layer2) has no CIFAR
# counterpart, so rows using it run on the torchvision backbones only.
TV_BACKBONES = ("resnet50", "resnext50_32x4d", "resnet152")


def arrangement(name: str, paper: float) -> Row:
    group = f"{len(name)} expert" + ("s" if len(name) > 1 else "")
    found = row(name, name.lower(), "shike", paper, group, arrangement=name)
    return replace(found, backbones=TV_BACKBONES) if "B" in name else found


TABLE5 = TableSpec(
    name="table5",
    title="SHIKE Table 5: number of experts and depth arrangement (paper: ImageNet-LT, ResNet-50)",
    columns=(Column("Acc", "test/top1", "imagenetlt"),),
    rows=tuple(arrangement(n, v) for n, v in (
        ("A", 54.10), ("B", 54.75), ("C", 55.84), ("AB", 57.39), ("BC", 58.79), ("AC", 58.62), ("ABC", 59.72),
        ("ABCA", 59.83), ("ABCB", 59.90), ("ABCC", 59.77))),
    protocol="every row: full SHIKE (DKF, L_mu, L_nt) then balanced-softmax re-training; final-epoch test accuracy",
    notes=("ResNet-50 (--preset shike-imagenetlt): A/B/C = layer1/2/3. CIFAR mapping: A = layer1, C = layer2 (the "
           "stage before the experts' own), B has no ResNet-32 stage, so rows with B run on the torchvision backbones "
           "only; the paper's numbers are ImageNet-LT ResNet-50.",),
)

# Tables are a registry like methods and datasets: a plugin package adds one through the `lt_harness.tables`
# entry-point group (README, "Plugins").
TABLES = Registry("table", "lt_harness.tables")
for _table in (TABLE1, TABLE2, TABLE3, TABLE4, TABLE5):
    TABLES.register(_table.name)(_table)
