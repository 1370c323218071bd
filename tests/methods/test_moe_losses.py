"""Golden values and identities (baselines.md §22) for methods/losses_moe.py: RIDE, BBN, ResLT, TLC, NCL, PaCo, BCL.

The references below are a separate float64 implementation written from the papers' equations and the official
code's conventions (plain Python loops over experts, samples and classes, `math` only); they never call the code
under test. Identities compare against these loops or against CE written out by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness.method import ModelOutput
from harness.methods.losses_lt import LDAMLoss
from harness.methods.losses_moe import (
    NCLLoss,
    RIDELoss,
    TLCLoss,
    bbn_alpha,
    bbn_mixed_loss,
    bcl_loss,
    dirichlet_kl_uniform,
    ncl_loss,
    paco_loss,
    reslt_loss,
    ride_diversity_temperature,
    ride_loss,
    tlc_engagement,
    tlc_kl_weight,
    tlc_loss,
)

M, B, C = 3, 8, 6
COUNTS = [300.0, 120.0, 47.0, 20.0, 9.0, 4.0]


def _logits(seed: int, shape: tuple[int, ...], spread: float = 3.0) -> torch.Tensor:
    return spread * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _labels(seed: int, n: int = B, classes: int = C) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(1000 + seed))


def _unit(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    x = _logits(seed, shape, 1.0)
    return x / x.norm(dim=-1, keepdim=True)


def _close(actual: torch.Tensor | float, expected: float, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    actual = torch.as_tensor(actual, dtype=torch.float64)
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64), rtol=rtol, atol=atol)


def _out(expert_logits: torch.Tensor) -> ModelOutput:
    return ModelOutput(logits=expert_logits.mean(0), expert_logits=expert_logits)


# ---- independent float64 reference ----
def _log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    lse = top + math.log(sum(math.exp(v - top) for v in row))
    return [v - lse for v in row]


def _softmax(row: list[float]) -> list[float]:
    return [math.exp(v) for v in _log_softmax(row)]


def _kl(p_logits: list[float], q_logits: list[float]) -> float:
    """KL(softmax(p) || softmax(q))."""
    lp, lq = _log_softmax(p_logits), _log_softmax(q_logits)
    return sum(math.exp(a) * (a - b) for a, b in zip(lp, lq))


def _ce(row: list[float], y: int) -> float:
    return -_log_softmax(row)[y]


def _margins(counts: list[float], max_m: float) -> list[float]:
    raw = [n ** (-0.25) for n in counts]
    return [max_m * r / max(raw) for r in raw]


def _cb(counts: list[float], beta: float) -> list[float]:
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    return [len(counts) * w / sum(raw) for w in raw]


def _ride_temperature(counts: list[float], factor: float) -> list[float]:
    raw = [len(counts) * n / sum(counts) * factor + 1 - factor for n in counts]
    return [w / max(raw) for w in raw]


def _digamma(x: float) -> float:
    shift = 0.0
    while x < 10.0:
        shift -= 1.0 / x
        x += 1.0
    f = 1.0 / (x * x)
    return shift + math.log(x) - 0.5 / x - f * (1 / 12 - f * (1 / 120 - f * (1 / 252 - f * (1 / 240 - f / 132))))


def _dirichlet_kl(alpha: list[float]) -> float:
    s = sum(alpha)
    value = math.lgamma(s) - math.lgamma(len(alpha)) - sum(math.lgamma(a) for a in alpha)
    return value + sum((a - 1) * (_digamma(a) - _digamma(s)) for a in alpha)


def _ref_ride(z, y, counts, max_m, s, weight, factor, temps, output=None) -> float:
    """RIDELoss.forward: per expert, weighted-mean LDAM + factor * Tbar^2 * batchmean KL(pbar_T || p_k,T)."""
    m = _margins(counts, max_m)
    experts, nb, nc = z.shape
    mean = output if output is not None else z.mean(axis=0)
    tbar = sum(temps) / nc
    total = 0.0
    for k in range(experts):
        base = mean if factor == 0 else z[k]
        num = den = 0.0
        for b in range(nb):
            w = 1.0 if weight is None else weight[y[b]]
            num += w * _ce([base[b, c] - (s * m[c] if c == y[b] else 0.0) for c in range(nc)], y[b])
            den += w
        kl = sum(_kl([mean[b, c] / temps[c] for c in range(nc)], [z[k, b, c] / temps[c] for c in range(nc)])
                 for b in range(nb))
        total += num / den + factor * tbar**2 * kl / nb
    return total


def _ref_tlc(z, out, y, counts, kl_w, max_m, s, weight, temps, factor, engagement, tau) -> float:
    """TLCLoss.forward for one expert's (B, C) logits."""
    m = _margins(counts, max_m)
    nb, nc = z.shape
    tbar = 1.0 if temps is None else sum(temps) / nc
    t = [1.0] * nc if temps is None else temps
    losses = []
    for b in range(nb):
        margined = [z[b, c] - (s * m[c] if c == y[b] else 0.0) for c in range(nc)]
        alpha = [math.exp(v) for v in margined]
        nll = -math.log(alpha[y[b]] / sum(alpha)) * (1.0 if weight is None else weight[y[b]])
        alpha_tilde = [1.0 if c == y[b] else alpha[c] + 1 for c in range(nc)]
        div = _kl([out[b, c] / t[c] for c in range(nc)], [z[b, c] / t[c] for c in range(nc)])
        losses.append(nll + kl_w * _dirichlet_kl(alpha_tilde) - factor * tbar**2 * div)
    keep = [True] * nb if engagement is None else [w / max(engagement) > tau for w in engagement]
    return sum(v for v, k in zip(losses, keep) if k) / sum(keep)


