"""Session-wide test settings: no telemetry, a private runs folder, two CPU threads, temporary folders in memory
where there is room, a longer timeout for slow tests, and skips that cannot hide a missing prerequisite.

A test marked `server` or `browser` that skips (PostgreSQL, Chromium or the `mlflow server` missing) FAILS instead,
because `bash scripts/setup.sh` installs all of them and a green run must mean they were exercised. To run without
one on purpose, name its mark: HARNESS_ALLOW_SKIP=browser (or browser,server, or all); deselecting with
`-m "not browser"` also works and is not a skip.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

pytest_plugins = ["pytester"]  # tests/test_suite_policy.py runs the hooks below in an inner session

os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["DO_NOT_TRACK"] = "true"
os.environ.pop("MLFLOW_TRACKING_URI", None)


def torch_threads() -> int:
    """Two torch threads for a lone session; one per pytest-xdist worker (PYTEST_XDIST_WORKER_COUNT), so that the
    workers together use the cores once instead of oversubscribing them (OpenMP threads that wait for a busy core
    stall for seconds per step). Subprocesses a worker starts inherit OMP_NUM_THREADS=1 likewise."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, min(2, (os.cpu_count() or 1) // workers))


if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(torch_threads())
torch.set_num_threads(torch_threads())

MEMORY_TEMP_ROOT = Path("/dev/shm")
MEMORY_TEMP_MIN_FREE = 2 * 2**30  # a full session writes a few MB; Docker's default 64 MB /dev/shm is left alone


def use_memory_for_temporary_folders() -> None:
    """tmp_path and tmp_path_factory in RAM (tmpfs) where it has room: every SQLite commit (MLflow, Optuna) syncs the
    file, and building one new MLflow store (~70 migrations) measured 10 s on a busy disk against 4 s in memory.
    pytest reads PYTEST_DEBUG_TEMPROOT when it makes its first temporary folder; one set by hand wins."""
    if "PYTEST_DEBUG_TEMPROOT" in os.environ or not MEMORY_TEMP_ROOT.is_dir():
        return
    if os.access(MEMORY_TEMP_ROOT, os.W_OK) and shutil.disk_usage(MEMORY_TEMP_ROOT).free >= MEMORY_TEMP_MIN_FREE:
        os.environ["PYTEST_DEBUG_TEMPROOT"] = str(MEMORY_TEMP_ROOT)


use_memory_for_temporary_folders()


@pytest.fixture
def harness_home(tmp_path, monkeypatch):
    """A private runs folder (SQLite MLflow store, checkpoints) for one test."""
    home = tmp_path / "runs"
    monkeypatch.setenv("HARNESS_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for timing-sensitive modules: on a shared 2-core machine, OpenMP threads oversubscribed by
    other processes stall for seconds per step; results do not depend on it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


SLOW_TIMEOUT_S = 1200  # the ini's `timeout` (300 s) is for the rest


# Under pytest-xdist (`-n 2 --dist loadgroup`, the README's test command): the longest tests, measured with
# --durations, are handed out first, then the other slow tests, then the rest, so that no worker is left running a
# long test alone at the end; the order changes nothing else.
LONGEST_FIRST = (
    "tests/studies/test_demo.py::test_sigterm_stops_every_worker_and_resume_runs_only_the_rest",
    "tests/harness/test_kill_resume.py",
    "tests/harness/test_plugins.py::test_an_installed_plugin_package_works_through_every_command",
    "tests/studies/test_tune_postgres.py",
    "tests/studies/test_demo.py::test_demo_end_to_end_with_two_workers",
    "tests/harness/test_faults.py::test_server_lost_mid_run_spools_every_step_and_replay_delivers_each_once",
    "tests/harness/test_plugins.py::test_a_plugin_module_named_by_flag_reaches_the_main_process_and_the_workers",
    "tests/harness/test_cli.py::test_sigkill_then_resume_matches_an_uninterrupted_run",
    "tests/bench/test_bench_cli.py::test_cli_bench_gpu_quick_runs_every_child_kind",
)
# Modules whose tests share a costly module- or session-scoped fixture run on one worker (an xdist_group each), so
# that the fixture is built once, not once per worker: the kill/resume scenarios with their reference run, trained
# runs read by several tests, one `mlflow server` for the server and browser tests.
SHARED_FIXTURE_GROUPS = {
    "tests/harness/test_kill_resume.py": "kill-resume",
    "tests/harness/test_resume.py": "resume",
    "tests/studies/test_report.py": "report",
    "tests/studies/test_figures.py": "figures",
    "tests/studies/test_mlflow_server.py": "mlflow-server",
    "tests/studies/test_ui_browser.py": "mlflow-server",
    "tests/harness/test_eval_rerun.py": "eval-rerun",
}


def schedule_rank(item: pytest.Item) -> int:
    for rank, prefix in enumerate(LONGEST_FIRST):
        if item.nodeid == prefix or item.nodeid.startswith(prefix + "::"):
            return rank
    return len(LONGEST_FIRST) + (0 if item.get_closest_marker("slow") else 1)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests get SLOW_TIMEOUT_S unless they carry their own @pytest.mark.timeout. In a pytest-xdist worker:
    the longest tests first, and the modules of SHARED_FIXTURE_GROUPS kept together."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
    if not hasattr(config, "workerinput"):  # not an xdist worker (nor a pytester session inside one)
        return
    items.sort(key=schedule_rank)  # stable: collection order within a rank; every worker sorts the same way
    for item in items:
        group = SHARED_FIXTURE_GROUPS.get(item.nodeid.split("::")[0])
        if group:
            item.add_marker(pytest.mark.xdist_group(group))


REQUIRED_MARKS = frozenset({"server", "browser"})  # every prerequisite of these is installed by scripts/setup.sh


def allowed_skips() -> set[str]:
    """The marks whose tests may skip, from HARNESS_ALLOW_SKIP (comma-separated; `all` allows every one)."""
    named = {name.strip() for name in os.environ.get("HARNESS_ALLOW_SKIP", "").split(",") if name.strip()}
    return set(REQUIRED_MARKS) if "all" in named else named


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Turn the skip of a `server`/`browser` test into a failure unless HARNESS_ALLOW_SKIP names one of its marks."""
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    required = {mark.name for mark in item.iter_markers()} & REQUIRED_MARKS
    if required and not required & allowed_skips():
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        report.outcome = "failed"
        report.longrepr = (f"a {' and '.join(sorted(required))} test skipped: {reason}\n"
                           f"Install its prerequisites with `bash scripts/setup.sh`, or allow the skip with "
                           f"HARNESS_ALLOW_SKIP={sorted(required)[0]}.")
