"""Multi-view batches on the file-backed datasets (`harness.file_feeder.FileFeeder`): the contract BBN, PaCo, BCL and
NCL's MoCo branch need on ImageNet-LT, iNat and Places-LT, with the in-memory feeders' semantics (views stacked
view-major; draw None = the same images again, a draw = an independent draw of a sampler; a pipeline per view).

Trees come from `datasets.fake_large` (tiny JPEGs in the real layout). Where a test must know which file a sample
came from, `load_rgb` is replaced by images whose pixels encode the file's position in the split."""

from __future__ import annotations

import hashlib
import math
import os
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from cli_support import run_cli
from PIL import Image
from torchvision import transforms

from harness.dali_feeder import DALI_VIEWS, DaliFeeder
from harness.data import FileSplit
from harness.datasets.augment import GaussianBlur
from harness.datasets.fake_large import write_fake_large_lt
from harness.datasets.large_lt import IMAGENETLT
from harness.distributed import ShardedFeeder, Share
from harness.errors import HarnessError
from harness.feeders import ViewFeed, prepare_views, view_feeds
from harness.file_feeder import FileFeeder, load_rgb, make_file_feeder, training_loader
from harness.method import View
from harness.samplers import make_draw, make_view_draw
from harness.tracking import Tracker

CPU = torch.device("cpu")
COUNTS = [16, 8, 4, 2]  # head to tail; labels get them in a seeded order (the writer reports which)
# Stream checksums of the single-view feeder, computed with the code as it was before views came to it (same tree,
# transform, batch and seeds as `_single_view_digest`): seeds 0 and 7 with the plain shuffle; seed 0 shuffled and
# seed 7 with the class-balanced draw.
SINGLE_VIEW_DIGEST = "432837072410c0a2"
SINGLE_VIEW_DRAW_DIGEST = "0934388cd567411b"


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict:
    return write_fake_large_lt(tmp_path_factory.mktemp("views") / "imagenetlt", "imagenetlt", train_counts=COUNTS,
                               image_size=(20, 16), seed=0)


@pytest.fixture(scope="module")
def data(tree):
    return IMAGENETLT.build(imbalance_factor=None, data_root=tree["root"])


def crops(size: int = 8) -> transforms.Compose:
    """A random transform with integer output: RandomResizedCrop + flip, uint8 tensors (exact comparisons)."""
    return transforms.Compose([transforms.RandomResizedCrop(size, scale=(0.08, 1.0)),
                               transforms.RandomHorizontalFlip(), transforms.PILToTensor()])


