"""GPU timing check for issue #6, one command (< 8 min on an H100): `python scripts/gpu_check.py [--out DIR]`.

Synthetic uint8 images of the CIFAR-100-LT IF100 shape (10,847 train / 10,000 test; timing only, never accuracy).
Per epoch (train + full test evaluation), for plain, MoE (no DKF) and SHIKE-3E: the reference path (ReferenceFeeder
with DataLoader workers, eager, fp32) vs the fast path (DeviceFeeder, bf16 autocast, channels_last) eager and under
torch.compile (default; reduce-overhead = CUDA graphs); compile time, augmentation share, peak memory, then K
concurrent SHIKE processes, and the extrapolation to 200 epochs and to Table 4 against the targets (60 s / 5 min /
15 min). Every phase is a child process with its own time limit inside one overall budget, so a slow compile or a
crash costs that phase only. Writes gpu_check.json, gpu_check.md and logs/ to --out (default $OUT).
`--smoke` runs the same code on a tiny set (CPU allowed) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without installing

TARGETS_S = {"shike_run": 60.0, "table4_1seed": 300.0, "table4_5seeds": 900.0}  # issue #6
STAGE_EPOCHS = (180, 20)  # official: 180 feature epochs + 20 cRT epochs, evaluation after each
MODES = ("reference", "fast", "fast+default", "fast+reduce-overhead")


def phase_plan(smoke: bool) -> list[dict[str, Any]]:
    """Phases in order of importance; the budget cuts from the end. limit_s: that phase's own cap on an H100."""
    epochs = {"timed": 1 if smoke else 2, "crt": True}
    plan = [
        {"name": "fast", "mode": "fast", "variants": ["shike", "plain", "moe"], "limit_s": 120, **epochs},
        {"name": "reference", "mode": "reference", "variants": ["shike", "plain"], "limit_s": 120, "timed": 1,
         "crt": True},
        {"name": "default-shike", "mode": "fast+default", "variants": ["shike"], "limit_s": 170, **epochs,
         "crt": False},
        {"name": "cudagraphs-shike", "mode": "fast+reduce-overhead", "variants": ["shike"], "limit_s": 140,
         **epochs, "crt": False},
    ]
    plan += [{"name": f"concurrent-eager-k{k}", "kind": "concurrent", "mode": "fast", "variants": ["shike"], "k": k,
              "timed": epochs["timed"], "limit_s": 90} for k in (1, 2, 4)]
    plan += [{"name": f"{tag}-plain", "mode": mode, "variants": ["plain"], "limit_s": 100, **epochs, "crt": False}
             for tag, mode in (("default", "fast+default"), ("cudagraphs", "fast+reduce-overhead"))]
    plan += [{"name": f"concurrent-cudagraphs-k{k}", "kind": "concurrent", "mode": "fast+reduce-overhead",
              "variants": ["shike"], "k": k, "timed": epochs["timed"], "limit_s": 120} for k in (1, 2, 4)]
    return plan


# ------------------------------------------------------------------------------------------------ child side


def _setup(spec: dict[str, Any]):
    import torch

    from harness import bench
    from harness.seeding import set_deterministic

    set_deterministic(False)  # the harness default: cudnn.benchmark on
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":  # --smoke: one thread per process keeps a shared CPU from stalling in OpenMP
        torch.set_num_threads(1)
    data = torch.load(spec["data"], weights_only=False)
    mode = {"reference": bench.REFERENCE, "fast": bench.FAST}.get(spec["mode"]) or \
        bench.compiled(spec["mode"].split("+", 1)[1])
    return torch, bench, device, data, mode


