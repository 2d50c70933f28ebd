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
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerFailed(RuntimeError):
    """The server exited or did not become ready in time (with its output)."""


@contextmanager
def serve(index: str | Path, *args: str, env: dict[str, str] | None = None, ready_timeout: float = 120.0,
          device: str | None = "cpu") -> Iterator[str]:
    """Run ``alignsearch serve --index INDEX ARGS...`` (log level warning; ``device`` None: the server's default)
    and yield its base URL once ``/readyz`` answers 200; the process is stopped on exit. ``env`` adds to the
    environment."""
    port = free_port()
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a chatty server never blocks on a full pipe
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignsearch", "serve", "--index", str(index), "--port", str(port),
         *(["--device", device] if device else []), "--log-level", "warning", *args],
        env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise ServerFailed(f"server exited with {proc.returncode}: {log.read()[-4000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ServerFailed(f"server did not become ready in {ready_timeout:.0f} s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
