"""Test-agnostic evaluation (SADE, Zhang et al. NeurIPS 2022): the balanced test split re-sampled into long-tailed
test sets whose label distribution follows (forward) or opposes (backward) the training one, and logit adjustment
to a known test prior.

SADE's CIFAR protocol (`data_loader/imbalance_cifar.py`, `test_all_cifar.py` in Vanint/SADE-AgnosticLT): 11 test
sets, forward 50/25/10/5/2, uniform (the plain balanced test file), backward 2/5/10/25/50. A shifted set keeps
n_c = int(n_max * (1/IF)^(c/(C-1))) images of class c (label index c, truncation), with n_max the balanced
per-class count; backward uses the exponent (C-1-c)/(C-1), the same counts in reversed class order. SADE picks
*which* n_c images with `np.random.seed(0)` and a per-class shuffle; the harness default takes the first n_c of
each class in file order instead (no random state), and `pick="sade"` reproduces SADE's picks.

For ImageNet-LT and Places-LT SADE ships fixed lists (`data_txt/`) with exactly these counts (n_max 50 and 100),
but not by label index: on Places-LT the counts follow the training counts (the c-th largest training class gets
n_c; checked against Places_LT_train.txt), ImageNet-LT's are not in label order either (its training list was not
checked). `head_to_tail` gives such a ranking, e.g. `harness.studies.figures.size_order(train counts)`; SADE's
order among classes of equal training size, and its choice of images there, are not reproduced.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from harness.data import Split

SHIFTS = (50, 25, 10, 5, 2)  # SADE's test imbalance factors (its imb_factor 0.02 ... 0.5 = 1/IF)
DIRECTIONS = ("forward", "backward")
BALANCED = "balanced"  # SADE calls it "uniform"
DISTRIBUTIONS = (*(f"forward-{s}" for s in SHIFTS), BALANCED, *(f"backward-{s}" for s in reversed(SHIFTS)))
PICKS = ("first", "sade")
SADE_SEED = 0  # IMBALANCECIFAR10(rand_number=0) -> np.random.seed(0)
LOG_PRIOR_EPS = 1e-9  # LADE's official code: log(prior + 1e-9)


def shifted_counts(per_class: int, num_classes: int, imbalance: float, direction: str) -> list[int]:
    """Per-class test counts: forward keeps the most images in class 0, n_c = int(per_class * (1/IF)^(c/(C-1)));
    backward is the same profile in reversed class order. IF = 1 keeps every class at `per_class`."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; known: {', '.join(DIRECTIONS)}")
    if imbalance < 1:
        raise ValueError(f"test imbalance factor must be >= 1, got {imbalance}")
    if per_class < 0 or num_classes < 1:
        raise ValueError(f"need per_class >= 0 and num_classes >= 1, got {per_class}, {num_classes}")
    if num_classes == 1:
        return [per_class]
    ratio = 1.0 / imbalance  # SADE passes the ratio (0.02 == 1/50 as floats), so its float arithmetic is kept
    exponents = [c if direction == "forward" else num_classes - 1 - c for c in range(num_classes)]
    return [int(per_class * ratio ** (e / (num_classes - 1.0))) for e in exponents]


def _balanced_count(labels: torch.Tensor) -> tuple[int, int]:
    """(per_class, num_classes) of a balanced split; ValueError when the classes are not all the same size."""
    if labels.numel() == 0:
        raise ValueError("the test split is empty")
    counts = torch.bincount(labels)
    if int(counts.min()) != int(counts.max()):
        raise ValueError(f"a shifted test set needs a balanced test split; per-class counts range from "
                         f"{int(counts.min())} to {int(counts.max())} over {len(counts)} classes")
    return int(counts[0]), len(counts)


