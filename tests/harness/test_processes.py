"""Worker processes of the local pools (harness/processes.py): forked from a forkserver, with the parent's
environment of now."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor

import pytest

from harness.processes import adopt_environment, worker_context


@pytest.mark.slow  # the first pool starts this process's forkserver, which imports torch and MLflow once
def test_workers_see_the_parents_environment_of_now_not_the_one_the_forkserver_started_with(monkeypatch):
    context = worker_context()
    assert context.get_start_method() == "forkserver"  # Linux
    seen = []
    for value in ("first", "second"):  # the second pool reuses the server started under "first"
        monkeypatch.setenv("HARNESS_TEST_WORKER_ENV", value)
        with ProcessPoolExecutor(1, mp_context=context, initializer=adopt_environment,
                                 initargs=(dict(os.environ),)) as pool:
            seen.append(pool.submit(os.getenv, "HARNESS_TEST_WORKER_ENV").result(timeout=120))
    assert seen == ["first", "second"]
    without = ProcessPoolExecutor(1, mp_context=context)
    monkeypatch.setenv("HARNESS_TEST_WORKER_ENV", "third")
    with without:  # the mutation: without adopting, a worker keeps the server's (older) variables
        assert without.submit(os.getenv, "HARNESS_TEST_WORKER_ENV").result(timeout=120) != "third"

