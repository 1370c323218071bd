"""Multi-view batches (`Stage.views`) and model epoch hooks (`LTModel.start_epoch`): the contract PaCo, BCL and BBN
need. Views come stacked view-major; a view is either the batch's own images augmented again (independent
randomness per image and view) or an independent draw from a sampler (BBN's reversed branch)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from feeder_support import MEAN, STD, identifiable_split, image_ids
from torch import nn

from harness.config import resolve_config
from harness.data import Split
from harness.datasets.augment import SMALL_IMAGE_AUGMENTATIONS, batched_pipeline, per_image_pipeline
from harness.errors import HarnessError
from harness.feeders import DeviceFeeder, ReferenceFeeder, ViewFeed, make_feeder, prepare_views
from harness.method import LossTerm, LossTermModule, LTModel, MethodSpec, ModelOutput, Stage, View
from harness.samplers import class_probabilities, make_view_draw
from harness.trainer import Trainer

CPU = torch.device("cpu")


def feeders(split: Split, augment: str, batch: int = 32) -> dict[str, object]:
    return {"reference": ReferenceFeeder(split, per_image_pipeline(augment, MEAN, STD), batch, CPU),
            "device": DeviceFeeder(split, batched_pipeline(augment, MEAN, STD), batch, CPU)}


@pytest.mark.parametrize("path", ["reference", "device"])
def test_a_second_view_is_the_same_images_stacked_view_major(path):
    split = identifiable_split()
    feeder = feeders(split, "none")[path]
    sizes, seen = [], []
    for images, labels in feeder.epoch(5, None, [None]):
        half = len(labels) // 2
        sizes.append(half)
        ids = image_ids(images)
        assert torch.equal(ids[:half], ids[half:]) and torch.equal(labels[:half], labels[half:])
        assert torch.equal(labels, split.labels[ids])
        seen += ids[:half].tolist()
    assert sizes == [32, 32, 11] and sorted(seen) == list(range(75))  # every image once, in both views


@pytest.mark.parametrize("path", ["reference", "device"])
def test_the_views_of_an_image_are_augmented_independently(path):
    split = identifiable_split(n=64)
    feeder = feeders(split, "basic", batch=64)[path]
    images, _ = next(iter(feeder.epoch(3, None, [None])))
    first, second = images[:64], images[64:]
    differs = (first - second).abs().flatten(1).amax(dim=1) > 0
    # crop (81 offsets) x flip (2): two independent draws coincide with probability 1/162 per image
    assert differs.float().mean() > 0.9


def mean_view_difference(feeder, seeds=range(4)) -> float:
    total, n = 0.0, 0
    for seed in seeds:
        for images, _ in feeder.epoch(seed, None, [None]):
            half = len(images) // 2
            total += (images[:half] - images[half:]).abs().mean(dim=(1, 2, 3)).sum().item()
            n += half
    return total / n


def test_both_paths_give_views_that_differ_alike():
    """Agreement in distribution: the mean |view 0 - view 1| per image, which depends on how both views' crops and
    flips are drawn, is the same on the reference and the device path within sampling noise (4 epochs of 64)."""
    split = identifiable_split(n=64)
    paths = feeders(split, "basic", batch=64)
    reference, device = (mean_view_difference(paths[p]) for p in ("reference", "device"))
    assert reference > 0.1 and abs(reference - device) / reference < 0.1


@pytest.mark.parametrize("path", ["reference", "device"])
def test_a_sampler_view_draws_its_own_images(path):
    """BBN's reversed branch: view 1 draws classes with p_c proportional to 1 / n_c, view 0 is the plain epoch."""
    counts = (64, 32, 16, 8)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    g = torch.Generator().manual_seed(1)
    split = Split(torch.randint(0, 256, (len(labels), 3, 8, 8), dtype=torch.uint8, generator=g), labels)
    feeder = feeders(split, "none", batch=40)[path]
    first, second = Counter(), Counter()
    for seed in range(20):
        for _, y in feeder.epoch(seed, None, [make_view_draw("reversed", 0, 1)]):
            half = len(y) // 2
            first.update(y[:half].tolist())
            second.update(y[half:].tolist())
    assert [first[c] for c in range(4)] == [20 * n for n in counts]
    expected = class_probabilities(torch.tensor(counts), -1.0) * 20 * len(labels)
    observed = torch.tensor([second[c] for c in range(4)], dtype=torch.float64)
    assert torch.allclose(observed, expected, rtol=0.15)
    assert torch.allclose(class_probabilities(torch.tensor(counts), -1.0),
                          torch.tensor([1, 2, 4, 8], dtype=torch.float64) / 15)


