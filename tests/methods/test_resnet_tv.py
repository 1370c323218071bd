"""SHIKE's multi-expert model on torchvision's ResNet-50 family (`methods/models/resnet_tv.py`, `dkf_align.py`):
exact parameter counts against torchvision's own models, Table 5's arrangements, DKF shapes and the Hadamard
product, pretrained loading, the frozen trunk, the backbone switch of every builder and `harness describe`.
Expected values come from torchvision's modules and from conv/BN formulas written here, not from the code under
test; CPU inputs are 64x64 (layer1..4 maps 16, 8, 4, 2) with 5 classes."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from harness.errors import HarnessError
from harness.method import LTModel
from harness.methods.models.dkf_align import TABLE5_ARRANGEMENTS, make_aligner, parse_arrangement
from harness.methods.models.moe import BACKBONES, build_expert_resnet
from harness.methods.models.resnet_tv import TV_BACKBONES, TorchvisionExperts
from harness.registry import METHODS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLASSES = 5
X64 = (1, 3, 64, 64)
WIDTHS = (256, 512, 1024, 2048)  # torchvision ResNet-50 family stage outputs


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tv_model(name: str, **kwargs) -> torchvision.models.ResNet:
    return getattr(torchvision.models, name)(weights=None, **kwargs)


def conv_bn(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + 2 * cout  # conv without bias, BN weight + bias


def aligner_params(design: str, depth: int) -> int:
    """Parameters of the aligner from stage `depth` (1..3) to layer4's 2048 channels, from the design's definition."""
    widths = WIDTHS[depth - 1:]
    if design == "pool1x1":
        return conv_bn(widths[0], widths[-1], 1)
    k = 3 if design == "conv3x3" else 1
    return sum(conv_bn(a, b, k) for a, b in zip(widths, widths[1:]))


def tiny(arrangement: str = "ABC", **kwargs) -> TorchvisionExperts:
    torch.manual_seed(0)
    return build_expert_resnet(num_classes=CLASSES, backbone="resnet50", arrangement=arrangement, **kwargs)


# ---- parameter counts ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(TV_BACKBONES))
def test_plain_single_expert_has_torchvisions_exact_parameter_count(name):
    with torch.device("meta"):  # shapes only: counting needs no initialised weights
        ours = build_expert_resnet(num_classes=1000, experts=1, dkf=False, head="linear", retrain_head=False,
                                   backbone=name)
        reference = tv_model(name, num_classes=1000)
    assert n_params(ours) == n_params(reference)  # 25,557,032 / 25,028,904 / 60,192,808
    assert ours.inference_parameter_count() == n_params(reference)
    assert not ours.dkf_sources and len(ours.aligners) == 0


def test_reference_anchor_counts_resnet50_abc():
    """large-scale-lt.md 3.1 and 3.3: R50 = 25,557,032; ABC with conv3x3 aligners and cosine heads, 1,000 classes,
    one head set = 126.84 M; pool1x1 = 63.26 M. Built up here from torchvision's modules and the aligner formulas."""
    with torch.device("meta"):
        r50 = tv_model("resnet50")
    assert n_params(r50) == 25_557_032
    trunk = n_params(r50) - n_params(r50.layer4) - n_params(r50.fc)
    assert trunk == 8_543_296
    for design, millions in (("conv3x3", 126.84), ("pool1x1", 63.26)):
        expected = (trunk + 3 * n_params(r50.layer4) + 3 * 2048 * 1000
                    + sum(aligner_params(design, d) for d in (1, 2, 3)))
        with torch.device("meta"):
            model = build_expert_resnet(num_classes=1000, backbone="resnet50", arrangement="ABC", dkf_align=design,
                                        retrain_head=False)
        assert n_params(model) == expected
        assert round(expected / 1e6, 2) == millions


@pytest.mark.parametrize("design", ["conv3x3", "chain1x1", "pool1x1"])
def test_aligner_counts_relu_pattern_and_shapes(design):
    maps = {1: (256, 16), 2: (512, 8), 3: (1024, 4)}  # at 64x64 input
    relus = {1: [True, False, True], 2: [True, False], 3: [True]}  # official rule: ReLU after conv k iff k != 1
    for depth, (channels, side) in maps.items():
        aligner = make_aligner(design, WIDTHS[depth - 1:])
        assert n_params(aligner) == aligner_params(design, depth)
        out = aligner(torch.randn(2, channels, side, side))
        assert out.shape == (2, 2048, 2, 2)
        pattern = [isinstance(nxt, nn.ReLU) for m, nxt in zip(aligner, [*aligner][1:] + [None])
                   if isinstance(m, nn.BatchNorm2d)]
        assert pattern == (relus[depth] if design != "pool1x1" else [True])
    assert all(isinstance(m, nn.ReLU) for m in make_aligner(design, WIDTHS, "all") if not isinstance(
        m, (nn.Conv2d, nn.BatchNorm2d, nn.AvgPool2d)))


# ---- arrangements and DKF -----------------------------------------------------------------------------------------

