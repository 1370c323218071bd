"""`harness bench gpu`, the report side: from the phases' JSON lines to the per-epoch table, the K-process
concurrency table, the extrapolation to a 200-epoch run and to Table 4 against the targets (issue #6), and the
ResNet-50 MoE training throughput against a plain ResNet-50 (issue #14).

Pure functions of the collected results (no torch), so the arithmetic is testable on made-up rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TARGETS_S = {"shike_run": 60.0, "table4_1seed": 300.0, "table4_5seeds": 900.0}  # issue #6
MODES = ("reference", "fast", "fast+default", "fast+reduce-overhead")
Rows = dict[tuple[str, str], dict[str, Any]]


def epoch_rows(phases: list[dict[str, Any]]) -> Rows:
    """(mode, variant) -> the child's measurement, for every variant that finished its stage-1 epochs."""
    return {(r["mode"], r["variant"]): r for p in phases for r in p["results"] if "stage1" in r}


def concurrency(phases: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    """Aggregate throughput (epochs/s over all K runs) per mode and K, and speed-up over K = 1."""
    table: dict[str, dict[int, dict[str, float]]] = {}
    for p in phases:
        rows = [r for r in p["results"] if "start" in r]
        if p["name"].startswith("concurrent") and rows and len(rows) == p["k"]:
            span = max(r["end"] for r in rows) - min(r["start"] for r in rows)
            table.setdefault(p["mode"], {})[p["k"]] = {"epochs_per_s": sum(len(r["epoch_s"]) for r in rows) / span}
    for ks in table.values():
        for row in ks.values():
            row["speedup"] = row["epochs_per_s"] / ks[1]["epochs_per_s"] if 1 in ks else float("nan")
    return table


def _crt_from_fast(rows: Rows, variant: str, row: dict[str, Any]) -> dict[str, float]:
    """cRT epoch not timed in this mode: scale its stage-1 epoch by the eager fast path's cRT/stage-1 ratio."""
    fast = rows.get(("fast", variant)) or rows.get(("fast", "shike"))
    ratio = fast["crt"]["epoch_s"] / fast["stage1"]["epoch_s"] if fast and fast.get("crt") else 1.0
    return {"epoch_s": row["stage1"]["epoch_s"] * ratio}


def variant_run(rows: Rows, mode: str, variant: str) -> tuple[dict[str, float], str] | None:
    """Full-recipe time of a variant in a mode: its stages' own epochs (SHIKE: 180 stage-1 + 20 cRT, each with an
    evaluation) and compile (the first-epoch extra time per stage; an untimed cRT stage is assumed to compile as
    long as stage 1). A variant not timed in this mode is scaled from SHIKE by the eager fast path's variant/SHIKE
    ratio (noted)."""
    row, note = rows.get((mode, variant)), ""
    if row is None:
        shike, fast, fast_shike = rows.get((mode, "shike")), rows.get(("fast", variant)), rows.get(("fast", "shike"))
        if not (shike and fast and fast_shike):
            return None
        ratio = fast["stage1"]["epoch_s"] / fast_shike["stage1"]["epoch_s"]
        row = {"stage1": {**shike["stage1"], "epoch_s": shike["stage1"]["epoch_s"] * ratio},
               "recipe_epochs": fast["recipe_epochs"]}
        note = f"{variant} scaled from SHIKE by the eager ratio {ratio:.2f}"
    crt = row.get("crt") or _crt_from_fast(rows, variant, row)
    first = row["stage1"]["extra_first_s"]
    compile_s = max(first, 0.0) + max(crt.get("extra_first_s", first), 0.0)
    stage1_epochs, crt_epochs = row["recipe_epochs"]
    epochs_s = stage1_epochs * row["stage1"]["epoch_s"] + crt_epochs * crt["epoch_s"]
    return {"epochs_s": epochs_s, "compile_s": compile_s, "run_s": epochs_s + compile_s}, note


def table4_variants() -> list[str]:
    """Table 4's rows as the variants timed: plain, MoE without DKF, or SHIKE with DKF."""
    from harness.studies.tables import TABLES

    return [("plain" if r.method == "plain" else "moe" if r.kwargs.get("dkf") is False else "shike")
            for r in TABLES["table4"].rows]


def extrapolate(rows: Rows, conc: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    """Run time per mode and variant, Table 4 (`keys`: its rows' variants) for 1 and 5 seeds, against the targets.
    Five seeds compile each config once and divide the epochs by the best measured K-process speed-up."""
    out: dict[str, Any] = {}
    for mode in MODES:
        found = {v: variant_run(rows, mode, v) for v in ("plain", "moe", "shike")}
        if not all(found[k] for k in keys):
            continue
        runs = {v: r[0] for v, r in found.items() if r}
        notes = sorted({r[1] for r in found.values() if r and r[1]})
        one_seed = sum(runs[k]["run_s"] for k in keys)
        best = max((v["speedup"] for v in conc.get(mode, {}).values()), default=1.0)
        five = sum(runs[k]["compile_s"] + 5 * runs[k]["epochs_s"] / best for k in keys)
        out[mode] = {"runs": runs, "table4_1seed_s": one_seed, "table4_5seeds_s": five, "concurrency_used": best,
                     "notes": notes, "meets": {
                         "shike_run": runs["shike"]["run_s"] <= TARGETS_S["shike_run"],
                         "table4_1seed": one_seed <= TARGETS_S["table4_1seed"],
                         "table4_5seeds": five <= TARGETS_S["table4_5seeds"]}}
    return out


def reference_variant(variant: str) -> str:
    """The plain model a throughput variant is compared with: "resnet50:ABC:pool1x1" -> "resnet50:plain"."""
    return f"{variant.split(':', 1)[0]}:plain"


def throughput(phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every throughput measurement, with its images/s and peak memory as ratios to the plain backbone measured in
    the same phase (the same child process, one after the other) and compile mode; None where that one is missing."""
    rows = []
    for p in phases:
        measured = {(r["variant"], r["compile"]): r for r in p["results"] if "images_per_s" in r}
        for (variant, mode), r in measured.items():
            plain = measured.get((reference_variant(variant), mode))
            rows.append({**r, "phase": p["name"],
                         "images_vs_plain": r["images_per_s"] / plain["images_per_s"] if plain else None,
                         "peak_vs_plain": r["peak_bytes"] / plain["peak_bytes"] if plain else None})
    return rows


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _throughput_lines(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = ["", "| phase | variant | compile | batch x px | images/s | ms/step | peak GiB | images/s vs plain | "
             "peak vs plain |", "|" + "---|" * 9]
    lines += [f"| {r['phase']} | {r['variant']} | {r['compile']} | {r['batch_size']} x {r['image_size']} | "
              f"{r['images_per_s']:.1f} | {r['ms_per_step']:.1f} | {r['peak_bytes'] / 2**30:.2f} | "
              f"{_ratio(r['images_vs_plain'])} | {_ratio(r['peak_vs_plain'])} |" for r in rows]
    kinds = sorted({r["peak_kind"] for r in rows})
    return lines + ["", f"Training steps on one synthetic batch (no data pipeline), channels_last, bf16 autocast on "
                    f"CUDA; peak: {', '.join(kinds)} (a process peak RSS never falls, so on CPU it includes the "
                    "variants measured before). Ratios: against the plain backbone in the same run."]


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def _epoch_lines(rows: Rows) -> list[str]:
    lines = ["| mode | variant | epoch s (train + eval) | train s | ms/step | aug s | aug share | eval s | "
             "first-epoch extra s (compile) | cRT epoch s | peak MiB |", "|" + "---|" * 11]
    for (mode, variant), r in sorted(rows.items()):
        s, c = r["stage1"], r.get("crt") or {}
        lines.append(f"| {mode} | {variant} | {s['epoch_s']:.3f} | {s['train_s']:.3f} | {s['ms_per_step']:.2f} | "
                     f"{s['data_s']:.3f} | {100 * s['data_s'] / s['epoch_s']:.1f}% | {s['eval_s']:.3f} | "
                     f"{s['extra_first_s']:.1f} | {c.get('epoch_s', float('nan')):.3f} | {_mib(s['peak_bytes'])} |")
    for (mode, variant), r in sorted(rows.items()):
        if mode.startswith("fast+"):
            lines.append(f"\n{mode} {variant}: {r['graph_breaks']} graph breaks, {r['cudagraph_skips']} cudagraph "
                         "skips (reduce-overhead runs without CUDA graphs if skipped: see its log)")
        if r.get("eval_variants"):
            lines.append(f"\nEval forward only ({variant}): " + ", ".join(f"{k} {v:.3f} s" for k, v in
                                                                          r["eval_variants"].items()))
    return lines


def _concurrency_lines(conc: dict[str, Any]) -> list[str]:
    lines = ["", "| concurrent mode | K | epochs/s (all runs) | speed-up vs K=1 |", "|---|---|---|---|"]
    for mode, ks in conc.items():
        lines += [f"| {mode} | {k} | {v['epochs_per_s']:.3f} | {v['speedup']:.2f}x |" for k, v in sorted(ks.items())]
    return lines


def _extrapolation_lines(extrapolation: dict[str, Any]) -> list[str]:
    lines = ["", "| mode | SHIKE run (200 ep) s | compile s | Table 4, 1 seed s | Table 4, 5 seeds s | "
             "meets 60 s / 5 min / 15 min | notes |", "|---|---|---|---|---|---|---|"]
    for mode, e in extrapolation.items():
        sh, ok = e["runs"]["shike"], e["meets"]
        lines.append(f"| {mode} | {sh['run_s']:.0f} | {sh['compile_s']:.0f} | {e['table4_1seed_s']:.0f} | "
                     f"{e['table4_5seeds_s']:.0f} (x{e['concurrency_used']:.2f} concurrency) | "
                     f"{ok['shike_run']} / {ok['table4_1seed']} / {ok['table4_5seeds']} | {'; '.join(e['notes'])} |")
    return lines + ["", "Extrapolation: each stage's own epochs (SHIKE: 180 x stage-1 epoch + 20 x cRT epoch, each "
                    "with a full test evaluation) + compile (first-epoch extra time, per stage); Table 4 = 1 plain + "
                    "2 MoE + 4 DKF rows run one after another; 5 seeds compile each config once and divide the "
                    "epochs by the best measured K-process speed-up."]


def markdown(report: dict[str, Any], rows: Rows) -> str:
    env = report["environment"]
    lines = [f"# GPU check: {env['device_name']}", "", f"torch {env['torch']}, CUDA {env['cuda']}, "
             f"{env['cpus']} CPUs; data: {report['data']}; wall {report['wall_s']:.0f} s", ""]
    lines += [f"    {ln}" for ln in env.get("nvidia_smi", [])] + [""]
    lines += _epoch_lines(rows) + _concurrency_lines(report["concurrency"])
    lines += _extrapolation_lines(report["extrapolation"]) + _throughput_lines(throughput(report["phases"]))
    lines += ["", "| phase | status | wall s |", "|---|---|---|"]
    lines += [f"| {p['name']} | {p['status']} | {p['wall_s']:.0f} |" for p in report["phases"]]
    errors = [f"- {p['name']}: {r['error']}" for p in report["phases"] for r in p["results"] if "error" in r]
    return "\n".join(lines + ([""] + errors if errors else [])) + "\n"


def write_report(out: Path, report: dict[str, Any], phases: list[dict[str, Any]]) -> None:
    """gpu_check.json (everything, rows keyed "mode|variant") and gpu_check.md (the tables) in `out`."""
    rows = epoch_rows(phases)
    report["concurrency"] = concurrency(phases)
    report["extrapolation"] = extrapolate(rows, report["concurrency"], table4_variants())
    report["epochs"] = {f"{m}|{v}": r for (m, v), r in rows.items()}
    report["throughput"] = throughput(phases)
    report["phases"] = phases
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(report, rows))
