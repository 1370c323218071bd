"""Golden tests for the evaluator: every reported number checked against hand counts or an independent float64
numpy implementation written here (never against the harness's own code).

The hand-built case has 6 classes whose training counts straddle the shot-group thresholds (many > 100,
medium 20-100, few < 20) and an imbalanced evaluation set of 18 samples, so that top-1, balanced accuracy and a
size-weighted mean all differ; each sample's logits place its label at a chosen rank, so top-1 and top-5 are
known by counting.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness.evaluate import Predictions, expected_calibration_error, quick_metrics, summarize

GROUPS = ("many", "medium", "few")

# Training counts on the thresholds: 101 is many, 100 and 20 are medium, 19 is few.
COUNTS = (150, 101, 100, 20, 19, 5)  # many = {0, 1}, medium = {2, 3}, few = {4, 5}
# Per evaluation sample: (label, rank of the label among the 6 logits; 0 = predicted, 5 = last).
RANKS = {
    0: [0, 0, 0, 1],  # 3/4 top-1
    1: [0, 0, 2, 5],  # 2/4 top-1; the rank-5 sample misses top-5
    2: [0, 4, 1],  # 1/3 top-1; rank 4 is the 5th place: inside top-5, outside a top-4
    3: [0, 0, 0],  # 3/3
    4: [3, 5],  # 0/2; one top-5 miss
    5: [0, 4],  # 1/2
}
PER_CLASS = [3 / 4, 2 / 4, 1 / 3, 3 / 3, 0 / 2, 1 / 2]
TOP1 = 100 * 10 / 18
TOP5 = 100 * 16 / 18
BALANCED = 100 * sum(PER_CLASS) / 6  # 51.39, not the sample-weighted 55.56 nor the count-weighted 55.40
GROUP_ACC = {"many": 100 * (3 / 4 + 2 / 4) / 2, "medium": 100 * (1 / 3 + 1) / 2, "few": 100 * (0 + 1 / 2) / 2}


def ranked_logits(label: int, rank: int, num_classes: int, scale: float) -> list[float]:
    """Logits with distinct values that put `label` at position `rank` of the descending order; the other classes
    fill the remaining positions in index order."""
    order = [c for c in range(num_classes) if c != label]
    order.insert(rank, label)
    logits = [0.0] * num_classes
    for position, c in enumerate(order):
        logits[c] = scale * (num_classes - position) / num_classes
    return logits


def hand_case() -> Predictions:
    """The 18-sample case above. Expert 0 is always right; expert 1 always says class 0."""
    labels, rows = [], []
    for label, ranks in RANKS.items():
        for rank in ranks:
            scale = 1.0 + 1.5 * (len(rows) % 5)  # varied confidences, so ECE and NLL are not trivial
            rows.append(ranked_logits(label, rank, len(COUNTS), scale))
            labels.append(label)
    logits = torch.tensor(rows)
    y = torch.tensor(labels)
    oracle = torch.nn.functional.one_hot(y, len(COUNTS)).float() * 5.0
    always_zero = torch.zeros_like(logits)
    always_zero[:, 0] = 5.0
    return Predictions(logits, torch.stack([oracle, always_zero]), y)


# ----------------------------------------------------------------------------------------------------------------
# An independent float64 reference.


def ref_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def ref_ece(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Equal-width bins (k/bins, (k+1)/bins], right-closed (Guo et al. 2017, MiSLAS): bin = ceil(conf*bins) - 1."""
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = index == b
        if members.any():
            total += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return total


