"""The `harness bench` report as rich tables, one per benchmark, plus the augmentation verdict line."""

from __future__ import annotations

from typing import Any

from rich.table import Table

AUGMENT_GOAL = 5.0  # batched >= 5x per-image per CPU thread (performance-anchors.md section 7 item 4)


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def _columns(table: Table, names: tuple[str, ...], left: tuple[str, ...]) -> Table:
    for name in names:
        table.add_column(name, justify="left" if name in left else "right")
    return table


def augment_table(report: dict[str, Any]) -> Table:
    table = _columns(Table(title=f"Augmentation, {report['threads']} thread, {report['n_images']} images "
                                 f"(median of {report['repeats']})"), ("pipeline", "images/s", "ratio"), ("pipeline",))
    table.add_row("per-image PIL (reference)", f"{report['per_image_img_s']:,.0f}", "1.00")
    table.add_row(f"batched tensor (batch {report['batch_size']})", f"{report['batched_img_s']:,.0f}",
                  f"{report['ratio']:.2f}")
    return table


def step_table(report: dict[str, Any]) -> Table:
    title = (f"Training step, batch {report['batch_size']}, {report['device']}, {report['threads']} threads "
             f"(median of {report['repeats']} interleaved rounds)")
    table = _columns(Table(title=title), ("variant", "path", "median ms", "min ms", "first step s", "speed-up",
                                          "peak MiB", "peak+ MiB"), ("variant", "path"))
    for variant, rows in report["variants"].items():
        for path, row in rows.items():
            table.add_row(variant, path, f"{row['median_ms']:.1f}", f"{row['min_ms']:.1f}",
                          f"{row['first_step_s']:.2f}", f"{row['speedup']:.2f}x", _mib(row.get("peak_bytes")),
                          _mib(row.get("peak_over_start_bytes")))
    table.caption = f"peak memory: {report['memory_measure']}"
    return table


def epoch_table(report: dict[str, Any]) -> Table:
    title = (f"Epoch, {report['train_images']} synthetic LT images, batch {report['batch_size']}, {report['device']} "
             f"(median of {report['repeats']} after a warm-up epoch)")
    table = _columns(Table(title=title), ("variant", "path", "epoch s", "batches s", "batch share", "speed-up"),
                     ("variant", "path"))
    for variant, rows in report["variants"].items():
        for path, row in rows.items():
            table.add_row(variant, path, f"{row['epoch_s']:.2f}", f"{row['data_s']:.3f}",
                          f"{100 * row['data_share']:.1f}%", f"{row['speedup']:.2f}x")
    return table


RENDERERS = {"augment": augment_table, "step": step_table, "epoch": epoch_table}


def report_renderables(report: dict[str, Any]) -> list[Any]:
    """A headline, a table per benchmark in the report, and the augmentation verdict: what the console prints."""
    out: list[Any] = [f"[bold]harness bench[/] on {report['device_name']} (torch {report['torch']}, "
                      f"{report['threads']} threads for step and epoch)"]
    out += [render(report[key]) for key, render in RENDERERS.items() if key in report]
    if "augment" in report:
        ratio = report["augment"]["ratio"]
        verdict = "meets" if ratio >= AUGMENT_GOAL else "misses"
        out.append(f"batched augmentation: {ratio:.2f}x the per-image pipeline per thread ({verdict} the "
                   f"{AUGMENT_GOAL:.0f}x goal)")
    return out