# ------------------------------------------------------------------------------- per-view augmentation (View.augment)


def named_feeders(split: Split, augment: str, batch: int = 32, builds: list | None = None) -> dict[str, object]:
    """Both feeders with per-view pipelines; `builds` records every pipeline name built after construction."""
    def counted(factory):
        def build(name: str):
            if builds is not None:
                builds.append(name)
            return factory(name, MEAN, STD)
        return build

    return {"reference": ReferenceFeeder(split, per_image_pipeline(augment, MEAN, STD), batch, CPU,
                                         pipelines=counted(per_image_pipeline), augment=augment),
            "device": DeviceFeeder(split, batched_pipeline(augment, MEAN, STD), batch, CPU,
                                   pipelines=counted(batched_pipeline), augment_name=augment)}


def grey_fraction(images: torch.Tensor) -> float:
    """The share of images whose three channels are equal after un-normalising (random colour images never are)."""
    pixels = ((images * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)) * 255).round()
    return ((pixels[:, 0] == pixels[:, 1]) & (pixels[:, 1] == pixels[:, 2])).flatten(1).all(dim=1).float().mean().item()


@pytest.mark.parametrize("path", ["reference", "device"])
def test_a_bare_view_is_a_view_with_the_runs_augmentation(path):
    paths = [named_feeders(identifiable_split(), "basic")[path] for _ in range(2)]
    old = torch.cat([images for images, _ in paths[0].epoch(4, None, [None])])
    new = torch.cat([images for images, _ in paths[1].epoch(4, None, [ViewFeed(None, None)])])
    assert torch.equal(old, new)  # the same random stream: a run without named views trains as before


@pytest.mark.parametrize("path", ["reference", "device"])
def test_a_view_with_its_own_augmentation_gets_it_and_view_0_keeps_the_runs(path):
    """Run augment "none", view 1 "sim": view 0 is the raw images exactly; view 1 differs from it image by image
    and is grey in about SIM_GRAY_P = 20 % of the images (128: 3.4 binomial standard errors above 0.08)."""
    split = identifiable_split(n=128)
    images, labels = next(iter(named_feeders(split, "none", batch=128)[path].epoch(2, None, [ViewFeed(None, "sim")])))
    first, second = images[:128], images[128:]
    ids = image_ids(first)
    assert sorted(ids.tolist()) == list(range(128)) and torch.equal(labels[:128], labels[128:])
    assert torch.allclose(first, (split.images[ids].float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1))
                          / torch.tensor(STD).view(1, 3, 1, 1), atol=1e-6)
    assert ((first - second).abs().flatten(1).amax(dim=1) > 0).all()
    assert grey_fraction(first) == 0.0 and grey_fraction(second) > 0.08


@pytest.mark.parametrize("path", ["reference", "device"])
def test_a_sim_view_differs_from_basic_views(path):
    """Run augment "basic", views [the run's, "sim"]: the two basic views are never grey, the sim view is."""
    split = identifiable_split(n=128)
    feeder = named_feeders(split, "basic", batch=128)[path]
    images, _ = next(iter(feeder.epoch(3, None, [None, ViewFeed(None, "sim")])))
    view0, view1, view2 = images[:128], images[128:256], images[256:]
    assert grey_fraction(view0) == grey_fraction(view1) == 0.0 and grey_fraction(view2) > 0.08


@pytest.mark.parametrize("path", ["reference", "device"])
def test_each_distinct_view_pipeline_is_built_once(path):
    builds: list[str] = []
    feeder = named_feeders(identifiable_split(), "basic", builds=builds)[path]
    views = [ViewFeed(None, "sim"), ViewFeed(None, "sim"), ViewFeed(None, "basic"), None]
    for seed in range(2):
        assert sum(1 for _ in feeder.epoch(seed, None, views)) == 3
    assert builds == ["sim"]  # "basic" is the run's own pipeline, None too


@pytest.mark.parametrize("fast_path", ["off", "on"])
def test_an_unknown_view_augmentation_is_refused_in_one_line_before_any_batch(fast_path):
    feeder = make_feeder(identifiable_split(), SMALL_IMAGE_AUGMENTATIONS, "basic", MEAN, STD, 32, CPU, fast_path)
    with pytest.raises(HarnessError, match="unknown view augmentation 'nope'.*sim") as error:
        prepare_views(feeder, [None, "sim", "nope"])
    assert "\n" not in str(error.value)
    with pytest.raises(HarnessError, match="unknown view augmentation 'nope'"):
        next(iter(feeder.epoch(0, None, [ViewFeed(None, "nope")])))
    prepare_views(feeder, [None, "sim", "basic"])  # known names pass


