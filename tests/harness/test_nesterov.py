"""`optim.nesterov`: the SGD every stage builds takes it from the config (RIDE's and TLC's own recipes use Nesterov
momentum; every other method and preset keeps plain momentum)."""

from __future__ import annotations

import pytest
import torch

from harness.config import resolve_config
from harness.registry import METHODS
from harness.trainer import enter_stage

COUNTS = (40, 20, 10, 5)


@pytest.mark.parametrize("nesterov", [False, True])
def test_the_stage_optimizer_takes_nesterov_from_the_config(nesterov):
    cfg = resolve_config("ce", overrides={"optim.nesterov": nesterov, "method.depth": 8})
    spec = METHODS.get("ce")(num_classes=4, class_counts=COUNTS, **cfg.method_kwargs)
    optimizer = enter_stage(spec, spec.stages[0], cfg)
    assert isinstance(optimizer, torch.optim.SGD)
    assert [group["nesterov"] for group in optimizer.param_groups] == [nesterov]
    assert optimizer.param_groups[0]["momentum"] == 0.9 and optimizer.param_groups[0]["dampening"] == 0


def test_ride_and_tlc_own_recipes_use_nesterov_and_the_default_does_not():
    assert resolve_config("ride", preset="own").optim.nesterov is True
    assert resolve_config("tlc", preset="own").optim.nesterov is True
    assert resolve_config("ride").optim.nesterov is False and resolve_config("paco", preset="own").optim.nesterov is False
