"""A method, a dataset and a table for the harness, from outside it: pyproject.toml names them as entry points."""

import torch
from torch import nn

from harness.data import DatasetSpec, LTData, Split, long_tail_counts
from harness.datasets.augment import SMALL_IMAGE_AUGMENTATIONS
from harness.method import LossTerm, LTModel, MethodSpec, ModelOutput, Stage
from harness.methods.losses import BalancedSoftmaxCE, ExpertCE
from harness.studies.tables import Column, TableSpec, row


class TinyMLP(LTModel):
    def __init__(self, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"backbone": list(self.body.parameters()), "head": list(self.head.parameters())}

    def forward(self, x: torch.Tensor) -> ModelOutput:
        features = self.body(x)
        logits = self.head(features)
        return ModelOutput(logits, logits[None], features[None])  # one expert


def toy(*, num_classes: int, class_counts: tuple[int, ...], hidden: int = 32, balanced: bool = True) -> MethodSpec:
    """Toy MLP: cross-entropy, then the head re-trained with balanced softmax (or CE with balanced=False)."""
    retrain = BalancedSoftmaxCE(class_counts) if balanced else ExpertCE()
    return MethodSpec(TinyMLP(num_classes, hidden), (
        Stage("representation", (LossTerm("ce", 1.0, ExpertCE()),), epochs=2, peak_lr=0.05),
        Stage("classifier", (LossTerm("retrain", 1.0, retrain),), epochs=1, peak_lr=0.05, trainable=("head",))))


def build_toyset(*, imbalance_factor: float, n_max: int | None = None, test_per_class: int = 0, val_per_class: int = 0,
                 **_: object) -> LTData:
    """Four classes of 32x32 noise tinted by a class colour, made in memory; the same arguments give the same images
    (data_root, download, profile and data_seed do not apply)."""
    counts = long_tail_counts(n_max or 120, 4, imbalance_factor)
    g = torch.Generator().manual_seed(0)
    colours = torch.randint(0, 128, (4, 3, 1, 1), generator=g)

    def split(per_class: list[int]) -> Split:
        labels = torch.repeat_interleave(torch.arange(4), torch.tensor(per_class))
        noise = torch.randint(0, 128, (len(labels), 3, 32, 32), generator=g)
        return Split((noise + colours[labels]).to(torch.uint8), labels)

    train, test = split(counts), split([test_per_class or 20] * 4)
    val = split([val_per_class] * 4) if val_per_class else None
    manifest = {"dataset": "toyset", "class_counts": counts, "test_per_class": test_per_class or 20,
                "val_per_class": val_per_class}
    return LTData("toyset", train, test, tuple(counts), ("a", "b", "c", "d"), (0.5,) * 3, (0.25,) * 3, manifest, val)


TOYSET = DatasetSpec("toyset", num_classes=4, default_n_max=120, profiles=("first-n",), build=build_toyset,
                     description="synthetic 4-class LT images", augmentations=SMALL_IMAGE_AUGMENTATIONS)
TOYTABLE = TableSpec("toytable", "Toy: does balanced re-training help?", (Column("Acc", "test/top1", "toyset", 10.0),),
                     (row("CE re-trained", "ce", "toy", None, balanced=False), row("Balanced softmax", "bsce", "toy")),
                     protocol="not a paper's table: both rows train 2 + 1 epochs; final-epoch test accuracy")