def index_images(split: FileSplit, calls: list | None = None):
    """load_rgb stand-in: a 2x2 image whose red/green values encode the path's position in the split; `calls`
    collects every position read."""
    position = {str(split.root / p): i for i, p in enumerate(split.paths)}

    def load(path: str) -> Image.Image:
        if calls is not None:
            calls.append(position[path])
        return Image.new("RGB", (2, 2), (position[path] % 256, position[path] // 256, 0))

    return load


def positions(images: torch.Tensor) -> torch.Tensor:
    """Which file each un-augmented (PILToTensor) `index_images` sample came from."""
    return images[:, 0, 0, 0].long() + 256 * images[:, 1, 0, 0].long()


def views_of(batch: tuple[torch.Tensor, torch.Tensor], copies: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    images, labels = batch
    size = len(labels) // copies
    return [(images[v * size:(v + 1) * size], labels[v * size:(v + 1) * size]) for v in range(copies)]


def test_a_second_view_is_the_same_files_stacked_view_major_each_decoded_once(data, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr("harness.file_feeder.load_rgb", index_images(data.train, calls))
    feeder = FileFeeder(data.train, transforms.PILToTensor(), 8, CPU)
    sizes, seen = [], []
    for batch in feeder.epoch(5, None, [None]):
        (first, first_labels), (second, second_labels) = views_of(batch, 2)
        read = positions(first)
        assert torch.equal(read, positions(second)) and torch.equal(first_labels, second_labels)
        assert torch.equal(first_labels, data.train.labels[read])
        sizes.append(len(read))
        seen += read.tolist()
    assert sizes == [8, 8, 8, 6] and sorted(seen) == list(range(30))  # every image once, in both views
    assert sorted(calls) == list(range(30))  # the second view of an image reuses its decoded file


def test_the_views_of_an_image_are_cropped_independently_and_view_0_is_the_single_view_epoch(data):
    feeder = FileFeeder(data.train, crops(), 30, CPU)
    (images, labels), = feeder.epoch(3, None, [None])
    (first, first_labels), (second, second_labels) = views_of((images, labels), 2)
    assert torch.equal(first_labels, second_labels)
    differs = (first.int() - second.int()).abs().flatten(1).amax(dim=1) > 0
    assert differs.float().mean() > 0.9  # two independent crops of a 20x16 image almost never coincide
    (alone, alone_labels), = feeder.epoch(3)
    assert torch.equal(first, alone) and torch.equal(first_labels, alone_labels)


def test_an_independent_reversed_view_draws_classes_as_1_over_n(data, monkeypatch):
    monkeypatch.setattr("harness.file_feeder.load_rgb", index_images(data.train))
    feeder = FileFeeder(data.train, transforms.PILToTensor(), 16, CPU)
    counts = [int(c) for c in data.class_counts]
    drawn: Counter[int] = Counter()
    epochs = 20
    for epoch in range(epochs):
        view0: list[int] = []
        for batch in feeder.epoch(100 + epoch, None, [make_view_draw("reversed", epoch, epochs)]):
            (first, _), (second, second_labels) = views_of(batch, 2)
            assert torch.equal(second_labels, data.train.labels[positions(second)])  # labels follow the files
            view0 += positions(first).tolist()
            drawn.update(second_labels.tolist())
        assert sorted(view0) == list(range(30))  # view 0 stays the plain shuffle
    total = sum(drawn.values())
    inverse = [1 / n for n in counts]
    expected = [w / sum(inverse) for w in inverse]  # BBN's reversed sampler: p_c = (1/n_c) / sum_j 1/n_j
    assert total == 30 * epochs
    for c, p in enumerate(expected):
        assert abs(drawn[c] / total - p) < 0.06, (c, drawn[c] / total, p)  # 600 draws: sd <= 0.021


def test_multi_view_epochs_replay_with_any_worker_count(data):
    split = FileSplit(data.train.root, data.train.paths, data.train.labels, crop=16)
    feeder = make_file_feeder(split, IMAGENETLT.augmentations, "randaugment", data.mean, data.std, 16, CPU, "auto")
    views = [ViewFeed(None, "sim"), ViewFeed(make_view_draw("reversed", 0, 1))]

    def epoch(seed: int, workers: int) -> list:
        feeder.num_workers = workers
        return list(feeder.epoch(seed, None, views))

    first = epoch(5, 0)
    assert [b[0].shape for b in first] == [(48, 3, 16, 16), (42, 3, 16, 16)]
    for other in (epoch(5, 0), epoch(5, 2)):  # same seed: same orders, crops, RandAugment and "sim" draws
        assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(first, other))
    assert not torch.equal(first[0][0], epoch(6, 0)[0][0])


def _single_view_digest(split: FileSplit, plan: list) -> str:
    digest = hashlib.sha256()
    for seed, draw in plan:
        for images, labels in FileFeeder(split, crops(), 8, CPU).epoch(seed, draw):
            digest.update(images.numpy().tobytes())
            digest.update(labels.numpy().astype("int64").tobytes())
    return digest.hexdigest()[:16]


def old_single_view_epoch(split: FileSplit, transform, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The file feeder's single-view stream as it was written before views: randperm then one randint seed per
    position from the epoch generator, each sample transformed with torch's default generator seeded to it."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(split.labels), generator=generator)
    seeds = torch.randint(0, 2**62, (len(order),), generator=generator, dtype=torch.int64)
    state = torch.default_generator.get_state()
    try:
        images = []
        for index, sample_seed in zip(order.tolist(), seeds.tolist()):
            torch.manual_seed(sample_seed)
            images.append(transform(load_rgb(os.path.join(str(split.root), split.paths[index]))))
    finally:
        torch.default_generator.set_state(state)
    return torch.stack(images), split.labels[order]


def test_a_single_view_epoch_is_the_stream_it_was_before_views(tree, data):
    assert tree["train_counts"] == [4, 16, 8, 2]  # the tree the stored digests were computed on
    assert _single_view_digest(data.train, [(0, None), (7, None)]) == SINGLE_VIEW_DIGEST
    assert _single_view_digest(data.train, [(0, None), (7, make_draw("class-balanced", 0, 1))]) == \
        SINGLE_VIEW_DRAW_DIGEST
    images, labels = map(torch.cat, zip(*FileFeeder(data.train, crops(), 8, CPU).epoch(11)))
    old_images, old_labels = old_single_view_epoch(data.train, crops(), 11)
    assert torch.equal(images, old_images) and torch.equal(labels, old_labels)


def test_unknown_view_augmentations_and_dali_are_refused_in_one_line(data):
    feeder = make_file_feeder(data.train, IMAGENETLT.augmentations, "basic", data.mean, data.std, 8, CPU, "auto")
    feeder.prepare_views(["sim", "randaugment", "basic"])  # known names build
    with pytest.raises(HarnessError) as error:
        prepare_views(feeder, [None, "simclr"])
    message = str(error.value)
    assert "\n" not in message and "unknown view augmentation 'simclr'" in message and "sim" in message
    bare = FileFeeder(data.train, crops(), 8, CPU)  # built without `pipelines`: named views say how to build it
    with pytest.raises(HarnessError, match="pipeline only"):
        next(bare.epoch(0, None, [ViewFeed(None, "sim")]))

    with_views = [SimpleNamespace(views=()), SimpleNamespace(views=(View(sampler="reversed"),))]
    assert training_loader("auto", data.train, with_views) == "torchvision"
    assert training_loader("torchvision", data.train, with_views) == "torchvision"
    assert training_loader("auto", data.train, with_views[:1]) == "auto"  # single view: DALI stays possible
    assert training_loader("dali", data.train, with_views[:1]) == "dali"
    in_memory = SimpleNamespace(images=None)  # not a FileSplit: data.loader does not apply
    assert training_loader("dali", in_memory, with_views) == "dali"
    with pytest.raises(HarnessError) as error:
        training_loader("dali", data.train, with_views)
    assert str(error.value) == DALI_VIEWS and "data.loader=torchvision" in DALI_VIEWS and "\n" not in DALI_VIEWS
    dali = DaliFeeder(data.train, "basic", data.mean, data.std, 8, CPU)  # never decodes: refused before DALI loads
    with pytest.raises(HarnessError, match="use data.loader=torchvision"):
        next(dali.epoch(0, None, [None]))
    with pytest.raises(HarnessError, match="use data.loader=torchvision"):
        dali.prepare_views(["sim"])


def test_sim_view_is_pacos_imagenet_list_and_greys_a_fifth(data):
    sim = IMAGENETLT.augmentations.per_file("sim", data.mean, data.std, 8)
    steps = sim.transforms
    kinds = [type(t).__name__ for t in steps]
    assert kinds == ["RandomResizedCrop", "ColorJitter", "RandomGrayscale", "RandomApply", "RandomHorizontalFlip",
                     "ToTensor", "Normalize"]
    crop, jitter, grey, blur = steps[:4]
    assert crop.size == (8, 8) and crop.scale == (0.08, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (
        pytest.approx((0.6, 1.4)), pytest.approx((0.6, 1.4)), pytest.approx((0.6, 1.4)), None)  # hue 0: off
    assert grey.p == 0.2 and blur.p == 0.5
    (gaussian,) = blur.transforms
    assert isinstance(gaussian, GaussianBlur) and gaussian.sigma == (0.1, 2.0)
    # frequencies, not pixels: an image with distinct channels comes out grey (R = G = B) in about 1/5 of draws
    image = Image.fromarray(torch.stack([torch.full((12, 12), v, dtype=torch.uint8) for v in (200, 90, 30)], -1)
                            .numpy())
    plain = transforms.Compose(steps[:5] + [transforms.PILToTensor()])
    torch.manual_seed(0)
    draws = 400
    grey_share = sum(bool((t[0] == t[1]).all() and (t[1] == t[2]).all()) for t in (plain(image) for _ in range(draws)))
    assert abs(grey_share / draws - 0.2) < 4 * math.sqrt(0.2 * 0.8 / draws)


def test_each_ddp_rank_gets_its_share_of_every_view(data, monkeypatch):
    monkeypatch.setattr("harness.file_feeder.load_rgb", index_images(data.train))
    feeder = FileFeeder(data.train, transforms.PILToTensor(), 10, CPU)
    views = [None, make_view_draw("reversed", 0, 1)]
    full = list(feeder.epoch(4, None, views))
    shares = [list(ShardedFeeder(feeder, rank, 2, Share(2.0)).epoch(4, None, views)) for rank in (0, 1)]
    for step, batch in enumerate(full):
        whole = views_of(batch, 3)
        parts = [views_of(rank_batches[step], 3) for rank_batches in shares]
        for v in range(3):
            assert torch.equal(torch.cat([p[v][0] for p in parts]), whole[v][0])
            assert torch.equal(torch.cat([p[v][1] for p in parts]), whole[v][1])


@pytest.mark.slow  # ~20 s alone: four runs (MLflow store, two evaluations each)
def test_multi_view_methods_run_end_to_end_on_a_generated_tree(tmp_path, capsys, harness_home, monkeypatch,
                                                               one_torch_thread):
    """BBN (reversed view), PaCo (a "sim" key view), BCL (two "sim" views) and NCL's MoCo branch through `harness run
    method` on a fake ImageNet-LT tree, with the CIFAR ResNet-8 on 32-px crops (the large backbones are too slow on
    CPU); the views each run's feeder received are recorded, so a single-view fallback cannot pass."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tree = write_fake_large_lt(tmp_path / "tree", "imagenetlt", train_counts=[8, 4, 2], image_size=(40, 30))
    received: dict[str, list] = {}
    original = FileFeeder._views

    def recording(self, seed, draw, views):
        received.setdefault(current, []).append([(feed.draw is None, feed.augment) for feed in view_feeds(views)])
        return original(self, seed, draw, views)

    monkeypatch.setattr(FileFeeder, "_views", recording)
    common = ["--dataset", "imagenetlt", "--data-root", tree["root"], "--if", "4", "--epochs", "1",
              "--set", "method.depth=8", "--set", "optim.batch_size=4", "--set", "data.image_size=32",
              "--set", "train.eval_interval=0"]
    runs = {"bbn": [], "paco": [], "bcl": [], "ncl": ["--set", "method.contrastive=true"]}
    for current, extra in runs.items():
        code, out, err = run_cli(["run", "method", "--method", current, *common, *extra], capsys)
        assert code == 0, err
    assert received == {"bbn": [[(False, None)]], "paco": [[(True, "sim")]], "bcl": [[(True, "sim"), (True, "sim")]],
                        "ncl": [[(True, "sim")]]}
    found = Tracker(f"sqlite:///{harness_home / 'mlflow.db'}").search()
    assert sorted(found["params.method"]) == sorted(runs)
    assert set(found["status"]) == {"FINISHED"} and set(found["params.data.loader"]) == {"auto"}
    assert all(math.isfinite(v) and 0 <= v <= 100 for v in found["metrics.test/top1"])
