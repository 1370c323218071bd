"""Calibration: reliability bins, ECE / MCE (percent), NLL, and temperature scaling (Guo et al. 2017).

Bins are the evaluator's (`harness.evaluate.expected_calibration_error`): `bins` equal-width bins of (0, 1], bin b
holding confidences in (b/B, (b+1)/B], the edges compared in float32 as there, so both give the same bin to every
confidence. One difference: a confidence of exactly 0 goes into bin 0 here, while the evaluator's ECE leaves it
out of every bin. The top-class probability of a distribution is at least 1/C, so this only matters for rows that
are not distributions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from harness.evaluate import ECE_BINS

# Temperature search range and tolerance: log T in [-log 100, log 100].
LOG_T_BOUND = math.log(100.0)
LOG_T_TOL = 1e-7
GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass(frozen=True)
class CalibrationBins:
    """Per bin: samples, accuracy and mean confidence (NaN for an empty bin), and the bins' edges."""

    count: np.ndarray  # (B,) int64
    accuracy: np.ndarray  # (B,) float64 in [0, 1]
    confidence: np.ndarray  # (B,) float64 in [0, 1]
    edges: np.ndarray  # (B + 1,) float64, 0 ... 1

    @property
    def gaps(self) -> np.ndarray:
        """|accuracy - confidence| per bin (NaN where empty)."""
        return np.abs(self.accuracy - self.confidence)

    @property
    def ece(self) -> float:
        """sum_b |B_b| / N * |acc_b - conf_b|, in percent."""
        used = self.count > 0
        return 100.0 * float((self.count[used] * self.gaps[used]).sum() / self.count.sum())

    @property
    def mce(self) -> float:
        """max over non-empty bins of |acc_b - conf_b|, in percent."""
        used = self.count > 0
        return 100.0 * float(self.gaps[used].max())


def calibration_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> CalibrationBins:
    """Reliability-diagram data from (N, C) probabilities: the top-class confidence and whether it is right."""
    if probs.ndim != 2 or len(probs) != len(labels) or len(labels) == 0:
        raise ValueError(f"need (N, C) probabilities and N labels, N > 0; got {tuple(probs.shape)} and "
                         f"{tuple(labels.shape)}")
    confidence, pred = probs.detach().cpu().max(dim=1)
    correct = (pred == labels.cpu()).double().numpy()
    edges = torch.linspace(0, 1, bins + 1)  # float32, as the evaluator
    index = torch.zeros(len(confidence), dtype=torch.long)  # confidence <= 0 stays in bin 0
    for b in range(1, bins):
        index[confidence > edges[b]] = b  # (e_b, e_{b+1}] -> b; above 1 (float round-off) stays in the last bin
    index = index.numpy()
    conf = confidence.double().numpy()
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.bincount(index, weights=correct, minlength=bins) / count
        mean_conf = np.bincount(index, weights=conf, minlength=bins) / count
    return CalibrationBins(count.astype(np.int64), accuracy, mean_conf, edges.double().numpy())


def ece(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error in percent (equal-width bins)."""
    return calibration_bins(probs, labels, bins).ece


def mce(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Maximum calibration error in percent: the largest |accuracy - confidence| over non-empty bins."""
    return calibration_bins(probs, labels, bins).mce


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits), in float64 (nats)."""
    return float(F.cross_entropy(logits.detach().double(), labels))


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / T (T > 0): T > 1 softens the softmax, T < 1 sharpens it; the argmax is unchanged."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return logits / temperature


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T minimising NLL(logits / T), by golden-section search on log T in [1/100, 100].

    NLL(beta * z) is convex in beta = 1/T, hence unimodal in log T, so the bracketed search finds the minimum;
    it is deterministic. Constant logits (NLL independent of T) give T = 1; a perfectly separable set has no
    finite optimum and returns the lower bound 0.01."""
    z = logits.detach().cpu().double()
    y = labels.cpu()
    if bool((z == z[:, :1]).all()):
        return 1.0

    def loss(log_t: float) -> float:
        return float(F.cross_entropy(z * math.exp(-log_t), y))

    low, high = -LOG_T_BOUND, LOG_T_BOUND
    a, b = high - GOLDEN * (high - low), low + GOLDEN * (high - low)
    fa, fb = loss(a), loss(b)
    while high - low > LOG_T_TOL:
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - GOLDEN * (high - low)
            fa = loss(a)
        else:
            low, a, fa = a, b, fb
            b = low + GOLDEN * (high - low)
            fb = loss(b)
    return math.exp((low + high) / 2.0)
