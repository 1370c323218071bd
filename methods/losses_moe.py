"""Multi-expert, two-branch and contrastive LT losses: RIDE, BBN, ResLT, TLC, NCL, PaCo and BCL.

Shapes as in `losses.py`: expert (or network, or branch) logits are (M, B, C), `target` is int64 (B,); losses are
batch means unless a docstring says otherwise. Count-derived vectors are computed in float64 and stored in float32
as module buffers. No loss syncs with the host. Each function follows the official code, read at the snapshots
listed in reference/baselines.md (the code wins where it differs from the paper; the paper's form is a keyword):

- RIDE (Wang et al., ICLR 2021, Eq. 4-5): frank-xwang/RIDE-LongTailRecognition `model/loss.py: RIDELoss`,
  `trainer/trainer.py`, `base/base_trainer.py` (1-based epochs), `configs/config_imbalance_cifar100_ride.json`.
- BBN (Zhou et al., CVPR 2020, Eq. 1-2): megvii-research/BBN `lib/core/combiner.py: bbn_mix`, `lib/loss/loss.py`,
  `main/train.py` (1-based epochs).
- ResLT (Cui et al., TPAMI 2023, Eq. 6-8): jiequancui/ResLT `CIFAR/cifarTrain_reslt_cifar100.py`,
  `CIFAR/networks/resnet_cifar.py: ResLTResNet32`, `CIFAR/sh/CIFAR100/*.sh`.
- TLC (Li et al., CVPR 2022, Eq. 3-9): lblaoke/TLC `model/loss.py: TLCLoss`, `model/ResnetCifar.py: ResNet_s`,
  `trainer/trainer.py`, `configs/cifar100_lt.json`.
- NCL (Li et al., CVPR 2022, Eq. 1-8): Bazinga699/NCL `lib/loss/loss.py: NIL_NBOD, NBOD`,
  `lib/core/combiner.py`, `config/CIFAR/CIFAR100/cifar100_im100_NCL.yaml`.
- PaCo (Cui et al., ICCV 2021, Eq. 7-8): dvlab-research/Parametric-Contrastive-Learning `PaCo/LT/losses.py`,
  `PaCo/LT/moco/builder.py`, `PaCo/LT/paco_cifar.py`.
- BCL (Zhu et al., CVPR 2022, Eq. 5-8): FlamieZhu/Balanced-Contrastive-Learning `loss/contrastive.py: BalSCL`,
  `main.py`, `models/resnext.py: BCLModel`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.method import LossTermModule, ModelOutput
from harness.methods.losses import softmax_kl
from harness.methods.losses_lt import (
    Counts,
    DeferredReweighting,
    _counts64,
    _dtype,
    _ldam_margins64,
    _per_sample_ce,
    _target_mask,
    _weighted_ce,
)

# ResLT's crossEntropy: log(softmax + 1e-7). NCL's NBOD: log(softmax + 1e-9). PaCo: log(prior + 1e-9), and 1e-12
# inside the log of its denominator.
RESLT_EPS = 1e-7
NCL_EPS = 1e-9
PACO_PRIOR_EPS = 1e-9
PACO_SUM_EPS = 1e-12


def _prior64(counts: torch.Tensor) -> torch.Tensor:
    return counts / counts.sum()


# ---- RIDE ----
def _ride_temperature64(counts: torch.Tensor, reweight_factor: float) -> torch.Tensor:
    if not 0.0 <= reweight_factor < 1.0:
        raise ValueError(f"reweight_factor must be in [0, 1), got {reweight_factor}")
    weights = counts.numel() * _prior64(counts) * reweight_factor + 1.0 - reweight_factor
    return weights / weights.max()


def ride_diversity_temperature(class_counts: Counts, reweight_factor: float = 0.05) -> torch.Tensor:
    """RIDE's per-class diversity temperature after the re-weight epoch (float32 (C,)): w_c / max w with
    w_c = C * pi_c * reweight_factor + 1 - reweight_factor (`RIDELoss.per_cls_weights_enabled_diversity`; TLC
    copies it). Multiplied by the base temperature in `ride_loss`."""
    return _ride_temperature64(_counts64(class_counts), reweight_factor).to(torch.float32)


def _ride(
    expert_logits: torch.Tensor,
    output_logits: torch.Tensor,
    target: torch.Tensor,
    logit_margins: torch.Tensor,
    weight: torch.Tensor | None,
    temperature: torch.Tensor,
    diversity_factor: float,
) -> torch.Tensor:
    mask = _target_mask(target, expert_logits.shape[-1])
    # Official quirk: with diversity factor 0 every expert's LDAM term is taken on the output (mean) logits.
    base = output_logits.expand_as(expert_logits) if diversity_factor == 0 else expert_logits
    loss = _weighted_ce(base - mask * logit_margins.to(base.dtype), target, weight, "weighted")
    temperature = temperature.to(expert_logits.dtype)
    teacher = (output_logits / temperature).detach()
    kl = softmax_kl(teacher.expand_as(expert_logits), expert_logits / temperature).sum() / target.shape[0]
    return loss + diversity_factor * temperature.mean() ** 2 * kl


def ride_loss(
    expert_logits: torch.Tensor,
    target: torch.Tensor,
    class_counts: Counts,
    *,
    max_margin: float = 0.5,
    scale: float = 30.0,
    drw_weight: torch.Tensor | None = None,
    diversity_factor: float = -0.2,
    diversity_temperature: float = 1.0,
    reweight_temperature: bool = False,
    reweight_factor: float = 0.05,
    output_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """RIDE's distribution-aware diversity loss (Wang et al. 2021, Eq. 4-5 with LDAM-DRW as the base), summed over
    the M experts k, as `RIDELoss.forward`:

        sum_k [ LDAM_w(z_k, y) + lambda * Tbar^2 * KL(softmax(zbar / T) || softmax(z_k / T)) ],

    - LDAM_w: CE(z_k - s * m_y e_y, y) with class weights `drw_weight` (DRW, CB(0.9999) after the re-weight epoch),
      the weighted mean sum_i w_{y_i} ce_i / sum_i w_{y_i} (`F.cross_entropy(weight=)`); `expert_logits` are
      already s * cos (as in RIDE's cosine heads), so the margin is s * m_y in logit units.
    - zbar = `output_logits` (default: the mean over experts, RIDE's output), detached; KL is batch-mean.
    - lambda = `diversity_factor`: negative *maximises* divergence (class default -0.2; the CIFAR configs use
      -0.45 at ab8be5c, -0.2 at older commits).
    - T = `diversity_temperature` (scalar) before the re-weight epoch; with `reweight_temperature` the per-class
      T_c = T * `ride_diversity_temperature(n, reweight_factor)`_c, switched on with DRW. Tbar = mean_c T_c.
    - Official quirk: with `diversity_factor == 0` each expert's LDAM term uses the output logits, so M experts give
      M * LDAM(zbar) (one expert: plain LDAM-DRW).
    baselines.md §14 gives λ_div·T̄²·KL per expert and -0.45; it omits the quirk above and the weighted-mean DRW.
    """
    counts = _counts64(class_counts, expert_logits)
    margins = scale * _ldam_margins64(counts, max_margin)
    if reweight_temperature:
        temperature = diversity_temperature * _ride_temperature64(counts, reweight_factor)
    else:
        temperature = torch.full_like(counts, diversity_temperature)
    output = expert_logits.mean(dim=0) if output_logits is None else output_logits
    return _ride(expert_logits, output, target, margins, drw_weight, temperature, diversity_factor)


# ---- BBN ----
def bbn_alpha(epoch: int, epochs: int, *, round_divisor: bool = True) -> float:
    """BBN's cumulative-learning weight (Zhou et al. 2020, Eq. 1, parabolic decay) for 0-based `epoch`:
    1 - (epoch / T)^2. The official `bbn_mix` writes 1 - ((epoch - 1) / T)^2 with 1-based epochs (`main/train.py`
    loops from 1), i.e. the same value; alpha = 1 at the first epoch and 1 - ((E-1)/E)^2 ~ 2/E at the last.
    T = `epochs`, except that the official `Combiner` rounds 90 and 180 up to 100 and 200 (`round_divisor`)."""
    divisor = 100 * (epochs // 100 + 1) if round_divisor and epochs in (90, 180) else epochs
    return 1.0 - (epoch / divisor) ** 2


def bbn_mixed_loss(
    logits: torch.Tensor,
    target_conventional: torch.Tensor,
    target_reversed: torch.Tensor,
    alpha: float | torch.Tensor,
) -> torch.Tensor:
    """BBN's bilateral loss (Zhou et al. 2020, Eq. 2), as `bbn_mix` with the `CrossEntropy` criterion:
    alpha * CE(z, y_c) + (1 - alpha) * CE(z, y_r), both batch means, where z = W [2 alpha f_c ; 2 (1 - alpha) f_r]
    is the single classifier's output on the mixed features of a uniform and a reversed-sampler batch."""
    conventional = F.cross_entropy(logits, target_conventional)
    return alpha * conventional + (1 - alpha) * F.cross_entropy(logits, target_reversed)


# ---- ResLT ----
def reslt_loss(
    branch_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    beta: float = 0.995,
    group_cuts: tuple[int, int] = (35, 70),
    eps: float = RESLT_EPS,
) -> torch.Tensor:
    """ResLT's loss (Cui et al. 2023, Eq. 6-8), as `CIFAR/cifarTrain_reslt_cifar100.py`:

        beta * sum_g sum_{i in g} -log(softmax(z_g)_{y_i} + eps) / sum_g |g|  +  (1 - beta) * CE(z_H + z_M + z_T, y)

    `branch_logits` (3, B, C) are z_H, z_M, z_T (three BN branches, one linear head). Groups by class index: H = all
    samples, M = {i: y_i >= group_cuts[0]}, T = {i: y_i >= group_cuts[1]} (CIFAR-100: 35 and 70; the CIFAR-10 script
    uses 2 and 4; the ImageNet-LT script takes the *low* ids, [:825] and [:220]). The group term keeps the official
    log(softmax + 1e-7); the fused term is `nn.CrossEntropyLoss`. beta = 0.995 is the IF100 script's value
    (0.99 at IF50, 0.72 at IF10; argparse default 1.0). Class ids must be sorted by decreasing frequency.
    """
    num_classes = branch_logits.shape[-1]
    if branch_logits.shape[0] != 3 or not 0 <= group_cuts[0] <= group_cuts[1] <= num_classes:
        shape = tuple(branch_logits.shape)
        raise ValueError(f"reslt_loss: need (3, B, C) logits and 0 <= cuts <= C, got {shape}, {group_cuts}")
    dtype = _dtype(branch_logits)
    members = torch.stack(
        [torch.ones_like(target, dtype=dtype), (target >= group_cuts[0]).to(dtype), (target >= group_cuts[1]).to(dtype)]
    )
    probs = branch_logits.softmax(dim=-1).gather(-1, target.expand(3, -1)[..., None]).squeeze(-1)
    group = -(members * (probs + eps).log()).sum() / members.sum()
    fused = F.cross_entropy(branch_logits.sum(dim=0), target)
    return beta * group + (1 - beta) * fused


# ---- TLC ----
def dirichlet_kl_uniform(alpha: torch.Tensor) -> torch.Tensor:
    """KL(Dir(alpha) || Dir(1, ..., 1)) over the last dim (TLC Eq. 6, `TLCLoss.forward`'s `kl`):
    lgamma(S) - lgamma(C) - sum lgamma(alpha_c) + sum (alpha_c - 1)(digamma(alpha_c) - digamma(S)), S = sum alpha."""
    total = alpha.sum(dim=-1, keepdim=True)
    log_norm = torch.lgamma(total.squeeze(-1)) - torch.lgamma(alpha).sum(dim=-1)
    log_norm = log_norm - torch.lgamma(torch.tensor(float(alpha.shape[-1]), dtype=alpha.dtype, device=alpha.device))
    return log_norm + ((alpha - 1) * (torch.digamma(alpha) - torch.digamma(total))).sum(dim=-1)


def tlc_kl_weight(
    epoch: int, *, reweight_epoch: int = 160, annealing: float = 500.0, reweight_factor: float = 0.05
) -> float:
    """TLC's annealing weight of the KL term for 0-based `epoch`: (epoch + 1) / T, T = (reweight_epoch + annealing)
    / reweight_factor (official: `epoch / self.T` with 1-based epochs, T = (160 + 500) / 0.05 = 13,200)."""
    return (epoch + 1) / ((reweight_epoch + annealing) / reweight_factor)


def tlc_engagement(expert_logits: torch.Tensor) -> torch.Tensor:
    """TLC's per-expert, per-sample engagement weights w (M, B) from (M, B, C) logits (`ResNet_s.forward`), detached:
    w_0 = 1 and w_{k+1} = w_k * u_k / (1 - c_k), with evidence e = exp(z_k), alpha = e + 1, S = sum alpha,
    belief b_k = e / S, uncertainty u_k = C / S and conflict c_k = sum_{a != c} b_{k-1,a} b_{k,c} (c_0 = 0)."""
    evidence = expert_logits.detach().exp()
    strength = evidence.sum(dim=-1) + expert_logits.shape[-1]
    belief = evidence / strength[..., None]
    uncertainty = expert_logits.shape[-1] / strength
    weights = [torch.ones_like(uncertainty[0])]
    for k in range(expert_logits.shape[0] - 1):
        conflict = 0.0
        if k > 0:
            previous, current = belief[k - 1], belief[k]
            conflict = previous.sum(-1) * current.sum(-1) - (previous * current).sum(-1)
        weights.append(weights[-1] * uncertainty[k] / (1 - conflict))
    return torch.stack(weights)


def _tlc(
    expert_logits: torch.Tensor,
    output_logits: torch.Tensor,
    target: torch.Tensor,
    logit_margins: torch.Tensor,
    weight: torch.Tensor | None,
    kl_weight: float | torch.Tensor,
    temperature: torch.Tensor | None,
    diversity_factor: float,
    engagement: torch.Tensor | None,
    tau: float,
) -> torch.Tensor:
    mask = _target_mask(target, expert_logits.shape[-1])
    margined = expert_logits - mask * logit_margins.to(expert_logits.dtype)
    # log(alpha / S) with alpha = exp(margined): the official log(exp(x)) - log(sum exp(x)), without the overflow.
    nll = _per_sample_ce(margined, target)
    if weight is not None:
        nll = nll * weight.to(nll.dtype)[target]
    # In float64: with s = 30 the evidence reaches e^30 and float32 lgamma/digamma lose every digit of the KL.
    evidence = margined.to(torch.float64).exp()
    alpha_tilde = torch.where(mask, torch.ones_like(evidence), evidence + 1)
    per_sample = nll + kl_weight * dirichlet_kl_uniform(alpha_tilde).to(nll.dtype)
    if temperature is None:
        temperature = torch.ones((), dtype=expert_logits.dtype, device=expert_logits.device)
    temperature = temperature.to(expert_logits.dtype)
    teacher = (output_logits / temperature).detach().expand_as(expert_logits)
    diversity = softmax_kl(teacher, expert_logits / temperature)
    per_sample = per_sample - diversity_factor * temperature.mean() ** 2 * diversity
    if engagement is None:
        return per_sample.sum() / target.shape[0]
    engaged = (engagement / engagement.max(dim=-1, keepdim=True).values > tau).to(per_sample.dtype)
    return ((engaged * per_sample).sum(dim=-1) / engaged.sum(dim=-1)).sum()


def tlc_loss(
    expert_logits: torch.Tensor,
    output_logits: torch.Tensor,
    target: torch.Tensor,
    class_counts: Counts,
    *,
    kl_weight: float | torch.Tensor,
    max_margin: float = 0.5,
    scale: float = 30.0,
    drw_weight: torch.Tensor | None = None,
    diversity_temperature: torch.Tensor | None = None,
    diversity_factor: float = 0.01,
    engagement: torch.Tensor | None = None,
    tau: float = 0.54,
) -> torch.Tensor:
    """TLC's evidential loss (Li et al. 2022, Eq. 3-9), as `TLCLoss.forward`, for one expert's (B, C) logits or
    summed over experts for (M, B, C). Per sample i of expert k, with z' = z_k - s * m_y e_y (LDAM margin in logit
    units; `expert_logits` are 30 * cos) and evidence alpha = exp(z'):

        l_i = w_{y_i} (-log(alpha_y / sum alpha))  +  kl_weight * KL(Dir(alpha~) || Dir(1))
              - diversity_factor * Tbar^2 * KL(softmax(zbar / T) || softmax(z_k / T)),

    alpha~ = y + (1 - y)(alpha + 1) (the target entry set to 1); `kl_weight` = epoch / 13,200 (`tlc_kl_weight`);
    w = `drw_weight` (CB(0.9999) after epoch 160; a per-sample weight, then mean over samples, not / sum w);
    zbar = `output_logits` (TLC's fused output, detached); T = `diversity_temperature` (C,) after the re-weight
    epoch (`ride_diversity_temperature`), else 1; Tbar = mean_c T_c; `diversity_factor` 0.01.
    Reduction: mean over B, or with `engagement` (B,) / (M, B) weights (`tlc_engagement`) the mean over the samples
    with w_i / max_i w > `tau` (dynamic engagement, tau = 0.54). baselines.md §17 matches this; its fusion is
    "softmax_k(w_k / eta)", but the code normalises exp(w_k / eta) over the *batch* (`ResNet_s.forward`).
    Numerics, not maths, differ from the code: log(alpha / S) is a log-softmax (no exp overflow) and the Dirichlet KL
    is computed in float64 (the official float32 one is off by orders of magnitude once non-target cosines near 1).
    """
    counts = _counts64(class_counts, expert_logits)
    margins = scale * _ldam_margins64(counts, max_margin)
    return _tlc(expert_logits, output_logits, target, margins, drw_weight, kl_weight, diversity_temperature,
                diversity_factor, engagement, tau)


# ---- NCL ----
def _nbod(logits: torch.Tensor, weight: float) -> torch.Tensor:
    num_networks = logits.shape[0]
    if num_networks == 1:
        return logits.new_zeros(())
    probs = logits.softmax(dim=-1)
    log_probs = (probs + NCL_EPS).log()
    negative_entropy = torch.xlogy(probs, probs).sum(dim=(-2, -1))  # F.kl_div's target * log(target)
    cross = torch.einsum("jbc,ibc->ji", probs, log_probs)  # cross[j, i] = sum_b sum_c p_j log(p_i + eps)
    off_diagonal = 1.0 - torch.eye(num_networks, dtype=probs.dtype, device=probs.device)
    pairwise = (negative_entropy[:, None] - cross) * off_diagonal  # [j, i] = KL(p_j || p_i) summed over the batch
    return weight * pairwise.sum() / (logits.shape[1] * (num_networks - 1))


def _ncl(
    network_logits: torch.Tensor,
    target: torch.Tensor,
    log_counts: torch.Tensor,
    hard_topk: int,
    nbod_weight: float,
    hard_nbod_weight: float,
) -> torch.Tensor:
    num_classes = network_logits.shape[-1]
    target_mask = _target_mask(target, num_classes)
    select = network_logits[0].detach().masked_fill(target_mask, float("inf"))
    hard = select.topk(min(hard_topk, num_classes), dim=-1).indices
    hard_mask = torch.zeros_like(select).scatter(-1, hard, 1.0)
    balanced = network_logits + log_counts.to(network_logits.dtype)
    hard_balanced = balanced * hard_mask.to(network_logits.dtype)
    nil = (_per_sample_ce(balanced, target).sum() + _per_sample_ce(hard_balanced, target).sum()) / target.shape[0]
    return nil + _nbod(balanced, nbod_weight) + _nbod(hard_balanced, hard_nbod_weight)


def ncl_loss(
    network_logits: torch.Tensor,
    target: torch.Tensor,
    class_counts: Counts,
    *,
    hard_topk: int = 30,
    nbod_weight: float = 0.6,
    hard_nbod_weight: float | None = None,
) -> torch.Tensor:
    """NCL's NIL + NBOD (Li et al. 2022, Eq. 1-8) over K networks' (K, B, C) logits, as `NIL_NBOD.forward`:

        sum_k [CE(zh_k, y) + CE(zh_k * M, y)] + NBOD(zh) + NBOD(zh * M),
        NBOD(v) = lambda / (K - 1) * sum_{i != j} KL(p_j || p_i),  p = softmax(v),

    zh_k = z_k + log n (balanced logits); M (B, C) is 1 on the `hard_topk` largest *raw* logits of network 1 (index
    0) with the target forced in, 0 elsewhere: masked logits are multiplied by 0 (still in the softmax), not -inf.
    KL(p_j || p_i) is `F.kl_div(log(p_i + 1e-9), p_j, reduction='batchmean')`; nothing is detached. K = 1 has no
    NBOD. lambda = `nbod_weight` (DIVERSITY_FACTOR) on the full logits and `hard_nbod_weight` (DIVERSITY_FACTOR_HCM,
    default: the same) on the masked ones; CIFAR-100: N = 30, 0.6 and 0.6; CE_RATIO = HCM_RATIO = 1.
    """
    log_counts = _counts64(class_counts, network_logits).log()
    hard_weight = nbod_weight if hard_nbod_weight is None else hard_nbod_weight
    return _ncl(network_logits, target, log_counts, hard_topk, nbod_weight, hard_weight)


# ---- PaCo ----
def paco_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    sup_logits: torch.Tensor,
    class_counts: Counts,
    queue_features: torch.Tensor | None = None,
    queue_labels: torch.Tensor | None = None,
    *,
    alpha: float = 0.01,
    temperature: float = 0.05,
    beta: float = 1.0,
    gamma: float = 1.0,
    base_temperature: float | None = None,
) -> torch.Tensor:
    """PaCo's parametric contrastive loss (Cui et al. 2021, Eq. 7-8), as `PaCo/LT/losses.py: PaCoLoss.forward`.

    `features` (N, D) are L2-normalised contrast features whose first B = len(sup_logits) rows are the anchors
    (PaCo: [q; k], labels [y; y]); `queue_features` (K, D) / `queue_labels` (K,) are appended (MoCo queue). For
    anchor i, over the C centres and the N + K samples (the anchor itself excluded):

        a_i = [sup_logits_i + log(pi + 1e-9) ;  q_i . f_j / T],   w_i = [beta * onehot(y_i) ; alpha * 1(y_j = y_i)],
        L_i = -(T / T_base) * sum_j w_ij log(exp(a_ij) / (sum_c exp(a_ic) + gamma sum_j exp(a_ij) + 1e-12)) / sum w_i,

    batch mean over the B anchors. `sup_logits` are the linear head on the pooled feature; pi = n / sum(n).
    CIFAR: alpha 0.01, T 0.05 (`--moco-t`); ImageNet-LT / iNat / Places: 0.05, 0.2; beta = gamma = 1 always.
    The official code infers B as (N + K - K) // 2; here B is taken from `sup_logits`. As coded, the row max is
    subtracted over centres *and* samples before the 1e-12 is added, so with alpha = gamma = 0 the loss equals
    CE(z + log pi) only up to ~1e-12 * exp(max_j q.f_j / T - logsumexp of the centres).
    """
    anchors = sup_logits.shape[0]
    if queue_features is not None:
        features = torch.cat([features, queue_features], dim=0)
        labels = torch.cat([labels, queue_labels], dim=0)
    counts = _counts64(class_counts, sup_logits)
    log_prior = (_prior64(counts) + PACO_PRIOR_EPS).log().to(_dtype(sup_logits))
    dot = features[:anchors] @ features.T / temperature
    logits = torch.cat([sup_logits + log_prior, dot], dim=1)
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    not_self = ~_target_mask(torch.arange(anchors, device=labels.device), features.shape[0])
    same = (labels[:anchors, None] == labels[None, :]) & not_self
    class_mask = _target_mask(labels[:anchors], sup_logits.shape[-1]).to(logits.dtype)
    positives = torch.cat([beta * class_mask, alpha * same.to(logits.dtype)], dim=1)
    denominator = torch.cat([torch.ones_like(class_mask), gamma * not_self.to(logits.dtype)], dim=1)
    log_prob = logits - ((logits.exp() * denominator).sum(dim=1, keepdim=True) + PACO_SUM_EPS).log()
    mean_log_prob = (positives * log_prob).sum(dim=1) / positives.sum(dim=1)
    scale = 1.0 if base_temperature is None else temperature / base_temperature
    return -scale * mean_log_prob.mean()


# ---- BCL ----
def bcl_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    prototypes: torch.Tensor,
    *,
    temperature: float = 0.07,
    reduction: str = "mean",
) -> torch.Tensor:
    """BCL's balanced contrastive loss (Zhu et al. 2022, Eq. 5-8), as `loss/contrastive.py: BalSCL.forward`.

    `features` (B, V, D) are the normalised projections of V views (BCL: V = 2, the two "sim" views); `prototypes`
    (C, D) are the normalised class prototypes (an MLP on the classifier weights), appended as one sample per
    class (class-complement). The VB anchors contrast against all VB + C rows except themselves; with n_c the
    count of class c among those rows (views and prototype), for anchor i of class y:

        L_i = -1/|P_i| sum_{p in P_i} log( exp(a_ip) / sum_c (1 / n'_c) sum_{j in c, j != i} exp(a_ij) ),

    a = f_i . f_j / T, n'_c = n_c - 1 for c = y (the anchor excluded) and n_c otherwise (class-averaging), P_i the
    same-class rows (other views, same-class samples, own prototype). Mean over the VB anchors ("none": (V*B,),
    view-major). The batch class counts are computed here from `labels`, as the official code does; T = 0.07
    (`main.py --temp`; the class default is 0.1). The official code fixes V = 2; here any V >= 1.
    """
    batch, views = features.shape[:2]
    num_classes = prototypes.shape[0]
    anchors = features.transpose(0, 1).reshape(batch * views, -1)
    contrast = torch.cat([anchors, prototypes], dim=0)
    all_labels = torch.cat([labels.repeat(views), torch.arange(num_classes, device=labels.device)])
    batch_counts = _target_mask(all_labels, num_classes).to(contrast.dtype).sum(dim=0)
    not_self = ~_target_mask(torch.arange(batch * views, device=labels.device), contrast.shape[0])
    positives = ((all_labels[: batch * views, None] == all_labels[None, :]) & not_self).to(contrast.dtype)
    logits = anchors @ contrast.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    per_column = batch_counts[all_labels][None, :] - positives
    averaged = (logits.exp() * not_self / per_column).sum(dim=1, keepdim=True)
    log_prob = logits - averaged.log()
    per_anchor = -(positives * log_prob).sum(dim=1) / positives.sum(dim=1)
    if reduction == "none":
        return per_anchor
    if reduction != "mean":
        raise ValueError(f"unknown reduction '{reduction}', expected 'mean' or 'none'")
    return per_anchor.mean()


