from __future__ import annotations

import pytest

from harness.config import (
    BASE,
    PRESETS,
    RunConfig,
    TrainConfig,
    apply_overrides,
    flatten,
    parse_epochs,
    plan_epochs,
    resolve_config,
)
from harness.errors import HarnessError
from harness.registry import METHODS


def test_preset_sets_method_switches_only_where_the_builder_has_them():
    cfg = resolve_config("ce", preset="shike-code")
    assert cfg.method_kwargs["head"] == "cosine"
    assert "alpha" not in cfg.method_kwargs  # ce has no alpha switch; the preset key is skipped, not an error


def test_code_literal_preset_uses_official_units():
    cfg = resolve_config("shike", preset="shike-code-literal")
    assert (cfg.method_kwargs["alpha"], cfg.method_kwargs["beta"], cfg.method_kwargs["kl_reduction"]) == (
        10.0, 1.0, "mean")


def test_paper_preset_differs_where_the_paper_does():
    code = resolve_config("shike", preset="shike-code")
    paper = resolve_config("shike", preset="shike-paper")
    assert code.optim.schedule == "code" and paper.optim.schedule == "paper"
    assert paper.method_kwargs["head"] == "linear" and paper.method_kwargs["dkt_variant"] == "paper"


def test_overrides_are_typed():
    cfg = resolve_config("shike", overrides={"optim.lr": "0.1", "train.epochs": "3",
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
        resolve_config("shike", overrides={key: value})


def test_unknown_preset_lists_known():
    with pytest.raises(HarnessError, match="known presets: " + ", ".join(sorted(PRESETS))):
        resolve_config("shike", preset="nope")


def test_flatten_has_every_section_and_method_switch():
    flat = flatten(resolve_config("shike"))
    assert flat["optim.batch_size"] == 128 and flat["train.epochs"] == 0 and flat["train.stage_epochs"] == ""
    assert flat["method.alpha"] == 0.1 and flat["data.dataset"] == "fmnistlt"


def test_config_is_frozen():
    cfg = RunConfig()
    with pytest.raises(AttributeError):
        cfg.optim.lr = 1.0  # type: ignore[misc]
    assert apply_overrides(cfg, {}, {}) == cfg


@pytest.mark.parametrize("text, expected", [
    ("180+20", {"train.stage_epochs": "180+20", "train.epochs": 0}),
    ("200", {"train.epochs": 200, "train.stage_epochs": ""}),
    ("6+0", {"train.stage_epochs": "6+0", "train.epochs": 0}),
])
def test_parse_epochs(text, expected):
    assert parse_epochs(text) == expected


def test_parse_epochs_rejects_garbage():
    with pytest.raises(HarnessError):
        parse_epochs("ten")


def shike_stages():
    return METHODS.get("shike")(num_classes=10, class_counts=(100,) * 10).stages


@pytest.mark.parametrize("train, expected", [
    (TrainConfig(), [180, 20]),  # the method's own recipe
    (TrainConfig(epochs=200), [180, 20]),  # E in all, split 9:1
    (TrainConfig(epochs=100), [90, 10]),
    (TrainConfig(epochs=25), [23, 2]),  # 22.5 + 2.5: the tie goes to the first stage
    (TrainConfig(epochs=2), [1, 1]),  # every stage gets at least one epoch
    (TrainConfig(stage_epochs="20+5"), [20, 5]),
])
def test_epochs_are_planned_per_stage(train, expected):
    assert plan_epochs(shike_stages(), train) == expected


def test_one_stage_method_trains_the_sum_and_too_few_stages_is_an_error():
    one_stage = METHODS.get("ce")(num_classes=10, class_counts=(100,) * 10).stages
    assert plan_epochs(one_stage, TrainConfig(stage_epochs="20+5")) == [25]
    assert plan_epochs(one_stage, TrainConfig(epochs=30)) == [30]
    with pytest.raises(HarnessError, match="gives 1 stages, but the method has 2"):
        plan_epochs(shike_stages(), TrainConfig(stage_epochs="20"))


def test_presets_are_deltas_on_one_base():
    assert PRESETS["shike-code"] == {}
    code, paper = resolve_config("shike"), resolve_config("shike", preset="shike-paper")
    changed = {k for k in flatten(code) if flatten(code)[k] != flatten(paper)[k]}
    assert changed == {"preset", "optim.schedule", "method.head", "method.dkt_variant"}
    assert resolve_config("plain").method_kwargs["head"] == BASE["method.head"]  # base applies where a switch exists


def test_stage_overrides_are_typed_and_checked_against_the_method():
    from harness.config import stage_overrides

    cfg = resolve_config("shike", overrides=["stage.classifier.peak_lr=0.05", "stage.classifier.epochs=7"])
    stages = stage_overrides(shike_stages(), cfg.stage_args)
    assert (stages[1].peak_lr, stages[1].epochs) == (0.05, 7) and stages[0].peak_lr == 0.15
    with pytest.raises(HarnessError, match="no stage 'clasifier'; its stages: representation, classifier"):
        stage_overrides(shike_stages(), resolve_config("shike", overrides=["stage.clasifier.epochs=1"]).stage_args)
    with pytest.raises(HarnessError, match="field one of"):
        resolve_config("shike", overrides=["stage.classifier.lr=1"])


@pytest.mark.parametrize("dataset, lr, batch, imbalance, backbone", [
    ("imagenetlt", 0.2, 256, 256.0, "resnet50"), ("inat2018", 0.025, 64, 500.0, "resnet50"),
    ("placeslt", 0.02, 128, 996.0, "resnet152")])
def test_large_scale_presets_carry_the_papers_settings(dataset, lr, batch, imbalance, backbone):
    """SHIKE section 4.2: LR 0.2 / 0.025 / 0.02, SGD momentum 0.9, weight decay 5e-4, cosine to 0 restarted for the
    classifier stage (the `paper` schedule), 180 + 20 epochs (the builder's own), Places-LT fine-tuned 30 epochs
    from ImageNet weights with the shared part fixed."""
    cfg = resolve_config("shike", preset=f"shike-{dataset}")
    o = cfg.optim
    assert (o.lr, o.batch_size, o.momentum, o.weight_decay, o.schedule) == (lr, batch, 0.9, 5e-4, "paper")
    assert (cfg.data.dataset, cfg.data.imbalance_factor) == (dataset, imbalance)
    assert cfg.method_kwargs["backbone"] == backbone
    places = dataset == "placeslt"
    assert cfg.data.augment == ("basic" if places else "randaugment")
    assert cfg.train.stage_epochs == ("30+20" if places else "")
    assert (cfg.method_kwargs["freeze"], cfg.method_kwargs["pretrained"]) == (
        ("trunk", "torchvision") if places else ("none", ""))
    assert "backbone" not in resolve_config("ce", preset="shike-code").method_kwargs or \
        resolve_config("ce", preset="shike-code").method_kwargs["backbone"] == "resnet32"
