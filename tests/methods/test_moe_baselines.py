"""RIDE, TLC and ResLT as method plugins: they build for 10 and 100 classes, their parameter counts equal a closed
form derived here from the layer shapes, their defaults are the official values, RIDE's router stage trains only
the router and stops adding experts where it says so, a RIDE teacher is loaded and distilled from, TLC's inference
fusion equals a float64 loop, and ResLT's class-index groups scale with the class count. (Golden values for the
losses themselves: tests/methods/test_moe_losses.py.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from harness.config import builder_defaults, resolve_config
from harness.data import Split
from harness.datasets.augment import per_image_pipeline
from harness.errors import HarnessError
from harness.feeders import ReferenceFeeder
from harness.method import MethodSpec, ModelOutput
from harness.methods.losses_moe import reslt_loss
from harness.methods.models.ride_resnet import ChannelPadShortcut, RoutedOutput
from harness.methods.reslt import reslt_group_cuts
from harness.methods.ride import RouterBCE
from harness.registry import METHODS
from harness.trainer import Trainer

METHOD_NAMES = ("ride", "tlc", "reslt")
CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def lt_counts(num_classes: int, n_max: int = 500, imbalance: float = 100.0) -> tuple[int, ...]:
    return tuple(int(n_max * imbalance ** (-i / (num_classes - 1))) for i in range(num_classes))


def build(name: str, num_classes: int = 10, **switches):
    torch.manual_seed(0)
    return METHODS.get(name)(num_classes=num_classes, class_counts=lt_counts(num_classes), **switches)


# ---- building, forward, backward ---------------------------------------------------------------------------------

@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_builds_and_trains_a_step_for_10_and_100_classes(name, num_classes):
    spec = build(name, num_classes, depth=8)
    experts = {"ride": 3, "tlc": 4, "reslt": 3}[name]
    x, y = torch.randn(5, 3, 32, 32), torch.tensor([0, 1, 2, num_classes - 2, num_classes - 1])
    out = spec.model(x)
    assert out.logits.shape == (5, num_classes) and out.expert_logits.shape == (experts, 5, num_classes)
    assert out.features.shape[:2] == (experts, 5)
    loss = sum(t.weight * t.fn(out, y) for t in spec.stages[0].losses)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for g in spec.stages[0].trainable for p in spec.model.parameter_groups()[g]]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert spec.model.architecture()["experts"] == experts and len(spec.model.classifiers()) == experts


# ---- parameter counts: a closed form from the layer shapes -------------------------------------------------------

def block(c_in: int, c_out: int, stride: int, shortcut: str) -> int:
    """BasicBlock: two 3x3 convs without bias, two BNs (weight + bias), and a 1x1 conv + BN projection (option B)
    where the shape changes; option A's zero padding has no parameters."""
    projection = c_in * c_out + 2 * c_out if shortcut == "B" and (stride != 1 or c_in != c_out) else 0
    return 9 * c_in * c_out + 9 * c_out * c_out + 4 * c_out + projection


def stage(c_in: int, c_out: int, blocks: int, stride: int, shortcut: str) -> int:
    return block(c_in, c_out, stride, shortcut) + (blocks - 1) * block(c_out, c_out, 1, shortcut)


STEM = 3 * 9 * 16 + 2 * 16  # 3x3 conv 3 -> 16 without bias, BN


def ride_count(c: int, n: int, shortcut: str, experts: int = 3, widths=(24, 48), router_top: int | None = None) -> int:
    w2, w3 = widths
    per_expert = stage(16, w2, n, 2, shortcut) + stage(w2, w3, n, 2, shortcut) + w3 * c  # cosine head: no bias
    router = 0 if router_top is None else (experts - 1) * (w3 * 16 + 16) + (16 + min(router_top, c) + 1)
    return STEM + stage(16, 16, n, 1, shortcut) + experts * per_expert + router


def tlc_count(c: int, n: int, shortcut: str, experts: int = 4) -> int:
    trunk = stage(16, 16, n, 1, shortcut) + stage(16, 32, n, 2, shortcut) + stage(32, 64, n, 2, shortcut)
    return STEM + experts * (trunk + 64 * c)


def reslt_count(c: int, n: int, shortcut: str) -> int:
    trunk = stage(16, 16, n, 1, shortcut) + stage(16, 32, n, 2, shortcut) + stage(32, 64, n, 2, shortcut)
    return STEM + trunk + 3 * 2 * 64 + 64 * c + c  # three branch BNs, one linear head with bias


