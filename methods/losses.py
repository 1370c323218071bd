"""SHIKE's loss terms (CVPR 2023, Eq. 4-11) and the long-tailed CE baselines, as functions and loss modules.

Shapes: `expert_logits` is (M, B, C), `target` is int64 (B,). The KL losses take a `reduction`:
"batchmean" (divide by B, class-count invariant), "mean" (divide by B*C: PyTorch's `kl_div` default, which
the official code uses with alpha = 10 and beta = 1), "sum", or "none" (per-sample (B,) sums).
No loss syncs with the host, so all of them can be torch.compiled.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from harness.method import LossTermModule, ModelOutput

KL_REDUCTIONS = ("batchmean", "mean", "sum", "none")
DKT_VARIANTS = ("code", "paper")
# Official cifarTrain.py masks the students' target logit with this constant; it assumes logits bounded by the
# cosine classifier's scale s = 30.
CODE_MASK_LOGIT = -30.0


def softmax_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample KL(softmax(teacher) || softmax(student)) over the last dim, both in log space.

    Equals `F.kl_div(log_softmax(student), softmax(teacher))` summed over classes, but keeps the gradient finite
    where a teacher probability underflows to 0.
    """
    log_p = F.log_softmax(teacher_logits, dim=-1)
    return (log_p.exp() * (log_p - F.log_softmax(student_logits, dim=-1))).sum(dim=-1)


def _reduce(per_sample: torch.Tensor, reduction: str, num_classes: int) -> torch.Tensor:
    """Reduce per-sample KL sums (B,) as `F.kl_div` would reduce the (B, C) elementwise terms."""
    if reduction == "none":
        return per_sample
    total = per_sample.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / per_sample.shape[0]
    if reduction == "mean":
        return total / (per_sample.shape[0] * num_classes)
    raise ValueError(f"unknown reduction '{reduction}', expected one of {KL_REDUCTIONS}")


def mutual_kl(expert_logits: torch.Tensor, reduction: str = "batchmean", detach: bool = False) -> torch.Tensor:
    """L_mu, paper Eq. 4: sum over ordered expert pairs j != k of KL(p^j || p^k), p = softmax over classes.

    As in the official code (`cifarTrain.py:217-220`), expert k is the student and expert j the teacher of each
    term, and with `detach=False` gradients flow into the teacher p^j as well.

    Args:
        expert_logits: (M, B, C) logits of the M experts.
        reduction: "batchmean", "mean" (official, / B*C), "sum" or "none" (per-sample (B,)).
        detach: stop the gradient through every teacher p^j.

    Returns:
        The loss, a scalar, or (B,) for reduction "none".
    """
    num_experts, _, num_classes = expert_logits.shape
    log_p = F.log_softmax(expert_logits, dim=-1)
    log_teacher = log_p.detach() if detach else log_p
    # pairwise[j, k, b] = KL(p^j_b || p^k_b); the diagonal is zero and is masked out explicitly.
    pairwise = (log_teacher.exp()[:, None] * (log_teacher[:, None] - log_p[None, :])).sum(dim=-1)
    off_diagonal = 1.0 - torch.eye(num_experts, dtype=pairwise.dtype, device=pairwise.device)
    per_sample = (pairwise * off_diagonal[:, :, None]).sum(dim=(0, 1))
    return _reduce(per_sample, reduction, num_classes)


