"""BBN (Zhou et al., CVPR 2020): the bilateral-branch model on two stacked views, its loss against a float64 hand
computation, the cumulative-learning weight shared by model and loss, the official recipe, and short Trainer runs
on both feeders (finite losses, resume to the same weights). Expected values are computed here from the paper's
equations and the official code's structure, not read back from the code under test."""

from __future__ import annotations

from bisect import bisect_right

import pytest
import torch

from harness.config import resolve_config
from harness.data import Split
from harness.datasets.augment import batched_pipeline, per_image_pipeline
from harness.feeders import DeviceFeeder, ReferenceFeeder
from harness.hooks import Hook
from harness.method import ModelOutput, View
from harness.methods.bbn import BBNLoss
from harness.methods.models.bbn_resnet import BBNResNet
from harness.registry import METHODS
from harness.schedules import stage_lr
from harness.trainer import Trainer

COUNTS = (24, 12, 6, 3)
CPU = torch.device("cpu")
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(num_classes: int = 4, **kwargs) -> BBNResNet:
    torch.manual_seed(0)
    return METHODS.get("bbn")(num_classes=num_classes, class_counts=(10,) * num_classes, depth=8, **kwargs).model


# ---- structure and parameter count ------------------------------------------------------------------------------

def conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k


def block(cin: int, cout: int, shortcut: str) -> int:
    """A CIFAR BasicBlock: two 3x3 convs with BN (weight + bias), plus a 1x1 conv + BN projection when the shape
    changes under option B (option A zero-pads: no parameters)."""
    projection = conv(cin, cout, 1) + 2 * cout if cin != cout and shortcut == "B" else 0
    return conv(cin, cout, 3) + conv(cout, cout, 3) + 4 * cout + projection


def bbn_parameters(num_classes: int, depth: int, shortcut: str) -> int:
    """BBN_ResNet_Cifar + its FC: the stem, three stages of n blocks (16, 32, 64 wide), one more copy of the last
    block (the two branches are layer3's last block twice), and a linear classifier (bias) on 2 x 64 features."""
    n = (depth - 2) // 6
    stem = conv(3, 16, 3) + 2 * 16
    stages = sum(block(cin, cout, shortcut) + (n - 1) * block(cout, cout, shortcut)
                 for cin, cout in ((16, 16), (16, 32), (32, 64)))
    last = block(32, 64, shortcut) if n == 1 else block(64, 64, shortcut)
    return stem + stages + last + 128 * num_classes + num_classes


@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_bbn_resnet32_parameters_match_an_independent_count(num_classes, shortcut):
    spec = METHODS.get("bbn")(num_classes=num_classes, class_counts=(5,) * num_classes, shortcut=shortcut)
    model = spec.model
    assert sum(p.numel() for p in model.parameters()) == bbn_parameters(num_classes, 32, shortcut)
    assert model.inference_parameter_count() == bbn_parameters(num_classes, 32, shortcut)
    groups = model.parameter_groups()
    assert sum(p.numel() for p in groups["head"]) == 128 * num_classes + num_classes
    assert {id(p) for p in groups["backbone"]} | {id(p) for p in groups["head"]} == {id(p) for p in model.parameters()}
    assert len(model.layer3) == 4 and model.classifiers() == [model.classifier]
    model.eval()
    assert model(torch.randn(3, 3, 32, 32)).logits.shape == (3, num_classes)


def test_the_cifar100_counts_stated_in_the_docs():
    # ResNet-32 with a 64 -> 100 linear head is 472,756 (test_methods); BBN adds one 64-wide block (73,984) and
    # doubles the classifier's input (12,900 instead of 6,500)
    assert bbn_parameters(100, 32, "B") == 553_140 == 472_756 + 73_984 - 6_500 + 12_900
    assert bbn_parameters(100, 32, "A") == 550_388


def test_depth_8_duplicates_layer3s_only_block_into_the_branches():
    model = tiny()
    assert len(model.layer3) == 0 and model.cb_block.conv1.stride == (2, 2) and model.cb_block.conv1.in_channels == 32
    assert sum(p.numel() for p in model.parameters()) == bbn_parameters(4, 8, "B")
    assert model.architecture() == {"depth": 8, "experts": 1, "dkf": False, "dkf_sources": "none",
                                    "head": "LinearHead", "branches": "cb,rb"}


# ---- forward ------------------------------------------------------------------------------------------------------

def test_training_forward_uses_each_branch_on_its_own_half():
    model = tiny().train()
    model.start_epoch(3, 8)  # alpha = 1 - (3/8)^2 = 55/64
    x = torch.randn(6, 3, 32, 32)
    out = model(x)
    assert out.logits.shape == (3, 4) and out.expert_logits.shape == (1, 3, 4) and out.features.shape == (1, 3, 128)
    f_c, f_r = model.branch_features(x)
    alpha = 55 / 64
    expected = torch.cat((2 * alpha * f_c, 2 * (1 - alpha) * f_r), dim=1) @ model.classifier.weight.T
    assert torch.allclose(out.logits, expected + model.classifier.bias, atol=1e-5)

    second = x.clone()
    second[3:] += 1.0  # only the reversed half changes: only the re-balancing branch may see it
    g_c, g_r = model.branch_features(second)
    assert torch.equal(g_c, f_c) and not torch.allclose(g_r, f_r)
    first = x.clone()
    first[:3] += 1.0
    h_c, h_r = model.branch_features(first)
    assert not torch.allclose(h_c, f_c) and torch.equal(h_r, f_r)