COUNTS = {"ride": ride_count, "tlc": tlc_count, "reslt": reslt_count}


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("depth", [8, 32])
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_parameter_counts_equal_the_closed_form(name, depth, shortcut):
    for num_classes in (10, 100):
        model = build(name, num_classes, depth=depth, shortcut=shortcut).model
        expected = COUNTS[name](num_classes, (depth - 2) // 6, shortcut)
        assert sum(p.numel() for p in model.parameters()) == expected
        assert sum(p.numel() for ps in model.parameter_groups().values() for p in ps) == expected


def test_cifar100_resnet32_counts():
    """The counts quoted for CIFAR-100 (ResNet-32 trunks): zero-padding shortcuts as the official code (`own`), and
    the 1x1 projections of SHIKE's recipe (the harness's default shortcut "B")."""
    stated = {("ride", "A"): 783_856, ("ride", "B"): 788_896, ("tlc", "A"): 1_878_224, ("tlc", "B"): 1_889_232,
              ("reslt", "A"): 470_388, ("reslt", "B"): 473_140}
    for (name, shortcut), count in stated.items():
        assert COUNTS[name](100, 5, shortcut) == count
        assert sum(p.numel() for p in build(name, 100, shortcut=shortcut).model.parameters()) == count
    router = build("ride", 100, router=True, shortcut="A").model
    assert sum(p.numel() for p in router.parameters()) == ride_count(100, 5, "A", router_top=30) == 783_856 + 1_615


def test_option_a_pads_any_widening_with_zeros():
    x = torch.randn(2, 16, 8, 8)
    out = ChannelPadShortcut(16, 24, stride=2)(x)
    assert out.shape == (2, 24, 4, 4)
    assert torch.equal(out[:, 4:20], x[:, :, ::2, ::2]) and not out[:, :4].any() and not out[:, 20:].any()


# ---- defaults and recipes ----------------------------------------------------------------------------------------

def test_defaults_are_the_official_values():
    ride = builder_defaults(METHODS.get("ride"))
    assert {k: ride[k] for k in ("experts", "reduce_dimension", "diversity_factor", "max_margin", "scale", "drw",
                                 "drw_beta", "reweight_factor", "router", "router_top", "router_pos_weight",
                                 "teacher", "distill_temperature", "recipe", "depth")} == {
        "experts": 3, "reduce_dimension": True, "diversity_factor": -0.45, "max_margin": 0.5, "scale": 30.0,
        "drw": True, "drw_beta": 0.9999, "reweight_factor": 0.05, "router": False, "router_top": 30,
        "router_pos_weight": 100.0, "teacher": "", "distill_temperature": 1.5, "recipe": "shike", "depth": 32}
    term = build("ride").stages[0].losses[0].fn
    assert (term.diversity_factor, term.drw_start, term.base_temperature) == (-0.45, 0.8, 1.0)
    assert build("ride").model.widths == (16, 24, 48)

    tlc = builder_defaults(METHODS.get("tlc"))
    assert (tlc["experts"], tlc["tau"], tlc["eta"], tlc["fusion"], tlc["annealing"], tlc["diversity_factor"]) == (
        4, 0.54, 0.2, "paper", 500.0, 0.01)
    spec = build("tlc")
    assert (spec.model.eta, spec.model.widths, spec.model.shared) == (0.2, (16, 32, 64), 0)
    assert (spec.stages[0].losses[0].fn.tau, spec.stages[0].losses[0].fn.drw_start) == (0.54, 0.8)

    reslt = builder_defaults(METHODS.get("reslt"))
    assert (reslt["reslt_beta"], reslt["group_cuts"]) == (0.995, "")
    assert build("reslt", 100).stages[0].losses[0].fn.cuts == (35, 70)
    # SHIKE's presets set method.alpha / method.beta wherever a builder has them: none of these may.
    for name in METHOD_NAMES:
        assert not {"alpha", "beta"} & set(builder_defaults(METHODS.get(name)))


def test_recipes_shike_and_own():
    steps = ((0.8, 0.01), (0.9, 1e-4))
    for name, own_steps in (("ride", steps), ("tlc", steps), ("reslt", ((0.8, 0.1), (0.9, 0.01)))):
        shike = build(name, depth=8).stages[0]
        assert (shike.epochs, shike.peak_lr, shike.schedule) == (200, 0.15, None)
        own = build(name, depth=8, recipe="own").stages[0]
        assert (own.epochs, own.peak_lr, own.schedule, own.warmup_epochs, own.lr_steps) == (200, 0.1, "step", 5,
                                                                                             own_steps)
        cfg = resolve_config(name, preset="own")
        assert (cfg.optim.batch_size, cfg.optim.weight_decay, cfg.optim.lr, cfg.data.augment) == (128, 5e-4, 0.1,
                                                                                                   "basic")
        assert cfg.method_kwargs["shortcut"] == "A" and cfg.method_kwargs["recipe"] == "own"
    with pytest.raises(HarnessError, match="unknown recipe"):
        build("ride", recipe="bogus")


# ---- RIDE's router -----------------------------------------------------------------------------------------------

def test_router_stage_is_its_own_and_off_by_default():
    assert [s.name for s in build("ride", depth=8).stages] == ["representation"]
    spec = build("ride", depth=8, router=True, recipe="own")
    router = spec.stages[1]
    assert (router.name, router.trainable, router.sampler, router.freeze_bn) == ("router", ("router",),
                                                                                 "class-balanced", True)
    assert (router.epochs, router.peak_lr, router.schedule, router.warmup_epochs) == (5, 0.01, "cosine", 0)
    assert [t.name for t in router.losses] == ["router"] and float(router.losses[0].fn.pos_weight) == 100.0
    assert set(spec.model.parameter_groups()) == {"backbone", "head", "router"}
    with pytest.raises(HarnessError, match="experts >= 2"):
        build("ride", depth=8, router=True, experts=1)


def toy_split(num_classes: int = 10, per_class: int = 6) -> Split:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return Split(torch.randint(0, 256, (len(labels), 3, 32, 32), dtype=torch.uint8, generator=g), labels)


def test_router_stage_trains_the_router_alone():
    spec = build("ride", depth=8, router=True)
    before = {k: v.clone() for k, v in spec.model.state_dict().items()}
    cfg = resolve_config("ride", device="cpu", overrides={"train.stage_epochs": "1", "optim.batch_size": 20,
                                                          "method.depth": 8, "method.router": True})
    feeder = ReferenceFeeder(toy_split(), per_image_pipeline("none", (0.5,) * 3, (0.25,) * 3), 20, CPU)
    Trainer(MethodSpec(spec.model, spec.stages[1:]), cfg, feeder, CPU).fit()
    after = spec.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("router.") for k in changed), changed
    # BN running statistics included: the stage keeps BN in eval mode
    assert not any("running" in k for k in changed)


