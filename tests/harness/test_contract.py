"""The widened method contract, read by the trainer and evaluator as data: per-stage samplers, epoch-indexed loss
weights, per-stage weight decay, mixup, constraints (with their state in checkpoints), the step schedule, post-hoc
steps, calibration parameter groups, and each method's own recipe as a preset. Expected values are computed here
from the definitions, not read back from the code under test."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from harness.config import resolve_config
from harness.data import Split
from harness.datasets.augment import per_image_pipeline
from harness.errors import HarnessError
from harness.feeders import DeviceFeeder, ReferenceFeeder
from harness.method import LossTerm, LossTermModule, MethodSpec, ModelOutput, Stage, TrainFeatures
from harness.methods.constraints import MaxNorm
from harness.methods.losses import ExpertCE
from harness.methods.models.moe import build_expert_resnet
from harness.methods.posthoc import NCM, LogitAdjust, TauNorm
from harness.posthoc import fit_posthoc
from harness.samplers import class_probabilities, make_draw, stage_probabilities
from harness.schedules import stage_lr
from harness.trainer import Trainer

COUNTS = (40, 20, 10, 5)
CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def toy_split(n: int = 75, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    labels = torch.repeat_interleave(torch.arange(4), torch.tensor(COUNTS))[:n]
    images = torch.randint(0, 256, (len(labels), 3, 32, 32), dtype=torch.uint8, generator=g)
    images[:, 0] = (labels * 60).to(torch.uint8)[:, None, None]
    return Split(images, labels)


def feeder(batch: int = 25) -> ReferenceFeeder:
    return ReferenceFeeder(toy_split(), per_image_pipeline("none", (0.5,) * 3, (0.25,) * 3), batch, CPU)


def tiny_model(**kwargs):
    torch.manual_seed(0)
    return build_expert_resnet(num_classes=4, experts=1, dkf=False, head="linear", depth=8, **kwargs)


def run(spec: MethodSpec, stage_epochs: str, path=None, resume=False, **train):
    cfg = resolve_config("ce", device="cpu", overrides={"train.stage_epochs": stage_epochs, "optim.batch_size": 25,
                                                        **{f"train.{k}": v for k, v in train.items()}})
    trainer = Trainer(spec, cfg, feeder(), CPU, path)
    trainer.fit(resume=resume)
    return trainer


# ---- samplers ----------------------------------------------------------------------------------------------------

def test_sampler_probabilities_follow_n_to_the_q():
    counts = torch.tensor(COUNTS)
    assert class_probabilities(counts, 1.0).tolist() == pytest.approx([40 / 75, 20 / 75, 10 / 75, 5 / 75])
    assert class_probabilities(counts, 0.0).tolist() == pytest.approx([0.25] * 4)
    roots = [math.sqrt(n) for n in COUNTS]
    assert class_probabilities(counts, 0.5).tolist() == pytest.approx([r / sum(roots) for r in roots])
    # progressive: instance-balanced at the stage's start, halfway at its middle
    assert stage_probabilities("progressive", counts, 0, 10).tolist() == pytest.approx([40 / 75, 20 / 75, 10 / 75,
                                                                                         5 / 75])
    middle = [(n / 75 + 0.25) / 2 for n in COUNTS]
    assert stage_probabilities("progressive", counts, 5, 10).tolist() == pytest.approx(middle)


def test_class_balanced_epochs_visit_classes_equally_and_replay_per_seed():
    labels = torch.repeat_interleave(torch.arange(4), torch.tensor((4000, 2000, 1000, 500)))
    draw = make_draw("class-balanced", 0, 10)
    first = draw(labels, torch.Generator().manual_seed(3))
    assert len(first) == len(labels)
    share = torch.bincount(labels[first], minlength=4).float() / len(labels)
    assert share.tolist() == pytest.approx([0.25] * 4, abs=0.02)  # instance sampling would give 0.53 ... 0.07
    assert torch.equal(first, draw(labels, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, draw(labels, torch.Generator().manual_seed(4)))
    assert make_draw("instance", 0, 10) is None
    with pytest.raises(HarnessError, match="unknown sampler 'bogus'"):
        make_draw("bogus", 0, 10)


@pytest.mark.parametrize("kind", ["reference", "device"])
def test_feeders_draw_the_stage_sampler_and_keep_the_plain_shuffle(kind):
    split = toy_split()
    if kind == "reference":
        f = ReferenceFeeder(split, per_image_pipeline("none", (0.5,) * 3, (0.25,) * 3), 75, CPU)
    else:
        f = DeviceFeeder(split, lambda images, g: images.float(), 75, CPU)
    plain = torch.cat([labels for _, labels in f.epoch(5)])
    assert sorted(plain.tolist()) == sorted(split.labels.tolist())  # every image once
    balanced = torch.cat([labels for _, labels in f.epoch(5, make_draw("class-balanced", 0, 1))])
    assert len(balanced) == 75 and torch.bincount(balanced, minlength=4)[3] > 5  # the 5-image class drawn more
    again = torch.cat([labels for _, labels in f.epoch(5, make_draw("class-balanced", 0, 1))])
    assert torch.equal(balanced, again)


# ---- schedules ---------------------------------------------------------------------------------------------------

def test_step_schedule_is_ldam_drws():
    """LDAM-DRW `adjust_learning_rate`: epoch E = e + 1; E <= 5: lr * E / 5; E > 180: x1e-4; E > 160: x0.01."""
    stage = Stage("s", (), epochs=200, peak_lr=0.1, schedule="step", warmup_epochs=5,
                  lr_steps=((0.8, 0.01), (0.9, 1e-4)))

    def official(e: int) -> float:
        big = e + 1
        return 0.1 * big / 5 if big <= 5 else 0.1 * 1e-4 if big > 180 else 0.1 * 0.01 if big > 160 else 0.1

    for e in (0, 3, 4, 5, 100, 159, 160, 161, 179, 180, 199):
        assert stage_lr(stage, "code", 0.05, e, 200) == pytest.approx(official(e)), e


def test_cosine_schedule_starts_at_the_stage_peak_and_ends_near_zero():
    stage = Stage("s", (), epochs=30, peak_lr=0.002, schedule="cosine", warmup_epochs=0)
    assert stage_lr(stage, "code", 0.05, 0, 30) == pytest.approx(0.002)
    assert stage_lr(stage, "code", 0.05, 15, 30) == pytest.approx(0.001)


# ---- the trainer reads the stage's data --------------------------------------------------------------------------

class EpochRecorder(LossTermModule):
    """CE that records the `start_epoch` calls and keeps a counter buffer (saved in checkpoints)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, int]] = []
        self.register_buffer("epochs_started", torch.zeros(()))

    def start_epoch(self, epoch: int, epochs: int) -> None:
        self.calls.append((epoch, epochs))
        self.epochs_started += 1

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.logits, target)


