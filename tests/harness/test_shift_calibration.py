"""Test-agnostic test sets (SADE's protocol) and calibration: hand-computed counts, bins and golden values.

Expected values are worked out by hand in the comments (or taken from SADE's published list files), never read back
from the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.calibration import (
    apply_temperature,
    calibration_bins,
    ece,
    fit_temperature,
    mce,
    nll,
)
from harness.data import Split
from harness.evaluate import expected_calibration_error
from harness.shift import SHIFTS, adjust_to_prior, prior_of, shifted_counts, shifted_split, test_distributions


def split_of(labels: list[int]) -> Split:
    """A split whose image i is filled with the value i, so the kept file positions can be read off the images."""
    n = len(labels)
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).clone()
    return Split(images, torch.tensor(labels, dtype=torch.int64))


def positions(split: Split) -> list[int]:
    return split.images[:, 0, 0, 0].tolist()


# ---------------------------------------------------------------- shifted test sets


def test_forward_and_backward_counts_by_hand():
    # 100 * 10^(-k/9), truncated: 10^(-1/9) = 0.7743, 10^(-2/9) = 0.5995, 10^(-1/3) = 0.4642, 10^(-4/9) = 0.3594,
    # 10^(-5/9) = 0.2783, 10^(-2/3) = 0.2154, 10^(-7/9) = 0.1668, 10^(-8/9) = 0.1292, 10^(-1) = 0.1
    forward = [100, 77, 59, 46, 35, 27, 21, 16, 12, 10]
    assert shifted_counts(100, 10, 10, "forward") == forward
    assert shifted_counts(100, 10, 10, "backward") == forward[::-1]


def test_imbalance_one_is_balanced():
    assert shifted_counts(100, 10, 1, "forward") == [100] * 10
    assert shifted_counts(100, 10, 1, "backward") == [100] * 10
    assert shifted_counts(7, 1, 50, "forward") == [7]


# Totals of SADE's shipped lists (data_txt/ImageNet_LT/ImageNet_LT_{forward,backward}{50,25,10,5,2}.txt: 1000 classes,
# 50 test images each; data_txt/Places_LT_v2/...: 365 classes, 100 each), forward and backward alike.
SADE_TOTALS = {
    (50, 1000): {50: 12058, 25: 14437, 10: 19059, 5: 24365, 2: 35574},
    (100, 365): {50: 8989, 25: 10727, 10: 14103, 5: 17970, 2: 26155},
}


@pytest.mark.parametrize("per_class,num_classes", list(SADE_TOTALS))
def test_totals_match_sades_published_lists(per_class, num_classes):
    for factor, total in SADE_TOTALS[per_class, num_classes].items():
        for direction in ("forward", "backward"):
            counts = shifted_counts(per_class, num_classes, factor, direction)
            assert sum(counts) == total, (factor, direction)
            assert counts[0 if direction == "forward" else -1] == per_class
            assert counts[-1 if direction == "forward" else 0] == per_class // factor  # 50/50 = 1, 100/50 = 2


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="direction"):
        shifted_counts(10, 3, 2, "sideways")
    with pytest.raises(ValueError, match=">= 1"):
        shifted_counts(10, 3, 0.5, "forward")


# 3 classes interleaved in file order: class c sits at positions c, c + 3, c + 6, c + 9.
INTERLEAVED = [i % 3 for i in range(12)]


def test_shifted_split_takes_the_first_images_of_each_class_in_file_order():
    # per_class 4, IF 4: 4 * 0.25^0 = 4, 4 * 0.25^0.5 = 2, 4 * 0.25^1 = 1
    forward = shifted_split(split_of(INTERLEAVED), 4, "forward")
    assert positions(forward) == [0, 1, 2, 3, 4, 6, 9]  # class 0: 0,3,6,9; class 1: 1,4; class 2: 2
    assert forward.labels.tolist() == [0, 1, 2, 0, 1, 0, 0]
    backward = shifted_split(split_of(INTERLEAVED), 4, "backward")
    assert positions(backward) == [0, 1, 2, 4, 5, 8, 11]  # class 0: 0; class 1: 1,4; class 2: 2,5,8,11
    again = shifted_split(split_of(INTERLEAVED), 4, "forward")
    assert torch.equal(again.images, forward.images) and torch.equal(again.labels, forward.labels)


def test_head_to_tail_ranks_classes_by_training_size():
    # class 2 is the largest training class, then 0, then 1: counts 4, 2, 1 go to classes 2, 0, 1
    ranked = shifted_split(split_of(INTERLEAVED), 4, "forward", head_to_tail=[2, 0, 1])
    assert torch.bincount(ranked.labels).tolist() == [2, 1, 4]
    with pytest.raises(ValueError, match="permutation"):
        shifted_split(split_of(INTERLEAVED), 4, "forward", head_to_tail=[0, 0, 1])


def sade_cifar_selection(targets: list[int], img_num_per_cls: list[int]) -> list[int]:
    """SADE's IMBALANCECIFAR10.gen_imbalanced_data (data_loader/imbalance_cifar.py), indices only, transcribed."""
    state = np.random.get_state()
    try:
        np.random.seed(0)
        targets_np = np.array(targets, dtype=np.int64)
        chosen = []
        for the_class, the_img_num in zip(np.unique(targets_np), img_num_per_cls):
            idx = np.where(targets_np == the_class)[0]
            np.random.shuffle(idx)
            chosen.extend(idx[:the_img_num].tolist())
        return sorted(chosen)
    finally:
        np.random.set_state(state)


