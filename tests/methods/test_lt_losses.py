"""Golden values and identities (baselines.md §22) for methods/losses_lt.py.

The references below are a separate float64 implementation written from the papers' equations and the official
code's conventions (plain Python loops over samples and classes); they never call the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.method import ModelOutput
from harness.methods import losses, losses_lt
from harness.methods.losses_lt import (
    CBSoftmaxBCE,
    ClassBalancedCE,
    FocalLoss,
    GCLLoss,
    LADELoss,
    LDAMLoss,
    WeightedCE,
    cb_softmax_bce,
    class_balanced_weights,
    focal_loss,
    gcl_cloud_sizes,
    gcl_loss,
    grw_weights,
    lade_loss,
    lader_loss,
    ldam_loss,
    ldam_margins,
    logit_adjust,
    tau_normalize,
)

M, B, C = 3, 8, 6
COUNTS = [300.0, 120.0, 47.0, 20.0, 9.0, 4.0]
# CIFAR-100-LT, imbalance factor 100 (the LDAM-DRW builder's exponential profile).
CIFAR100_IF100 = [int(500 * 0.01 ** (c / 99)) for c in range(100)]


def _inputs(seed: int = 0, experts: int | None = None, spread: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (B, C) if experts is None else (experts, B, C)
    return spread * torch.randn(*shape, generator=gen, dtype=torch.float64), torch.randint(0, C, (B,), generator=gen)


def _cosines(seed: int = 0, experts: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    z, y = _inputs(seed, experts, spread=1.0)
    return torch.tanh(z), y  # in (-1, 1), like a cosine head


def _close(actual: torch.Tensor, expected: float, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), rtol=rtol, atol=atol)


def _out(expert_logits: torch.Tensor) -> ModelOutput:
    return ModelOutput(logits=expert_logits.mean(0), expert_logits=expert_logits)


# ---- independent float64 reference ----
def _log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    lse = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - lse for v in row]


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _ref_cb(counts: list[float], beta: float) -> list[float]:
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    return [len(counts) * w / sum(raw) for w in raw]


def _ref_grw(counts: list[float], rho: float) -> list[float]:
    raw = [(sum(counts) / n) ** rho for n in counts]
    return [len(counts) * w / sum(raw) for w in raw]


def _ref_focal(z: np.ndarray, y: np.ndarray, gamma: float, w: list[float] | None) -> float:
    total = 0.0
    for b in range(len(y)):
        ce = -_log_softmax(list(z[b]))[y[b]] * (1.0 if w is None else w[y[b]])
        total += (1 - math.exp(-ce)) ** gamma * ce  # p from the (weighted) CE, as kaidic/LDAM-DRW
    return total / len(y)


def _ref_ldam(
    cos: np.ndarray, y: np.ndarray, counts: list[float], max_m: float, s: float, w: list[float] | None, reduction: str
) -> float:
    raw = [n ** (-1 / 4) for n in counts]
    m = [max_m * r / max(raw) for r in raw]
    num = den = 0.0
    for b in range(len(y)):
        row = [s * (cos[b, c] - (m[c] if c == y[b] else 0.0)) for c in range(cos.shape[1])]
        wy = 1.0 if w is None else w[y[b]]
        num += -wy * _log_softmax(row)[y[b]]
        den += wy
    return num / (len(y) if reduction == "batchmean" else den)


def _ref_lade(
    z: np.ndarray, y: np.ndarray, counts: list[float], alpha: float, lam: float, present_only: bool = False
) -> float:
    """hyperconnect/LADE PriorCELoss + alpha * LADELoss, written out per class."""
    prior = [n / sum(counts) for n in counts]
    nb, nc = z.shape
    prior_ce = -sum(_log_softmax([z[b, c] + math.log(prior[c] + 1e-9) for c in range(nc)])[y[b]] for b in range(nb))
    lader = 0.0
    for c in range(nc):
        members = [b for b in range(nb) if y[b] == c]
        if present_only and not members:
            continue
        first = sum(z[b, c] for b in members) / (len(members) + 1e-8)
        shifted = [z[b, c] - math.log(prior[c] + 1e-9) + math.log(1 / nc + 1e-9) for b in range(nb)]
        second = _logsumexp(shifted) - math.log(nb)
        lader -= prior[c] * (first - second - lam * second**2)
    return prior_ce / nb + alpha * lader


def _ref_gcl(
    cos: np.ndarray,
    y: np.ndarray,
    counts: list[float],
    s: float,
    m: float,
    noise_mul: float,
    gamma: float,
    eps: np.ndarray,
) -> float:
    logs = [math.log(n) for n in counts]
    a = [(max(logs) - v) / (max(logs) - min(logs)) for v in logs]
    total = 0.0
    for b in range(len(y)):
        row = [
            s * (cos[b, c] - noise_mul * min(abs(eps[b, c]), 1.0) * a[c] - (m if c == y[b] else 0.0))
            for c in range(cos.shape[1])
        ]
        ce = -_log_softmax(row)[y[b]]
        total += (1 - math.exp(-ce)) ** gamma * ce
    return total / len(y)


def _ref_cb_bce(z: np.ndarray, y: np.ndarray, counts: list[float], beta: float) -> float:
    w = _ref_cb(counts, beta)
    total = 0.0
    for b in range(len(y)):
        probs = [math.exp(v) for v in _log_softmax(list(z[b]))]
        for c, p in enumerate(probs):
            total -= w[y[b]] * (math.log(p) if c == y[b] else math.log(1 - p))
    return total / (len(y) * z.shape[1])


# ---- re-export ----
def test_public_functions_are_reexported_from_losses() -> None:
    for name in ("class_balanced_weights", "focal_loss", "ldam_loss", "logit_adjust", "tau_normalize"):
        assert getattr(losses, name) is getattr(losses_lt, name)


# ---- focal ----
@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_focal_matches_loop_reference_with_p_from_weighted_ce(gamma: float, weighted: bool) -> None:
    z, y = _inputs(1)
    w = _ref_cb(COUNTS, 0.999) if weighted else None
    weight = None if w is None else torch.tensor(w, dtype=torch.float64)
    _close(focal_loss(z, y, gamma, weight), _ref_focal(z.numpy(), y.numpy(), gamma, w))


def test_focal_gamma_zero_is_cross_entropy_also_weighted_with_batch_mean() -> None:
    z, y = _inputs(2)
    w = class_balanced_weights(COUNTS, 0.99).double()
    _close(focal_loss(z, y, 0.0), F.cross_entropy(z, y).item())
    _close(focal_loss(z, y, 0.0, w), F.cross_entropy(z, y, weight=w, reduction="none").mean().item())


def test_focal_vanishes_faster_than_ce_as_target_probability_goes_to_one() -> None:
    y = torch.zeros(1, dtype=torch.long)
    ratios = []
    for gap in (2.0, 5.0, 10.0):
        z = torch.tensor([[gap, 0.0, 0.0]], dtype=torch.float64)
        ratios.append((focal_loss(z, y, 2.0) / F.cross_entropy(z, y)).item())
    assert ratios[0] > ratios[1] > ratios[2] and ratios[2] < 1e-7


def test_focal_on_expert_logits_is_sum_over_experts() -> None:
    z, y = _inputs(3, experts=M)
    _close(focal_loss(z, y, 1.0), sum(focal_loss(z[m], y, 1.0).item() for m in range(M)))


def test_cb_focal_module_uses_class_balanced_weights() -> None:
    z, y = _inputs(4, experts=M)
    loss = FocalLoss(1.0, COUNTS, beta=0.999)(_out(z), y)
    w = [float(v) for v in torch.tensor(_ref_cb(COUNTS, 0.999)).float()]  # the buffer is float32
    _close(loss, sum(_ref_focal(z[m].numpy(), y.numpy(), 1.0, w) for m in range(M)))
    _close(FocalLoss(1.0)(_out(z), y), sum(_ref_focal(z[m].numpy(), y.numpy(), 1.0, None) for m in range(M)))
    with pytest.raises(ValueError, match="class_counts"):
        FocalLoss(1.0, beta=0.9)


# ---- class-balanced weights ----
@pytest.mark.parametrize("beta", [0.9, 0.99, 0.999, 0.9999])
def test_class_balanced_weights_match_formula_and_sum_to_num_classes(beta: float) -> None:
    w = class_balanced_weights(COUNTS, beta)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, torch.tensor(_ref_cb(COUNTS, beta), dtype=torch.float32))
    _close(w.sum(), float(C), rtol=1e-6)


def test_class_balanced_beta_zero_gives_ones() -> None:
    assert torch.equal(class_balanced_weights(COUNTS, 0.0), torch.ones(C))


def test_class_balanced_weights_tend_to_inverse_frequency_as_beta_goes_to_one() -> None:
    inverse = torch.tensor([1 / n for n in COUNTS], dtype=torch.float64)
    inverse = (C * inverse / inverse.sum()).float()
    torch.testing.assert_close(class_balanced_weights(COUNTS, 1.0 - 1e-10), inverse, rtol=1e-5, atol=0)
    torch.testing.assert_close(class_balanced_weights(COUNTS, 1.0), inverse)
    with pytest.raises(ValueError, match="beta"):
        class_balanced_weights(COUNTS, 1.5)


def test_class_balanced_weights_on_cifar100_if100_are_within_3_percent_of_inverse_frequency() -> None:
    inverse = 1.0 / torch.tensor(CIFAR100_IF100, dtype=torch.float64)
    inverse = 100 * inverse / inverse.sum()
    deviation = (class_balanced_weights(CIFAR100_IF100, 0.9999).double() / inverse - 1).abs().max()
    assert 0.01 < deviation < 0.03


def test_class_balanced_ce_reductions_divide_by_batch_or_by_sum_of_weights() -> None:
    z, y = _inputs(5, experts=M)
    w = class_balanced_weights(COUNTS, 0.999).double()
    per_expert_mean = [F.cross_entropy(z[m], y, weight=w).item() for m in range(M)]  # PyTorch: / sum_i w_{y_i}
    per_expert_batch = [F.cross_entropy(z[m], y, weight=w, reduction="none").mean().item() for m in range(M)]
    _close(ClassBalancedCE(COUNTS, 0.999, reduction="weighted")(_out(z), y), sum(per_expert_mean))
    _close(ClassBalancedCE(COUNTS, 0.999)(_out(z), y), sum(per_expert_batch))
    _close(ClassBalancedCE(COUNTS, 0.0)(_out(z), y), sum(F.cross_entropy(z[m], y).item() for m in range(M)))


# ---- LDAM-DRW ----
@pytest.mark.parametrize("reduction", ["batchmean", "weighted"])
@pytest.mark.parametrize("weighted", [False, True])
def test_ldam_matches_loop_reference(reduction: str, weighted: bool) -> None:
    cos, y = _cosines(6)
    w = _ref_cb(COUNTS, 0.9999) if weighted else None
    weight = None if w is None else torch.tensor(w, dtype=torch.float64)
    expected = _ref_ldam(cos.numpy(), y.numpy(), COUNTS, 0.5, 30.0, w, reduction)
    _close(ldam_loss(cos, y, COUNTS, 0.5, 30.0, weight, reduction), expected)
    with pytest.raises(ValueError, match="reduction"):
        ldam_loss(cos, y, COUNTS, reduction="mean")


def test_ldam_rarest_class_gets_exactly_max_margin_and_margins_scale_as_inverse_fourth_root() -> None:
    margins = ldam_margins(COUNTS, 0.5)
    assert margins.dtype == torch.float32 and margins[-1].item() == 0.5 and margins.max().item() == 0.5
    for i in range(C):
        for j in range(C):
            _close(margins[i].double() / margins[j].double(), (COUNTS[j] / COUNTS[i]) ** 0.25, rtol=1e-6)


def test_ldam_zero_margin_is_cross_entropy_of_scaled_cosine() -> None:
    cos, y = _cosines(7)
    _close(ldam_loss(cos, y, COUNTS, max_margin=0.0, scale=30.0), F.cross_entropy(30.0 * cos, y).item())


def test_ldam_module_subtracts_scaled_margin_from_prescaled_logits() -> None:
    cos, y = _cosines(8, experts=M)
    module = LDAMLoss(COUNTS, max_margin=0.5, scale=30.0, drw_start=None).double()
    expected = sum(_ref_ldam(cos[m].numpy(), y.numpy(), COUNTS, 0.5, 30.0, None, "batchmean") for m in range(M))
    _close(module(_out(30.0 * cos), y), expected, rtol=1e-6)
    _close(ldam_loss(cos, y, COUNTS), expected)


def test_drw_weights_are_ones_before_the_switch_epoch_and_class_balanced_after() -> None:
    module = LDAMLoss(COUNTS, drw_beta=0.9999, drw_start=0.8)
    cb = torch.tensor(_ref_cb(COUNTS, 0.9999), dtype=torch.float32)
    module.start_epoch(159, 200)
    assert torch.equal(module.weight, torch.ones(C))
    module.start_epoch(160, 200)  # official: beta = [0, 0.9999][epoch // 160]
    torch.testing.assert_close(module.weight, cb)
    module.start_epoch(0, 200)  # a later stage or a restart goes back to ones
    assert torch.equal(module.weight, torch.ones(C))
    never = LDAMLoss(COUNTS, drw_start=None)
    never.start_epoch(199, 200)
    assert torch.equal(never.weight, torch.ones(C))
    assert {"logit_margins", "weight", "drw_weight"} <= set(module.state_dict())


def test_drw_loss_after_switch_is_the_weighted_mean_of_the_official_code() -> None:
    cos, y = _cosines(9, experts=M)
    module = LDAMLoss(COUNTS, drw_start=0.8).double()
    module.start_epoch(8, 10)
    w = [float(v) for v in torch.tensor(_ref_cb(COUNTS, 0.9999)).float()]
    expected = sum(_ref_ldam(cos[m].numpy(), y.numpy(), COUNTS, 0.5, 30.0, w, "weighted") for m in range(M))
    _close(module(_out(30.0 * cos), y), expected, rtol=1e-6)


# ---- tau-norm ----
def test_tau_norm_zero_is_identity_and_one_gives_unit_rows() -> None:
    weight, _ = _inputs(10)
    assert torch.equal(tau_normalize(weight, 0.0), weight)
    torch.testing.assert_close(tau_normalize(weight, 1.0).norm(dim=1), torch.ones(B, dtype=torch.float64))


def test_tau_norm_matches_loop_reference() -> None:
    weight, _ = _inputs(11)
    rows = weight.numpy()
    expected = [[v / math.sqrt(sum(x * x for x in row)) ** 0.7 for v in row] for row in rows]
    torch.testing.assert_close(tau_normalize(weight, 0.7), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 2.0])
def test_tau_norm_prediction_is_invariant_to_global_rescaling(tau: float) -> None:
    weight, _ = _inputs(12)  # (B, C) read as a (classes, dim) classifier
    features = torch.randn(50, C, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = (features @ tau_normalize(weight, tau).T).argmax(-1)
    for factor in (0.1, 7.0):
        assert torch.equal((features @ tau_normalize(factor * weight, tau).T).argmax(-1), reference)


# ---- post-hoc logit adjustment ----
def test_logit_adjust_tau_zero_is_identity_and_matches_loop_reference() -> None:
    z, _ = _inputs(13)
    assert torch.equal(logit_adjust(z, COUNTS, 0.0), z)
    total = sum(COUNTS)
    expected = [[z[b, c].item() - 0.5 * math.log(COUNTS[c] / total) for c in range(C)] for b in range(B)]
    torch.testing.assert_close(logit_adjust(z, COUNTS, 0.5), torch.tensor(expected, dtype=torch.float64))


def test_posthoc_adjustment_with_tau_one_gives_the_balanced_softmax_decision() -> None:
    z, _ = _inputs(14, experts=M)
    log_n = torch.tensor(COUNTS, dtype=torch.float64).log()
    decision = (z - log_n).argmax(-1)
    assert torch.equal(logit_adjust(z, COUNTS, 1.0).argmax(-1), decision)
    assert torch.equal(logit_adjust(z, [7 * n for n in COUNTS], 1.0).argmax(-1), decision)  # n -> k n
    assert not torch.equal(decision, z.argmax(-1))  # the check is not vacuous on these logits


# ---- LADE ----
def _lade_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    z, _ = _inputs(seed)
    return z, torch.tensor([0, 0, 1, 3, 3, 3, 5, 1])  # classes 2 and 4 absent from the batch


@pytest.mark.parametrize("alpha, lam", [(0.1, 0.01), (0.5, 0.1), (1.0, 0.0)])
def test_lade_matches_official_code_reference(alpha: float, lam: float) -> None:
    z, y = _lade_batch(15)
    _close(lade_loss(z, y, COUNTS, alpha, lam), _ref_lade(z.numpy(), y.numpy(), COUNTS, alpha, lam))


def test_lader_sums_over_all_classes_including_those_absent_from_the_batch() -> None:
    z, y = _lade_batch(16)
    zn, yn = z.numpy(), y.numpy()
    prior_ce = _ref_lade(zn, yn, COUNTS, 0.0, 0.0)
    all_classes = _ref_lade(zn, yn, COUNTS, 1.0, 0.01) - prior_ce
    present = _ref_lade(zn, yn, COUNTS, 1.0, 0.01, present_only=True) - prior_ce
    _close(lader_loss(z, y, COUNTS, 0.01), all_classes)
    assert abs(all_classes - present) > 1e-3


def test_lade_alpha_zero_is_balanced_softmax() -> None:
    z, y = _lade_batch(17)
    prior = torch.tensor(COUNTS, dtype=torch.float64) / sum(COUNTS)
    _close(lade_loss(z, y, COUNTS, alpha=0.0), F.cross_entropy(z + (prior + 1e-9).log(), y).item())
    # The official 1e-9 inside log(prior) moves the logits by < 1e-9 / pi_min.
    _close(lade_loss(z, y, COUNTS, alpha=0.0), losses.balanced_softmax_ce(z, y, COUNTS).item(), rtol=0, atol=1e-7)


def test_lader_with_uniform_prior_has_no_correction_term() -> None:
    z, y = _lade_batch(18)
    lam = 0.1
    mask = F.one_hot(y, C).double()
    first = (z * mask).sum(0) / (mask.sum(0) + 1e-8)
    second = z.logsumexp(0) - math.log(B)  # no log(pi) - log(1/C) shift
    expected = -((first - second - lam * second**2) / C).sum()
    for count in (1.0, 50.0):
        _close(lader_loss(z, y, [count] * C, lam), expected.item())


def test_lader_without_regulariser_ignores_a_constant_added_to_a_present_class_column() -> None:
    z, y = _lade_batch(19)
    shifted = z.clone()
    shifted[:, 3] += 4.0  # class 3 has three samples in the batch
    _close(lader_loss(shifted, y, COUNTS, 0.0), lader_loss(z, y, COUNTS, 0.0).item(), rtol=0, atol=1e-7)


def test_lade_module_sums_experts_with_float32_buffers() -> None:
    z, _ = _inputs(20, experts=M)
    _, y = _lade_batch(20)
    module = LADELoss(COUNTS, alpha=0.1, remine_lambda=0.01)
    assert module.prior.dtype == module.log_prior.dtype == torch.float32
    expected = sum(_ref_lade(z[m].numpy(), y.numpy(), COUNTS, 0.1, 0.01) for m in range(M))
    _close(module(_out(z), y), expected, rtol=1e-6)
    _close(lade_loss(z, y, COUNTS, 0.1, 0.01), expected)


# ---- GCL ----
def _noise(seed: int, shape: tuple[int, ...] = (B, C)) -> torch.Tensor:
    # Wider than N(0, 1/9) and of both signs, so the clamp at 1 and the |.| are exercised.
    return 0.8 * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("margin, gamma", [(0.0, 0.0), (0.1, 1.0), (0.3, 2.0)])
def test_gcl_matches_loop_reference(margin: float, gamma: float) -> None:
    cos, y = _cosines(21)
    eps = _noise(21)
    assert (eps.abs() > 1).any() and (eps < 0).any()
    expected = _ref_gcl(cos.numpy(), y.numpy(), COUNTS, 20.0, margin, 0.5, gamma, eps.numpy())
    _close(gcl_loss(cos, y, COUNTS, 20.0, margin, 0.5, gamma, noise=eps), expected)


def test_gcl_cloud_sizes_are_zero_for_head_one_for_rarest_and_zero_when_balanced() -> None:
    cloud = gcl_cloud_sizes(COUNTS)
    assert cloud[0].item() == 0.0 and cloud[-1].item() == 1.0 and cloud.dtype == torch.float32
    assert torch.equal(gcl_cloud_sizes([10.0] * C), torch.zeros(C))


def test_gcl_without_noise_and_margin_is_cross_entropy_of_scaled_cosine() -> None:
    cos, y = _cosines(22)
    ce = F.cross_entropy(30.0 * cos, y).item()
    _close(gcl_loss(cos, y, COUNTS, noise_mul=0.0), ce)
    _close(ldam_loss(cos, y, COUNTS, max_margin=0.0), ce)  # = LDAM with max_m = 0
    _close(gcl_loss(cos, y, [5.0] * C, noise=_noise(22)), ce)  # balanced counts: no cloud, no NaN


def test_gcl_never_perturbs_the_head_class() -> None:
    cos, y = _cosines(23)
    eps = _noise(23)
    moved = eps.clone()
    moved[:, 0] = 100.0  # class 0 is the head
    assert gcl_loss(cos, y, COUNTS, noise=moved) == gcl_loss(cos, y, COUNTS, noise=eps)


def test_gcl_noise_only_lowers_cosines_and_is_clamped_at_one() -> None:
    cos = torch.tensor([[0.2, 0.1, -0.3, 0.4, 0.0, 0.5]], dtype=torch.float64)
    y = torch.tensor([4])
    base = gcl_loss(cos, y, COUNTS, noise_mul=0.0)
    for sign in (1.0, -1.0):
        on_target, off_target = torch.zeros(1, C, dtype=torch.float64), torch.zeros(1, C, dtype=torch.float64)
        on_target[0, 4], off_target[0, 2] = sign * 0.5, sign * 0.5
        assert gcl_loss(cos, y, COUNTS, noise=on_target) > base  # lower target cosine: higher loss
        assert gcl_loss(cos, y, COUNTS, noise=off_target) < base  # lower non-target cosine: lower loss
    big, one = torch.zeros(1, C, dtype=torch.float64), torch.zeros(1, C, dtype=torch.float64)
    big[0, 5], one[0, 5] = -7.0, 1.0
    assert gcl_loss(cos, y, COUNTS, noise=big) == gcl_loss(cos, y, COUNTS, noise=one)


def test_gcl_draws_its_noise_from_the_global_rng() -> None:
    cos, y = _cosines(24)
    torch.manual_seed(5)
    drawn = gcl_loss(cos, y, COUNTS)
    torch.manual_seed(5)
    eps = torch.randn_like(cos) / 3
    _close(drawn, gcl_loss(cos, y, COUNTS, noise=eps).item())
    assert gcl_loss(cos, y, COUNTS) != drawn  # a fresh draw


def test_gcl_focal_factor_is_detached_unlike_ldam_drw_focal() -> None:
    cos, y = _cosines(25)
    cos_gcl = cos.clone().requires_grad_(True)
    cos_focal = cos.clone().requires_grad_(True)
    gcl = gcl_loss(cos_gcl, y, COUNTS, scale=20.0, noise_mul=0.0, gamma=1.0)
    focal = focal_loss(20.0 * cos_focal, y, 1.0)
    _close(gcl, focal.item())  # same value
    gcl.backward()
    focal.backward()
    z = 20.0 * cos
    p = z.softmax(-1)
    one_minus_p = 1 - p.gather(1, y[:, None])
    detached_grad = 20.0 * one_minus_p * (p - F.one_hot(y, C)) / B
    torch.testing.assert_close(cos_gcl.grad, detached_grad)
    assert not torch.allclose(cos_focal.grad, cos_gcl.grad)


def test_gcl_module_divides_model_logits_by_its_scale() -> None:
    cos, y = _cosines(26, experts=M)
    module = GCLLoss(COUNTS, scale=20.0, margin=0.1, noise_mul=0.5, gamma=1.0)
    torch.manual_seed(3)
    value = module(_out(20.0 * cos), y)
    torch.manual_seed(3)
    eps = torch.randn(M, B, C, dtype=torch.float64) / 3
    expected = sum(_ref_gcl(cos[m].numpy(), y.numpy(), COUNTS, 20.0, 0.1, 0.5, 1.0, eps[m].numpy()) for m in range(M))
    _close(value, expected, rtol=1e-6)


# ---- GRW ----
def test_grw_rho_zero_gives_ones_and_weights_sum_to_num_classes() -> None:
    assert torch.equal(grw_weights(COUNTS, 0.0), torch.ones(C))
    for rho in (0.3, 1.0, 1.2):
        w = grw_weights(COUNTS, rho)
        assert w.dtype == torch.float32
        torch.testing.assert_close(w, torch.tensor(_ref_grw(COUNTS, rho), dtype=torch.float32))
        _close(w.sum(), float(C), rtol=1e-6)
    inverse = torch.tensor([1 / n for n in COUNTS])
    torch.testing.assert_close(grw_weights(COUNTS, 1.0), C * inverse / inverse.sum())


def test_grw_weighted_ce_is_pytorch_weighted_mean_summed_over_experts() -> None:
    z, y = _inputs(27, experts=M)
    w = grw_weights(COUNTS, 1.2)
    expected = sum(F.cross_entropy(z[m], y, weight=w.double()).item() for m in range(M))
    _close(WeightedCE(w)(_out(z), y), expected)
    _close(WeightedCE(grw_weights(COUNTS, 0.0))(_out(z), y), sum(F.cross_entropy(z[m], y).item() for m in range(M)))


# ---- Weight Balancing's CB softmax BCE ----
@pytest.mark.parametrize("beta", [0.0, 0.99, 0.9999])
def test_cb_softmax_bce_matches_loop_reference(beta: float) -> None:
    z, y = _inputs(28)
    _close(cb_softmax_bce(z, y, COUNTS, beta), _ref_cb_bce(z.numpy(), y.numpy(), COUNTS, beta), rtol=1e-6)


def test_cb_softmax_bce_beta_zero_is_plain_bce_on_softmax_and_module_sums_experts() -> None:
    z, y = _inputs(29, experts=M)
    plain = [F.binary_cross_entropy(z[m].softmax(-1), F.one_hot(y, C).double()).item() for m in range(M)]
    _close(cb_softmax_bce(z, y, COUNTS, 0.0), sum(plain))
    expected = sum(_ref_cb_bce(z[m].numpy(), y.numpy(), COUNTS, 0.9999) for m in range(M))
    _close(CBSoftmaxBCE(COUNTS, 0.9999)(_out(z), y), expected, rtol=1e-6)


# ---- every module ----
@pytest.mark.parametrize(
    "module",
    [
        FocalLoss(1.0, COUNTS, 0.9999),
        ClassBalancedCE(COUNTS, 0.9999),
        WeightedCE(grw_weights(COUNTS, 1.2)),
        LDAMLoss(COUNTS),
        LADELoss(COUNTS),
        GCLLoss(COUNTS),
        CBSoftmaxBCE(COUNTS),
    ],
    ids=lambda m: type(m).__name__,
)
def test_modules_give_finite_differentiable_scalars_with_float32_buffers(module: torch.nn.Module) -> None:
    cos, y = _cosines(30, experts=M)
    logits = (30.0 * cos).float().requires_grad_(True)
    module.start_epoch(9, 10)
    loss = module(_out(logits), y)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    assert all(buffer.dtype == torch.float32 for buffer in module.buffers())


def test_gcl_module_reads_cosines_at_the_heads_scale_and_rescales_by_its_own():
    """Stage 2 of GCL: a head scaled by 30, a loss at s = 20; no noise and no margin leave CE(20 cos)."""
    from harness.method import ModelOutput
    from harness.methods.losses_lt import GCLLoss

    cos = torch.rand(1, 6, 5) * 2 - 1
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    loss = GCLLoss((50, 20, 10, 5, 2), scale=20.0, margin=0.0, noise_mul=0.0, head_scale=30.0)
    out = ModelOutput(30 * cos[0], 30 * cos)
    assert float(loss(out, target)) == pytest.approx(float(torch.nn.functional.cross_entropy(20 * cos[0], target)),
                                                     rel=1e-5)


def test_a_class_with_no_training_images_keeps_every_weight_and_margin_finite():
    counts = (50, 10, 0)
    for values in (class_balanced_weights(counts, 0.9999), grw_weights(counts, 1.2), ldam_margins(counts, 0.5),
                   gcl_cloud_sizes(counts), logit_adjust(torch.zeros(2, 3), counts, 1.0)):
        assert torch.isfinite(values).all()
