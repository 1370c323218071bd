from __future__ import annotations

import pytest

from harness.config import PRESETS, RunConfig, apply_overrides, flatten, parse_epochs, resolve
from harness.errors import HarnessError
from harness.registry import METHODS


def test_preset_sets_method_switches_only_where_the_builder_has_them():
    cfg = resolve("ce", METHODS.get("ce"), preset="shike-code")
    assert cfg.method_kwargs["head"] == "cosine"
    assert "alpha" not in cfg.method_kwargs  # ce has no alpha switch; the preset key is skipped, not an error


def test_code_literal_preset_uses_official_units():
    cfg = resolve("shike", METHODS.get("shike"), preset="shike-code-literal")
    assert (cfg.method_kwargs["alpha"], cfg.method_kwargs["beta"], cfg.method_kwargs["kl_reduction"]) == (
        10.0, 1.0, "mean")


def test_paper_preset_differs_where_the_paper_does():
    code = resolve("shike", METHODS.get("shike"), preset="shike-code")
    paper = resolve("shike", METHODS.get("shike"), preset="shike-paper")
    assert code.optim.schedule == "code" and paper.optim.schedule == "paper"
    assert paper.method_kwargs["head"] == "linear" and paper.method_kwargs["dkt_variant"] == "paper"


def test_overrides_are_typed():
    cfg = resolve("shike", METHODS.get("shike"), overrides={"optim.lr": "0.1", "train.epochs": "3",
                                                             "method.dkf": "false", "method.alpha": 1})
    assert cfg.optim.lr == 0.1 and cfg.train.epochs == 3
    assert cfg.method_kwargs["dkf"] is False and cfg.method_kwargs["alpha"] == 1.0


@pytest.mark.parametrize("key, value, fragment", [
    ("optim.lrr", "0.1", "unknown config key 'optim.lrr'"),
    ("train.epochs", "three", "expected a int"),
    ("method.alpah", "1", "unknown key 'method.alpah'"),
    ("method.dkf", "maybe", "expected a bool"),
])
def test_bad_overrides_are_one_clear_error(key, value, fragment):
    with pytest.raises(HarnessError, match=fragment):
        resolve("shike", METHODS.get("shike"), overrides={key: value})


def test_unknown_preset_lists_known():
    with pytest.raises(HarnessError, match="known presets: " + ", ".join(sorted(PRESETS))):
        resolve("shike", METHODS.get("shike"), preset="nope")


def test_flatten_has_every_section_and_method_switch():
    flat = flatten(resolve("shike", METHODS.get("shike")))
    assert flat["optim.batch_size"] == 128 and flat["train.epochs"] == 180 and flat["train.crt_epochs"] == 20
    assert flat["method.alpha"] == 0.1 and flat["data.dataset"] == "fmnistlt"


def test_config_is_frozen():
    cfg = RunConfig()
    with pytest.raises(AttributeError):
        cfg.optim.lr = 1.0  # type: ignore[misc]
    assert apply_overrides(cfg, {}, {}) == cfg


@pytest.mark.parametrize("text, expected", [("180+20", (180, 20)), ("9", (9, 1)), ("1", (1, 1)), ("6+0", (6, 0))])
def test_parse_epochs(text, expected):
    assert parse_epochs(text) == expected


def test_parse_epochs_rejects_garbage():
    with pytest.raises(HarnessError):
        parse_epochs("ten")
