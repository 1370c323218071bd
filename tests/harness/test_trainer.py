"""A two-stage toy training run on CPU (detectron2's test_engine style): stage semantics, logging, resume."""

from __future__ import annotations

import pytest
import torch

from harness.config import resolve_config, stage_overrides
from harness.data import Split
from harness.datasets.augment import per_image_pipeline
from harness.feeders import ReferenceFeeder
from harness.hooks import Hook
from harness.registry import METHODS
from harness.trainer import NonFiniteLoss, Trainer

COUNTS = (40, 20, 10, 5)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # batches of 32 on ResNet-8: a second thread only stalls


def toy_split(n: int = 75, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(COUNTS)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    images[:, 0] = (labels * 60).to(torch.uint8)[:, None, None]  # a learnable class cue
    return Split(images, labels)


class EpochSpy(Hook):
    """Calls `fn(epoch, metrics)` after every epoch, as a test's window into the trainer."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def after_epoch(self, trainer, epoch, metrics) -> None:
        self.fn(epoch, metrics)


def make(method: str = "shike", epochs: int = 2, crt: int = 1, **overrides):
    """A 2-expert SHIKE on ResNet-8 trunks (`method.depth=8`: what these tests check does not depend on the depth;
    ResNet-32 itself is built by tests/methods/test_models.py and `harness describe`)."""
    torch.manual_seed(0)
    cfg = resolve_config(method, epochs=f"{epochs}+{crt}",
                         overrides={"optim.batch_size": 32, "method.experts": 2, "method.depth": 8, **overrides})
    spec = METHODS.get(method)(num_classes=len(COUNTS), class_counts=COUNTS, **cfg.method_kwargs)
    spec.stages = stage_overrides(spec.stages, cfg.stage_args)
    feeder = ReferenceFeeder(toy_split(), per_image_pipeline("autoaugment", (0.5,) * 3, (0.25,) * 3), 32,
                             torch.device("cpu"))
    return cfg, spec, feeder


@pytest.mark.slow
def test_two_stages_log_every_term_and_freeze_the_backbone():
    cfg, spec, feeder = make()
    logged: dict[int, dict[str, float]] = {}
    snapshot: dict[str, torch.Tensor] = {}

    def remember(epoch: int, metrics: dict[str, float]) -> None:
        logged[epoch] = metrics
        if epoch == 1:  # the end of stage 1
            snapshot.update({k: v.clone() for k, v in spec.model.state_dict().items()})

    Trainer(spec, cfg, feeder, torch.device("cpu"), hooks=[EpochSpy(remember)]).fit()
    assert set(logged) == {0, 1, 2}
    assert {"loss/ce", "loss/nt", "loss/mu", "loss/total", "lr"} <= set(logged[0])
    assert set(logged[2]) == {"loss/bsce", "loss/total", "lr"}
    after = spec.model.state_dict()
    for name, value in snapshot.items():
        if name.startswith("retrain_heads"):
            assert not torch.equal(value, after[name]), name  # the fresh heads trained
        elif "running" in name or "num_batches" in name:
            continue  # official: BN statistics keep updating in stage 2
        else:
            assert torch.equal(value, after[name]), name  # everything else frozen
    assert spec.model.active_head == "retrain_head"


@pytest.mark.slow
def test_freeze_bn_keeps_running_statistics_in_stage_two():
    cfg, spec, feeder = make(**{"method.freeze_bn_stage2": True})
    before: dict[str, torch.Tensor] = {}

    def remember(epoch: int, metrics: dict[str, float]) -> None:
        if epoch == 1:
            before.update({k: v.clone() for k, v in spec.model.state_dict().items() if "running" in k})

    Trainer(spec, cfg, feeder, torch.device("cpu"), hooks=[EpochSpy(remember)]).fit()
    after = spec.model.state_dict()
    assert before and all(torch.equal(v, after[k]) for k, v in before.items())


@pytest.mark.slow
def test_total_loss_is_the_weighted_sum_of_terms():
    cfg, spec, feeder = make(epochs=1, crt=0)
    logged = {}
    Trainer(spec, cfg, feeder, torch.device("cpu"), hooks=[EpochSpy(lambda e, m: logged.update(m))]).fit()
    weights = {t.name: t.weight for t in spec.stages[0].losses}
    expected = sum(weights[k.split("/")[1]] * v for k, v in logged.items() if k.startswith("loss/") and
                   k != "loss/total")
    assert logged["loss/total"] == pytest.approx(expected, rel=1e-5)


class Killed(Exception):
    pass


@pytest.mark.slow
def test_resume_from_a_checkpoint_reaches_the_same_weights(tmp_path):
    cfg, spec, feeder = make(epochs=3, crt=1)
    Trainer(spec, cfg, feeder, torch.device("cpu"), checkpoint_path=tmp_path / "a.pt").fit()
    reference = spec.model.state_dict()

    def kill_at_epoch_two(epoch: int, metrics: dict[str, float]) -> None:
        if epoch == 2:
            raise Killed  # dies before the epoch-2 checkpoint: resume replays epoch 2 from the epoch-1 state

    cfg, spec, feeder = make(epochs=3, crt=1)
    with pytest.raises(Killed):
        Trainer(spec, cfg, feeder, torch.device("cpu"), checkpoint_path=tmp_path / "b.pt",
                hooks=[EpochSpy(kill_at_epoch_two)]).fit()
    torch.manual_seed(123)  # the resumed process has other RNG state; the per-epoch seeds make it irrelevant
    cfg, spec, feeder = make(epochs=3, crt=1)
    trained: list[int] = []  # training is deterministic per epoch: only this tells a resume from a restart at 0
    Trainer(spec, cfg, feeder, torch.device("cpu"), checkpoint_path=tmp_path / "b.pt",
            hooks=[EpochSpy(lambda epoch, metrics: trained.append(epoch))]).fit(resume=True)
    assert trained == [2, 3]
    resumed = spec.model.state_dict()
    for name, value in reference.items():
        assert torch.equal(value, resumed[name]), name


@pytest.mark.slow
def test_non_finite_loss_stops_the_run():
    cfg, spec, feeder = make(epochs=3, crt=0, **{"stage.representation.peak_lr": 1e30, "method.head": "linear"})
    with pytest.raises(NonFiniteLoss, match="non-finite loss"):
        Trainer(spec, cfg, feeder, torch.device("cpu")).fit()


@pytest.mark.slow
def test_request_stop_ends_after_the_epoch_with_a_checkpoint(tmp_path):
    cfg, spec, feeder = make(epochs=3, crt=1)
    seen = []

    class StopAtOne(Hook):
        def after_epoch(self, trainer, epoch, metrics):
            seen.append(epoch)
            if epoch == 1:
                trainer.request_stop("pruned")

    trainer = Trainer(spec, cfg, feeder, torch.device("cpu"), checkpoint_path=tmp_path / "c.pt", hooks=[StopAtOne()])
    trainer.fit()
    assert seen == [0, 1] and trainer.stop_reason == "pruned"
    state = torch.load(tmp_path / "c.pt", weights_only=False)
    assert (state["stage"], state["epoch"]) == (0, 2)


@pytest.mark.slow
def test_a_third_stage_is_only_a_new_stage_in_the_builder():
    """A post-hoc step declared by a builder runs with its own epochs and LR peak; no engine change is needed."""
    from dataclasses import replace

    cfg, spec, feeder = make(epochs=1, crt=1, **{"train.stage_epochs": "1+1+2"})
    extra = replace(spec.stages[1], name="post-hoc", epochs=5, peak_lr=0.01)
    spec.stages = (*spec.stages, extra)
    lrs: dict[int, float] = {}
    Trainer(spec, cfg, feeder, torch.device("cpu"), hooks=[EpochSpy(lambda e, m: lrs.update({e: m["lr"]}))]).fit()
    assert sorted(lrs) == [0, 1, 2, 3]
    assert lrs[2] == pytest.approx(0.01) and lrs[3] == pytest.approx(0.005)  # cosine from its own peak