def test_loss_terms_hear_each_epoch_and_their_buffers_survive_a_resume(tmp_path):
    term = EpochRecorder()
    spec = MethodSpec(tiny_model(retrain_head=False), (Stage("s", (LossTerm("ce", 1.0, term),), epochs=3),))
    run(spec, "3", tmp_path / "ck.pt")
    assert term.calls == [(0, 3), (1, 3), (2, 3)]
    checkpoint = torch.load(tmp_path / "ck.pt", weights_only=False)
    assert float(checkpoint["state"]["0.0.epochs_started"]) == 3

    fresh = EpochRecorder()
    again = MethodSpec(tiny_model(retrain_head=False), (Stage("s", (LossTerm("ce", 1.0, fresh),), epochs=3),))
    run(again, "3", tmp_path / "ck.pt", resume=True)
    assert fresh.calls == [] and float(fresh.epochs_started) == 3  # nothing re-run; the buffer came back


def test_stage_weight_decay_reaches_the_optimizer_and_defaults_to_optim():
    from harness.trainer import enter_stage

    model = tiny_model(retrain_head=False)
    cfg = resolve_config("ce", device="cpu")
    own = enter_stage(MethodSpec(model, ()), Stage("s", (), weight_decay=0.1), cfg)
    default = enter_stage(MethodSpec(model, ()), Stage("s", ()), cfg)
    assert own.param_groups[0]["weight_decay"] == 0.1
    assert default.param_groups[0]["weight_decay"] == cfg.optim.weight_decay