def test_a_feeder_without_view_pipelines_refuses_a_named_view_in_one_line():
    feeder = feeders(identifiable_split(), "basic")["reference"]
    with pytest.raises(HarnessError, match="augmentation 'sim'") as error:
        next(iter(feeder.epoch(0, None, [ViewFeed(None, "sim")])))
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------------------------- the trainer


class TwoViewModel(LTModel):
    """Records what it sees: the batch sizes in training and every start_epoch call; its epoch is a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4))
        self.register_buffer("epoch_seen", torch.tensor(-1))
        self.batches: list[int] = []
        self.epochs: list[tuple[int, int]] = []

    def parameter_groups(self):
        return {"backbone": [], "head": list(self.body.parameters())}

    def start_epoch(self, epoch: int, epochs: int) -> None:
        self.epochs.append((epoch, epochs))
        self.epoch_seen.fill_(epoch)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        if self.training:
            self.batches.append(len(x))
        z = self.body(x.float())
        return ModelOutput(logits=z, expert_logits=z[None])


class ViewCE(LossTermModule):
    """CE on every view; records the target sizes it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[int] = []

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        self.targets.append(len(target))
        return nn.functional.cross_entropy(out.logits, target)


ONE_MORE_VIEW = (View(),)


def two_view_trainer(views=ONE_MORE_VIEW, mixup: float = 0.0) -> tuple[Trainer, TwoViewModel, ViewCE]:
    cfg = resolve_config("ce", epochs="3", overrides={"optim.batch_size": 32})
    model, term = TwoViewModel(), ViewCE()
    stage = Stage("views", (LossTerm("ce", 1.0, term),), epochs=3, views=tuple(views), mixup=mixup)
    feeder = ReferenceFeeder(identifiable_split(), per_image_pipeline("basic", MEAN, STD), 32, CPU)
    return Trainer(MethodSpec(model, (stage,)), cfg, feeder, CPU), model, term


def test_the_trainer_feeds_every_view_and_counts_images_once():
    trainer, model, term = two_view_trainer()
    trainer.fit()
    assert model.batches == term.targets == [64, 64, 22] * 3
    assert trainer.images_trained == 3 * 75
    assert model.epochs == [(0, 3), (1, 3), (2, 3)] and int(model.epoch_seen) == 2


def test_the_trainer_hands_each_view_its_augmentation():
    seen: list = []

    class Recording(ReferenceFeeder):
        def epoch(self, seed, draw=None, views=()):
            seen.append(list(views))
            return super().epoch(seed, draw, views)

    cfg = resolve_config("ce", epochs="1", overrides={"optim.batch_size": 32})
    stage = Stage("views", (LossTerm("ce", 1.0, ViewCE()),), epochs=1, views=(View(augment="sim"),))
    feeder = Recording(identifiable_split(), per_image_pipeline("basic", MEAN, STD), 32, CPU,
                       pipelines=lambda name: per_image_pipeline(name, MEAN, STD), augment="basic")
    Trainer(MethodSpec(TwoViewModel(), (stage,)), cfg, feeder, CPU).fit()
    assert [[getattr(v, "augment", None) for v in views] for views in seen] == [["sim"]]


def test_views_with_mixup_are_refused():
    trainer, _, _ = two_view_trainer(mixup=0.2)
    with pytest.raises(HarnessError, match="views and mixup"):
        trainer.fit()


def test_training_flops_of_a_multiview_stage_count_every_view_and_move_no_state():
    from harness.cost import stage_train_flops
    from harness.profile import multiview_train_flops, train_flops

    model = TwoViewModel()
    model.bn = nn.BatchNorm1d(4)
    one = train_flops(model, (1, 3, 32, 32))
    assert one == 4 * 3 * 32 * 32 * 4  # forward 2*D*C, weight gradient 2*D*C (no gradient for the input image)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert multiview_train_flops(model, 2, (2, 3, 32, 32)) == 2 * one
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and model.batches == []
    term = LossTerm("ce", 1.0, ViewCE())
    spec = MethodSpec(model, (Stage("one", (term,)), Stage("two", (term,), views=(View(), View()))))
    assert stage_train_flops(spec, (1, 3, 32, 32)) == [one, 3 * one]