@pytest.mark.slow  # ten ResNet-50 MoE steps, ~2 s each on a CPU: the slow lane (the fast lane stays < 2 min)
@pytest.mark.parametrize("arrangement", TABLE5_ARRANGEMENTS)
def test_table5_arrangement_builds_and_trains(arrangement):
    """The string sets the expert count and each expert's source; forward/backward reach every expert's stage and
    aligner (pool1x1 aligners keep this fast; the conv3x3 default is exercised below)."""
    model = tiny(arrangement, dkf_align="pool1x1")
    letters = {"A": 1, "B": 2, "C": 3}
    assert model.num_experts == len(arrangement) == len(model.expert_stages) == len(model.aligners)
    assert model.dkf_sources == tuple(letters[c] for c in arrangement)
    assert model.architecture()["arrangement"] == arrangement
    out = model(torch.randn(*X64))
    assert out.expert_logits.shape == (len(arrangement), 1, CLASSES) and out.features.shape[-1] == 2048
    out.logits.sum().backward()
    for stage, aligner in zip(model.expert_stages, model.aligners):
        assert stage[0][0].conv1.weight.grad.abs().sum() > 0
        assert next(aligner.parameters()).grad.abs().sum() > 0


def test_dkf_is_the_hadamard_product_of_layer4_and_the_aligned_map():
    model = tiny("ABC").eval()  # the default conv3x3 aligners
    x = torch.randn(*X64)
    with torch.no_grad():
        out = model(x)
        shared = model._trunk(x)
        assert [tuple(s.shape[1:]) for s in shared] == [(256, 16, 16), (512, 8, 8), (1024, 4, 4)]
        for m in range(3):
            deep = model.expert_stages[m](shared[-1])
            aligned = model.aligners[m](shared[m])
            assert deep.shape == aligned.shape == (1, 2048, 2, 2)
            torch.testing.assert_close(out.features[m], (deep * aligned).mean(dim=(2, 3)))


def test_without_dkf_the_arrangement_only_counts_experts_and_experts_start_different():
    model = tiny("AB", dkf=False)
    assert model.num_experts == 2 and not model.dkf_sources and len(model.aligners) == 0
    first, second = (s[0][0].conv1.weight for s in model.expert_stages)
    assert not torch.equal(first, second)  # independent initialisation, not copies


def test_bad_arrangements_and_switches_are_one_line_errors():
    with pytest.raises(HarnessError, match="letter"):
        parse_arrangement("ABD")
    with pytest.raises(HarnessError, match="C"):  # split at layer3: only A and B are shared
        build_expert_resnet(num_classes=CLASSES, backbone="resnet50", arrangement="AC", split="layer3")
    with pytest.raises(HarnessError, match="known: resnet32"):
        build_expert_resnet(num_classes=CLASSES, backbone="resnet51")
    with pytest.raises(HarnessError, match="torchvision backbones only"):
        build_expert_resnet(num_classes=CLASSES, pretrained="x.pth")
    with pytest.raises(HarnessError, match="dkf_align"):
        make_aligner("conv5x5", WIDTHS)


def test_split_at_layer3_gives_each_expert_layer3_and_layer4():
    model = tiny("AB", split="layer3", dkf_align="pool1x1")
    r50 = tv_model("resnet50")
    assert len(model.shared) == 2
    assert [n_params(s) for s in model.expert_stages] == [n_params(r50.layer3) + n_params(r50.layer4)] * 2
    assert model(torch.randn(*X64)).expert_logits.shape == (2, 1, CLASSES)


# ---- resnet32 stays the CIFAR model -------------------------------------------------------------------------------

def test_resnet32_backbone_is_the_cifar_model_bit_for_bit():
    torch.manual_seed(0)
    default = build_expert_resnet(num_classes=10, depth=8)
    torch.manual_seed(0)
    named = build_expert_resnet(num_classes=10, depth=8, backbone="resnet32", arrangement="ACA")  # = (1, 2, 1)
    assert set(BACKBONES) == {"resnet32", *TV_BACKBONES}
    assert named.dkf_sources == (1, 2, 1)
    for (k, a), (_, b) in zip(default.state_dict().items(), named.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(HarnessError, match="letter.s. B not among"):
        build_expert_resnet(num_classes=10, depth=8, arrangement="AB")  # Table 5's B has no ResNet-32 stage


# ---- pretrained weights and the frozen trunk ----------------------------------------------------------------------

def test_pretrained_state_dict_fills_the_trunk_and_every_expert_and_matches_torchvisions_forward(tmp_path):
    torch.manual_seed(1)
    reference = tv_model("resnet50", num_classes=CLASSES).eval()
    state = reference.state_dict()
    path = tmp_path / "r50.pth"
    torch.save(state, path)
    model = tiny("AB", pretrained=str(path), head="linear", dkf=False).eval()
    stem = model.stem.state_dict()
    assert torch.equal(stem["0.weight"], state["conv1.weight"]) and torch.equal(stem["1.running_var"],
                                                                                 state["bn1.running_var"])
    for i, stage in enumerate(model.shared, start=1):
        for key, value in stage.state_dict().items():
            assert torch.equal(value, state[f"layer{i}.{key}"]), key
    for expert in model.expert_stages:
        for key, value in expert[0].state_dict().items():
            assert torch.equal(value, state[f"layer4.{key}"]), key
    # with torchvision's own fc as every head, the experts' mean computes torchvision's forward exactly
    for head in model.heads:
        head.load_state_dict({"weight": state["fc.weight"], "bias": state["fc.bias"]})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, reference(x))


