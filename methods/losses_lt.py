"""Long-tailed baseline losses beyond CE / Balanced Softmax / LA: focal, class-balanced, LDAM-DRW, tau-norm, post-hoc
logit adjustment, LADE, GCL, DisAlign's GRW and Weight Balancing's CB-softmax BCE; functions and loss modules.

Shapes as in `losses.py`: logits are (B, C), or (M, B, C) expert logits for which every loss is the sum over experts
of the per-expert loss; `target` is int64 (B,). "batchmean" divides by the batch size B; "weighted" divides by
sum_i w_{y_i} (PyTorch's `cross_entropy(weight=...)` 'mean'). Count-derived vectors are computed in float64 (module
buffers are then stored in float32). No loss syncs with the host.

What each loss follows (the official code where it differs from the paper; see reference/baselines.md):
- Focal (Lin et al. 2017, Eq. 5, softmax form) as kaidic/LDAM-DRW `losses.py: focal_loss`.
- Class-balanced weights (Cui et al. 2019, Eq. 3-4 / Sec. 3.3): w_c = (1 - beta) / (1 - beta^n_c), sum C.
- LDAM (Cao et al. 2019, Eq. 13 and DRW Alg. 1) as kaidic/LDAM-DRW `losses.py: LDAMLoss`, `cifar_train.py`.
- tau-norm (Kang et al. 2020, Sec. 4): w_c / ||w_c||^tau, as classifier-balancing `tau_norm.py: pnorm`.
- Post-hoc logit adjustment (Menon et al. 2021, Eq. 9): argmax of z - tau log pi.
- LADE (Hong et al. 2021, Eq. 6-12) as hyperconnect/LADE `loss/PriorCELoss.py` + `loss/LADELoss.py`.
- GCL (Li et al. 2022, Eq. 5-7) as Keke921/GCLLoss `losses.py: GCLLoss` (and its detached `focal_loss`).
- GRW (Zhang et al. 2021, DisAlign Eq. 8) as DisAlign's `GRWCrossEntropyLoss._init_weights`.
- CB softmax BCE as ShadeAlsha/LTR-weight-balancing `utils/class_balanced_loss.py: CB_loss(loss_type="softmax")`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from harness.method import LossTermModule, ModelOutput

Counts = torch.Tensor | Sequence[float]
CE_REDUCTIONS = ("batchmean", "weighted")
# LADE's official code adds 1e-9 inside log(prior) (PriorCELoss and LADELoss) and 1e-8 to the per-class batch count.
LADE_LOG_EPS = 1e-9
LADE_COUNT_EPS = 1e-8
# GCL: eps ~ N(0, GCL_NOISE_STD^2), clamped to [-1, 1] (official `normal.Normal(0, 1/3).sample(...).clamp(-1, 1)`).
GCL_NOISE_STD = 1.0 / 3.0


# ---- helpers ----
def _counts64(class_counts: Counts, like: torch.Tensor | None = None) -> torch.Tensor:
    """Counts as float64, on `like`'s device when given (else where they are). A class with no training images
    (tiny or truncated splits) counts as one, so weights, margins and priors stay finite; it is never a target."""
    device = like.device if like is not None else None
    return torch.as_tensor(class_counts).to(device=device, dtype=torch.float64).clamp(min=1)


def _dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.promote_types(logits.dtype, torch.float32)


def _target_mask(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, C) bool one-hot; not F.one_hot, which checks the range on the host (a sync per call)."""
    return target[:, None] == torch.arange(num_classes, device=target.device)