def test_router_target_is_wrong_now_but_fixed_later():
    # K = 3 experts, C = 3 classes, target 0 for all four samples; cumulative sums decide correctness
    z = torch.tensor([[[0., 5., 0.], [5., 0., 0.], [0., 5., 0.], [0., 5., 0.]],     # expert 0
                      [[9., 0., 0.], [0., 9., 0.], [0., 0., 0.], [0., 0., 0.]],     # expert 1
                      [[0., 0., 0.], [0., 0., 0.], [9., 0., 0.], [0., 0., 0.]]])    # expert 2
    # correct after 1 / 2 / 3 experts: s0 F T T, s1 T F F, s2 F F T, s3 F F F
    expected_targets = torch.tensor([[1., 0., 1., 0.],   # router 0: wrong now, right after expert 1 or 2
                                     [0., 0., 1., 0.]])  # router 1: wrong after two, right after three
    r = torch.randn(2, 4)
    out = RoutedOutput(z.mean(0), z, router_logits=r)
    loss = RouterBCE(100.0)(out, torch.zeros(4, dtype=torch.long))
    manual = sum(F.binary_cross_entropy_with_logits(r[k], expected_targets[k], pos_weight=torch.tensor([100.0]))
                 for k in range(2)) / 2
    assert torch.allclose(loss, manual)


def set_router_decision(model, bias: float) -> None:
    with torch.no_grad():
        model.router.decide.weight.zero_()
        model.router.decide.bias.fill_(bias)