def _ref_engagement(z) -> list[list[float]]:
    """ResNet_s.forward's w list (the first M entries): w_0 = 1, w_{k+1} = w_k u_k / (1 - conflict(b_{k-1}, b_k))."""
    experts, nb, nc = z.shape
    weights = [[1.0] * nb]
    for k in range(experts - 1):
        row = []
        for b in range(nb):
            def belief(e: int, b: int = b) -> list[float]:
                alpha = [math.exp(v) + 1 for v in z[e, b]]
                return [(a - 1) / sum(alpha) for a in alpha]

            u = nc / sum(math.exp(v) + 1 for v in z[k, b])
            conflict = 0.0
            if k > 0:
                prev, cur = belief(k - 1), belief(k)
                conflict = sum(prev[i] * cur[j] for i in range(nc) for j in range(nc) if i != j)
            row.append(weights[-1][b] * u / (1 - conflict))
        weights.append(row)
    return weights


def _ref_ncl(z, y, counts, n_hard, lam, lam_hard) -> float:
    """NIL_NBOD.forward: mask from network 0's raw logits, balanced logits, CE + masked CE, NBOD on both."""
    nets, nb, nc = z.shape
    masks = []
    for b in range(nb):
        order = sorted(range(nc), key=lambda c: (c != y[b], -z[0, b, c]))
        masks.append([1.0 if c in order[:n_hard] else 0.0 for c in range(nc)])
    full = [[[z[k, b, c] + math.log(counts[c]) for c in range(nc)] for b in range(nb)] for k in range(nets)]
    hard = [[[full[k][b][c] * masks[b][c] for c in range(nc)] for b in range(nb)] for k in range(nets)]
    total = sum(_ce(v[k][b], y[b]) for v in (full, hard) for k in range(nets) for b in range(nb)) / nb
    for v, weight in ((full, lam), (hard, lam_hard)):
        if nets == 1:
            continue
        pair_sum = 0.0
        for i in range(nets):
            for j in range(nets):
                if i == j:
                    continue
                for b in range(nb):
                    p_i, p_j = _softmax(v[i][b]), _softmax(v[j][b])
                    pair_sum += sum(pj * (math.log(pj) - math.log(pi + 1e-9)) for pi, pj in zip(p_i, p_j))
        total += weight * pair_sum / nb / (nets - 1)
    return total


def _ref_paco(feats, labels, sup, counts, alpha, t, beta, gamma) -> float:
    """PaCoLoss.forward: anchors are the first len(sup) rows of feats (queue already appended)."""
    n_anchor, nc = sup.shape
    prior = [n / sum(counts) for n in counts]
    total = 0.0
    for i in range(n_anchor):
        centres = [sup[i, c] + math.log(prior[c] + 1e-9) for c in range(nc)]
        samples = [float(feats[i] @ feats[j]) / t for j in range(len(feats))]
        denom = sum(math.exp(v) for v in centres) + gamma * sum(math.exp(v) for j, v in enumerate(samples) if j != i)
        num = beta * (centres[labels[i]] - math.log(denom))
        weight = beta
        for j, v in enumerate(samples):
            if j != i and labels[j] == labels[i]:
                num += alpha * (v - math.log(denom))
                weight += alpha
        total -= num / weight
    return total / n_anchor


