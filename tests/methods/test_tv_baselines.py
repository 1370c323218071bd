"""RIDE, TLC, ResLT and BBN on torchvision's ResNet-50 family (`methods/models/tv_experts.py`, `reslt_resnet.py`,
`bbn_resnet.py`): exact parameter counts against torchvision's own modules, conv/BN formulas written here and the
RIDE numbers of large-scale-lt.md 3.2; one training step of each method's loss on CPU (2 images per view, 64x64,
10 classes); the frozen trunk through the trainer's own `enter_stage`; pretrained torchvision weights in the trunk;
`harness describe` on ImageNet-LT. Expected values never come from the code under test."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from cli_support import run_cli
from torch import nn

from harness.config import resolve_config
from harness.errors import HarnessError
from harness.method import ModelOutput
from harness.methods.models.ride_resnet import RoutedOutput
from harness.registry import METHODS
from harness.trainer import enter_stage

# ResNet-50-sized models: seconds each on a CPU, so the whole module is in the slow lane (the fast lane stays < 2 min)
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]

METHOD_NAMES = ("ride", "tlc", "reslt", "bbn")
CLASSES = 10
COUNTS = (40, 30, 20, 15, 10, 8, 6, 4, 3, 2)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def conv_bn(cin: int, cout: int, k: int = 1, groups: int = 1) -> int:
    return cin * cout * k * k // groups + 2 * cout  # conv without bias, BN weight + bias


def bottleneck(cin: int, planes: int, project: bool) -> int:
    """A ResNet-50 v1.5 bottleneck (groups 1): 1x1 cin -> planes, 3x3 planes -> planes, 1x1 planes -> 4 planes,
    each with BN, plus the 1x1 projection + BN of a stage's first block."""
    out = 4 * planes
    return conv_bn(cin, planes) + conv_bn(planes, planes, 3) + conv_bn(planes, out) + (conv_bn(cin, out) if project
                                                                                        else 0)


def stage(cin: int, planes: int, blocks: int) -> int:
    return bottleneck(cin, planes, True) + (blocks - 1) * bottleneck(4 * planes, planes, False)


SMALL = {"ride": {"experts": 2}, "tlc": {"experts": 2}}  # fewer experts where their number is not the point


def build(name: str, num_classes: int = CLASSES, counts: tuple[int, ...] = COUNTS, **switches):
    torch.manual_seed(0)
    return METHODS.get(name)(num_classes=num_classes, class_counts=counts, backbone="resnet50", **switches)


@pytest.fixture(scope="module")
def resnet50() -> torchvision.models.ResNet:
    return torchvision.models.resnet50(weights=None)


# ---- exact parameter counts, 1,000 classes --------------------------------------------------------------------

THOUSAND = tuple(range(1000, 0, -1))


def test_ride_resnet50_counts_are_the_reference_numbers(resnet50):
    model = build("ride", 1000, THOUSAND).model
    shared = n_params(model.stem) + n_params(model.shared_stages)
    layer3, layer4 = (n_params(s) for s in model.expert_stages[0])
    # large-scale-lt.md 3.2, and the same from torchvision's modules and the bottleneck formula
    assert shared == 1_444_928 == sum(n_params(getattr(resnet50, m)) for m in ("conv1", "bn1", "layer1", "layer2"))
    assert layer3 == 4_119_552 == stage(512, 192, 6) and layer4 == 8_421_888 == stage(768, 384, 3)
    assert n_params(model.heads[0]) == 1_536_000 == 1536 * 1000  # cosine head, no bias
    assert n_params(model) == 43_677_248 == shared + 3 * (layer3 + layer4 + 1536 * 1000)
    assert model.inference_parameter_count() == 43_677_248
    full = build("ride", 1000, THOUSAND, reduce_dimension=False).model
    expert = n_params(resnet50.layer3) + n_params(resnet50.layer4) + 2048 * 1000
    assert n_params(full) == 73_778_240 == shared + 3 * expert
    assert stage(512, 256, 6) == n_params(resnet50.layer3)  # the formula is torchvision's own count at full width


def test_tlc_resnet50_three_experts_own_layer4(resnet50):
    model = build("tlc", 1000, THOUSAND, experts=3).model
    trunk = n_params(resnet50) - n_params(resnet50.fc) - n_params(resnet50.layer4)
    assert n_params(model.stem) + n_params(model.shared_stages) == trunk == 8_543_296  # reference 3.1
    assert n_params(model) == trunk + 3 * (n_params(resnet50.layer4) + 2048 * 1000) == 59_581_504