class LabelSpy(LossTermModule):
    def __init__(self) -> None:
        super().__init__()
        self.targets: list[torch.Tensor] = []

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        self.targets.append(target.clone())
        return F.cross_entropy(out.logits, target)


def test_mixup_scores_each_term_on_both_label_sets():
    spy = LabelSpy()
    spec = MethodSpec(tiny_model(retrain_head=False), (Stage("s", (LossTerm("ce", 1.0, spy),), epochs=1,
                                                              mixup=1.0),))
    run(spec, "1")
    assert len(spy.targets) == 6  # 3 batches, each scored on its labels and its partners' labels
    for own, partner in zip(spy.targets[::2], spy.targets[1::2]):
        assert sorted(own.tolist()) == sorted(partner.tolist()) and not torch.equal(own, partner)


def test_max_norm_caps_rows_at_the_threshold_taken_when_its_stage_starts(tmp_path):
    model = tiny_model(retrain_head=False)
    with torch.no_grad():
        model.heads[0].weight.mul_(torch.tensor([1.0, 2.0, 3.0, 4.0])[:, None])
    norms = model.heads[0].weight.detach().norm(dim=1)
    expected = float(norms.min() + 0.1 * (norms.max() - norms.min()))
    constraint = MaxNorm(1, thresh=0.1, every="step")
    stage = Stage("head", (LossTerm("ce", 1.0, ExpertCE()),), epochs=2, trainable=("head",),
                  constraints=(constraint,))
    run(MethodSpec(model, (stage,)), "2", tmp_path / "ck.pt")
    assert float(constraint.thresholds[0]) == pytest.approx(expected, rel=1e-6)
    assert (model.heads[0].weight.norm(dim=1) <= expected * (1 + 1e-5)).all()
    assert torch.load(tmp_path / "ck.pt", weights_only=False)["state"]["1.thresholds"][0] == pytest.approx(expected)


def test_max_norm_with_thresh_one_clips_nothing_at_the_start():
    model = tiny_model(retrain_head=False)
    before = model.heads[0].weight.detach().clone()
    constraint = MaxNorm(1, thresh=1.0)
    constraint.begin(model)
    constraint.apply(model)
    assert torch.equal(model.heads[0].weight, before)


# ---- calibration groups and post-hoc steps -----------------------------------------------------------------------

@pytest.mark.parametrize("calibration", ["lws", "disalign"])
def test_calibrations_are_the_identity_until_trained_and_train_alone(calibration):
    plain, calibrated = tiny_model(retrain_head=False), tiny_model(retrain_head=False, calibration=calibration)
    calibrated.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(6, 3, 32, 32)
    plain.eval(), calibrated.eval()
    assert torch.allclose(plain(x).logits, calibrated(x).logits, atol=1e-6)
    groups = calibrated.parameter_groups()
    assert set(groups) == {"backbone", "head", "calibration"}
    assert sum(p.numel() for p in groups["calibration"]) == (4 if calibration == "lws" else 4 + 4 + 64 + 1)


def head_output(model, x):
    model.eval()
    return model(x)


def test_tau_norm_zero_is_the_bias_free_head_and_one_gives_unit_rows():
    model = tiny_model(retrain_head=False)
    x = torch.randn(5, 3, 32, 32)
    out = head_output(model, x)
    head = model.heads[0]
    bias_free = out.features[0] @ head.weight.T
    assert torch.allclose(TauNorm(0.0)(model, out).logits, bias_free, atol=1e-5)
    unit = out.features[0] @ (head.weight / head.weight.norm(dim=1, keepdim=True)).T
    assert torch.allclose(TauNorm(1.0)(model, out).logits, unit, atol=1e-5)


