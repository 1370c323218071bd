"""Cell statistics over seeds: mean, sample std, n and a 95% Student-t interval."""

from __future__ import annotations

import math
from collections.abc import Sequence

# Two-sided 97.5% Student-t quantiles for df = 1..30; beyond that the normal value is within 2%.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile(df: int) -> float:
    return _T975[df - 1] if df <= len(_T975) else 1.96


def cell_stats(values: Sequence[float]) -> dict[str, float]:
    """mean, std (n-1), n and the half-width of the 95% interval of the mean (nan where undefined)."""
    clean = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(clean)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0, "ci95": math.nan}
    mean = sum(clean) / n
    if n == 1:
        return {"mean": mean, "std": math.nan, "n": 1, "ci95": math.nan}
    std = math.sqrt(sum((v - mean) ** 2 for v in clean) / (n - 1))
    return {"mean": mean, "std": std, "n": n, "ci95": t_quantile(n - 1) * std / math.sqrt(n)}


def difference(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """mean(a) - mean(b) with the half-width of its 95% Welch interval (df floored: conservative), and the
    larger of the two seed stds; nan where a side has fewer than two values."""
    sa, sb = cell_stats(a), cell_stats(b)
    diff = sa["mean"] - sb["mean"]
    if sa["n"] < 2 or sb["n"] < 2:
        return {"diff": diff, "ci95": math.nan, "spread": math.nan, "n_a": sa["n"], "n_b": sb["n"]}
    va, vb = sa["std"] ** 2 / sa["n"], sb["std"] ** 2 / sb["n"]
    se = math.sqrt(va + vb)
    if se == 0:
        ci = 0.0
    else:  # Welch-Satterthwaite degrees of freedom
        df = (va + vb) ** 2 / (va**2 / (sa["n"] - 1) + vb**2 / (sb["n"] - 1))
        ci = t_quantile(max(1, math.floor(df))) * se
    return {"diff": diff, "ci95": ci, "spread": max(sa["std"], sb["std"]), "n_a": sa["n"], "n_b": sb["n"]}