def test_reslt_resnet50_adds_the_branch_block_and_one_head(resnet50):
    model = build("reslt", 1000, THOUSAND).model
    branch_block = conv_bn(2048, 3 * 2048)  # 1x1 conv D -> 3D without bias, BN
    expected = n_params(resnet50) - n_params(resnet50.fc) + branch_block + (2048 * 1000 + 1000)
    assert n_params(model) == expected == 38_152_232


def test_bbn_resnet50_duplicates_layer4s_last_bottleneck(resnet50):
    model = build("bbn", 1000, THOUSAND).model
    last = n_params(resnet50.layer4[-1])
    assert last == bottleneck(2048, 512, False)
    expected = n_params(resnet50) - n_params(resnet50.fc) + last + (4096 * 1000 + 1000)
    assert n_params(model) == expected == 32_067_624
    assert n_params(model.cb_block) == n_params(model.rb_block) == last


def test_resnext50_experts_keep_32_groups_of_width_4():
    """RIDE's `RIDEResNeXt.py` narrows RX-50's planes exactly as ResNet-50's: the bottleneck width is
    int(planes * 4 / 64) * 32, so layer3's 192 planes give 384-wide grouped 3x3 convs."""
    torch.manual_seed(0)
    model = METHODS.get("ride")(num_classes=CLASSES, class_counts=COUNTS, backbone="resnext50_32x4d", experts=1).model
    conv2 = model.expert_stages[0][0][0].conv2
    assert (conv2.groups, conv2.in_channels, model.feature_dim) == (32, 384, 1536)


# ---- one training step of each method's loss ---------------------------------------------------------------------

@pytest.mark.parametrize("name", METHOD_NAMES)
def test_training_loss_steps_on_resnet50_with_the_cifar_contract(name):
    spec = build(name, **({"experts": 3} if name == "tlc" else {}))  # TLC's ImageNet-LT config: 3 experts
    stage = spec.stages[0]
    views = 1 + len(stage.views)  # BBN draws a second, reversed batch: [uniform; reversed] stacked
    x, y = torch.randn(2 * views, 3, 64, 64), torch.tensor([0, 9] * views)
    spec.model.train()
    out = spec.model(x)
    experts = {"ride": 3, "tlc": 3, "reslt": 3, "bbn": 1}[name]
    assert type(out) is (RoutedOutput if name == "ride" else ModelOutput)
    assert out.logits.shape == (2, CLASSES) and out.expert_logits.shape == (experts, 2, CLASSES)
    loss = sum(t.weight * t.fn(out, y) for t in stage.losses)
    assert torch.isfinite(loss)
    loss.backward()
    groups = spec.model.parameter_groups()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for g in stage.trainable for p in groups[g])
    spec.model.eval()
    with torch.no_grad():
        assert spec.model(x[:2]).logits.shape == (2, CLASSES)


def test_ride_router_and_routed_inference_on_resnet50():
    spec = build("ride", router=True, router_top=5)
    model, router_stage = spec.model, spec.stages[1]
    model.train()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.router_logits.shape == (2, 2)  # (K - 1, B); the router reads the experts' 1,536-d features
    assert torch.isfinite(router_stage.losses[0].fn(out, torch.tensor([1, 2])))
    assert router_stage.trainable == ("router",) and model.router.hidden[0].in_features == 1536
    model.eval().reset_routing()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert int(model.experts_used.sum()) == 2