def test_ncm_classifies_centroids_to_their_own_class_and_ignores_a_feature_shift():
    features = torch.randn(1, 40, 8)
    labels = torch.arange(40) % 4
    step = NCM()
    step.fit(tiny_model(), TrainFeatures(features, labels))
    centred = F.normalize(features[0] - features[0].mean(dim=0), dim=1)
    centroids = torch.stack([centred[labels == c].mean(dim=0) for c in range(4)])
    assert torch.allclose(step.centroids[0], centroids, atol=1e-6)
    # a test feature equal to a centroid (in the normalised space) is classified to that class
    probe = ModelOutput(torch.zeros(4, 4), torch.zeros(1, 4, 4), features=features[:, :4])
    predicted = step(None, probe).logits.argmax(dim=1)
    distances = torch.cdist(F.normalize(features[0, :4] - features[0].mean(dim=0), dim=1), centroids)
    assert torch.equal(predicted, distances.argmin(dim=1))
    shifted = NCM()
    shifted.fit(tiny_model(), TrainFeatures(features + 3.0, labels))
    moved = ModelOutput(torch.zeros(4, 4), torch.zeros(1, 4, 4), features=features[:, :4] + 3.0)
    assert torch.allclose(shifted(None, moved).logits, step(None, probe).logits, atol=1e-5)


def test_post_hoc_logit_adjustment_subtracts_tau_log_prior():
    logits = torch.randn(1, 3, 4)
    out = ModelOutput(logits[0], logits)
    prior = torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS)
    adjusted = LogitAdjust(COUNTS, tau=1.0)(None, out).logits
    assert torch.allclose(adjusted.double(), logits[0].double() - prior.log(), atol=1e-6)
    assert torch.allclose(LogitAdjust(COUNTS, tau=0.0)(None, out).logits, logits[0])


def test_fit_posthoc_is_the_model_itself_without_steps_and_wraps_it_with():
    model = tiny_model()
    assert fit_posthoc(model, (), toy_split(), (0.5,) * 3, (0.25,) * 3, CPU) is model
    predictor = fit_posthoc(model, (NCM(),), toy_split(), (0.5,) * 3, (0.25,) * 3, CPU)
    out = predictor(torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, 4) and (out.logits <= 0).all()  # negative squared distances


# ---- recipes -----------------------------------------------------------------------------------------------------

def test_own_preset_applies_the_methods_published_recipe():
    cfg = resolve_config("ldam-drw", preset="own")
    assert (cfg.optim.batch_size, cfg.optim.weight_decay, cfg.data.augment) == (128, 2e-4, "basic")
    assert cfg.method_kwargs["recipe"] == "own" and cfg.method_kwargs["shortcut"] == "A"
    shike = resolve_config("ldam-drw")
    assert shike.method_kwargs["recipe"] == "shike" and shike.optim.batch_size == 128
    with pytest.raises(HarnessError, match="declares no recipe of its own"):
        resolve_config("branches", preset="own")


def test_recipes_set_each_stage_and_epochs_still_rescale_them():
    from harness.config import plan_epochs
    from harness.registry import METHODS

    own = METHODS.get("ldam-drw")(num_classes=4, class_counts=COUNTS, recipe="own", depth=8).stages[0]
    assert (own.epochs, own.peak_lr, own.schedule, own.lr_steps) == (200, 0.1, "step", ((0.8, 0.01), (0.9, 1e-4)))
    crt = METHODS.get("crt")(num_classes=4, class_counts=COUNTS, depth=8).stages
    assert [(s.epochs, s.peak_lr, s.sampler, s.trainable) for s in crt] == [
        (180, 0.15, "instance", ("backbone", "head")), (20, 0.1, "class-balanced", ("retrain_head",))]
    cfg = resolve_config("crt", epochs="20")
    assert plan_epochs(crt, cfg.train) == [18, 2]
    wb = METHODS.get("wb")(num_classes=4, class_counts=COUNTS, depth=8).stages
    assert [s.weight_decay for s in wb] == [5e-3, 0.1] and type(wb[1].constraints[0]).__name__ == "MaxNorm"
    assert replace(wb[0], epochs=3).weight_decay == 5e-3


