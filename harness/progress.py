"""Progress for long work: in a terminal, one rich bar per run advanced per batch (plus an outer bar over runs);
when stderr is not a terminal (a log file, CI), one plain line per epoch: run, stage, epoch, loss, elapsed, ETA.
Runs in worker processes draw on the parent's bars through a `RelayProgress` (calls sent over a queue and replayed
by the parent), or print their own lines (stderr is shared)."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from harness.hooks import Hook

console = Console(stderr=True)


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressHook(Hook):
    """The trainer's progress: a bar advanced per batch (terminal), or a line per epoch (logs)."""

    def __init__(self, progress: Progress | None, label: str, batches_per_epoch: int) -> None:
        self.progress, self.label, self.batches = progress, label, batches_per_epoch
        self.task = None
        self.started = time.perf_counter()
        self.done_epochs = 0  # epochs run in this process (ETA excludes those a resumed run skipped)

    def before_train(self, trainer: Any) -> None:
        self.total = trainer.total_epochs
        stage, epoch = trainer.start
        self.skipped = trainer.stages[stage].first_global_epoch + epoch if stage < len(trainer.stages) else self.total
        if self.progress is not None:
            self.task = self.progress.add_task(self.label, total=self.total * self.batches,
                                               completed=self.skipped * self.batches)

    def before_stage(self, trainer: Any, stage: Any) -> None:
        self.stage = stage
        self._describe(trainer.first_epoch, "")

    def after_step(self, trainer: Any) -> None:
        if self.task is not None:
            self.progress.advance(self.task)

    def after_epoch(self, trainer: Any, epoch: int, metrics: dict[str, Any]) -> None:
        self.done_epochs += 1
        loss = metrics.get("loss/total", float("nan"))
        within = epoch - self.stage.first_global_epoch + 1
        if self.task is not None:
            self._describe(within, f"loss {loss:.3f}")
            return
        elapsed = time.perf_counter() - self.started
        left = self.total - self.skipped - self.done_epochs
        eta = elapsed / self.done_epochs * left
        extra = "".join(f" {k.split('/', 1)[1]} {v:.2f}" for k, v in metrics.items() if k == "test/top1")
        print(f"{self.label} {self.stage.stage.name} epoch {within}/{self.stage.epochs} (run {epoch + 1}/{self.total})"
              f" loss {loss:.4f}{extra} elapsed {_clock(elapsed)} eta {_clock(eta)}", file=sys.stderr, flush=True)

    def after_train(self, trainer: Any) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=self.total * self.batches)

    def _describe(self, epoch: int, extra: str) -> None:
        if self.task is not None:
            text = f"{self.label} {self.stage.stage.name} {epoch}/{self.stage.epochs} {extra}"
            self.progress.update(self.task, description=text)


def make_progress() -> Progress | NullProgress:
    """Bars in a terminal; otherwise a stand-in whose runs print one line per epoch."""
    if not console.is_terminal:
        return NullProgress()
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=console, transient=False)


class NullProgress:
    """`make_progress()` off a terminal: no bars (outer tasks are no-ops); each run logs lines instead."""

    def __enter__(self) -> NullProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def add_task(self, *args: Any, **kwargs: Any) -> None:
        return None

    def advance(self, *args: Any, **kwargs: Any) -> None:
        return None


class RelayProgress:
    """A worker process's handle on the parent's bars: each call goes over `queue` and `relay` replays it there.
    Task ids are made here (pid:n), so `add_task` returns at once."""

    def __init__(self, queue: Any) -> None:
        self.queue, self.count = queue, 0

    def add_task(self, description: str, **fields: Any) -> str:
        self.count += 1
        key = f"{os.getpid()}:{self.count}"
        self.queue.put(("add_task", key, (description,), fields))
        return key

    def advance(self, task: str, advance: float = 1) -> None:
        self.queue.put(("advance", task, (advance,), {}))

    def update(self, task: str, **fields: Any) -> None:
        self.queue.put(("update", task, (), fields))


def _replay(progress: Progress, queue: Any) -> None:
    tasks: dict[str, Any] = {}
    while (call := queue.get()) is not None:
        name, key, args, fields = call
        if name == "add_task":
            tasks[key] = progress.add_task(*args, **fields)
        elif key in tasks:
            getattr(progress, name)(tasks[key], *args, **fields)


@contextmanager
def relay(progress: Progress | NullProgress | None, context: Any) -> Iterator[Any]:
    """The progress handle for worker processes of `context`: a `RelayProgress` over a queue replayed on the
    parent's bars (terminal), a `NullProgress` (workers print their own lines), or None (no progress)."""
    if not isinstance(progress, Progress):
        yield None if progress is None else NullProgress()
        return
    queue = context.Queue()
    thread = threading.Thread(target=_replay, args=(progress, queue), daemon=True)
    thread.start()
    try:
        yield RelayProgress(queue)
    finally:
        queue.put(None)
        thread.join(timeout=5)


def progress_hook(progress: Progress | NullProgress | RelayProgress, label: str, feeder: Any) -> ProgressHook:
    return ProgressHook(None if isinstance(progress, NullProgress) else progress, label, len(feeder))
