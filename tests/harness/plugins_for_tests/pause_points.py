"""A test-only `--plugin` module: a spy on the epochs a CLI run trains, and a pause at one chosen instant, so a test can
signal the process exactly there (a kill at "a random point" that is reproducible). It registers no method or
dataset; it only adds one observing hook to every `Run` the command makes (through `Run`'s public `hooks`).

Environment (read once, at import):
  HARNESS_TEST_EVENTS  file that gets one JSON line per event: {"event": "start", "stage": s, "epoch": e} when
                       training (re)starts, {"event": "epoch", "epoch": g} after each global epoch g,
                       {"event": "paused", "at": POINT} when the pause is reached.
  HARNESS_TEST_PAUSE   the pause point, KIND:G[:J] on the run's global epoch count G (0-based):
                       step:G:J         after batch J of epoch G (inside the epoch)
                       after_epoch:G    epoch G trained and logged to the hooks, its checkpoint not yet written
                       writing:G        half of epoch G's checkpoint bytes are in the temporary file
                       written:G        epoch G's checkpoint is renamed into place, its metrics not yet flushed
                       after_checkpoint:G  epoch G's checkpoint and metrics are both written
                       before_stage:S   stage S starts (the stage switch), S the stage index
At the pause the process sleeps (up to PAUSE_LIMIT_S, then exits 99 so a broken test cannot hang) until signalled.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from harness import checkpoint, runner
from harness.hooks import Hook

PAUSE_LIMIT_S = 300
EVENTS = Path(os.environ["HARNESS_TEST_EVENTS"]) if os.environ.get("HARNESS_TEST_EVENTS") else None
PAUSE = os.environ.get("HARNESS_TEST_PAUSE", "")


def record(**event: Any) -> None:
    if EVENTS is not None:
        with open(EVENTS, "a") as handle:
            handle.write(json.dumps(event) + "\n")


def maybe_pause(point: str) -> None:
    if point != PAUSE:
        return
    record(event="paused", at=point)
    deadline = time.monotonic() + PAUSE_LIMIT_S
    while time.monotonic() < deadline:
        time.sleep(0.05)
    print(f"pause_points: nobody signalled the pause at {point}", file=sys.stderr)
    os._exit(99)


class PauseHook(Hook):
    """Keeps the global index of the epoch in progress, so each pause point can name it."""

    epoch = 0  # class attribute: the checkpoint wrapper below reads the current one

    def before_train(self, trainer: Any) -> None:
        stage, epoch = trainer.start
        record(event="start", stage=stage, epoch=epoch)

    def before_stage(self, trainer: Any, stage: Any) -> None:
        PauseHook.epoch = stage.first_global_epoch + trainer.first_epoch
        self.step = 0
        maybe_pause(f"before_stage:{stage.index}")

    def after_step(self, trainer: Any) -> None:
        maybe_pause(f"step:{PauseHook.epoch}:{self.step}")
        self.step += 1

    def after_epoch(self, trainer: Any, epoch: int, metrics: dict[str, Any]) -> None:
        record(event="epoch", epoch=epoch)
        maybe_pause(f"after_epoch:{epoch}")

    def after_checkpoint(self, trainer: Any) -> None:
        maybe_pause(f"after_checkpoint:{PauseHook.epoch}")
        PauseHook.epoch += 1
        self.step = 0


_run_init = runner.Run.__init__


def run_init_with_pause(self: runner.Run, *args: Any, hooks: Any = (), **kwargs: Any) -> None:
    _run_init(self, *args, hooks=[*hooks, PauseHook()], **kwargs)


_atomic_write_bytes = checkpoint.atomic_write_bytes


def atomic_write_bytes(path: Path, write: Any) -> None:
    """The real atomic write, with the `writing` pause halfway through a checkpoint's bytes and `written` after
    the rename (the trainer's `save_checkpoint` looks this name up in `harness.checkpoint` at each call)."""
    if path.name != "checkpoint.pt":
        return _atomic_write_bytes(path, write)

    def half_then_pause(handle: Any) -> None:
        buffer = io.BytesIO()
        write(buffer)
        data = buffer.getvalue()
        handle.write(data[: len(data) // 2])
        handle.flush()
        maybe_pause(f"writing:{PauseHook.epoch}")
        handle.write(data[len(data) // 2:])

    _atomic_write_bytes(path, half_then_pause)
    maybe_pause(f"written:{PauseHook.epoch}")


# On the class itself, not the module's name: a study module that imported `Run` before this plugin (a worker
# process unpickling its job imports harness.studies.dispatch first) still makes its runs with the hook.
runner.Run.__init__ = run_init_with_pause
checkpoint.atomic_write_bytes = atomic_write_bytes
