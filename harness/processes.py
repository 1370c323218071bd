"""How the local pools start their worker processes (`run ablation --workers N`, `run method --seeds ...
--workers N`, `tune --workers N`).

forkserver where the platform has it (Linux, macOS): one fresh server process imports torch, torchvision, MLflow and
the engine once (`PRELOAD`), and every worker is forked from it in a fraction of a second, where a spawned worker
imports them again (about 10 s of one core each, with torch's CUDA libraries). Like spawn it is safe with CUDA and
threads: the server is a new single-threaded interpreter that never initialises CUDA. Elsewhere: spawn.

A forked worker inherits the server's environment, which is the one of the pool that started the server (an earlier
pool of the same process may have run under other variables, e.g. another HARNESS_HOME in a notebook or a test), so
every worker first adopts its parent's environment as it is now (`adopt_environment`): spawn's semantics.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Mapping
from multiprocessing.context import BaseContext

PRELOAD = ("torch", "torchvision", "mlflow", "harness.runner", "harness.tracking")


def worker_context() -> BaseContext:
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))  # no effect once this process's server runs: same list anyway
    return context


def adopt_environment(env: Mapping[str, str]) -> None:
    """In a worker, before anything reads a variable: exactly the parent's environment at pool start."""
    os.environ.clear()
    os.environ.update(env)