def _ref_bcl_per_anchor(feats, labels, protos, t) -> list[float]:
    """BalSCL.forward: rows = view 1 samples, view 2 samples, then one prototype per class."""
    nb, views, _ = feats.shape
    nc = len(protos)
    rows = [feats[b, v] for v in range(views) for b in range(nb)] + [protos[c] for c in range(nc)]
    row_labels = [int(labels[b]) for _ in range(views) for b in range(nb)] + list(range(nc))
    out = []
    for i in range(nb * views):
        sims = {j: float(rows[i] @ rows[j]) / t for j in range(len(rows)) if j != i}
        denom = 0.0
        for c in range(nc):
            members = [j for j in sims if row_labels[j] == c]
            if members:
                denom += sum(math.exp(sims[j]) for j in members) / len(members)
        positives = [j for j in sims if row_labels[j] == row_labels[i]]
        out.append(-sum(sims[j] - math.log(denom) for j in positives) / len(positives))
    return out


# ---- RIDE ----
@pytest.mark.parametrize("drw", [False, True])
def test_ride_matches_loop_reference(drw: bool) -> None:
    z, y = _logits(0, (M, B, C)), _labels(0)
    weight = _cb(COUNTS, 0.9999) if drw else None
    temps = [0.8 * w for w in _ride_temperature(COUNTS, 0.05)] if drw else [0.8] * C
    drw_weight = None if weight is None else torch.tensor(weight, dtype=torch.float64)
    loss = ride_loss(z, y, COUNTS, drw_weight=drw_weight, diversity_factor=-0.45,
                     diversity_temperature=0.8, reweight_temperature=drw)
    _close(loss, _ref_ride(z.numpy(), y.numpy(), COUNTS, 0.5, 30.0, weight, -0.45, temps))


def test_ride_diversity_temperature_formula() -> None:
    torch.testing.assert_close(ride_diversity_temperature(COUNTS, 0.05).double(),
                               torch.tensor(_ride_temperature(COUNTS, 0.05), dtype=torch.float64), rtol=1e-6, atol=0)


def test_ride_one_expert_without_diversity_is_ldam_drw() -> None:
    z, y = _logits(1, (1, B, C)), _labels(1)
    ldam = LDAMLoss(COUNTS)
    for epoch in (0, 199):  # before and after the DRW switch
        ldam.start_epoch(epoch, 200)
        ride = RIDELoss(COUNTS, diversity_factor=0.0)
        ride.start_epoch(epoch, 200)
        _close(ride(_out(z), y), ldam(_out(z), y).item(), rtol=1e-6)  # both hold float32 buffers


def test_ride_identical_experts_have_zero_diversity_kl() -> None:
    z, y = _logits(2, (1, B, C)), _labels(2)
    same = z.expand(M, B, C)
    for reweight in (False, True):
        with_kl = ride_loss(same, y, COUNTS, diversity_factor=-0.45, reweight_temperature=reweight)
        _close(with_kl, M * ride_loss(z, y, COUNTS, diversity_factor=0.0).item(), rtol=1e-12)


def test_ride_zero_diversity_factor_puts_ldam_on_the_mean_logits_as_coded() -> None:
    z, y = _logits(3, (M, B, C)), _labels(3)
    _close(ride_loss(z, y, COUNTS, diversity_factor=0.0),
           M * ride_loss(z.mean(0, keepdim=True), y, COUNTS, diversity_factor=0.0).item(), rtol=1e-12)


def test_ride_diversity_teacher_is_detached() -> None:
    z, y = _logits(4, (M, B, C)).requires_grad_(True), _labels(4)
    output = z.mean(0).detach().requires_grad_(True)
    ride_loss(z, y, COUNTS, output_logits=output).backward()
    assert output.grad is None and z.grad is not None


