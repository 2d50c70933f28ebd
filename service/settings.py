"""Server settings: command-line flags, with environment variables (``ALIGNSEARCH_*``) as defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"ALIGNSEARCH_{name}", default)


@dataclass
class Settings:
    index: Path = field(default_factory=lambda: Path(_env("INDEX", "index")))
    model: str | None = field(default_factory=lambda: _env("MODEL"))
    device: str = field(default_factory=lambda: _env("DEVICE", "auto"))
    api_key: str | None = field(default_factory=lambda: _env("API_KEY"))
    max_batch: int = field(default_factory=lambda: int(_env("MAX_BATCH", "16")))
    batch_wait_ms: float = field(default_factory=lambda: float(_env("BATCH_WAIT_MS", "5")))
    max_upload_bytes: int = field(default_factory=lambda: int(_env("MAX_UPLOAD_BYTES", str(10 * 1024 * 1024))))
    max_pixels: int = field(default_factory=lambda: int(_env("MAX_PIXELS", str(40_000_000))))