def ref_per_class(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.array([(pred[labels == c] == c).mean() for c in range(num_classes)])


def ref_groups(class_counts) -> dict[str, list[int]]:
    return {"many": [c for c, n in enumerate(class_counts) if n > 100],
            "medium": [c for c, n in enumerate(class_counts) if 20 <= n <= 100],
            "few": [c for c, n in enumerate(class_counts) if n < 20]}


def reference(preds: Predictions, class_counts) -> dict[str, float]:
    """Every scalar of `summarize`, from float64 numpy; `expert{m}_top1` is that expert's top-1 (sample mean)."""
    logits = preds.logits.double().numpy()
    labels = preds.labels.numpy()
    num_classes = len(class_counts)
    probs = ref_softmax(logits)
    pred = logits.argmax(axis=1)
    order = np.argsort(-logits, axis=1)[:, :min(5, num_classes)]
    per_class = ref_per_class(pred, labels, num_classes)
    out = {
        "top1": 100 * (pred == labels).mean(),
        "top5": 100 * (order == labels[:, None]).any(axis=1).mean(),
        "balanced_acc": 100 * per_class.mean(),
        "ece": 100 * ref_ece(probs.max(axis=1), (pred == labels).astype(float)),
        "nll": float(np.mean(-np.log(probs[np.arange(len(labels)), labels]))),
    }
    for group, classes in ref_groups(class_counts).items():
        out[group] = 100 * per_class[classes].mean() if classes else math.nan
    for m, expert in enumerate(preds.expert_logits.double().numpy()):
        out[f"expert{m}_top1"] = 100 * (expert.argmax(axis=1) == labels).mean()
    return out


def ref_hardest_negative(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    probs = ref_softmax(logits.double().numpy())
    probs[np.arange(len(labels)), labels.numpy()] = -np.inf
    return probs.max(axis=1)


def assert_metric(actual: float, expected: float, key: str, tol: float = 1e-4) -> None:
    if math.isnan(expected):
        assert math.isnan(actual), f"{key}: expected NaN, got {actual}"
    else:
        assert actual == pytest.approx(expected, abs=tol), key


def random_case(seed: int, num_classes: int, n: int, experts: int = 3, balanced: bool = False) -> Predictions:
    g = torch.Generator().manual_seed(seed)
    if balanced:
        labels = torch.arange(n) % num_classes
    else:  # imbalanced, every class present
        weights = torch.linspace(3.0, 0.5, num_classes)
        labels = torch.cat([torch.arange(num_classes), torch.multinomial(weights, n - num_classes, True, generator=g)])
    scale = torch.rand(n, 1, generator=g) * 4
    logits = torch.randn(n, num_classes, generator=g) * scale
    logits[torch.arange(n), labels] += torch.rand(n, generator=g) * 3  # better than chance, not perfect
    return Predictions(logits, torch.randn(experts, n, num_classes, generator=g) * 2, labels)


def confidences_clear_of_edges(preds: Predictions, bins: int = 15, gap: float = 1e-4) -> bool:
    """Random cases must not put a confidence within float32 rounding of a bin edge (the edge cases are tested
    on their own, below)."""
    conf = torch.softmax(preds.logits, dim=1).max(dim=1).values.double().numpy() * bins
    return bool(np.all(np.abs(conf - np.round(conf)) > gap))


# ----------------------------------------------------------------------------------------------------------------
# The hand case.


def test_hand_case_accuracies_match_hand_counts():
    metrics, details = summarize(hand_case(), COUNTS)
    assert metrics["top1"] == pytest.approx(TOP1, abs=1e-4)
    assert metrics["top5"] == pytest.approx(TOP5, abs=1e-4)
    assert metrics["balanced_acc"] == pytest.approx(BALANCED, abs=1e-4)
    for group in GROUPS:
        assert metrics[group] == pytest.approx(GROUP_ACC[group], abs=1e-4), group
    np.testing.assert_allclose(details["per_class_acc"], PER_CLASS, atol=1e-6)
    np.testing.assert_array_equal(details["class_counts"], COUNTS)


def test_hand_case_calibration_nll_and_hardest_negative_match_float64_reference():
    preds = hand_case()
    assert confidences_clear_of_edges(preds)
    metrics, details = summarize(preds, COUNTS)
    expected = reference(preds, COUNTS)
    assert metrics["ece"] == pytest.approx(expected["ece"], abs=1e-4)
    assert metrics["nll"] == pytest.approx(expected["nll"], rel=1e-5)
    assert expected["ece"] > 5 and expected["nll"] > 0.5  # the case is not trivially calibrated
    np.testing.assert_allclose(details["hardest_negative_prob"], ref_hardest_negative(preds.logits, preds.labels),
                               atol=1e-6)


def test_expert_top1_on_a_balanced_split():
    """Expert 0 is an oracle; expert 1 always says class 0, so it is right on 1 class in 4."""
    labels = torch.arange(12) % 4
    oracle = torch.nn.functional.one_hot(labels, 4).float()
    always_zero = torch.zeros(12, 4)
    always_zero[:, 0] = 1.0
    preds = Predictions(oracle, torch.stack([oracle, always_zero]), labels)
    metrics, details = summarize(preds, (200, 50, 10, 5))
    assert metrics["expert0_top1"] == pytest.approx(100.0)
    assert metrics["expert1_top1"] == pytest.approx(25.0)
    np.testing.assert_allclose(details["expert_per_class_acc"], [[1, 1, 1, 1], [1, 0, 0, 0]])


def test_expert_top1_is_a_top1_on_an_imbalanced_split():
    preds = hand_case()
    metrics, details = summarize(preds, COUNTS)
    np.testing.assert_allclose(details["expert_per_class_acc"][1], [1, 0, 0, 0, 0, 0])
    assert metrics["expert0_top1"] == pytest.approx(100.0)
    assert metrics["expert1_top1"] == pytest.approx(100 * 4 / 18, abs=1e-4)  # its balanced accuracy is 100/6


def test_top5_with_fewer_than_five_classes_is_always_a_hit():
    preds = random_case(3, num_classes=3, n=15)
    metrics, _ = summarize(preds, (150, 60, 30))
    assert metrics["top5"] == pytest.approx(100.0)
    assert metrics["top1"] < 100.0


# ----------------------------------------------------------------------------------------------------------------
# Shot groups without classes.


@pytest.mark.parametrize("counts, empty", [((150, 60, 30), ("few",)), ((60, 50, 40, 30), ("many", "few")),
                                           ((10, 8, 5, 2), ("many", "medium"))])
def test_a_group_without_classes_is_nan_in_both_paths(counts, empty):
    preds = random_case(11, num_classes=len(counts), n=20)
    final, _ = summarize(preds, counts)
    quick = quick_metrics(preds, counts)
    expected = reference(preds, counts)
    for group in GROUPS:
        assert math.isnan(final[group]) == (group in empty), group
        assert math.isnan(quick[group]) == (group in empty), group
        assert_metric(final[group], expected[group], group)
        assert_metric(quick[group], expected[group], group)


# ----------------------------------------------------------------------------------------------------------------
# Random cases against the reference; the per-epoch and final paths agree.


@pytest.mark.parametrize("seed, num_classes, n, balanced", [(0, 6, 20, False), (1, 5, 17, False), (2, 4, 12, True),
                                                             (3, 10, 60, False)])
def test_summarize_matches_the_float64_reference(seed, num_classes, n, balanced):
    preds = random_case(seed, num_classes, n, balanced=balanced)
    assert confidences_clear_of_edges(preds)
    counts = [200, 120, 80, 40, 20, 19, 10, 7, 5, 3][:num_classes]
    metrics, details = summarize(preds, counts)
    expected = reference(preds, counts)
    for key in ("top1", "top5", "balanced_acc", "ece", "many", "medium", "few"):
        assert_metric(metrics[key], expected[key], key)
    assert metrics["nll"] == pytest.approx(expected["nll"], rel=1e-5)
    for m in range(3):  # a top-1 (sample mean) on balanced and imbalanced splits alike
        assert_metric(metrics[f"expert{m}_top1"], expected[f"expert{m}_top1"], f"expert{m}_top1")
    np.testing.assert_allclose(details["per_class_acc"],
                               ref_per_class(preds.logits.argmax(1).numpy(), preds.labels.numpy(), num_classes),
                               atol=1e-6)
    np.testing.assert_allclose(details["hardest_negative_prob"], ref_hardest_negative(preds.logits, preds.labels),
                               atol=1e-6)


@pytest.mark.parametrize("seed, num_classes, n", [(0, 6, 20), (4, 4, 10), (5, 3, 16)])
def test_quick_metrics_agrees_with_summarize(seed, num_classes, n):
    preds = random_case(seed, num_classes, n)
    counts = [150, 60, 30, 15, 9, 4][:num_classes]
    final, _ = summarize(preds, counts)
    quick = quick_metrics(preds, counts)
    assert set(quick) == {"top1", "balanced_acc", *GROUPS}
    for key in quick:
        assert_metric(quick[key], final[key], key, tol=1e-4)


def test_quick_metrics_on_the_hand_case():
    quick = quick_metrics(hand_case(), COUNTS)
    assert quick["top1"] == pytest.approx(TOP1, abs=1e-4)
    assert quick["balanced_acc"] == pytest.approx(BALANCED, abs=1e-4)
    for group in GROUPS:
        assert quick[group] == pytest.approx(GROUP_ACC[group], abs=1e-4), group


# ----------------------------------------------------------------------------------------------------------------
# ECE: bin edges, confidence 1.0, and the absolute value.


def ece_edge_case() -> tuple[torch.Tensor, torch.Tensor, float]:
    """Four samples (3 classes), ECE by hand with bins (k/15, (k+1)/15]:

    a: confidence on the 9/15 edge, right   -> bin 8 alone: |1 - 0.6| * 1/4 = 0.100
    b: confidence 0.62, wrong               -> bin 9 alone: |0 - 0.62| * 1/4 = 0.155
    c, d: confidence 1.0, one right, one wrong -> bin 14: |0.5 - 1.0| * 2/4 = 0.250

    0.6 is not representable; the float32 edge torch.linspace(0, 1, 16) gives is the float just below it, so a
    confidence equal to that float is on the edge as a float32 implementation sees it, and below the true 9/15, so
    every right-closed convention puts it in bin 8. A lower edge taken as closed (>=) also puts it in bin 9:
    ECE 0.405; dropping the absolute value gives -0.305; a right-open top bin loses confidence 1.0.
    """
    edge = float(torch.linspace(0, 1, 16)[9])
    assert edge < 0.6 and abs(edge - 0.6) < 1e-7
    probs = torch.tensor([[edge, 0.3, 0.1], [0.62, 0.38, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    assert float(probs[0, 0]) == edge
    labels = torch.tensor([0, 1, 0, 2])
    return probs, labels, (1 - edge) / 4 + 0.62 / 4 + 0.5 * 2 / 4


def test_ece_bins_are_right_closed_and_include_confidence_one():
    probs, labels, expected = ece_edge_case()
    assert expected == pytest.approx(0.505, abs=1e-6)
    assert expected_calibration_error(probs, labels, bins=15) == pytest.approx(expected, abs=1e-6)


def test_ece_of_confidence_one_alone():
    """All confidence 1.0: ECE = 1 - accuracy (a right-open top bin would report 0)."""
    probs = torch.tensor([[1.0, 0.0]] * 4)
    labels = torch.tensor([0, 0, 0, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.25, abs=1e-6)


def test_ece_matches_reference_on_random_probabilities():
    g = torch.Generator().manual_seed(7)
    probs = torch.softmax(torch.randn(200, 5, generator=g) * 3, dim=1)
    # right 80 % of the time at every confidence: under-confident bins below 0.8, over-confident above
    guess = torch.randint(0, 5, (200,), generator=g)
    labels = torch.where(torch.rand(200, generator=g) < 0.8, probs.argmax(dim=1), guess)
    conf = probs.max(dim=1).values.double().numpy()
    assert np.all(np.abs(conf * 15 - np.round(conf * 15)) > 1e-5)
    correct = (probs.argmax(dim=1) == labels).double().numpy()
    assert expected_calibration_error(probs, labels) == pytest.approx(ref_ece(conf, correct), abs=1e-6)
    # bins matter: 15 and 5 bins differ on this case
    assert expected_calibration_error(probs, labels, bins=5) == pytest.approx(ref_ece(conf, correct, 5), abs=1e-6)
    assert abs(ref_ece(conf, correct, 5) - ref_ece(conf, correct, 15)) > 1e-3
