"""The `code` schedule must match the official CosineAnnealingLRWarmup values (reference note, section 3)."""

from __future__ import annotations

import pytest

from harness.registry import METHODS
from harness.schedules import code_lr, paper_lr, stage_lr


def shike_stages():
    """SHIKE's own stages carry the official peaks (0.15, then 0.1) and warm-up (5)."""
    return METHODS.get("shike")(num_classes=10, class_counts=(100,) * 10).stages

STAGE1 = {0: 0.025, 1: 0.05, 2: 0.075, 3: 0.1, 4: 0.125, 5: 0.15, 179: 1.2e-5}
STAGE2 = {0: 0.0375, 1: 0.05, 2: 0.0625, 3: 0.075, 4: 0.0875, 5: 0.1, 19: 1.0926e-3}  # the note rounds to 1.09e-3


@pytest.mark.parametrize("epoch, expected", STAGE1.items())
def test_code_stage1_matches_official(epoch, expected):
    assert stage_lr(shike_stages()[0], "code", 0.05, epoch, 180) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("epoch, expected", STAGE2.items())
def test_code_stage2_matches_official(epoch, expected):
    assert stage_lr(shike_stages()[1], "code", 0.05, epoch, 20) == pytest.approx(expected, abs=1e-6)


def test_code_stage1_midpoint_formula():
    # independent: peak * (1 + cos(pi * (e - 5) / 175)) / 2 at e = 92.5 -> half the peak
    import math

    assert code_lr(92, 180, 0.05, 0.15) == pytest.approx(0.15 * (1 + math.cos(math.pi * 87 / 175)) / 2)


def test_paper_schedule_cosine_to_zero_and_restarts():
    first, second = shike_stages()
    assert stage_lr(first, "paper", 0.05, 0, 180) == pytest.approx(0.05)
    assert stage_lr(second, "paper", 0.05, 0, 20) == pytest.approx(0.05)
    assert paper_lr(180, 180, 0.05) == pytest.approx(0.0, abs=1e-12)


def test_short_stages_stay_finite_and_positive():
    for total in (1, 2, 3, 6, 9):
        values = [code_lr(e, total, 0.05, 0.15) for e in range(total)]
        assert all(v > 0 for v in values), (total, values)