def test_routed_inference_adds_experts_while_the_router_says_so():
    model = build("ride", depth=8, router=True).model.eval()
    x = torch.randn(6, 3, 32, 32)
    set_router_decision(model, -10.0)  # always "stop": expert 0 alone
    out = model(x)
    assert torch.allclose(out.logits, out.expert_logits[0]) and model.mean_experts_used() == 1.0
    model.reset_routing()
    set_router_decision(model, 10.0)  # always "continue": the full mean
    out = model(x)
    assert torch.allclose(out.logits, out.expert_logits.mean(0)) and model.mean_experts_used() == 3.0
    # the trained-router case, against a per-sample loop of the official rule
    torch.manual_seed(1)
    model = build("ride", depth=8, router=True).model.eval()
    with torch.no_grad():
        model.router.decide.bias.fill_(0.3)
        out = model(x)
        for b in range(6):
            total, used = out.expert_logits[0, b].clone(), 1
            for k in range(1, 3):
                r = model.router(k - 1, out.features[k - 1, b:b + 1], (total / used)[None])
                if torch.sigmoid(r).item() <= 0.5:
                    break
                total, used = total + out.expert_logits[k, b], used + 1
            assert torch.allclose(out.logits[b], total / used, atol=1e-5)


# ---- RIDE's teacher ----------------------------------------------------------------------------------------------

def test_a_saved_ride_model_is_loaded_as_a_frozen_teacher(tmp_path):
    teacher = build("ride", depth=8, experts=2, shortcut="A").model
    path = tmp_path / "final_weights.pt"
    torch.save(teacher.state_dict(), path)
    spec = build("ride", depth=8, teacher=str(path))
    assert [(t.name, t.weight) for t in spec.stages[0].losses] == [("ride", 3.0), ("distill", 3.0)]
    assert spec.model.architecture()["teacher_experts"] == 2
    assert sum(p.numel() for p in spec.model.parameters()) == ride_count(10, 1, "B")  # the teacher is not a part
    assert not any(k.startswith("teacher") for k in spec.model.state_dict())
    x = torch.randn(4, 3, 32, 32)
    out = spec.model.train()(x)
    assert torch.allclose(out.teacher_logits, teacher.eval()(x).logits, atol=1e-6)
    loss = spec.stages[0].losses[1].fn(out, torch.arange(4))
    t = 1.5
    manual = t * t * F.kl_div(F.log_softmax(out.logits / t, 1), F.softmax(out.teacher_logits / t, 1),
                              reduction="batchmean")
    assert torch.allclose(loss, manual, atol=1e-6)
    spec.model.double()  # `.to()` and the like reach the teacher, though it is no submodule
    assert next(spec.model.teacher.parameters()).dtype == torch.float64
    assert build("ride", depth=8, teacher=str(path), recipe="own").stages[0].warmup_epochs == 20
    with pytest.raises(HarnessError, match="no file"):
        build("ride", depth=8, teacher=str(tmp_path / "missing.pt"))
    with pytest.raises(HarnessError, match="not a RIDE model state dict for 100 classes"):
        build("ride", 100, depth=8, teacher=str(path))


# ---- TLC's fusion ------------------------------------------------------------------------------------------------

def tlc_fusion_loop(expert_logits: torch.Tensor, eta: float) -> torch.Tensor:
    """TLC's inference in float64, one sample and one expert at a time: evidence e = exp(z), S = sum(e) + C,
    b = e / S, u = C / S, conflict c = sum_{a != c} b_prev[a] b[c]; w_0 = 1, w_{k+1} = w_k u_k / (1 - c_k); the
    output is sum_k softmax_k(w / eta)_k z_k."""
    z = expert_logits.double()
    experts, batch, classes = z.shape
    fused = torch.zeros(batch, classes, dtype=torch.float64)
    for i in range(batch):
        weights, previous = [1.0], None
        for k in range(experts - 1):
            evidence = [math.exp(v) for v in z[k, i].tolist()]
            strength = sum(evidence) + classes
            belief = [e / strength for e in evidence]
            conflict = 0.0 if previous is None else sum(previous[a] * belief[c] for a in range(classes)
                                                       for c in range(classes) if a != c)
            weights.append(weights[-1] * (classes / strength) / (1 - conflict))
            previous = belief
        scores = [math.exp(w / eta) for w in weights]
        for k in range(experts):
            fused[i] += scores[k] / sum(scores) * z[k, i]
    return fused