def test_pick_sade_reproduces_sades_seeded_selection():
    labels = [i % 4 for i in range(40)]  # 4 classes x 10
    for direction in ("forward", "backward"):
        split = shifted_split(split_of(labels), 5, direction, pick="sade")
        # 10 * 0.2^(k/3): 10, 5.848 -> 5, 3.420 -> 3, 2
        counts = [10, 5, 3, 2] if direction == "forward" else [2, 3, 5, 10]
        assert positions(split) == sade_cifar_selection(labels, counts)


def test_unbalanced_or_empty_test_split_is_refused():
    with pytest.raises(ValueError, match="balanced"):
        shifted_split(split_of([0, 0, 1]), 2, "forward")
    with pytest.raises(ValueError, match="balanced"):
        shifted_split(split_of([0, 0, 2, 2]), 2, "forward")  # class 1 has no image
    with pytest.raises(ValueError, match="balanced"):
        test_distributions(split_of([0, 1, 1]))
    with pytest.raises(ValueError, match="pick"):
        shifted_split(split_of(INTERLEAVED), 2, "forward", pick="random")


def test_eleven_distributions_from_most_forward_to_most_backward():
    sets = test_distributions(split_of([i % 2 for i in range(200)]))  # 2 classes x 100
    assert list(sets) == ["forward-50", "forward-25", "forward-10", "forward-5", "forward-2", "balanced",
                          "backward-2", "backward-5", "backward-10", "backward-25", "backward-50"]
    assert SHIFTS == (50, 25, 10, 5, 2)
    # 2 classes: class 1 keeps 100 / IF
    assert torch.bincount(sets["forward-50"].labels).tolist() == [100, 2]
    assert torch.bincount(sets["forward-2"].labels).tolist() == [100, 50]
    assert torch.bincount(sets["balanced"].labels).tolist() == [100, 100]
    assert torch.bincount(sets["backward-10"].labels).tolist() == [10, 100]


def test_prior_of_counts_labels():
    split = split_of([0, 0, 1, 2])
    assert prior_of(split).tolist() == [0.5, 0.25, 0.25]
    assert prior_of(split, num_classes=4).tolist() == [0.5, 0.25, 0.25, 0.0]


def test_adjust_to_prior_is_the_identity_when_the_priors_agree():
    logits = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(adjust_to_prior(logits, [30, 20, 10], [30, 20, 10]), logits)
    assert torch.allclose(adjust_to_prior(logits, [30, 20, 10], [3, 2, 1]), logits, atol=1e-6)  # a prior works too


def test_adjust_to_prior_adds_log_test_over_train_prior():
    # train prior (3/4, 1/4), test prior (1/4, 3/4): class 0 gets log(1/3), class 1 log 3
    out = adjust_to_prior(torch.zeros(1, 2, dtype=torch.float64), [3, 1], [1, 3])
    assert out[0].tolist() == pytest.approx([-math.log(3), math.log(3)], abs=1e-8)
    with pytest.raises(ValueError):
        adjust_to_prior(torch.zeros(1, 3), [3, 1], [1, 3])


# ---------------------------------------------------------------- calibration

# (confidence of the predicted class 0, correct?) over 4 classes; 15 bins of width 1/15 = 0.0667:
# 0.95 -> bin 14 (0.933, 1], 0.90 -> bin 13 (0.867, 0.933], 0.50 -> bin 7 (0.467, 0.533], 0.30 -> bin 4 (0.267, 0.333]
SAMPLES = [(0.95, True), (0.95, False), (0.90, True), (0.50, True), (0.50, False), (0.30, False)]
# bin 14: 2 samples, acc 1/2, conf 0.95, gap 0.45; bin 13: 1, acc 1, conf 0.9, gap 0.1;
# bin 7: 2, acc 1/2, conf 0.5, gap 0; bin 4: 1, acc 0, conf 0.3, gap 0.3
ECE_HAND = 100 * (2 * 0.45 + 1 * 0.1 + 2 * 0.0 + 1 * 0.3) / 6  # 21.667 %
MCE_HAND = 45.0


