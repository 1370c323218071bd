"""PaCo and BCL on the torchvision backbones (issue 14) and their official views (issue 13): inference parameter
counts on ImageNet-LT-sized heads against torchvision's own ResNet-50, the projection sizes per backbone, a
two-view forward / backward on ResNet-50, and the `views` switch."""

from __future__ import annotations

import pytest
import torch
import torchvision

from harness.errors import HarnessError
from harness.method import View
from harness.methods.bcl import mlp_dims_for
from harness.methods.paco import projection_dim_for
from harness.registry import METHODS

IMAGENET = (20,) * 500 + (5,) * 500  # 1,000 classes
# ResNet-50-sized models: seconds each on a CPU, so the whole module is in the slow lane (the fast lane stays < 2 min)
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]


def mlp_parameters(width: int, hidden: int, out: int) -> int:
    """Linear(width, hidden) + BatchNorm1d(hidden) (weight, bias) + Linear(hidden, out)."""
    return (width * hidden + hidden) + 2 * hidden + (hidden * out + out)


def test_paco_on_resnet50_infers_with_exactly_torchvisions_resnet50():
    expected = sum(p.numel() for p in torchvision.models.resnet50(weights=None).parameters())
    model = METHODS.get("paco")(num_classes=1000, class_counts=IMAGENET, backbone="resnet50").model
    assert model.inference_parameter_count() == expected == 25_557_032
    projection = mlp_parameters(2048, 2048, 128)  # paco_lt.py: 2048 -> 2048 -> moco-dim 128
    assert sum(p.numel() for p in model.parameter_groups()["contrastive"]) == projection
    assert sum(p.numel() for p in model.parameters()) == 2 * (expected + projection)  # + the momentum copy
    assert model.queue.features.shape == (1024, 128)  # 1024 keys (share 0.1 of 12,500 images caps at 1,250)


def test_bcl_on_resnet50_has_imagenet_mlps_and_a_torchvision_trunk():
    expected = sum(p.numel() for p in torchvision.models.resnet50(weights=None).parameters())
    model = METHODS.get("bcl")(num_classes=1000, class_counts=IMAGENET, backbone="resnet50").model
    # a cosine head stores (2048, 1000) weights and no bias: torchvision's count less the fc bias
    assert model.inference_parameter_count() == expected - 1000
    assert sum(p.numel() for p in model.parameter_groups()["contrastive"]) == 2 * mlp_parameters(2048, 2048, 1024)


def test_projection_sizes_follow_the_backbone_unless_set():
    assert projection_dim_for("resnet32", 0) == 32 and projection_dim_for("resnet50", 0) == 128
    assert projection_dim_for("resnext50_32x4d", 0) == projection_dim_for("resnet152", 0) == 128
    assert projection_dim_for("resnet50", 64) == 64
    assert mlp_dims_for("resnet32", 0, 0) == (512, 128) and mlp_dims_for("resnet50", 0, 0) == (None, 1024)
    assert mlp_dims_for("resnet50", 256, 64) == (256, 64)
    with pytest.raises(HarnessError, match="projection_dim"):
        projection_dim_for("resnet50", -1)


@pytest.mark.parametrize("name", ["paco", "bcl"])
def test_two_views_of_two_images_train_a_resnet50_step_on_cpu(name):
    torch.manual_seed(0)
    kwargs = {"num_views": 2} if name == "bcl" else {}
    spec = METHODS.get(name)(num_classes=10, class_counts=(5,) * 10, backbone="resnet50", **kwargs)
    model = spec.model.train()
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([1, 3, 1, 3])
    out = model(x)
    loss = sum(term.weight * term.fn(out, y) for term in spec.stages[0].losses)
    loss.backward()
    assert torch.isfinite(loss)
    trained = [p for g in ("backbone", "head", "contrastive") for p in model.parameter_groups()[g]]
    assert all(p.grad is not None for p in trained if p.requires_grad)


def test_pretrained_and_freeze_reach_the_network():
    model = METHODS.get("paco")(num_classes=10, class_counts=(5,) * 10, backbone="resnet50", freeze="trunk").model
    groups = model.parameter_groups()
    assert groups["trunk"] and all(not p.requires_grad for p in groups["trunk"])
    with pytest.raises(HarnessError):
        METHODS.get("bcl")(num_classes=10, class_counts=(5,) * 10, backbone="resnet50", pretrained="/no/such.pth")


def test_the_official_views_are_the_sim_pipeline_and_same_keeps_the_old_behaviour():
    counts = (40, 20, 10, 5)
    build = lambda name, **kw: METHODS.get(name)(num_classes=4, class_counts=counts, depth=8, **kw)  # noqa: E731
    assert build("paco").stages[0].views == (View(augment="sim"),)
    assert build("paco", views="same").stages[0].views == (View(),)
    assert build("bcl").stages[0].views == (View(augment="sim"),) * 2  # three views: CE on 0, contrast on 1-2
    assert build("bcl", views="same", num_views=2).stages[0].views == (View(),)
    assert build("bcl").model.views == 3
    with pytest.raises(HarnessError, match="method.views"):
        build("paco", views="sims")