def _chosen(labels: np.ndarray, counts: Sequence[int], pick: str) -> np.ndarray:
    """Indices kept, in file order: per class the first n_c (`first`) or SADE's seeded-shuffle picks (`sade`)."""
    rng = np.random.RandomState(SADE_SEED) if pick == "sade" else None
    keep = []
    for c, n in enumerate(counts):  # classes in label order, as SADE's loop over np.unique(targets)
        idx = np.where(labels == c)[0]
        if rng is not None:
            rng.shuffle(idx)
        keep.append(idx[:n])
    return np.sort(np.concatenate(keep))


def _by_class(profile: list[int], head_to_tail: Sequence[int] | None) -> list[int]:
    """Profile position r -> class head_to_tail[r] (default: position = label index)."""
    if head_to_tail is None:
        return profile
    order = [int(c) for c in head_to_tail]
    if sorted(order) != list(range(len(profile))):
        raise ValueError(f"head_to_tail must be a permutation of the {len(profile)} class indices")
    counts = [0] * len(profile)
    for rank, c in enumerate(order):
        counts[c] = profile[rank]
    return counts


def shifted_split(test: Split, imbalance: float, direction: str, pick: str = "first",
                  head_to_tail: Sequence[int] | None = None) -> Split:
    """The long-tailed test set of `imbalance` and `direction` drawn from a balanced `test` split (deterministic).

    The images keep their file order. `pick="sade"` selects the images SADE's CIFAR loader selects from the same
    file (seed 0, one shuffle per class, classes in label order). `head_to_tail`: class indices from the largest
    training class to the smallest, when that is not the label order."""
    if pick not in PICKS:
        raise ValueError(f"unknown pick {pick!r}; known: {', '.join(PICKS)}")
    per_class, num_classes = _balanced_count(test.labels)
    counts = _by_class(shifted_counts(per_class, num_classes, imbalance, direction), head_to_tail)
    index = torch.from_numpy(_chosen(test.labels.numpy(), counts, pick))
    return Split(test.images[index], test.labels[index])


def test_distributions(test: Split, pick: str = "first",
                       head_to_tail: Sequence[int] | None = None) -> dict[str, Split]:
    """SADE's 11 test sets by name (`DISTRIBUTIONS`): forward-50 ... forward-2, balanced (the split itself),
    backward-2 ... backward-50."""
    _balanced_count(test.labels)
    out = {}
    for name in DISTRIBUTIONS:
        if name == BALANCED:
            out[name] = test
        else:
            direction, factor = name.split("-")
            out[name] = shifted_split(test, float(factor), direction, pick, head_to_tail)
    return out


test_distributions.__test__ = False  # a library function, not a pytest test, wherever a test module imports it


def prior_of(split: Split, num_classes: int | None = None) -> torch.Tensor:
    """The split's class prior (float64, sums to 1); `num_classes` keeps trailing classes a shifted set may lack."""
    counts = torch.bincount(split.labels, minlength=num_classes or 0).double()
    if num_classes is not None and len(counts) > num_classes:
        raise ValueError(f"labels go up to {len(counts) - 1}, beyond num_classes={num_classes}")
    return counts / counts.sum()


def _log_prior(counts: Sequence[float] | torch.Tensor) -> torch.Tensor:
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.ndim != 1 or bool((counts < 0).any()) or float(counts.sum()) <= 0:
        raise ValueError("class counts must be a non-negative vector with a positive sum")
    return (counts / counts.sum() + LOG_PRIOR_EPS).log()


def adjust_to_prior(logits: torch.Tensor, train_counts: Sequence[float] | torch.Tensor,
                    test_counts: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Logits for a known test prior (LADE's post-compensation, Hong et al. 2021): z + log pi_test - log pi_train.

    Counts or priors both work (each is normalised); a zero count adds LADE's 1e-9 inside the log, so a class
    missing from the test prior is all but excluded rather than made -inf. The result has the logits' dtype."""
    train, test = _log_prior(train_counts), _log_prior(test_counts)
    if train.shape != test.shape or logits.shape[-1] != train.shape[0]:
        raise ValueError(f"{logits.shape[-1]} logits per sample, {train.shape[0]} train and {test.shape[0]} "
                         f"test classes")
    return logits + (test - train).to(device=logits.device, dtype=logits.dtype)
