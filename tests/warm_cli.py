"""`python -m harness.cli ARGS` in a real process of its own, started in a fraction of a second.

`popen` and `run` mirror `subprocess.Popen` / `subprocess.run` for the CLI: the process has its own pid, receives
signals from the test, exits with the CLI's code (or -signum), and writes to the streams it is given. It is forked
from a per-worker server that has already imported torch, torchvision and mlflow (`tests/warm_server.py`), so each
start costs no interpreter start-up and no imports: ~12 s of one core saved per process on this machine. Use it where
a test is about what the CLI process does (signals, resume, faults, races); a test about a fresh interpreter (entry
points of a package installed during the test, `--help` start-up) starts `sys.executable` itself.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

SERVER = Path(__file__).with_name("warm_server.py")
_lock = threading.Lock()
_server: tuple[subprocess.Popen, str] | None = None


def _socket_path() -> str:
    """The per-process server, started on first use (the scenarios of one module may ask from several threads)."""
    global _server
    with _lock:
        if _server is None or _server[0].poll() is not None:
            folder = tempfile.mkdtemp(prefix="warm-cli-")
            path = os.path.join(folder, "socket")
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
            process = subprocess.Popen([sys.executable, str(SERVER), path], stdout=subprocess.PIPE, text=True, env=env)
            assert process.stdout is not None
            line = process.stdout.readline()
            if line.strip() != "ready":
                process.kill()
                raise RuntimeError(f"the warm CLI server did not start (exit {process.wait()})")
            _server = (process, path)
            atexit.register(process.kill)
        return _server[1]


def _stream(spec: Any, default: int, mode: str) -> tuple[int, IO | None, bool]:
    """(descriptor for the child, the parent's end of a pipe or None, whether to close the descriptor here)."""
    if spec is None:
        return default, None, False
    if spec == subprocess.DEVNULL:
        return os.open(os.devnull, os.O_RDWR), None, True
    if spec == subprocess.PIPE:
        read, write = os.pipe()
        if mode == "r":  # the child's stdin: we keep the write end
            return read, os.fdopen(write, "w"), True
        return write, os.fdopen(read), True
    if isinstance(spec, int):
        return spec, None, False
    return spec.fileno(), None, False


class WarmProcess:
    """The part of `subprocess.Popen` the tests use: pid, returncode, poll, wait, send_signal, kill, terminate and
    the stdin/stdout/stderr pipes they asked for (text)."""

    def __init__(self, connection: socket.socket, stdin: IO | None, stdout: IO | None, stderr: IO | None) -> None:
        self._connection, self._buffer = connection, b""
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.pid: int = self._message(None)["pid"]
        self.returncode: int | None = None

    def _message(self, timeout: float | None) -> dict | None:
        """The server's next JSON line, or None if none arrives within `timeout` seconds (None: wait)."""
        while b"\n" not in self._buffer:
            if not select.select([self._connection], [], [], timeout)[0]:
                return None
            chunk = self._connection.recv(4096)
            if not chunk:
                raise RuntimeError("the warm CLI server went away before the process exited")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _read_exit(self, timeout: float | None) -> None:
        message = self._message(timeout)
        if message is not None:
            self.returncode = message["returncode"]
            self._connection.close()

    def poll(self) -> int | None:
        if self.returncode is None:
            self._read_exit(0.0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._read_exit(timeout)
            if self.returncode is None:
                raise subprocess.TimeoutExpired(["harness", "(warm)"], timeout or 0.0)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str | None, str | None]:
        """Read the stdout and stderr pipes to their end (in threads, so neither can fill up and stall the child),
        then wait; (stdout, stderr) as text, None where not a pipe."""
        pipes = [p for p in (self.stdout, self.stderr) if p is not None]
        texts: dict[int, str] = {}
        readers = [threading.Thread(target=lambda p=p: texts.__setitem__(id(p), p.read()), daemon=True)
                   for p in pipes]
        for reader in readers:
            reader.start()
        self.wait(timeout)
        for reader in readers:
            reader.join()
        return tuple(None if p is None else texts[id(p)] for p in (self.stdout, self.stderr))  # type: ignore[return-value]

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def popen(argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
          stdin: Any = subprocess.DEVNULL, stdout: Any = None, stderr: Any = None,
          start_new_session: bool = False) -> WarmProcess:
    """Start `python -m harness.cli *argv`; streams as in Popen (None, PIPE, DEVNULL, a file or a descriptor, and
    stderr=STDOUT; pipes are text)."""
    streams = [_stream(stdin, 0, "r"), _stream(stdout, 1, "w")]
    streams.append((streams[1][0], None, False) if stderr == subprocess.STDOUT else _stream(stderr, 2, "w"))
    request = {"argv": [str(a) for a in argv], "env": dict(os.environ if env is None else env),
               "cwd": str(cwd or os.getcwd()), "new_session": start_new_session}
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.connect(_socket_path())
    socket.send_fds(connection, [json.dumps(request).encode()], [fd for fd, _, _ in streams])
    for fd, _, close in streams:
        if close:
            os.close(fd)
    return WarmProcess(connection, *(pipe for _, pipe, _ in streams))


def run(argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
        timeout: float | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """`subprocess.run([python, -m, harness.cli, *argv], capture_output=True, text=True, ...)`; a timeout kills the
    process and raises TimeoutExpired, as subprocess.run does."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = popen(argv, env=env, cwd=cwd, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                        stdout=out, stderr=err)
        if input is not None and process.stdin is not None:
            process.stdin.write(input)
            process.stdin.close()
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise subprocess.TimeoutExpired(["harness", *argv], timeout or 0.0,
                                            output=_read(out), stderr=_read(err)) from None
        return subprocess.CompletedProcess(["harness", *argv], code, _read(out), _read(err))


def _read(file: IO) -> str:
    file.seek(0)
    return file.read()
