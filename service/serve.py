"""``alignsearch serve``: check the index and the port, load the index and its model, run the API with uvicorn."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import socket
from pathlib import Path
from collections.abc import Callable
from typing import Any

from alignsearch.models.cli import add_progress_option, apply_progress_option

from .settings import Settings


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    defaults = Settings()
    p = sub.add_parser("serve", help="serve an index over HTTP (the search page and the JSON API)",
                       description="Start the search API and its page. Each setting's default can also be set "
                                   "with an ALIGNSEARCH_* environment variable (named in its help).")
    p.add_argument("--index", type=Path, default=defaults.index,
                   help="index folder, as written by `alignsearch index build --out` (default: ./index, or "
                        "$ALIGNSEARCH_INDEX when set)")
    p.add_argument("--model", default=defaults.model,
                   help="model folder or name (default: the one named in the index manifest; env ALIGNSEARCH_MODEL)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--device", default=defaults.device, help="auto | cpu | cuda; env ALIGNSEARCH_DEVICE")
    p.add_argument("--rerank-precision", choices=("auto", "float32", "float16"), default=defaults.rerank_precision,
                   help="the rerank's arithmetic: auto = the kernel this machine runs fastest, timed on the index "
                        "when it opens (float32; float32 in cache-sized chunks; float16, scores within 2e-3; "
                        "bfloat16 in chunks, within 3e-3; the last two for batches of 3 text queries or more on a "
                        "CPU); float32 = scores equal to the per-query path; float16; env "
                        "ALIGNSEARCH_RERANK_PRECISION")
    p.add_argument("--api-key", default=defaults.api_key,
                   help="require 'Authorization: Bearer KEY' on the API (default: none; env ALIGNSEARCH_API_KEY)")
    add_allow_open_option(p, defaults.allow_open)
    p.add_argument("--allow-writes", action="store_true", default=defaults.allow_writes,
                   help="accept POST /images, DELETE /images/ID and PATCH /images/ID/metadata without an API key "
                        "(with a key they need it; without either they are refused); env ALIGNSEARCH_ALLOW_WRITES=1")
    p.add_argument("--max-batch", type=int, default=defaults.max_batch,
                   help="micro-batch size (1 disables batching); env ALIGNSEARCH_MAX_BATCH")
    p.add_argument("--batch-wait-ms", type=float, default=defaults.batch_wait_ms,
                   help="how long a query waits for others to share its forward pass; env ALIGNSEARCH_BATCH_WAIT_MS")
    p.add_argument("--max-upload-bytes", type=int, default=defaults.max_upload_bytes,
                   help="largest image a query may upload; env ALIGNSEARCH_MAX_UPLOAD_BYTES")
    p.add_argument("--workers", type=int, default=defaults.workers,
                   help="server processes sharing the port and the index's memory maps (each loads its own model; "
                        "each admits its share of the queues, so the server as a whole waits on about as many "
                        "searches as one process); env ALIGNSEARCH_WORKERS")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (info also logs each request)")
    add_progress_option(p)
    p.set_defaults(func=run_serve)


def add_allow_open_option(p: argparse.ArgumentParser, default: bool) -> None:
    """``--allow-open``: the explicit consent to serve a non-loopback address without an API key."""
    p.add_argument("--allow-open", action="store_true", default=default,
                   help="listen on a non-loopback --host (0.0.0.0, ::, a LAN address) without an API key; without "
                        "it such a server refuses to start (env ALIGNSEARCH_ALLOW_OPEN=1)")


def is_loopback(host: str) -> bool | None:
    """True when every address ``host`` names is a loopback address (127.0.0.0/8, ::1, ``localhost``); None
    when it names none (:func:`bind` reports that)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError):
        return None
    addresses = {info[4][0].split("%")[0] for info in infos}
    try:
        return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)
    except ValueError:
        return False


def refuse_open(host: str, api_key: str | None, allow_open: bool) -> None:
    """Raise ``ValueError`` when ``host`` is reachable from other machines, no API key is set and the caller
    did not say ``--allow-open``: an open search API on a network is a choice, never a default."""
    if api_key or allow_open or is_loopback(host) is not False:
        return
    raise ValueError(f"--host {host} is reachable from other machines and no API key is set: set one with "
                     f"--api-key KEY (or $ALIGNSEARCH_API_KEY), or serve it open on purpose with --allow-open "
                     f"(or ALIGNSEARCH_ALLOW_OPEN=1)")


