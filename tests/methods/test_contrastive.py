"""PaCo and BCL, the two-view contrastive methods: what a training forward returns, the momentum encoder's EMA, the
labelled queue's FIFO, the loss terms against `paco_loss` / `bcl_loss` called by hand on tensors recomputed here,
2-epoch runs on both feeders, resume (weights, key encoder and queue), inference parameter counts and recipes.
Golden values of the losses themselves: tests/methods/test_moe_losses.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from contrastive_support import COUNTS, CPU, Killed, Spy, feeder

from harness.config import resolve_config
from harness.errors import HarnessError
from harness.methods.losses_moe import bcl_loss, paco_loss
from harness.methods.models.contrastive import LabelledQueue
from harness.methods.paco import queue_length
from harness.registry import METHODS
from harness.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build(name: str, **kwargs):
    torch.manual_seed(0)
    return METHODS.get(name)(num_classes=len(COUNTS), class_counts=COUNTS, depth=8, **kwargs)


def two_views(batch: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, len(COUNTS), (batch,), generator=g)
    return torch.randn(2 * batch, 3, 32, 32, generator=g), torch.cat([y, y])


# ---- the training forward --------------------------------------------------------------------------------------

def test_paco_forward_gives_queries_keys_and_the_queue_before_the_batch():
    model = build("paco").model.train()
    x, _ = two_views()
    queue = (model.queue.features.clone(), model.queue.labels.clone())
    out = model(x)
    assert out.logits.shape == (12, 4) and out.expert_logits.shape == (1, 12, 4) and out.features.shape == (1, 12, 64)
    assert out.embeddings.shape == (12, 32) and torch.allclose(out.embeddings.norm(dim=1), torch.ones(12))
    assert torch.equal(out.queue_features, queue[0]) and torch.equal(out.queue_labels, queue[1])
    assert out.embeddings.requires_grad and out.logits[:6].requires_grad
    with torch.no_grad():  # k: view 1 through the (already updated) key encoder; z_k from its classifier
        key = model.key_network(x[6:])
        k = F.normalize(model.key_projection(key.features[0]), dim=1)
    assert torch.allclose(out.embeddings[6:], k) and torch.allclose(out.logits[6:], key.logits)
    model.eval()
    plain = model(x[:5])
    assert plain.logits.shape == (5, 4) and torch.equal(plain.logits, model.network(x[:5]).logits)


def test_bcl_forward_gives_every_views_embeddings_and_the_prototypes():
    model = build("bcl").model.train()
    x, _ = two_views()
    out = model(x)
    assert out.logits.shape == (12, 4) and out.embeddings.shape == (12, 128) and out.prototypes.shape == (4, 128)
    assert torch.allclose(out.embeddings.norm(dim=1), torch.ones(12))
    assert torch.allclose(out.prototypes.norm(dim=1), torch.ones(4))
    # prototypes: the MLP on the classifier's class vectors; the cosine head stores them as (64, C) columns
    head = model.network.classifiers()[0]
    assert torch.allclose(out.prototypes, F.normalize(model.prototype_head(head.weight.T), dim=1))
    out.prototypes.sum().backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0  # BCL's prototypes train the classifier
    model.eval()
    assert torch.equal(model(x[:5]).logits, model.network(x[:5]).logits)  # uncompensated, as BCL's validate


def test_a_batch_that_is_not_two_views_is_refused():
    model = build("paco").model.train()
    with pytest.raises(HarnessError, match="2 views"):
        model(torch.randn(5, 3, 32, 32))
    with pytest.raises(HarnessError, match="one image per view"):
        model(torch.randn(2, 3, 32, 32))


# ---- the momentum encoder and the queue ------------------------------------------------------------------------

def test_the_key_encoder_moves_by_exactly_m_k_plus_1_minus_m_q():
    model = build("paco").model.train()
    assert model.momentum == 0.999
    for q, k in zip(model.query_parameters(), model.key_parameters(), strict=True):
        assert torch.equal(q, k) and not k.requires_grad  # an exact copy at the start (official), never trained
    with torch.no_grad():  # a trained query encoder: it has moved away from the key encoder
        for q in model.query_parameters():
            q.add_(torch.randn_like(q))
    queries = [q.detach().clone() for q in model.query_parameters()]
    keys = [k.detach().clone() for k in model.key_parameters()]
    model(two_views()[0])
    m = 0.999
    for q, k, new in zip(queries, keys, model.key_parameters(), strict=True):
        assert torch.equal(new, k * m + q * (1 - m))
        assert not torch.equal(new, k)
    assert all(torch.equal(q, now) for q, now in zip(queries, model.query_parameters()))  # the query is untouched


def fifo(size: int, pushes: list[list[int]]) -> list[int]:
    """Independent model of the queue's slots: a ring buffer written one item at a time."""
    slots, ptr = [-1] * size, 0
    for batch in pushes:
        for item in batch:
            slots[ptr] = item
            ptr = (ptr + 1) % size
    return slots


