"""Paired comparisons of two rows over seeds: the same training seed on the same split gives one difference per
seed, and the interval is over those differences (the seed-to-seed spread that both rows share cancels out).

`stats.difference` (the demo's verdict) compares two independent samples (Welch); a paired interval is the right
one when both rows were run with the same seeds on the same split, which is what `paired_frame` checks. The
difference is always b - a, in the metric's unit (points for accuracies). An interval that contains 0 is "not told
apart", the demo's wording.

The t quantile is scipy's `scipy.special.stdtrit` (exact for every df and confidence level). scipy is not one of
the harness's own dependencies but mlflow's (mlflow requires scipy<2), so it is there wherever the harness is;
`scipy.special` is imported on first use only (it is much lighter than `scipy.stats`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness.data import shot_groups
from harness.studies.figures import COLORS, GROUPS, save_png, size_order
from harness.studies.writers import write_table

METRICS = ("test/top1", "test/many", "test/medium", "test/few")
SEED = ("params.train.seed", "tags.seed")  # the param first, as report.seed_runs does
SETTING = ("params.data.dataset", "params.data.imbalance_factor")  # one setting per comparison
SPLIT = ("params.data.data_seed", "tags.manifest_hash")  # may move with the seed, never between a and b
NUMERIC = frozenset({"params.data.imbalance_factor", "params.data.data_seed"})
ONE_SEED = "one seed: no interval"
NOT_TOLD_APART = "not told apart"
SUMMARY = ("n", "mean", "std", "t", "half_width", "low", "high", "boot_low", "boot_high", "confidence", "verdict")
FORMATS = ("md", "csv", "text")


def t_quantile(df: int, confidence: float = 0.95) -> float:
    """The two-sided Student-t quantile t_{(1+confidence)/2, df}."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    from scipy.special import stdtrit  # via mlflow; see the module docstring

    return float(stdtrit(df, (1 + confidence) / 2))


def _col(runs: pd.DataFrame, name: str) -> pd.Series:
    return runs[name] if name in runs.columns else pd.Series([None] * len(runs), index=runs.index, dtype=object)


def _normal(column: str, values: pd.Series) -> pd.Series:
    """Comparable text: numbers as %g ("100.0" and 100 agree), other values as logged (hashes stay text)."""
    if column in NUMERIC:
        return pd.to_numeric(values, errors="coerce").map(lambda v: f"{v:g}")
    return values.astype(str)


def _side(runs: pd.DataFrame, name: str, key: str, column: str, metric: str) -> pd.DataFrame:
    """The finished runs of `name` that have a value of the metric, with a numeric `_seed` and `_value`."""
    mine = runs[_col(runs, key) == name]
    if "status" in mine.columns:
        mine = mine[mine["status"] == "FINISHED"]
    value = pd.to_numeric(_col(mine, column), errors="coerce")
    mine = mine.assign(_value=value)[value.notna()]
    if mine.empty:
        raise ValueError(f"no finished run with {key} == '{name}' has a value of {metric}")
    seed = pd.to_numeric(_col(mine, SEED[0]).fillna(_col(mine, SEED[1])), errors="coerce")
    if seed.isna().any():
        raise ValueError(f"runs of '{name}' without a training seed (params.train.seed or tags.seed)")
    return mine.assign(_seed=seed)


def _one_per_seed(side: pd.DataFrame, name: str, matched: list[str]) -> pd.DataFrame:
    """The newest run of each (seed, split) (a rerun does not count twice); a seed on two splits is refused."""
    side = side.assign(**{c: _normal(c, side[c]) for c in matched})
    if "start_time" in side.columns:
        side = side.sort_values("start_time", kind="stable")
    side = side.drop_duplicates(["_seed", *matched], keep="last")
    doubled = sorted(side.loc[side["_seed"].duplicated(), "_seed"].unique())
    if doubled:
        raise ValueError(f"'{name}' has runs on several splits for seed(s) {_seeds(doubled)}; filter the runs to one")
    return side.set_index("_seed").sort_index()


def _seeds(values: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in values)


def _describe(line: pd.Series, columns: Sequence[str]) -> str:
    return ", ".join(f"{c.split('.', 1)[1]}={line[c]}" for c in columns)