def test_ride_teacher_is_a_saved_torchvision_ride(tmp_path):
    teacher = build("ride", experts=1).model
    path = tmp_path / "teacher.pt"
    torch.save(teacher.state_dict(), path)
    spec = build("ride", experts=2, teacher=str(path))
    assert spec.model.teacher.num_experts == 1 and [t.name for t in spec.stages[0].losses] == ["ride", "distill"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(spec.model.train()(x).teacher_logits, teacher.eval()(x).logits)
    with pytest.raises(HarnessError, match="not a RIDE model state dict"):
        METHODS.get("ride")(num_classes=5, class_counts=COUNTS[:5], backbone="resnet50", teacher=str(path))


# ---- the frozen trunk --------------------------------------------------------------------------------------------

def trunk_of(name: str, model: nn.Module) -> list[nn.Module]:
    """The shared part by each official model's split: RIDE stem-layer2, TLC stem-layer3, ResLT the whole ResNet,
    BBN all but layer4's last bottleneck."""
    if name in ("ride", "tlc"):
        return [model.stem, model.shared_stages]
    return [model.trunk] if name == "reslt" else [model.shared]


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_frozen_trunk_is_in_no_trained_group_and_unchanged_by_a_step(name):
    spec = build(name, freeze="trunk", **SMALL.get(name, {}))
    model, stage = spec.model, spec.stages[0]
    trunk = [p for m in trunk_of(name, model) for p in m.parameters()]
    optimizer = enter_stage(spec, stage, resolve_config(name, device="cpu"))  # the trainer's own rule
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not trained & {id(p) for p in trunk}
    assert {id(p) for p in model.parameter_groups()["trunk"]} == {id(p) for p in trunk}
    before = {k: v.clone() for m in trunk_of(name, model) for k, v in m.state_dict().items()}
    owned = [p for p in model.parameters() if id(p) in trained]
    owned_before = [p.detach().clone() for p in owned]
    views = 1 + len(stage.views)
    model.train()
    assert not any(m.training for t in trunk_of(name, model) for m in t.modules())  # BN statistics stay fixed
    out = model(torch.randn(2 * views, 3, 64, 64))
    sum(t.weight * t.fn(out, torch.tensor([0, 9] * views)) for t in stage.losses).backward()
    optimizer.step()
    after = {k: v for m in trunk_of(name, model) for k, v in m.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and running statistics
    assert all(p.grad is None for p in trunk)
    assert any(not torch.equal(a, p) for a, p in zip(owned_before, owned))


# ---- pretrained weights and the CIFAR-only switches --------------------------------------------------------------

@pytest.fixture(scope="module")
def pretrained_path(tmp_path_factory):
    torch.manual_seed(1)
    state = torchvision.models.resnet50(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "r50.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_pretrained_state_dict_fills_the_trunk(name, pretrained_path):
    path, state = pretrained_path
    model = build(name, pretrained=str(path), **SMALL.get(name, {})).model
    trunk = nn.Sequential(*trunk_of(name, model)).state_dict()
    stem_conv = next(v for k, v in trunk.items() if k.endswith("weight") and v.shape == (64, 3, 7, 7))
    assert torch.equal(stem_conv, state["conv1.weight"])
    layer1 = next(m for m in model.modules() if isinstance(m, nn.Sequential) and len(m) == 3
                  and isinstance(m[0], torchvision.models.resnet.Bottleneck) and m[0].conv1.in_channels == 64)
    assert torch.equal(layer1[0].bn1.running_var, state["layer1.0.bn1.running_var"])
    assert model.architecture()["pretrained"] == str(path)


def test_pretrained_copies_full_width_expert_stages_and_branches(pretrained_path):
    path, state = pretrained_path
    tlc = build("tlc", pretrained=str(path), experts=2).model
    for expert in tlc.expert_stages:  # each expert's layer4 starts as the pretrained layer4
        assert torch.equal(expert[0][2].conv3.weight, state["layer4.2.conv3.weight"])
    bbn = build("bbn", pretrained=str(path)).model
    for branch in (bbn.cb_block, bbn.rb_block):
        assert torch.equal(branch.conv2.weight, state["layer4.2.conv2.weight"])
    ride = build("ride", pretrained=str(path), experts=1).model  # 192 / 384 planes: nothing to copy, trunk only
    assert torch.equal(ride.shared_stages[1][0].conv1.weight, state["layer2.0.conv1.weight"])


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_cifar_network_refuses_torchvision_switches_and_unknown_backbones(name):
    with pytest.raises(HarnessError, match="torchvision backbones only") as error:
        METHODS.get(name)(num_classes=CLASSES, class_counts=COUNTS, freeze="trunk")
    assert "\n" not in str(error.value)
    with pytest.raises(HarnessError, match="unknown backbone 'resnet18'; known: resnet32, resnet50"):
        METHODS.get(name)(num_classes=CLASSES, class_counts=COUNTS, backbone="resnet18")


# ---- harness describe ------------------------------------------------------------------------------------------

def test_describe_ride_on_imagenetlt_prints_the_reference_count(capsys):
    code, out, err = run_cli(["describe", "ride", "--dataset", "imagenetlt", "--set", "method.backbone=resnet50",
                              "--json"], capsys)
    assert code == 0, err
    facts = json.loads(out)
    assert facts["num_classes"] == 1000 and facts["input_shape"] == [3, 224, 224]
    assert facts["parameters_total"] == facts["parameters_inference"] == 43_677_248
    assert facts["architecture"]["widths"] == "768,1536"
    assert facts["forward_flops_per_image"] == 11_540_865_024  # 5.77 GMAC x 2 (large-scale-lt.md 3.2)
