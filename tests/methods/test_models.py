"""Models: exact parameter counts and FLOPs (reference `shike-official-code.md` 1.5, `performance-anchors.md` 1.1),
shapes, DKF wiring, the official ReLU pattern and init, heads and parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.methods.models import (
    CosineHead,
    LinearHead,
    ShallowAligner,
    Stem,
    build_expert_resnet,
    default_dkf_sources,
    forward_flops,
    make_head,
    make_stage,
    parameter_counts,
    train_flops,
)

SHIKE = dict(num_classes=100)
PLAIN_B = dict(num_classes=100, experts=1, dkf=False, head="linear", retrain_head=False)
PLAIN_A = dict(PLAIN_B, shortcut="A")
MOE = dict(num_classes=100, dkf=False)

# (config, inference params, total params, forward MFLOP per 32x32 image, fwd+bwd MFLOP)
ANCHORS = {
    "shike-3e": (SHIKE, 1_257_808, 1_277_008, 240.3, 719.9),
    "resnet32-B": (PLAIN_B, 472_756, 472_756, 138.3, 413.9),
    "resnet32-A": (PLAIN_A, 470_004, 470_004, 137.7, 412.3),
    "moe-3e-no-dkf": (MOE, 112_592 + 3 * 353_664 + 3 * 6_400, 112_592 + 3 * 353_664 + 6 * 6_400, 228.5, 684.5),
}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def shike() -> nn.Module:
    torch.manual_seed(0)
    return build_expert_resnet(**SHIKE)


@pytest.mark.parametrize("name", ANCHORS)
def test_parameter_counts_match_reference(name: str) -> None:
    cfg, inference, total, _, _ = ANCHORS[name]
    assert parameter_counts(build_expert_resnet(**cfg)) == {"total": total, "inference": inference}


def test_component_parameter_counts(shike: nn.Module) -> None:
    assert n_params(shike.stem) + n_params(shike.layer1) + n_params(shike.layer2) == 112_592
    assert [n_params(layer3) for layer3 in shike.layer3s] == [353_664] * 3
    assert [n_params(a) for a in shike.aligners] == [23_232, 18_560, 23_232]
    assert [n_params(h) for h in shike.heads] == [6_400] * 3


@pytest.mark.parametrize("name", ANCHORS)
def test_forward_flops_match_reference(name: str) -> None:
    cfg, _, _, mflops, _ = ANCHORS[name]
    assert forward_flops(build_expert_resnet(**cfg)) / 1e6 == pytest.approx(mflops, rel=5e-3)


def test_train_flops_and_profiling_leave_the_model_untouched(shike: nn.Module) -> None:
    shike.train()
    stats = shike.layer1[0].bn1.running_mean.clone()
    assert train_flops(shike) / 1e6 == pytest.approx(ANCHORS["shike-3e"][4], rel=5e-3)
    assert forward_flops(shike, (4, 3, 32, 32)) / 1e6 == pytest.approx(240.3, rel=5e-3)  # per image
    assert shike.training and all(p.grad is None for p in shike.parameters())
    assert torch.equal(stats, shike.layer1[0].bn1.running_mean)
    shike.eval()
    forward_flops(shike)
    assert not shike.training


def test_stage_and_output_shapes(shike: nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    out1 = shike.layer1(shike.stem(x))
    out2 = shike.layer2(out1)
    assert out1.shape == (2, 16, 32, 32) and out2.shape == (2, 32, 16, 16)
    assert shike.layer3s[0](out2).shape == (2, 64, 8, 8)
    assert shike.aligners[0](out1).shape == shike.aligners[1](out2).shape == (2, 64, 8, 8)
    out = shike(x)
    assert out.expert_logits.shape == (3, 2, 100) and out.features.shape == (3, 2, 64)
    torch.testing.assert_close(out.logits, out.expert_logits.mean(0))


def test_dkf_is_the_hadamard_product_of_eq3(shike: nn.Module) -> None:
    shike.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out1 = shike.layer1(shike.stem(x))
        out2 = shike.layer2(out1)
        fused = shike.layer3s[1](out2) * shike.aligners[1](out2)  # expert 1 fuses layer2
        out = shike(x)
    torch.testing.assert_close(out.features[1], fused.mean(dim=(2, 3)))
    torch.testing.assert_close(out.expert_logits[1], shike.heads[1](fused.mean(dim=(2, 3))))


def test_dkf_source_cycling_and_override() -> None:
    assert default_dkf_sources(3) == (1, 2, 1) and default_dkf_sources(4) == (1, 2, 1, 2)
    four = build_expert_resnet(num_classes=10, experts=4)
    assert [a.source for a in four.aligners] == [1, 2, 1, 2]
    assert [len(a) for a in four.aligners] == [2, 1, 2, 1]
    override = build_expert_resnet(num_classes=10, dkf_sources=(2, 2, 1))
    assert [a.source for a in override.aligners] == [2, 2, 1]
    assert len(build_expert_resnet(num_classes=10, dkf=False).aligners) == 0
    with pytest.raises(ValueError):
        build_expert_resnet(num_classes=10, dkf_sources=(1, 2))
    with pytest.raises(ValueError):
        build_expert_resnet(num_classes=10, dkf_sources=(1, 3, 1))


def test_official_relu_pattern() -> None:
    torch.manual_seed(0)
    deep, shallow = ShallowAligner(1, "code"), ShallowAligner(2, "code")
    assert [c.use_relu for c in deep] == [True, False] and [c.use_relu for c in shallow] == [True]
    assert deep(torch.randn(4, 16, 32, 32)).min() < 0  # depth-2 stack ends signed
    assert shallow(torch.randn(4, 32, 16, 16)).min() >= 0  # depth-1 stack ends with a ReLU
    assert ShallowAligner(1, "all")(torch.randn(4, 16, 32, 32)).min() >= 0
    with pytest.raises(ValueError):
        ShallowAligner(1, "paper")


def test_initialisation_follows_official_order() -> None:
    torch.manual_seed(0)
    model = build_expert_resnet(**SHIKE)
    # Golden values from the official networks.py, resnet32(100, use_norm=True, num_exps=3) after manual_seed(0).
    golden = {
        "stem.conv.weight": [0.341715, -0.271431, 0.227270],
        "layer3s.2.4.conv2.weight": [-0.043059, 0.047743, 0.058152],
        "retrain_heads.2.weight": [0.188466, -0.144405, -0.090851],
        "aligners.2.1.0.weight": [0.001890, 0.037153, 0.039853],
    }
    state = model.state_dict()
    for key, values in golden.items():
        torch.testing.assert_close(state[key].flatten()[:3], torch.tensor(values), atol=1e-6, rtol=0)
    # Aligner convs keep PyTorch's default init (|w| <= 1/sqrt(fan_in)); trunk convs are Kaiming-normal.
    for conv in (m for m in model.aligners.modules() if isinstance(m, nn.Conv2d)):
        assert conv.weight.abs().max() <= 1 / math.sqrt(conv.weight[0].numel())
    conv = model.layer3s[0][1].conv1
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / conv.weight[0].numel()), rel=0.05)
    linear = build_expert_resnet(**PLAIN_B).heads[0]
    assert linear.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.1)


def test_cosine_head() -> None:
    head = CosineHead(64, 10, scale=30.0)
    assert head.weight.shape == (64, 10) and not hasattr(head, "bias")
    torch.testing.assert_close(head.weight.norm(dim=0), torch.ones(10))
    x = torch.randn(8, 64) * 100
    logits = head(x)
    torch.testing.assert_close(logits, 30 * F.normalize(x, dim=1) @ F.normalize(head.weight, dim=0))
    assert logits.abs().max() <= 30 + 1e-4
    assert isinstance(make_head("linear", 64, 10), LinearHead) and make_head("linear", 64, 10).bias is not None
    with pytest.raises(ValueError):
        make_head("mlp", 64, 10)


def test_model_logits_bounded_by_scale() -> None:
    model = build_expert_resnet(num_classes=10, scale=5.0)
    out = model(torch.randn(4, 3, 32, 32) * 10)
    assert out.expert_logits.abs().max() <= 5.0 + 1e-4


def test_active_head_switching(shike: nn.Module) -> None:
    shike.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stage1 = shike(x)
        shike.use_head("retrain_head")
        stage2 = shike(x)
        shike.use_head("head")
    assert not torch.allclose(stage1.logits, stage2.logits)
    torch.testing.assert_close(stage1.features, stage2.features)  # same backbone, different heads
    with pytest.raises(ValueError):
        build_expert_resnet(**PLAIN_B).use_head("retrain_head")
    with pytest.raises(ValueError):
        shike.use_head("classifier")


@pytest.mark.parametrize("cfg", [SHIKE, PLAIN_B, MOE, dict(SHIKE, experts=4, head="linear")])
def test_parameter_groups_partition_the_model(cfg: dict) -> None:
    model = build_expert_resnet(**cfg)
    groups = model.parameter_groups()
    ids = [id(p) for ps in groups.values() for p in ps]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert ("retrain_head" in groups) == cfg.get("retrain_head", True)
    assert sum(p.numel() for p in groups["head"]) == n_params(model.heads)


def test_inference_count_follows_active_head(shike: nn.Module) -> None:
    shike.use_head("retrain_head")
    assert shike.inference_parameter_count() == 1_257_808
    shike.use_head("head")


def test_backward_reaches_every_expert() -> None:
    torch.manual_seed(0)
    model = build_expert_resnet(num_classes=10, experts=3)
    out = model(torch.randn(4, 3, 32, 32))
    F.cross_entropy(out.logits, torch.tensor([0, 1, 2, 3])).backward()
    groups = model.parameter_groups()
    for p in groups["backbone"] + groups["head"]:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    for part in (*model.layer3s, *model.aligners, *model.heads):
        assert any(p.grad.abs().sum() > 0 for p in part.parameters())
    assert all(p.grad is None for p in groups["retrain_head"])


def test_one_expert_is_a_plain_resnet32() -> None:
    model = build_expert_resnet(**PLAIN_B)
    plain = nn.Sequential(
        Stem(3), make_stage(16, 16, 5, 1), make_stage(16, 32, 5, 2), make_stage(32, 64, 5, 2), nn.Linear(64, 100)
    )
    assert [p.shape for p in model.parameters()] == [p.shape for p in plain.parameters()]
    assert len(model.layer3s) == 1 and len(model.aligners) == 0 and model.retrain_heads is None
    # Same function: copy the weights across and compare with a hand-written forward.
    for p_model, p_plain in zip(model.parameters(), plain.parameters(), strict=True):
        p_plain.data.copy_(p_model.data)
    model.eval()
    plain.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        reference = plain[4](plain[:4](x).mean(dim=(2, 3)))
    assert out.expert_logits.shape == (1, 2, 100)
    torch.testing.assert_close(out.logits, reference)


def test_option_a_shortcut_is_parameter_free_zero_padding() -> None:
    stage = make_stage(16, 32, 1, stride=2, option="A")
    assert n_params(stage[0].shortcut) == 0
    x = torch.randn(2, 16, 8, 8)
    expected = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
    torch.testing.assert_close(stage[0].shortcut(x), expected)
    with pytest.raises(ValueError):
        make_stage(16, 32, 1, stride=2, option="C")


def test_single_channel_input() -> None:
    model = build_expert_resnet(num_classes=10, in_channels=1)
    out = model(torch.randn(2, 1, 28, 28))
    assert out.logits.shape == (2, 10) and torch.isfinite(out.logits).all()


@pytest.mark.slow
def test_forward_compiles_without_graph_breaks() -> None:
    """On ResNet-8 trunks: the same forward code and every block kind of ResNet-32 (identity and downsampling
    shortcuts, DKF, both heads) in a quarter of the graph, so dynamo traces it in a fraction of the time."""
    torch.manual_seed(0)
    shike = build_expert_resnet(**SHIKE, depth=8)
    explanation = torch._dynamo.explain(shike)(torch.randn(2, 3, 32, 32))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