def test_ride_module_switches_weights_and_temperature_at_eighty_percent() -> None:
    z, y = _logits(5, (M, B, C)), _labels(5)
    term = RIDELoss(COUNTS, diversity_factor=-0.45)
    for epoch, drw in ((159, False), (160, True)):
        term.start_epoch(epoch, 200)
        weight = _cb(COUNTS, 0.9999) if drw else None
        temps = _ride_temperature(COUNTS, 0.05) if drw else [1.0] * C
        expected = _ref_ride(z.numpy(), y.numpy(), COUNTS, 0.5, 30.0, weight, -0.45, temps)
        _close(term(_out(z), y), expected, rtol=1e-6)  # float32 buffers
    assert all(b.dtype == torch.float32 for b in term.buffers())


# ---- BBN ----
def test_bbn_alpha_endpoints_and_divisor() -> None:
    assert bbn_alpha(0, 200) == 1.0
    assert bbn_alpha(199, 200) == pytest.approx(1 - (199 / 200) ** 2) and bbn_alpha(199, 200) < 0.01
    assert bbn_alpha(100, 180) == pytest.approx(1 - (100 / 200) ** 2)  # official: 180 -> 200
    assert bbn_alpha(100, 180, round_divisor=False) == pytest.approx(1 - (100 / 180) ** 2)
    values = [bbn_alpha(e, 200) for e in range(200)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_bbn_mixed_loss_matches_loop_reference_and_alpha_one_is_conventional_ce() -> None:
    z, yc, yr = _logits(6, (B, C)), _labels(6), _labels(7)
    ce_c = sum(_ce(list(z[b].numpy()), yc[b].item()) for b in range(B)) / B
    ce_r = sum(_ce(list(z[b].numpy()), yr[b].item()) for b in range(B)) / B
    _close(bbn_mixed_loss(z, yc, yr, 0.3), 0.3 * ce_c + 0.7 * ce_r)
    _close(bbn_mixed_loss(z, yc, yr, 1.0), ce_c)
    _close(bbn_mixed_loss(z, yc, yr, 0.0), ce_r)


# ---- ResLT ----
def _ref_reslt(z, y, beta, cuts, eps=1e-7) -> float:
    members = [[True] * B, [v >= cuts[0] for v in y], [v >= cuts[1] for v in y]]
    group = sum(-math.log(_softmax(list(z[g, b]))[y[b]] + eps) for g in range(3) for b in range(B) if members[g][b])
    group /= sum(sum(m) for m in members)
    fused = sum(_ce(list(z.sum(axis=0)[b]), y[b]) for b in range(B)) / B
    return beta * group + (1 - beta) * fused


def test_reslt_matches_loop_reference() -> None:
    z, y = _logits(8, (3, B, C)), _labels(8)
    _close(reslt_loss(z, y, beta=0.9, group_cuts=(2, 4)), _ref_reslt(z.numpy(), y.tolist(), 0.9, (2, 4)))


def test_reslt_beta_zero_is_ce_on_summed_logits_and_head_only_groups_give_ce_of_zh() -> None:
    z, y = _logits(9, (3, B, C)), _labels(9)
    fused = sum(_ce(list(z.sum(0)[b].numpy()), y[b].item()) for b in range(B)) / B
    _close(reslt_loss(z, y, beta=0.0, group_cuts=(2, 4)), fused)
    head = y % 2  # every target below the medium cut: only group H
    expected = sum(-math.log(_softmax(list(z[0, b].numpy()))[head[b]] + 1e-7) for b in range(B)) / B
    _close(reslt_loss(z, head, beta=1.0, group_cuts=(2, 4)), expected)
    with pytest.raises(ValueError):
        reslt_loss(z, y, group_cuts=(4, 2))


# ---- TLC ----
def test_dirichlet_kl_to_uniform_is_zero_at_ones_and_matches_loops() -> None:
    _close(dirichlet_kl_uniform(torch.ones(2, C, dtype=torch.float64)).abs().max(), 0.0)
    alpha = _logits(10, (4, C)).exp() + 1
    expected = [_dirichlet_kl(list(row)) for row in alpha.numpy()]
    torch.testing.assert_close(dirichlet_kl_uniform(alpha), torch.tensor(expected, dtype=torch.float64), rtol=1e-10,
                               atol=1e-9)


@pytest.mark.parametrize("switched", [False, True])
def test_tlc_matches_loop_reference(switched: bool) -> None:
    z, out, y = _logits(11, (B, C)), _logits(12, (B, C)), _labels(11)
    weight = _cb(COUNTS, 0.9999) if switched else None
    temps = _ride_temperature(COUNTS, 0.05) if switched else None
    engagement = _logits(13, (B,), 1.0).exp() if switched else None
    loss = tlc_loss(z, out, y, COUNTS, kl_weight=0.37, scale=10.0,
                    drw_weight=None if weight is None else torch.tensor(weight, dtype=torch.float64),
                    diversity_temperature=None if temps is None else torch.tensor(temps, dtype=torch.float64),
                    diversity_factor=0.2, engagement=engagement, tau=0.54)
    eng = None if engagement is None else engagement.tolist()
    _close(loss, _ref_tlc(z.numpy(), out.numpy(), y.tolist(), COUNTS, 0.37, 0.5, 10.0, weight, temps, 0.2, eng, 0.54),
           rtol=1e-9, atol=1e-9)


def test_tlc_at_epoch_zero_without_margin_or_drw_is_ce() -> None:
    z, y = _logits(14, (B, C)), _labels(14)
    ce = sum(_ce(list(z[b].numpy()), y[b].item()) for b in range(B)) / B
    _close(tlc_loss(z, z, y, COUNTS, kl_weight=0.0, max_margin=0.0, diversity_factor=0.0), ce)
    # identical output logits: the diversity KL is zero whatever its factor
    _close(tlc_loss(z, z, y, COUNTS, kl_weight=0.0, max_margin=0.0), ce, atol=1e-12)


def test_tlc_engagement_matches_loops_and_tau_zero_keeps_all_samples() -> None:
    z, y = _logits(15, (M, B, C), 1.0), _labels(15)
    expected = torch.tensor(_ref_engagement(z.numpy()), dtype=torch.float64)
    torch.testing.assert_close(tlc_engagement(z), expected, rtol=1e-10, atol=0)
    w = tlc_engagement(z)
    everything = tlc_loss(z, z.mean(0), y, COUNTS, kl_weight=0.1)
    _close(tlc_loss(z, z.mean(0), y, COUNTS, kl_weight=0.1, engagement=w, tau=0.0), everything.item(), rtol=1e-12)
    assert tlc_loss(z, z.mean(0), y, COUNTS, kl_weight=0.1, engagement=w, tau=0.99) != everything


def test_tlc_module_anneals_kl_and_switches_drw() -> None:
    assert tlc_kl_weight(159) == pytest.approx(160 / 13200)
    z, y = _logits(16, (M, B, C), 1.0), _labels(16)
    term = TLCLoss(COUNTS)
    term.start_epoch(170, 200)
    assert term.kl_weight.item() == pytest.approx(171 / 13200)
    w = _ref_engagement(z.numpy())
    temps = _ride_temperature(COUNTS, 0.05)
    out = z.mean(0).numpy()
    expected = sum(_ref_tlc(z[k].numpy(), out, y.tolist(), COUNTS, 171 / 13200, 0.5, 30.0, _cb(COUNTS, 0.9999),
                            temps, 0.01, w[k], 0.54) for k in range(M))
    _close(term(_out(z), y), expected, rtol=1e-6)
    term.start_epoch(0, 200)
    assert term.weight.eq(1).all() and term.temperature.eq(1).all()


# ---- NCL ----
def test_ncl_matches_loop_reference() -> None:
    z, y = _logits(17, (M, B, C)), _labels(17)
    _close(ncl_loss(z, y, COUNTS, hard_topk=3, nbod_weight=0.6, hard_nbod_weight=0.4),
           _ref_ncl(z.numpy(), y.tolist(), COUNTS, 3, 0.6, 0.4))
    torch.testing.assert_close(NCLLoss(COUNTS, hard_topk=3)(_out(z), y).double(),
                               torch.tensor(_ref_ncl(z.numpy(), y.tolist(), COUNTS, 3, 0.6, 0.6), dtype=torch.float64),
                               rtol=1e-6, atol=0)


def test_ncl_one_network_all_classes_is_twice_balanced_softmax() -> None:
    z, y = _logits(18, (1, B, C)), _labels(18)
    bs = sum(_ce([z[0, b, c].item() + math.log(COUNTS[c]) for c in range(C)], y[b].item()) for b in range(B)) / B
    _close(ncl_loss(z, y, COUNTS, hard_topk=C), 2 * bs)
    _close(ncl_loss(z, y, COUNTS, hard_topk=100), 2 * bs)  # N > C keeps every class, as the official slice


def test_ncl_identical_networks_have_zero_nbod() -> None:
    z, y = _logits(19, (1, B, C)), _labels(19)
    same = z.expand(M, B, C)
    # log(p + 1e-9) makes KL(p || p) about -C * 1e-9, not exactly 0
    _close(ncl_loss(same, y, COUNTS, hard_topk=3), ncl_loss(same, y, COUNTS, hard_topk=3, nbod_weight=0.0).item(),
           atol=1e-7)


# ---- PaCo ----
def _paco_inputs(seed: int):
    q, k, queue = _unit(seed, (4, 5)), _unit(seed + 1, (4, 5)), _unit(seed + 2, (5, 5))
    y, queue_y = _labels(seed, 4, 3), _labels(seed + 1, 5, 3)
    return torch.cat([q, k]), torch.cat([y, y]), _logits(seed + 3, (4, 3)), queue, queue_y


def test_paco_matches_loop_reference() -> None:
    feats, labels, sup, queue, queue_y = _paco_inputs(20)
    counts = COUNTS[:3]
    loss = paco_loss(feats, labels, sup, counts, queue, queue_y, alpha=0.3, temperature=0.5, gamma=0.7)
    all_feats, all_labels = torch.cat([feats, queue]).numpy(), torch.cat([labels, queue_y]).tolist()
    _close(loss, _ref_paco(all_feats, all_labels, sup.numpy(), counts, 0.3, 0.5, 1.0, 0.7), rtol=1e-9, atol=1e-10)
    no_queue = paco_loss(torch.cat([feats, queue]), torch.cat([labels, queue_y]), sup, counts, alpha=0.3,
                         temperature=0.5, gamma=0.7)
    _close(no_queue, loss.item())


def test_paco_without_sample_terms_is_logit_adjusted_ce() -> None:
    feats, labels, sup, queue, queue_y = _paco_inputs(21)
    counts = COUNTS[:3]
    prior = [n / sum(counts) for n in counts]
    la = sum(_ce([sup[b, c].item() + math.log(prior[c]) for c in range(3)], labels[b].item()) for b in range(4)) / 4
    # T = 1 keeps the sample logits (dropped from the denominator, but in the row max) near the centres: the official
    # 1e-12 inside the log is added after that shift, so at T = 0.05 it moves the value by ~1e-12 * e^(1/T - ...).
    loss = paco_loss(feats, labels, sup, counts, queue, queue_y, alpha=0.0, gamma=0.0, temperature=1.0)
    _close(loss, la, atol=1e-6)


# ---- BCL ----
def test_bcl_matches_loop_reference() -> None:
    feats, protos, y = _unit(22, (B, 2, 4)), _unit(23, (C, 4)), _labels(22)
    expected = _ref_bcl_per_anchor(feats.numpy(), y.numpy(), protos.numpy(), 0.5)
    torch.testing.assert_close(bcl_loss(feats, y, protos, temperature=0.5, reduction="none"),
                               torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-12)
    _close(bcl_loss(feats, y, protos, temperature=0.5), float(np.mean(expected)), rtol=1e-10)


def test_bcl_negative_class_contributes_its_mean_whatever_its_batch_count() -> None:
    protos, t = _unit(24, (C, 4)), 0.5
    feats, y = _unit(25, (4, 2, 4)), torch.tensor([0, 1, 2, 0])
    # class 5: all its rows (both views, its prototype) are one vector, once in the batch or three times
    v5 = protos[5]
    once = torch.cat([feats, v5.expand(1, 2, 4)])
    thrice = torch.cat([feats, v5.expand(3, 2, 4)])
    y_once, y_thrice = torch.cat([y, torch.tensor([5])]), torch.cat([y, torch.tensor([5, 5, 5])])
    a = bcl_loss(once, y_once, protos, temperature=t, reduction="none").view(2, -1)[:, :4]
    b = bcl_loss(thrice, y_thrice, protos, temperature=t, reduction="none").view(2, -1)[:, :4]
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---- all terms ----
def test_every_term_is_finite_with_gradients_in_float32() -> None:
    z, y = _logits(26, (M, B, C)).float().requires_grad_(True), _labels(26)
    out = _out(z)
    for term in (RIDELoss(COUNTS), TLCLoss(COUNTS), NCLLoss(COUNTS)):
        term.start_epoch(180, 200)
        loss = term(out, y)
        (grad,) = torch.autograd.grad(loss, z)
        assert loss.dtype == torch.float32 and torch.isfinite(loss) and torch.isfinite(grad).all()
