"""Every registered method builds, runs forward/backward on a tiny batch, and gives finite, named loss terms."""

from __future__ import annotations

import inspect

import pytest
import torch

from harness.config import builder_defaults
from harness.errors import HarnessError
from harness.method import LTModel, MethodSpec
from harness.registry import METHODS

COUNTS = (50, 20, 8, 3)


@pytest.mark.parametrize("name", METHODS.names())
def test_method_builds_and_every_stage_trains(name):
    torch.manual_seed(0)
    spec = METHODS.get(name)(num_classes=len(COUNTS), class_counts=COUNTS)
    assert isinstance(spec, MethodSpec) and isinstance(spec.model, LTModel)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    groups = spec.model.parameter_groups()
    for stage in spec.stages:
        spec.model.use_head(stage.head)
        views = 1 + len(stage.views)  # a multi-view stage's batches come stacked view-major (harness.method.View)
        out = spec.model(torch.cat([x] * views))
        assert out.logits.shape[1:] == (len(COUNTS),) and out.logits.shape[0] in (4, 4 * views)
        assert out.expert_logits.shape[-2:] == out.logits.shape
        values = {term.name: term.fn(out, torch.cat([y] * views)) for term in stage.losses}
        assert values and all(torch.isfinite(v) and v.ndim == 0 for v in values.values())
        assert len(set(values)) == len(stage.losses)  # every term has its own log name
        sum(t.weight * values[t.name] for t in stage.losses).backward()
        trained = [p for g in stage.trainable for p in groups[g]]
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
        spec.model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", METHODS.names())
def test_builder_is_keyword_only_with_a_docstring(name):
    builder = METHODS.get(name)
    assert builder.__doc__, name
    params = inspect.signature(builder).parameters.values()
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params), name
    for key, value in builder_defaults(builder).items():
        assert isinstance(value, (bool, int, float, str)), (name, key)  # settable with --set


def test_ablated_components_are_absent_not_zero_weighted():
    full = METHODS.get("shike")(num_classes=4, class_counts=COUNTS)
    moe = METHODS.get("shike")(num_classes=4, class_counts=COUNTS, dkf=False, l_mu=False, l_nt=False)
    assert [t.name for t in full.stages[0].losses] == ["ce", "nt", "mu"]
    assert [t.name for t in moe.stages[0].losses] == ["ce"]
    assert not moe.model.dkf and full.model.dkf


def test_shike_weights_are_alpha_for_nt_and_beta_for_mu():
    spec = METHODS.get("shike")(num_classes=4, class_counts=COUNTS, alpha=0.3, beta=0.02)
    weights = {t.name: t.weight for t in spec.stages[0].losses}
    assert weights == {"ce": 1.0, "nt": 0.3, "mu": 0.02}


def test_plain_is_a_one_expert_decoupled_resnet32():
    spec = METHODS.get("plain")(num_classes=100, class_counts=(500,) * 100, head="linear")
    spec.model.use_head("retrain_head")
    assert spec.model.num_experts == 1 and not spec.model.dkf
    assert spec.model.inference_parameter_count() == 472_756
    assert [s.name for s in spec.stages] == ["representation", "classifier"]
    assert spec.stages[1].trainable == ("retrain_head",)


def test_unknown_method_lists_the_known_ones():
    from harness.errors import HarnessError

    with pytest.raises(HarnessError, match="known methods: " + ", ".join(METHODS.names())):
        METHODS.get("nope")


def test_registry_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        METHODS.register("shike")(lambda: None)


CIFAR_ONLY = ("branches",)


@pytest.mark.parametrize("name", METHODS.names())
def test_every_builder_takes_a_backbone_and_a_cifar_only_one_refuses_the_others(name):
    """`--set method.backbone=resnet50` (or a large-scale preset) reaches every builder; one whose network exists on
    the CIFAR ResNet only says so in one line instead of silently training ResNet-32 on ImageNet."""
    builder = METHODS.get(name)
    assert builder_defaults(builder).get("backbone") == "resnet32", name
    if name in CIFAR_ONLY:
        with pytest.raises(HarnessError, match="resnet32") as error:
            builder(num_classes=len(COUNTS), class_counts=COUNTS, backbone="resnet50")
        assert "\n" not in str(error.value)
