"""NCL's optional MoCo branch (`method.contrastive=true`): per network a projection, a momentum copy and an unlabelled
queue; MoCo's InfoNCE summed over the networks (checked against a float64 computation by hand); the EMA update; the
queue snapshot and enqueue; parameter groups and inference count; 1-epoch runs on both feeders; resume."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from contrastive_support import COUNTS, CPU, Killed, Spy, feeder

from harness.config import resolve_config
from harness.errors import HarnessError
from harness.method import View
from harness.methods.losses_contrastive import moco_infonce
from harness.methods.models.contrastive import KeyQueue
from harness.registry import METHODS
from harness.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(**kwargs):
    torch.manual_seed(0)
    return METHODS.get("ncl")(num_classes=len(COUNTS), class_counts=COUNTS, depth=8, contrastive=True,
                              networks=2, **kwargs)


def two_views(batch: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, len(COUNTS), (batch,), generator=g)
    return torch.randn(2 * batch, 3, 32, 32, generator=g), torch.cat([y, y])


def test_the_loss_is_mocos_infonce_summed_over_networks_in_float64():
    """By hand, one loop per network and sample: -log(exp(q.k / T) / (exp(q.k / T) + sum_j exp(q.Q_j / T)))."""
    g = torch.Generator().manual_seed(3)
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    q, k, queue, t = unit(2, 3, 5), unit(2, 3, 5), unit(2, 4, 5), 0.2
    total = 0.0
    for net in range(2):
        per_sample = []
        for i in range(3):
            positive = math.exp(float(q[net, i] @ k[net, i]) / t)
            negatives = sum(math.exp(float(q[net, i] @ queue[net, j]) / t) for j in range(4))
            per_sample.append(-math.log(positive / (positive + negatives)))
        total += sum(per_sample) / 3
    assert moco_infonce(q, k, queue, t).item() == pytest.approx(total, rel=1e-12)
    assert moco_infonce(q.requires_grad_(), k, queue, t).requires_grad


def test_the_builder_adds_a_sim_key_view_and_the_moco_term_at_weight_1():
    spec = build()
    stage = spec.stages[0]
    assert stage.views == (View(augment="sim"),) and stage.trainable == ("backbone", "head", "contrastive")
    assert [(t.name, t.weight) for t in stage.losses] == [("nil_nbod", 1.0), ("moco", 1.0)]
    assert build(views="same").stages[0].views == (View(),)
    assert METHODS.get("ncl")(num_classes=4, class_counts=COUNTS, depth=8).stages[0].views == ()  # off by default
    model = spec.model
    assert (model.momentum, model.queues[0].size, model.queues[0].features.shape[1]) == (0.999, 7, 64)
    assert torch.allclose(model.queues[0].features.norm(dim=1), torch.ones(7))  # NCL: each random key unit-norm
    with pytest.raises(HarnessError, match="views"):
        build(views="other")


def test_the_training_forward_and_both_terms():
    spec = build()
    model = spec.model.train()
    x, y = two_views()
    before = torch.stack([q.features.clone() for q in model.queues])
    out = model(x)
    assert out.logits.shape == (6, 4) and out.expert_logits.shape == (2, 6, 4)  # view 0 only
    assert out.queries.shape == out.keys.shape == (2, 6, 64) and torch.equal(out.queue, before)
    with torch.no_grad():
        for net in range(2):  # the queries: each network's projection of view 0; the keys: its momentum copy's
            query = F.normalize(model.projections[net](model.networks[net](x[:6]).features[0]), dim=1)
            key = F.normalize(model.key_projections[net](model.key_networks[net](x[6:]).features[0]), dim=1)
            assert torch.allclose(out.queries[net], query, atol=1e-6) and torch.allclose(out.keys[net], key, atol=1e-6)
            assert torch.allclose(model.queues[net].features[:6], key, atol=1e-6)  # pushed after the snapshot
    terms = {t.name: t.fn(out, y) for t in spec.stages[0].losses}
    nil_nbod = spec.stages[0].losses[0].fn.term
    assert torch.allclose(terms["nil_nbod"], nil_nbod(out, y[:6]))
    assert torch.allclose(terms["moco"], moco_infonce(out.queries, out.keys, before, 0.2))
    model.eval()
    assert model(x[:5]).logits.shape == (5, 4)
    with pytest.raises(HarnessError, match="2 views"):
        model.train()(x[:5])


def test_the_momentum_copy_moves_by_exactly_m_k_plus_1_minus_m_q():
    model = build().model.train()
    for q, k in zip(model.query_parameters(), model.key_parameters(), strict=True):
        assert torch.equal(q, k) and not k.requires_grad
    with torch.no_grad():
        for q in model.query_parameters():
            q.add_(torch.randn_like(q))
    queries = [q.detach().clone() for q in model.query_parameters()]
    keys = [k.detach().clone() for k in model.key_parameters()]
    model(two_views()[0])
    for q, k, new in zip(queries, keys, model.key_parameters(), strict=True):
        assert torch.equal(new, k * 0.999 + q * (1 - 0.999))


def test_groups_inference_count_and_state():
    model = build().model
    plain = METHODS.get("ncl")(num_classes=4, class_counts=COUNTS, depth=8, networks=2).model
    projection = 2 * ((64 * 64 + 64) + (64 * 64 + 64))  # two networks' Linear(64, 64) - ReLU - Linear(64, 64)
    assert model.inference_parameter_count() == plain.inference_parameter_count()
    assert sum(p.numel() for p in model.parameter_groups()["contrastive"]) == projection == 16_640
    assert sum(p.numel() for p in model.parameters()) == 2 * (plain.inference_parameter_count() + projection)
    grouped = {id(p) for ps in model.parameter_groups().values() for p in ps}
    assert not any(id(p) in grouped for p in model.key_parameters())  # the momentum copies never train
    keys = set(model.state_dict())
    assert {"queues.0.features", "queues.0.ptr", "queues.1.features"} <= keys
    assert any(k.startswith("key_networks.") for k in keys) and any(k.startswith("key_projections.") for k in keys)
    assert isinstance(model.queues[0], KeyQueue)


# ---- training runs -----------------------------------------------------------------------------------------------



def trainer(path: str = "reference", epochs: str = "1", checkpoint=None, hooks=()) -> Trainer:
    torch.manual_seed(0)
    cfg = resolve_config("ncl", epochs=epochs, device="cpu", overrides={
        "optim.batch_size": 16, "method.depth": 8, "method.contrastive": True, "method.networks": 2})
    spec = METHODS.get("ncl")(num_classes=len(COUNTS), class_counts=COUNTS, **cfg.method_kwargs)
    return Trainer(spec, cfg, feeder(path), CPU, checkpoint, hooks=list(hooks))


@pytest.mark.parametrize("path", ["reference", "device"])
def test_one_epoch_on_both_feeders_is_finite_and_moves_every_part(path):
    logged: dict[int, dict[str, float]] = {}
    run = trainer(path, hooks=[Spy(lambda epoch, metrics: logged.update({epoch: metrics}))])
    before = {k: v.clone() for k, v in run.spec.model.state_dict().items()}
    run.fit()
    assert {"loss/nil_nbod", "loss/moco", "loss/total"} <= set(logged[0])
    assert all(math.isfinite(v) for v in logged[0].values())
    after = run.spec.model.state_dict()
    moved = {k.partition(".")[0] for k in before if before[k].is_floating_point() and not torch.equal(before[k],
                                                                                                      after[k])}
    assert moved == {"networks", "projections", "key_networks", "key_projections", "queues"}
    assert int(after["queues.0.ptr"]) == 48 % 7 and run.images_trained == 48


@pytest.mark.slow  # three short runs (2 + 2 + 1 epochs of 48 images, two networks): a few seconds
def test_resume_mid_run_gives_the_same_networks_momentum_copies_and_queues(tmp_path):
    run = trainer(epochs="2")
    run.fit()
    reference = run.spec.model.state_dict()

    def kill_in_epoch_two(epoch: int, metrics: dict[str, float]) -> None:
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        trainer(epochs="2", checkpoint=tmp_path / "run.pt", hooks=[Spy(kill_in_epoch_two)]).fit()
    torch.manual_seed(123)
    resumed = trainer(epochs="2", checkpoint=tmp_path / "run.pt")
    resumed.fit(resume=True)
    state = resumed.spec.model.state_dict()
    assert set(state) == set(reference)
    for key, value in reference.items():
        assert torch.equal(value, state[key]), key