# ---- loss modules ----
class RIDELoss(DeferredReweighting):
    """RIDE (`ride_loss`) on `out.expert_logits`, with `out.logits` (the mean over experts) as the diversity target.

    `start_epoch`: from epoch round(drw_start * epochs) (0-based, within the stage) the LDAM base term takes the
    CB(drw_beta) class weights and the diversity temperature becomes per-class (official: `epoch > 160` with 1-based
    epochs of 200, i.e. 0-based epoch 160 = 0.8 * 200); drw_start=None never switches. CIFAR configs: -0.45.
    """

    temperature: torch.Tensor
    drw_temperature: torch.Tensor

    def __init__(
        self,
        class_counts: Counts,
        max_margin: float = 0.5,
        scale: float = 30.0,
        drw_beta: float = 0.9999,
        drw_start: float | None = 0.8,
        diversity_factor: float = -0.2,
        diversity_temperature: float = 1.0,
        reweight_factor: float = 0.05,
    ) -> None:
        super().__init__(class_counts, max_margin, scale, drw_beta, drw_start)
        counts = _counts64(class_counts)
        self.diversity_factor = diversity_factor
        self.base_temperature = diversity_temperature
        self.register_buffer("temperature", torch.full((counts.numel(),), float(diversity_temperature)))
        drw_temperature = diversity_temperature * _ride_temperature64(counts, reweight_factor)
        self.register_buffer("drw_temperature", drw_temperature.to(torch.float32))

    def switched(self, active: bool) -> None:
        if active:
            self.temperature.copy_(self.drw_temperature)
        else:
            self.temperature.fill_(self.base_temperature)

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        return _ride(out.expert_logits, out.logits, target, self.logit_margins, self.weight, self.temperature,
                     self.diversity_factor)