def test_training_refuses_a_single_view_batch():
    with pytest.raises(ValueError, match="two stacked views"):
        tiny().train()(torch.randn(3, 3, 32, 32))


def test_eval_forward_is_the_mixture_at_one_half_whatever_the_epoch():
    model = tiny()
    model.start_epoch(7, 8)
    model.eval()
    x = torch.randn(5, 3, 32, 32)
    out = model(x)
    with torch.no_grad():
        shared = model.layer3(model.layer2(model.layer1(model.stem(x))))
        f_c, f_r = model.cb_block(shared).mean(dim=(2, 3)), model.rb_block(shared).mean(dim=(2, 3))
        weight, bias = model.classifier.weight, model.classifier.bias
        # the official test: the classifier on [f_c ; f_r]; the same as 2 [1/2 f_c ; 1/2 f_r]
        official = f_c @ weight[:, :64].T + f_r @ weight[:, 64:].T + bias
    assert torch.allclose(out.logits, official, atol=1e-5)
    assert torch.allclose(out.features[0], torch.cat((f_c, f_r), dim=1))
    model.start_epoch(0, 8)
    assert torch.equal(model(x).logits, out.logits)


# ---- loss and cumulative learning ---------------------------------------------------------------------------------

def hand_ce(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over the batch of -log(exp z_y / sum_c exp z_c), term by term in float64."""
    rows = [-(row[y] - row.exp().sum().log()).item() for row, y in zip(logits.double(), target.tolist())]
    return sum(rows) / len(rows)


def test_loss_equals_a_float64_hand_computation():
    torch.manual_seed(1)
    logits = torch.randn(6, 5, dtype=torch.float64) * 3
    y_c, y_r = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([4, 4, 3, 2, 1, 3])
    loss = BBNLoss()
    loss.start_epoch(3, 8)
    alpha = 1 - (3 / 8) ** 2  # 55/64, exact in float32
    out = ModelOutput(logits=logits, expert_logits=logits[None])
    value = loss(out, torch.cat((y_c, y_r)))
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(alpha * hand_ce(logits, y_c) + (1 - alpha) * hand_ce(logits, y_r), rel=1e-12)
    loss.start_epoch(0, 8)  # alpha = 1: plain CE on the conventional stream (baselines.md section 22)
    assert loss(out, torch.cat((y_c, y_r))).item() == pytest.approx(hand_ce(logits, y_c), rel=1e-12)
    with pytest.raises(ValueError, match="two stacked views"):
        loss(out, y_c)


@pytest.mark.parametrize("epochs, divisor", [(2, 2), (8, 8), (200, 200), (180, 200), (90, 100), (100, 100)])
def test_model_and_loss_agree_on_alpha_every_epoch(epochs, divisor):
    model, loss = tiny(), BBNLoss()
    for epoch in range(epochs):
        model.start_epoch(epoch, epochs)
        loss.start_epoch(epoch, epochs)
        # Eq. 1 with the official 1-based epoch t = epoch + 1: 1 - ((t - 1) / T)^2, T rounded up for 90 / 180
        expected = 1 - (epoch / divisor) ** 2
        assert model.alpha.item() == loss.alpha.item() == pytest.approx(expected, abs=1e-7), epoch
    assert model.alpha.item() == pytest.approx(1 - ((epochs - 1) / divisor) ** 2)
    model.start_epoch(0, epochs)
    assert model.alpha.item() == 1.0


def test_round_divisor_off_uses_the_stage_length():
    spec = METHODS.get("bbn")(num_classes=4, class_counts=COUNTS, depth=8, round_divisor=False)
    spec.model.start_epoch(179, 180)
    spec.stages[0].losses[0].fn.start_epoch(179, 180)
    assert spec.model.alpha.item() == spec.stages[0].losses[0].fn.alpha.item() == pytest.approx(1 - (179 / 180) ** 2)


# ---- the method: stage and recipes --------------------------------------------------------------------------------

def test_the_stage_draws_a_reversed_second_view():
    stage = METHODS.get("bbn")(num_classes=4, class_counts=COUNTS, depth=8).stages[0]
    assert stage.views == (View(sampler="reversed"),) and stage.sampler == "instance" and stage.mixup == 0
    assert [t.name for t in stage.losses] == ["bbn"] and stage.trainable == ("backbone", "head")
    assert (stage.epochs, stage.peak_lr) == (200, 0.15)  # SHIKE's recipe by default


def test_own_recipe_is_the_official_cifar_config():
    cfg = resolve_config("bbn", preset="own")
    assert (cfg.optim.batch_size, cfg.optim.weight_decay, cfg.optim.lr, cfg.data.augment) == (128, 2e-4, 0.1, "basic")
    assert cfg.method_kwargs["recipe"] == "own" and cfg.method_kwargs["shortcut"] == "A"
    stage = METHODS.get("bbn")(num_classes=100, class_counts=(5,) * 100, **cfg.method_kwargs).stages[0]
    assert (stage.epochs, stage.peak_lr, stage.schedule, stage.warmup_epochs) == (200, 0.1, "step", 5)
    # WarmupMultiStepLR stepped at the start of each 1-based epoch t: lr = 0.1 * 0.01^(number of milestones <= t)
    for epoch in range(5, 200):
        official = 0.1 * 0.01 ** bisect_right([120, 160], epoch + 1)
        assert stage_lr(stage, "code", 0.1, epoch, 200) == pytest.approx(official, rel=1e-12), epoch
    assert stage_lr(stage, "code", 0.1, 4, 200) == pytest.approx(0.1)  # the warm-up ends at the peak


# ---- training with the real Trainer on both feeders ---------------------------------------------------------------

def toy_split() -> Split:
    labels = torch.repeat_interleave(torch.arange(4), torch.tensor(COUNTS))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (len(labels), 3, 32, 32), dtype=torch.uint8, generator=g)
    images[:, 0] = (labels * 60).to(torch.uint8)[:, None, None]
    return Split(images, labels)


def feeder(path: str, batch: int = 16):
    if path == "reference":
        return ReferenceFeeder(toy_split(), per_image_pipeline("basic", MEAN, STD), batch, CPU)
    return DeviceFeeder(toy_split(), batched_pipeline("basic", MEAN, STD), batch, CPU)


def build(epochs: int = 2, batch: int = 16):
    torch.manual_seed(0)
    cfg = resolve_config("bbn", device="cpu", overrides={"train.stage_epochs": str(epochs), "optim.batch_size": batch,
                                                         "method.depth": 8, "train.checkpoint_interval": 1})
    return cfg, METHODS.get("bbn")(num_classes=4, class_counts=COUNTS, **cfg.method_kwargs)


class Record(Hook):
    """After every epoch: the logged metrics and the alpha of the model and of the loss; stops after `stop`."""

    def __init__(self, stop: int | None = None) -> None:
        self.stop, self.seen = stop, []

    def after_epoch(self, trainer, epoch, metrics) -> None:
        term = trainer.spec.stages[0].losses[0].fn
        self.seen.append((epoch, metrics, trainer.spec.model.alpha.item(), term.alpha.item()))
        if self.stop is not None and epoch + 1 == self.stop:
            trainer.request_stop("test")


@pytest.mark.parametrize("path", ["reference", "device"])
def test_two_epochs_train_on_both_feeders_with_finite_losses(path):
    cfg, spec = build(epochs=2)
    record = Record()
    before = {k: v.clone() for k, v in spec.model.state_dict().items()}
    trainer = Trainer(spec, cfg, feeder(path), CPU, hooks=[record])
    trainer.fit()
    assert [(e, a, b) for e, _, a, b in record.seen] == [(0, 1.0, 1.0), (1, 0.75, 0.75)]  # 1 - (1/2)^2
    for _, metrics, _, _ in record.seen:
        assert torch.isfinite(torch.tensor(metrics["loss/bbn"])) and metrics["loss/total"] == metrics["loss/bbn"]
    assert trainer.images_trained == 2 * sum(COUNTS)
    after = spec.model.state_dict()
    for name in ("cb_block.conv1.weight", "rb_block.conv1.weight", "classifier.weight"):
        assert not torch.equal(before[name], after[name]), name  # both branches and the classifier trained


def test_resume_mid_run_reaches_the_same_weights(tmp_path):
    """Stopped after epoch 2 of 3 and resumed, on the device feeder: the same weights, BN statistics and alpha
    buffers as an uninterrupted run, bit for bit (the reversed draws and alpha are functions of the epoch)."""
    cfg, whole = build(epochs=3, batch=24)
    whole_trainer = Trainer(whole, cfg, feeder("device", batch=24), CPU)
    whole_trainer.fit()
    cfg, first = build(epochs=3, batch=24)
    Trainer(first, cfg, feeder("device", batch=24), CPU, tmp_path / "ck.pt", hooks=[Record(stop=2)]).fit()
    torch.manual_seed(123)  # a fresh process would not share the first one's RNG state
    cfg, resumed = build(epochs=3, batch=24)
    record = Record()
    resumed_trainer = Trainer(resumed, cfg, feeder("device", batch=24), CPU, tmp_path / "ck.pt", hooks=[record])
    resumed_trainer.fit(resume=True)
    assert [e for e, *_ in record.seen] == [2]
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert resumed.model.alpha.item() == pytest.approx(1 - (2 / 3) ** 2)
    assert torch.equal(whole_trainer.state.state_dict()["0.0.alpha"], resumed_trainer.state.state_dict()["0.0.alpha"])