def hand_probs() -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.tensor([[p, (1 - p) / 3, (1 - p) / 3, (1 - p) / 3] for p, _ in SAMPLES], dtype=torch.float64)
    labels = torch.tensor([0 if right else 1 for _, right in SAMPLES])
    return probs, labels


def test_bins_ece_and_mce_by_hand():
    probs, labels = hand_probs()
    bins = calibration_bins(probs, labels)
    assert bins.count.tolist() == [0, 0, 0, 0, 1, 0, 0, 2, 0, 0, 0, 0, 0, 1, 2]
    used = [4, 7, 13, 14]
    assert bins.accuracy[used].tolist() == [0.0, 0.5, 1.0, 0.5]
    assert bins.confidence[used] == pytest.approx([0.3, 0.5, 0.9, 0.95])
    assert np.isnan(bins.accuracy[0]) and np.isnan(bins.confidence[0])
    assert bins.edges[0] == 0 and bins.edges[-1] == 1 and len(bins.edges) == 16
    assert ece(probs, labels) == pytest.approx(ECE_HAND, abs=1e-9)
    assert mce(probs, labels) == pytest.approx(MCE_HAND, abs=1e-9)


def test_bins_are_right_closed_and_a_zero_confidence_goes_to_bin_zero():
    # a confidence on an edge k/15 belongs to bin k-1 ((e_{k-1}, e_k]); 1.0 is in the last bin
    edges = torch.linspace(0, 1, 16)
    probs = torch.stack([edges[1], edges[7], torch.tensor(1.0)])[:, None]
    assert calibration_bins(probs, torch.zeros(3, dtype=torch.long)).count.nonzero()[0].tolist() == [0, 6, 14]
    zero = calibration_bins(torch.zeros(1, 2), torch.tensor([0]))
    assert zero.count.tolist() == [1] + [0] * 14


@pytest.mark.parametrize("seed", range(4))
def test_ece_equals_the_evaluators_ece_in_percent(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(500, 7, generator=g) * (1 + seed)
    labels = torch.randint(0, 7, (500,), generator=g)
    probs = F.softmax(logits, dim=1)
    assert ece(probs, labels) == pytest.approx(100 * expected_calibration_error(probs, labels), abs=1e-4)
    on_edges = torch.linspace(0, 1, 16)[1:, None]  # one class: every confidence on an edge, all correct
    edge_labels = torch.zeros(15, dtype=torch.long)
    assert ece(on_edges, edge_labels) == pytest.approx(100 * expected_calibration_error(on_edges, edge_labels),
                                                       abs=1e-4)


def test_nll_golden():
    # softmax(log 3, 0) = (3/4, 1/4): -log(3/4) = 0.287682, -log(1/4) = 1.386294, mean 0.836988
    logits = torch.tensor([[math.log(3), 0.0], [math.log(3), 0.0]])
    assert nll(logits, torch.tensor([0, 1])) == pytest.approx(0.8369882167858358, abs=1e-6)
    assert nll(torch.zeros(3, 4), torch.tensor([0, 1, 2])) == pytest.approx(math.log(4), abs=1e-12)


def calibrated_source(n: int = 20000, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose softmax is the true label distribution (labels are drawn from it): calibrated by design."""
    g = torch.Generator().manual_seed(0)
    logits = 2.0 * torch.randn(n, classes, generator=g, dtype=torch.float64)
    labels = torch.multinomial(F.softmax(logits, dim=1), 1, generator=g).squeeze(1)
    return logits, labels


def test_temperature_recovers_a_known_overconfidence():
    logits, labels = calibrated_source()
    assert fit_temperature(logits, labels) == pytest.approx(1.0, rel=0.05)
    t = fit_temperature(3.0 * logits, labels)
    assert t == pytest.approx(3.0, rel=0.05)
    fitted = apply_temperature(3.0 * logits, t)
    assert nll(fitted, labels) < nll(3.0 * logits, labels)
    for nearby in (0.99 * t, 1.01 * t):  # a minimum, not just an improvement
        assert nll(fitted, labels) <= nll(apply_temperature(3.0 * logits, nearby), labels)
    assert ece(F.softmax(fitted, dim=1), labels) < ece(F.softmax(3.0 * logits, dim=1), labels)


def test_temperature_edge_cases():
    assert fit_temperature(torch.zeros(4, 3), torch.tensor([0, 1, 2, 0])) == 1.0  # NLL does not depend on T
    logits, labels = calibrated_source(200, 4)
    assert fit_temperature(logits, labels) == fit_temperature(logits, labels)  # deterministic
    assert apply_temperature(torch.tensor([[2.0, 4.0]]), 2.0).tolist() == [[1.0, 2.0]]
    with pytest.raises(ValueError):
        apply_temperature(torch.zeros(1, 2), 0.0)