class TLCLoss(DeferredReweighting):
    """TLC (`tlc_loss`) summed over the experts of `out.expert_logits`; the diversity target is `out.logits` (the
    harness's aggregate; TLC's own model returns its uncertainty-weighted fusion). Dynamic engagement comes from
    `tlc_engagement(out.expert_logits)` (tau = 0.54; `tau=None` keeps every sample).

    `start_epoch`: the KL weight is (epoch + 1) / ((drw_epoch + annealing) / reweight_factor) with drw_epoch =
    round(drw_start * epochs) (official: epoch / ((160 + 500) / 0.05), 1-based); from drw_epoch on, CB(drw_beta) NLL
    weights and the per-class diversity temperature. The annealing constant is not rescaled with the stage length.
    """

    temperature: torch.Tensor
    drw_temperature: torch.Tensor
    kl_weight: torch.Tensor

    def __init__(
        self,
        class_counts: Counts,
        max_margin: float = 0.5,
        scale: float = 30.0,
        drw_beta: float = 0.9999,
        drw_start: float | None = 0.8,
        reweight_factor: float = 0.05,
        annealing: float = 500.0,
        diversity_factor: float = 0.01,
        tau: float | None = 0.54,
    ) -> None:
        super().__init__(class_counts, max_margin, scale, drw_beta, drw_start)
        counts = _counts64(class_counts)
        self.reweight_factor, self.annealing = reweight_factor, annealing
        self.diversity_factor, self.tau = diversity_factor, tau
        self.register_buffer("temperature", torch.ones(counts.numel()))
        self.register_buffer("drw_temperature", _ride_temperature64(counts, reweight_factor).to(torch.float32))
        self.register_buffer("kl_weight", torch.zeros(()))

    def start_epoch(self, epoch: int, epochs: int) -> None:
        drw_epoch = int(round((self.drw_start if self.drw_start is not None else 1.0) * epochs))
        self.kl_weight.fill_(tlc_kl_weight(epoch, reweight_epoch=drw_epoch, annealing=self.annealing,
                                           reweight_factor=self.reweight_factor))
        super().start_epoch(epoch, epochs)

    def switched(self, active: bool) -> None:
        if active:
            self.temperature.copy_(self.drw_temperature)
        else:
            self.temperature.fill_(1.0)

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        logits = out.expert_logits
        engagement = None if self.tau is None else tlc_engagement(logits)
        return _tlc(logits, out.logits, target, self.logit_margins, self.weight, self.kl_weight.to(logits.dtype),
                    self.temperature, self.diversity_factor, engagement, self.tau or 0.0)


class NCLLoss(LossTermModule):
    """NCL's NIL + NBOD (`ncl_loss`), with the (K, B, C) `out.expert_logits` as the K networks; log n is a buffer."""

    log_counts: torch.Tensor

    def __init__(
        self, class_counts: Counts, hard_topk: int = 30, nbod_weight: float = 0.6, hard_nbod_weight: float | None = None
    ) -> None:
        super().__init__()
        self.hard_topk, self.nbod_weight = hard_topk, nbod_weight
        self.hard_nbod_weight = nbod_weight if hard_nbod_weight is None else hard_nbod_weight
        self.register_buffer("log_counts", _counts64(class_counts).log().to(torch.float32))

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        return _ncl(out.expert_logits, target, self.log_counts, self.hard_topk, self.nbod_weight,
                    self.hard_nbod_weight)
