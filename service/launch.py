"""Start a real ``alignsearch serve`` in a subprocess on 127.0.0.1 and wait for ``/readyz``: the one launcher that
the tests and the serving benchmark share."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerFailed(RuntimeError):
    """The server exited or did not become ready in time (with its output)."""


@dataclass
class Server:
    """A running ``alignsearch serve`` subprocess (:func:`start`)."""

    proc: subprocess.Popen
    url: str
    port: int
    log: IO[str]

    def kill(self) -> None:
        """SIGKILL: no shutdown of any kind, as a crash or the OOM killer would end it."""
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        """Terminate (SIGKILL after 20 s) and close the log."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()


def start(index: str | Path, *args: str, env: dict[str, str] | None = None, ready_timeout: float = 120.0,
          device: str | None = "cpu", port: int | None = None) -> Server:
    """Start ``alignsearch serve --index INDEX ARGS...`` (log level warning; ``device`` None: the server's default;
    ``port`` None: a free one) and return it once ``/readyz`` answers 200 (stopped, and ServerFailed, if it
    does not). ``env`` adds to the environment."""
    port = port or free_port()
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty server never blocks on a full pipe
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignsearch", "serve", "--index", str(index), "--port", str(port),
         *(["--device", device] if device else []), "--log-level", "warning", *args],
        env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT, text=True)
    server = Server(proc, f"http://127.0.0.1:{port}", port, log)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                raise ServerFailed(f"server exited with {proc.returncode}: {server.output()[-4000:]}")
            try:
                if httpx.get(f"{server.url}/readyz", timeout=1).status_code == 200:
                    return server
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ServerFailed(f"server did not become ready in {ready_timeout:.0f} s")
            time.sleep(0.2)
    except BaseException:
        server.stop()
        raise


@contextmanager
def serve(index: str | Path, *args: str, env: dict[str, str] | None = None, ready_timeout: float = 120.0,
          device: str | None = "cpu") -> Iterator[str]:
    """:func:`start` a server and yield its base URL; the process is stopped on exit."""
    server = start(index, *args, env=env, ready_timeout=ready_timeout, device=device)
    try:
        yield server.url
    finally:
        server.stop()
