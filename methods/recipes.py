"""Stage recipes shared by the baselines: SHIKE's schedule (every method on one recipe, the default) and the
published ones (`--preset own`). A builder's `recipe` switch picks one; stage lengths are its own fractions, so
`--epochs E` rescales them like SHIKE's 180 + 20.

- shike: 200 epochs in all, the official warm-up + cosine per stage (`optim.schedule`), peak 0.15, and 0.1 for a
  classifier stage (SHIKE's 180 + 20 for two-stage methods).
- ldam ("CIFAR recipe A", kaidic/LDAM-DRW `cifar_train.py`): 200 epochs, lr 0.1 with a 5-epoch linear warm-up,
  x0.01 from epoch 160 and x1e-4 from 180; batch 128, weight decay 2e-4, crop + flip, zero-padding shortcuts.
"""

from __future__ import annotations

from typing import Any

from harness.errors import HarnessError

RECIPES = ("shike", "own")

SHIKE_SINGLE: dict[str, Any] = {"epochs": 200, "peak_lr": 0.15}
SHIKE_REPRESENTATION: dict[str, Any] = {"epochs": 180, "peak_lr": 0.15}
SHIKE_CLASSIFIER: dict[str, Any] = {"epochs": 20, "peak_lr": 0.1}

LDAM_STEPS = ((0.8, 0.01), (0.9, 1e-4))
LDAM: dict[str, Any] = {"epochs": 200, "peak_lr": 0.1, "schedule": "step", "warmup_epochs": 5,
                        "lr_steps": LDAM_STEPS}
# the config half of recipe A, for `own_recipe`
RECIPE_A = {"optim__batch_size": 128, "optim__weight_decay": 2e-4, "optim__lr": 0.1, "data__augment": "basic",
            "method__shortcut": "A"}


def cosine(epochs: int, peak_lr: float) -> dict[str, Any]:
    """A stage run on cosine from its peak to 0, no warm-up (the decoupling and WB classifier stages)."""
    return {"epochs": epochs, "peak_lr": peak_lr, "schedule": "cosine", "warmup_epochs": 0}


def pick(recipe: str, shike: dict[str, Any], own: dict[str, Any]) -> dict[str, Any]:
    if recipe not in RECIPES:
        raise HarnessError(f"unknown recipe '{recipe}'; known: {', '.join(RECIPES)}")
    return dict(shike if recipe == "shike" else own)
