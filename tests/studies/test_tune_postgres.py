"""Workers on several machines: two `harness tune` invocations (one of them with two worker processes) share a
PostgreSQL storage that this test starts in a throwaway cluster, and the trial count adds up.

Needs Debian's postgresql (initdb and pg_ctl under /usr/lib/postgresql/*/bin or on PATH); skipped, with the reason
printed, where they are absent. PostgreSQL refuses to run as root, so as root the cluster runs as user postgres.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import warm_cli

from harness.cli import main
from harness.studies.tune import PARENT_ATTR, open_existing
from harness.tracking import Tracker

pytestmark = [pytest.mark.server, pytest.mark.slow, pytest.mark.timeout(1800)]  # two tune runs, then a third

CLI = ["--dataset", "fmnistlt", "--if", "10", "--epochs", "1+1", "--val-per-class", "5", "--device", "cpu",
       "--startup-trials", "2", "--set", "data.n_max=20", "--set", "data.test_per_class=5",
       "--set", "data.augment=none", "--set", "method.depth=8"]  # 79 images, ResNet-8: one batch per epoch


def postgres_bindir() -> Path | None:
    """Where initdb and pg_ctl live: PATH first, then Debian's versioned folders, newest first."""
    found = shutil.which("initdb")
    candidates = ([Path(found).resolve().parent] if found else []) + \
        [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    return next((c for c in candidates if (c / "initdb").is_file() and (c / "pg_ctl").is_file()), None)


def skip(reason: str) -> None:
    print(f"SKIP test_tune_postgres: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A throwaway cluster on 127.0.0.1:<free port> with a database `optuna`; stopped and deleted afterwards."""
    bindir = postgres_bindir()
    if bindir is None:
        skip("PostgreSQL binaries (initdb, pg_ctl) not found; install Debian's: apt-get install -y postgresql")
    user = None
    if os.geteuid() == 0:  # postgres will not run as root: use the package's system user
        try:
            user = pwd.getpwnam("postgres").pw_name
        except KeyError:
            skip("running as root and there is no 'postgres' user to run the server as")
    folder = Path(tempfile.mkdtemp(prefix="harness-pg-"))  # not under pytest's 0700 tmp: the server user reads it
    if user:
        shutil.chown(folder, user)

    def pg(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run([str(a) for a in args], cwd=folder, user=user, capture_output=True, text=True,
                              check=check, timeout=120)

    data, port = folder / "data", free_port()
    pg(bindir / "initdb", "-D", data, "-A", "trust", "-U", "harness", "--locale=C", "-E", "UTF8", "--no-sync")
    started = pg(bindir / "pg_ctl", "-D", data, "-l", folder / "server.log", "-w", "-t", "60",
                 "-o", f"-h 127.0.0.1 -p {port} -k {folder} -c fsync=off", "start", check=False)
    try:
        if started.returncode != 0:
            log = (folder / "server.log").read_text() if (folder / "server.log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {started.stderr}\n{log}")
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=port, user="harness", dbname="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("CREATE DATABASE optuna")
        connection.close()
        yield f"postgresql+psycopg2://harness@127.0.0.1:{port}/optuna"
    finally:
        pg(bindir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_global_tracking_uri() -> Iterator[None]:
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # Tracker.search (mlflow.search_runs) exports it


def test_two_invocations_share_a_postgres_study(postgres_url, harness_home, capsys):
    env = {**os.environ, "HARNESS_HOME": str(harness_home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = ["tune", *CLI, "--storage", postgres_url, "--study", "pg"]
    # Two "machines" at once: one with two worker processes adding 2 trials, one adding 1 (forked warm processes,
    # tests/warm_cli.py; the workers are spawned interpreters as for a user).
    first = warm_cli.popen([*command, "--trials", "2", "--workers", "2"], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    second = warm_cli.popen([*command, "--trials", "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    outputs = [proc.communicate(timeout=900)[0] for proc in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], "\n".join(outputs)
    study = open_existing("pg", postgres_url)
    assert len(study.trials) == 3, "\n".join(outputs)
    assert {t.state.name for t in study.trials} <= {"COMPLETE", "PRUNED"}
    assert len({tuple(t.params.items()) for t in study.trials}) == 3  # concurrent invocations seed apart
    assert len({t.user_attrs["worker"] for t in study.trials}) >= 2, "\n".join(outputs)  # several processes
    # One parent run for both invocations, one MLflow child run per trial.
    parent = study.user_attrs[PARENT_ATTR]
    tracker = Tracker(f"sqlite:///{harness_home / 'mlflow.db'}")  # the store the invocations wrote
    children = tracker.search(["tune-pg"], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(children["tags.trial_number"].astype(int)) == list(range(3)), "\n".join(outputs)
    # Rerunning resumes the shared study: 3 + 1 (in-process: the processes above were the concurrency).
    assert main([*command, "--trials", "1"]) == 0, capsys.readouterr().err
    assert len(open_existing("pg", postgres_url).trials) == 4, capsys.readouterr().out