def test_peak_lr_scale_multiplies_every_stage_whatever_its_name():
    from harness.runner import build_method

    class Data:
        num_classes, class_counts = 4, COUNTS

    for method in ("crt", "focal"):
        plain = build_method(resolve_config(method, overrides={"method.depth": 8}), Data)
        scaled = build_method(resolve_config(method, overrides={"method.depth": 8, "optim.peak_lr_scale": 0.5}), Data)
        assert [s.peak_lr / 2 for s in plain.stages] == [s.peak_lr for s in scaled.stages]


class StopAfter:
    """A hook that stops the trainer after global epoch `epoch` (0-based), as a kill between epochs would."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def __getattr__(self, name):
        return lambda *args: None

    def after_epoch(self, trainer, epoch, metrics) -> None:
        if epoch == self.epoch:
            trainer.request_stop("test")


@pytest.mark.parametrize("method", ["crt", "ldam-drw", "gcl", "wb"])
def test_sampled_reweighted_mixed_and_constrained_stages_resume_to_the_same_weights(method, tmp_path):
    """Class-balanced sampling (crt, gcl), the DRW switch (ldam-drw: at epoch 3 of 4), mixup with noisy logits
    (gcl) and MaxNorm's thresholds (wb, thresh 0 and no decay, so rows keep being clipped): stopped after epoch 2 of
    2+2 and resumed, the final weights are the same as an uninterrupted run's, bit for bit. On the device feeder,
    which leaves torch's global RNG alone: what the step draws (mixup, GCL's noise) is seeded by the trainer."""
    from harness.registry import METHODS

    extra = {"method.thresh": 0.0, "method.weight_decay_stage2": 0.0} if method == "wb" else {}

    def build():
        torch.manual_seed(0)
        cfg = resolve_config(method, device="cpu", overrides={"train.stage_epochs": "2+2", "optim.batch_size": 25,
                                                              "method.depth": 8, "train.checkpoint_interval": 1,
                                                              **extra})
        return cfg, METHODS.get(method)(num_classes=4, class_counts=COUNTS, **cfg.method_kwargs)

    def device_feeder():
        return DeviceFeeder(toy_split(), lambda images, g: (images.float() / 255 - 0.5) / 0.25, 25, CPU)

    cfg, whole = build()
    Trainer(whole, cfg, device_feeder(), CPU).fit()
    cfg, first = build()
    Trainer(first, cfg, device_feeder(), CPU, tmp_path / "ck.pt", hooks=[StopAfter(2)]).fit()
    torch.manual_seed(123)  # a fresh process would not share the first one's RNG state
    cfg, resumed = build()
    Trainer(resumed, cfg, device_feeder(), CPU, tmp_path / "ck.pt").fit(resume=True)
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


# keys the presets set for every builder that has them on purpose (the CIFAR ResNet's head and shortcut)
SHARED_SWITCHES = {"head", "shortcut", "backbone", "pretrained", "freeze"}


def test_presets_never_change_a_baselines_own_defaults_through_a_shared_switch_name():
    """BASE sets SHIKE's alpha/beta for every builder with a switch of that name: a baseline's `beta` would become
    SHIKE's 0.01 (class-balanced weights of all ones, measured). Every non-SHIKE builder keeps its defaults under
    every SHIKE preset, but for the shared CIFAR ResNet switches."""
    from harness.config import PRESETS, builder_defaults
    from harness.registry import METHODS

    for name in METHODS.names():
        if name in ("shike", "branches"):
            continue
        defaults = builder_defaults(METHODS.get(name))
        for preset in (p for p in PRESETS if p != "own"):
            resolved = resolve_config(name, preset=preset).method_kwargs
            changed = {k for k, v in defaults.items() if resolved[k] != v} - SHARED_SWITCHES
            assert not changed, (name, preset, changed)
