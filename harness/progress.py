"""Progress bars (rich) for long work: one bar per run, advanced per batch, and an optional outer bar over runs."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


class RunProgress:
    """The trainer's progress sink: start_stage / advance_batch / end_epoch, rendered as a rich bar."""

    def __init__(self, progress: Progress, label: str, total_batches: int) -> None:
        self.progress, self.label = progress, label
        self.task = progress.add_task(label, total=total_batches)
        self.stage, self.epoch, self.epochs = "", 0, 0

    def start_stage(self, name: str, epochs: int, first: int, batches_per_epoch: int) -> None:
        self.stage, self.epoch, self.epochs = name, first, epochs
        self.progress.advance(self.task, first * batches_per_epoch)
        self._describe("")

    def advance_batch(self) -> None:
        self.progress.advance(self.task)

    def end_epoch(self, metrics: dict[str, float]) -> None:
        self.epoch += 1
        self._describe(f"loss {metrics.get('loss/total', float('nan')):.3f}")

    def _describe(self, extra: str) -> None:
        text = f"{self.label} {self.stage} {self.epoch}/{self.epochs} {extra}"
        self.progress.update(self.task, description=text)

    def close(self) -> None:
        self.progress.update(self.task, completed=self.progress.tasks[self.task].total)


def make_progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=False)


class NullProgress:
    def __enter__(self) -> NullProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None