def paired_frame(runs: pd.DataFrame, a: str, b: str, metric: str = "test/top1",
                 key: str = "tags.row_key") -> pd.DataFrame:
    """One line per seed (seed, a, b, diff = b - a) from a runs DataFrame (`Tracker.search`), the runs of a and b
    matched on the training seed and on the split: dataset, imbalance factor, data seed and manifest hash, each
    where every selected run has it (the columns used are in `frame.attrs["matched_on"]`).

    Refused (ValueError): different seed sets (the missing seeds are named), a seed whose two runs are on different
    splits, and runs that span several datasets or imbalance factors (filter the runs to one setting first)."""
    column = metric if metric.startswith("metrics.") else f"metrics.{metric}"
    sides = {name: _side(runs, name, key, column, metric) for name in (a, b)}
    both = pd.concat(sides.values())
    matched = [c for c in (*SETTING, *SPLIT) if c in both.columns and both[c].notna().all()]
    first, second = (_one_per_seed(sides[name], name, matched) for name in (a, b))
    missing_a, missing_b = sorted(set(second.index) - set(first.index)), sorted(set(first.index) - set(second.index))
    if missing_a or missing_b:
        gaps = [f"'{n}' has no run for seed(s) {_seeds(m)}" for n, m in ((a, missing_a), (b, missing_b)) if m]
        raise ValueError(f"the seed sets of '{a}' and '{b}' differ on {metric}: " + "; ".join(gaps))
    for seed in first.index:
        if any(first.at[seed, c] != second.at[seed, c] for c in matched):
            raise ValueError(f"seed {seed:g}: '{a}' ran on {_describe(first.loc[seed], matched)} and '{b}' on "
                             f"{_describe(second.loc[seed], matched)}; a paired difference needs the same split")
    setting = [c for c in SETTING if c in matched]
    settings = first[setting].drop_duplicates() if setting else first.iloc[:0]
    if len(settings) > 1:
        found = "; ".join(_describe(line, setting) for _, line in settings.iterrows())
        raise ValueError(f"the runs span several settings ({found}); filter the runs to one")
    seeds = first.index.to_numpy()
    frame = pd.DataFrame({"seed": seeds.astype(int) if np.all(seeds == np.round(seeds)) else seeds,
                          "a": first["_value"].to_numpy(), "b": second["_value"].to_numpy()})
    frame["diff"] = frame["b"] - frame["a"]
    frame.attrs.update(a=a, b=b, metric=metric, matched_on=tuple(c.split(".", 1)[1] for c in matched))
    return frame


def verdict(low: float, high: float) -> str:
    """"a above b" / "b above a" for an interval of b - a that excludes 0; "not told apart" where it contains 0
    (end points included: an interval that touches 0 does not tell the rows apart)."""
    if low <= 0 <= high:
        return NOT_TOLD_APART
    return "b above a" if low > 0 else "a above b"