@pytest.mark.parametrize("pushes", [[[0, 1, 2]], [[0, 1, 2], [3, 4, 5, 6]], [[0, 1], [2, 3, 4, 5, 6, 7, 8]],
                                    [[0, 1, 2, 3, 4]] * 3])
def test_the_queue_is_fifo_with_wrap_around(pushes):
    queue = LabelledQueue(5, 2, num_classes=100)
    for batch in pushes:
        items = torch.tensor(batch)
        queue.push(torch.stack([items, -items], dim=1).float(), items)
    expected = fifo(5, pushes)
    written = [i for i, item in enumerate(expected) if item >= 0]
    assert queue.labels[written].tolist() == [expected[i] for i in written]
    assert queue.features[written, 0].tolist() == [float(expected[i]) for i in written]
    assert int(queue.ptr) == sum(map(len, pushes)) % 5


def test_the_queue_is_in_the_models_state_and_saved_once():
    spec = build("paco")
    keys = spec.model.state_dict().keys()
    assert {"queue.features", "queue.labels", "queue.ptr"} <= set(keys)
    assert any(k.startswith("key_network.") for k in keys)
    term = spec.stages[0].losses[0].fn
    assert not any("queue" in k for k in term.state_dict())  # the term holds a reference, not a copy


def test_the_queue_is_capped_at_a_share_of_the_training_set():
    assert queue_length(1024, 0.1, 10847) == 1024  # CIFAR-100-LT IF 100: the official K
    assert queue_length(1024, 0.1, 1236) == 123  # Fashion-MNIST-LT IF 100
    assert queue_length(1024, 0.1, 5) == 1 and queue_length(1024, 1.0, 600) == 600
    assert build("paco").model.queue.size == 7  # 10 % of the 75 images of COUNTS
    with pytest.raises(HarnessError, match="queue_share"):
        queue_length(1024, 0.0, 100)


# ---- the loss terms against the functions, on tensors recomputed here -------------------------------------------

def test_the_paco_term_is_paco_loss_on_queries_keys_and_the_old_queue_then_enqueues():
    spec = build("paco")
    model, term = spec.model.train(), spec.stages[0].losses[0].fn
    x, y = two_views()
    old = (model.queue.features.clone(), model.queue.labels.clone(), int(model.queue.ptr))
    value = term(model(x), y)
    # by hand, in training mode (BN on batch statistics, so a second pass gives the same tensors)
    query = model.network(x[:6])
    q = F.normalize(model.projection(query.features[0]), dim=1)
    with torch.no_grad():
        k = F.normalize(model.key_projection(model.key_network(x[6:]).features[0]), dim=1)
    expected = paco_loss(torch.cat([q, k]), y, query.logits, COUNTS, old[0], old[1], alpha=0.01, temperature=0.05)
    assert torch.allclose(value, expected, rtol=1e-5, atol=1e-6)
    slots = [(old[2] + j) % 7 for j in range(6)]
    assert torch.allclose(model.queue.features[slots], k, atol=1e-6) and torch.equal(model.queue.labels[slots], y[6:])
    assert int(model.queue.ptr) == (old[2] + 6) % 7


