"""SIGTERM ends a run the way Ctrl-C does: as an exception that unwinds the stack, so the run's cleanup runs.

Python turns SIGINT into `KeyboardInterrupt`; SIGTERM (what `kill`, a batch scheduler or a container stop sends)
kills the process outright, so the MLflow run would stay RUNNING and a checkpoint write would leave its temporary
file. `install_signal_handlers()` makes SIGTERM raise `Terminated` instead. Both are BaseExceptions, not Exceptions:
no `except Exception` on the way up swallows them, `Run.execute` marks the run KILLED, an atomic checkpoint write
removes its temporary file (the previous checkpoint stays), and the CLI prints one line and exits 128 + signal
number (130 for SIGINT, 143 for SIGTERM, the shell's convention).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


class Terminated(BaseException):
    """SIGTERM arrived; unwinds like KeyboardInterrupt so every `except BaseException` cleanup runs."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated(f"terminated by {signal.Signals(signum).name}")


def install_signal_handlers() -> None:
    """Make SIGTERM raise `Terminated`. Signal handlers can only be set from the main thread; elsewhere (an
    embedding program calling `harness.cli.main` from a worker thread) this leaves the process's handlers alone."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def interrupt_exit_code(error: BaseException) -> int:
    """128 + the signal's number: 130 for Ctrl-C (SIGINT), 143 for SIGTERM."""
    number = signal.SIGTERM if isinstance(error, Terminated) else signal.SIGINT
    return 128 + int(number)


def interrupt_name(error: BaseException) -> str:
    return "terminated (SIGTERM)" if isinstance(error, Terminated) else "interrupted (Ctrl-C)"