def grand_teacher(expert_logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """DKT's grand teacher, paper Eq. 5-7, over all C classes (the target entry is left to the caller).

    Returns:
        (teacher, target_mask): teacher (B, C) holds z_bar at the consensus hardest negative h (the argmax of
        z_bar over the non-target classes) and z_hat (max over experts) elsewhere; target_mask (B, C) is bool.
    """
    z_bar = expert_logits.mean(dim=0)
    z_hat = expert_logits.max(dim=0).values  # like torch.max in the official code: gradient to the argmax expert
    classes = torch.arange(z_bar.shape[-1], device=z_bar.device)
    target_mask = target[:, None] == classes  # not F.one_hot: it checks the range on the host (a sync per call)
    hardest = z_bar.detach().masked_fill(target_mask, float("-inf")).argmax(dim=-1)
    hardest_mask = hardest[:, None] == classes
    return torch.where(hardest_mask, z_bar, z_hat), target_mask


def _non_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Drop each sample's target entry: (..., B, C) -> (..., B, C-1), order of the other classes kept."""
    num_classes = logits.shape[-1]
    slots = torch.arange(num_classes - 1, device=logits.device).expand(target.shape[0], -1)
    index = slots + (slots >= target[:, None]).long()
    return logits.gather(-1, index.expand(*logits.shape[:-1], num_classes - 1))


def dkt_loss(
    expert_logits: torch.Tensor,
    target: torch.Tensor,
    variant: str = "code",
    reduction: str = "batchmean",
    detach: bool = False,
) -> torch.Tensor:
    """L_nt, Dynamic Knowledge Transfer, paper Eq. 5-9: sum over experts m of KL(teacher || student m).

    variant "code" (official `cifarTrain.py:167-199, 215`): C-way softmaxes; the teacher's target logit is the
    constant 0 and each student's target logit the constant -30 (official literal, which assumes logits bounded by
    the scale s = 30), so no target logit gets a gradient. variant "paper" (Eq. 8): (C-1)-way softmaxes over the
    non-target classes only. For both, "mean" divides by B*C, so mean == batchmean / C.

    Args:
        expert_logits: (M, B, C) logits of the M experts.
        target: (B,) int64 class indices.
        variant: "code" or "paper".
        reduction: "batchmean", "mean" (official, / B*C), "sum" or "none" (per-sample (B,)).
        detach: stop the gradient through the grand teacher (the official code detaches nothing).

    Returns:
        The loss, a scalar, or (B,) for reduction "none".
    """
    if variant not in DKT_VARIANTS:
        raise ValueError(f"unknown DKT variant '{variant}', expected one of {DKT_VARIANTS}")
    teacher, target_mask = grand_teacher(expert_logits, target)
    if detach:
        teacher = teacher.detach()
    if variant == "code":
        teacher = teacher.masked_fill(target_mask, 0.0)
        students = expert_logits.masked_fill(target_mask, CODE_MASK_LOGIT)
    else:
        teacher = _non_target(teacher, target)
        students = _non_target(expert_logits, target)
    per_sample = softmax_kl(teacher, students).sum(dim=0)
    return _reduce(per_sample, reduction, expert_logits.shape[-1])


def _ce_summed_over_experts(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Batch-mean CE of (B, C) logits, or the sum over experts of it for (M, B, C) logits."""
    if logits.dim() == 2:
        return F.cross_entropy(logits, target)
    # (M, B, C) -> (B, C, M): CE averages over B*M, so multiply by M for the sum over experts.
    per_expert = F.cross_entropy(logits.permute(1, 2, 0), target[:, None].expand(-1, logits.shape[0]))
    return per_expert * logits.shape[0]


def _log_counts(class_counts: torch.Tensor | Sequence[float], like: torch.Tensor) -> torch.Tensor:
    counts = torch.as_tensor(class_counts, device=like.device)
    return counts.to(torch.promote_types(like.dtype, torch.float32)).log()


def expert_ce(expert_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L_ce, the first term of paper Eq. 10: sum over experts of the batch-mean cross-entropy."""
    return _ce_summed_over_experts(expert_logits, target)


def balanced_softmax_ce(
    logits: torch.Tensor, target: torch.Tensor, class_counts: torch.Tensor | Sequence[float]
) -> torch.Tensor:
    """L_bsce, paper Eq. 11 (Balanced Softmax, Ren et al. 2020): CE(logits + log n, y), batch mean.

    `class_counts` (C,) are the (positive) training counts n; (M, B, C) logits give the sum over experts.
    """
    return _ce_summed_over_experts(logits + _log_counts(class_counts, logits), target)


def logit_adjusted_ce(
    logits: torch.Tensor, target: torch.Tensor, class_counts: torch.Tensor | Sequence[float], tau: float = 1.0
) -> torch.Tensor:
    """Logit-adjusted loss (Menon et al. 2021): CE(logits + tau * log prior, y), prior = n / sum(n), batch mean.

    (M, B, C) logits give the sum over experts. With tau = 1 it equals `balanced_softmax_ce`.
    """
    log_counts = _log_counts(class_counts, logits)
    return _ce_summed_over_experts(logits + tau * (log_counts - log_counts.logsumexp(dim=0)), target)


def _float32_log_counts(class_counts: torch.Tensor | Sequence[float], prior: bool = False) -> torch.Tensor:
    """log n (or log n / sum(n) with `prior`) for a buffer: computed in float64, stored in float32."""
    log_counts = torch.as_tensor(class_counts, device="cpu").to(torch.float64).log()
    return (log_counts - log_counts.logsumexp(dim=0) if prior else log_counts).to(torch.float32)


class ExpertCE(LossTermModule):
    """L_ce (paper Eq. 10, first term): sum over experts of the batch-mean CE of `out.expert_logits`."""

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        return expert_ce(out.expert_logits, target)


class MutualKL(LossTermModule):
    """L_mu (paper Eq. 4): mutual KL over ordered expert pairs; see `mutual_kl`."""

    def __init__(self, reduction: str = "batchmean", detach: bool = False) -> None:
        super().__init__()
        if reduction not in KL_REDUCTIONS:
            raise ValueError(f"unknown reduction '{reduction}', expected one of {KL_REDUCTIONS}")
        self.reduction, self.detach = reduction, detach

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        return mutual_kl(out.expert_logits, self.reduction, self.detach)


class DKT(LossTermModule):
    """L_nt (paper Eq. 5-9): Dynamic Knowledge Transfer from the grand teacher to every expert; see `dkt_loss`."""

    def __init__(self, variant: str = "code", reduction: str = "batchmean", detach: bool = False) -> None:
        super().__init__()
        if variant not in DKT_VARIANTS:
            raise ValueError(f"unknown DKT variant '{variant}', expected one of {DKT_VARIANTS}")
        if reduction not in KL_REDUCTIONS:
            raise ValueError(f"unknown reduction '{reduction}', expected one of {KL_REDUCTIONS}")
        self.variant, self.reduction, self.detach = variant, reduction, detach

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        return dkt_loss(out.expert_logits, target, self.variant, self.reduction, self.detach)


class BalancedSoftmaxCE(LossTermModule):
    """L_bsce (paper Eq. 11): Balanced Softmax CE summed over experts; log n is a float32 buffer."""

    log_counts: torch.Tensor

    def __init__(self, class_counts: torch.Tensor | Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("log_counts", _float32_log_counts(class_counts))

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        return _ce_summed_over_experts(out.expert_logits + self.log_counts, target)


class LogitAdjustedCE(LossTermModule):
    """Logit-adjusted CE (Menon et al. 2021) summed over experts; tau * log prior is a float32 buffer."""

    log_prior: torch.Tensor

    def __init__(self, class_counts: torch.Tensor | Sequence[float], tau: float = 1.0) -> None:
        super().__init__()
        self.tau = tau
        self.register_buffer("log_prior", _float32_log_counts(class_counts, prior=True))

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        return _ce_summed_over_experts(out.expert_logits + self.tau * self.log_prior, target)


from harness.methods.losses_lt import class_balanced_weights, focal_loss, ldam_loss, logit_adjust, tau_normalize  # noqa: E402,F401