def test_pretrained_errors_are_one_line(tmp_path, monkeypatch):
    import urllib.error

    bad = tmp_path / "resnet50-deadbeef.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(HarnessError, match="does not match"):  # torchvision names carry a SHA-256 prefix
        build_expert_resnet(num_classes=CLASSES, backbone="resnet50", experts=1, pretrained=str(bad))
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, wrong)
    with pytest.raises(HarnessError, match="does not fit"):
        build_expert_resnet(num_classes=CLASSES, backbone="resnet50", experts=1, pretrained=str(wrong))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(HarnessError, match="could not download") as error:
        build_expert_resnet(num_classes=CLASSES, backbone="resnet50", experts=1, pretrained="torchvision")
    assert "\n" not in str(error.value) and "resnet50-0676ba61.pth" in str(error.value)


def test_frozen_trunk_gets_no_gradients_and_keeps_its_bn_statistics():
    model = tiny("ABC", freeze="trunk", dkf_align="pool1x1")
    groups = model.parameter_groups()
    trunk_ids = {id(p) for p in groups["trunk"]}
    assert trunk_ids == {id(p) for p in [*model.stem.parameters(), *model.shared.parameters()]}
    assert not trunk_ids & {id(p) for p in groups["backbone"]}
    assert model.inference_parameter_count() == sum(p.numel() for g in ("trunk", "backbone", "retrain_head")
                                                    for p in groups[g])
    model.train()
    assert not model.shared[0][0].bn1.training and model.expert_stages[0][0][0].bn1.training
    before = model.shared[2][0].bn1.running_mean.clone()
    expert_before = model.expert_stages[0][0][0].bn1.running_mean.clone()
    model(torch.randn(2, 3, 64, 64)).logits.sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in groups["trunk"])
    assert all(p.grad is not None for p in groups["backbone"])
    assert torch.equal(model.shared[2][0].bn1.running_mean, before)
    assert not torch.equal(model.expert_stages[0][0][0].bn1.running_mean, expert_before)


# ---- every builder's backbone switch ------------------------------------------------------------------------------

# The builders whose network is `build_expert_resnet` (branches is the CIFAR Figure 1 probe, its own model).
NET_BUILDERS = ("shike", "plain", "ce", "bsce", "la", "focal", "cb", "ldam-drw", "lade", "gcl", "wb", "crt", "lws",
                "disalign", "balms-sampler-free", "tau-norm", "ncm", "la-posthoc", "ncl")


@pytest.mark.parametrize("name", NET_BUILDERS)
def test_every_builder_builds_on_resnet50(name):
    kwargs = {"ncl": {"networks": 2}, "shike": {"dkf_align": "pool1x1"}}.get(name, {})
    spec = METHODS.get(name)(num_classes=CLASSES, class_counts=(40, 20, 10, 5, 2), backbone="resnet50", **kwargs)
    nets = [m for m in spec.model.modules() if isinstance(m, TorchvisionExperts)]
    assert nets and all(net.backbone == "resnet50" for net in nets)
    assert isinstance(spec.model, LTModel)
    for stage in spec.stages:
        assert set(stage.trainable) <= set(spec.model.parameter_groups())


def test_shike_arrangement_sets_experts_and_mutual_distillation():
    one = METHODS.get("shike")(num_classes=CLASSES, class_counts=(4, 3, 2, 2, 1), backbone="resnet50",
                               arrangement="C", dkf_align="pool1x1")
    two = METHODS.get("shike")(num_classes=CLASSES, class_counts=(4, 3, 2, 2, 1), backbone="resnet50",
                               arrangement="BC", dkf_align="pool1x1")
    assert one.model.num_experts == 1 and [t.name for t in one.stages[0].losses] == ["ce", "nt"]
    assert two.model.num_experts == 2 and [t.name for t in two.stages[0].losses] == ["ce", "nt", "mu"]


# ---- harness describe ---------------------------------------------------------------------------------------------

def test_describe_resnet50_prints_torchvisions_count_and_flops_at_224(capsys):
    from harness.cli import main

    code = main(["describe", "plain", "--num-classes", "1000", "--set", "method.backbone=resnet50", "--set",
                 "method.head=linear", "--json"])
    out = capsys.readouterr()
    assert code == 0, out.err
    facts = json.loads(out.out)
    reference = tv_model("resnet50").eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        reference(torch.randn(1, 3, 224, 224))
    assert facts["parameters_inference"] == 25_557_032 and facts["input_shape"] == [3, 224, 224]
    assert facts["forward_flops_per_image"] == counter.get_total_flops()  # 2 x 4.09 GMAC
    assert facts["architecture"]["backbone"] == "resnet50"