def url(host: str, port: int) -> str:
    """The address a browser on this machine opens for a server listening on ``host:port``."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def bind(host: str, port: int) -> socket.socket:
    """Bind ``host:port`` now (uvicorn listens on it later), so a busy port is found before the model loads."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise OSError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart is not refused
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise OSError(f"port {port} on {host} is already in use (another server?): stop it, or pick "
                          f"another with --port") from None
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def run_app(app: Any, sock: socket.socket, log_level: str, header_timeout_s: float | None = None) -> None:
    """Serve ``app`` with uvicorn on the socket :func:`bind` returned: an idle kept-alive connection is closed
    after 5 s, one whose request headers take longer than ``header_timeout_s`` (default: the setting) too."""
    import uvicorn

    from .connections import KEEP_ALIVE_S, guarded_protocol

    timeout = Settings().header_timeout_s if header_timeout_s is None else header_timeout_s
    uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_keep_alive=KEEP_ALIVE_S,
                                  http=guarded_protocol(timeout))).run(sockets=[sock])


def serving_line(index: Path, counts: dict[str, int], host: str, port: int, workers: int = 1) -> str:
    """The one line a person reads when the server starts: what, from where, on which address."""
    processes = f" with {workers} workers" if workers > 1 else ""
    return (f"alignsearch: serving {counts.get('images', 0)} images / {counts.get('captions', 0)} captions "
            f"from {index} on {url(host, port)}{processes} (Ctrl-C stops it)")


def serve_worker(sock: socket.socket, announce: Callable[[Any], None], settings: Settings, log_level: str,
                 prepare: Callable[[Any], None] | None = None) -> None:
    """One server process on the bound ``sock``: load the index and its model, ``announce`` its counts, serve.
    ``prepare(searcher)``, when given, runs on the loaded searcher first (the benchmarks swap the encoders there)."""
    from alignsearch.indexer.allocator import keep_freed_memory
    from alignsearch.indexer.search import Searcher

    keep_freed_memory()  # image queries encode up to 46% faster (indexer/allocator.py)

    from .app import create_app
    from .compute import compute_threads

    # fails clearly on a mismatch; loaded on the thread that runs the searches (service/compute.py)
    searcher = compute_threads().light.run(Searcher.open, settings.index, settings.model, settings.device,
                                           rerank_precision=settings.rerank_precision)
    if prepare is not None:
        prepare(searcher)
    announce(searcher.index.manifest["counts"])
    run_app(create_app(settings, searcher), sock, log_level, settings.header_timeout_s)


def run_serve(args: argparse.Namespace) -> int:
    from alignsearch.indexer.cli import require_index

    if args.workers < 1:
        raise ValueError("--workers must be >= 1")
    try:  # the cheap checks first: no model loads for a missing index or a busy port
        require_index(args.index)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc}, or name another with --index DIR (or $ALIGNSEARCH_INDEX)") from None
    refuse_open(args.host, args.api_key, args.allow_open)
    sock = bind(args.host, args.port)
    try:
        apply_progress_option(args)
        settings = Settings(index=args.index, model=args.model, device=args.device, api_key=args.api_key,
                            allow_open=args.allow_open, allow_writes=args.allow_writes,
                            max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                            max_upload_bytes=args.max_upload_bytes, rerank_precision=args.rerank_precision,
                            workers=args.workers)

        def announce(counts: dict[str, int], workers: int = 1) -> None:
            print(serving_line(args.index, counts, args.host, args.port, workers), flush=True)

        if args.workers == 1:
            serve_worker(sock, announce, settings, args.log_level)
            return 0
        from .workers import run_workers, worker_settings

        return run_workers(sock, args.workers, serve_worker, (worker_settings(settings, args.workers), args.log_level),
                           on_ready=lambda infos: announce(infos[0], args.workers))
    finally:
        sock.close()
