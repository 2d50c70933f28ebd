"""Server settings: command-line flags, with environment variables (``ALIGNSEARCH_*``) as defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from alignsearch.models.jpeg_work import MAX_BLOCK_SCANS, MAX_JPEG_SCANS


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"ALIGNSEARCH_{name}", default)


def _int(name: str, default: int) -> int:
    return int(_env(name, str(default)))


def _float(name: str, default: float) -> float:
    return float(_env(name, str(default)))


def _bool(name: str) -> bool:
    return (_env(name) or "").strip().lower() in ("1", "true", "yes", "on")


@dataclass
class Settings:
    index: Path = field(default_factory=lambda: Path(_env("INDEX", "index")))
    model: str | None = field(default_factory=lambda: _env("MODEL"))
    device: str = field(default_factory=lambda: _env("DEVICE", "auto"))
    # the rerank's arithmetic: auto (the kernel measured fastest when the index opens: float32, float16 or
    # bfloat16 for batches of 3+ text queries on a CPU; float16 on CUDA: indexer/kernels.py), float32, float16
    rerank_precision: str = field(default_factory=lambda: _env("RERANK_PRECISION", "auto"))
    api_key: str | None = field(default_factory=lambda: _env("API_KEY"))
    # listen on a non-loopback address without an API key (off: such a server refuses to start)
    allow_open: bool = field(default_factory=lambda: _bool("ALLOW_OPEN"))
    # POST/DELETE/PATCH /images on a server without an API key (off: writes need the key)
    allow_writes: bool = field(default_factory=lambda: _bool("ALLOW_WRITES"))
    # uploads arriving within this window of the first one waiting (at most write_batch_max) are one update
    write_batch_ms: float = field(default_factory=lambda: _float("WRITE_BATCH_MS", 200))
    write_batch_max: int = field(default_factory=lambda: _int("WRITE_BATCH_MAX", 64))
    max_batch: int = field(default_factory=lambda: _int("MAX_BATCH", 16))
    batch_wait_ms: float = field(default_factory=lambda: _float("BATCH_WAIT_MS", 5))
    # request bodies: an image upload, and everything else (JSON queries)
    max_upload_bytes: int = field(default_factory=lambda: _int("MAX_UPLOAD_BYTES", 10 * 1024 * 1024))
    max_json_bytes: int = field(default_factory=lambda: _int("MAX_JSON_BYTES", 64 * 1024))
    body_timeout_s: float = field(default_factory=lambda: _float("BODY_TIMEOUT_S", 30))
    # a request's headers must be complete this long after the connection opened or its last response
    header_timeout_s: float = field(default_factory=lambda: _float("HEADER_TIMEOUT_S", 10))
    # image uploads, checked from the header before any pixel is decoded
    max_pixels: int = field(default_factory=lambda: _int("MAX_PIXELS", 40_000_000))
    max_image_side: int = field(default_factory=lambda: _int("MAX_IMAGE_SIDE", 12_000))
    decode_workers: int = field(default_factory=lambda: _int("DECODE_WORKERS", max(1, (os.cpu_count() or 2) // 2)))
    decode_timeout_s: float = field(default_factory=lambda: _float("DECODE_TIMEOUT_S", 10))
    # a JPEG's scans (progressive passes) and blocks decoded over all scans, read from its markers
    max_jpeg_scans: int = field(default_factory=lambda: _int("MAX_JPEG_SCANS", MAX_JPEG_SCANS))
    max_decode_work: int = field(default_factory=lambda: _int("MAX_DECODE_WORK", MAX_BLOCK_SCANS))
    # admission control of the search work
    max_queue: int = field(default_factory=lambda: _int("MAX_QUEUE", 64))
    max_heavy_queue: int = field(default_factory=lambda: _int("MAX_HEAVY_QUEUE", 4))
    heavy_work: int = field(default_factory=lambda: _int("HEAVY_WORK", 2_000))
    max_work: int = field(default_factory=lambda: _int("MAX_WORK", 20_000))
    request_timeout_s: float = field(default_factory=lambda: _float("REQUEST_TIMEOUT_S", 30))
    # the heavy lane's thread and the upload decoders run this much nicer than the light lane (0: the same
    # priority): the CPU goes to cheap queries first when both want it
    heavy_nice: int = field(default_factory=lambda: _int("HEAVY_NICE", 10))
    # server processes (alignsearch serve --workers): each admits its share of max_queue / max_heavy_queue
    workers: int = field(default_factory=lambda: _int("WORKERS", 1))
    # following the index on disk (0 disables the watcher; POST /admin/reload still works)
    reload_interval_s: float = field(default_factory=lambda: _float("RELOAD_INTERVAL_S", 1.0))

    @property
    def max_upload_body(self) -> int:
        """Largest request body for an image search: the image, base64-expanded, plus the form fields."""
        return self.max_upload_bytes * 4 // 3 + 64 * 1024