@pytest.mark.parametrize("views", [2, 3])
def test_the_bcl_terms_are_compensated_ce_on_view_0_and_bcl_loss(views):
    spec = build("bcl", num_views=views)
    model = spec.model.train()
    g = torch.Generator().manual_seed(2)
    y = torch.randint(0, 4, (5,), generator=g)
    x, target = torch.randn(5 * views, 3, 32, 32, generator=g), y.repeat(views)
    out = model(x)
    terms = {t.name: (t.weight, t.fn(out, target)) for t in spec.stages[0].losses}
    assert {name: w for name, (w, _) in terms.items()} == {"ce": 2.0, "bcl": 0.6}
    by_hand = model.network(x)
    counts = torch.tensor(COUNTS, dtype=torch.float64)
    ce = F.cross_entropy(by_hand.logits[:5] + (counts / counts.sum()).log().float(), y)
    z = F.normalize(model.projection(by_hand.features[0]), dim=1).view(views, 5, -1)
    contrast = z[1:] if views == 3 else z  # official: views 1-2 (the "sim" views); with two, both
    scl = bcl_loss(contrast.transpose(0, 1), y, model.prototypes(), temperature=0.07)
    assert torch.allclose(terms["ce"][1], ce, rtol=1e-5) and torch.allclose(terms["bcl"][1], scl, rtol=1e-5)


# ---- training runs -----------------------------------------------------------------------------------------------



def trainer(name: str, path: str = "reference", checkpoint=None, hooks=()) -> Trainer:
    torch.manual_seed(0)
    cfg = resolve_config(name, epochs="2", device="cpu", overrides={"optim.batch_size": 16, "method.depth": 8})
    spec = METHODS.get(name)(num_classes=len(COUNTS), class_counts=COUNTS, **cfg.method_kwargs)
    return Trainer(spec, cfg, feeder(path), CPU, checkpoint, hooks=list(hooks))


@pytest.mark.parametrize("path", ["reference", "device"])
@pytest.mark.parametrize("name", ["paco", "bcl"])
def test_two_epochs_on_both_feeders_are_finite_and_train_every_group(name, path):
    logged: dict[int, dict[str, float]] = {}
    run = trainer(name, path, hooks=[Spy(lambda epoch, metrics: logged.update({epoch: metrics}))])
    before = {k: v.clone() for k, v in run.spec.model.state_dict().items()}
    run.fit()
    terms = {"paco": {"loss/paco"}, "bcl": {"loss/ce", "loss/bcl"}}[name]
    assert set(logged) == {0, 1} and terms | {"loss/total"} <= set(logged[1])
    assert all(math.isfinite(v) for metrics in logged.values() for v in metrics.values())
    after = run.spec.model.state_dict()
    moved = {k.partition(".")[0] for k in before if before[k].is_floating_point() and not torch.equal(before[k],
                                                                                                      after[k])}
    expected = {"paco": {"network", "projection", "key_network", "key_projection", "queue"},
                "bcl": {"network", "projection", "prototype_head"}}[name]
    assert moved == expected
    if name == "paco":  # 2 epochs x 48 images pushed through a queue of 7 slots (10 % of the 75 in COUNTS)
        assert int(after["queue.ptr"]) == 96 % 7 and run.images_trained == 96