def _peak(torch: Any, device: Any) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def measure_variant(spec: dict[str, Any], variant: str) -> dict[str, Any]:
    """Build, one warm-up epoch (compilation, cudnn autotuning, worker start), `timed` epochs of stage 1 and, if
    asked, a warm-up and a timed cRT epoch; each epoch includes the full test evaluation."""
    torch, bench, device, data, mode = _setup(spec)
    from harness.trainer import enter_stage

    started = time.perf_counter()
    workers = spec["workers"] if mode.feeder == "reference" else 0
    trainer = bench.build_trainer(variant, mode, data, device, spec["batch_size"], num_workers=workers)
    out: dict[str, Any] = {"variant": variant, "mode": spec["mode"], "build_s": time.perf_counter() - started,
                           "steps_per_epoch": len(trainer.feeder), "workers": workers}
    for index, key in ((0, "stage1"), (1, "crt")):
        if index == 1 and not spec["crt"]:
            break
        run = trainer.stages[index]
        optimizer = enter_stage(trainer.spec, run.stage, trainer.cfg)
        first = bench.timed_epoch(trainer, run, optimizer, 0, data, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timed = [bench.timed_epoch(trainer, run, optimizer, e + 1, data, device) for e in range(spec["timed"])]
        median = {k: sorted(t[k] for t in timed)[len(timed) // 2] for k in timed[0]}
        out[key] = {**median, "first_epoch_s": first["epoch_s"], "extra_first_s": first["epoch_s"] - median["epoch_s"],
                    "peak_bytes": _peak(torch, device), "ms_per_step": 1e3 * median["train_s"] / len(trainer.feeder)}
    out["eval_variants"] = eval_variants(torch, bench, trainer, data, device, mode) if spec["mode"] == "fast" else {}
    from torch._dynamo.utils import counters

    out["graph_breaks"] = sum(counters["graph_break"].values())
    out["cudagraph_skips"] = int(counters["inductor"].get("cudagraph_skips", 0))
    return out


def eval_variants(torch: Any, bench: Any, trainer: Any, data: Any, device: Any, mode: Any) -> dict[str, float]:
    """Test-set forward time: as the runner does it (host split, batches of 500) vs a device-resident split."""
    from harness.data import Split
    from harness.evaluate import predict

    on_device = Split(data.test.images.to(device), data.test.labels)
    amp = mode.amp and device.type == "cuda"
    out = {}
    for name, split, batch in (("host_bs500", data.test, 500), ("device_bs2000", on_device, 2000),
                               ("device_bs10000", on_device, 10000)):
        predict(trainer.spec.model, split, data.mean, data.std, device, batch, amp)  # warm-up (cudnn autotune)
        out[name] = bench.timed(lambda s=split, b=batch: predict(trainer.spec.model, s, data.mean, data.std, device,
                                                                 b, amp), device)
    return out


def concurrent_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One of K simultaneous runs: warm up, wait at a file barrier, then `timed` timed epochs (with evaluation)."""
    torch, bench, device, data, mode = _setup(spec)
    from harness.trainer import enter_stage

    trainer = bench.build_trainer(spec["variants"][0], mode, data, device, spec["batch_size"], seed=spec["rank"])
    run = trainer.stages[0]
    optimizer = enter_stage(trainer.spec, run.stage, trainer.cfg)
    bench.timed_epoch(trainer, run, optimizer, 0, data, device)
    barrier = Path(spec["barrier"])
    (barrier / f"ready{spec['rank']}").touch()
    while not (barrier / "go").exists():
        time.sleep(0.005)
    start = time.time()
    epochs = [bench.timed_epoch(trainer, run, optimizer, e + 1, data, device)["epoch_s"] for e in range(spec["timed"])]
    return {"rank": spec["rank"], "start": start, "end": time.time(), "epoch_s": epochs}


def child_main(spec: dict[str, Any]) -> None:
    """Append one JSON line per finished measurement to spec['result'] (partial results survive a timeout)."""
    jobs = [None] if spec.get("kind") == "concurrent" else spec["variants"]
    for variant in jobs:
        try:
            result = concurrent_worker(spec) if variant is None else measure_variant(spec, variant)
        except Exception as error:  # one failing variant must not lose the others
            result = {"variant": variant, "error": f"{type(error).__name__}: {error}"[:2000]}
            print(result["error"], file=sys.stderr, flush=True)
        with open(spec["result"], "a") as f:
            f.write(json.dumps(result) + "\n")


# ----------------------------------------------------------------------------------------------- parent side


def environment() -> dict[str, Any]:
    import torch

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "cpus": os.cpu_count(),
           "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA)"}
    try:
        text = subprocess.run(["nvidia-smi", "-q"], capture_output=True, text=True, timeout=30).stdout
        keys = ("Product Name", "Product Architecture", "Board Part Number", "Bus Id", "Current Power Limit",
                "Max Power Limit", "Total", "SM ", "Memory ")  # card, SXM/PCIe, power cap, memory, max clocks
        lines = [" ".join(ln.split()) for ln in text.splitlines() if ln.strip()]
        picked = [ln for ln in lines if ln.startswith(keys)]
        env["nvidia_smi"] = list(dict.fromkeys(lines[:8] + picked))[:22]  # header (driver, CUDA) + key fields
    except (OSError, subprocess.SubprocessError) as error:
        env["nvidia_smi"] = [f"unavailable: {error}"]
    return env


def run_phase(phase: dict[str, Any], common: dict[str, Any], out: Path, limit: float) -> dict[str, Any]:
    """Run one phase as K (usually 1) child processes under `limit` seconds; collect their JSON lines."""
    result_file = out / "logs" / f"{phase['name']}.jsonl"
    result_file.unlink(missing_ok=True)
    barrier = Path(tempfile.mkdtemp(prefix="gpu_check_barrier_"))
    k = phase.get("k", 1)
    started, procs = time.perf_counter(), []
    with open(out / "logs" / f"{phase['name']}.log", "w") as log:
        for rank in range(k):
            spec = {**common, **phase, "rank": rank, "barrier": str(barrier), "result": str(result_file)}
            procs.append(subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=log,
                                          stderr=subprocess.STDOUT))
        status = _wait(procs, barrier, k if phase.get("kind") == "concurrent" else 0, started + limit)
    shutil.rmtree(barrier, ignore_errors=True)
    lines = result_file.read_text().splitlines() if result_file.exists() else []
    return {"name": phase["name"], "mode": phase["mode"], "k": k, "status": status,
            "wall_s": time.perf_counter() - started, "results": [json.loads(line) for line in lines]}


def _wait(procs: list[subprocess.Popen], barrier: Path, k: int, deadline: float) -> str:
    """Release the K-process barrier once all are warm (k = 0: no barrier); kill everything at the deadline."""
    released = k == 0
    while any(p.poll() is None for p in procs):
        if not released and len(list(barrier.glob("ready*"))) == k:
            (barrier / "go").touch()
            released = True
        if time.perf_counter() > deadline:
            for p in procs:
                p.kill()
            return "timeout"
        time.sleep(0.01)
    return "ok" if all(p.returncode == 0 for p in procs) else f"exit {[p.returncode for p in procs]}"


def epoch_rows(phases: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["mode"], r["variant"]): r for p in phases for r in p["results"] if "stage1" in r}


def concurrency(phases: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    """Aggregate throughput (epochs/s over all K runs) per mode and K, and speed-up over K = 1."""
    table: dict[str, dict[int, dict[str, float]]] = {}
    for p in phases:
        rows = [r for r in p["results"] if "start" in r]
        if p["name"].startswith("concurrent") and rows and len(rows) == p["k"]:
            span = max(r["end"] for r in rows) - min(r["start"] for r in rows)
            mode = p["mode"]
            table.setdefault(mode, {})[p["k"]] = {"epochs_per_s": sum(len(r["epoch_s"]) for r in rows) / span}
    for ks in table.values():
        for row in ks.values():
            row["speedup"] = row["epochs_per_s"] / ks[1]["epochs_per_s"] if 1 in ks else float("nan")
    return table


def variant_run(rows: dict, mode: str, variant: str) -> tuple[dict[str, float], str] | None:
    """200-epoch time of a variant in a mode: epochs (180 stage-1 + 20 cRT, each with evaluation) and compile (the
    first-epoch extra time per stage; an untimed cRT stage is assumed to compile as long as stage 1). A variant not
    timed in this mode is scaled from SHIKE by the eager fast path's variant/SHIKE ratio (noted)."""
    row, note = rows.get((mode, variant)), ""
    if row is None:
        shike, fast, fast_shike = rows.get((mode, "shike")), rows.get(("fast", variant)), rows.get(("fast", "shike"))
        if not (shike and fast and fast_shike):
            return None
        ratio = fast["stage1"]["epoch_s"] / fast_shike["stage1"]["epoch_s"]
        row = {"stage1": {**shike["stage1"], "epoch_s": shike["stage1"]["epoch_s"] * ratio}}
        note = f"{variant} scaled from SHIKE by the eager ratio {ratio:.2f}"
    crt = row.get("crt") or _crt_from_fast(rows, variant, row)
    first = row["stage1"]["extra_first_s"]
    compile_s = max(first, 0.0) + max(crt.get("extra_first_s", first), 0.0)
    epochs_s = STAGE_EPOCHS[0] * row["stage1"]["epoch_s"] + STAGE_EPOCHS[1] * crt["epoch_s"]
    return {"epochs_s": epochs_s, "compile_s": compile_s, "run_s": epochs_s + compile_s}, note


def extrapolate(rows: dict[tuple[str, str], dict[str, Any]], conc: dict[str, Any]) -> dict[str, Any]:
    """200-epoch run time per mode and variant, Table 4 (7 rows) for 1 and 5 seeds, against the targets."""
    from harness.studies.tables import TABLES

    keys = [("plain" if r.method == "plain" else "moe" if r.kwargs.get("dkf") is False else "shike")
            for r in TABLES["table4"].rows]
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


def _crt_from_fast(rows: dict, variant: str, row: dict) -> dict[str, float]:
    """cRT epoch not timed in this mode: scale its stage-1 epoch by the eager fast path's cRT/stage-1 ratio."""
    fast = rows.get(("fast", variant)) or rows.get(("fast", "shike"))
    ratio = fast["crt"]["epoch_s"] / fast["stage1"]["epoch_s"] if fast and fast.get("crt") else 1.0
    return {"epoch_s": row["stage1"]["epoch_s"] * ratio}


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def markdown(report: dict[str, Any]) -> str:
    env, lines = report["environment"], []
    lines += [f"# GPU check: {env['device_name']}", "", f"torch {env['torch']}, CUDA {env['cuda']}, "
              f"{env['cpus']} CPUs; data: {report['data']}; wall {report['wall_s']:.0f} s", ""]
    lines += [f"    {ln}" for ln in env.get("nvidia_smi", [])] + [""]
    lines += ["| mode | variant | epoch s (train + eval) | train s | ms/step | aug s | aug share | eval s | "
              "first-epoch extra s (compile) | cRT epoch s | peak MiB |", "|" + "---|" * 11]
    for (mode, variant), r in sorted(report["epochs"].items()):
        s, c = r["stage1"], r.get("crt") or {}
        lines.append(f"| {mode} | {variant} | {s['epoch_s']:.3f} | {s['train_s']:.3f} | {s['ms_per_step']:.2f} | "
                     f"{s['data_s']:.3f} | {100 * s['data_s'] / s['epoch_s']:.1f}% | {s['eval_s']:.3f} | "
                     f"{s['extra_first_s']:.1f} | {c.get('epoch_s', float('nan')):.3f} | "
                     f"{_mib(s['peak_bytes'])} |")
    for (mode, variant), r in sorted(report["epochs"].items()):
        if mode.startswith("fast+"):
            lines.append(f"\n{mode} {variant}: {r['graph_breaks']} graph breaks, {r['cudagraph_skips']} cudagraph "
                         "skips (reduce-overhead runs without CUDA graphs if skipped: see its log)")
        if r.get("eval_variants"):
            lines.append(f"\nEval forward only ({variant}): " + ", ".join(f"{k} {v:.3f} s" for k, v in
                                                                          r["eval_variants"].items()))
    lines += ["", "| concurrent mode | K | epochs/s (all runs) | speed-up vs K=1 |", "|---|---|---|---|"]
    for mode, ks in report["concurrency"].items():
        lines += [f"| {mode} | {k} | {v['epochs_per_s']:.3f} | {v['speedup']:.2f}x |" for k, v in sorted(ks.items())]
    lines += ["", "| mode | SHIKE run (200 ep) s | compile s | Table 4, 1 seed s | Table 4, 5 seeds s | "
              "meets 60 s / 5 min / 15 min | notes |", "|---|---|---|---|---|---|---|"]
    for mode, e in report["extrapolation"].items():
        sh, ok = e["runs"]["shike"], e["meets"]
        lines.append(f"| {mode} | {sh['run_s']:.0f} | {sh['compile_s']:.0f} | {e['table4_1seed_s']:.0f} | "
                     f"{e['table4_5seeds_s']:.0f} (x{e['concurrency_used']:.2f} concurrency) | "
                     f"{ok['shike_run']} / {ok['table4_1seed']} / {ok['table4_5seeds']} | {'; '.join(e['notes'])} |")
    lines += ["", "Extrapolation: 180 x stage-1 epoch + 20 x cRT epoch (each with a full test evaluation) + compile "
              "(first-epoch extra time, per stage); Table 4 = 1 plain + 2 MoE + 4 DKF rows run one after another; "
              "5 seeds compile each config once and divide the epochs by the best measured K-process speed-up."]
    lines += ["", "| phase | status | wall s |", "|---|---|---|"]
    lines += [f"| {p['name']} | {p['status']} | {p['wall_s']:.0f} |" for p in report["phases"]]
    errors = [f"- {p['name']}: {r['error']}" for p in report["phases"] for r in p["results"] if "error" in r]
    return "\n".join(lines + ([""] + errors if errors else [])) + "\n"


def write_report(out: Path, report: dict[str, Any], phases: list[dict[str, Any]]) -> None:
    rows = epoch_rows(phases)
    report["concurrency"] = concurrency(phases)
    report["extrapolation"] = extrapolate(rows, report["concurrency"])
    report["epochs"] = {f"{m}|{v}": r for (m, v), r in rows.items()}
    report["phases"] = phases
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown({**report, "epochs": rows}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    parser.add_argument("--budget-s", type=float, default=440.0,
                        help="all phases together; with start-up the script stays under 8 min (default 440)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="reference DataLoader")
    parser.add_argument("--only", default="", help="comma-separated phase names (default: all)")
    parser.add_argument("--smoke", action="store_true", help="tiny data, CPU allowed: checks the script itself")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(json.loads(args.child))
        return 0
    return parent_main(args)


def parent_main(args: argparse.Namespace) -> int:
    import torch

    from harness.bench import synthetic_lt

    started = time.perf_counter()
    if not torch.cuda.is_available() and not args.smoke:
        print("no CUDA device: the GPU figures stay unmeasured (use --smoke to check the script on CPU)")
        return 2
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    data = synthetic_lt(10, 40, 10.0, 20) if args.smoke else synthetic_lt()  # CIFAR-100-LT IF100 shape
    data_file = Path(tempfile.mkdtemp(prefix="gpu_check_")) / "data.pt"
    torch.save(data, data_file)
    report: dict[str, Any] = {"environment": environment(), "targets_s": TARGETS_S, "budget_s": args.budget_s,
                              "data": f"{len(data.train)} train / {len(data.test)} test synthetic uint8 32x32"}
    print(f"{report['environment']['device_name']}: {report['data']}", flush=True)
    common = {"data": str(data_file), "batch_size": 128, "workers": args.workers}
    wanted = {n for n in args.only.split(",") if n}
    phases: list[dict[str, Any]] = []
    for phase in phase_plan(args.smoke):
        if wanted and phase["name"] not in wanted:
            continue
        left = args.budget_s - (time.perf_counter() - started)
        if left < 30:
            phases.append({"name": phase["name"], "mode": phase["mode"], "k": phase.get("k", 1),
                           "status": "skipped (budget)", "wall_s": 0.0, "results": []})
            continue
        limit = phase["limit_s"] * (4 if args.smoke else 1)  # CPU smoke: slower steps, colder compiles
        phases.append(run_phase(phase, common, out, min(limit, left - 10)))
        print(f"{phase['name']}: {phases[-1]['status']} in {phases[-1]['wall_s']:.0f} s", flush=True)
        report["wall_s"] = time.perf_counter() - started
        write_report(out, report, phases)
    report["wall_s"] = time.perf_counter() - started
    write_report(out, report, phases)
    shutil.rmtree(data_file.parent, ignore_errors=True)
    print((out / "gpu_check.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
