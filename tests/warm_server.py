"""A warm `python -m harness.cli` for the tests (`tests/warm_cli.py` is its client).

A fresh `python -m harness.cli run ...` spends ~12 s of one core importing torch (with its CUDA libraries),
torchvision (which imports torch._dynamo) and mlflow before it trains a tiny test model for a second; the suite's
signal, resume, fault and concurrency tests start about a hundred such processes. This server imports those modules
once, then forks one child per request: the child becomes the requested `python -m harness.cli ARGS` process (its own
pid, the caller's environment, working directory and stdin/stdout/stderr, optionally its own session, default signal
dispositions), runs `harness/cli.py` as `__main__` exactly as `-m` does, and exits as the interpreter would (thread
shutdown, atexit handlers, flushed streams). Nothing the harness computes is imported-and-called here: the server
only imports modules, so no cache, registry lookup, torch thread pool or MLflow client exists before the fork.

Protocol, one Unix-socket connection per child: the client sends one JSON line {argv, env, cwd, new_session} with
its three standard-stream descriptors attached (SCM_RIGHTS); the server answers {"pid": N} when the child runs and
{"returncode": R} (Popen's convention: -signum when a signal ended it) when it exits. The server is one thread
(forking a threaded process is unsafe): a select loop that reaps children with waitpid(WNOHANG).
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import socket
import sys

# The costly third-party imports and the engine, nothing that binds a name a `--plugin` may replace: the commands'
# study modules (`from harness.runner import Run`) are imported by the child when its command runs, as in a fresh
# process, after its plugins (tests/harness/plugins_for_tests/pause_points.py replaces `runner.Run`).
PRELOAD = (
    "torch", "torchvision", "numpy", "pandas", "rich", "optuna", "sqlalchemy", "alembic",
    "mlflow", "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.db.utils",
    "harness.cli", "harness.runner", "harness.trainer", "harness.tracking", "harness.evaluate",
)


def child(request: dict, fds: list[int], listener: socket.socket, connection: socket.socket) -> None:
    """In the forked child: become `python -m harness.cli *argv` and never return."""
    code = 1
    try:
        listener.close()
        connection.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        if request["new_session"]:
            os.setsid()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt, as at interpreter start
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:0] = [p for p in [request["cwd"], *extra] if p not in sys.path]  # -m puts the cwd first
        sys.argv = ["-m", *request["argv"]]
        import runpy

        sys.modules.pop("harness.cli", None)  # as under -m, where nothing has imported it as a module yet

        try:
            runpy.run_module("harness.cli", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            if exit_.code is not None and not isinstance(exit_.code, int):
                print(exit_.code, file=sys.stderr)
        except KeyboardInterrupt:  # the interpreter re-raises an uncaught Ctrl-C as the signal itself
            code = -signal.SIGINT
        except BaseException:  # an uncaught exception: the interpreter prints it and exits 1
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            import atexit
            import threading

            threading._shutdown()  # type: ignore[attr-defined]  # as at interpreter exit: join non-daemon threads
            atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed pipe must not turn an exit code into a hang
                pass
        if code < 0:
            signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
        os._exit(code & 0xFF)


def serve(path: str) -> None:
    # started as a script, so sys.path[0] is tests/, where tests/harness would shadow the harness package
    del sys.path[0]
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    for name in PRELOAD:
        importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    parent = os.getppid()
    print("ready", flush=True)
    waiting: dict[int, socket.socket] = {}  # child pid -> the connection that waits for its exit
    while True:
        readable, _, _ = select.select([listener], [], [], 0.02)
        if readable:
            connection, _ = listener.accept()
            message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
            request = json.loads(message)
            pid = os.fork()
            if pid == 0:
                child(request, fds, listener, connection)
            for fd in fds:
                os.close(fd)
            connection.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            waiting[pid] = connection
        while waiting:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            connection = waiting.pop(pid, None)
            if connection is not None:
                try:
                    connection.sendall(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
                except OSError:  # the client went away
                    pass
                connection.close()
        if os.getppid() != parent:  # the pytest worker that started this server is gone
            return


if __name__ == "__main__":
    serve(sys.argv[1])