def test_tlc_inference_fusion_equals_a_float64_loop():
    model = build("tlc", depth=8, experts=3).model.eval()
    x = torch.randn(3, 3, 32, 32)
    out = model(x)
    assert torch.allclose(out.logits.double(), tlc_fusion_loop(out.expert_logits, 0.2), atol=1e-4)
    # small logits, where the weights differ visibly from the mean
    z = torch.randn(3, 4, 5)
    assert torch.allclose(model.aggregate(z).double(), tlc_fusion_loop(z, 0.2), atol=1e-5)
    assert not torch.allclose(model.aggregate(z), z.mean(0), atol=1e-3)


def test_tlc_code_fusion_normalises_over_the_batch():
    model = build("tlc", depth=8, experts=3, fusion="code").model
    z = torch.randn(3, 4, 5)
    from harness.methods.losses_moe import tlc_engagement

    scores = (tlc_engagement(z) / 0.2).exp()
    expected = (scores / scores.sum(dim=1, keepdim=True))[..., None] * z
    assert torch.allclose(model.aggregate(z), expected.sum(0), atol=1e-6)
    with pytest.raises(ValueError, match="unknown TLC fusion"):
        build("tlc", depth=8, fusion="bogus")


# ---- ResLT's groups ----------------------------------------------------------------------------------------------

def test_reslt_group_cuts_scale_with_the_class_count():
    assert reslt_group_cuts(100) == (35, 70)
    assert reslt_group_cuts(10) == (4, 7)  # 3.5 and 7.0, halves rounded up
    assert reslt_group_cuts(1000) == (350, 700) and reslt_group_cuts(8) == (3, 6)
    assert reslt_group_cuts(10, "2,4") == (2, 4)  # the official CIFAR-10 script's cuts
    for bad in ("2", "a,b", "5,3", "0,11"):
        with pytest.raises(HarnessError, match="group_cuts"):
            reslt_group_cuts(10, bad)
    assert build("reslt", 10, group_cuts="2,4").stages[0].losses[0].fn.cuts == (2, 4)


def test_reslt_groups_rank_unsorted_classes_by_count_as_the_official_imagenet_loader():
    """Counts not sorted by id (ImageNet-LT's list labels): the groups are cuts in the count ranking, so the loss
    equals `reslt_loss` on the problem relabelled by rank (columns and labels permuted alike); sorted counts are
    left alone (no buffer, the CIFAR loss as it was)."""
    counts = (5, 9, 1, 7)  # ranked by decreasing count: classes 1, 3, 0, 2
    term = METHODS.get("reslt")(num_classes=4, class_counts=counts, group_cuts="1,3").stages[0].losses[0].fn
    torch.manual_seed(0)
    z, y = torch.randn(3, 6, 4), torch.tensor([0, 1, 2, 3, 2, 0])
    relabel = torch.tensor([2, 0, 3, 1])  # class -> rank
    expected = reslt_loss(z[..., [1, 3, 0, 2]], relabel[y], beta=0.995, group_cuts=(1, 3))
    torch.testing.assert_close(term(ModelOutput(z.sum(0), z, None), y), expected)
    assert "rank" in dict(term.named_buffers())
    plain = METHODS.get("reslt")(num_classes=4, class_counts=(9, 7, 5, 1), group_cuts="1,3").stages[0].losses[0].fn
    assert not dict(plain.named_buffers())
    torch.testing.assert_close(plain(ModelOutput(z.sum(0), z, None), y),
                               reslt_loss(z, y, beta=0.995, group_cuts=(1, 3)))


def test_reslt_branches_share_one_head_and_sum():
    spec = build("reslt", 10, depth=8)
    model = spec.model.eval()
    out = model(torch.randn(4, 3, 32, 32))
    head = model.head
    assert torch.allclose(out.expert_logits, out.features @ head.weight.T + head.bias, atol=1e-5)
    assert torch.allclose(out.logits, out.expert_logits.sum(0), atol=1e-5)
    y = torch.tensor([0, 4, 7, 9])
    assert torch.allclose(spec.stages[0].losses[0].fn(out, y), reslt_loss(out.expert_logits, y, beta=0.995,
                                                                           group_cuts=(4, 7)))
    # the identity of baselines.md section 22: beta = 0 is CE on the summed logits
    beta0 = build("reslt", 10, depth=8, reslt_beta=0.0).stages[0].losses[0].fn
    assert torch.allclose(beta0(ModelOutput(out.logits, out.expert_logits), y), F.cross_entropy(out.logits, y))
