"""Golden values and identities for methods/losses.py, against an independent float64 loop reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.method import ModelOutput
from harness.methods.losses import (
    DKT,
    BalancedSoftmaxCE,
    ExpertCE,
    LogitAdjustedCE,
    MutualKL,
    balanced_softmax_ce,
    dkt_loss,
    expert_ce,
    logit_adjusted_ce,
    mutual_kl,
    softmax_kl,
)

M, B, C = 3, 5, 7
COUNTS = [100.0, 60.0, 36.0, 22.0, 13.0, 8.0, 5.0]


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = 3.0 * torch.randn(M, B, C, generator=gen, dtype=torch.float64)
    return logits, torch.randint(0, C, (B,), generator=gen)


def _closed_form() -> tuple[torch.Tensor, torch.Tensor]:
    """RNG-free input for the pinned literals."""
    m, b, c = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in (M, B, C)), indexing="ij")
    return 4.0 * torch.sin(1.3 * m + 0.7 * b * c + 0.4 * c + 0.1 * b), torch.tensor([0, 3, 6, 2, 5])


# ---- independent float64 reference: explicit loops over experts, samples and classes ----
def _softmax(v: list[float]) -> list[float]:
    top = max(v)
    e = [math.exp(x - top) for x in v]
    return [x / sum(e) for x in e]


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pc * (math.log(pc) - math.log(qc)) for pc, qc in zip(p, q, strict=True) if pc > 0)


def _ref_mutual(z: np.ndarray) -> list[float]:
    return [
        sum(
            _kl(_softmax(list(z[j, b])), _softmax(list(z[k, b])))
            for j in range(len(z))
            for k in range(len(z))
            if j != k
        )
        for b in range(z.shape[1])
    ]


def _ref_dkt(z: np.ndarray, y: np.ndarray, variant: str) -> list[float]:
    out = []
    for b in range(z.shape[1]):
        z_bar = [sum(z[m, b, c] for m in range(len(z))) / len(z) for c in range(z.shape[2])]
        z_hat = [max(z[m, b, c] for m in range(len(z))) for c in range(z.shape[2])]
        h = max((c for c in range(z.shape[2]) if c != y[b]), key=lambda c: z_bar[c])
        t = [z_bar[c] if c == h else z_hat[c] for c in range(z.shape[2])]
        total = 0.0
        for m in range(len(z)):
            if variant == "code":
                tm = [0.0 if c == y[b] else t[c] for c in range(z.shape[2])]
                um = [-30.0 if c == y[b] else z[m, b, c] for c in range(z.shape[2])]
            else:
                tm = [t[c] for c in range(z.shape[2]) if c != y[b]]
                um = [z[m, b, c] for c in range(z.shape[2]) if c != y[b]]
            total += _kl(_softmax(tm), _softmax(um))
        out.append(total)
    return out


def _ref_ce(z: np.ndarray, y: np.ndarray, shift: list[float]) -> float:
    total = 0.0
    for m in range(len(z)):
        for b in range(z.shape[1]):
            row = [z[m, b, c] + shift[c] for c in range(z.shape[2])]
            total -= math.log(_softmax(row)[y[b]]) / z.shape[1]
    return total


def _close(actual: torch.Tensor, expected: float | list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-12)


# ---- golden values ----
@pytest.mark.parametrize("seed", [0, 1])
def test_golden_against_loop_reference(seed: int) -> None:
    z, y = _inputs(seed)
    zn, yn = z.numpy(), y.numpy()
    mu = _ref_mutual(zn)
    _close(mutual_kl(z, "none"), mu)
    _close(mutual_kl(z, "batchmean"), sum(mu) / B)
    _close(mutual_kl(z, "mean"), sum(mu) / (B * C))
    _close(mutual_kl(z, "sum"), sum(mu))
    for variant in ("code", "paper"):
        nt = _ref_dkt(zn, yn, variant)
        _close(dkt_loss(z, y, variant, "none"), nt)
        _close(dkt_loss(z, y, variant, "batchmean"), sum(nt) / B)
        _close(dkt_loss(z, y, variant, "mean"), sum(nt) / (B * C))
    log_n = [math.log(n) for n in COUNTS]
    _close(expert_ce(z, y), _ref_ce(zn, yn, [0.0] * C))
    _close(balanced_softmax_ce(z, y, torch.tensor(COUNTS)), _ref_ce(zn, yn, log_n))
    for tau in (0.5, 1.0, 2.0):
        shift = [tau * (v - math.log(sum(COUNTS))) for v in log_n]
        _close(logit_adjusted_ce(z, y, torch.tensor(COUNTS), tau), _ref_ce(zn, yn, shift))
    # (B, C) logits: one expert, same reference.
    _close(balanced_softmax_ce(z[1], y, COUNTS), _ref_ce(zn[1:2], yn, log_n))


def test_pinned_literals() -> None:
    z, y = _closed_form()
    counts = torch.tensor(COUNTS)
    _close(mutual_kl(z), 17.46805250400094)
    _close(dkt_loss(z, y, "code"), 4.641881787025768)
    _close(dkt_loss(z, y, "paper"), 4.10867687327464)
    _close(dkt_loss(z, y, "code", "mean"), 4.641881787025768 / C)
    _close(expert_ce(z, y), 13.681527844178287)
    _close(balanced_softmax_ce(z, y, counts), 15.605163403504744)
    _close(logit_adjusted_ce(z, y, counts, tau=0.5), 14.405467597148759)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")
def test_matches_official_kl_div_formulation() -> None:
    """Transcription of the official units: F.kl_div(log q, p) with the default 'mean' reduction (/ B*C)."""
    z, y = _inputs(2)
    official_mu = sum(
        F.kl_div(F.log_softmax(z[k], -1), F.softmax(z[j], -1), reduction="mean")
        for k in range(M)
        for j in range(M)
        if j != k
    )
    _close(mutual_kl(z, "mean"), official_mu.item())
    one_hot = F.one_hot(y, C).double()
    z_bar, z_hat = z.mean(0), z.max(0).values
    hardest = F.one_hot((-30 * one_hot + z_bar * (1 - one_hot)).argmax(-1), C).double()
    teacher = F.softmax(z_hat * (1 - hardest) * (1 - one_hot) + z_bar * hardest, -1)
    official_nt = sum(
        F.kl_div(torch.log(F.softmax(z[m] * (1 - one_hot) - 30 * one_hot, -1)), teacher, reduction="mean")
        for m in range(M)
    )
    _close(dkt_loss(z, y, "code", "mean"), official_nt.item())


def test_softmax_kl_equals_kl_div() -> None:
    z, _ = _inputs(3)
    expected = F.kl_div(F.log_softmax(z[1], -1), F.softmax(z[0], -1), reduction="none").sum(-1)
    torch.testing.assert_close(softmax_kl(z[0], z[1]), expected)


def test_mutual_kl_zero_for_identical_or_single_expert() -> None:
    z, _ = _inputs()
    assert mutual_kl(z[:1].expand(M, -1, -1)).abs().max() < 1e-12
    assert mutual_kl(z[:1], "none").abs().max() < 1e-12


@pytest.mark.parametrize("variant", ["code", "paper"])
def test_dkt_ignores_target_logits(variant: str) -> None:
    z, y = _inputs()
    moved = z.clone()
    moved[:, torch.arange(B), y] += torch.tensor([5.0, -7.0, 11.0])[:, None]
    torch.testing.assert_close(dkt_loss(moved, y, variant, "none"), dkt_loss(z, y, variant, "none"), rtol=1e-12, atol=0)
    z.requires_grad_(True)
    dkt_loss(z, y, variant).backward()
    assert torch.all(z.grad[:, torch.arange(B), y] == 0)


def test_mean_is_batchmean_over_classes() -> None:
    z, y = _inputs()
    torch.testing.assert_close(mutual_kl(z, "mean") * C, mutual_kl(z, "batchmean"))
    for variant in ("code", "paper"):
        # The official-units / batch-mean ratio is exactly C (section 2.1 item 4 of the official-code notes).
        torch.testing.assert_close(dkt_loss(z, y, variant, "mean") * C, dkt_loss(z, y, variant, "batchmean"))
        torch.testing.assert_close(dkt_loss(z, y, variant, "sum"), dkt_loss(z, y, variant, "none").sum())


def test_unknown_options_raise() -> None:
    z, y = _inputs()
    with pytest.raises(ValueError, match="reduction"):
        mutual_kl(z, "avg")
    with pytest.raises(ValueError, match="variant"):
        dkt_loss(z, y, "both")
    with pytest.raises(ValueError, match="variant"):
        DKT(variant="both")


def test_ce_identities() -> None:
    z, y = _inputs()
    ce = expert_ce(z, y)
    torch.testing.assert_close(ce, sum(F.cross_entropy(z[m], y) for m in range(M)))
    torch.testing.assert_close(balanced_softmax_ce(z, y, torch.full((C,), 42, dtype=torch.int64)), ce)
    torch.testing.assert_close(logit_adjusted_ce(z, y, torch.tensor(COUNTS), tau=0.0), ce)
    torch.testing.assert_close(
        logit_adjusted_ce(z, y, torch.tensor(COUNTS)), balanced_softmax_ce(z, y, torch.tensor(COUNTS))
    )
    assert not torch.allclose(balanced_softmax_ce(z, y, torch.tensor(COUNTS)), ce)


@pytest.mark.parametrize("loss", ["mu", "code", "paper"])
def test_gradient_reaches_every_expert_and_teacher_path_matters(loss: str) -> None:
    z, y = _inputs()

    def grad(detach: bool) -> torch.Tensor:
        x = z.clone().requires_grad_(True)
        (mutual_kl(x, detach=detach) if loss == "mu" else dkt_loss(x, y, loss, detach=detach)).backward()
        return x.grad

    full = grad(detach=False)
    assert torch.all(full.flatten(1).abs().sum(1) > 1e-3)
    assert not torch.allclose(full, grad(detach=True))


def test_mutual_kl_detach_is_cross_entropy_to_fixed_teachers() -> None:
    """With frozen teachers, d/dz^k of sum_{j!=k} KL(p^j || p^k) / B is ((M-1) p^k - sum_{j!=k} p^j) / B."""
    z, _ = _inputs()
    x = z.clone().requires_grad_(True)
    mutual_kl(x, detach=True).backward()
    p = F.softmax(z, -1)
    torch.testing.assert_close(x.grad, (M * p - p.sum(0, keepdim=True)) / B)


@pytest.mark.parametrize("variant", ["code", "paper"])
def test_dkt_detach_gradient_is_student_minus_teacher(variant: str) -> None:
    """With a frozen teacher, each student's gradient on non-targets is (q^m - p^T) / B, and 0 on the target."""
    z, y = _inputs()
    x = z.clone().requires_grad_(True)
    dkt_loss(x, y, variant, detach=True).backward()
    is_target = F.one_hot(y, C).bool()
    z_bar, z_hat = z.mean(0), z.max(0).values
    hardest = F.one_hot(z_bar.masked_fill(is_target, -math.inf).argmax(-1), C).bool()
    teacher = torch.where(hardest, z_bar, z_hat)
    fill = (0.0, -30.0) if variant == "code" else (-math.inf, -math.inf)
    p_t = F.softmax(teacher.masked_fill(is_target, fill[0]), -1)
    q = F.softmax(z.masked_fill(is_target, fill[1]), -1)
    torch.testing.assert_close(x.grad, ((q - p_t) / B).masked_fill(is_target, 0.0))