def _per_sample_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)_y for (..., B, C) logits: (..., B)."""
    log_p = F.log_softmax(logits, dim=-1)
    return -log_p.gather(-1, target.expand(logits.shape[:-1])[..., None]).squeeze(-1)


def _weighted_ce(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None, reduction: str
) -> torch.Tensor:
    """sum_i w_{y_i} ce_i / B ("batchmean") or / sum_i w_{y_i} ("weighted"), summed over experts."""
    if reduction not in CE_REDUCTIONS:
        raise ValueError(f"unknown reduction '{reduction}', expected one of {CE_REDUCTIONS}")
    ce = _per_sample_ce(logits, target)
    if weight is None:
        return ce.sum() / target.shape[0]
    sample_weight = weight.to(ce.dtype)[target]
    total = (ce * sample_weight).sum()
    return total / (target.shape[0] if reduction == "batchmean" else sample_weight.sum())


def _focal(ce: torch.Tensor, gamma: float, detach: bool = False) -> torch.Tensor:
    """(1 - p)^gamma * ce with p = exp(-ce); `detach` stops the gradient through (1 - p) (GCL's version)."""
    if gamma == 0:
        return ce
    one_minus_p = -torch.expm1(-ce)
    return (one_minus_p.detach() if detach else one_minus_p) ** gamma * ce


# ---- focal and class-balanced ----
def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, gamma: float, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax focal loss (Lin et al. 2017, Eq. 5): mean over B of (1 - p_i)^gamma * ce_i.

    As kaidic/LDAM-DRW `losses.py`: ce_i = F.cross_entropy(logits, target, weight=weight, reduction='none'), i.e.
    w_{y_i} * (-log softmax_y), and p_i = exp(-ce_i). So with a class weight p_i is computed from the *weighted* CE
    (p_i != softmax_y), and the mean divides by B, not by sum_i w_{y_i}. gamma = 0 gives CE (weighted: / B).
    The gradient flows through (1 - p) (GCL's copy detaches it; see `gcl_loss`). (M, B, C): sum over experts.
    """
    ce = _per_sample_ce(logits, target)
    if weight is not None:
        ce = ce * weight.to(ce.dtype)[target]
    return _focal(ce, gamma).sum() / target.shape[0]


def _class_balanced64(counts: torch.Tensor, beta: float) -> torch.Tensor:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    # beta = 1 is the limit of (1 - beta) / (1 - beta^n) -> 1 / n.
    weights = 1.0 / counts if beta == 1.0 else (1.0 - beta) / (1.0 - beta**counts)
    return weights * (counts.numel() / weights.sum())


def class_balanced_weights(class_counts: Counts, beta: float) -> torch.Tensor:
    """Class-balanced weights (Cui et al. 2019, Eq. 3-4): w_c = (1 - beta) / (1 - beta^n_c) = 1 / E_{n_c},
    renormalised so that sum_c w_c = C. Computed in float64, returned in float32 (C,). beta = 0 gives ones."""
    return _class_balanced64(_counts64(class_counts), beta).to(torch.float32)


def grw_weights(class_counts: Counts, rho: float) -> torch.Tensor:
    """DisAlign's generalised re-weighting (Zhang et al. 2021, Eq. 8): w_c proportional to (N / n_c)^rho, sum C.

    As DisAlign's `GRWCrossEntropyLoss._init_weights` (1 / (n_c / N)^rho, normalised to sum C); float32 (C,),
    computed in float64. rho = 0 gives ones.
    """
    counts = _counts64(class_counts)
    weights = (counts.sum() / counts) ** rho
    return (weights * (counts.numel() / weights.sum())).to(torch.float32)


# ---- LDAM ----
def _ldam_margins64(counts: torch.Tensor, max_margin: float) -> torch.Tensor:
    inverse_root = counts ** (-0.25)
    return max_margin * (inverse_root / inverse_root.max())  # x / x == 1: the rarest class gets exactly max_margin


def ldam_margins(class_counts: Counts, max_margin: float = 0.5) -> torch.Tensor:
    """LDAM margins (Cao et al. 2019, Eq. 13): m_c = K / n_c^(1/4), K such that max_c m_c = max_margin (float32)."""
    return _ldam_margins64(_counts64(class_counts), max_margin).to(torch.float32)


def ldam_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    class_counts: Counts,
    max_margin: float = 0.5,
    scale: float = 30.0,
    weight: torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """LDAM loss (Cao et al. 2019, Eq. 13): CE(s * (cos - m_y e_y), y), with per-class weight w (DRW).

    `logits` are unscaled cosines; the margin is subtracted before the scale s, as in kaidic/LDAM-DRW `losses.py`.
    reduction "batchmean": sum_i w_{y_i} ce_i / B; "weighted": / sum_i w_{y_i} (the official code's
    `F.cross_entropy(weight=)` mean). Without `weight` both are the CE mean. (M, B, C): sum over experts.
    """
    margins = _ldam_margins64(_counts64(class_counts, logits), max_margin).to(_dtype(logits))
    mask = _target_mask(target, logits.shape[-1])
    return _weighted_ce(scale * (logits - mask * margins), target, weight, reduction)


# ---- decoupling and post-hoc ----
def tau_normalize(weight: torch.Tensor, tau: float) -> torch.Tensor:
    """tau-normalised classifier (Kang et al. 2020, Sec. 4): row c of W (C, D) divided by ||w_c||_2^tau.

    As classifier-balancing `tau_norm.py: pnorm`: tau = 0 is the identity, tau = 1 gives unit rows; the caller
    drops the bias (the paper's tau-norm uses none).
    """
    return weight / weight.norm(dim=1, keepdim=True) ** tau


def _log_prior64(counts: torch.Tensor) -> torch.Tensor:
    log_counts = counts.log()
    return log_counts - log_counts.logsumexp(dim=0)


def logit_adjust(logits: torch.Tensor, class_counts: Counts, tau: float) -> torch.Tensor:
    """Post-hoc logit adjustment (Menon et al. 2021, Eq. 9): logits - tau * log pi, pi = n / sum(n).

    For evaluation of a model trained without adjustment; works on (..., C). tau = 0 returns the logits unchanged.
    """
    return logits - tau * _log_prior64(_counts64(class_counts, logits)).to(_dtype(logits))


# ---- LADE ----
def _lade_vectors(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(prior pi, log(pi + 1e-9), log(1/C + 1e-9)), the official code's epsilons included."""
    prior = counts / counts.sum()
    return prior, (prior + LADE_LOG_EPS).log(), math.log(1.0 / counts.numel() + LADE_LOG_EPS)


def _lader(
    logits: torch.Tensor,
    target: torch.Tensor,
    prior: torch.Tensor,
    log_prior: torch.Tensor,
    log_uniform: float,
    remine_lambda: float,
) -> torch.Tensor:
    mask = _target_mask(target, logits.shape[-1]).to(logits.dtype)
    batch_counts = mask.sum(dim=0)
    # Official `mine_lower_bound`: sum over the batch / (count + 1e-8), so 0 for a class absent from the batch.
    first = (logits * mask).sum(dim=-2) / (batch_counts + LADE_COUNT_EPS)
    second = torch.logsumexp(logits - log_prior + log_uniform, dim=-2) - math.log(target.shape[0])
    estimate = first - second - remine_lambda * second**2
    return -(estimate * prior).sum()


def lader_loss(
    logits: torch.Tensor, target: torch.Tensor, class_counts: Counts, remine_lambda: float = 0.01
) -> torch.Tensor:
    """L_LADER (Hong et al. 2021, Eq. 10-12), as hyperconnect/LADE `loss/LADELoss.py`:

        -sum_c pi_c [T_c - lambda * S_c^2],  T_c = sum_{i: y_i = c} z_ic / (n_c^batch + 1e-8) - S_c,
        S_c = logsumexp_i (z_ic - log(pi_c + 1e-9) + log(1/C + 1e-9)) - log B,

    over *all* C classes (a class absent from the batch has first term 0 but still contributes pi_c (S_c + lambda
    S_c^2)); the logsumexp runs over every sample of the batch, B = batch size. (baselines.md §9 says "for each class
    c present in the batch" and "mean": the code sums over all classes and divides by count + 1e-8.)
    (M, B, C): sum over experts.
    """
    prior, log_prior, log_uniform = _lade_vectors(_counts64(class_counts, logits))
    dtype = _dtype(logits)
    return _lader(logits, target, prior.to(dtype), log_prior.to(dtype), log_uniform, remine_lambda)


def lade_loss(
    logits: torch.Tensor, target: torch.Tensor, class_counts: Counts, alpha: float = 0.1, remine_lambda: float = 0.01
) -> torch.Tensor:
    """LADE (Hong et al. 2021, Eq. 12): CE(z + log(pi + 1e-9), y) (`PriorCELoss`, i.e. Balanced Softmax; batch
    mean) + alpha * `lader_loss`. The README's CIFAR-100 command uses alpha = 0.1, remine_lambda = 0.01 (the YAML's
    0.1 is overridden by the flag). The 1e-9 moves log pi by < 1e-9 / pi_min. (M, B, C): sum over experts.
    Read from hyperconnect/LADE `loss/PriorCELoss.py`, `loss/LADELoss.py`, `config/CIFAR100_LT/lade.yaml`, README;
    `lader_loss` says where baselines.md §9's wording differs from that code."""
    prior, log_prior, log_uniform = _lade_vectors(_counts64(class_counts, logits))
    dtype = _dtype(logits)
    prior, log_prior = prior.to(dtype), log_prior.to(dtype)
    balanced = _per_sample_ce(logits + log_prior, target).sum() / target.shape[0]
    return balanced + alpha * _lader(logits, target, prior, log_prior, log_uniform, remine_lambda)


# ---- GCL ----
def _cloud_sizes64(counts: torch.Tensor) -> torch.Tensor:
    log_counts = counts.log()
    gap = log_counts.max() - log_counts
    # Official: gap / gap.max(), NaN when all counts are equal; here 0 (0 / tiny), without a host sync.
    return gap / gap.max().clamp_min(torch.finfo(torch.float64).tiny)


def gcl_cloud_sizes(class_counts: Counts) -> torch.Tensor:
    """GCL's cloud sizes a_c = (log n_max - log n_c) / (log n_max - log n_min): 0 for the head, 1 for the rarest
    class, 0 everywhere when all counts are equal (float32 (C,))."""
    return _cloud_sizes64(_counts64(class_counts)).to(torch.float32)


def _gcl(
    cos_logits: torch.Tensor,
    target: torch.Tensor,
    cloud: torch.Tensor,
    scale: float,
    margin: float,
    noise_mul: float,
    gamma: float,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    if noise is None:
        noise = torch.randn_like(cos_logits) * GCL_NOISE_STD
    perturbed = cos_logits - noise_mul * noise.clamp(-1.0, 1.0).abs() * cloud
    mask = _target_mask(target, cos_logits.shape[-1])
    ce = _per_sample_ce(scale * torch.where(mask, perturbed - margin, perturbed), target)
    return _focal(ce, gamma, detach=True).sum() / target.shape[0]


def gcl_loss(
    cos_logits: torch.Tensor,
    target: torch.Tensor,
    class_counts: Counts,
    scale: float = 30.0,
    margin: float = 0.0,
    noise_mul: float = 0.5,
    gamma: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """GCL (Li et al. 2022, Eq. 5-7), as Keke921/GCLLoss `losses.py: GCLLoss`: CE(s * (cos' - m e_y), y) with
    cos'_ic = cos_ic - noise_mul * |eps_ic| * a_c (`gcl_cloud_sizes`), eps ~ N(0, (1/3)^2) clamped to [-1, 1].

    `noise`: eps, broadcastable to `cos_logits` (clamp and |.| are applied here, so a raw N(0, 1/9) draw or an
    already-folded one both work); None draws `torch.randn_like(cos_logits) / 3` from torch's global RNG on the
    logits' device (the official code samples a torch.distributions.Normal on the CPU: same law, other stream).
    gamma > 0 is the official stage-2 path (`train_cls=True`): mean over B of (1 - p)^gamma * ce with p = exp(-ce)
    *detached*; its stage-2 script passes weight=None, as here. gamma = 0: the CE batch mean. (M, B, C): sum over
    experts (noise drawn per expert).
    """
    cloud = _cloud_sizes64(_counts64(class_counts, cos_logits)).to(_dtype(cos_logits))
    return _gcl(cos_logits, target, cloud, scale, margin, noise_mul, gamma, noise)


# ---- Weight Balancing's CB "softmax" loss ----
def _cb_softmax_bce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    one_hot = _target_mask(target, logits.shape[-1]).to(probs.dtype)
    # Official: weights * one_hot summed over classes (= w_{y_i}), repeated over the C columns.
    sample_weight = weight.to(probs.dtype)[target][:, None].expand_as(one_hot)
    per_element = F.binary_cross_entropy(
        probs, one_hot.expand_as(probs), weight=sample_weight.expand_as(probs), reduction="none"
    )
    return per_element.sum() / (target.shape[0] * logits.shape[-1])


def cb_softmax_bce(
    logits: torch.Tensor, target: torch.Tensor, class_counts: Counts, beta: float = 0.9999
) -> torch.Tensor:
    """Weight Balancing's "CB softmax" loss (ShadeAlsha/LTR-weight-balancing `utils/class_balanced_loss.py`, from
    vandit15): F.binary_cross_entropy(softmax(z), one_hot(y), weight=w_{y_i} on every column), mean over B * C, with
    w = `class_balanced_weights(n, beta)` (float32, as the official `.float()`). PyTorch's BCE clamps log at -100.
    (M, B, C): sum over experts."""
    weight = class_balanced_weights(_counts64(class_counts, logits), beta)
    return _cb_softmax_bce(logits, target, weight)


# ---- loss modules ----
class FocalLoss(LossTermModule):
    """Focal loss (`focal_loss`) summed over experts; CB-focal (Cui et al. 2019) when `beta` is given."""

    weight: torch.Tensor | None

    def __init__(self, gamma: float, class_counts: Counts | None = None, beta: float | None = None) -> None:
        super().__init__()
        if beta is not None and class_counts is None:
            raise ValueError("FocalLoss: beta (class-balanced focal) needs class_counts")
        self.gamma = gamma
        self.register_buffer("weight", None if beta is None else class_balanced_weights(class_counts, beta))

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        return focal_loss(out.expert_logits, target, self.gamma, self.weight)


class ClassBalancedCE(LossTermModule):
    """Class-balanced softmax CE (Cui et al. 2019) summed over experts. reduction "batchmean" (/ B, as the
    official TF code's per-sample weights) or "weighted" (/ sum_i w_{y_i}, PyTorch's weighted mean)."""

    weight: torch.Tensor

    def __init__(self, class_counts: Counts, beta: float, reduction: str = "batchmean") -> None:
        super().__init__()
        if reduction not in CE_REDUCTIONS:
            raise ValueError(f"unknown reduction '{reduction}', expected one of {CE_REDUCTIONS}")
        self.reduction = reduction
        self.register_buffer("weight", class_balanced_weights(class_counts, beta))

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        return _weighted_ce(out.expert_logits, target, self.weight, self.reduction)


class WeightedCE(LossTermModule):
    """CE with fixed class weights (GRW: `WeightedCE(grw_weights(n, rho))`), summed over experts. reduction
    "weighted" by default: DisAlign's `GRWCrossEntropyLoss` is `F.cross_entropy(weight=)` with 'mean'."""

    weight: torch.Tensor

    def __init__(self, weights: Counts, reduction: str = "weighted") -> None:
        super().__init__()
        if reduction not in CE_REDUCTIONS:
            raise ValueError(f"unknown reduction '{reduction}', expected one of {CE_REDUCTIONS}")
        self.reduction = reduction
        self.register_buffer("weight", torch.as_tensor(weights).to(device="cpu", dtype=torch.float32))

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        return _weighted_ce(out.expert_logits, target, self.weight, self.reduction)


def drw_active(epoch: int, epochs: int, drw_start: float | None) -> bool:
    """Deferred re-weighting is on from epoch round(drw_start * epochs) of the stage (0-based); None: never."""
    return drw_start is not None and epoch >= int(round(drw_start * epochs))


class DeferredReweighting(LossTermModule):
    """LDAM margins in logit units (`logit_margins` = scale * m_c) and DRW class weights: `weight` is ones before the
    switch and CB(drw_beta) from it on (`start_epoch`). The one mechanism behind LDAM-DRW, RIDE and TLC;
    `switched(active)` lets a subclass switch more buffers at the same epoch."""

    logit_margins: torch.Tensor
    weight: torch.Tensor
    drw_weight: torch.Tensor

    def __init__(self, class_counts: Counts, max_margin: float, scale: float, drw_beta: float,
                 drw_start: float | None) -> None:
        super().__init__()
        counts = _counts64(class_counts)
        self.drw_start = drw_start
        # float32 margins times the scale, as LDAMLoss always computed them (runs keep their results to the bit)
        self.register_buffer("logit_margins", scale * _ldam_margins64(counts, max_margin).to(torch.float32))
        self.register_buffer("weight", torch.ones(counts.numel()))
        self.register_buffer("drw_weight", _class_balanced64(counts, drw_beta).to(torch.float32))

    def start_epoch(self, epoch: int, epochs: int) -> None:
        active = drw_active(epoch, epochs, self.drw_start)
        if active:
            self.weight.copy_(self.drw_weight)
        else:
            self.weight.fill_(1.0)
        self.switched(active)

    def switched(self, active: bool) -> None:
        pass


class LDAMLoss(DeferredReweighting):
    """LDAM-DRW (Cao et al. 2019, Eq. 13 + Alg. 1) summed over experts.

    The model's logits are already s * cos (the harness's cosine head multiplies by `scale`), so the margin is
    subtracted in logit units, s * m_y: the same as s * (cos - m_y) (baselines.md §3). DRW: `start_epoch` sets the
    class weights to ones before epoch round(drw_start * epochs) (0-based, within the stage) and to
    CB(drw_beta) from then on (official: epoch // 160 of 200 with beta 0.9999); drw_start=None never re-weights.
    reduction "weighted" (default) is the official `F.cross_entropy(weight=)` mean.
    """

    def __init__(
        self,
        class_counts: Counts,
        max_margin: float = 0.5,
        scale: float = 30.0,
        drw_beta: float = 0.9999,
        drw_start: float | None = 0.8,
        reduction: str = "weighted",
    ) -> None:
        super().__init__(class_counts, max_margin, scale, drw_beta, drw_start)
        if reduction not in CE_REDUCTIONS:
            raise ValueError(f"unknown reduction '{reduction}', expected one of {CE_REDUCTIONS}")
        self.scale, self.reduction = scale, reduction

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        logits = out.expert_logits
        mask = _target_mask(target, logits.shape[-1])
        return _weighted_ce(logits - mask * self.logit_margins, target, self.weight, self.reduction)


class LADELoss(LossTermModule):
    """LADE (`lade_loss`): Balanced Softmax + alpha * L_LADER, summed over experts; prior vectors as buffers."""

    prior: torch.Tensor
    log_prior: torch.Tensor

    def __init__(self, class_counts: Counts, alpha: float = 0.1, remine_lambda: float = 0.01) -> None:
        super().__init__()
        self.alpha, self.remine_lambda = alpha, remine_lambda
        prior, log_prior, self.log_uniform = _lade_vectors(_counts64(class_counts))
        self.register_buffer("prior", prior.to(torch.float32))
        self.register_buffer("log_prior", log_prior.to(torch.float32))

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        logits = out.expert_logits
        balanced = _per_sample_ce(logits + self.log_prior, target).sum() / target.shape[0]
        lader = _lader(logits, target, self.prior, self.log_prior, self.log_uniform, self.remine_lambda)
        return balanced + self.alpha * lader


class GCLLoss(LossTermModule):
    """GCL (`gcl_loss`) summed over experts. The model's logits are s' * cos with the cosine head's own scale s'
    (`head_scale`, default `scale`): they are divided by it to recover cos, then GCL rescales by `scale`
    (official stage 1: s = 30, m = 0; stage 2: s = 20, m = 0.1, gamma = 1, on the same s' = 30 head).
    Noise comes from torch's global RNG (the trainer seeds it per epoch, so a resumed run replays it)."""

    cloud: torch.Tensor

    def __init__(
        self,
        class_counts: Counts,
        scale: float = 30.0,
        margin: float = 0.0,
        noise_mul: float = 0.5,
        gamma: float = 0.0,
        head_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.scale, self.margin, self.noise_mul, self.gamma = scale, margin, noise_mul, gamma
        self.head_scale = scale if head_scale is None else head_scale
        self.register_buffer("cloud", gcl_cloud_sizes(class_counts))

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        cos = out.expert_logits / self.head_scale
        return _gcl(cos, target, self.cloud, self.scale, self.margin, self.noise_mul, self.gamma, None)


class CBSoftmaxBCE(LossTermModule):
    """Weight Balancing's CB "softmax" loss (`cb_softmax_bce`) summed over experts; CB weights as a buffer."""

    weight: torch.Tensor

    def __init__(self, class_counts: Counts, beta: float = 0.9999) -> None:
        super().__init__()
        self.register_buffer("weight", class_balanced_weights(class_counts, beta))

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        return _cb_softmax_bce(out.expert_logits, target, self.weight)