@pytest.mark.slow  # three runs (2 + 2 + 1 epochs): ~3 s on two idle cores, up to 8 s on busy ones
@pytest.mark.parametrize("name", ["paco", "bcl"])
def test_resume_mid_run_gives_the_same_weights_key_encoder_and_queue(name, tmp_path):
    run = trainer(name)
    run.fit()
    reference = run.spec.model.state_dict()

    def kill_in_epoch_two(epoch: int, metrics: dict[str, float]) -> None:
        if epoch == 1:
            raise Killed  # before the epoch-2 checkpoint: resume replays epoch 2 from the epoch-1 state

    with pytest.raises(Killed):
        trainer(name, checkpoint=tmp_path / "run.pt", hooks=[Spy(kill_in_epoch_two)]).fit()
    torch.manual_seed(123)
    replayed: list[int] = []
    resumed = trainer(name, checkpoint=tmp_path / "run.pt", hooks=[Spy(lambda e, m: replayed.append(e))])
    resumed.fit(resume=True)
    assert replayed == [1]
    state = resumed.spec.model.state_dict()
    assert set(state) == set(reference)
    for key, value in reference.items():
        assert torch.equal(value, state[key]), key


# ---- parameter counts and recipes --------------------------------------------------------------------------------

CIFAR100 = (500,) * 50 + (5,) * 50


def test_inference_uses_the_query_network_alone_on_cifar100():
    """Inference parameters = one plain ResNet-32 with the method's classifier, built independently by `ce`;
    everything else (projection and prototype MLPs, PaCo's momentum copy) only trains."""
    def count(name, **kwargs):
        return METHODS.get(name)(num_classes=100, class_counts=CIFAR100, **kwargs).model

    paco, bcl = count("paco"), count("bcl")
    linear, cosine = count("ce", head="linear"), count("ce", head="cosine")
    assert paco.inference_parameter_count() == linear.inference_parameter_count() == 472_756
    assert bcl.inference_parameter_count() == cosine.inference_parameter_count() == 472_656
    paco_projection = (64 * 64 + 64) + 2 * 64 + (64 * 32 + 32)  # Linear, BatchNorm1d (weight, bias), Linear
    bcl_mlp = (64 * 512 + 512) + 2 * 512 + (512 * 128 + 128)
    assert sum(p.numel() for p in paco.parameter_groups()["contrastive"]) == paco_projection == 6_368
    assert sum(p.numel() for p in bcl.parameter_groups()["contrastive"]) == 2 * bcl_mlp == 199_936
    assert sum(p.numel() for p in paco.parameters()) == 2 * (472_756 + paco_projection)  # + the momentum copy
    assert sum(p.numel() for p in bcl.parameters()) == 472_656 + 2 * bcl_mlp
    assert count("paco", shortcut="A").inference_parameter_count() == count(
        "ce", head="linear", shortcut="A").inference_parameter_count()


def test_recipes():
    paco = build("paco").stages[0]
    assert (paco.epochs, paco.peak_lr, paco.trainable, len(paco.views)) == (200, 0.15, ("backbone", "head",
                                                                                       "contrastive"), 1)
    own = build("paco", recipe="own").stages[0]
    assert (own.epochs, own.peak_lr, own.schedule, own.warmup_epochs) == (400, 0.05, "step", 10)
    assert [round(f * 400) for f, _ in own.lr_steps] == [321, 361] and [v for _, v in own.lr_steps] == [0.1, 0.01]
    bcl = build("bcl", recipe="own").stages[0]
    assert (bcl.epochs, bcl.peak_lr, bcl.schedule, bcl.warmup_epochs) == (200, 0.15, "code", 5)
    assert len(build("bcl").stages[0].views) == 2 and len(build("bcl", num_views=2).stages[0].views) == 1
    with pytest.raises(HarnessError, match="num_views"):
        build("bcl", num_views=4)
    cfg = resolve_config("paco", preset="own")
    assert (cfg.optim.batch_size, cfg.optim.lr, cfg.optim.weight_decay, cfg.method_kwargs["shortcut"]) == (
        128, 0.05, 5e-4, "A")
    assert resolve_config("paco").method_kwargs["paco_alpha"] == 0.01  # SHIKE's alpha never reaches PaCo