def test_paper_variant_gradient_is_finite_for_extreme_logits() -> None:
    z, y = _inputs()
    z = (z * 100).requires_grad_(True)
    dkt_loss(z, y, "paper").backward()
    mutual_kl(z).backward()
    assert torch.isfinite(z.grad).all()


def test_modules_equal_functions() -> None:
    z, y = _inputs()
    out = ModelOutput(logits=z.mean(0), expert_logits=z)
    counts = torch.tensor(COUNTS)
    pairs = [
        (ExpertCE(), expert_ce(z, y)),
        (MutualKL("mean", detach=True), mutual_kl(z, "mean")),
        (DKT("paper", "batchmean"), dkt_loss(z, y, "paper")),
        (DKT(), dkt_loss(z, y, "code")),
        (BalancedSoftmaxCE(counts).to(torch.float64), balanced_softmax_ce(z, y, counts)),
        (LogitAdjustedCE(counts.int(), tau=0.5).to(torch.float64), logit_adjusted_ce(z, y, counts, 0.5)),
    ]
    for module, expected in pairs:
        torch.testing.assert_close(module(out, y), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize(("cls", "name"), [(BalancedSoftmaxCE, "log_counts"), (LogitAdjustedCE, "log_prior")])
def test_buffers_are_float32_state_and_follow_to(cls: type, name: str) -> None:
    module = cls(COUNTS)
    assert name in module.state_dict()
    assert getattr(module, name).dtype == torch.float32
    module.to(torch.float64)
    assert getattr(module, name).dtype == torch.float64
    assert module.state_dict()[name].dtype == torch.float64


def test_losses_trace_without_graph_breaks() -> None:
    """fullgraph tracing fails on a host sync (.item(), bool(tensor)) or any other graph break."""
    z, y = _inputs()
    modules = [
        ExpertCE(),
        MutualKL(),
        DKT(),
        DKT("paper", "mean", True),
        BalancedSoftmaxCE(COUNTS),
        LogitAdjustedCE(COUNTS),
    ]
    compiled = torch.compile(lambda out, t: torch.stack([m(out, t) for m in modules]), fullgraph=True, backend="eager")
    out = ModelOutput(logits=z.mean(0), expert_logits=z)
    torch.testing.assert_close(compiled(out, y), torch.stack([m(out, y) for m in modules]))