def bootstrap_interval(diffs: np.ndarray, confidence: float, resamples: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap of the mean difference: seeds drawn with replacement, `resamples` times (numpy's
    default_rng(seed), so the same call gives the same interval). With 3-5 seeds it is narrower than the t
    interval (it cannot see beyond the observed differences); it is a cross-check, not the verdict."""
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(resamples, len(diffs)))].mean(axis=1)
    alpha = 1 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def paired_summary(frame: pd.DataFrame, confidence: float = 0.95, bootstrap: int = 0,
                   seed: int = 0) -> dict[str, Any]:
    """n, mean and std (n-1) of the differences, the paired t interval mean ± t_{n-1} sd / sqrt(n) (`t`,
    `half_width`, `low`, `high`), with `bootstrap` > 0 a percentile bootstrap interval (`boot_low`, `boot_high`;
    NaN otherwise), and the `verdict` on the t interval. One seed gives no interval ("one seed: no interval")."""
    diffs = frame["diff"].to_numpy(dtype=float)
    n = len(diffs)
    if n == 0:
        raise ValueError("no paired differences to summarise")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    out = dict.fromkeys(SUMMARY, math.nan) | {"n": n, "mean": float(diffs.mean()), "confidence": confidence,
                                              "verdict": ONE_SEED}
    if n == 1:
        return out
    std = float(diffs.std(ddof=1))
    t = t_quantile(n - 1, confidence)
    half = t * std / math.sqrt(n)
    out.update(std=std, t=t, half_width=half, low=out["mean"] - half, high=out["mean"] + half)
    out["verdict"] = verdict(out["low"], out["high"])
    if bootstrap > 0:
        out["boot_low"], out["boot_high"] = bootstrap_interval(diffs, confidence, int(bootstrap), seed)
    return out


def paired_table(runs: pd.DataFrame, pairs: Sequence[tuple[str, str]], metrics: Sequence[str] = METRICS,
                 key: str = "tags.row_key", confidence: float = 0.95, bootstrap: int = 0,
                 seed: int = 0) -> pd.DataFrame:
    """One line per (pair, metric): a, b, metric, the `paired_summary` columns, the seeds and what was matched."""
    lines = []
    for a, b in pairs:
        for metric in metrics:
            frame = paired_frame(runs, a, b, metric, key)
            lines.append({"a": a, "b": b, "metric": metric,
                          **paired_summary(frame, confidence, bootstrap, seed),
                          "seeds": _seeds(frame["seed"]), "matched_on": ",".join(frame.attrs["matched_on"])})
    return pd.DataFrame(lines, columns=["a", "b", "metric", *SUMMARY, "seeds", "matched_on"])


def difference_cell(mean: float, half_width: float, n: int, low: float, high: float) -> str:
    """"+0.42 ±1.10 (within noise)" where the interval contains 0, "+2.58 ±1.10" where it does not."""
    if n < 2:
        return f"{mean:+.2f} ({ONE_SEED})"
    flag = " (within noise)" if verdict(low, high) == NOT_TOLD_APART else ""
    return f"{mean:+.2f} ±{half_width:.2f}{flag}"


def _interval(low: float, high: float) -> str:
    return "-" if math.isnan(low) else f"[{low:+.2f}, {high:+.2f}]"


def _named(line: Any) -> str:
    return line.verdict.replace("a above b", f"{line.a} above {line.b}").replace("b above a", f"{line.b} above {line.a}")


def display_frame(table: pd.DataFrame) -> pd.DataFrame:
    """The human table: pair (b - a), metric, n, difference ± half-width, interval(s), verdict in the rows' names."""
    rows = []
    for line in table.itertuples(index=False):
        row = {"pair": f"{line.b} - {line.a}", "metric": line.metric, "n": line.n,
               "b - a": difference_cell(line.mean, line.half_width, line.n, line.low, line.high),
               "t interval": _interval(line.low, line.high)}
        if table["boot_low"].notna().any():
            row["bootstrap interval"] = _interval(line.boot_low, line.boot_high)
        rows.append({**row, "verdict": _named(line)})
    return pd.DataFrame(rows)


def _level(table: pd.DataFrame) -> str:
    levels = sorted(set(table["confidence"]))
    return "/".join(f"{100 * c:g}%" for c in levels) or "95%"


def render_paired(table: pd.DataFrame, fmt: str) -> str:
    """`paired_table` as "md" (with a protocol line), "csv" (the numbers, 4 decimals) or "text" (one sentence per
    line: "shike - plain, test/top1: +2.58 ±11.46 (within noise), n=3 seeds, 95% t interval [...]: not told
    apart")."""
    if fmt == "csv":
        numbers = [c for c in SUMMARY if c not in ("n", "verdict")]
        return write_table(table.assign(**{c: table[c].astype(float).round(4) for c in numbers}), "csv")
    if fmt == "md":
        matched = ", ".join(sorted(set(",".join(table["matched_on"]).split(",")) - {""})) or "seed only"
        lines = [f"Differences are b - a over seeds run by both rows, matched on the training seed and {matched}; "
                 f"{_level(table)} paired Student-t interval; '(within noise)': the interval contains 0."]
        return write_table(display_frame(table), "md", "Paired differences over seeds", lines)
    if fmt == "text":
        out = []
        for line in table.itertuples(index=False):
            cell = difference_cell(line.mean, line.half_width, line.n, line.low, line.high)
            text = f"{line.b} - {line.a}, {line.metric}: {cell}, n={line.n} seeds"
            if line.n > 1:
                text += f", {100 * line.confidence:g}% t interval {_interval(line.low, line.high)}"
                if not math.isnan(line.boot_low):
                    text += f", bootstrap {_interval(line.boot_low, line.boot_high)}"
            out.append(f"{text}: {_named(line)}")
        return "\n".join(out) + "\n"
    raise ValueError(f"unknown format '{fmt}'; known: {', '.join(FORMATS)}")


def per_class_difference(details_a: Sequence[np.ndarray], details_b: Sequence[np.ndarray],
                         class_counts: Sequence[int]) -> pd.DataFrame:
    """Per class, b - a test accuracy in points (`per_class_acc` of each run's eval_details.npz, fractions),
    paired by position (seed i of a with seed i of b) and averaged over seeds; classes from the most training
    images to the fewest (ties keep class order). Columns: rank, class, train_count, group, a, b, diff, std
    (of the per-seed differences; NaN for one seed), n."""
    counts = np.asarray(class_counts, dtype=int)
    if len(details_a) != len(details_b) or not details_a:
        raise ValueError(f"paired per-class differences need the same seeds on both sides, got {len(details_a)} "
                         f"and {len(details_b)} runs")
    a, b = (100 * np.stack([np.asarray(d, dtype=float) for d in side]) for side in (details_a, details_b))
    if a.shape != b.shape or a.shape[1] != len(counts):
        raise ValueError(f"per-class accuracies of shape {a.shape} and {b.shape} for {len(counts)} classes")
    diff = b - a
    std = diff.std(axis=0, ddof=1) if len(diff) > 1 else np.full(len(counts), math.nan)
    group = np.empty(len(counts), dtype=object)
    for name, members in shot_groups(counts.tolist()).items():
        group[members] = name
    order = size_order(counts)
    return pd.DataFrame({"rank": np.arange(len(order)), "class": order, "train_count": counts[order],
                         "group": group[order], "a": a.mean(axis=0)[order], "b": b.mean(axis=0)[order],
                         "diff": diff.mean(axis=0)[order], "std": std[order], "n": len(diff)})


def per_class_difference_figure(diff: pd.DataFrame, class_counts: Sequence[int], path: Path, label: str) -> Path:
    """Bars of `per_class_difference` from head to tail (error bars: seed std of the difference), with dashed
    lines at the many / medium / few boundaries (`shot_groups`); a PNG, the same bytes for the same input."""
    counts = np.asarray(class_counts, dtype=int)
    if len(diff) != len(counts) or not np.array_equal(diff["train_count"].to_numpy(), counts[diff["class"]]):
        raise ValueError("the per-class differences were not computed with these class counts")
    figure = Figure(figsize=(min(16, 6 + 0.08 * len(counts)), 4), layout="constrained")
    ax = figure.add_subplot()
    x, values = diff["rank"].to_numpy(), diff["diff"].to_numpy(dtype=float)
    errors = None if diff["std"].isna().all() else np.nan_to_num(diff["std"].to_numpy(dtype=float))
    ax.bar(x, values, width=0.85, color=[COLORS[0] if v >= 0 else COLORS[3] for v in values], yerr=errors,
           error_kw={"elinewidth": 0.8, "capsize": 2 if len(x) <= 30 else 0, "ecolor": "black"})
    ax.axhline(0, color="black", linewidth=0.8)
    start = 0
    for group in GROUPS:
        size = len(shot_groups(counts.tolist())[group])
        if size:
            ax.text((2 * start + size - 1) / 2, 0.98, f"{group} ({size})", transform=ax.get_xaxis_transform(),
                    ha="center", va="top", fontsize=8)
        start += size
        if 0 < start < len(counts):
            ax.axvline(start - 0.5, color="gray", linestyle="--", linewidth=1)
    if len(x) <= 20:
        ax.set_xticks(x, [f"{c}\n({n})" for c, n in zip(diff["class"], diff["train_count"])], fontsize=7)
    ax.set_xlim(-0.6, len(x) - 0.4)
    ax.set_xlabel("classes, head → tail" + (" (class, training images)" if len(x) <= 20 else ""))
    ax.set_ylabel("test accuracy difference (points)")
    ax.set_title(f"{label}: per-class difference, mean over {int(diff['n'].iloc[0])} seed(s) "
                 "(error bar: seed std)", fontsize=10)
    return save_png(figure, path)
